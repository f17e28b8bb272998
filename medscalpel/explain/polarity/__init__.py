"""Polarized classifier channels read against label mutual exclusivity, tested against chance.

Seed 000 reads a penultimate channel with a strong positive weight for one pathology and a
strong negative weight for another as a *bipolar axis* between mutually exclusive labels, and
classifies 100 such channels by the Jaccard index J of the two labels in the training labels:
perfect (J = 0), legitimate (0 < J < 0.1), mixed (0.1 <= J < 0.3), conflict (J >= 0.3).

Whether that says anything about the model depends on the label set: on NIH ChestX-ray14 every
label pair has J < 0.16, so *any* pair of classes, picked at random, is mostly 'legitimate'.
:func:`polarity_analysis` therefore gives the same table under null models:

* ``pairs``: every observed polarized triple keeps its channel and weights, but its (positive,
  negative) class pair is replaced by a uniformly random pair of distinct classes;
* ``columns``: each channel's weights are shuffled across classes (same magnitudes per channel),
  then the rule is applied again;
* ``rows``: each class's weights are shuffled across channels (same weight distribution per
  class, so the same number of strong weights per class), then the rule is applied again;

with the expected counts, an enrichment (observed fraction / null fraction) and a one-sided
empirical p-value for the observed share of perfect + legitimate pairs.

The Jaccard categories are kept **for comparison with the seed paper only**: a low Jaccard index
says that one of the two labels is rare, not that they exclude each other. Next to them every
class pair gets an evidence category from :mod:`medscalpel.data.cooccurrence` (the rule the
clinical report uses): ``exclusive`` (co-occurrence significantly below independence: upper 95%
bound of the lift < 0.1, >= 10 expected co-occurrences, enough images), ``not_exclusive``
(enough data, the rule does not hold) or ``insufficient`` (too few images or expected
co-occurrences to tell). ``counts_evidence`` and ``all_class_pairs_evidence`` (the share of
ordered class pairs per evidence category: what the ``pairs`` null model expects) report them.

The package: :mod:`.rules` (strong-weight rules, polarized channels), :mod:`.jaccard` (label
Jaccard and evidence categories), :mod:`.nulls` (null models); this module holds
:func:`polarity_analysis` with its :class:`PolarityResult` and :func:`compare_stages`.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> W = rng.normal(size=(4, 32)); Y = (rng.random((200, 4)) < 0.2).astype(float)
    >>> res = polarity_analysis(W, Y, ["a", "b", "c", "d"], n_null=20)
    >>> sorted(res.counts("triples"))
    ['conflict', 'legitimate', 'mixed', 'perfect', 'undefined']
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from medscalpel.data.cooccurrence import (VERDICTS, CooccurrenceEvidence, ExclusionRule,
                                          cooccurrence_evidence)
from medscalpel.errors import ConfigError, DataError
from medscalpel.explain.polarity.jaccard import (CATEGORIES, _count, _fractions, classify_jaccard,
                                                 evidence_matrix, jaccard_matrix, multihot)
from medscalpel.explain.polarity.nulls import NULL_MODELS, NullSummary, _null_draws, _summarise
from medscalpel.explain.polarity.rules import (POLARITY_RULES, AbsoluteRule, QuantileRule,
                                               StrongWeightRule, TopKRule, ZScoreRule,
                                               _channel_pairs, _triples, _weights_of, make_rule)
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
#: evidence categories (:mod:`medscalpel.data.cooccurrence` verdicts)
EVIDENCE_CATEGORIES = VERDICTS
JACCARD_NOTE = ("Jaccard categories of seed 000 (perfect J = 0, legitimate 0 < J < b0, mixed, "
                "conflict), kept for comparison with the seed paper only: a low Jaccard index "
                "says that one label is rare, not that the two exclude each other")
EVIDENCE_NOTE = ("evidence categories: 'exclusive' when the labels co-occur significantly less "
                 "than independence predicts by the exclusion rule (see 'exclusion_rule'), "
                 "'not_exclusive' when the data could tell and the rule does not hold, "
                 "'insufficient' when too few images or expected co-occurrences")


@dataclass(frozen=True)
class PolarityResult:
    """Polarized classifier channels and their Jaccard categories, observed and under nulls.

    Attributes:
        class_names: K names.
        rule: the strong-weight rule (``to_dict``).
        bounds: Jaccard bounds (legitimate/mixed, mixed/conflict).
        jaccard: ``[K, K]`` training-label Jaccard matrix.
        triples: ``[T, 3]`` (channel, positive class, negative class), every polarized triple.
        channel_pairs: ``[P, 3]`` one (strongest) pair per polarized channel, seed-style.
        weights_pos / weights_neg: the two weights of each triple.
        nulls: ``{(model, level): NullSummary}``.
        evidence: the training labels' co-occurrence evidence (evidence categories).
    """

    class_names: tuple[str, ...]
    rule: dict[str, Any]
    bounds: tuple[float, float]
    jaccard: np.ndarray
    triples: np.ndarray
    channel_pairs: np.ndarray
    weights_pos: np.ndarray
    weights_neg: np.ndarray
    num_channels: int
    nulls: dict[tuple[str, str], NullSummary] = field(default_factory=dict)
    n_null: int = 0
    seed: int = 0
    max_channels: int | None = None
    evidence: CooccurrenceEvidence | None = None

    def categories(self, level: str = "triples") -> np.ndarray:
        rows = self._rows(level)
        return classify_jaccard(self.jaccard[rows[:, 1], rows[:, 2]], self.bounds)

    def _rows(self, level: str) -> np.ndarray:
        if level == "triples":
            return self.triples
        if level == "channels":
            return self.channel_pairs
        raise ConfigError(f"The 'level' parameter of PolarityResult must be one of 'triples', "
                          f"'channels'. Got {level!r} instead.")

    def counts(self, level: str = "triples") -> dict[str, int]:
        """Count per Jaccard category (seed 000's table when ``level='channels'``; for
        comparison with the seed paper only)."""
        return _count(self.categories(level))

    def evidence_categories(self, level: str = "triples") -> np.ndarray:
        """Evidence category (:data:`EVIDENCE_CATEGORIES`) of each row's class pair."""
        rows = self._rows(level)
        if self.evidence is None:
            return np.full(len(rows), "insufficient", dtype=object)
        return evidence_matrix(self.evidence)[rows[:, 1], rows[:, 2]]

    def counts_evidence(self, level: str = "triples") -> dict[str, int]:
        """Count per evidence category."""
        cats = self.evidence_categories(level)
        return {c: int(np.sum(cats == c)) for c in EVIDENCE_CATEGORIES}

    def pair_distribution_evidence(self) -> dict[str, float]:
        """Share of all unordered class pairs per evidence category (what the ``pairs`` null
        model expects)."""
        k = len(self.class_names)
        if self.evidence is None or k < 2:
            return {c: float("nan") for c in EVIDENCE_CATEGORIES}
        cats = evidence_matrix(self.evidence)[np.triu_indices(k, 1)]
        return {c: float(np.mean(cats == c)) for c in EVIDENCE_CATEGORIES}

    def pair_distribution(self) -> dict[str, float]:
        """Share of all unordered class pairs per category: what chance alone gives."""
        iu = np.triu_indices(len(self.class_names), 1)
        return _fractions(_count(classify_jaccard(self.jaccard[iu], self.bounds)))

    def table(self, level: str = "triples"):
        """pandas DataFrame: categories x (observed, expected under each null model)."""

        obs = self.counts(level)
        data = {"observed": [obs[c] for c in CATEGORIES]}
        for (model, lev), s in sorted(self.nulls.items()):
            if lev == level:
                data[f"null_{model}"] = [s.mean_counts[c] for c in CATEGORIES]
        return pd.DataFrame(data, index=list(CATEGORIES))

    def rows(self, level: str = "triples", limit: int | None = None) -> list[dict[str, Any]]:
        r = self._rows(level)
        cats = self.categories(level)
        ecats = self.evidence_categories(level)
        w = np.asarray(self._weights(level))
        out = []
        for i in range(len(r) if limit is None else min(limit, len(r))):
            c, p, n = (int(v) for v in r[i])
            row = {"channel": c, "positive": self.class_names[p],
                   "negative": self.class_names[n], "w_pos": float(w[0][i]),
                   "w_neg": float(w[1][i]), "jaccard": float(self.jaccard[p, n]),
                   "category": str(cats[i]), "category_evidence": str(ecats[i])}
            if self.evidence is not None:
                pe = self.evidence.pair(self.class_names[p], self.class_names[n])
                row.update({"observed": pe.observed, "expected": pe.expected, "lift": pe.lift,
                            "lift_ci": list(pe.lift_ci), "p_value": pe.p_value})
            out.append(row)
        return out

    def _weights(self, level: str):
        if level == "triples":
            return self.weights_pos, self.weights_neg
        idx = {tuple(t): i for i, t in enumerate(self.triples.tolist())}
        sel = [idx[tuple(t)] for t in self.channel_pairs.tolist()]
        return self.weights_pos[sel], self.weights_neg[sel]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": SCHEMA, "class_names": list(self.class_names), "rule": self.rule,
            "bounds": list(self.bounds), "num_channels": self.num_channels,
            "n_polarized_channels": int(len(np.unique(self.triples[:, 0]))),
            "n_triples": int(len(self.triples)), "n_channel_pairs": int(len(self.channel_pairs)),
            "max_channels": self.max_channels, "n_null": self.n_null, "seed": self.seed,
            "counts": {lev: self.counts(lev) for lev in ("triples", "channels")},
            "all_class_pairs": self.pair_distribution(),
            "counts_evidence": {lev: self.counts_evidence(lev)
                                for lev in ("triples", "channels")},
            "all_class_pairs_evidence": self.pair_distribution_evidence(),
            "category_schemes": {"counts": JACCARD_NOTE, "counts_evidence": EVIDENCE_NOTE},
            "exclusion_rule": None if self.evidence is None else self.evidence.rule.to_dict(),
            "evidence_n_images": None if self.evidence is None else self.evidence.n,
            "evidence_warnings": [] if self.evidence is None else list(self.evidence.warnings),
            "exclusive_pairs": [] if self.evidence is None
            else [[p.a, p.b] for p in self.evidence.exclusive_pairs()],
            "jaccard_max_offdiag": float(np.nanmax(np.where(
                np.eye(len(self.class_names), dtype=bool), np.nan, self.jaccard)))
            if len(self.class_names) > 1 else None,
            "nulls": {f"{m}/{lev}": s.to_dict() for (m, lev), s in sorted(self.nulls.items())},
            "channels": self.rows("channels", limit=200),
        }
        return out


def _check_inputs(weight: Any, labels: Any, class_names: Sequence[str] | None
                  ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise DataError(f"polarity_analysis needs the classifier weight as [K, C]; got shape "
                        f"{w.shape}. Pass model.classifier.weight (or Features.weight).")
    if not np.isfinite(w).all():
        raise DataError("polarity_analysis: the weight matrix holds NaN/Inf values.")
    y = multihot(labels, w.shape[0])
    if y.shape[1] != w.shape[0]:
        raise DataError(f"polarity_analysis: the weight has {w.shape[0]} class rows but the labels "
                        f"have {y.shape[1]} columns; use the training labels of the same classes.")
    if w.shape[0] < 2:
        raise DataError("polarity_analysis needs at least 2 classes.")
    names = tuple(class_names) if class_names is not None else tuple(
        f"class{i}" for i in range(w.shape[0]))
    if len(names) != w.shape[0]:
        raise DataError(f"polarity_analysis: {len(names)} class names for {w.shape[0]} classes.")
    return w, y, names


def polarity_analysis(
    weight: np.ndarray,
    train_labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    rule: StrongWeightRule | str | Mapping[str, Any] = QuantileRule(q=0.9),
    bounds: tuple[float, float] = (0.1, 0.3),
    n_null: int = 200,
    null_models: Sequence[str] = NULL_MODELS,
    max_channels: int | None = None,
    seed: int = 0,
    exclusion_rule: ExclusionRule | None = None,
) -> PolarityResult:
    """Polarized channels of a classifier and their label-Jaccard categories vs chance, with the
    evidence category of each class pair next to them.

    Args:
        weight: classifier weight ``[K, C]`` (class rows, penultimate-channel columns).
        train_labels: training labels ``[N, K]`` (0/1, NaN = unknown) or class indices ``[N]``.
        class_names: K names.
        rule: which weights are strong (default: ``|w|`` in the top 10% of its class row).
        bounds: Jaccard bounds between legitimate/mixed and mixed/conflict.
        n_null: draws per null model (0 = no null models).
        null_models: any of ``pairs``, ``columns``, ``rows`` (see the module docstring).
        max_channels: keep only the most polarized channels in the channel-level table (seed
            000 reports 100); ``None`` keeps all.
        seed: seed of the null draws.
        exclusion_rule: the :class:`~medscalpel.data.cooccurrence.ExclusionRule` of the evidence
            categories (default rule: upper 95% bound of the lift < 0.1, >= 10 expected
            co-occurrences, >= 5000 images).

    Returns:
        A :class:`PolarityResult`.

    Raises:
        DataError: shapes or label values do not fit.
        ConfigError: bad rule, bounds, null model names or counts.
    """
    w, y, names = _check_inputs(weight, train_labels, class_names)
    r = make_rule(rule)
    lo, hi = (float(b) for b in bounds)
    if not 0 < lo < hi <= 1:
        raise ConfigError(f"The 'bounds' parameter of polarity_analysis must satisfy 0 < b0 < b1 "
                          f"<= 1. Got {bounds!r} instead.")
    check_range(n_null, "n_null", "polarity_analysis", 0, integer=True)
    for m in null_models:
        if m not in NULL_MODELS:
            raise ConfigError(f"The 'null_models' parameter of polarity_analysis must contain only "
                              f"{', '.join(repr(x) for x in NULL_MODELS)}. Got {m!r} instead.")
    if max_channels is not None:
        check_range(max_channels, "max_channels", "polarity_analysis", 1, integer=True)
    jac = jaccard_matrix(y)
    pos, neg = r.masks(w)
    trip = _triples(w, pos, neg)
    chp = _channel_pairs(w, pos, neg, max_channels)
    wp, wn = _weights_of(w, trip)
    evidence = cooccurrence_evidence(y, names, exclusion_rule)
    res = PolarityResult(class_names=names, rule=r.to_dict(), bounds=(lo, hi), jaccard=jac,
                         triples=trip, channel_pairs=chp, weights_pos=wp, weights_neg=wn,
                         num_channels=int(w.shape[1]), n_null=n_null, seed=seed,
                         max_channels=max_channels, evidence=evidence)
    if n_null > 0:
        rng = np.random.default_rng(seed)
        for model in null_models:
            draws = _null_draws(model, w, r, trip, chp, jac, (lo, hi), n_null, max_channels, rng)
            for level, counts in draws.items():
                res.nulls[(model, level)] = _summarise(model, level, counts, res.counts(level))
    return res


# ----------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class StagePolarity:
    """:class:`PolarityResult` per compression stage (e.g. dense, lossless, pruned)."""

    results: dict[str, PolarityResult]

    def table(self, level: str = "channels"):
        """pandas DataFrame: one row per stage, observed counts and the null expectations."""

        rows = []
        for stage, r in self.results.items():
            row: dict[str, Any] = {"stage": stage, "num_channels": r.num_channels,
                                   "n": int(len(r._rows(level)))}
            row.update(r.counts(level))
            row.update({f"evidence_{c}": v for c, v in r.counts_evidence(level).items()})
            for (model, lev), s in sorted(r.nulls.items()):
                if lev == level:
                    row[f"exclusive_null_{model}"] = s.exclusive_fraction_null
                    row[f"p_{model}"] = s.p_value
            rows.append(row)
        return pd.DataFrame(rows).set_index("stage")

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA,
                "stages": {k: v.to_dict() for k, v in self.results.items()},
                "table_channels": self.table("channels").reset_index().to_dict(orient="records"),
                "table_triples": self.table("triples").reset_index().to_dict(orient="records")}


def compare_stages(weights: Mapping[str, np.ndarray], train_labels: np.ndarray,
                   class_names: Sequence[str] | None = None, **kwargs: Any) -> StagePolarity:
    """Run :func:`polarity_analysis` on the classifier weight of each compression stage.

    Args:
        weights: stage name -> weight ``[K, C_stage]`` (the channel count may differ: pruning).
        train_labels: the training labels shared by all stages.
        class_names: K names.
        **kwargs: passed to :func:`polarity_analysis` (rule, bounds, n_null, seed, ...).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0); Y = (rng.random((100, 3)) < 0.3).astype(float)
        >>> out = compare_stages({"dense": rng.normal(size=(3, 20)),
        ...                       "pruned": rng.normal(size=(3, 10))}, Y, n_null=5)
        >>> list(out.results)
        ['dense', 'pruned']
    """
    if not weights:
        raise ConfigError("compare_stages needs at least one stage, e.g. {'dense': W}.")
    return StagePolarity({str(k): polarity_analysis(np.asarray(v), train_labels, class_names,
                                                    **kwargs) for k, v in weights.items()})


__all__ = ["CATEGORIES", "EVIDENCE_CATEGORIES", "EVIDENCE_NOTE", "JACCARD_NOTE", "NULL_MODELS",
           "POLARITY_RULES", "SCHEMA", "AbsoluteRule", "NullSummary", "PolarityResult",
           "QuantileRule", "StagePolarity", "StrongWeightRule", "TopKRule", "ZScoreRule",
           "classify_jaccard", "compare_stages", "evidence_matrix", "jaccard_matrix",
           "make_rule", "multihot", "polarity_analysis"]
