"""Acceptance of a distilled student: parameter ratio, speed and AUROC, each a verdict.

The AUROC target is a paired non-inferiority :class:`~medscalpel.engine.decision.Verdict`
(teacher vs student on the same test images, per class and macro, Holm, minimum evidence); the
speed target is judged on the per-round latency ratios of one alternated run; the parameter
ratio is an exact count. :func:`acceptance` combines them into one pass / fail / undecided.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medscalpel.engine.compare import compare_predictions
from medscalpel.engine.decision import Verdict
from medscalpel.engine.predictions import Predictions

#: targets of point 6 of the issue; the AUROC drop is a non-inferiority margin per class and
#: for the macro mean (see :func:`acceptance`)
TARGETS = {"max_param_ratio": 0.1, "min_speedup": 5.0, "max_auroc_drop": 0.01}


#: fewest timing rounds from which a speed target is judged (fewer: undecided)
MIN_SPEED_ROUNDS = 3


def speed_verdict(teacher_ms: Sequence[float], student_ms: Sequence[float],
                  min_speedup: float) -> dict[str, Any]:
    """Is the student at least ``min_speedup`` times faster? Judged on the per-round ratios
    teacher / student of one alternated run: **pass** when every round's ratio reaches the
    target, **fail** when none does, **undecided** when the rounds disagree (a noisy run decides
    nothing) or fewer than :data:`MIN_SPEED_ROUNDS` rounds were timed.

    >>> speed_verdict([10, 11, 10], [1, 1, 4], 5.0)["outcome"]
    'undecided'
    >>> speed_verdict([10, 11, 10], [1, 1, 1.5], 5.0)["outcome"]
    'pass'
    """
    ratios = [float(t / s) if s > 0 else float("nan") for t, s in zip(teacher_ms, student_ms)]
    finite = [r for r in ratios if np.isfinite(r)]
    rule = (f"every per-round ratio >= {min_speedup:g} (pass) / every one below (fail), "
            f">= {MIN_SPEED_ROUNDS} rounds")
    out: dict[str, Any] = {"ratios": ratios, "rounds": len(ratios), "target": min_speedup,
                           "median": float(np.median(finite)) if finite else float("nan"),
                           "min": min(finite) if finite else float("nan"),
                           "max": max(finite) if finite else float("nan"), "rule": rule}
    if len(finite) < MIN_SPEED_ROUNDS:
        out.update(outcome="undecided", reason=f"{len(finite)} timed round(s) < "
                   f"{MIN_SPEED_ROUNDS}: the spread between rounds cannot be judged")
    elif min(finite) >= min_speedup:
        out.update(outcome="pass", reason=f"every one of {len(finite)} rounds >= x{min_speedup:g}"
                   f" (x{min(finite):.2f} .. x{max(finite):.2f})")
    elif max(finite) < min_speedup:
        out.update(outcome="fail", reason=f"every one of {len(finite)} rounds < x{min_speedup:g}"
                   f" (x{min(finite):.2f} .. x{max(finite):.2f})")
    else:
        out.update(outcome="undecided", reason=f"the rounds straddle x{min_speedup:g} "
                   f"(x{min(finite):.2f} .. x{max(finite):.2f}): a noisy run decides nothing")
    return out


def auroc_verdict(t_preds: Predictions, s_preds: Predictions, n_boot: int, seed: int) -> Verdict:
    """Non-inferiority of the student's AUROC to the teacher's on the same test images: every
    class and the macro mean ``delta >= -max_auroc_drop`` shown by the paired interval (Holm;
    >= 10 positive and negative images per class; paired bootstrap, or paired DeLong when
    ``n_boot`` is 0)."""
    cmp = compare_predictions(t_preds, s_preds, n_boot=n_boot, seed=seed,
                              boot_metrics=("auroc",))
    return cmp.verdict(margin=TARGETS["max_auroc_drop"], metric="auroc",
                       method="bootstrap" if n_boot else "delong")


def acceptance(student: dict[str, Any], teacher_rounds_ms: Sequence[float],
               student_rounds_ms: Sequence[float], auroc: Verdict,
               targets: dict[str, float] | None = None) -> dict[str, Any]:
    """Is the distilled student accepted? Three checks, one outcome.

    * ``param_ratio``: student / teacher parameters <= ``max_param_ratio`` (an exact count:
      pass or fail);
    * ``speed``: :func:`speed_verdict` on the per-round latency ratios;
    * ``auroc``: the paired non-inferiority :class:`~medscalpel.engine.decision.Verdict` (the
      point estimate of the drop decides nothing).

    The outcome is **fail** when any check fails, **pass** when all pass, else **undecided**.
    """
    tg = dict(TARGETS if targets is None else targets)
    ratio = float(student["param_ratio"])
    p_ok = ratio <= tg["max_param_ratio"]
    param = {"outcome": "pass" if p_ok else "fail", "value": ratio,
             "reason": f"{ratio:.4f} of the teacher's parameters "
                       f"{'<=' if p_ok else '>'} {tg['max_param_ratio']:g} (exact count)"}
    speed = speed_verdict(teacher_rounds_ms, student_rounds_ms, tg["min_speedup"])
    checks = {"param_ratio": param["outcome"], "speed": speed["outcome"],
              "auroc": auroc.outcome}
    outs = set(checks.values())
    outcome = "fail" if "fail" in outs else ("pass" if outs == {"pass"} else "undecided")
    reason = "; ".join(f"{k} {v}" for k, v in checks.items())
    return {**tg, "param_ratio_met": bool(p_ok), "param_ratio": param, "speed": speed,
            "auroc": auroc.to_dict(), "auroc_summary": auroc.summary(), "checks": checks,
            "outcome": outcome, "reason": reason}


__all__ = ["MIN_SPEED_ROUNDS", "TARGETS", "acceptance", "auroc_verdict", "speed_verdict"]
