"""Null models of the polarity table: what chance alone gives.

``pairs`` (each observed triple's class pair replaced by a random pair), ``columns`` (each
channel's weights shuffled across classes) and ``rows`` (each class's weights shuffled across
channels): :func:`_null_draws` draws the category counts, :func:`_summarise` turns them into a
:class:`NullSummary` (expected counts and shares, enrichment, one-sided empirical p-values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medscalpel.explain.polarity.jaccard import CATEGORIES, classify_jaccard
from medscalpel.explain.polarity.rules import StrongWeightRule, _channel_pairs, _triples

NULL_MODELS = ("pairs", "columns", "rows")


@dataclass(frozen=True)
class NullSummary:
    """A null model's distribution of the category table.

    Attributes:
        model: ``pairs``, ``columns`` or ``rows``.
        level: ``triples`` or ``channels``.
        mean_counts / std_counts: expected count per category over the null draws.
        mean_fractions: expected share per category (undefined pairs excluded).
        mean_total: expected number of polarized triples / channels.
        exclusive_fraction_observed / exclusive_fraction_null: share of perfect + legitimate.
        enrichment: observed / null exclusive share.
        p_value: one-sided empirical p, P(null share >= observed share), with +1 correction.
        p_value_perfect: the same for the share of perfect pairs alone.
    """

    model: str
    level: str
    n_null: int
    mean_counts: dict[str, float]
    std_counts: dict[str, float]
    mean_fractions: dict[str, float]
    mean_total: float
    exclusive_fraction_observed: float
    exclusive_fraction_null: float
    enrichment: float
    p_value: float
    p_value_perfect: float

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _null_draws(model: str, w: np.ndarray, rule: StrongWeightRule, trip: np.ndarray,
                chp: np.ndarray, jac: np.ndarray, bounds: tuple[float, float], n_null: int,
                max_channels: int | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
    k = w.shape[0]
    out = {"triples": np.zeros((n_null, len(CATEGORIES))),
           "channels": np.zeros((n_null, len(CATEGORIES)))}
    for d in range(n_null):
        if model == "pairs":
            levels = {"triples": len(trip), "channels": len(chp)}
            for level, m in levels.items():
                p = rng.integers(0, k, m)
                n = (p + rng.integers(1, k, m)) % k      # uniform over classes != p
                cats = classify_jaccard(jac[p, n], bounds)
                out[level][d] = [np.sum(cats == c) for c in CATEGORIES]
            continue
        wr = rng.permuted(w, axis=0 if model == "columns" else 1)
        pos, neg = rule.masks(wr)
        for level, rows in (("triples", _triples(wr, pos, neg)),
                            ("channels", _channel_pairs(wr, pos, neg, max_channels))):
            cats = classify_jaccard(jac[rows[:, 1], rows[:, 2]], bounds)
            out[level][d] = [np.sum(cats == c) for c in CATEGORIES]
    return out


def _share(counts: np.ndarray, cats: tuple[str, ...]) -> np.ndarray:
    idx = [CATEGORIES.index(c) for c in cats]
    defined = counts[..., :4].sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined > 0, counts[..., idx].sum(-1) / np.where(defined > 0, defined, 1),
                        np.nan)


def _summarise(model: str, level: str, draws: np.ndarray, observed: dict[str, int]) -> NullSummary:
    obs = np.array([observed[c] for c in CATEGORIES], dtype=np.float64)
    mean = draws.mean(0)
    std = draws.std(0)
    excl_obs = float(_share(obs, ("perfect", "legitimate")))
    excl_null = _share(draws, ("perfect", "legitimate"))
    perf_obs = float(_share(obs, ("perfect",)))
    perf_null = _share(draws, ("perfect",))
    valid = ~np.isnan(excl_null)
    n_valid = int(valid.sum())
    if np.isnan(excl_obs) or n_valid == 0:
        p = pp = float("nan")
    else:
        p = float((1 + np.sum(excl_null[valid] >= excl_obs - 1e-12)) / (1 + n_valid))
        pp = float((1 + np.sum(perf_null[valid] >= perf_obs - 1e-12)) / (1 + n_valid))
    excl_null_mean = float(np.nanmean(excl_null)) if n_valid else float("nan")
    enrich = excl_obs / excl_null_mean if n_valid and excl_null_mean > 0 else float("nan")
    return NullSummary(
        model=model, level=level, n_null=int(len(draws)),
        mean_counts={c: float(mean[i]) for i, c in enumerate(CATEGORIES)},
        std_counts={c: float(std[i]) for i, c in enumerate(CATEGORIES)},
        mean_fractions={c: float(np.nanmean(_share(draws, (c,)))) if n_valid else float("nan")
                        for c in CATEGORIES if c != "undefined"},
        mean_total=float(draws[:, :4].sum(1).mean()),
        exclusive_fraction_observed=excl_obs, exclusive_fraction_null=excl_null_mean,
        enrichment=float(enrich), p_value=p, p_value_perfect=pp)


__all__ = ["NULL_MODELS", "NullSummary"]
