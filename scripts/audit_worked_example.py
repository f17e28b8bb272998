"""Recompute the worked example of docs/audit.md (forgettability, FCD, PIEs, PIE ground truth
on the phantom) and write its numbers to benchmarks/results/audit_worked_example.json.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/audit_worked_example.py \
        --work /tmp/audit_we [--epochs 10] [--figures docs/img]

Steps (the Python API of the commands shown in docs/audit.md): generate_phantom(n=3000,
size=32, seed=0, splits train 0.67 / test 0.33); three densenet_tiny models (seeds 0-2,
TrainConfig(epochs, lr=3e-3, batch_size=64), no validation split: the last epoch is kept);
run_sweep(method l1, ratios 0, 0.05, ..., 0.95) on the test split; audit_forgettability with
the train labels; find_pies at 0.9; pie_ground_truth_tests against the phantom's ground truth.
Models and sweep cells are kept under --work, so a rerun only recomputes the audit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_result  # noqa: E402
from medscalpel.audit.forgettability import audit_forgettability  # noqa: E402
from medscalpel.audit.pies import find_pies, pie_gallery, pie_ground_truth_tests  # noqa: E402
from medscalpel.compress.sweep import run_sweep  # noqa: E402
from medscalpel.data.phantom.generate import generate_phantom  # noqa: E402
from medscalpel.data.transforms import Preprocess  # noqa: E402
from medscalpel.engine.train import TrainConfig, seed_everything, train  # noqa: E402
from medscalpel.models.checkpoint import load_model, make_card, save_model  # noqa: E402
from medscalpel.models.zoo import create_model  # noqa: E402

N, SIZE, SEEDS = 3000, 32, (0, 1, 2)
RATIOS = tuple(round(0.05 * i, 2) for i in range(20))


def ground_truth_table(gt: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The table pie_ground_truth_tests expects, from the phantom's ground truth."""
    clean = gt[[f"clean_{c}" for c in names]].to_numpy() > 0.5
    sev = gt[[f"sev_{c}" for c in names]].to_numpy()
    mean_sev = np.where(clean.any(1), (sev * clean).sum(1) / clean.sum(1).clip(1), np.nan)
    return pd.DataFrame({"id": gt["id"].astype(str), "label_noise": gt["n_flipped"] > 0,
                         "quality": gt["quality"], "severity": mean_sev})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/audit_we")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--figures", default=None, help="also write the audit figures here")
    args = ap.parse_args()
    work = Path(args.work)
    t0 = time.time()
    load0 = os.getloadavg()
    data = generate_phantom(n=N, size=SIZE, seed=0, splits={"train": 0.67, "test": 0.33})
    pp = Preprocess(size=SIZE, channels=1)
    train_ds, test_ds = data.dataset("train", preprocess=pp), data.dataset("test", preprocess=pp)
    names = list(train_ds.class_names)
    model_dirs, train_s = [], {}
    for s in SEEDS:
        d = work / f"ph32-s{s}" / "model"
        if not (d / "model.json").exists():
            ts = time.time()
            cfg = TrainConfig(epochs=args.epochs, lr=3e-3, batch_size=64, seed=s, device="cpu")
            seed_everything(s)
            m = create_model("densenet_tiny", num_classes=len(names), in_chans=1, img_size=SIZE)
            m.card = make_card(m, train_ds.class_names, train_ds.task, pp)
            res = train(m, train_ds, None, cfg)
            res.model.card = m.card
            save_model(res.model, d)
            train_s[s] = round(time.time() - ts, 1)
        model_dirs.append(d)
    t_train = time.time() - t0
    sweep = run_sweep([load_model(d) for d in model_dirs], test_ds, work / "sweep",
                      ratios=RATIOS, methods=("l1",), device="cpu")
    t_sweep = time.time() - t0 - t_train
    fg = audit_forgettability(work / "sweep", train_labels=train_ds, seed=0)
    pies = find_pies(work / "sweep", ratio=0.9, quantile=0.05, seed=0)
    gt = pie_ground_truth_tests(pies, ground_truth_table(data.dataset("test").gt, names))
    if args.figures:
        fg.save(work / "audit-f")
        pies.save(work / "audit-p")
        fig_dir = Path(args.figures)
        for f in ("audit_curves.png", "audit_scatter.png", "audit_fcd_heatmap.png",
                  "audit_fcd_scatter.png"):
            (fig_dir / f).write_bytes((work / "audit-f" / f).read_bytes())
        (fig_dir / "audit_pie_overrep.png").write_bytes(
            (work / "audit-p" / "audit_pie_overrep.png").read_bytes())
        pie_gallery(test_ds, pies, fig_dir / "audit_pie_gallery.png")
    ref = int(np.flatnonzero(np.abs(fg.levels - fg.reference_level) < 1e-9)[0])
    dense_auroc = {n: float(np.nanmedian(fg.auroc[:, ref, i])) for i, n in enumerate(names)}
    dense_ap = {n: float(np.nanmedian(fg.ap[:, ref, i])) for i, n in enumerate(names)}
    pd_ = pies.to_dict()
    pies_summary = {k: v for k, v in pd_.items() if k not in ("scores", "pies")}
    fgd = fg.to_dict()
    keep = ("class_names", "levels", "prevalence", "prevalence_source", "n_pos_eval",
            "first_drop", "delta_at_max", "abs_delta_ap_at_max", "mean_rel_change",
            "forgotten_first_to_last", "correlations", "fcd", "table", "median_rel_ap")
    save_result("audit_worked_example", {
        "n_train": len(train_ds), "n_test": len(test_ds),
        "dense_median_auroc": dense_auroc, "dense_median_ap": dense_ap,
        "forgettability": {k: fgd[k] for k in keep},
        "pies": pies_summary, "pie_ground_truth": gt.to_dict(),
        "seconds": {"train": round(t_train, 1), "train_per_seed": train_s,
                    "sweep": round(t_sweep, 1), "total": round(time.time() - t0, 1)},
        "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg()),
    }, {"n": N, "size": SIZE, "splits": {"train": 0.67, "test": 0.33}, "arch": "densenet_tiny",
        "seeds": list(SEEDS), "epochs": args.epochs, "lr": 3e-3, "batch_size": 64,
        "validation": "none (last epoch kept)", "sweep_method": "l1", "ratios": list(RATIOS),
        "pie_ratio": 0.9, "pie_quantile": 0.05, "n_boot": 2000, "n_perm": 999,
        "torch_threads": os.environ.get("OMP_NUM_THREADS")})


if __name__ == "__main__":
    main()
