"""Knowledge-distillation benchmark (issue G, point 6).

Target: a student with <= 1/10 of the teacher's parameters and >= 5x batch-1 CPU speedup
within 0.01 macro AUROC of the teacher, on the phantom default and on Kermany pneumonia.

Per dataset:
1. the teacher (DenseNet121 by default) is loaded from ``--<dataset>-teacher`` or trained briefly
   here (and saved under ``--work`` for reuse);
2. the student is chosen by :func:`medscalpel.compress.student_search.choose_student` among
   ``--candidates`` under a latency budget of teacher latency / 5 (measured here);
3. :func:`medscalpel.compress.distill.distill` trains the chosen student distilled and alone
   (same seed, epochs and learning rate) and measures everything on the test split, including
   the per-class Score-CAM teacher-student similarity.

The CPU here is shared and slow: the defaults (64 px, a few epochs, a capped Kermany training set)
finish in about 15 minutes on 2 cores. Usage::

    .venv/bin/python benchmarks/distill_bench.py                 # both datasets
    .venv/bin/python benchmarks/distill_bench.py --datasets phantom --teacher-epochs 2
    .venv/bin/python benchmarks/distill_bench.py --phantom-teacher runs/phantom-dn121/model

Writes ``benchmarks/results/distill_bench.json`` (machine, versions, settings, numbers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MEDSCALPEL_PROGRESS", "0")

from medscalpel.compress.distill import DistillConfig, distill  # noqa: E402
from medscalpel.compress.measure import cpu_latency  # noqa: E402
from medscalpel.compress.student_search import choose_student  # noqa: E402
from medscalpel.data import ArrayDataset, Augment, Preprocess, open_dataset  # noqa: E402
from medscalpel.engine.train import TrainConfig, train  # noqa: E402
from medscalpel.errors import ConfigError  # noqa: E402
from medscalpel.models.checkpoint import load_model, make_card, save_model  # noqa: E402
from medscalpel.models.zoo import create_model  # noqa: E402
from medscalpel.runs import machine_info, package_versions, write_json  # noqa: E402

KERMANY = ROOT.parent / "shared" / "data" / "kermany-pneumonia" / "train"
log = logging.getLogger("distill_bench")


def phantom_splits(n: int, size: int, seed: int):
    """The phantom through its adapter when registered, else generated in memory."""
    pre = Preprocess(size=size)
    try:
        spec = f"phantom?n={n}&size={size}&seed={seed}"
        out = [open_dataset(spec, split=s, preprocess=pre.with_augment(Augment())
                            if s == "train" else pre) for s in ("train", "val", "test")]
        return out, spec
    except Exception as exc:  # adapter not registered yet in this checkout
        log.info("phantom adapter unavailable (%s); generating in memory", exc)
    from medscalpel.data.phantom.generate import generate_phantom

    data = generate_phantom(n, size=size, seed=seed, progress=False)
    out = []
    for s in ("train", "val", "test"):
        rows = data.rows(s)
        out.append(ArrayDataset(data.images[rows], data.labels[rows], data.class_names,
                                "multilabel", ids=data.gt["id"].to_numpy()[rows].tolist(),
                                patient_ids=data.gt["patient_id"].astype(str).to_numpy()[rows]
                                .tolist(),
                                preprocess=pre.with_augment(Augment()) if s == "train" else pre,
                                spec=f"phantom(generated n={n} size={size} seed={seed})",
                                split=s))
    return out, f"generate_phantom(n={n}, size={size}, seed={seed})"


def kermany_splits(size: int, max_train: int | None, seed: int):
    if not KERMANY.is_dir():
        raise FileNotFoundError(f"{KERMANY} not found")
    pre = Preprocess(size=size)
    spec = f"folder:{KERMANY}?dedup=true"
    train_ds = open_dataset(spec, split="train", preprocess=pre.with_augment(Augment()))
    n_full = len(train_ds)
    if max_train and len(train_ds) > max_train:
        idx = np.sort(np.random.default_rng(seed).choice(len(train_ds), max_train, replace=False))
        train_ds = train_ds.subset(idx, "train")
    val_ds = open_dataset(spec, split="val", preprocess=pre)
    test_ds = open_dataset(spec, split="test", preprocess=pre)
    return [train_ds, val_ds, test_ds], spec, n_full


def get_teacher(args, name: str, train_ds, val_ds, work: Path):
    given = getattr(args, f"{name}_teacher")
    if given:
        return load_model(given), {"source": str(given), "trained_here": False}
    t0 = time.perf_counter()
    model = create_model(args.teacher_arch, num_classes=train_ds.num_classes,
                         in_chans=1, img_size=args.size)
    cfg = TrainConfig(epochs=args.teacher_epochs, batch_size=args.batch_size,
                      lr=args.teacher_lr, seed=args.seed, patience=args.teacher_epochs,
                      max_steps_per_epoch=args.max_steps)
    res = train(model, train_ds, val_ds, cfg, progress=False)
    m = res.model
    m.card = make_card(m, train_ds.class_names, train_ds.task,
                       train_ds.preprocess.with_augment(None), training=cfg.to_dict())
    path = save_model(m, work / f"{name}-teacher-{args.teacher_arch}")
    return load_model(path), {"source": str(path), "trained_here": True,
                              "epochs": args.teacher_epochs, "history": res.history,
                              "seconds": round(time.perf_counter() - t0, 1)}


def run_one(args, name: str, work: Path) -> dict:
    t0 = time.perf_counter()
    if name == "phantom":
        (train_ds, val_ds, test_ds), spec = phantom_splits(args.phantom_n, args.size, args.seed)
        extra = {}
    else:
        (train_ds, val_ds, test_ds), spec, n_full = kermany_splits(
            args.size, args.kermany_max_train, args.seed)
        extra = {"n_train_available": n_full}
    log.info("%s: train %d val %d test %d", name, len(train_ds), len(val_ds), len(test_ds))
    teacher, t_info = get_teacher(args, name, train_ds, val_ds, work)
    log.info("%s teacher ready (%s)", name, t_info.get("seconds"))
    x = test_ds.image(0)[None]
    t_lat = float(np.median([cpu_latency(teacher, x, repeats=10) for _ in range(3)]))
    budget = t_lat / args.min_speedup
    cands = [c.strip() for c in args.candidates.split(",") if c.strip()]
    t1 = time.perf_counter()
    kw = dict(proxy_epochs=1, proxy_steps=args.proxy_steps, soft_weight=args.soft_weight,
              temperature=args.temperature, lr=args.lr, batch_size=args.batch_size,
              seed=args.seed, progress=False)
    budget_met = True
    try:
        search = choose_student(cands, budget, (train_ds, val_ds), teacher, **kw)
    except ConfigError as exc:  # nothing fast enough: say so, then pick among all candidates
        log.info("%s", exc)
        budget_met = False
        search = choose_student(cands, 1e9, (train_ds, val_ds), teacher, **kw)
    search_s = round(time.perf_counter() - t1, 1)
    log.info("%s: chose %s in %.0fs (budget %.2f ms)", name, search.chosen, search_s, budget)
    k = test_ds.num_classes
    frequent = np.argsort(-np.nansum(test_ds.labels_multihot(), 0))
    sal_classes = tuple(range(k)) if k <= 2 else tuple(
        int(i) for i in frequent[:args.saliency_classes])
    cfg = DistillConfig(soft_weight=args.soft_weight, temperature=args.temperature,
                        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                          lr=args.lr, seed=args.seed, patience=args.epochs,
                                          max_steps_per_epoch=args.max_steps),
                        n_boot=args.n_boot, saliency_images=args.saliency_images,
                        saliency_method=args.saliency_method, saliency_classes=sal_classes)
    t2 = time.perf_counter()
    res = distill(teacher, search.chosen_source, train_ds, val_ds, test_ds, cfg, progress=False)
    distill_s = round(time.perf_counter() - t2, 1)
    res.save(work / f"{name}-distill")
    d = res.to_dict()
    return {"dataset": name, "spec": spec, "n_train": len(train_ds), "n_val": len(val_ds),
            "n_test": len(test_ds), **extra, "teacher_source": t_info,
            "student_search": {**search.to_dict(), "seconds": search_s,
                               "speedup_budget_ms": budget, "budget_met": budget_met},
            "distill": {k2: d[k2] for k2 in ("teacher", "students", "saliency", "targets",
                                            "config")},
            "table": res.table(), "distill_seconds": distill_s,
            "total_seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="phantom,kermany")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--teacher-arch", default="densenet121")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--phantom-teacher", default=None, help="model dir of a trained teacher")
    p.add_argument("--kermany-teacher", default=None, help="model dir of a trained teacher")
    p.add_argument("--candidates", default="mobilenetv3_small_100,resnet_tiny,densenet_tiny")
    p.add_argument("--min-speedup", type=float, default=5.0)
    p.add_argument("--proxy-steps", type=int, default=15)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch")
    p.add_argument("--soft-weight", type=float, default=0.5,
                   help="weight of the teacher's soft targets (results before issue K say 'alpha')")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--phantom-n", type=int, default=2000)
    p.add_argument("--kermany-max-train", type=int, default=1500)
    p.add_argument("--n-boot", type=int, default=500)
    p.add_argument("--saliency-images", type=int, default=4)
    p.add_argument("--saliency-classes", type=int, default=2,
                   help="multi-label: the N most frequent classes are compared")
    p.add_argument("--saliency-method", default="scorecam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/medscalpel-distill-bench")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill_bench.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results, errors = [], {}
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        try:
            results.append(run_one(args, name, work))
        except FileNotFoundError as exc:
            errors[name] = f"skipped: {exc}"
    summary = []
    for r in results:
        s = r["distill"]["students"]["distilled"]
        a = r["distill"]["students"].get("alone", {})
        summary.append({"dataset": r["dataset"], "teacher": r["distill"]["teacher"]["arch"],
                        "teacher_auroc": r["distill"]["teacher"]["metrics"]["auroc"],
                        "student": s["arch"], "param_ratio": s["param_ratio"],
                        "speedup": s["speedup"], "distilled_auroc": s["metrics"]["auroc"],
                        "alone_auroc": a.get("metrics", {}).get("auroc"),
                        "auroc_drop": s["auroc_drop"], "targets_met": r["distill"]["targets"]})
    out = {"benchmark": "distill", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "settings": vars(args), "machine": machine_info(), "versions": package_versions(),
           "torch_threads": torch.get_num_threads(), "summary": summary, "results": results,
           "errors": errors, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(args.out, out)
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
