"""benchmarks/foundation_bench.py's Kermany run, repeated on the folder adapter's patient-wise
split (its default since the image-wise runs of 2026-11-22, which are leaky): same spec, model,
budget and metrics; writes benchmarks/results/foundation_kermany_ARCH_SIZE_patientwise.json.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/foundation_kermany_patientwise.py \
        --arch resnet18 --size 128 --epochs 3 --max-steps 60 [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_result  # noqa: E402
from medscalpel.data.spec import open_dataset  # noqa: E402
from medscalpel.data.transforms import Preprocess  # noqa: E402
from medscalpel.engine.metrics import evaluate  # noqa: E402
from medscalpel.engine.predict import predict  # noqa: E402
from medscalpel.engine.train import TrainConfig, train  # noqa: E402
from medscalpel.models.checkpoint import make_card  # noqa: E402
from medscalpel.models.zoo import create_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    kermany = Path(args.data) / "kermany-pneumonia" / "train"
    spec = f"folder:{kermany}?dedup=true&val_fraction=0.1&test_fraction=0.2&seed=0"
    load0 = os.getloadavg()
    pp = Preprocess(size=args.size, channels=1)
    tr = open_dataset(spec, split="train", preprocess=pp.with_augment())
    va = open_dataset(spec, split="val", preprocess=pp)
    te = open_dataset(spec, split="test", preprocess=pp)
    m = create_model(args.arch, tr.num_classes, 1, args.size)
    m.card = make_card(m, tr.class_names, tr.task, pp)
    t0 = time.perf_counter()
    cfg = TrainConfig(epochs=args.epochs, batch_size=32, lr=1e-3, patience=3, seed=0,
                      max_steps_per_epoch=args.max_steps)
    res = train(m, tr, va, cfg, progress=False)
    res.model.card = m.card
    ev = evaluate(predict(res.model, te, progress=False), n_boot=1000, seed=0)
    pneu = next(c for c in ev.classes if c.name == "PNEUMONIA")
    save_result(f"foundation_kermany_{args.arch}_{args.size}_patientwise", {
        "arch": args.arch, "size": args.size, "n_train": len(tr), "n_val": len(va),
        "n_test": len(te), "split_unit": tr.meta.get("split_unit"), "dedup": tr.meta.get("dedup"),
        "auroc": pneu.auroc, "auroc_ci": list(pneu.auroc_ci), "accuracy": ev.macro["accuracy"],
        "macro_f1": ev.macro["f1"], "minutes": round((time.perf_counter() - t0) / 60, 2),
        "history": res.history, "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg()),
    }, {**vars(args), "spec": "folder:<shared data>/kermany-pneumonia/train?dedup=true&"
                              "val_fraction=0.1&test_fraction=0.2&seed=0",
        "torch_threads": os.environ.get("OMP_NUM_THREADS")})


if __name__ == "__main__":
    main()
