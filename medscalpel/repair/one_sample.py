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

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.special import ndtri
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
    be needed. An estimate: it assumes the rate stays as given.

    Exact (the first ``n`` of the saw-toothed power curve, no normal approximation) without
    evaluating every ``n``. The test's critical count of misses moves in steps; between two
    steps (a "run") the power moves one way only, so each run has one candidate ``n``
    (:func:`_run_hits`). Runs are visited in blocks; a block whose upper bound on the power
    (:func:`_block_bounds`) stays below ``power`` is skipped whole. Results are cached.

    >>> trials_for_power(0.9, 0.97, 0.05), trials_for_power(0.9, 0.85, 0.05)
    (76, 270)
    """
    if not (math.isfinite(rate) and 0 <= rate <= 1) or rate == level:
        return None
    return _trials_for_power(float(level), float(rate), float(tail), float(power),
                             int(max_trials))


@functools.lru_cache(maxsize=4096)
def _trials_for_power(level: float, rate: float, tail: float, power: float,
                      max_trials: int) -> int | None:
    passing = rate > level
    first, last = (0, _allowed_misses(level, tail, max_trials)) if passing else (
        1, _needed_misses(level, tail, max_trials))
    if last < first:
        return None
    knots = _knots(first, last + 1)
    done, chunk, width = 0, 64, 256
    while done < knots.size - 1:  # blocks in order, bounded a chunk at a time
        edges = knots[done:min(done + chunk, knots.size - 1) + 1]
        hot = np.flatnonzero(_block_bounds(edges, passing, level, rate, tail, max_trials)
                             >= power)
        i = 0
        while i < hot.size:  # contiguous hot blocks, evaluated together, ~width runs a time
            j = i
            while (j + 1 < hot.size and hot[j + 1] == hot[j] + 1
                   and edges[hot[j + 1] + 1] - edges[hot[i]] <= width):
                j += 1
            found = _run_hits(int(edges[hot[i]]), int(edges[hot[j] + 1]), passing, level,
                              rate, tail, power, max_trials)
            if found is not None:
                return found
            i, width = j + 1, width * 2
        done, chunk = done + edges.size - 1, chunk * 4
    return None


def _knots(first: int, stop: int) -> np.ndarray:
    """Block edges over the runs ``[first, stop)``: every run up to 256, then blocks of about
    an eighth of a standard deviation of the miss count (``sqrt(k) / 8``, at least 8)."""
    edges = _all_knots(max(stop, 256))
    return np.r_[first, edges[(edges > first) & (edges < stop)], stop].astype(np.int64)


@functools.lru_cache(maxsize=8)
def _all_knots(stop: int) -> np.ndarray:
    out = list(range(257))
    k = 256
    while k < stop:
        k += max(8, math.isqrt(k) // 8)
        out.append(k)
    return np.asarray(out, np.int64)


def _approx_n(m: np.ndarray, y: float, q: float) -> np.ndarray:
    """A guess of the real ``n`` where ``P(Binomial(n, q) <= m) = y``: the normal quantile with
    continuity and skewness (Cornish-Fisher) corrections, ``m + 1/2 - (z**2 - 1)(1 - 2q)/6 =
    nq + z sqrt(nq(1-q))``, solved for ``sqrt(n)``. Exact answers start from it
    (:func:`_first_true`)."""
    z, sd = float(ndtri(y)), math.sqrt(q * (1.0 - q))
    k = np.asarray(m, float) + 0.5 - (z * z - 1.0) * (1.0 - 2.0 * q) / 6.0
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (-z * sd + np.sqrt(z * z * sd * sd + 4.0 * q * k)) / (2.0 * q)
    return s * s


def _allowed_misses(level: float, tail: float, n: int) -> int:
    """The misses the pass test allows with ``n`` trials (-1: even none passes): ``n - x`` for
    the smallest ``x`` with ``P_level(X >= x) < tail``."""
    ns = np.array([n], np.int64)
    x = _first_true(lambda x, r: binom.sf(x - 1, ns[r], level) < tail,
                    np.floor(binom.isf(tail, ns, level)) + 1, np.zeros(1, np.int64), n + 1)
    return int(n - x[0])


def _needed_misses(level: float, tail: float, n: int) -> int:
    """The misses the fail test needs with ``n`` trials (``n + 1``: no count fails): ``n - x``
    for the largest ``x`` with ``P_level(X <= x) < tail``."""
    ns = np.array([n], np.int64)
    x = _first_true(lambda x, r: binom.cdf(x, ns[r], level) >= tail, binom.ppf(tail, ns, level),
                    np.zeros(1, np.int64), n) - 1
    return int(n - x[0])


def _first_true(pred, guess: np.ndarray, lo: np.ndarray, hi: int) -> np.ndarray:
    """Per element, the smallest integer ``n`` in ``[lo, hi]`` with ``pred(n, rows)`` true
    (``hi + 1`` when there is none), for a ``pred`` monotone in ``n`` (False ... True);
    ``rows`` selects the elements ``n`` belongs to. ``guess`` need not be right (NaN allowed):
    bracket around it with doubling steps, then bisect; each step evaluates ``pred`` once,
    vectorised over the elements still unsettled."""
    guess = np.asarray(guess, float)
    lo = np.broadcast_to(np.asarray(lo, np.int64), guess.shape)
    out = np.full(guess.shape, hi + 1, np.int64)
    idx = np.flatnonzero(pred(np.full(guess.shape, hi, np.int64), slice(None)))
    low = lo[idx]
    g = guess[idx]
    g = np.clip(np.where(np.isfinite(g), np.ceil(np.nan_to_num(g)), low), low, hi)
    g = g.astype(np.int64)
    t = pred(g, idx)
    a, b = np.where(t, g - 1, g), g.copy()  # pred(a) false (or a < lo); pred(b) true if t
    rows, step = np.flatnonzero(~t), 1
    while rows.size:  # gallop up from a false guess
        b[rows] = np.minimum(a[rows] + step, hi)
        hit = pred(b[rows], idx[rows])
        a[rows[~hit]] = b[rows[~hit]]
        rows, step = rows[~hit], step * 2
    rows, step = np.flatnonzero(t & (a >= low)), 1
    while rows.size:  # gallop down from a true guess
        hit = pred(a[rows], idx[rows])
        rows = rows[hit]
        b[rows] = a[rows]
        a[rows] = np.maximum(a[rows] - step, low[rows] - 1)
        rows, step = rows[a[rows] >= low[rows]], step * 2
    rows = np.flatnonzero(b - a > 1)
    while rows.size:  # bisect
        mid = (a[rows] + b[rows]) // 2
        hit = pred(mid, idx[rows])
        b[rows[hit]], a[rows[~hit]] = mid[hit], mid[~hit]
        rows = rows[b[rows] - a[rows] > 1]
    out[idx] = b
    return out


def _pass_starts(m: np.ndarray, level: float, tail: float, cap: int) -> np.ndarray:
    """``n_m``: the first ``n`` whose pass test allows ``m`` misses, i.e. with
    ``P_level(X >= n - m) < tail`` (``cap + 1`` beyond ``cap``)."""
    return _first_true(lambda n, r: binom.sf(n - m[r] - 1, n, level) < tail,
                       _approx_n(m, tail, 1.0 - level), m + 1, cap)


def _fail_ends(c: np.ndarray, level: float, tail: float, cap: int) -> np.ndarray:
    """``N_c``: the first ``n`` whose fail test needs more than ``c`` misses, i.e. with
    ``P_level(X <= n - c) >= tail`` (``cap + 1`` beyond ``cap``)."""
    return _first_true(lambda n, r: binom.cdf(n - c[r], n, level) >= tail,
                       _approx_n(c - 1, 1.0 - tail, 1.0 - level), np.maximum(c, 1), cap)


def _run_hits(k1: int, k2: int, passing: bool, level: float, rate: float, tail: float,
              power: float, max_trials: int) -> int | None:
    """The first ``n`` with power ``>= power`` in the runs ``[k1, k2)``, or None.

    Pass side (``rate > level``): with ``n`` trials ``m(n)`` misses are allowed, non-decreasing
    in ``n``; run ``m`` is ``[n_m, n_{m+1})``. Within it the power ``P_rate(X >= n - m)``
    FALLS as ``n`` grows, so its candidate is ``n_m`` (empty runs skipped).

    Fail side (``rate < level``): with ``n`` trials ``c(n)`` misses or more fail the unit,
    non-decreasing in ``n``; run ``c`` is ``[N_{c-1}, N_c)`` (``N_0 = 1``: every test needs a
    miss). Within it the power ``P_rate(X <= n - c)`` RISES with ``n``, first reaching
    ``power`` at ``M_c``: its candidate is ``max(N_{c-1}, M_c)`` if that is still in the run.
    """
    cap = max_trials + 1
    if passing:
        m = np.arange(k1, k2 + 1, dtype=np.int64)  # the last one closes the last run
        n_m = _pass_starts(m, level, tail, cap)
        start, m = n_m[:-1], m[:-1]
        ok = (n_m[1:] > start) & (start <= max_trials)
        ok &= binom.sf(start - m - 1, start, rate) >= power
        hit = np.flatnonzero(ok)
        return int(start[hit[0]]) if hit.size else None
    c = np.arange(k1 - 1, k2, dtype=np.int64)  # the first one opens the first run
    big_n = _fail_ends(c, level, tail, cap)
    start, end, c = big_n[:-1], big_n[1:], c[1:]
    m_c = _first_true(lambda n, r: binom.cdf(n - c[r], n, rate) >= power,
                      _approx_n(c - 1, 1.0 - power, 1.0 - rate), np.maximum(c, 1), cap)
    cand = np.maximum(start, m_c)
    hit = np.flatnonzero((cand < end) & (cand <= max_trials))
    return int(cand[hit[0]]) if hit.size else None


def _block_bounds(knots: np.ndarray, passing: bool, level: float, rate: float, tail: float,
                  max_trials: int) -> np.ndarray:
    """Per block of runs ``[a, b)`` (consecutive knots): an upper bound on the power at every
    ``n`` of its runs. Pass side: ``n >= n_a`` and at most ``b - 1`` misses allowed, so
    ``P_rate(X >= n_a - (b - 1))``. Fail side: ``n < N_{b-1}`` and at least ``a`` misses
    needed, so ``P_rate(X <= n - a)`` at the largest such ``n`` (the power rises with ``n`` at a
    fixed count). A block of one run gets its candidate's exact power (pass side)."""
    a, b = knots[:-1], knots[1:]
    cap = max_trials + 1
    if passing:
        n = _pass_starts(a, level, tail, cap)
        return np.where(n <= max_trials, binom.sf(n - b, n, rate), 0.0)
    n = np.minimum(_fail_ends(b - 1, level, tail, cap) - 1, max_trials)
    return np.where(n >= 1, binom.cdf(n - a, n, rate), 0.0)


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
