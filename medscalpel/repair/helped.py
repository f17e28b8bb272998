"""Did a treatment help? The treatment router's "helped" as a paired verdict.

One attempt changes class ``k``'s logits (or threshold); before and after are measured on the
same held-out images (the *selection* part), so the question is a paired one and goes through
the one decision primitive (:func:`medscalpel.engine.decision.decide`), with paired bootstrap
replicates (images resampled once, both states measured on each resample):

* **improvement** (one unit): the held-out metric of the issue the treatment is tried for (the
  first open issue it treats: recall -> Youden's J, precision -> F1, miscalibration -> ECE,
  false-positive cluster / confounder -> specificity, low AUROC -> AUROC) improved by at least
  its ``min_gain``: the unit's delta is ``gain - min_gain`` with margin 0, so *pass* needs the
  interval's lower bound of the gain ``>= min_gain``;
* **guards** (non-inferiority, in the same verdict): the class's AUROC does not fall by more
  than ``max_auroc_drop``; for issues that only concern false positives, its recall does not
  fall by more than ``max_recall_drop``;
* **side effects** (a second verdict, over the other open issues' metrics: not worse by more
  than their ``min_gain``): only a *shown* loss blocks (its outcome fail); an undecided side
  effect is recorded, not held against the attempt (those issues stay open and are treated in
  turn).

Holm across the units of each verdict; a class with fewer than ``min_pos`` positive or
``min_neg`` negative selection images is unscorable (undecided). The outcome: **pass** = helped
(kept), **fail** = no gain or harm shown (not kept), **undecided** = the selection images cannot
tell (not kept; the router escalates, and the record says so).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from medscalpel.engine.compare import weighted_auroc
from medscalpel.engine.decision import UnitInput, decide
from medscalpel.engine.metrics import weighted_ece
from medscalpel.repair.surgery.helpers import label_k, margins, sigmoid

#: the held-out metric each issue is judged by: (metric, higher_is_better, min_gain)
ISSUE_METRIC = {"low_recall": ("youden", True, 0.01), "low_precision": ("f1", True, 0.01),
                "miscalibrated": ("ece", False, 0.01), "fp_cluster": ("specificity", True, 0.005),
                "confounder": ("specificity", True, 0.005), "low_auroc": ("auroc", True, 0.005)}
FP_KINDS = frozenset({"fp_cluster", "confounder", "low_precision"})
_CHUNK = 128


def boot_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Multinomial image counts ``[n_boot, n]`` (one paired bootstrap replicate per row)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def class_arrays(logits: np.ndarray, labels: np.ndarray, task: str, k: int, threshold: float,
                 flags: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Labels, probabilities and decisions of class ``k`` (the rule of
    :func:`medscalpel.repair.triage.class_metrics`): ``known`` rows, ``y``, ``p``, ``dec`` and
    ``neg_spec`` (the negatives the reported specificity is over: the flagged ones when
    ``flags`` is given and some flagged negative exists)."""
    y = label_k(labels, k, task)
    known = np.isfinite(y)
    yk = y[known] > 0.5
    pm, dm = margins(logits, k, task, threshold)
    neg_spec = ~yk
    if flags is not None:
        f = np.asarray(flags, bool)[known]
        if (~yk & f).any():
            neg_spec = ~yk & f
    return {"known": known, "y": yk, "p": sigmoid(pm)[known], "dec": dm[known] >= 0,
            "neg_spec": neg_spec}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den == 0] = np.nan
    return out


def weighted_class_metrics(a: dict[str, np.ndarray], w: np.ndarray, bins: int = 10,
                           metrics: Sequence[str] = ("recall", "specificity", "f1", "youden",
                                                     "auroc", "ece")) -> dict[str, np.ndarray]:
    """The issue metrics of one class under image weights ``w`` ``[B, n_known]`` -> ``[B]``
    each (with unit weights they equal :func:`~medscalpel.repair.triage.class_metrics`)."""
    y, p, dec = a["y"], a["p"], a["dec"]
    f = lambda m: w @ m.astype(np.float64)  # noqa: E731
    tp, fp, fn, tn = f(y & dec), f(~y & dec), f(y & ~dec), f(~y & ~dec)
    recall = _ratio(tp, tp + fn)
    fns = {"recall": lambda: recall,
           "specificity": lambda: _ratio(f(a["neg_spec"] & ~dec), f(a["neg_spec"])),
           "f1": lambda: _ratio(2 * tp, 2 * tp + fp + fn),
           "youden": lambda: recall + _ratio(tn, tn + fp) - 1.0,
           "auroc": lambda: weighted_auroc(y, p, w),
           "ece": lambda: weighted_ece(y.astype(np.float64), p, w, bins)}
    return {m: fns[m]() for m in metrics}


def paired_deltas(before: dict[str, np.ndarray], after: dict[str, np.ndarray],
                  weights: np.ndarray, metrics: Sequence[str], bins: int = 10
                  ) -> dict[str, np.ndarray]:
    """Bootstrap replicates of ``after - before`` per metric, both on the same resamples."""
    known = before["known"]
    out: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for s in range(0, weights.shape[0], _CHUNK):
        w = weights[s:s + _CHUNK][:, known]
        mb = weighted_class_metrics(before, w, bins, metrics)
        ma = weighted_class_metrics(after, w, bins, metrics)
        for m in metrics:
            out[m].append(ma[m] - mb[m])
    return {m: np.concatenate(v) if v else np.zeros(0) for m, v in out.items()}


def needed_metrics(kinds: Sequence[str], primary: str) -> tuple[str, ...]:
    """The metrics the verdicts of an attempt read (see :func:`helped_verdict`)."""
    need = {ISSUE_METRIC[primary][0], "auroc"} | {ISSUE_METRIC[k][0] for k in kinds}
    if set(kinds) <= FP_KINDS:
        need.add("recall")
    return tuple(sorted(need))


def _units(kinds: Sequence[str], primary: str, before: dict[str, float],
           after: dict[str, float], deltas: dict[str, np.ndarray],
           min_gain: Callable[[str], float], max_auroc_drop: float, max_recall_drop: float,
           count: dict[str, int]) -> tuple[list[UnitInput], list[UnitInput]]:
    """(improvement + guards, side effects) of one attempt."""
    def signed(metric: str) -> tuple[float, np.ndarray]:
        higher = metric != "ece"
        d, r = after[metric] - before[metric], deltas[metric]
        return (float(d), r) if higher else (float(-d), -r)

    p_metric = ISSUE_METRIC[primary][0]
    g = min_gain(primary)
    est, reps = signed(p_metric)
    main = [UnitInput(f"{p_metric} gain >= {g:g}", est - g, replicates=reps - g, margin=0.0,
                      kind="improvement", note=f"{primary}: held-out {p_metric} gain "
                      f"{est:+.4f} minus its minimal gain {g:g} (pass: the gain's lower bound "
                      f">= {g:g})", **count)]
    if p_metric != "auroc":
        e, r = signed("auroc")
        main.append(UnitInput("auroc not worse", e, replicates=r, margin=max_auroc_drop,
                              kind="guard", note=f"AUROC not lower by more than "
                              f"{max_auroc_drop:g}", **count))
    if set(kinds) <= FP_KINDS and np.isfinite(before["recall"]):
        e, r = signed("recall")
        main.append(UnitInput("recall not worse", e, replicates=r, margin=max_recall_drop,
                              kind="guard", note=f"recall not lower by more than "
                              f"{max_recall_drop:g}", **count))
    side: dict[str, tuple[float, str]] = {}
    for kd in kinds:
        m = ISSUE_METRIC[kd][0]
        if m != p_metric:
            mg = min_gain(kd)
            if m not in side or mg < side[m][0]:
                side[m] = (mg, f"{kd}: {m} not worse by more than {mg:g}")
    others = []
    for m, (mg, note) in side.items():
        e, r = signed(m)
        others.append(UnitInput(f"{m} not worse", e, replicates=r, margin=mg, kind="side effect",
                                note=note, **count))
    return main, others


def helped_verdict(kinds: Sequence[str], primary: str, before: dict[str, float],
                   after: dict[str, float], deltas: dict[str, np.ndarray],
                   min_gain: Callable[[str], float], *, max_auroc_drop: float,
                   max_recall_drop: float, n: int, n_boot: int, seed: int, level: float = 0.95,
                   min_pos: int = 10, min_neg: int = 10) -> dict[str, Any]:
    """The paired verdicts of one attempt (see the module docstring).

    Args:
        kinds: the class's open issues; ``primary``: the one the treatment is tried for.
        before, after: point metrics (:func:`~medscalpel.repair.triage.class_metrics`) on the
            selection images; ``deltas``: their paired bootstrap replicates (``after -
            before``) per metric (:func:`paired_deltas`).
        min_gain: the minimal gain of an issue kind.
        n: selection images.

    Returns:
        ``{"outcome", "status", "reason", "verdict" (Verdict), "side_effects" (Verdict or
        None)}``: the outcome is the verdict's, except that a side effect shown (fail) fails.
    """
    n_pos = int(before["n_pos"])
    n_neg = int(before["tp"] + before["fp"] + before["fn"] + before["tn"]) - n_pos
    main, others = _units(kinds, primary, before, after, deltas, min_gain, max_auroc_drop,
                          max_recall_drop, dict(n=n, n_pos=n_pos, n_neg=n_neg))
    kw = dict(margin=0.0, level=level, min_pos=min_pos, min_neg=min_neg,
              method=f"paired bootstrap, {n_boot} replicates (seed {seed}) of the selection "
                     "images", meta={"primary_issue": primary, "issues": list(kinds)})
    v = decide(main, metric="held-out change (after - before; ECE sign-flipped)", **kw)
    side = decide(others, metric="side effects on the other open issues (after - before)",
                  **kw) if others else None
    outcome, reason = v.outcome, v.reason
    shown = [u for u in (side.units if side else ()) if u.outcome == "fail"]
    if shown:
        outcome = "fail"
        reason = "side effect shown: " + "; ".join(f"{u.name}: {u.reason}" for u in shown) + \
            f" (treated issue: {v.outcome}: {v.reason})"
    elif side is not None and side.outcome != "pass":
        reason += f"; side effects {side.outcome} (recorded, not held against it)"
    return {"outcome": outcome, "status": {"pass": "helped", "fail": "no gain"}.get(
        outcome, "undecided"), "reason": reason, "verdict": v, "side_effects": side}


def helped_record(h: dict[str, Any]) -> dict[str, Any]:
    """What an attempt record stores of its verdicts (JSON-ready)."""
    return {"status": h["status"], "reason": h["reason"], "outcome": h["outcome"],
            "verdict": h["verdict"].to_dict(), "verdict_summary": h["verdict"].summary(),
            "side_effects": None if h["side_effects"] is None else h["side_effects"].to_dict()}


def evidence_text(rec: dict[str, Any]) -> str:
    """One short line of an attempt's evidence: the treated issue's gain with its interval (at
    its Holm level), the outcome, and any shown side effect; ``-`` without a verdict."""
    v = rec.get("verdict")
    if not isinstance(v, dict) or not v.get("units"):
        return "-"
    parts = []
    for u in v["units"]:
        shift = float(u["name"].rsplit(">=", 1)[1]) if u.get("kind") == "improvement" else 0.0
        lo, hi = u.get("ci_low"), u.get("ci_high")
        ci = (f" [{lo + shift:+.3f}, {hi + shift:+.3f}]" if isinstance(lo, float) and
              isinstance(hi, float) and np.isfinite(lo) and np.isfinite(hi) else "")
        what = u["name"].split(" ")[0] + (" gain" if u.get("kind") == "improvement" else " change")
        parts.append(f"{what} {u['estimate'] + shift:+.3f}{ci} {u['outcome']}")
    return f"{rec.get('outcome', v.get('outcome'))}: " + "; ".join(parts)
