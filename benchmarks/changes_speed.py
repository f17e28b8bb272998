"""Issue 18: CPU cost of the what-compression-changed audit before and after the speed-ups,
alternated in one run (old, new, old, new, ...) on the same pair, images and settings.

The "old" implementation is medscalpel/audit/changes/ at commit ``--old`` (read with
``git show`` and imported under another package name; nothing is installed or changed); the
"new" one is the working tree. Both run :func:`audit_changes` with the default settings (1000
bootstrap replicates, 100 faithfulness images, 9 corruptions x 3 severities) on ``--n-images``
phantom test images with ``--threads`` torch threads. The pair is the changes benchmark's dense
model and its ``l2_x4`` pruning when ``--work`` holds them (benchmarks/changes_bench.py
--train-only), else a randomly initialised ``--arch`` and its l2 x4 pruning (the cost does not
depend on the weights, beyond how many Grad-CAM maps are empty). Recorded: process CPU seconds
(primary), wall seconds and the load average of every run, per-measure wall seconds, and the
CPU ratio old / new per alternation with its spread.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python benchmarks/changes_speed.py
    -> benchmarks/results/changes_speed.json
    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python benchmarks/changes_speed.py \
        --arch densenet121 --work none --n-images 500 --codes new --repeats 1 \
        --name changes_speed_densenet121     # the target on the heavier architecture
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

import medscalpel.audit.changes as new_changes  # noqa: E402
from medscalpel.compress.structured import prune_structured  # noqa: E402
from medscalpel.data import Preprocess, open_dataset  # noqa: E402
from medscalpel.engine.train import seed_everything  # noqa: E402
from medscalpel.models import create_model, load_model, make_card  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FILES = ("__init__.py", "_util.py", "calibration.py", "explanation.py", "faithfulness.py",
         "robustness.py", "subgroups.py")


def old_module(commit: str, tmp: Path):
    pkg = tmp / "changes_old"
    pkg.mkdir()
    for f in FILES:
        src = subprocess.run(["git", "-C", str(ROOT), "show",
                              f"{commit}:medscalpel/audit/changes/{f}"],
                             check=True, capture_output=True, text=True).stdout
        (pkg / f).write_text(src.replace("medscalpel.audit.changes", "changes_old"))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("changes_old")


def pair(args, te):
    work = Path(args.work)
    if (work / "dense" / "model.json").is_file() and (work / "l2_x4" / "model.json").is_file():
        return load_model(work / "dense"), load_model(work / "l2_x4"), "trained (changes_bench)"
    seed_everything(0)
    m = create_model(args.arch, te.num_classes, 1, args.size)
    m.card = make_card(m, te.class_names, te.task, te.preprocess)
    calib = torch.stack([te.image(i) for i in range(32)])
    pr = prune_structured(m, calib, criterion="l2", target_speedup=4.0, measure_latency=False,
                          progress=False)
    return m, pr.model, f"random init {args.arch} + l2 x4"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default="d2d184b")
    ap.add_argument("--work", default="runs/bench-changes-v2")
    ap.add_argument("--arch", default="densenet_small")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n-images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--codes", default="old,new", help="which implementations to run, in order")
    ap.add_argument("--name", default="changes_speed", help="result file stem")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    te = open_dataset(f"phantom?n=6000&size={args.size}&seed=0", split="test",
                      preprocess=Preprocess(args.size))
    dense, comp, origin = pair(args, te)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        old = old_module(args.old, Path(tmp))
        for r in range(args.repeats):
            for tag, mod in [(c, {"old": old, "new": new_changes}[c])
                             for c in args.codes.split(",")]:
                load0 = os.getloadavg()
                t0, c0 = time.perf_counter(), time.process_time()
                res = mod.audit_changes(dense, {"x4": comp}, te, n_images=args.n_images,
                                        progress=False)
                runs.append({"code": tag, "repeat": r, "cpu_s": round(time.process_time() - c0, 1),
                             "wall_s": round(time.perf_counter() - t0, 1), "loadavg_before": load0,
                             "loadavg_after": os.getloadavg(), "seconds": res.pairs[0].seconds,
                             "headline": res.pairs[0].headline()})
                print(tag, runs[-1]["cpu_s"], runs[-1]["wall_s"], flush=True)
    olds, news = [r for r in runs if r["code"] == "old"], [r for r in runs if r["code"] == "new"]
    ratios = [o["cpu_s"] / n["cpu_s"] for o, n in zip(olds, news)] or [float("nan")]
    save_result(args.name, {
        "pair": origin, "n_images": args.n_images, "torch_threads": args.threads,
        "runs": runs, "cpu_ratio_old_over_new": ratios,
        "cpu_ratio_median": float(np.median(ratios)),
        "cpu_ratio_spread": [float(min(ratios)), float(max(ratios))],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "note": "CPU seconds sum both torch threads; wall seconds measured on a shared machine "
                "(see the load averages)"}, vars(args))


if __name__ == "__main__":
    main()
