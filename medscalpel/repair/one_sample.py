"""One-sample verdicts against a fixed level (a certified recall, precision or set FNR), in the
vocabulary of :mod:`medscalpel.engine.decision`: pass, fail or undecided, per unit and overall.

:func:`medscalpel.engine.decision.decide` judges a paired DIFFERENCE from bootstrap replicates or
a normal standard error. A guarantee's re-check is a different question: does a rate measured on
new labelled images lie above (below) a FIXED level? With ``x`` successes of ``n`` trials (caught
positives of the positives for recall; true positives of the flagged images for precision) the
exact one-sided binomial test answers it without a normal approximation, which at a rate near
0.9 and tens of positives would be poor. So the units here are tested exactly and the outcome
is assembled into the same :class:`~medscalpel.engine.decision.Verdict` object (fields,
wording, Holm's step-down from :func:`~medscalpel.engine.decision.holm` over the units, both
families at the one-sided ``alpha = (1 - level) / 2``):

* ``p_pass = P(Binomial(n, T) >= x)``: evidence against "rate < T"; rejecting it at the
  unit's Holm level ``a`` is the same as the exact (Clopper-Pearson) lower bound with ``a`` in
  its tail lying above ``T``;
* ``p_fail = P(Binomial(n, T) <= x)``: evidence against "rate >= T" (upper bound below ``T``).

A mean of losses in ``[0, 1]`` (the multi-label set FNR: missed / true labels per image) has no
binomial count; it is tested with Hoeffding's inequality, ``p = exp(-2 n gap**2)``, and the
interval ``observed +- sqrt(log(1 / a) / (2 n))``. The unit's ``estimate`` is the signed distance
to the level, ``observed - T`` (``T - observed`` for an FNR ceiling), with margin 0, so that
``delta >= -margin`` reads as in every other verdict; the observed rate and its interval stay in
the unit's note and in the caller's rows.

How many labelled images a check needs (:func:`min_trials_to_pass`,
:func:`trials_for_power`): a pass is possible at all only when even a perfect result (every
positive caught) rejects at the first Holm step, ``T**n < alpha / m``; a pass is *likely* (80%
power) only with more, if the true rate stays where it was measured. Both are counts of trials
(positives for recall); converted to images by a prevalence they are estimates, labelled so.

Example:
    >>> v = decide_one_sample([RateUnit("x", successes=188, trials=200, level=0.9, n_images=900,
    ...                                 n_pos=200, n_neg=700)], level=0.9)
    >>> v.outcome, v.unit("x").outcome
    ('pass', 'pass')
    >>> min_trials_to_pass(0.9, 0.05)
    29
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import binom

from medscalpel.engine.decision import (NAN, POWER, UnitVerdict, Verdict, _verdict, holm,
                                        unit_outcome)
from medscalpel.errors import ConfigError
from medscalpel.validation import check_range

EXACT = "exact"          # binomial count: x successes of n trials
HOEFFDING = "hoeffding"  # mean of [0, 1] losses over n images
#: the largest trial count the planning search looks at
MAX_TRIALS = 200_000


def clopper_pearson(x: int, n: int, confidence: float) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval of a binomial proportion ``x / n``."""
    if n <= 0:
        return float("nan"), float("nan")
    a = 1.0 - confidence
    lo = 0.0 if x <= 0 else float(beta_dist.ppf(a / 2, x, n - x + 1))
    hi = 1.0 if x >= n else float(beta_dist.ppf(1 - a / 2, x + 1, n - x))
    return lo, hi


@dataclass(frozen=True)
class RateUnit:
    """One rate to check against its level (given to :func:`decide_one_sample`, not stored).

    Attributes:
        name: the unit (a class, ``all classes`` for the set FNR).
        level: the certified level ``T``.
        successes, trials: the binomial count (``EXACT``); ``trials`` is the number of images
            for ``HOEFFDING``.
        observed: the rate (default ``successes / trials``; required for ``HOEFFDING``).
        higher_is_better: ``True`` for a recall / precision floor, ``False`` for an FNR ceiling.
        bound: ``EXACT`` or ``HOEFFDING``.
        n_images, n_pos, n_neg: the labelled images of the unit and their positives / negatives.
        rate: what the rate is (``recall``, ``precision``, ``set FNR``) for the wording.
        unscorable: why the unit cannot be tested at all ("" when it can), e.g. not certified.
    """

    name: str
    level: float
    successes: int | None = None
    trials: int = 0
    observed: float | None = None
    higher_is_better: bool = True
    bound: str = EXACT
    n_images: int = 0
    n_pos: int | None = None
    n_neg: int | None = None
    rate: str = "recall"
    unscorable: str = ""

    @property
    def value(self) -> float:
        if self.observed is not None:
            return float(self.observed)
        return self.successes / self.trials if self.trials else NAN


# ----------------------------------------------------------------------------- tests
def p_values(u: RateUnit) -> tuple[float, float]:
    """``(p_pass, p_fail)``: evidence against "the guarantee fails" and against "it holds"."""
    n, t = u.trials, u.level
    if u.bound == EXACT:
        x = int(u.successes)
        if u.higher_is_better:  # rate >= T
            return float(binom.sf(x - 1, n, t)), float(binom.cdf(x, n, t))
        return float(binom.cdf(x, n, t)), float(binom.sf(x - 1, n, t))
    gap = (u.value - t) if u.higher_is_better else (t - u.value)  # > 0: on the good side
    good, bad = math.exp(-2 * n * max(gap, 0.0) ** 2), math.exp(-2 * n * max(-gap, 0.0) ** 2)
    return (good if gap > 0 else 1.0), (bad if gap < 0 else 1.0)


def rate_interval(u: RateUnit, tail: float) -> tuple[float, float]:
    """Interval of the RATE with ``tail`` in each tail (exact Clopper-Pearson or Hoeffding)."""
    if not (math.isfinite(tail) and 0 < tail < 0.5) or u.trials <= 0:
        return NAN, NAN
    if u.bound == EXACT:
        return clopper_pearson(int(u.successes), u.trials, 1.0 - 2.0 * tail)
    half = math.sqrt(math.log(1.0 / tail) / (2.0 * u.trials))
    return max(u.value - half, 0.0), min(u.value + half, 1.0)


def min_trials_to_pass(level: float, tail: float, bound: str = EXACT,
                       higher_is_better: bool = True) -> int:
    """The fewest trials with which a PERFECT result (every positive caught; for a ceiling,
    nothing missed) passes a one-sided test at ``tail``: ``level**n < tail`` for a binomial
    floor, ``sqrt(log(1/tail) / (2n)) < level`` for a Hoeffding ceiling.

    >>> min_trials_to_pass(0.9, 0.05), min_trials_to_pass(0.1, 0.05, HOEFFDING, False)
    (29, 150)
    """
    check_range(tail, "tail", "min_trials_to_pass", 0.0, 1.0, low_inclusive=False,
                high_inclusive=False)
    if bound == EXACT and higher_is_better:
        return int(math.floor(math.log(tail) / math.log(level))) + 1
    if bound == HOEFFDING and not higher_is_better:
        return int(math.floor(math.log(1.0 / tail) / (2.0 * level ** 2))) + 1
    raise ConfigError(f"min_trials_to_pass: no rule for bound={bound!r}, "
                      f"higher_is_better={higher_is_better}.")


def trials_for_power(level: float, rate: float, tail: float, power: float = POWER,
                     max_trials: int = MAX_TRIALS) -> int | None:
    """The fewest binomial trials with which the exact one-sided test at ``tail`` decides
    (pass when ``rate > level``, fail when ``rate < level``) with probability ``>= power`` if
    the true rate is ``rate``; ``None`` when ``rate == level`` or more than ``max_trials`` would
    be needed. An estimate: it assumes the rate stays as given."""
    if not (math.isfinite(rate) and 0 <= rate <= 1) or rate == level:
        return None
    lo = 1
    for hi in (1024, 16384, max_trials):  # most answers are small: search in growing blocks
        hi = min(hi, max_trials)
        if lo > hi:
            break
        n = np.arange(lo, hi + 1)
        pw = _power(n, level, rate, tail)
        ok = np.flatnonzero(pw >= power)
        if ok.size:
            return int(n[ok[0]])
        lo = hi + 1
    return None


def _power(n: np.ndarray, level: float, rate: float, tail: float) -> np.ndarray:
    """Chance that the exact one-sided test at ``tail`` with ``n`` trials decides (pass when
    ``rate > level``, fail when below) if the true rate is ``rate``."""
    if rate > level:  # smallest x with P_T(X >= x) < tail, then P_rate(X >= x)
        x = np.floor(binom.isf(tail, n, level)).astype(np.int64) + 1
        x = np.where(binom.sf(x - 1, n, level) >= tail, x + 1, x)
        return binom.sf(x - 1, n, rate)
    # largest x with P_T(X <= x) < tail, then P_rate(X <= x)
    x = np.ceil(binom.ppf(tail, n, level)).astype(np.int64) - 1
    x = np.where(binom.cdf(x, n, level) >= tail, x - 1, x)
    return np.where(x >= 0, binom.cdf(x, n, rate), 0.0)


# ----------------------------------------------------------------------------- verdict
def decide_one_sample(units: Sequence[RateUnit], *, level: float = 0.9, metric: str = "recall",
                      accepted_unscorable: Sequence[str] | bool = (), method: str = "",
                      meta: dict[str, Any] | None = None) -> Verdict:
    """Pass / fail / undecided of each rate against its level, Holm over the tested units (both
    families at one-sided ``alpha = (1 - level) / 2``), as a :class:`Verdict`.

    A unit with ``unscorable`` set or no trials is named unscorable and, unless accepted, leaves
    the verdict undecided (as in :func:`~medscalpel.engine.decision.decide`).
    """
    check_range(level, "level", "decide_one_sample", 0.5, 1.0, low_inclusive=False,
                high_inclusive=False)
    names = [u.name for u in units]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"The 'units' parameter of decide_one_sample must hold units with "
                          f"unique names. Got {names} instead.")
    for u in units:
        if u.bound not in (EXACT, HOEFFDING):
            raise ConfigError(f"decide_one_sample: unit '{u.name}' has bound {u.bound!r}; use "
                              f"'{EXACT}' or '{HOEFFDING}'.")
    accepted = (tuple(names) if accepted_unscorable is True else
                tuple(a for a in (accepted_unscorable or ()) if a in names))
    alpha = (1.0 - level) / 2.0
    why = [u.unscorable or ("no trials to check on" if u.trials <= 0 else "") for u in units]
    tested = [i for i, w in enumerate(why) if not w]
    pv = {i: p_values(units[i]) for i in tested}
    ok_pass, lv_pass = holm([pv[i][0] for i in tested], alpha)
    ok_fail, lv_fail = holm([pv[i][1] for i in tested], alpha)
    at = {i: t for t, i in enumerate(tested)}
    out = []
    for i, u in enumerate(units):
        base = dict(name=u.name, kind="class" if u.name != "all classes" else "set",
                    margin=0.0, n=int(u.n_images), n_pos=u.n_pos, n_neg=u.n_neg,
                    n_replicates=None, n_nan_replicates=None)
        if i not in at:
            out.append(UnitVerdict(outcome="unscorable", estimate=_signed(u), ci_low=NAN,
                                   ci_high=NAN, level_adj=NAN, se=NAN, p_pass=NAN, p_fail=NAN,
                                   more_images=None, reason=f"not tested: {why[i]}",
                                   note=_note(u, (NAN, NAN)), **base))
            continue
        t = at[i]
        out.append(_unit(u, base, pv[i], bool(ok_pass[t]), bool(ok_fail[t]),
                         float(lv_pass[t]), float(lv_fail[t])))
    return _verdict(out, accepted, metric=metric, margin=0.0, level=level, alpha=alpha,
                    correction="holm", n_tests=len(tested), min_pos=1, min_neg=0,
                    n=max(int(u.n_images) for u in units),
                    method=method or "exact one-sample binomial test (Clopper-Pearson)",
                    direction="one-sample: observed rate - certified level >= 0 (for a "
                              "ceiling such as the set FNR: level - observed >= 0)",
                    meta=meta or {})


def _signed(u: RateUnit) -> float:
    v = u.value
    return (v - u.level) if u.higher_is_better else (u.level - v)


def _note(u: RateUnit, ci: tuple[float, float]) -> str:
    if not math.isfinite(u.value):
        return f"{u.rate}: nothing to measure vs level {u.level:.2f}"
    of = f"{u.successes}/{u.trials}" if u.bound == EXACT else f"{u.trials} images"
    ci_txt = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if math.isfinite(ci[0]) else ""
    op = ">=" if u.higher_is_better else "<="
    return f"{u.rate} {u.value:.4f}{ci_txt} ({of}) vs {op} {u.level:.2f}"


def _unit(u: RateUnit, base: dict[str, Any], p: tuple[float, float], passed: bool,
          failed: bool, lv_pass: float, lv_fail: float) -> UnitVerdict:
    outcome, lvl = unit_outcome(passed, failed, lv_pass, lv_fail)
    rlo, rhi = rate_interval(u, lvl)
    lo, hi = ((rlo - u.level, rhi - u.level) if u.higher_is_better
              else (u.level - rhi, u.level - rlo))
    ci = f"[{lo:+.4f}, {hi:+.4f}] at {lvl:.3g} per tail"
    est = _signed(u)
    se = math.sqrt(max(u.value * (1 - u.value), 0.0) / u.trials)
    more = None
    if outcome == "pass":
        reason = f"lower bound {lo:+.4f} > 0 ({ci})"
    elif outcome == "fail":
        reason = f"upper bound {hi:+.4f} < 0: the guarantee is shown broken ({ci})"
    else:
        heading = lv_pass if est >= 0 else lv_fail
        need = _more_trials(u, heading)
        if need is not None:
            more = int(math.ceil(need * u.n_images / u.trials))
        lean = ("point estimate below the level, interval straddles it: a failure is likely "
                "but not shown" if est < 0 else "interval straddles the level")
        more_txt = (f"; ~{more} more images would likely decide (estimate, at this "
                    "prevalence)" if more is not None else "")
        reason = f"{lean} ({ci}){more_txt}"
        if u.bound == EXACT and u.higher_is_better:
            k = min_trials_to_pass(u.level, heading)
            if u.trials < k:
                reason += (f"; a pass needs at least {k} {_trial_word(u)} even with none "
                           "missed")
    return UnitVerdict(outcome=outcome, estimate=est, ci_low=lo, ci_high=hi, level_adj=lvl,
                       se=se, p_pass=p[0], p_fail=p[1], more_images=more, reason=reason,
                       note=_note(u, (rlo, rhi)), **base)


def _trial_word(u: RateUnit) -> str:
    return {"recall": "positives", "precision": "flagged images"}.get(u.rate, "images")


def _more_trials(u: RateUnit, tail: float) -> int | None:
    """Extra trials that would likely decide an undecided unit (an estimate)."""
    if u.bound == EXACT:
        need = trials_for_power(u.level, u.value, tail)
    else:
        gap = abs(u.value - u.level)
        need = (int(math.ceil(math.log(1.0 / tail) / (2.0 * gap ** 2))) if gap > 0 else None)
    return None if need is None else max(need - u.trials, 0)


__all__ = ["EXACT", "HOEFFDING", "RateUnit", "clopper_pearson", "decide_one_sample",
           "min_trials_to_pass", "p_values", "rate_interval", "trials_for_power"]
