"""Statistics for the audit stage, computed with scipy (never typed in).

* :func:`correlate` -- Pearson and Spearman coefficients with scipy's p-values and paired
  percentile-bootstrap confidence intervals, plus the least-squares line drawn
  in the scatter plots.
* :func:`mantel` -- a permutation test between two distance matrices over the same items
  (pairs of classes are not independent observations, so the plain Pearson p-value of an
  FCD-vs-distance scatter is optimistic; the Mantel p-value is the honest one).
* :func:`mann_whitney` -- Mann-Whitney U with the rank-biserial effect size.
* :func:`fisher_2x2` -- Fisher's exact test with the conditional odds ratio and its exact CI.
* :func:`share_ratio` -- over-representation of a property in a subset (share in the subset /
  share overall) with an image-level bootstrap CI, the subset-vs-rest ratio and Fisher's test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from medscalpel.engine.metrics import bootstrap_ci
from medscalpel.errors import DataError
from medscalpel.validation import check_fraction, check_range

NAN = float("nan")


def _nan_ci() -> tuple[float, float]:
    return (NAN, NAN)


# ----------------------------------------------------------------------------- correlation
@dataclass
class Correlation:
    """Pearson and Spearman correlation of two paired samples.

    Attributes:
        n: number of finite pairs used.
        pearson_r, pearson_p: Pearson's r and its two-sided p-value (``scipy.stats.pearsonr``).
        pearson_ci: paired-bootstrap percentile CI of r.
        spearman_rho, spearman_p: Spearman's rho and p-value (``scipy.stats.spearmanr``).
        spearman_ci: paired-bootstrap percentile CI of rho.
        pearson_ci_dropped, spearman_ci_dropped: bootstrap resamples left out of each CI because
            the coefficient was undefined on them (a constant resample).
        slope, intercept: least-squares line ``y = slope * x + intercept`` (for plots).
        x_name, y_name: what was correlated.
        reason: why the coefficients are NaN (too few pairs, a constant input), else empty.
    """

    n: int
    pearson_r: float = NAN
    pearson_p: float = NAN
    pearson_ci: tuple[float, float] = field(default_factory=_nan_ci)
    spearman_rho: float = NAN
    spearman_p: float = NAN
    spearman_ci: tuple[float, float] = field(default_factory=_nan_ci)
    slope: float = NAN
    intercept: float = NAN
    x_name: str = "x"
    y_name: str = "y"
    n_boot: int = 0
    confidence: float = 0.95
    reason: str = ""
    pearson_ci_dropped: int = 0
    spearman_ci_dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pearson_ci"] = list(self.pearson_ci)
        d["spearman_ci"] = list(self.spearman_ci)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Correlation":
        d = {k: (NAN if v is None else v) for k, v in d.items()}
        d["pearson_ci"] = tuple(NAN if v is None else v for v in d.get("pearson_ci", (NAN, NAN)))
        d["spearman_ci"] = tuple(NAN if v is None else v for v in d.get("spearman_ci", (NAN, NAN)))
        return cls(**d)

    def label(self) -> str:
        """Short text for a plot: ``r=0.64 (p=0.002), rho=0.61 (p=0.004), n=20``."""
        if not math.isfinite(self.pearson_r):
            return f"n={self.n}: {self.reason or 'undefined'}"
        return (f"r={self.pearson_r:.2f} (p={_fmt_p(self.pearson_p)}), "
                f"ρ={self.spearman_rho:.2f} (p={_fmt_p(self.spearman_p)}), n={self.n}")


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "nan"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def _pearson_axis(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    xm = x - x.mean(axis=axis, keepdims=True)
    ym = y - y.mean(axis=axis, keepdims=True)
    num = (xm * ym).sum(axis=axis)
    den = np.sqrt((xm * xm).sum(axis=axis) * (ym * ym).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def _spearman_axis(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return _pearson_axis(sps.rankdata(x, axis=axis), sps.rankdata(y, axis=axis), axis=axis)


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between the rows of two ``[N, K]`` arrays (NaN for a constant row).

    Equal to ``scipy.stats.spearmanr(a[i], b[i]).statistic`` for each row ``i``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise DataError(f"rowwise_spearman: arrays must have the same [N, K] shape; got {a.shape} "
                        f"and {b.shape}.")
    return _spearman_axis(a, b, axis=1)


def _boot_ci(x: np.ndarray, y: np.ndarray, fn, n_boot: int, confidence: float,
             rng: np.random.Generator) -> tuple[tuple[float, float], int]:
    """Paired percentile bootstrap; resamples where a coefficient is undefined (a constant
    resample) are dropped rather than turning the whole interval into NaN, and counted (the
    second value)."""
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = fn(x[idx], y[idx], axis=1)
    return bootstrap_ci(reps, confidence)


def correlate(
    x: np.ndarray,
    y: np.ndarray,
    *,
    x_name: str = "x",
    y_name: str = "y",
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Correlation:
    """Pearson and Spearman correlation with p-values and bootstrap CIs.

    Non-finite pairs are dropped. With fewer than 3 pairs or a constant input the coefficients
    are NaN and ``reason`` says why (no exception: an audit of a sweep where a class never drops
    20% should still produce every other number).

    Args:
        x, y: paired samples.
        n_boot: paired bootstrap resamples for the percentile CIs (0 disables them).
        confidence: CI level.
        seed: bootstrap seed.

    Example:
        >>> c = correlate([1, 2, 3, 4, 5], [2, 4, 5, 4, 5], n_boot=0)
        >>> round(c.pearson_r, 4), round(c.spearman_rho, 4)
        (0.7746, 0.7379)
    """
    check_range(n_boot, "n_boot", "correlate", 0, integer=True)
    check_fraction(confidence, "confidence", "correlate")
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise DataError(f"correlate: {x_name} has {x.size} values but {y_name} has {y.size}; "
                        "pass paired samples of equal length.")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = Correlation(n=int(x.size), x_name=x_name, y_name=y_name, n_boot=n_boot,
                      confidence=confidence)
    if x.size < 3:
        out.reason = f"fewer than 3 finite pairs ({x.size})"
        return out
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        out.reason = f"{x_name if np.ptp(x) == 0 else y_name} is constant"
        return out
    pr = sps.pearsonr(x, y)
    sr = sps.spearmanr(x, y)
    lr = sps.linregress(x, y)
    out.pearson_r, out.pearson_p = float(pr.statistic), float(pr.pvalue)
    out.spearman_rho, out.spearman_p = float(sr.statistic), float(sr.pvalue)
    out.slope, out.intercept = float(lr.slope), float(lr.intercept)
    if n_boot:
        rng = np.random.default_rng(seed)
        out.pearson_ci, out.pearson_ci_dropped = _boot_ci(x, y, _pearson_axis, n_boot,
                                                          confidence, rng)
        out.spearman_ci, out.spearman_ci_dropped = _boot_ci(x, y, _spearman_axis, n_boot,
                                                            confidence, rng)
    return out


# ----------------------------------------------------------------------------- Mantel
def mantel(d1: np.ndarray, d2: np.ndarray, *, n_perm: int = 999, seed: int = 0,
           method: str = "pearson") -> dict[str, Any]:
    """Mantel permutation test between two symmetric ``[K, K]`` matrices.

    The statistic is the correlation of the upper triangles; the p-value (two-sided) permutes
    the items (rows and columns together) of ``d1``: ``(1 + #{|stat_perm| >= |stat|}) /
    (1 + n_perm)``. Non-finite entries are dropped pairwise.
    """
    check_range(n_perm, "n_perm", "mantel", 1, integer=True)
    d1 = np.asarray(d1, dtype=np.float64)
    d2 = np.asarray(d2, dtype=np.float64)
    k = d1.shape[0]
    if d1.shape != (k, k) or d2.shape != (k, k):
        raise DataError(f"mantel: both matrices must be square and equal; got {d1.shape}, "
                        f"{d2.shape}.")
    iu = np.triu_indices(k, 1)
    fn = _pearson_axis if method == "pearson" else _spearman_axis

    def stat(a: np.ndarray) -> float:
        u, v = a[iu], d2[iu]
        keep = np.isfinite(u) & np.isfinite(v)
        if keep.sum() < 3 or np.ptp(u[keep]) == 0 or np.ptp(v[keep]) == 0:
            return NAN
        return float(fn(u[keep], v[keep]))

    observed = stat(d1)
    if not math.isfinite(observed):
        return {"statistic": NAN, "p": NAN, "n_perm": n_perm, "method": method}
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_perm):
        p = rng.permutation(k)
        s = stat(d1[np.ix_(p, p)])
        hits += int(math.isfinite(s) and abs(s) >= abs(observed) - 1e-12)
    return {"statistic": observed, "p": (hits + 1) / (n_perm + 1), "n_perm": n_perm,
            "method": method}


# ----------------------------------------------------------------------------- two groups
def mann_whitney(a: np.ndarray, b: np.ndarray, *, a_name: str = "a", b_name: str = "b",
                 alternative: str = "two-sided") -> dict[str, Any]:
    """Mann-Whitney U of ``a`` vs ``b`` with the rank-biserial correlation.

    ``rank_biserial = 2 * U_a / (n_a * n_b) - 1`` lies in [-1, 1]: positive when values of ``a``
    tend to be larger than those of ``b`` (it equals ``P(a > b) - P(a < b)``). NaNs are dropped.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    out: dict[str, Any] = {"test": "mann-whitney-u", "alternative": alternative,
                           "n_" + a_name: int(a.size), "n_" + b_name: int(b.size),
                           "median_" + a_name: float(np.median(a)) if a.size else NAN,
                           "median_" + b_name: float(np.median(b)) if b.size else NAN,
                           "U": NAN, "p": NAN, "rank_biserial": NAN, "reason": ""}
    if a.size == 0 or b.size == 0:
        out["reason"] = f"an empty group ({a_name}: {a.size}, {b_name}: {b.size})"
        return out
    res = sps.mannwhitneyu(a, b, alternative=alternative)
    out["U"] = float(res.statistic)
    out["p"] = float(res.pvalue)
    out["rank_biserial"] = float(2.0 * res.statistic / (a.size * b.size) - 1.0)
    return out


def fisher_2x2(table: np.ndarray, *, confidence: float = 0.95,
               alternative: str = "two-sided") -> dict[str, Any]:
    """Fisher's exact test on ``[[a, b], [c, d]]`` with the conditional odds ratio and exact CI.

    Rows are the groups (e.g. PIE, non-PIE); columns the outcome (present, absent).
    """
    t = np.asarray(table, dtype=np.int64)
    if t.shape != (2, 2) or (t < 0).any():
        raise DataError(f"fisher_2x2: need a 2x2 table of non-negative counts; got {t.tolist()}.")
    res = sps.fisher_exact(t, alternative=alternative)
    out: dict[str, Any] = {"test": "fisher-exact", "alternative": alternative,
                           "table": t.tolist(), "p": float(res.pvalue),
                           "sample_odds_ratio": float(res.statistic), "odds_ratio": NAN,
                           "odds_ratio_ci": [NAN, NAN], "confidence": confidence}
    if t.sum(0).min() == 0 or t.sum(1).min() == 0:
        out["reason"] = "a row or column of the table is all zero"
        return out
    orr = sps.contingency.odds_ratio(t, kind="conditional")
    ci = orr.confidence_interval(confidence_level=confidence)
    out["odds_ratio"] = float(orr.statistic)
    out["odds_ratio_ci"] = [float(ci.low), float(ci.high)]
    return out


# ----------------------------------------------------------------------------- shares
def share_ratio(
    subset: np.ndarray,
    has: np.ndarray,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk: int = 250,
) -> dict[str, np.ndarray]:
    """Over-representation of properties in a subset of items.

    For each column ``j`` of ``has`` (``[N, J]`` bool, NaN-free): ``ratio = share among the
    subset / share overall``, the subset-vs-rest ratio (PruneCXR's "PIE:non-PIE ratio") and
    Fisher's exact test of subset membership vs the property. The CI of ``ratio`` is the
    percentile interval of an item-level bootstrap (multinomial resampling weights, subset
    membership fixed per item), computed in chunks so memory stays small.

    Returns a dict of ``[J]`` arrays: ``n_subset_with``, ``n_with``, ``share_subset``,
    ``share_overall``, ``ratio``, ``ratio_lo``, ``ratio_hi``, ``ratio_vs_rest``, ``odds_ratio``,
    ``odds_ratio_lo``, ``odds_ratio_hi``, ``fisher_p``.
    """
    check_range(n_boot, "n_boot", "share_ratio", 0, integer=True)
    subset = np.asarray(subset, dtype=bool)
    has = np.asarray(has, dtype=bool)
    if has.ndim == 1:
        has = has[:, None]
    n, j = has.shape
    if subset.shape != (n,):
        raise DataError(f"share_ratio: subset mask has shape {subset.shape}, expected ({n},).")
    n_sub = int(subset.sum())
    if n_sub == 0 or n_sub == n:
        raise DataError(f"share_ratio: the subset holds {n_sub} of {n} items; it must be a "
                        "proper, non-empty subset.")
    hs = has[subset].sum(0).astype(np.float64)
    ha = has.sum(0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        share_sub = hs / n_sub
        share_all = ha / n
        share_rest = (ha - hs) / (n - n_sub)
        ratio = share_sub / share_all
        ratio_vs_rest = share_sub / share_rest
    lo = np.full(j, NAN)
    hi = np.full(j, NAN)
    if n_boot:
        rng = np.random.default_rng(seed)
        reps = []
        hf = has.astype(np.float32)
        sf = subset.astype(np.float32)
        for start in range(0, n_boot, chunk):
            b = min(chunk, n_boot - start)
            w = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float32)  # [b, N]
            ws = w * sf[None, :]
            with np.errstate(invalid="ignore", divide="ignore"):
                s_sub = (ws @ hf) / ws.sum(1, keepdims=True)
                s_all = (w @ hf) / w.sum(1, keepdims=True)
                reps.append(s_sub / s_all)
        r = np.concatenate(reps, 0)
        alpha = 1.0 - confidence
        with np.errstate(invalid="ignore"):
            for c in range(j):
                v = r[:, c][np.isfinite(r[:, c])]
                if v.size >= 10 and ha[c] > 0:
                    lo[c], hi[c] = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    fisher_p = np.full(j, NAN)
    orr = np.full(j, NAN)
    or_lo = np.full(j, NAN)
    or_hi = np.full(j, NAN)
    for c in range(j):
        table = [[hs[c], n_sub - hs[c]], [ha[c] - hs[c], (n - n_sub) - (ha[c] - hs[c])]]
        f = fisher_2x2(np.asarray(table), confidence=confidence)
        fisher_p[c] = f["p"]
        orr[c] = f["odds_ratio"]
        or_lo[c], or_hi[c] = f["odds_ratio_ci"]
    return {"n_subset_with": hs.astype(int), "n_with": ha.astype(int), "share_subset": share_sub,
            "share_overall": share_all, "ratio": ratio, "ratio_lo": lo, "ratio_hi": hi,
            "ratio_vs_rest": ratio_vs_rest, "odds_ratio": orr, "odds_ratio_lo": or_lo,
            "odds_ratio_hi": or_hi, "fisher_p": fisher_p}
