"""Is a site's operating point restored? Site recalibration's "restored" as a verdict.

"Restored" means the recalibrated sensitivity AND specificity of a class on the rest of the new
site are within ``tolerance`` of the internal ones. That is an equivalence question on two
independent sets (the internal test images, the rest of the site), answered by two one-sided
tests per rate (TOST) through the one decision primitive
(:func:`medscalpel.engine.decision.decide`):

* per class four units, ``sensitivity >= internal - tol``, ``sensitivity <= internal + tol``,
  and the same for specificity; each is the difference of two independent proportions with the
  Agresti-Caffo standard error (one success and one failure added to each group, so a rate of 0
  or 1 still carries its uncertainty), a normal approximation;
* Holm across every unit of every recalibrated class; a class with fewer than ``min_pos``
  positive or ``min_neg`` negative images on either side is unscorable (undecided).

A class is **pass** (restored, shown) when its four units pass, **fail** (not restored, shown)
when any fails, **undecided** otherwise (the rest of the site is too small to tell; the verdict
estimates how many more images would likely decide). Example:

    >>> i = [{"name": "a", "sensitivity": .8, "specificity": .9, "n_pos": 2000, "n_neg": 8000}]
    >>> a = [{"name": "a", "sensitivity": .79, "specificity": .905, "n_pos": 2000, "n_neg": 8000}]
    >>> restored_verdict(i, a, ["a"], 0.05).outcome
    'pass'
    >>> a[0]["n_pos"] = 12
    >>> restored_verdict(i, a, ["a"], 0.05).outcome
    'undecided'
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from medscalpel.engine.decision import UnitInput, Verdict, decide

RATES = ("sensitivity", "specificity")
_COUNT = {"sensitivity": "n_pos", "specificity": "n_neg"}


def agresti_caffo_se(p1: float, n1: int, p2: float, n2: int) -> float:
    """Standard error of ``p2 - p1`` for two independent proportions, Agresti-Caffo adjusted
    (``(x + 1) / (n + 2)``); NaN when a group is empty."""
    if n1 <= 0 or n2 <= 0 or not (math.isfinite(p1) and math.isfinite(p2)):
        return float("nan")
    a1, a2 = (p1 * n1 + 1) / (n1 + 2), (p2 * n2 + 1) / (n2 + 2)
    return math.sqrt(a1 * (1 - a1) / (n1 + 2) + a2 * (1 - a2) / (n2 + 2))


def unit_name(c: str, rate: str, side: str, tolerance: float) -> str:
    """The name of one TOST unit, e.g. ``"c sensitivity >= internal - 0.05"``."""
    return (f"{c} {rate} >= internal - {tolerance:g}" if side == "lower" else
            f"{c} {rate} <= internal + {tolerance:g}")


def restored_verdict(internal: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]],
                     classes: Sequence[str], tolerance: float, *, level: float = 0.95,
                     min_pos: int = 10, min_neg: int = 10) -> Verdict:
    """The TOST verdict of "restored" over ``classes`` (see the module docstring); the rows are
    :func:`medscalpel.repair.shift.operating_point` rows (rate and ``n_pos`` / ``n_neg``)."""
    by_i = {r["name"]: r for r in internal}
    by_a = {r["name"]: r for r in after}
    units = []
    for c in classes:
        i, a = by_i[c], by_a[c]
        n_pos = min(int(i["n_pos"]), int(a["n_pos"]))
        n_neg = min(int(i["n_neg"]), int(a["n_neg"]))
        for rate in RATES:
            key = _COUNT[rate]
            d = float(a[rate]) - float(i[rate])
            se = agresti_caffo_se(float(i[rate]), int(i[key]), float(a[rate]), int(a[key]))
            n = int(a["n_pos"]) + int(a["n_neg"])
            for side, est in (("lower", d), ("upper", -d)):
                units.append(UnitInput(
                    unit_name(c, rate, side, tolerance), est, n=n, n_pos=n_pos,
                    n_neg=n_neg, se=se, kind=f"{rate} {side}", margin=tolerance,
                    note=f"{c}: {rate} after - internal = {d:+.4f} (the unit's estimate is "
                         f"{'its negative' if side == 'upper' else 'it'}); n_pos / n_neg = "
                         "the smaller of the two sets"))
    return decide(units, margin=tolerance,
                  metric="operating point after recalibration - internal (TOST)", level=level,
                  min_pos=min_pos, min_neg=min_neg,
                  method="two one-sided tests per rate, independent sets, Agresti-Caffo "
                         "normal approximation",
                  meta={"classes": list(classes), "tolerance": tolerance})


def _names(c: str, tolerance: float) -> set[str]:
    return {unit_name(c, r, s, tolerance) for r in RATES for s in ("lower", "upper")}


def class_outcomes(v: Verdict, classes: Sequence[str], tolerance: float) -> dict[str, str]:
    """Per class: ``pass`` when its four units pass, ``fail`` when one fails, ``undecided``
    otherwise (an unscorable unit included)."""
    out = {}
    for c in classes:
        names = _names(c, tolerance)
        us = [u.outcome for u in v.units if u.name in names]
        out[c] = ("fail" if "fail" in us else "pass" if us and all(o == "pass" for o in us)
                  else "undecided")
    return out


def more_images_of(v: Verdict, c: str, tolerance: float) -> int | None:
    """The largest 'more images would likely decide' estimate among class ``c``'s units."""
    names = _names(c, tolerance)
    more = [u.more_images for u in v.units if u.name in names and u.more_images is not None]
    return max(more) if more else None
