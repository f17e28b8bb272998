"""Issue 18 benchmark: the full what-compression-changed audit of one dense/compressed pair.

On the phantom (generator 1.2, n=5000, 64 px; the audit uses 500 images of its patient-wise
test split) a densenet121 is trained QUICKLY here (seeded; ``--epochs`` x ``--max-steps``
batches, default 1 x 15, so it is a weak model, stated in the JSON), then pruned structurally to ~4x and ~8x
fewer MACs (``prune_structured``, criterion ``--criterion``, NO recovery fine-tune, stated),
and :func:`medscalpel.audit.changes.audit_changes` runs all four measures on each pair with
the default settings (1000 bootstrap replicates, 100 faithfulness images, 9 corruptions x 3
severities). Wall time per measure, torch threads and the load average before/after are
recorded; the machine is shared, so treat the seconds as upper bounds.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/changes_bench.py
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/changes_bench.py --demo-only
    -> benchmarks/results/changes.json, benchmarks/results/changes.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_result  # noqa: E402

from medscalpel.audit.changes import audit_changes  # noqa: E402
from medscalpel.compress.structured import prune_structured  # noqa: E402
from medscalpel.data import Preprocess, open_dataset  # noqa: E402
from medscalpel.engine.train import TrainConfig, seed_everything, train  # noqa: E402
from medscalpel.models import create_model, load_model, make_card, save_model  # noqa: E402
from medscalpel.runs import write_text  # noqa: E402


def dense_model(args, tr, va):
    out = Path(args.work) / "dense"
    if (out / "model.json").is_file():
        return load_model(out), {"reused": True}
    seed_everything(0)
    m = create_model("densenet121", tr.num_classes, 1, args.size)
    m.card = make_card(m, tr.class_names, tr.task, tr.preprocess)
    cfg = TrainConfig(epochs=args.epochs, batch_size=32, lr=1e-3, seed=0,
                      max_steps_per_epoch=args.max_steps)
    t0 = time.perf_counter()
    res = train(m, tr, va, config=cfg)
    save_model(res.model, out)
    return res.model, {"reused": False, "train_s": round(time.perf_counter() - t0, 1),
                       "epochs": args.epochs, "max_steps_per_epoch": args.max_steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/bench-changes")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--phantom-n", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=15)
    ap.add_argument("--criterion", default="l2")
    ap.add_argument("--speedups", default="4,8")
    ap.add_argument("--n-images", type=int, default=500)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--demo-only", action="store_true", help="only time the demo-ready call")
    args = ap.parse_args()
    if args.demo_only:
        write(args, "", {"demo_call": demo_call(args)}, [])
        return
    pp = Preprocess(args.size)
    spec = f"phantom?n={args.phantom_n}&size={args.size}&seed=0"
    tr, va, te = (open_dataset(spec, split=s, preprocess=pp) for s in ("train", "val", "test"))
    dense, train_info = dense_model(args, tr, va)
    calib = torch.stack([tr.image(i) for i in range(64)])
    results = {"dense": {**train_info, "arch": "densenet121", "size": args.size,
                         "note": "quickly trained here (weak model); not the compression "
                                 "benchmark's dense model"}, "pairs": {}}
    md = ["| pair | MACs speedup | dAUROC macro [95% CI] | dECE macro [95% CI] | recalibrate | "
          "Spearman median | deletion d [CI] | subgroups flagged | less robust cells | "
          "audit wall s (calib/expl/subgr/robust) | total wall s | CPU s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sp in [float(s) for s in args.speedups.split(",")]:
        name = f"{args.criterion}_x{sp:g}"
        pr = prune_structured(dense, calib, criterion=args.criterion, target_speedup=sp,
                              measure_latency=False, progress=False)
        load0 = os.getloadavg()
        t0, c0 = time.perf_counter(), time.process_time()
        res = audit_changes(dense, {name: pr.model}, te, n_images=args.n_images,
                            n_boot=args.n_boot, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        load1 = os.getloadavg()
        res.save(Path(args.work) / "audit" / name)
        p = res.pairs[0]
        c, e = p.calibration, p.explanation
        rho = [v["spearman"]["mean"] for v in e.classes.values()]
        dl = e.faithfulness["deletion"]["delta"]
        results["pairs"][name] = {
            "speedup_macs": pr.speedup_macs, "n_images": res.n, "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "seconds": p.seconds, "torch_threads": torch.get_num_threads(),
            "loadavg_before": load0, "loadavg_after": load1, "headline": p.headline(),
            "audit": p.to_dict()}
        cm = c.macro
        rb = [x for x in p.robustness.macro() if x.less_robust]
        sec = p.seconds
        md.append(f"| {name} | {pr.speedup_macs:.2f} | {cm['delta_auroc']:+.3f} "
                  f"[{cm['delta_auroc_ci'][0]:+.3f}, {cm['delta_auroc_ci'][1]:+.3f}] | "
                  f"{cm['delta_ece']:+.3f} [{cm['delta_ece_ci'][0]:+.3f}, "
                  f"{cm['delta_ece_ci'][1]:+.3f}] | "
                  f"{'yes' if c.recommend_recalibration else 'no'} | {np.nanmedian(rho):.2f} | "
                  f"{dl['mean']:+.3f} [{dl['ci'][0]:+.3f}, {dl['ci'][1]:+.3f}] | "
                  f"{len([r for r in p.subgroups.flagged() if r.cls == 'macro'])} macro / "
                  f"{len(p.subgroups.flagged(True))} Holm | {len(rb)}/{len(p.robustness.macro())} "
                  f"| {sec.get('calibration', 0):.0f}/{sec.get('explanation', 0):.0f}/"
                  f"{sec.get('subgroups', 0):.0f}/{sec.get('robustness', 0):.0f} | {wall:.0f} | "
                  f"{cpu:.0f} |")
        print(md[-1], flush=True)
        write(args, spec, results, md)   # after every pair: a partial run still reports


#: the demo-ready call (report section of the demo): one pair, lighter settings
DEMO_KW = dict(n_images=200, n_boot=200, n_faithfulness=32, severities=(2,), progress=False)


def demo_call(args) -> dict:
    """Time the demo-ready call on the demo's 'quick' architecture (densenet_small, 64 px):
    the dense model is randomly initialised (cost does not depend on the weights) and pruned
    to ~4x fewer MACs with the same criterion."""
    pp = Preprocess(args.size)
    te = open_dataset(f"phantom?n=2000&size={args.size}&seed=0", split="test", preprocess=pp)
    seed_everything(0)
    m = create_model("densenet_small", te.num_classes, 1, args.size)
    m.card = make_card(m, te.class_names, te.task, pp)
    calib = torch.stack([te.image(i) for i in range(32)])
    pr = prune_structured(m, calib, criterion=args.criterion, target_speedup=4.0,
                          measure_latency=False, progress=False)
    runs = []
    for _ in range(2):
        load0 = os.getloadavg()
        t0, c0 = time.perf_counter(), time.process_time()
        res = audit_changes(m, {"structured_x4": pr.model}, te, **DEMO_KW)
        runs.append({"wall_s": round(time.perf_counter() - t0, 1),
                     "cpu_s": round(time.process_time() - c0, 1), "loadavg_before": load0,
                     "loadavg_after": os.getloadavg(), "seconds": res.pairs[0].seconds})
    return {"call": "audit_changes(dense, {'structured_x4': pruned}, test, n_images=200, "
                    "n_boot=200, n_faithfulness=32, severities=(2,))",
            "arch": "densenet_small", "size": args.size, "speedup_macs": pr.speedup_macs,
            "n_test_images": len(te), "torch_threads": torch.get_num_threads(), "runs": runs}


def write(args, spec, results, md) -> None:
    cfg = {**vars(args), "spec": spec, "split": "test", "omp_num_threads":
           os.environ.get("OMP_NUM_THREADS")}
    old = RESULTS / "changes.json"
    if old.is_file():   # keep what another stage of this script measured
        import json

        prev = json.loads(old.read_text()).get("results", {})
        results = {**{k: v for k, v in prev.items() if k not in results}, **results}
    save_result("changes", results, cfg)
    if not md:
        return
    write_text(RESULTS / "changes.md",
               "# What compression changed: phantom densenet121 64 px (benchmarks/changes_bench.py)"
               "\n\n" + "\n".join(md) + "\n\nLoad averages and per-measure seconds: "
               "changes.json. Dense model: quickly trained (weak); pruned models: no recovery "
               "fine-tune. CPU s = process CPU time of the audit (one torch thread), the "
               "load-independent cost; wall s depends on the shared machine's load.\n")


if __name__ == "__main__":
    main()
