"""Recompute the "Measured" lossless table of docs/compress.md: densenet_tiny on Kermany
pneumonia at 64 px, then provable fold, empirical fold, sparsify (r = 0.5) -> provable fold,
and tolerance (r = 0.3), each verified on the test split.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/lossless_kermany_tiny.py \
        [--data ../shared/data] [--work /tmp/kerm]

Runs exactly the CLI commands listed in docs/compress.md (one subprocess each; a finished step
is kept under --work and skipped on a rerun) and writes their numbers to
benchmarks/results/lossless_kermany_tiny.json. The folder adapter splits by PATIENT (its
default), so no patient's images sit in two splits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_result  # noqa: E402

CLI = str(ROOT / ".venv" / "bin" / "medscalpel")


def steps(spec: str, work: Path) -> dict[str, list[str]]:
    m = str(work / "dense" / "model")
    common = [CLI, "compress", "lossless", m, spec, "--heldout-split", "test"]
    return {
        "dense": [CLI, "train", "--data", spec, "--arch", "densenet_tiny", "--size", "64",
                  "--epochs", "4", "--batch-size", "64", "--lr", "3e-3", "--n-boot", "0",
                  "--out", str(work / "dense")],
        "provable": common + ["--out", str(work / "provable")],
        "empirical": common + ["--out", str(work / "empirical"), "--mode", "empirical"],
        "sparse50": common + ["--out", str(work / "sparse50"), "--sparsify-ratio", "0.5",
                              "--sparsify-epochs", "3"],
        "tol30": common + ["--out", str(work / "tol30"), "--tolerance", "0.3"],
    }


def small(x, limit: int = 64):
    """The JSON without long lists (per-layer plans, per-image values)."""
    if isinstance(x, dict):
        return {k: small(v, limit) for k, v in x.items()}
    if isinstance(x, list):
        return [small(v, limit) for v in x] if len(x) <= limit else f"<list of {len(x)}>"
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--work", default="/tmp/kerm")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = f"folder:{Path(args.data) / 'kermany-pneumonia' / 'train'}"
    seconds, out = {}, {}
    env = {**os.environ, "MEDSCALPEL_PROGRESS": "0"}
    load0 = os.getloadavg()
    for name, cmd in steps(spec, work).items():
        done = work / name / ("model" if name == "dense" else "report.json")
        if not done.exists():
            t = time.time()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            (work / f"{name}.log").write_text(r.stdout + r.stderr)
            if r.returncode != 0:
                raise SystemExit(f"{name} failed ({r.returncode}): {r.stderr[-2000:]}")
            seconds[name] = round(time.time() - t, 1)
        if name == "dense":
            out[name] = {"card": small(json.loads((work / name / "model" / "model.json")
                                                  .read_text()))}
            for f in sorted((work / name).glob("*.json")):
                out[name][f.stem] = small(json.loads(f.read_text()))
        else:
            out[name] = small(json.loads((work / name / "report.json").read_text()))
        out[name]["command"] = " ".join(cmd[1:])
    save_result("lossless_kermany_tiny", {**out, "seconds": seconds,
                                          "loadavg_start": list(load0),
                                          "loadavg_end": list(os.getloadavg())},
                {"data": "folder:<shared data>/kermany-pneumonia/train (patient-wise split)",
                 "arch": "densenet_tiny", "size": 64, "torch_threads":
                 os.environ.get("OMP_NUM_THREADS")})


if __name__ == "__main__":
    main()
