"""The exchangeable expectation of the test-half share (issue V / issue 29): the law of the
number of test positives below the library's recall threshold, checked against brute-force
enumeration of every calibration / test assignment and against simulation through
``calibrate_guarantee`` itself (its order statistic and its float32 threshold rule)."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import nhypergeom

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.repair.conformal import (calibrate_guarantee, compare_test_share,
                                         expected_test_share, heldout_max_misses,
                                         heldout_miss_pmf, patient_split, poisson_binomial_pmf,
                                         recall_order_statistic)


def _brute_pmf(n: int, k: int, m: int) -> list[Fraction]:
    """P(J = j) by enumerating every set of calibration ranks among n + m distinct scores."""
    counts = [0] * (m + 1)
    for cal in itertools.combinations(range(n + m), n):
        kth = cal[k - 1]  # rank of the k-th smallest calibration score
        counts[kth - (k - 1)] += 1  # test ranks below it: kth ranks below, k - 1 are cal
    total = math.comb(n + m, n)
    return [Fraction(c, total) for c in counts]


@pytest.mark.parametrize("n,k,m", [(1, 1, 1), (3, 2, 4), (5, 1, 3), (5, 5, 2), (6, 3, 6),
                                   (4, 2, 0)])
def test_pmf_matches_brute_force_enumeration(n, k, m):
    exact = _brute_pmf(n, k, m)
    got = heldout_miss_pmf(n, k, m)
    assert got.shape == (m + 1,)
    assert np.allclose(got, [float(f) for f in exact], atol=1e-12, rtol=0)
    # the closed form of the issue: C(j+k-1, j) C(m-j+n-k, m-j) / C(n+m, m)
    closed = [Fraction(math.comb(j + k - 1, j) * math.comb(m - j + n - k, m - j),
                       math.comb(n + m, m)) for j in range(m + 1)]
    assert closed == exact
    assert np.allclose(got, nhypergeom(n + m, m, k).pmf(np.arange(m + 1)), atol=1e-12)


def test_max_misses_follows_the_benchmark_convention():
    for m in (1, 7, 10, 20, 769, 1000):
        for t in (0.8, 0.9, 0.95):
            j = heldout_max_misses(m, t)
            assert (m - j) / m >= t - 1e-12  # meets the target (the benchmarks' test)
            assert j == m or (m - j - 1) / m < t - 1e-12  # one more miss would not
    assert heldout_max_misses(10, 0.9) == 1  # exactly 0.9 counts as reached
    assert heldout_max_misses(0, 0.9) == -1


def test_expected_share_matches_brute_force_and_edge_cases():
    n, m, t = 6, 5, 0.8
    for k in range(1, n + 1):
        exact = sum(_brute_pmf(n, k, m)[: heldout_max_misses(m, t) + 1])
        assert expected_test_share(n, k, m, t) == pytest.approx(float(exact), abs=1e-12)
    assert math.isnan(expected_test_share(10, 0, 10, 0.9))  # not certified
    assert math.isnan(expected_test_share(10, 3, 0, 0.9))  # no test positive
    with pytest.raises(ConfigError, match="1 <= k <= n_cal"):
        heldout_miss_pmf(5, 6, 3)


def _preds(z, y):
    z = np.asarray(z, np.float32).reshape(-1, 1)
    return Predictions(z, np.asarray(y, np.float32).reshape(-1, 1),
                       ids=tuple(map(str, range(len(z)))), class_names=("x",),
                       task="multilabel")


def test_simulation_through_calibrate_guarantee():
    """Exchangeable continuous scores, calibrated by the library: the realised test misses
    follow the negative-hypergeometric law and the share meeting T its expectation."""
    rng = np.random.default_rng(0)
    n, m, t, alpha, reps = 40, 35, 0.9, 0.1, 1500
    k = recall_order_statistic(n, t, alpha)
    assert k >= 1
    misses = np.empty(reps, int)
    for r in range(reps):
        pos = rng.normal(1.5, 1.0, n + m).astype(np.float32)
        neg = rng.normal(0.0, 1.0, 20).astype(np.float32)
        g = calibrate_guarantee(_preds(np.r_[pos[:n], neg], np.r_[np.ones(n), np.zeros(20)]),
                                f"recall>={t}", alpha)
        c = g.classes[0]
        assert c.certified and c.calibration["order_statistic"] == k
        misses[r] = int(np.sum(pos[n:] < c.threshold_logit))
    pmf = heldout_miss_pmf(n, k, m)
    emp = np.bincount(misses, minlength=m + 1)[: m + 1] / reps
    # every probability within 4 binomial standard errors (plus a floor for tiny cells)
    se = np.sqrt(pmf * (1 - pmf) / reps)
    assert np.all(np.abs(emp - pmf) <= 4 * se + 2.0 / reps)
    share = float(np.mean((m - misses) / m >= t - 1e-12))
    p = expected_test_share(n, k, m, t)
    assert abs(share - p) <= 4 * math.sqrt(p * (1 - p) / reps)
    assert p < 1 - alpha  # a valid certificate shows fewer than 1 - alpha on test halves


def test_image_wise_splits_of_one_fixed_set_follow_the_same_law():
    """Given ONE fixed set of scores, random image-wise splits (patient_split without ids)
    already give the law: the expectation is a property of the split, not of the population."""
    rng = np.random.default_rng(1)
    z = rng.normal(1.0, 1.0, 120).astype(np.float32)
    y = np.ones(120)
    t, alpha = 0.9, 0.1
    hits, probs = [], []
    for s in range(600):
        sp = patient_split(120, None, 0.5, s)
        cal, te = sp.calibration, sp.held_out
        g = calibrate_guarantee(_preds(z[cal], y[cal]), f"recall>={t}", alpha).classes[0]
        j = int(np.sum(z[te] < g.threshold_logit))
        hits.append((te.size - j) / te.size >= t - 1e-12)
        probs.append(expected_test_share(cal.size, g.calibration["order_statistic"], te.size,
                                         t))
    out = compare_test_share(hits, probs)
    assert out["n"] == 600 and out["consistent"]
    assert out["range"][0] <= out["observed"] <= out["range"][1]
    assert abs(out["observed"] - out["expected"]) < 0.06


def test_compare_test_share_poisson_binomial():
    p = [0.2, 0.5, 0.9]
    pmf = poisson_binomial_pmf(p)
    # brute force over the 8 outcomes
    want = np.zeros(4)
    for bits in itertools.product((0, 1), repeat=3):
        want[sum(bits)] += np.prod([q if b else 1 - q for q, b in zip(p, bits)])
    assert np.allclose(pmf, want, atol=1e-15)
    probs = np.full(400, 0.8)
    out = compare_test_share([True] * 200 + [False] * 200, probs)  # 0.5 observed vs 0.8
    assert out["expected"] == pytest.approx(0.8) and not out["consistent"]
    assert out["p_low"] < 1e-20 and out["p_two_sided"] == pytest.approx(2 * out["p_low"])
    ok = compare_test_share([True] * 320 + [False] * 80, probs)  # exactly the expectation
    assert ok["consistent"] and ok["range"][0] < 0.8 < ok["range"][1]
    skipped = compare_test_share([True, False], [float("nan"), 0.5])  # NaN: not certified
    assert skipped["n"] == 1
    with pytest.raises(DataError, match="2 hits for 3"):
        compare_test_share([True, False], [0.5, 0.5, 0.5])
