"""Numbers the docs derive from committed result files (means, ratios, widths), computed here so
that each has a script: reads benchmarks/results/{phantom_difficulty_densenet121_64,
distill_bench}.json and writes benchmarks/results/doc_derived.json.

    .venv/bin/python scripts/doc_derived_numbers.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, save_result  # noqa: E402


def phantom_difficulty() -> dict:
    """docs/phantom.md: the three rarest vs the three most common findings (train prevalence)."""
    d = json.loads((RESULTS / "phantom_difficulty_densenet121_64.json").read_text())["results"]
    rows = sorted(d["classes"], key=lambda c: c["prevalence"])
    rare, common = rows[:3], rows[-3:]
    return {"rarest3": [c["class"] for c in rare],
            "rarest3_mean_auroc": float(np.mean([c["auroc"] for c in rare])),
            "common3": [c["class"] for c in common],
            "common3_mean_auroc": float(np.mean([c["auroc"] for c in common]))}


def distill() -> dict:
    """docs/distill.md: divergence ratios and CI widths of the distillation benchmark."""
    d = json.loads((RESULTS / "distill_bench.json").read_text())
    out = {}
    for r in d["results"]:
        st = r["distill"]["students"]
        t = r["distill"]["teacher"]
        out[r["dataset"]] = {
            "divergence_alone_over_distilled": st["alone"]["divergence"]
            / st["distilled"]["divergence"],
            "auroc_ci_width": {name: float(np.diff(m["metrics"]["auroc_ci"])[0])
                               for name, m in [("teacher", t), *st.items()]},
            "n_test": r["n_test"]}
    return out


def main() -> None:
    save_result("doc_derived", {"phantom_difficulty": phantom_difficulty(),
                                "distill": distill()},
                {"sources": ["benchmarks/results/phantom_difficulty_densenet121_64.json",
                             "benchmarks/results/distill_bench.json"]})


if __name__ == "__main__":
    main()
