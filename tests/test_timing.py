"""Timing with evidence: per-round ratios, the order-statistic interval of their median (checked
against the binomial coverage by brute force), noisy runs undecided."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from medscalpel.deploy.timing import median_interval, speed_ratio, time_ms


def test_median_interval_coverage_matches_brute_force():
    # coverage of (X_(k), X_(n-k+1)) for the median of a continuous law, by simulation
    rng = np.random.default_rng(0)
    for n in (3, 5, 9, 20):
        low, high, cov = median_interval(list(range(n)))
        k = int(low) + 1
        hits = 0
        draws = rng.standard_normal((20000, n))
        s = np.sort(draws, axis=1)
        hits = np.mean((s[:, k - 1] <= 0) & (s[:, n - k] >= 0))
        assert abs(hits - cov) < 0.01, (n, hits, cov)
        # exact: 1 - 2 P(Bin(n, 1/2) < k)
        exact = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n
        assert cov == pytest.approx(exact)
    assert median_interval([1, 2, 3, 4, 5]) == (1, 5, 0.9375)
    lo, hi, cov = median_interval(list(range(20)))
    assert cov >= 0.95 and (lo, hi) == (5, 14)


def test_speed_ratio_outcomes():
    ref = [10.0, 10.1, 9.9, 10.0, 10.2]
    assert speed_ratio(ref, [5.0, 5.05, 4.95, 5.0, 5.1]).outcome == "faster"
    slow = speed_ratio(ref, [20.0, 20.2, 19.8, 20.0, 20.4])
    assert slow.outcome == "slower" and slow.ratio == pytest.approx(0.5)
    # one wild round (17 vs 312 ms): noisy, and 3 rounds (75% interval) decide nothing
    wild = speed_ratio([17.0, 312.0, 17.5], [0.2, 0.21, 0.2])
    assert wild.noisy and wild.outcome == "undecided" and wild.confidence == 0.75
    # noisy but every one of 5 rounds slower: the direction is decided, flagged noisy
    noisy_slow = speed_ratio(ref, [25.0, 40.0, 30.0, 22.0, 35.0])
    assert noisy_slow.noisy and noisy_slow.outcome == "slower"
    tie = speed_ratio(ref, [10.1, 9.9, 10.0, 10.2, 9.8])
    assert tie.outcome == "undecided" and tie.low <= 1 <= tie.high
    assert len(tie.rounds) == 5 and tie.to_dict()["rounds"] == list(tie.rounds)
    with pytest.raises(ValueError, match="same number"):
        speed_ratio([1.0], [1.0, 2.0])


def test_one_round_decides_nothing_and_time_ms_counts():
    assert speed_ratio([10.0], [1.0]).outcome == "undecided"
    calls = itertools.count()
    ts = time_ms(lambda: next(calls), warmup=2, repeats=3)
    assert len(ts) == 3 and next(calls) == 5 and all(t >= 0 for t in ts)
