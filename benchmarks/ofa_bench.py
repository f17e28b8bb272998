"""Once-for-all students vs candidate-list students vs a structured-pruned teacher (issue 30).

Two datasets (``--dataset``):

* ``phantom`` (default): ONE generated phantom (``--n`` images at ``--size`` px) split by
  PATIENT into train / val / test with ``--split-fractions`` (default 0.215 / 0.027 / 0.758 of
  5000 images: about the 1074 training images of the first runs, and a test split of ~3,800
  images instead of 147, so that paired AUROC differences between models can be decided);
* ``kermany``: ``../shared/data/kermany-pneumonia/train`` through the folder adapter with the
  conformal benchmark's patient-wise split (``dedup=true&patient_regex=auto``: byte-identical
  duplicates removed, patients from the file names, no patient in two splits; checked), the
  training split optionally subsampled (``--max-train``). Every trained model is cached under
  ``--work`` (default ``runs/ofa_bench/kermany_<arch>_<size>...``) so a rerun reuses it.

Then, for either dataset:

1. a teacher (``--teacher-arch``) is trained here through :func:`medscalpel.engine.train.train`;
2. ONE supernet is trained by progressive shrinking distilled from the teacher
   (:func:`medscalpel.compress.ofa.flow.distill_ofa`) and specialised for three latency budgets
   on ONNX Runtime fp32 (1 thread), placed between the smallest and the largest subnet's
   latency measured here before training (``--budget-fractions`` of that range);
3. the candidate-list students (``--candidates``) are each distilled from the teacher with the
   same loss (:func:`medscalpel.compress.distill.distill_train`) for ``--student-epochs`` (default
   as many epochs as the WHOLE supernet training);
4. the teacher is structurally pruned (L1, ``--prune-speedup`` x MACs) with a distillation
   recovery of the same number of epochs;
5. every model is timed in the same alternated rounds on ONNX Runtime fp32 (batch 1, 1 thread;
   per-round ratios, :func:`medscalpel.deploy.timing.speed_ratio`), its test macro AUROC
   compared with the teacher's by paired bootstrap
   (:func:`medscalpel.engine.compare.compare_predictions`), and its Score-CAM maps compared with
   the teacher's (:func:`medscalpel.explain.compare.compare_saliency`);
6. every (OFA subnet, candidate student) pair gets a dominance verdict
   (:func:`medscalpel.compress.ofa.dominance.decide_dominance`): dominates / dominated /
   undecided from the sign test over the SAME timing rounds and the paired bootstrap of the
   AUROC difference subnet - student on the same test images, Holm over the pairs.

Writes ``--out`` (JSON), a Markdown table next to it (``.md``: the front's data) and the
latency / AUROC front ``--plot``. Usage (2 shared cores; the phantom about 20 min)::

    nice -n 19 .venv/bin/python benchmarks/ofa_bench.py > /tmp/ofa_bench.log 2>&1 &
    # the supernet gets the epochs of the three per-budget students together (30 = 3 x 10)
    nice -n 19 .venv/bin/python benchmarks/ofa_bench.py --phase-epochs 12,6,6,6 \
        --student-epochs 10 --out benchmarks/results/ofa_bench_total_budget.json \
        --plot docs/img/ofa_front_total_budget.png --work /tmp/medscalpel-ofa-bench-total
    # Kermany (see docs/distill.md for the settings that ran here)
    nice -n 19 .venv/bin/python benchmarks/ofa_bench.py --dataset kermany --size 64 \
        --teacher-arch densenet121 --teacher-epochs 3 --max-train 1200 --phase-epochs 2,1,1,1 \
        --prune-speedup 4 --out benchmarks/results/ofa_kermany.json \
        --plot docs/img/ofa_front_kermany.png > runs/ofa_bench/kermany.log 2>&1 &
    # Kermany at 128 px, about 25 min per seed here (--seed 1, 2 with their own --work,
    # --out, --plot; benchmarks/ofa_seeds.py summarises the seeds, docs/distill.md)
    nice -n 19 .venv/bin/python benchmarks/ofa_bench.py --dataset kermany --size 128 \
        --teacher-arch densenet121 --teacher-epochs 3 --teacher-lr 0.001 --max-train 600 \
        --phase-epochs 6,2,2,2 --student-epochs 4 --n-random 24 --generations 1 \
        --prune-speedup 4 --saliency-images 4 --saliency-classes 1 --threads 2 \
        --candidates densenet_tiny,vgg_tiny,mobilenetv3_small_100 --seed 0 \
        --work runs/ofa_bench/kermany128 --out benchmarks/results/ofa_kermany_128.json \
        --plot docs/img/ofa_front_kermany_128.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MEDSCALPEL_PROGRESS", "0")

from medscalpel.compress.distill import DistillLoss, distill_train  # noqa: E402
from medscalpel.compress.measure import count_macs, count_parameters  # noqa: E402
from medscalpel.compress.ofa.dominance import decide_dominance, pair_input  # noqa: E402
from medscalpel.compress.ofa.flow import OFAConfig, distill_ofa  # noqa: E402
from medscalpel.compress.ofa.search import (LatencySpec, SearchConfig,  # noqa: E402
                                            alternated_latency)
from medscalpel.compress.ofa.supernet import OFASpace, OFASupernet, extract_subnet  # noqa: E402
from medscalpel.compress.ofa.train import OFATrainConfig  # noqa: E402
from medscalpel.compress.structured import RecoveryConfig, prune_structured  # noqa: E402
from medscalpel.data import Augment, Preprocess, open_dataset  # noqa: E402
from medscalpel.data.phantom.generate import generate_phantom  # noqa: E402
from medscalpel.deploy.timing import speed_ratio  # noqa: E402
from medscalpel.engine.compare import compare_predictions  # noqa: E402
from medscalpel.engine.predict import collect_images, predict  # noqa: E402
from medscalpel.engine.train import TrainConfig, train  # noqa: E402
from medscalpel.explain.compare import compare_saliency  # noqa: E402
from medscalpel.models.checkpoint import load_model, make_card, save_model  # noqa: E402
from medscalpel.models.zoo import create_model  # noqa: E402
from medscalpel.runs import machine_info, package_versions, write_json  # noqa: E402


log = logging.getLogger("ofa_bench")
KERMANY = ROOT.parent / "shared" / "data" / "kermany-pneumonia" / "train"
PUBLIC_KERMANY = "<shared data>/kermany-pneumonia/train"


# ----------------------------------------------------------------------------- data
def phantom_splits(args, work: Path):
    """ONE phantom, split by patient with ``--split-fractions`` (a large test split)."""
    fr = [float(f) for f in args.split_fractions.split(",")]
    if len(fr) != 3:
        raise SystemExit("--split-fractions needs train,val,test")
    tag = f"n{args.n}-s{args.size}-seed{args.seed}-" + "-".join(f"{f:g}" for f in fr)
    root = work / f"phantom-{tag}"
    if not (root / "phantom.json").is_file():
        generate_phantom(n=args.n, size=args.size, seed=args.seed, out=root,
                         splits=dict(zip(("train", "val", "test"), fr)), progress=False)
    pre = Preprocess(size=args.size)
    spec = f"phantom:{root}"
    out = [open_dataset(spec, split=s, preprocess=pre.with_augment(Augment())
                        if s == "train" else pre) for s in ("train", "val", "test")]
    return out, {"spec": f"generate_phantom(n={args.n}, size={args.size}, seed={args.seed}, "
                         f"splits=train/val/test {args.split_fractions})",
                 "split": "patient-wise (generate_phantom assigns patients to splits)"}


def kermany_splits(args):
    """The folder adapter's patient-wise split of Kermany (conformal_bench's kermany_source)."""
    if not KERMANY.is_dir():
        raise SystemExit(f"real data not available: {KERMANY}")
    spec = (f"folder:{KERMANY}?dedup=true&patient_regex=auto&val_fraction=0.1"
            f"&test_fraction={args.test_fraction:g}&seed=0")
    pre = Preprocess(size=args.size)
    train_ds = open_dataset(spec, split="train", preprocess=pre.with_augment(Augment()))
    val_ds = open_dataset(spec, split="val", preprocess=pre)
    test_ds = open_dataset(spec, split="test", preprocess=pre)
    unit = test_ds.meta.get("split_unit", {})
    if unit.get("unit") != "patient":
        raise SystemExit(f"kermany: the split is not patient-wise: {unit}")
    pats = {n: {str(p) for p in d.patient_ids} for n, d in
            (("train", train_ds), ("val", val_ds), ("test", test_ds))}
    leaks = {f"{a}&{b}": len(pats[a] & pats[b]) for a, b in
             (("train", "val"), ("train", "test"), ("val", "test"))}
    if any(leaks.values()):
        raise SystemExit(f"kermany: patients shared between splits: {leaks}")
    n_full = len(train_ds)
    if args.max_train and n_full > args.max_train:
        idx = np.sort(np.random.default_rng(args.seed).choice(n_full, args.max_train,
                                                               replace=False))
        train_ds = train_ds.subset(idx, "train")
    return [train_ds, val_ds, test_ds], {
        "spec": spec.replace(str(KERMANY), PUBLIC_KERMANY),
        "split": "patient-wise (folder adapter: dedup by content hash, patient_regex=auto)",
        "split_unit": unit, "dedup": test_ds.meta.get("dedup"),
        "patients_shared_between_splits": leaks, "n_train_available": n_full,
        "train_subsample": (f"{len(train_ds)} of {n_full} training images (seeded choice)"
                            if len(train_ds) < n_full else "all")}


# ----------------------------------------------------------------------------- models
def _card(m, ds, **training):
    m.card = make_card(m, ds.class_names, ds.task, ds.preprocess.with_augment(None),
                       training=training or None)
    return m


def _cached(path: Path, build):
    """``(model, info)`` from ``path`` (``model/`` + ``info.json``) or built and saved there."""
    if (path / "model" / "model.json").is_file() and (path / "info.json").is_file():
        info = json.loads((path / "info.json").read_text())
        info["reused_from_cache"] = True
        log.info("reusing %s", path)
        return load_model(path / "model"), info
    model, info = build()
    save_model(model, path / "model")
    write_json(path / "info.json", info)
    return model, info


def train_teacher(args, train_ds, val_ds, work: Path):
    def build():
        cfg = TrainConfig(epochs=args.teacher_epochs, batch_size=args.batch_size,
                          lr=args.teacher_lr or args.lr, seed=args.seed,
                          patience=args.teacher_epochs)
        t0 = time.perf_counter()
        res = train(create_model(args.teacher_arch, num_classes=train_ds.num_classes, in_chans=1,
                                 img_size=args.size), train_ds, val_ds, cfg,
                    checkpoint_dir=work / "teacher_checkpoint", progress=False)
        return _card(res.model, train_ds, **cfg.to_dict()), {
            "arch": args.teacher_arch, "epochs": args.teacher_epochs,
            "train_images": len(train_ds), "seconds": round(time.perf_counter() - t0, 1),
            "history": res.history}
    return _cached(work / "teacher", build)


def budgets_from_extremes(space: OFASpace, n_classes: int, args, spec: LatencySpec, example):
    """Latency of the smallest / largest subnet (weights do not matter) -> three budgets."""
    net = OFASupernet(space, n_classes, 1, args.size).eval()
    models = {"min": extract_subnet(net, space.min_config()),
              "max": extract_subnet(net, space.max_config())}
    lat = {k: statistics.median(v) for k, v in
           alternated_latency(models, spec, example, rounds=5).items()}
    fr = [float(f) for f in args.budget_fractions.split(",")]
    budgets = [round(lat["min"] + f * (lat["max"] - lat["min"]), 4) for f in fr]
    return budgets, lat


def run_ofa(args, teacher, train_ds, val_ds, test_ds, lat_spec, work: Path):
    """ONE supernet training + search (resumable; a finished run is reused)."""
    done = work / "ofa_stage.json"
    if done.is_file():
        stage = json.loads(done.read_text())
        models = {s["label"]: load_model(s["model_dir"]) for s in stage["subnets"]
                  if s.get("model_dir")}
        log.info("reusing the OFA stage of %s", done)
        return models, {**stage, "reused_from_cache": True}
    space = OFASpace(stage_widths=(16, 24, 32, 48), stage_strides=(2, 2, 2, 1), head_width=96)
    budgets, extremes = budgets_from_extremes(space, train_ds.num_classes, args, lat_spec,
                                              test_ds.image(0)[None])
    log.info("budgets %s ms (subnet extremes %s)", budgets, extremes)
    phase_epochs = tuple(int(e) for e in args.phase_epochs.split(","))
    cfg = OFAConfig(train=OFATrainConfig(space=space, phase_epochs=phase_epochs, lr=args.lr,
                                         shrink_lr=args.lr / 2, batch_size=args.batch_size,
                                         soft_weight=args.soft_weight,
                                         temperature=args.temperature, seed=args.seed),
                    search=SearchConfig(n_random=args.n_random, generations=args.generations,
                                        seed=args.seed),
                    n_boot=0, saliency_images=0)
    t0 = time.perf_counter()
    ofa = distill_ofa(teacher, train_ds, val_ds, test_ds, budgets, cfg, lat_spec,
                      checkpoint_dir=work / "checkpoint", progress=False)
    ofa_s = round(time.perf_counter() - t0, 1)
    ofa.save(work / "ofa")
    log.info("OFA done in %.0fs: %s", ofa_s, [(s["label"], s["met"]) for s in ofa.subnets])
    stage = {"budgets_ms": budgets, "subnet_latency_extremes_ms": extremes,
             "seconds_total": ofa_s, "supernet_train_seconds": ofa.train_result.seconds,
             "supernet_epochs_total": cfg.train.total_epochs,
             "train_images": len(train_ds), "supernet": ofa.supernet.to_dict(),
             "subnets": ofa.subnets,
             "search": {k: v for k, v in ofa.search.to_dict().items() if k != "candidates"},
             "n_candidates_measured": len(ofa.search.candidates)}
    write_json(done, stage)
    return {f"{k}": m for k, m in ofa.models.items()}, stage


def candidate_students(args, teacher, train_ds, val_ds, epochs: int, work: Path):
    out = {}
    for name in [c.strip() for c in args.candidates.split(",") if c.strip()]:
        def build(name=name):
            t0 = time.perf_counter()
            s = create_model(name, num_classes=train_ds.num_classes, in_chans=1,
                             img_size=args.size)
            cfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, patience=epochs)
            loss = DistillLoss(args.soft_weight, args.temperature, train_ds.task)
            res = distill_train(teacher, s, train_ds, val_ds, loss, cfg,
                                checkpoint_dir=work / "students" / name / "checkpoint",
                                progress=False)
            log.info("student %s trained in %.0fs", name, time.perf_counter() - t0)
            return _card(res.model, train_ds, **cfg.to_dict()), {
                "epochs": epochs, "train_images": len(train_ds), "best_epoch": res.best_epoch,
                "seconds": round(time.perf_counter() - t0, 1)}
        out[f"student:{name}"] = _cached(work / "students" / name, build)
    return out


def pruned_teacher(args, teacher, train_ds, val_ds, epochs: int, work: Path):
    label = f"pruned:l1x{args.prune_speedup:g}"

    def build():
        t0 = time.perf_counter()
        calib, _ = collect_images(train_ds, 64, seed=args.seed)
        r = prune_structured(teacher, calib, criterion="l1", target_speedup=args.prune_speedup,
                             recovery=RecoveryConfig(epochs=epochs, lr=args.lr / 3,
                                                     distill_from_dense=True,
                                                     soft_weight=args.soft_weight),
                             train_ds=train_ds, val_ds=val_ds, measure_latency=False,
                             progress=False)
        m = r.model
        if getattr(m, "card", None) is None:
            _card(m, train_ds)
        return m, {"epochs": epochs, "train_images": len(train_ds),
                   "speedup_macs": r.speedup_macs,
                   "seconds": round(time.perf_counter() - t0, 1)}
    return {label: _cached(work / "pruned" / label.split(":")[1], build)}


# ----------------------------------------------------------------------------- measure
def measure_all(args, teacher, models: dict, test_ds, spec: LatencySpec):
    """Latency (one alternated run), test predictions, paired AUROC vs the teacher, Score-CAM."""
    example = test_ds.image(0)[None]
    lat = alternated_latency({"teacher": teacher, **models}, spec, example,
                             rounds=args.latency_rounds)
    preds = {"teacher": predict(teacher, test_ds, progress=False)}
    images, _ = collect_images(test_ds, args.saliency_images, seed=args.seed)
    frequent = np.argsort(-np.nansum(test_ds.labels_multihot(), 0))
    classes = [int(i) for i in frequent[:args.saliency_classes]]
    rows = {"teacher": {"params": count_parameters(teacher),
                        "macs": count_macs(teacher, example),
                        "latency_ms": float(np.median(lat["teacher"])),
                        "latency_rounds_ms": lat["teacher"],
                        "test_auroc": compare_predictions(preds["teacher"], preds["teacher"],
                                                          n_boot=0).macro["auroc_ref"]}}
    for name, m in models.items():
        preds[name] = predict(m, test_ds, progress=False)
        c = compare_predictions(preds["teacher"], preds[name], n_boot=args.n_boot,
                                seed=args.seed, boot_metrics=("auroc",))
        t0 = time.perf_counter()
        sal = (compare_saliency(teacher, m, images, classes, method="scorecam",
                                progress=False).to_dict()["overall"]
               if args.saliency_images else None)
        log.info("measured %s (Score-CAM %.0fs)", name, time.perf_counter() - t0)
        rows[name] = {"params": count_parameters(m), "macs": count_macs(m, example),
                      "latency_ms": float(np.median(lat[name])), "latency_rounds_ms": lat[name],
                      "speed_vs_teacher": speed_ratio(lat["teacher"], lat[name]).to_dict(),
                      "test_auroc": c.macro["auroc_new"],
                      "test_auroc_ci": [float(v) for v in c.macro["auroc_new_ci"]],
                      "delta_auroc": c.macro["delta_auroc"],
                      "delta_auroc_ci": [float(v) for v in c.macro["delta_auroc_ci"]],
                      "scorecam_vs_teacher": sal}
    return rows, classes, preds, lat


def dominance(args, preds: dict, lat: dict):
    """Every (OFA subnet, candidate student) pair: dominates / dominated / undecided."""
    subnets = [n for n in preds if n.startswith("ofa:")]
    students = [n for n in preds if n.startswith("student:")]
    pairs = []
    for a in subnets:
        for b in students:
            c = compare_predictions(preds[b], preds[a], n_boot=args.n_boot, seed=args.seed,
                                    boot_metrics=("auroc",))
            pairs.append(pair_input(a, b, c, lat[a], lat[b]))
    if not pairs:
        return None
    return decide_dominance(pairs, margin=args.dominance_margin, level=0.95,
                            correction=args.correction,
                            meta={"latency": "ONNX Runtime fp32, batch 1, 1 thread, "
                                             f"{args.latency_rounds} alternated rounds",
                                  "auroc": f"paired bootstrap, {args.n_boot} replicates, "
                                           "test split"})


def per_budget(rows: dict, budgets: list[float]) -> list[dict]:
    """Per budget: the OFA subnet vs the best candidate-list student within the same budget
    (what student_search would choose, here with every candidate FULLY trained and timed on
    the same runtime in the same rounds)."""
    out = []
    for b in budgets:
        ofa = rows.get(f"ofa:budget_{b:g}ms")
        inside = [(n, r) for n, r in rows.items()
                  if n.startswith("student:") and r["latency_ms"] <= b]
        best = max(inside, key=lambda nr: nr[1]["test_auroc"], default=None)
        out.append({"budget_ms": b, "ofa": None if ofa is None else {
            "latency_ms": ofa["latency_ms"], "test_auroc": ofa["test_auroc"],
            "test_auroc_ci": ofa["test_auroc_ci"]},
            "best_student_within": None if best is None else {
                "name": best[0], "latency_ms": best[1]["latency_ms"],
                "test_auroc": best[1]["test_auroc"]}})
    return out


def pareto(rows: dict) -> dict:
    """Which models are on the (lower latency, higher AUROC) front of POINT estimates (the
    evidence-based verdicts are in ``dominance``)."""
    names = [n for n in rows if n != "teacher"]

    def dominates(a, b):
        ra, rb = rows[a], rows[b]
        return (ra["latency_ms"] <= rb["latency_ms"] and ra["test_auroc"] >= rb["test_auroc"]
                and (ra["latency_ms"] < rb["latency_ms"] or ra["test_auroc"] > rb["test_auroc"]))

    front = [n for n in names if not any(dominates(o, n) for o in names if o != n)]
    dom = {a: [b for b in names if b.startswith("student:") and dominates(a, b)]
           for a in names if a.startswith("ofa:")}
    return {"front": front, "ofa_dominates_point_estimates": dom,
            "note": "point estimates of median latency and test macro AUROC; the verdicts "
                    "with evidence are in 'dominance'"}


# ----------------------------------------------------------------------------- output
def _label(name: str) -> str:
    return (name.replace("ofa:budget_", "OFA <= ").replace("student:", "")
            .replace("pruned:", "pruned "))


def plot(rows: dict, budgets: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    style = {"teacher": ("k", "*"), "ofa": ("tab:blue", "o"), "student": ("tab:orange", "s"),
             "pruned": ("tab:green", "^")}
    for name, r in rows.items():
        kind = name.split(":")[0]
        col, mk = style.get(kind, ("grey", "x"))
        lo, hi = r.get("test_auroc_ci", [r["test_auroc"]] * 2)
        ax.errorbar(r["latency_ms"], r["test_auroc"],
                    yerr=[[r["test_auroc"] - lo], [hi - r["test_auroc"]]], fmt=mk, color=col,
                    capsize=3)
        offset = {"teacher": (6, -10), "pruned": (6, 4)}.get(kind, (4, 3))
        ax.annotate(_label(name), (r["latency_ms"], r["test_auroc"]), fontsize=7,
                    xytext=offset, textcoords="offset points")
    for b in budgets:
        ax.axvline(b, color="tab:blue", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch-1 latency, ONNX Runtime fp32, 1 thread (ms, median of rounds)")
    ax.set_ylabel("test macro AUROC (95% CI)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(out: dict) -> str:
    """The front's data and the dominance verdicts as Markdown tables."""
    d = out["data"]
    lines = [f"# OFA benchmark: {out['dataset']} at {out['settings']['size']} px",
             "", f"`{out['command']}`, {out['date']}, {out['seconds_total'] / 60:.0f} min; "
             f"data `{d['spec']}` ({d['split']}): {d['n_train']} train / {d['n_val']} val / "
             f"{d['n_test']} test images. {out['comparable_budget']}.", "",
             "| model | params | MACs | latency ms | speed vs teacher [interval] | "
             "test macro AUROC [95% CI] | delta vs teacher [95% CI] | Score-CAM Pearson / IoU |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in out["rows"].items():
        if name == "teacher":
            lines.append(f"| teacher ({out['teacher']['arch']}) | {r['params']:,} | "
                         f"{r['macs'] / 1e6:.2f}M | {r['latency_ms']:.3f} | 1 | "
                         f"{r['test_auroc']:.3f} | - | - |")
            continue
        s = r["speed_vs_teacher"]
        sal = r.get("scorecam_vs_teacher") or {}
        sal_txt = (f"{sal.get('pearson_mean', float('nan')):.2f} / "
                   f"{sal.get('iou_mean', float('nan')):.2f}"
                   if sal else "not measured")
        lines.append(
            f"| {_label(name)} | {r['params']:,} | {r['macs'] / 1e6:.2f}M | "
            f"{r['latency_ms']:.3f} | x{s['ratio']:.2f} [{s['low']:.2f}, {s['high']:.2f}] "
            f"{s['outcome']} | {r['test_auroc']:.3f} [{r['test_auroc_ci'][0]:.3f}, "
            f"{r['test_auroc_ci'][1]:.3f}] | {r['delta_auroc']:+.3f} "
            f"[{r['delta_auroc_ci'][0]:+.3f}, {r['delta_auroc_ci'][1]:+.3f}] | {sal_txt} |")
    dom = out.get("dominance")
    if dom:
        lines += ["", f"## Dominance verdicts: {dom['summary']}", "", dom["definition"] + ".",
                  "", "| OFA subnet | student | verdict | speed (student / subnet ms) "
                  "[interval], rounds faster | AUROC delta subnet - student [interval at "
                  "level] | p dominates / dominated |", "|---|---|---|---|---|---|"]
        for p in dom["pairs"]:
            lines.append(
                f"| {_label(p['candidate'])} | {_label(p['other'])} | **{p['outcome']}** | "
                f"x{p['speed_ratio']:.2f} [{p['speed_low']:.2f}, {p['speed_high']:.2f}], "
                f"{p['rounds_candidate_faster']}/{p['rounds']} | {p['auroc_delta']:+.4f} "
                f"[{p['auroc_ci_low']:+.4f}, {p['auroc_ci_high']:+.4f}] at "
                f"{p['level_adj']:.2g} | {p['p_dominates']:.2g} / {p['p_dominated']:.2g} |")
    return "\n".join(lines) + "\n"


def machine_note() -> dict:
    return {"nice": os.nice(0), "load_average_at_end": list(os.getloadavg())}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("phantom", "kermany"), default="phantom")
    p.add_argument("--n", type=int, default=5000, help="phantom images (all splits)")
    p.add_argument("--split-fractions", default="0.215,0.027,0.758",
                   help="phantom: patients per train,val,test")
    p.add_argument("--test-fraction", type=float, default=0.2, help="kermany: test patients")
    p.add_argument("--max-train", type=int, default=None,
                   help="kermany: subsample the training split to this many images")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--teacher-arch", default="resnet_tiny")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--teacher-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--phase-epochs", default="4,2,2,2", help="largest,kernel,depth,width")
    p.add_argument("--budget-fractions", default="0.15,0.4,0.7",
                   help="of the range between the smallest and the largest subnet's latency")
    p.add_argument("--candidates", default="densenet_tiny,vgg_tiny,mobilenetv3_small_100")
    p.add_argument("--student-epochs", type=int, default=None,
                   help="epochs of each candidate student and of the pruning recovery (default: "
                        "the supernet's total epochs)")
    p.add_argument("--prune-speedup", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--soft-weight", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--n-random", type=int, default=40)
    p.add_argument("--generations", type=int, default=2)
    p.add_argument("--latency-rounds", type=int, default=15,
                   help="alternated rounds of the final timing (the sign test of a pair needs "
                        ">= 9 for Holm over 9 pairs at one-sided 0.025)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--dominance-margin", type=float, default=0.01,
                   help="AUROC margin of 'at least as accurate' in the dominance verdicts")
    p.add_argument("--correction", choices=("holm", "bonferroni"), default="holm")
    p.add_argument("--saliency-images", type=int, default=8)
    p.add_argument("--saliency-classes", type=int, default=2,
                   help="Score-CAM on the most frequent classes of the test split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads for training")
    p.add_argument("--work", default=None, help="default: /tmp/medscalpel-ofa-bench (phantom), "
                   "runs/ofa_bench/kermany_<arch>_<size>_... (kermany)")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--replot", default=None, help="only redraw --plot from this results JSON")
    args = p.parse_args(argv)
    k = args.dataset == "kermany"
    args.out = args.out or str(ROOT / "benchmarks" / "results" /
                               ("ofa_kermany.json" if k else "ofa_bench.json"))
    args.plot = args.plot or str(ROOT / "docs" / "img" /
                                 ("ofa_front_kermany.png" if k else "ofa_front.png"))
    if args.work is None:
        args.work = (str(ROOT / "runs" / "ofa_bench" /
                         f"kermany_{args.teacher_arch}_{args.size}_t{args.test_fraction:g}_"
                         f"m{args.max_train or 'all'}_e{args.teacher_epochs}_s{args.seed}")
                     if k else "/tmp/medscalpel-ofa-bench")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    title = (f"{args.dataset} {args.size} px: OFA subnets (blue, dotted: budgets) vs students "
             f"vs pruned teacher")
    if args.replot:
        done = json.loads(Path(args.replot).read_text())
        plot(done["rows"], done["budgets_ms"], Path(args.plot), title)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("medscalpel.engine.train", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.dataset == "kermany":
        (train_ds, val_ds, test_ds), data = kermany_splits(args)
    else:
        (train_ds, val_ds, test_ds), data = phantom_splits(args, work)
    data.update(n_train=len(train_ds), n_val=len(val_ds), n_test=len(test_ds),
                n_test_positives=[int(v) for v in np.nansum(test_ds.labels_multihot(), 0)],
                class_names=list(test_ds.class_names))
    log.info("%s: train %d val %d test %d", args.dataset, len(train_ds), len(val_ds),
             len(test_ds))
    teacher, t_info = train_teacher(args, train_ds, val_ds, work)
    log.info("teacher ready (%ss)", t_info["seconds"])
    lat_spec = LatencySpec(runtime="onnxruntime:fp32", threads=1, rounds=3, repeats=10,
                           source="benchmark: onnxruntime fp32, 1 thread")
    ofa_models, ofa_stage = run_ofa(args, teacher, train_ds, val_ds, test_ds, lat_spec, work)
    total_epochs = ofa_stage["supernet_epochs_total"]
    base_epochs = args.student_epochs or total_epochs
    models = {f"ofa:{k}": m for k, m in ofa_models.items()}
    trained = candidate_students(args, teacher, train_ds, val_ds, base_epochs, work)
    trained.update(pruned_teacher(args, teacher, train_ds, val_ds, base_epochs, work))
    models.update({k: v[0] for k, v in trained.items()})
    log.info("timing and measuring %d models", len(models) + 1)
    rows, classes, preds, lat = measure_all(args, teacher, models, test_ds, lat_spec)
    dom = dominance(args, preds, lat)
    if dom is not None:
        log.info("dominance: %s", dom.summary())
    budgets = ofa_stage["budgets_ms"]
    plot(rows, budgets, Path(args.plot), title)
    out = {"benchmark": "ofa", "dataset": args.dataset,
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "settings": vars(args), "machine": {**machine_info(), **machine_note()},
           "versions": package_versions(), "torch_threads": torch.get_num_threads(),
           "data": data, "teacher": t_info, "budgets_ms": budgets,
           "subnet_latency_extremes_ms": ofa_stage["subnet_latency_extremes_ms"],
           "ofa": {k: v for k, v in ofa_stage.items()
                   if k not in ("budgets_ms", "subnet_latency_extremes_ms")},
           "baselines": {k: v[1] for k, v in trained.items()},
           "comparable_budget": (f"each candidate student and the pruned teacher's recovery get "
                                 f"{base_epochs} epochs over {len(train_ds)} training images; "
                                 f"the ONE supernet training that serves every budget "
                                 f"gets {total_epochs} epochs in all over the same images; the "
                                 f"teacher got {args.teacher_epochs}"),
           "saliency": {"method": "scorecam", "images": args.saliency_images,
                        "classes": [test_ds.class_names[c] for c in classes]},
           "rows": rows, "pareto": pareto(rows),
           "dominance": None if dom is None else dom.to_dict(),
           "per_budget": per_budget(rows, budgets),
           "seconds_total": round(time.perf_counter() - t_start, 1),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(args.out, out)
    Path(args.out).with_suffix(".md").write_text(markdown(out))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
