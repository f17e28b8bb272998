"""The test-half null of a ``recall>=T`` certificate: how often an exactly valid certificate
is expected to show recall ``>= T`` on a finite held-out half (negative-hypergeometric misses),
and the observed share of such halves against it (Poisson-binomial).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import gammaln

from medscalpel.errors import ConfigError, DataError

#: the tolerance of "test-half recall >= T" in :func:`heldout_max_misses`, the same as the
#: benchmarks' ``recall >= T - 1e-12``
HELDOUT_TOL = 1e-12


def heldout_max_misses(m_test: int, target: float) -> int:
    """The most misses among ``m_test`` test positives that still leave the test recall
    ``(m_test - misses) / m_test >= target`` (up to :data:`HELDOUT_TOL`, the benchmarks'
    convention, so e.g. ``m_test = 10, target = 0.9`` allows 1); -1 when ``m_test <= 0``.

    Example:
        >>> heldout_max_misses(10, 0.9), heldout_max_misses(769, 0.9)
        (1, 76)
    """
    m = int(m_test)
    if m <= 0:
        return -1
    j = np.arange(m + 1)
    return int(np.count_nonzero((m - j) / m >= target - HELDOUT_TOL)) - 1


def heldout_miss_pmf(n_cal: int, k: int, m_test: int) -> np.ndarray:
    """``P(J = j)``, ``j = 0..m_test``: the law of the number ``J`` of test positives that miss
    a threshold at the ``k``-th smallest of ``n_cal`` calibration positive scores.

    The rule is the library's (:func:`calibrate_guarantee`: ``logit >= `` just below the
    ``k``-th smallest calibration positive, so a test positive is missed iff its score is
    strictly below that order statistic). If the ``n_cal + m_test`` positive scores are
    exchangeable and have no ties, the ranks of the calibration scores among all of them are a
    uniformly random ``n_cal``-subset, and ``J`` (the test scores below the ``k``-th
    calibration score) is negative-hypergeometric:
    ``P(J=j) = C(j+k-1, j) C(m-j+n-k, m-j) / C(n+m, m)`` (scipy's ``nhypergeom(n+m, m, k)``).
    This holds for ANY fixed set of distinct scores split uniformly at random, so it is also
    the law over random image-wise splits of one fixed held-out set. Ties only lower ``J``.

    Example:
        >>> p = heldout_miss_pmf(4, 1, 2)  # 6 ways: J = 0, 1, 2 in 10, 4, 1 of 15
        >>> [round(float(v) * 15, 6) for v in p]
        [10.0, 4.0, 1.0]
    """
    n, k, m = int(n_cal), int(k), int(m_test)
    if not (n >= 1 and 1 <= k <= n and m >= 0):
        raise ConfigError(f"heldout_miss_pmf: need 1 <= k <= n_cal and m_test >= 0; got "
                          f"n_cal={n}, k={k}, m_test={m}.")
    j = np.arange(m + 1)
    logp = (gammaln(j + k) - gammaln(j + 1) - gammaln(k)
            + gammaln(m - j + n - k + 1) - gammaln(m - j + 1) - gammaln(n - k + 1)
            - (gammaln(n + m + 1) - gammaln(m + 1) - gammaln(n + 1)))
    p = np.exp(logp)
    return p / p.sum()  # removes the rounding of the log-gammas (the exact sum is 1)


def expected_test_share(n_cal: int, k: int, m_test: int, target: float) -> float:
    """The probability that a test half of ``m_test`` positives shows recall ``>= target`` at
    the ``k``-th smallest of ``n_cal`` calibration positive scores, if calibration and test
    positives are exchangeable (:func:`heldout_miss_pmf`; ``k`` as chosen by
    :func:`recall_order_statistic`). Averaged over splits, it is the share of test halves an
    exactly valid ``recall>=T`` certificate is expected to show meeting ``T``: below
    ``1 - alpha``, since the test half is itself a finite sample. NaN when ``k == 0`` (not
    certified) or ``m_test == 0``.

    Example:
        >>> from medscalpel.repair.conformal.spec import recall_order_statistic
        >>> n = 769
        >>> k = recall_order_statistic(n, 0.9, 0.1)
        >>> round(expected_test_share(n, k, 769, 0.9), 3)
        0.834
    """
    if int(k) <= 0 or int(m_test) <= 0:
        return float("nan")
    jmax = heldout_max_misses(m_test, target)
    return float(min(1.0, heldout_miss_pmf(n_cal, k, m_test)[: jmax + 1].sum()))


def poisson_binomial_pmf(probs: Sequence[float]) -> np.ndarray:
    """``P(S = s)``, ``s = 0..len(probs)``, for ``S`` a sum of independent Bernoulli(``p_i``)
    (exact convolution)."""
    pmf = np.ones(1)
    for p in np.asarray(probs, np.float64):
        pmf = np.convolve(pmf, [1.0 - p, p])
    return pmf


def compare_test_share(hits: Sequence[bool], probs: Sequence[float],
                       level: float = 0.95) -> dict[str, Any]:
    """Observed test-half hits against their exchangeable probabilities ``probs``
    (:func:`expected_test_share` per split).

    Returns ``n``, ``observed`` (share), ``expected`` (mean of ``probs``), ``range`` (the
    central ``level`` range of the share if the hits were independent Bernoulli(``p_i``)),
    ``p_low`` = P(S <= observed), ``p_high`` = P(S >= observed), ``p_two_sided`` (twice the
    smaller, capped at 1; Poisson-binomial) and ``consistent`` (``p_two_sided >= 1 - level``).
    Independence holds for splits drawn independently and uniformly by IMAGE from one fixed
    set (given that set); a patient-wise split keeps a patient's images together, which is not
    a uniform image-wise split, so there the test checks whether patient clustering matters.
    """
    h = np.asarray(hits, bool)
    p = np.asarray(probs, np.float64)
    if h.shape != p.shape:
        raise DataError(f"compare_test_share: {h.size} hits for {p.size} probabilities.")
    ok = np.isfinite(p)
    h, p = h[ok], p[ok]
    n = int(h.size)
    if n == 0:
        return {"n": 0, "observed": None, "expected": None, "range": None, "p_low": None,
                "p_high": None, "p_two_sided": None, "consistent": None}
    s = int(h.sum())
    pmf = poisson_binomial_pmf(p)
    cdf = np.cumsum(pmf)
    lo = int(np.searchsorted(cdf, (1 - level) / 2 - 1e-12))
    hi = int(np.searchsorted(cdf, 1 - (1 - level) / 2 - 1e-12))
    p_low, p_high = float(min(1.0, cdf[s])), float(min(1.0, pmf[s:].sum()))
    two = float(min(1.0, 2 * min(p_low, p_high)))
    return {"n": n, "observed": s / n, "expected": float(p.mean()),
            "range": [lo / n, hi / n], "p_low": p_low, "p_high": p_high, "p_two_sided": two,
            "consistent": bool(two >= 1 - level)}
