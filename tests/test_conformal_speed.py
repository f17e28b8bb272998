"""The fast planning numbers of a re-certification are IDENTICAL to the brute-force ones.

:func:`medscalpel.repair.one_sample.trials_for_power` used to evaluate the exact power at every
trial count up to 200,000 (about 1 s a call near the level, 3-5 s per ``recertify`` of 14
classes); it now visits only the counts where the power can rise and skips blocks whose bound
stays below the goal. The old brute force is kept HERE only, as the reference: the answers
must agree exactly on a grid of levels, rates, tails, powers and caps, near the level
included, and ``recertify`` must return the same result with either.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binom

from medscalpel.engine.predictions import Predictions
from medscalpel.repair import one_sample
from medscalpel.repair.conformal import calibrate_guarantee, recertification_plan, recertify
from medscalpel.repair.one_sample import _first_true, _trials_for_power, trials_for_power


# ----------------------------------------------------------------------------- reference
def _reference_power(n: np.ndarray, level: float, rate: float, tail: float) -> np.ndarray:
    """The exact power of the one-sided test at every ``n`` (the former implementation)."""
    if rate > level:  # smallest x with P_T(X >= x) < tail, then P_rate(X >= x)
        x = np.floor(binom.isf(tail, n, level)).astype(np.int64) + 1
        x = np.where(binom.sf(x - 1, n, level) >= tail, x + 1, x)
        return binom.sf(x - 1, n, rate)
    x = np.ceil(binom.ppf(tail, n, level)).astype(np.int64) - 1
    x = np.where(binom.cdf(x, n, level) >= tail, x - 1, x)
    return np.where(x >= 0, binom.cdf(x, n, rate), 0.0)


def reference_trials_for_power(level: float, rate: float, tail: float, power: float = 0.8,
                               max_trials: int = one_sample.MAX_TRIALS) -> int | None:
    """Brute force: the first ``n`` in 1..max_trials whose power reaches ``power``."""
    if not (math.isfinite(rate) and 0 <= rate <= 1) or rate == level:
        return None
    lo = 1
    for hi in (1024, 16384, max_trials):
        hi = min(hi, max_trials)
        if lo > hi:
            break
        n = np.arange(lo, hi + 1)
        ok = np.flatnonzero(_reference_power(n, level, rate, tail) >= power)
        if ok.size:
            return int(n[ok[0]])
        lo = hi + 1
    return None


def _fresh(*args, **kw):
    _trials_for_power.cache_clear()
    return trials_for_power(*args, **kw)


# ----------------------------------------------------------------------------- identity
def test_trials_for_power_equals_brute_force_on_a_grid():
    levels = (0.5, 0.8, 0.9, 0.95, 0.99)
    deltas = (-0.1, -0.03, -0.01, -0.003, 0.003, 0.01, 0.03, 0.1)
    checked = decided = 0
    for level, d, tail, power in itertools.product(levels, deltas, (0.05, 0.0036, 0.3),
                                                   (0.5, 0.8, 0.95)):
        rate = level + d
        if not 0.0 <= rate <= 1.0:
            continue
        want = reference_trials_for_power(level, rate, tail, power, max_trials=4000)
        got = _fresh(level, rate, tail, power, max_trials=4000)
        assert got == want, (level, rate, tail, power)
        checked += 1
        decided += want is not None
    assert checked >= 300 and 0 < decided < checked  # both answers and "None" are covered


def test_trials_for_power_equals_brute_force_at_random_and_at_the_edges():
    rng = np.random.default_rng(0)
    for _ in range(60):
        level = float(rng.uniform(0.55, 0.995))
        rate = float(np.clip(level + rng.normal(0, 0.04), 0, 1))
        tail, power = float(10 ** rng.uniform(-3, -0.5)), float(rng.uniform(0.3, 0.97))
        cap = int(rng.integers(50, 3000))
        assert _fresh(level, rate, tail, power, cap) == reference_trials_for_power(
            level, rate, tail, power, cap), (level, rate, tail, power, cap)
    # perfect and hopeless rates, a cap below the first possible pass, the level itself
    for args in ((0.9, 1.0, 0.05), (0.9, 0.0, 0.05), (0.9, 1.0, 0.05, 0.8, 20),
                 (0.9, 0.97, 0.05, 0.8, 1), (0.9, 0.9, 0.05), (0.9, float("nan"), 0.05)):
        assert _fresh(*args) == reference_trials_for_power(*args), args


@pytest.mark.parametrize("level, rate, tail, want", [
    (0.9, 0.905, 0.05, 21832),       # a pass, far out
    (0.9, 0.895, 0.05 / 14, 45750),  # a fail at a Holm level, far out
    (0.9, 0.899, 0.05, None),        # beyond the 200,000-trial cap
])
def test_near_the_level_with_the_default_cap(level, rate, tail, want):
    assert reference_trials_for_power(level, rate, tail) == want
    assert _fresh(level, rate, tail) == want


def test_first_true_is_the_brute_force_first_index():
    rng = np.random.default_rng(1)
    cut = rng.integers(0, 400, 200)  # pred(n) is n >= cut: answer max(cut, lo) (or hi + 1)
    lo = rng.integers(0, 300, 200)
    guess = np.where(rng.random(200) < 0.2, np.nan, rng.normal(cut, 60))
    got = _first_true(lambda n, r: n >= cut[r], guess, lo, 350)
    want = np.array([next((n for n in range(lo_i, 351) if n >= c), 351)
                     for c, lo_i in zip(cut, lo)])
    assert np.array_equal(got, want)


# ----------------------------------------------------------------------------- recertify
def _near_level_case():
    """14 classes whose new-data recall sits near the certified 0.9 (the slow case)."""
    rng = np.random.default_rng(3)
    k, n = 14, 3000
    y = (rng.random((2 * n, k)) < 0.3).astype(np.float32)
    z = (1.5 * y + rng.normal(size=(2 * n, k))).astype(np.float32)
    names = tuple(f"c{j}" for j in range(k))

    def preds(rows, split):
        return Predictions(z[rows], y[rows], ids=tuple(f"{split}{i}" for i in rows),
                           class_names=names, task="multilabel", split=split, model_id="m")

    g = calibrate_guarantee(preds(np.arange(n), "cal"), "recall>=0.9", 0.1)
    return g, preds(np.arange(n, 2 * n), "new")


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_recertify_and_plan_are_identical_with_the_brute_force(monkeypatch):
    g, new = _near_level_case()
    _trials_for_power.cache_clear()
    fast, plan = recertify(g, new).to_dict(), recertification_plan(g)
    undecided = [r for r in fast["rows"] if r["outcome"] == "undecided"]
    assert undecided and any(r["more_images"] for r in undecided)  # the planning path ran
    assert all(v["k_likely"] for v in plan["rows"].values())
    calls = []

    def counted(*args, **kw):
        calls.append(args)
        return reference_trials_for_power(*args, **kw)

    # recertify's Verdict and recertification_plan both look the search up on one_sample
    monkeypatch.setattr(one_sample, "trials_for_power", counted)
    assert _same(recertify(g, new).to_dict(), fast)
    n_recertify = len(calls)
    assert _same(recertification_plan(g), plan)
    assert n_recertify and len(calls) > n_recertify  # the reference really answered both
