"""Issue 32 (Q), deliverable 6: a benchmark of the decision rule itself.

Planted candidates of known effect are compared with a reference on synthetic scores (a seeded
binormal model per class: logit = mu * y + noise, population AUROC = Phi(mu / sqrt(2))), at
60 / 256 / 1000 evaluation images, ``--reps`` times each:

* ``identical``: a bit-identical copy (true delta 0);
* ``noise``: the candidate's logits carry their own noise, correlated 0.9 with the reference's,
  with the same distribution (true delta 0 in every class: harmless);
* ``loss``: as ``noise``, plus a real population AUROC loss of 0.02 in class c0 (harmful at
  both margins);
* ``rare``: as ``noise``, plus a fourth class with exactly 3 positive images whose population
  AUROC loses 0.05 (harmful; too few positives to judge).

Each comparison is :func:`medscalpel.engine.compare.compare_predictions` (paired bootstrap of
the AUROC, ``--n-boot`` replicates; ``boot_metrics=("auroc",)``) and is judged by

* the OLD rule (``meets_floor(-m, -m)`` as it was: point estimates of the macro and of every
  class >= -m; a class with an undefined delta is skipped, so ``None`` counts as accepted),
* the NEW rule :meth:`PairedComparison.verdict` (bootstrap; Holm over classes + macro; >= 10
  positives and negatives; no class accepted unchecked), and the same with paired DeLong,

at margins 0.01 and 0.005. Recorded per (variant, n, margin): how often each rule accepts /
rejects (old) or passes / fails / stays undecided (new), the Clopper-Pearson 95% upper bound
of the new rule's pass rate on harmful variants (target: <= one-sided alpha 0.025), and the
median estimate of the extra images an undecided verdict says would decide.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/decision_bench.py
    -> benchmarks/results/decision_rule.json and decision_rule.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import beta, norm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_result  # noqa: E402

from medscalpel.engine.compare import compare_predictions  # noqa: E402
from medscalpel.engine.predictions import Predictions  # noqa: E402
from medscalpel.runs import read_json, write_text  # noqa: E402

VARIANTS = {"identical": 0.0, "noise": 0.0, "loss": 0.02, "rare": 0.05}   # planted loss
HARMFUL = ("loss", "rare")
PREVALENCE = (0.4, 0.3, 0.2)
MU = 1.5             # binormal separation: population AUROC Phi(1.5 / sqrt 2) = 0.856
RHO = 0.9            # correlation of the candidate's noise with the reference's
RARE_POS = 3


def _mu_after_loss(mu: float, loss: float) -> float:
    return math.sqrt(2.0) * norm.ppf(norm.cdf(mu / math.sqrt(2.0)) - loss)


def planted(variant: str, n: int, seed: int) -> tuple[Predictions, Predictions]:
    """The reference and the planted candidate on ``n`` synthetic images."""
    rng = np.random.default_rng(seed)
    k = len(PREVALENCE) + (variant == "rare")
    y = np.zeros((n, k), np.float32)
    for j, p in enumerate(PREVALENCE):
        y[:, j] = rng.random(n) < p
    if variant == "rare":
        y[rng.choice(n, RARE_POS, replace=False), -1] = 1.0
    e1 = rng.standard_normal((n, k))
    ref = MU * y + e1
    mu_c = np.full(k, MU)
    if variant == "loss":
        mu_c[0] = _mu_after_loss(MU, VARIANTS["loss"])
    if variant == "rare":
        mu_c[-1] = _mu_after_loss(MU, VARIANTS["rare"])
    cand = (ref.copy() if variant == "identical" else
            mu_c * y + RHO * e1 + math.sqrt(1 - RHO ** 2) * rng.standard_normal((n, k)))
    ids = tuple(f"i{i}" for i in range(n))
    names = tuple(f"c{j}" for j in range(k))
    return (Predictions(ref.astype(np.float32), y, ids, names, "multilabel", model_id="ref"),
            Predictions(cand.astype(np.float32), y, ids, names, "multilabel", model_id=variant))


def _job(args: tuple[str, int, int, int, tuple[float, ...], int]) -> dict[str, Any]:
    variant, n, reps, n_boot, margins, seed = args
    out: dict[str, Any] = {str(m): {"old": [], "new": [], "delong": [], "more": [],
                                    "unscorable": []} for m in margins}
    for r in range(reps):
        a, b = planted(variant, n, seed + 7919 * r)
        c = compare_predictions(a, b, n_boot=n_boot, seed=r, boot_metrics=("auroc",))
        for m in margins:
            rec = out[str(m)]
            ok, _ = c.meets_floor(macro=-m, per_class=-m)
            rec["old"].append(ok is not False)           # the old rule skipped NaN classes
            v = c.verdict(m)
            rec["new"].append(v.outcome)
            rec["delong"].append(c.verdict(m, method="delong").outcome)
            more = [u.more_images for u in v.units if u.outcome == "undecided"
                    and u.more_images is not None]
            rec["more"].append(max(more) if more else None)
            rec["unscorable"].append(len(v.unscorable))
    return {"variant": variant, "n": n, "by_margin": out}


def _upper(k: int, n: int) -> float:
    """Clopper-Pearson one-sided 95% upper bound of a rate."""
    return 1.0 if k == n else float(beta.ppf(0.95, k + 1, n - k))


def summarise(raw: dict[str, Any], reps: int) -> dict[str, Any]:
    v, n = raw["variant"], raw["n"]
    rows = {}
    for m, rec in raw["by_margin"].items():
        harmful = v in HARMFUL
        new, dl = rec["new"], rec["delong"]
        cnt = {o: new.count(o) for o in ("pass", "fail", "undecided")}
        cnt_dl = {o: dl.count(o) for o in ("pass", "fail", "undecided")}
        old_acc = int(sum(rec["old"]))
        more = [x for x in rec["more"] if x is not None]
        row = {"harmful": harmful, "planted_loss": VARIANTS[v], "reps": reps,
               "old_accept": old_acc, "old_reject": reps - old_acc,
               "new_pass": cnt["pass"], "new_fail": cnt["fail"],
               "new_undecided": cnt["undecided"],
               "delong_pass": cnt_dl["pass"], "delong_fail": cnt_dl["fail"],
               "delong_undecided": cnt_dl["undecided"],
               "mean_unscorable_classes": float(np.mean(rec["unscorable"])),
               "median_more_images_when_undecided": float(np.median(more)) if more else None}
        if harmful:
            row["old_accepts_harmful_rate"] = old_acc / reps
            row["new_passes_harmful_rate"] = cnt["pass"] / reps
            row["new_passes_harmful_upper95"] = _upper(cnt["pass"], reps)
            row["delong_passes_harmful_rate"] = cnt_dl["pass"] / reps
            row["target_met"] = cnt["pass"] / reps <= 0.025
        else:
            row["old_rejects_harmless_rate"] = (reps - old_acc) / reps
            row["new_fails_harmless_rate"] = cnt["fail"] / reps
            row["new_undecided_harmless_rate"] = cnt["undecided"] / reps
        rows[m] = row
    return {"variant": v, "n": n, "by_margin": rows}


def _markdown(results: dict[str, Any], config: dict[str, Any], name: str) -> str:
    lines = [
        "# Decision rule benchmark (issue 32, deliverable 6)", "",
        f"Synthetic paired scores, {config['reps']} seeded repetitions per cell, paired "
        f"bootstrap {config['n_boot']}x; OLD = point estimates >= -margin (macro and every "
        "class, undefined classes skipped); NEW = `PairedComparison.verdict` (interval bound vs "
        "margin, Holm over classes + macro, one-sided alpha 0.025, >= 10 positives and "
        "negatives per class). Planted losses are population AUROC losses; `loss` and `rare` "
        "are harmful at both margins. Generated by `benchmarks/decision_bench.py` from "
        f"`{name}.json`.", "",
        "| variant | n | margin | OLD accept | OLD reject | NEW pass | NEW fail | NEW undecided "
        "| DeLong pass / fail / undecided | unscorable classes (mean) "
        "| median more images (undecided) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in results["cells"]:
        for m, r in cell["by_margin"].items():
            more = r["median_more_images_when_undecided"]
            lines.append(
                f"| {cell['variant']}{' (harmful)' if r['harmful'] else ''} | {cell['n']} | {m} "
                f"| {r['old_accept']} | {r['old_reject']} | {r['new_pass']} | {r['new_fail']} "
                f"| {r['new_undecided']} | {r['delong_pass']} / {r['delong_fail']} / "
                f"{r['delong_undecided']} | {r['mean_unscorable_classes']:.2f} "
                f"| {'-' if more is None else f'{more:,.0f}'} |")
    t = results["target"]
    lines += ["", f"Counts out of {config['reps']} per cell. Target (the new rule passes a "
              f"harmful variant in at most 2.5% of repetitions): "
              f"{'met' if t['met'] else 'NOT met'} in every harmful cell; worst new-rule pass "
              f"rate on a harmful variant {t['worst_new_pass_harmful']:.3f}, OLD rule's worst "
              f"acceptance of a harmful variant {t['worst_old_accept_harmful']:.3f}, OLD rule's "
              f"worst rejection of a harmless one {t['worst_old_reject_harmless']:.3f}, NEW "
              f"rule's worst fail of a harmless one {t['worst_new_fail_harmless']:.3f}.", "",
              "The 'more images' column is the verdict's own estimate (normal approximation, "
              "80% power, point estimate assumed to hold), not a measurement. A class with "
              "fewer than 10 positive images is unscorable and keeps the verdict undecided "
              "(the `rare` class always; class c2, prevalence 0.2, in some draws of 60 images), "
              "where the OLD rule judged it by its point estimate.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--sizes", default="60,256,1000")
    ap.add_argument("--margins", default="0.01,0.005")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="decision_rule")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rebuild NAME.md from NAME.json")
    args = ap.parse_args()
    if args.markdown_only:
        stored = read_json(RESULTS / f"{args.name}.json")
        write_text(RESULTS / f"{args.name}.md",
                   _markdown(stored["results"], stored["config"], args.name))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    margins = tuple(float(m) for m in args.margins.split(","))
    jobs = [(v, n, args.reps, args.n_boot, margins, args.seed + 1000 * i + n)
            for i, v in enumerate(VARIANTS) for n in sizes]
    jobs.sort(key=lambda j: -j[1])                       # largest first
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as ex:
        raw = list(ex.map(_job, jobs))
    cells = sorted((summarise(r, args.reps) for r in raw),
                   key=lambda c: (list(VARIANTS).index(c["variant"]), c["n"]))
    rows = [r for c in cells for r in c["by_margin"].values()]
    harm = [r for r in rows if r["harmful"]]
    safe = [r for r in rows if not r["harmful"]]
    target = {"met": all(r["target_met"] for r in harm),
              "worst_new_pass_harmful": max(r["new_passes_harmful_rate"] for r in harm),
              "worst_old_accept_harmful": max(r["old_accepts_harmful_rate"] for r in harm),
              "worst_old_reject_harmless": max(r["old_rejects_harmless_rate"] for r in safe),
              "worst_new_fail_harmless": max(r["new_fails_harmless_rate"] for r in safe)}
    config = {"reps": args.reps, "n_boot": args.n_boot, "sizes": sizes, "margins": margins,
              "seed": args.seed, "workers": args.workers, "prevalence": PREVALENCE, "mu": MU,
              "rho": RHO, "rare_positives": RARE_POS, "planted_loss": VARIANTS,
              "rule_new": "PairedComparison.verdict(margin, macro_margin=margin): bootstrap, "
                          "Holm, level 0.95 (one-sided alpha 0.025), min 10 pos/neg",
              "rule_old": "meets_floor(-margin, -margin) with undefined classes skipped",
              "threads": os.environ.get("OMP_NUM_THREADS")}
    results = {"cells": cells, "target": target,
               "seconds": round(time.perf_counter() - t0, 1)}
    save_result(args.name, results, config)
    write_text(RESULTS / f"{args.name}.md", _markdown(results, config, args.name))


if __name__ == "__main__":
    main()
