"""The measured numbers of docs/reliability.md: DDP over 2 gloo CPU processes vs one process at
equal global batch (the setup of tests/test_ddp.py), the local-BatchNorm difference with
resnet_tiny, and the start-up time of the `local` executor.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/ddp_equality.py

Writes benchmarks/results/ddp_equality.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_result  # noqa: E402
from medscalpel.data import ArrayDataset, Preprocess  # noqa: E402
from medscalpel.engine.distributed import train_ddp  # noqa: E402
from medscalpel.engine.predict import predict  # noqa: E402
from medscalpel.engine.train import TrainConfig, train  # noqa: E402
from medscalpel.models import create_model  # noqa: E402
from medscalpel.pipeline.executors import map_cells  # noqa: E402

CFG = TrainConfig(epochs=3, batch_size=16, lr=3e-3, seed=0, device="cpu", patience=5)


def data(n: int = 48, size: int = 32, seed: int = 0):
    """tests/test_ddp.py's data: 48 images, 3 labels, 2 unknown labels."""
    rng = np.random.default_rng(seed)
    imgs = (rng.random((n, size, size)) * 80).astype(np.uint8)
    y = (rng.random((n, 3)) < [0.4, 0.3, 0.5]).astype(np.float32)
    y[3, 2] = np.nan
    y[10, 0] = np.nan
    imgs[y[:, 0] == 1, 4:12, 4:12] += 150
    imgs[y[:, 1] == 1, 20:28, 20:28] += 150
    ds = ArrayDataset(imgs, y, ["a", "b", "c"], "multilabel", preprocess=Preprocess(size=size))
    return ds, ds.subset(range(0, n, 3), split="val")


def compare(arch: str) -> dict:
    ds, val = data()
    torch.manual_seed(0)
    model = create_model(arch, 3, 1, 32)
    one = train(model, ds, val, CFG, progress=False)
    two = train_ddp(model, ds, val, CFG, world_size=2, progress=False)
    ref = train_ddp(model, ds, val, CFG, world_size=1, progress=False)
    l1 = np.array([h["train_loss"] for h in one.history])
    l2 = np.array([h["train_loss"] for h in two.history])
    s1 = np.concatenate(ref.extra["step_losses"])
    s2 = np.concatenate(two.extra["step_losses"])
    w = max(float((a - b).abs().max()) for a, b in
            zip(one.model.state_dict().values(), two.model.state_dict().values())
            if a.is_floating_point())
    p1 = predict(one.model, val, progress=False).logits
    p2 = predict(two.model, val, progress=False).logits
    return {"arch": arch, "batch_norm": two.extra["ddp"]["batch_norm"],
            "max_abs_delta_epoch_loss": float(np.abs(l1 - l2).max()),
            "max_abs_delta_step_loss": float(np.abs(s1 - s2).max()), "n_steps": int(s1.size),
            "val_auroc_one": [h["val_auroc"] for h in one.history],
            "val_auroc_two": [h["val_auroc"] for h in two.history],
            "max_abs_delta_weight": w, "max_abs_delta_logit": float(np.abs(p1 - p2).max())}


def _noop(cell):
    return cell


def executor_startup(rounds: int = 3) -> dict:
    """Seconds for map_cells to run two trivial cells: local (forked pool) vs serial."""
    out = {"local": [], "serial": []}
    for _ in range(rounds):
        for ex in ("local", "serial"):
            t = time.perf_counter()
            map_cells(_noop, [{"i": 0}, {"i": 1}], executor=ex, max_workers=2)
            out[ex].append(time.perf_counter() - t)
    return {k: {"median_s": float(np.median(v)), "all_s": v} for k, v in out.items()}


def main() -> None:
    load0 = os.getloadavg()
    t0 = time.time()
    res = {"vit_test": compare("vit_test"), "resnet_tiny_local_bn": compare("resnet_tiny"),
           "executor_startup": executor_startup()}
    save_result("ddp_equality", {**res, "seconds": round(time.time() - t0, 1),
                                 "loadavg_start": list(load0),
                                 "loadavg_end": list(os.getloadavg())},
                {"train": CFG.to_dict(), "world_size": 2, "backend": "gloo",
                 "data": "tests/test_ddp.py::_data (48 images, 32 px, 2 unknown labels)"})


if __name__ == "__main__":
    main()
