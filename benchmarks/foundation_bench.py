"""Issue A benchmark: train/eval throughput of densenet121 at 64 and 128 px on this machine, and
a real-data run on ../shared/data/kermany-pneumonia (de-duplicated, held-out split).

    .venv/bin/python benchmarks/foundation_bench.py throughput
    .venv/bin/python benchmarks/foundation_bench.py kermany --arch densenet121 --epochs 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

from medscalpel.data import Preprocess, open_dataset  # noqa: E402
from medscalpel.engine.metrics import evaluate  # noqa: E402
from medscalpel.engine.predict import predict  # noqa: E402
from medscalpel.engine.train import TrainConfig, train  # noqa: E402
from medscalpel.models import create_model, make_card  # noqa: E402

KERMANY = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany-pneumonia" / "train"


def throughput(args) -> dict:
    out = {}
    for size in (64, 128):
        m = create_model("densenet121", 14, 1, size)
        x = torch.randn(args.batch, 1, size, size)
        y = (torch.rand(args.batch, 14) < 0.1).float()
        opt = torch.optim.AdamW(m.parameters(), 1e-3)
        m.train()
        for _ in range(2):  # warm-up
            loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        t = time.perf_counter()
        for _ in range(args.steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_ips = args.steps * args.batch / (time.perf_counter() - t)
        m.eval()
        with torch.no_grad():
            m(x)
            t = time.perf_counter()
            for _ in range(args.steps):
                m(x)
            eval_ips = args.steps * args.batch / (time.perf_counter() - t)
        out[f"{size}px"] = {"train_images_per_s": round(train_ips, 1),
                            "eval_images_per_s": round(eval_ips, 1)}
        print(size, out[f"{size}px"], flush=True)
    save_result("foundation_throughput", out, {"arch": "densenet121", "batch": args.batch,
                                               "steps": args.steps,
                                               "threads": torch.get_num_threads()})
    return out


def kermany(args) -> dict:
    if not KERMANY.is_dir():
        raise SystemExit(f"{KERMANY} not found: this benchmark needs ../shared/data")
    spec = f"folder:{KERMANY}?dedup=true&val_fraction=0.1&test_fraction=0.2&seed=0"
    pp = Preprocess(size=args.size, channels=1)
    tr = open_dataset(spec, split="train", preprocess=pp.with_augment())
    va = open_dataset(spec, split="val", preprocess=pp)
    te = open_dataset(spec, split="test", preprocess=pp)
    m = create_model(args.arch, tr.num_classes, 1, args.size)
    m.card = make_card(m, tr.class_names, tr.task, pp)
    t0 = time.perf_counter()
    cfg = TrainConfig(epochs=args.epochs, batch_size=32, lr=1e-3, patience=3, seed=0,
                      max_steps_per_epoch=args.max_steps)
    res = train(m, tr, va, cfg)
    res.model.card = m.card
    ev = evaluate(predict(res.model, te), n_boot=1000, seed=0)
    minutes = (time.perf_counter() - t0) / 60
    pneu = ev.classes[ev.classes.index(next(c for c in ev.classes if c.name == "PNEUMONIA"))]
    out = {"arch": args.arch, "size": args.size, "n_train": len(tr), "n_val": len(va),
           "n_test": len(te), "dedup": tr.meta.get("dedup"),
           "auroc": pneu.auroc, "auroc_ci": list(pneu.auroc_ci), "accuracy": ev.macro["accuracy"],
           "macro_f1": ev.macro["f1"], "minutes": round(minutes, 2), "history": res.history}
    print(out, flush=True)
    save_result(f"foundation_kermany_{args.arch}_{args.size}", out, vars(args))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("throughput")
    a.add_argument("--batch", type=int, default=32)
    a.add_argument("--steps", type=int, default=5)
    b = sub.add_parser("kermany")
    b.add_argument("--arch", default="densenet121")
    b.add_argument("--size", type=int, default=128)
    b.add_argument("--epochs", type=int, default=3)
    b.add_argument("--max-steps", type=int, default=None)
    args = p.parse_args()
    {"throughput": throughput, "kermany": kermany}[args.what](args)


if __name__ == "__main__":
    main()
