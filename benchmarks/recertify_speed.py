"""How long one ``recertify`` call takes, with the exact planning numbers computed by the former
brute force (every trial count up to 200,000; kept in tests/test_conformal_speed.py as the
reference) and by the current search (:func:`medscalpel.repair.one_sample.trials_for_power`),
and whether both return the same result.

Cases (both recall>=0.9, alpha 0.1, 14 classes):
* ``synthetic``: seeded logits ``1.5 y + N(0, 1)``, prevalence 0.3, 3000 calibration and 3000
  new images from the same population (new-data recall near the certified level: the slow
  path of the planning numbers);
* ``phantom``: the dense phantom model's predictions cached by
  benchmarks/conformal_compress_bench.py (``runs/conformal_compress_bench/rec2``), patient-wise
  50/50 split 0, re-certified on the dense and the int8 test half; skipped with a reason when
  the cache is absent.

``--repeats`` alternated rounds per case: one brute-force call, one current call with its
cache cleared (``cold``), one more current call (``warm``: the same guarantee re-checked, as a
deploy run does per variant); medians and per-round ratios with their range.

Run:  nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recertify_speed.py
Writes benchmarks/results/recertify_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import RESULTS, save_result  # noqa: E402
from test_conformal_speed import _same, reference_trials_for_power  # noqa: E402

from medscalpel.engine.predictions import Predictions  # noqa: E402
from medscalpel.repair import conformal, one_sample  # noqa: E402
from medscalpel.repair.conformal import calibrate_guarantee, patient_split, recertify  # noqa: E402

REPO = HERE.parent
CACHE = REPO / "runs" / "conformal_compress_bench" / "rec2"


def synthetic_cases() -> list[tuple[str, object, Predictions]]:
    rng = np.random.default_rng(3)
    k, n = 14, 3000
    y = (rng.random((2 * n, k)) < 0.3).astype(np.float32)
    z = (1.5 * y + rng.normal(size=(2 * n, k))).astype(np.float32)
    names = tuple(f"c{j}" for j in range(k))

    def preds(rows, split):
        return Predictions(z[rows], y[rows], ids=tuple(f"{split}{i}" for i in rows),
                           class_names=names, task="multilabel", split=split, model_id="m")

    g = calibrate_guarantee(preds(np.arange(n), "cal"), "recall>=0.9", 0.1)
    return [("synthetic", g, preds(np.arange(n, 2 * n), "new"))]


def phantom_cases() -> tuple[list, str]:
    if not (CACHE / "preds_dense.npz").is_file():
        return [], f"skipped: no cached phantom predictions in {CACHE.relative_to(REPO)}"
    dense = Predictions.load(CACHE / "preds_dense.npz")
    int8 = Predictions.load(CACHE / "preds_int8.npz")
    pids = json.loads((CACHE / "patients.json").read_text())
    sp = patient_split(dense.n, pids, 0.5, seed=0)
    g = calibrate_guarantee(dense.select(sp.calibration), "recall>=0.9", 0.1)
    return [("phantom dense", g, dense.select(sp.held_out)),
            ("phantom int8", g, int8.select(sp.held_out))], ""


def _alternated(g, new, repeats: int, fast) -> dict:
    """``repeats`` rounds, each timing one brute-force call then one current call (cache
    cleared: cold) then one more current call (warm); per-round ratios."""
    t_old, t_cold, t_warm, r_old, r_new = [], [], [], None, None
    for _ in range(repeats):
        _use(reference_trials_for_power)
        t = time.perf_counter()
        r_old = recertify(g, new).to_dict()
        t_old.append(time.perf_counter() - t)
        _use(fast)
        one_sample._trials_for_power.cache_clear()
        t = time.perf_counter()
        r_new = recertify(g, new).to_dict()
        t_cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        recertify(g, new)
        t_warm.append(time.perf_counter() - t)
    ratios = [a / b for a, b in zip(t_old, t_cold)]
    return {"seconds_brute_force": t_old, "seconds_cold": t_cold, "seconds_warm": t_warm,
            "ratio_per_round": ratios, "identical": _same(r_old, r_new),
            "outcome": r_new["outcome"],
            "undecided_rows": sum(r["outcome"] == "undecided" for r in r_new["rows"])}


def _use(tfp) -> None:
    one_sample.trials_for_power = tfp
    conformal.trials_for_power = tfp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    fast = one_sample.trials_for_power
    cases = synthetic_cases()
    more, skipped = phantom_cases()
    cases += more
    rows = []
    load0 = os.getloadavg()
    for name, g, new in cases:
        r = {"case": name, "classes": len(g.class_names), "new_images": new.n,
             **_alternated(g, new, args.repeats, fast)}
        for k in ("brute_force", "cold", "warm"):
            r[f"median_{k}"] = statistics.median(r[f"seconds_{k}"])
        r["ratio_median"] = statistics.median(r["ratio_per_round"])
        r["ratio_range"] = [min(r["ratio_per_round"]), max(r["ratio_per_round"])]
        rows.append(r)
        print(f"{name}: brute force {r['median_brute_force']:.3f} s, now {r['median_cold']:.3f}"
              f" s (cold cache), {r['median_warm']:.3f} s (warm); per-round ratio "
              f"x{r['ratio_median']:.0f} (x{r['ratio_range'][0]:.0f}-x{r['ratio_range'][1]:.0f})"
              f"; identical: {r['identical']}", flush=True)
    res = {"rows": rows, "phantom": skipped or "run", "repeats": args.repeats,
           "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg())}
    save_result("recertify_speed", res, vars(args))
    lines = ["# recertify: seconds per call, brute-force planning numbers vs the current search",
             "", f"{args.repeats} alternated rounds (brute force, then current with its cache "
             "cleared, then current again: warm); medians and the per-round ratio (its range "
             "in brackets); recall>=0.9, alpha 0.1; load average "
             f"{res['loadavg_start'][0]:.1f} -> {res['loadavg_end'][0]:.1f} on the shared "
             "machine. Produced by benchmarks/recertify_speed.py (machine and versions in "
             "recertify_speed.json). "
             + (f"Phantom: {skipped}." if skipped else ""), "",
             "| case | classes | new images | outcome (undecided rows) | brute force (s) | "
             "now, cold cache (s) | now, warm cache (s) | speed-up per round (cold) | "
             "identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['classes']} | {r['new_images']} | {r['outcome']} "
                     f"({r['undecided_rows']}) | {r['median_brute_force']:.3f} | "
                     f"{r['median_cold']:.3f} | {r['median_warm']:.3f} | "
                     f"x{r['ratio_median']:.0f} (x{r['ratio_range'][0]:.0f}-"
                     f"x{r['ratio_range'][1]:.0f}) | "
                     f"{'yes' if r['identical'] else 'NO'} |")
    (RESULTS / "recertify_speed.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if not all(r["identical"] for r in rows) or any(math.isnan(r["median_cold"]) for r in rows):
        raise SystemExit("the fast and the brute-force results differ")


if __name__ == "__main__":
    main()
