"""Run `medscalpel demo` with one profile and write its stage times, baseline metrics and
compression table to benchmarks/results/demo_<profile>.json (docs/benchmarks.md, "The main
job").

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/demo_numbers.py --profile micro \
        [--out /tmp/demo_micro]

The run directory (--out) must not exist; it stays outside the repository. With
``--from-run DIR`` nothing runs: the numbers are read from a finished demo run (e.g. ``make demo``
timed in a fresh clone: ``--from-run ../fresh/runs/demo --note "..."``); load averages are then
those passed with ``--loadavg`` (as measured around that run), else null.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_result  # noqa: E402
from medscalpel.pipeline.demo import PROFILES, run_demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="micro", choices=sorted(PROFILES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--from-run", default=None, help="read a finished demo run instead")
    ap.add_argument("--loadavg", default=None, help="'start,end' 1-minute load averages")
    ap.add_argument("--note", default=None)
    args = ap.parse_args()
    if args.from_run:
        out = Path(args.from_run)
        demo = json.loads((out / "demo.json").read_text())
        if demo["profile"] != args.profile:
            raise SystemExit(f"{out} is a '{demo['profile']}' run, not '{args.profile}'.")
        la = [float(v) for v in args.loadavg.split(",")] if args.loadavg else [None, None]
        load0, load1, seconds, wall = [la[0]], [la[1]], demo["seconds"], None
    else:
        out = Path(args.out or f"/tmp/demo_{args.profile}")
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"{out} exists and is not empty; pass another --out.")
        load0 = os.getloadavg()
        t0 = time.time()
        seconds = run_demo(out, args.profile, seed=0, progress=False).seconds
        wall = time.time() - t0
        load1 = os.getloadavg()
        demo = json.loads((out / "demo.json").read_text())
    compress_file = out / "compress" / "compress.json"
    compress = json.loads(compress_file.read_text()) if compress_file.exists() else None
    save_result(f"demo_{args.profile}", {
        "seconds_total": round(seconds, 1),
        "wall_seconds": None if wall is None else round(wall, 1),
        "stage_seconds": {s["name"]: s["seconds"] for s in demo["stages"]},
        "stage_summaries": {s["name"]: s["summary"] for s in demo["stages"]},
        "compress_table": compress,
        "loadavg_start": list(load0), "loadavg_end": list(load1),
    }, {"profile": args.profile, "settings": demo["settings"], "seed": 0,
        "torch_threads": os.environ.get("OMP_NUM_THREADS"), "out": str(out),
        "from_run": bool(args.from_run), "note": args.note})


if __name__ == "__main__":
    main()
