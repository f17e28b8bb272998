"""Timing with evidence: the one latency loop of medscalpel, and speed ratios between two
variants as per-round ratios from ONE alternated run with a distribution-free interval.

Every latency in medscalpel is :func:`time_ms` (warm-up, then ``repeats`` timed calls; the
median is the variant's time in that round). Two variants are compared only through
:func:`speed_ratio` of their per-round medians taken in the same rounds (so that machine load
hits both alike): the ratio of each round is stored, the point estimate is their median, and the
interval is the order-statistic confidence interval of that median (no distributional
assumption; with n rounds its coverage is ``1 - 2 * P(Binomial(n, 1/2) < k)``, stated, e.g.
93.75% for min..max of 5 rounds). A comparison decides its direction only when the interval
lies on one side of 1 with coverage >= :data:`MIN_CONFIDENCE` (so at least 5 rounds): otherwise
it is undecided. Rounds whose ratios vary by more than :data:`NOISY_SPREAD` are flagged
``noisy``: the direction may still be decided (every round agreed), but the magnitude is not to
be quoted without its interval, and ``deploy`` re-measures them.

Example:
    >>> r = speed_ratio([10.0, 10.2, 9.9, 10.1, 10.0], [5.0, 5.1, 5.0, 4.9, 5.0])
    >>> round(r.ratio, 2), r.outcome, round(r.confidence, 4)
    (2.0, 'faster', 0.9375)
    >>> speed_ratio([10, 10, 10, 10, 10], [9, 11, 10, 10, 10]).outcome
    'undecided'
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

#: spread of the per-round ratios ((max - min) / median) above which a comparison is noisy
NOISY_SPREAD = 0.2
#: the least coverage of the ratio's interval that decides a direction (5 rounds: 93.75%)
MIN_CONFIDENCE = 0.9


def time_ms(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> list[float]:
    """Wall times in milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def median_ms(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> float:
    """The median of :func:`time_ms`: one round's time of a variant."""
    return float(statistics.median(time_ms(fn, warmup, repeats)))


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free confidence interval of the median: order statistics ``(k, n-k+1)``
    with the largest ``k`` whose coverage is >= ``level``; with too few values for ``level``,
    min..max and its (lower) coverage. Returns ``(low, high, coverage)``.

    Example:
        >>> median_interval([3, 1, 2, 5, 4])
        (1, 5, 0.9375)
    """
    v = sorted(values)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0.0
    if n == 1:
        return v[0], v[0], 0.0

    def coverage(k: int) -> float:  # P(X_(k) <= median <= X_(n-k+1))
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0 ** n

    k = 1
    while k + 1 <= n // 2 and coverage(k + 1) >= level:
        k += 1
    return v[k - 1], v[n - k], coverage(k)


@dataclass(frozen=True)
class SpeedRatio:
    """How much faster a candidate is than a reference, from one alternated run.

    Attributes:
        ratio: median over rounds of ``reference_ms / candidate_ms`` (> 1: candidate faster).
        low, high: order-statistic interval of that median; ``confidence`` its coverage.
        spread: (max - min) / median of the per-round ratios; ``noisy`` when above
            :data:`NOISY_SPREAD`.
        outcome: ``faster`` (low > 1), ``slower`` (high < 1), ``undecided`` (the interval holds
            1, or its coverage is below :data:`MIN_CONFIDENCE`: too few rounds).
        rounds: the per-round ratios.
    """

    ratio: float
    low: float
    high: float
    confidence: float
    spread: float
    noisy: bool
    outcome: str
    rounds: tuple[float, ...]
    reference_ms: float
    candidate_ms: float

    @property
    def decided(self) -> bool:
        return self.outcome in ("faster", "slower")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rounds"] = list(self.rounds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpeedRatio":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["rounds"] = tuple(kw.get("rounds", ()))
        return cls(**kw)

    def describe(self) -> str:
        noisy = f", NOISY (spread {self.spread:.0%})" if self.noisy else ""
        return (f"{self.ratio:.2f}x [{self.low:.2f}, {self.high:.2f}] "
                f"({len(self.rounds)} rounds, {self.confidence:.0%} interval{noisy})")


def speed_ratio(reference_ms: Sequence[float], candidate_ms: Sequence[float],
                level: float = 0.95, noisy_spread: float = NOISY_SPREAD) -> SpeedRatio:
    """Per-round ratios ``reference / candidate`` of times measured in the SAME rounds."""
    if len(reference_ms) != len(candidate_ms) or not reference_ms:
        raise ValueError("speed_ratio needs the same number (>= 1) of rounds for both variants; "
                         f"got {len(reference_ms)} and {len(candidate_ms)}.")
    per = [a / b if b > 0 else math.inf for a, b in zip(reference_ms, candidate_ms)]
    med = float(statistics.median(per))
    low, high, cov = median_interval(per, level)
    spread = (max(per) - min(per)) / med if med > 0 and len(per) > 1 else 0.0
    noisy = bool(spread > noisy_spread)
    if low > 1.0 and cov >= MIN_CONFIDENCE:
        outcome = "faster"
    elif high < 1.0 and cov >= MIN_CONFIDENCE:
        outcome = "slower"
    else:
        outcome = "undecided"
    return SpeedRatio(ratio=med, low=float(low), high=float(high), confidence=float(cov),
                      spread=float(spread), noisy=noisy, outcome=outcome, rounds=tuple(per),
                      reference_ms=float(statistics.median(reference_ms)),
                      candidate_ms=float(statistics.median(candidate_ms)))


__all__ = ["MIN_CONFIDENCE", "NOISY_SPREAD", "SpeedRatio", "median_interval", "median_ms", "speed_ratio",
           "time_ms"]
