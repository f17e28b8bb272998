"""Issue 32 (Q, deliverable 3): does faithfulness measure faithfulness or confidence?

A model trained on the phantom (seeded; ``--arch`` at ``--size`` px, ``--epochs`` epochs) is
compared with a copy whose logits are multiplied by ``--scale`` (its classifier row and bias
scaled: the same ranking, the same Grad-CAM maps up to rounding, only less confident). The
explanation audit (:func:`medscalpel.audit.changes.explanation_change`) is run on ``--n``
test images under both faithfulness measures: ``probability`` (the raw RISE probability AUCs,
the measure before issue 32) and ``normalised`` (each image's log-odds curve min-max scaled over
its own span, the default now). A measure of faithfulness should report no
change (delta 0); the raw probabilities report one. Two views: ``same_order`` scores both models
on the dense model's own Grad-CAM (the issue's case: the same pixel order), then the audit as a
user runs it, each model with its own Grad-CAM (equal up to float rounding, which can reorder
near-tied pixels of the bilinearly upsampled 2x2 CAM).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/faithfulness_scale.py
    -> benchmarks/results/faithfulness_scale.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

from medscalpel.audit.changes import explanation_change  # noqa: E402
from medscalpel.audit.changes._util import logits_of  # noqa: E402
from medscalpel.audit.changes.explanation import _target_maps  # noqa: E402
from medscalpel.audit.changes.faithfulness import deletion_insertion, road_scores  # noqa: E402
from medscalpel.data import Preprocess, open_dataset  # noqa: E402
from medscalpel.engine.train import TrainConfig, seed_everything, train  # noqa: E402
from medscalpel.models import create_model, make_card  # noqa: E402


def scaled_copy(model: torch.nn.Module, a: float) -> torch.nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.classifier.weight.mul_(a)
        out.classifier.bias.mul_(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="densenet_tiny")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--phantom-n", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--n", type=int, default=64, help="explained test images")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--scale", type=float, default=0.3)
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pp = Preprocess(args.size)
    spec = f"phantom?n={args.phantom_n}&size={args.size}&seed=0"
    tr, va, te = (open_dataset(spec, split=s, preprocess=pp) for s in ("train", "val", "test"))
    seed_everything(0)
    m = create_model(args.arch, tr.num_classes, 1, args.size)
    m.card = make_card(m, tr.class_names, tr.task, tr.preprocess)
    t0 = time.perf_counter()
    dense = train(m, tr, va, config=TrainConfig(epochs=args.epochs, batch_size=64, seed=0,
                                                 patience=args.epochs)).model
    train_s = time.perf_counter() - t0
    cold = scaled_copy(dense, args.scale)
    n = min(args.n, len(te))
    x = torch.stack([te.image(i) for i in range(n)])
    out = {"train_wall_s": round(train_s, 1), "n_images": n, "split": "test",
           "task": tr.task, "classes": list(tr.class_names)}
    # 1. the case: the SAME pixel order (the dense model's Grad-CAM) on both models
    z = logits_of(dense, x)
    target = z.argmax(1)
    maps = _target_maps(dense, x, target, 32)
    out["same_order"] = {}
    for measure in ("probability", "normalised"):
        row = {}
        for name, model in (("dense", dense), ("scaled", cold)):
            d, i, cd, _ = deletion_insertion(model, x, maps, target, steps=args.steps,
                                             measure=measure, return_curves=True,
                                             multiclass=tr.task == "multiclass")
            r = road_scores(model, x, maps, target, measure=measure, seed=0,
                            ranges=cd.max(1) - cd.min(1), multiclass=tr.task == "multiclass")
            row[name] = {"deletion": d, "insertion": i, "road": r}
        out["same_order"][measure] = {
            k: {"dense": float(np.nanmean(row["dense"][k])),
                "scaled": float(np.nanmean(row["scaled"][k])),
                "delta": float(np.nanmean(row["scaled"][k] - row["dense"][k])),
                "max_abs_delta_per_image": float(np.nanmax(np.abs(row["scaled"][k]
                                                                  - row["dense"][k]))),
                "n": int(np.isfinite(row["scaled"][k] - row["dense"][k]).sum())}
            for k in ("deletion", "insertion", "road")}
    # 2. the audit as a user runs it: each model's OWN Grad-CAM (equal up to float rounding)
    for measure in ("probability", "normalised"):
        t0 = time.perf_counter()
        r = explanation_change(dense, cold, x, class_names=tr.class_names, n_faithfulness=n,
                               steps=args.steps, multiclass=tr.task == "multiclass",
                               n_boot=args.n_boot, seed=0, faithfulness_measure=measure,
                               progress=False)
        out[measure] = {k: {"dense": v["ref"]["mean"], "scaled": v["new"]["mean"],
                            "delta": v["delta"]["mean"], "delta_ci": v["delta"]["ci"],
                            "n": v["delta"]["n"], "flat_images": v.get("flat_images"),
                            "empty_maps": v.get("empty_maps")}
                        for k, v in r.faithfulness.items()}
        out[measure]["wall_s"] = round(time.perf_counter() - t0, 1)
        out[measure]["note"] = r.meta["faithfulness_measure"]
        out[measure]["gradcam_spearman_dense_vs_scaled"] = {
            c: r.classes[c]["spearman"]["mean"] for c in r.classes}
    save_result("faithfulness_scale", out, vars(args))
    for measure in ("probability", "normalised"):
        for k in ("deletion", "insertion", "road"):
            d = out["same_order"][measure][k]
            print(f"same order {measure:12s} {k:9s} dense {d['dense']:.4f} scaled "
                  f"{d['scaled']:.4f} delta {d['delta']:+.6f} max|d| "
                  f"{d['max_abs_delta_per_image']:.2e} n={d['n']}")
    for measure in ("probability", "normalised"):
        for k in ("deletion", "insertion", "road"):
            d = out[measure][k]
            print(f"{measure:12s} {k:9s} dense {d['dense']:.4f} scaled {d['scaled']:.4f} "
                  f"delta {d['delta']:+.4f} [{d['delta_ci'][0]:+.4f}, {d['delta_ci'][1]:+.4f}] "
                  f"n={d['n']}")


if __name__ == "__main__":
    main()
