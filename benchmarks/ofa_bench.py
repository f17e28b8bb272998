"""Once-for-all students vs candidate-list students vs a structured-pruned teacher (issue 30).

On the phantom (patient-wise train / val / test splits of ``phantom?n=N&size=S``):

1. a teacher (``--teacher-arch``, resnet_tiny by default) is trained here through
   :func:`medscalpel.engine.train.train`;
2. ONE supernet is trained by progressive shrinking distilled from the teacher
   (:func:`medscalpel.compress.ofa.flow.distill_ofa`) and specialised for three latency budgets
   on ONNX Runtime fp32 (1 thread), placed between the smallest and the largest subnet's
   latency measured here before training (``--budget-fractions`` of that range);
3. the candidate-list students (``--candidates``) are each distilled from the teacher with the
   same loss (:func:`medscalpel.compress.distill.distill_train`) for as many epochs as the WHOLE
   supernet training (so each of them alone gets about as much training as the supernet that
   serves all three budgets);
4. the teacher is structurally pruned (L1, ``--prune-speedup`` x MACs) with a distillation
   recovery of the same number of epochs;
5. every model is timed in the same alternated rounds on ONNX Runtime fp32 (batch 1, 1 thread;
   per-round ratios vs the teacher, :func:`medscalpel.deploy.timing.speed_ratio`), its test
   macro AUROC compared with the teacher's by paired bootstrap
   (:func:`medscalpel.engine.compare.compare_predictions`), and its Score-CAM maps compared with
   the teacher's (:func:`medscalpel.explain.compare.compare_saliency`).

Writes ``benchmarks/results/ofa_bench.json`` and the latency / AUROC front
``docs/img/ofa_front.png``. Usage (about 30 min on 2 shared cores)::

    nice -n 10 .venv/bin/python benchmarks/ofa_bench.py > /tmp/ofa_bench.log 2>&1 &
    # the supernet gets the epochs of the three per-budget students together (30 = 3 x 10)
    nice -n 10 .venv/bin/python benchmarks/ofa_bench.py --phase-epochs 12,6,6,6 \
        --student-epochs 10 --out benchmarks/results/ofa_bench_total_budget.json \
        --plot docs/img/ofa_front_total_budget.png --work /tmp/medscalpel-ofa-bench-total
"""

from __future__ import annotations

import argparse
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
from medscalpel.compress.ofa.flow import OFAConfig, distill_ofa  # noqa: E402
from medscalpel.compress.ofa.search import (LatencySpec, SearchConfig,  # noqa: E402
                                            alternated_latency)
from medscalpel.compress.ofa.supernet import OFASpace, OFASupernet, extract_subnet  # noqa: E402
from medscalpel.compress.ofa.train import OFATrainConfig  # noqa: E402
from medscalpel.compress.structured import RecoveryConfig, prune_structured  # noqa: E402
from medscalpel.data import Augment, Preprocess, open_dataset  # noqa: E402
from medscalpel.deploy.timing import speed_ratio  # noqa: E402
from medscalpel.engine.compare import compare_predictions  # noqa: E402
from medscalpel.engine.predict import collect_images, predict  # noqa: E402
from medscalpel.engine.train import TrainConfig, train  # noqa: E402
from medscalpel.explain.compare import compare_saliency  # noqa: E402
from medscalpel.models.checkpoint import make_card  # noqa: E402
from medscalpel.models.zoo import create_model  # noqa: E402
from medscalpel.runs import machine_info, package_versions, write_json  # noqa: E402

log = logging.getLogger("ofa_bench")


def splits(n: int, size: int, seed: int):
    pre = Preprocess(size=size)
    spec = f"phantom?n={n}&size={size}&seed={seed}"
    return [open_dataset(spec, split=s, preprocess=pre.with_augment(Augment())
                         if s == "train" else pre) for s in ("train", "val", "test")], spec


def train_teacher(args, train_ds, val_ds):
    cfg = TrainConfig(epochs=args.teacher_epochs, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, patience=args.teacher_epochs)
    t0 = time.perf_counter()
    res = train(create_model(args.teacher_arch, num_classes=train_ds.num_classes, in_chans=1,
                             img_size=args.size), train_ds, val_ds, cfg, progress=False)
    m = res.model
    m.card = make_card(m, train_ds.class_names, train_ds.task,
                       train_ds.preprocess.with_augment(None), training=cfg.to_dict())
    return m, {"arch": args.teacher_arch, "epochs": args.teacher_epochs,
               "seconds": round(time.perf_counter() - t0, 1), "history": res.history}


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


def candidate_students(args, teacher, train_ds, val_ds, epochs: int):
    out = {}
    for name in [c.strip() for c in args.candidates.split(",") if c.strip()]:
        t0 = time.perf_counter()
        s = create_model(name, num_classes=train_ds.num_classes, in_chans=1, img_size=args.size)
        cfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          patience=epochs)
        loss = DistillLoss(args.soft_weight, args.temperature, train_ds.task)
        res = distill_train(teacher, s, train_ds, val_ds, loss, cfg, progress=False)
        out[f"student:{name}"] = (res.model, {"epochs": epochs, "best_epoch": res.best_epoch,
                                              "seconds": round(time.perf_counter() - t0, 1)})
        log.info("student %s trained in %.0fs", name, time.perf_counter() - t0)
    return out


def pruned_teacher(args, teacher, train_ds, val_ds, epochs: int):
    t0 = time.perf_counter()
    calib, _ = collect_images(train_ds, 64, seed=args.seed)
    r = prune_structured(teacher, calib, criterion="l1", target_speedup=args.prune_speedup,
                         recovery=RecoveryConfig(epochs=epochs, lr=args.lr / 3,
                                                 distill_from_dense=True,
                                                 soft_weight=args.soft_weight),
                         train_ds=train_ds, val_ds=val_ds, measure_latency=False,
                         progress=False)
    return {f"pruned:l1x{args.prune_speedup:g}": (r.model, {
        "epochs": epochs, "speedup_macs": r.speedup_macs,
        "seconds": round(time.perf_counter() - t0, 1)})}


def measure_all(args, teacher, models: dict, test_ds, spec: LatencySpec):
    example = test_ds.image(0)[None]
    lat = alternated_latency({"teacher": teacher, **models}, spec, example,
                             rounds=args.latency_rounds)
    t_preds = predict(teacher, test_ds, progress=False)
    images, _ = collect_images(test_ds, args.saliency_images, seed=args.seed)
    k = test_ds.num_classes
    frequent = np.argsort(-np.nansum(test_ds.labels_multihot(), 0))
    classes = list(range(k)) if k <= 2 else [int(i) for i in frequent[:args.saliency_classes]]
    rows = {"teacher": {"params": count_parameters(teacher),
                        "macs": count_macs(teacher, example),
                        "latency_ms": float(np.median(lat["teacher"])),
                        "latency_rounds_ms": lat["teacher"],
                        "test_auroc": compare_predictions(t_preds, t_preds, n_boot=0)
                        .macro["auroc_ref"]}}
    for name, m in models.items():
        c = compare_predictions(t_preds, predict(m, test_ds, progress=False),
                                n_boot=args.n_boot, seed=args.seed)
        sal = compare_saliency(teacher, m, images, classes, method="scorecam",
                               progress=False).to_dict()["overall"]
        rows[name] = {"params": count_parameters(m), "macs": count_macs(m, example),
                      "latency_ms": float(np.median(lat[name])), "latency_rounds_ms": lat[name],
                      "speed_vs_teacher": speed_ratio(lat["teacher"], lat[name]).to_dict(),
                      "test_auroc": c.macro["auroc_new"],
                      "test_auroc_ci": [float(v) for v in c.macro["auroc_new_ci"]],
                      "delta_auroc": c.macro["delta_auroc"],
                      "delta_auroc_ci": [float(v) for v in c.macro["delta_auroc_ci"]],
                      "scorecam_vs_teacher": sal}
    return rows, classes


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
    """Which models are on the (lower latency, higher AUROC) front, and which OFA subnet
    dominates which candidate-list student."""
    names = [n for n in rows if n != "teacher"]

    def dominates(a, b):
        ra, rb = rows[a], rows[b]
        return (ra["latency_ms"] <= rb["latency_ms"] and ra["test_auroc"] >= rb["test_auroc"]
                and (ra["latency_ms"] < rb["latency_ms"] or ra["test_auroc"] > rb["test_auroc"]))

    front = [n for n in names if not any(dominates(o, n) for o in names if o != n)]
    dom = {a: [b for b in names if b.startswith("student:") and dominates(a, b)]
           for a in names if a.startswith("ofa:")}
    return {"front": front, "ofa_dominates": dom,
            "note": "point estimates of median latency and test macro AUROC; see the CIs"}


def plot(rows: dict, budgets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        label = (name.replace("ofa:budget_", "OFA <= ").replace("student:", "")
                 .replace("pruned:", "pruned "))
        offset = {"teacher": (6, -10), "pruned": (6, 4)}.get(kind, (4, 3))
        ax.annotate(label, (r["latency_ms"], r["test_auroc"]), fontsize=7, xytext=offset,
                    textcoords="offset points")
    for b in budgets:
        ax.axvline(b, color="tab:blue", ls=":", lw=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch-1 latency, ONNX Runtime fp32, 1 thread (ms, median of rounds)")
    ax.set_ylabel("test macro AUROC (95% CI)")
    ax.set_title("OFA subnets (blue, dotted: budgets) vs students vs pruned teacher")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1500)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--teacher-arch", default="resnet_tiny")
    p.add_argument("--teacher-epochs", type=int, default=8)
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
    p.add_argument("--latency-rounds", type=int, default=7)
    p.add_argument("--n-boot", type=int, default=500)
    p.add_argument("--saliency-images", type=int, default=8)
    p.add_argument("--saliency-classes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/medscalpel-ofa-bench")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ofa_bench.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "img" / "ofa_front.png"))
    p.add_argument("--replot", default=None, help="only redraw --plot from this results JSON")
    args = p.parse_args(argv)
    if args.replot:
        import json

        done = json.loads(Path(args.replot).read_text())
        plot(done["rows"], done["budgets_ms"], Path(args.plot))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("medscalpel.engine.train", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    (train_ds, val_ds, test_ds), spec = splits(args.n, args.size, args.seed)
    log.info("phantom: train %d val %d test %d", len(train_ds), len(val_ds), len(test_ds))
    teacher, t_info = train_teacher(args, train_ds, val_ds)
    log.info("teacher trained in %ss", t_info["seconds"])
    lat_spec = LatencySpec(runtime="onnxruntime:fp32", threads=1, rounds=3, repeats=10,
                           source="benchmark: onnxruntime fp32, 1 thread")
    # a skeleton whose largest subnet is about as slow as the tiny teacher on ORT here
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
                    n_boot=args.n_boot, saliency_images=0)
    t0 = time.perf_counter()
    ofa = distill_ofa(teacher, train_ds, val_ds, test_ds, budgets, cfg, lat_spec,
                      checkpoint_dir=Path(args.work) / "checkpoint", progress=False)
    ofa_s = round(time.perf_counter() - t0, 1)
    ofa.save(Path(args.work) / "ofa")
    log.info("OFA done in %.0fs: %s", ofa_s, [(s["label"], s["met"]) for s in ofa.subnets])
    total_epochs = cfg.train.total_epochs
    base_epochs = args.student_epochs or total_epochs
    models = {f"ofa:{k}": m for k, m in ofa.models.items()}
    trained = candidate_students(args, teacher, train_ds, val_ds, base_epochs)
    trained.update(pruned_teacher(args, teacher, train_ds, val_ds, base_epochs))
    models.update({k: v[0] for k, v in trained.items()})
    rows, classes = measure_all(args, teacher, models, test_ds, lat_spec)
    front = pareto(rows)
    plot(rows, budgets, Path(args.plot))
    out = {"benchmark": "ofa", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "settings": vars(args), "machine": machine_info(), "versions": package_versions(),
           "torch_threads": torch.get_num_threads(), "data": {
               "spec": spec, "n_train": len(train_ds), "n_val": len(val_ds),
               "n_test": len(test_ds), "split": "patient-wise (phantom adapter)"},
           "teacher": t_info, "budgets_ms": budgets, "subnet_latency_extremes_ms": extremes,
           "ofa": {"seconds_total": ofa_s, "supernet_train_seconds":
                   ofa.train_result.seconds, "supernet_epochs_total": total_epochs,
                   "supernet": ofa.supernet.to_dict(), "subnets": ofa.subnets,
                   "search": {k: v for k, v in ofa.search.to_dict().items()
                              if k != "candidates"},
                   "n_candidates_measured": len(ofa.search.candidates)},
           "baselines": {k: v[1] for k, v in trained.items()},
           "comparable_budget": (f"each candidate student and the pruned teacher's recovery get "
                                 f"{base_epochs} epochs; the ONE supernet training that serves "
                                 f"all three budgets gets {total_epochs} epochs in all"),
           "saliency_classes": classes, "rows": rows, "pareto": front,
           "per_budget": per_budget(rows, budgets),
           "seconds_total": round(time.perf_counter() - t_start, 1),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(args.out, out)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
