"""Issue B benchmarks: generation speed, and calibrated difficulty (densenet121 at 64 px trained
on 20,000 phantom images for a few CPU epochs; per-class AUROC on the plain test split).

    .venv/bin/python benchmarks/phantom_bench.py speed
    .venv/bin/python benchmarks/phantom_bench.py difficulty --n 20000 --epochs 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

from medscalpel.data.phantom import generate_phantom  # noqa: E402


def speed(args) -> dict:
    import torch

    torch.set_num_threads(1)
    generate_phantom(n=256, size=args.size, seed=1, progress=False)  # warm caches
    t = time.perf_counter()
    generate_phantom(n=args.n, size=args.size, seed=0, progress=False)
    dt = time.perf_counter() - t
    out = {"n": args.n, "size": args.size, "seconds": round(dt, 2),
           "images_per_s": round(args.n / dt, 1), "threads": 1}
    print(out)
    save_result(f"phantom_speed_{args.size}", out, vars(args))
    return out


def difficulty(args) -> dict:
    from medscalpel.data import Preprocess
    from medscalpel.engine.metrics import evaluate
    from medscalpel.engine.predict import predict
    from medscalpel.engine.train import TrainConfig, train
    from medscalpel.models import create_model, make_card

    t0 = time.perf_counter()
    data = generate_phantom(n=args.n, size=args.size, seed=args.seed, progress=False)
    pp = Preprocess(size=args.size, channels=1)
    tr = data.dataset("train", preprocess=pp.with_augment())
    va = data.dataset("val", preprocess=pp)
    te = data.dataset("test", preprocess=pp)
    model = create_model(args.arch, 14, 1, args.size)
    model.card = make_card(model, tr.class_names, tr.task, pp)
    res = train(model, tr, va, TrainConfig(epochs=args.epochs, batch_size=64, lr=args.lr,
                                           seed=args.seed, patience=args.epochs))
    res.model.card = model.card
    ev = evaluate(predict(res.model, te), n_boot=args.n_boot, seed=0)
    minutes = (time.perf_counter() - t0) / 60
    prevalence = np.nanmean(tr.labels, 0)
    rows = [{"class": c.name, "prevalence": float(p), "n_pos_test": c.n_pos, "auroc": c.auroc,
             "auroc_ci": list(c.auroc_ci), "ap": c.ap} for c, p in zip(ev.classes, prevalence)]
    aurocs = np.array([r["auroc"] for r in rows])
    from scipy.stats import spearmanr

    rho = spearmanr(np.log(prevalence), aurocs)
    out = {"arch": args.arch, "size": args.size, "n": args.n, "epochs": args.epochs,
           "n_train": len(tr), "n_test": len(te), "macro_auroc": ev.macro["auroc"],
           "macro_auroc_ci": ev.macro.get("auroc_ci"), "max_class_auroc": float(aurocs.max()),
           "min_class_auroc": float(aurocs.min()),
           "spearman_auroc_vs_log_prevalence": {"rho": float(rho.statistic),
                                                "p": float(rho.pvalue)},
           "targets": {"macro_in_0.78_0.92": bool(0.78 <= ev.macro["auroc"] <= 0.92),
                       "no_class_ge_0.99": bool(aurocs.max() < 0.99),
                       "none_at_chance": bool(aurocs.min() > 0.55)},
           "classes": rows, "history": res.history, "minutes": round(minutes, 1)}
    print({k: v for k, v in out.items() if k not in ("classes", "history")})
    for r in rows:
        print(f"{r['class']:<20} prev {r['prevalence']:.3f}  AUROC {r['auroc']:.3f}")
    save_result(f"phantom_difficulty_{args.arch}_{args.size}", out, vars(args))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("speed")
    a.add_argument("--n", type=int, default=5000)
    a.add_argument("--size", type=int, default=64)
    b = sub.add_parser("difficulty")
    b.add_argument("--n", type=int, default=20000)
    b.add_argument("--size", type=int, default=64)
    b.add_argument("--epochs", type=int, default=3)
    b.add_argument("--arch", default="densenet121")
    b.add_argument("--lr", type=float, default=2e-3)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--n-boot", type=int, default=500)
    args = p.parse_args()
    {"speed": speed, "difficulty": difficulty}[args.what](args)


if __name__ == "__main__":
    main()
