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
from medscalpel.registry import Registry
from medscalpel.validation import check_fraction, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
#: seed 000's Jaccard categories (for comparison with the seed paper only)
CATEGORIES = ("perfect", "legitimate", "mixed", "conflict", "undefined")
#: evidence categories (:mod:`medscalpel.data.cooccurrence` verdicts)
EVIDENCE_CATEGORIES = VERDICTS
JACCARD_NOTE = ("Jaccard categories of seed 000 (perfect J = 0, legitimate 0 < J < b0, mixed, "
                "conflict), kept for comparison with the seed paper only: a low Jaccard index "
                "says that one label is rare, not that the two exclude each other")
EVIDENCE_NOTE = ("evidence categories: 'exclusive' when the labels co-occur significantly less "
                 "than independence predicts by the exclusion rule (see 'exclusion_rule'), "
                 "'not_exclusive' when the data could tell and the rule does not hold, "
                 "'insufficient' when too few images or expected co-occurrences")
NULL_MODELS = ("pairs", "columns", "rows")

#: strong-weight rules by name (``quantile``, ``zscore``, ``topk``, ``absolute``)
POLARITY_RULES: Registry["StrongWeightRule"] = Registry("polarity rule")


# ----------------------------------------------------------------------------- rules
class StrongWeightRule:
    """Decides which classifier weights are *strong*. Subclasses implement :meth:`strong`."""

    name = "base"

    def strong(self, weight: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Bool ``[K, C]``: ``weight[k, c]`` is strong."""
        raise NotImplementedError

    def masks(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(strong positive, strong negative) bool ``[K, C]`` masks; zero weights are neither."""
        s = self.strong(weight)
        return s & (weight > 0), s & (weight < 0)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return {"name": self.name, **d}


@POLARITY_RULES.register("quantile", help="|w| at or above the q-quantile of |w| in its class row")
@dataclass(frozen=True)
class QuantileRule(StrongWeightRule):
    """``|W[k, c]| >= quantile_q(|W[k, :]|)``: the channel is among the ``1 - q`` strongest
    channels (by magnitude) of class ``k``'s classifier row."""

    q: float = 0.9
    name = "quantile"

    def __post_init__(self):
        check_fraction(self.q, "q", "QuantileRule")

    def strong(self, weight: np.ndarray) -> np.ndarray:
        a = np.abs(weight)
        thr = np.quantile(a, self.q, axis=1, keepdims=True)
        return a >= thr

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "q": self.q}


@POLARITY_RULES.register("zscore", help="|w| at least z standard deviations of its class row")
@dataclass(frozen=True)
class ZScoreRule(StrongWeightRule):
    """``|W[k, c] - mean_k| >= z * std_k`` over class ``k``'s row."""

    z: float = 2.0
    name = "zscore"

    def __post_init__(self):
        check_range(self.z, "z", "ZScoreRule", 0.0, low_inclusive=False)

    def strong(self, weight: np.ndarray) -> np.ndarray:
        mu = weight.mean(1, keepdims=True)
        sd = weight.std(1, keepdims=True)
        return np.abs(weight - mu) >= self.z * np.where(sd > 0, sd, np.inf)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "z": self.z}


@POLARITY_RULES.register("topk", help="the k largest |w| of each class row")
@dataclass(frozen=True)
class TopKRule(StrongWeightRule):
    """The ``k`` channels of largest ``|W[k, c]|`` in each class row (ties broken by index)."""

    k: int = 10
    name = "topk"

    def __post_init__(self):
        check_range(self.k, "k", "TopKRule", 1, integer=True)

    def strong(self, weight: np.ndarray) -> np.ndarray:
        k = min(self.k, weight.shape[1])
        idx = np.argsort(-np.abs(weight), axis=1, kind="stable")[:, :k]
        out = np.zeros(weight.shape, bool)
        np.put_along_axis(out, idx, True, axis=1)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k}


@POLARITY_RULES.register("absolute", help="|w| at or above a fixed threshold")
@dataclass(frozen=True)
class AbsoluteRule(StrongWeightRule):
    """``|W[k, c]| >= threshold``."""

    threshold: float = 0.1
    name = "absolute"

    def __post_init__(self):
        check_range(self.threshold, "threshold", "AbsoluteRule", 0.0, low_inclusive=False)

    def strong(self, weight: np.ndarray) -> np.ndarray:
        return np.abs(weight) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold}


def make_rule(rule: StrongWeightRule | str | Mapping[str, Any]) -> StrongWeightRule:
    """A rule object from an instance, a name (``"quantile"``) or ``{"name": .., **params}``."""
    if isinstance(rule, StrongWeightRule):
        return rule
    if isinstance(rule, str):
        return POLARITY_RULES.create(rule)
    if isinstance(rule, Mapping):
        params = dict(rule)
        name = params.pop("name", None)
        if name is None:
            raise ConfigError("A polarity rule given as a mapping needs a 'name' key, e.g. "
                              "{'name': 'quantile', 'q': 0.9}.")
        return POLARITY_RULES.create(name, **params)
    raise ConfigError(f"The 'rule' parameter of polarity_analysis must be a StrongWeightRule, a "
                      f"name in {POLARITY_RULES.names()} or a mapping. Got {rule!r} instead.")


# ----------------------------------------------------------------------------- Jaccard
def multihot(labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """``[N, K]`` float labels (NaN = unknown) from multi-hot or multi-class int ``[N]`` labels."""
    y = np.asarray(labels)
    if y.ndim == 1:
        if num_classes is None:
            num_classes = int(y.max()) + 1 if y.size else 0
        out = np.zeros((len(y), num_classes), np.float64)
        out[np.arange(len(y)), y.astype(np.int64)] = 1.0
        return out
    if y.ndim != 2:
        raise DataError(f"Labels must be [N, K] multi-hot or [N] class indices; got {y.shape}.")
    y = y.astype(np.float64)
    bad = ~np.isnan(y) & (y != 0) & (y != 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"Labels must be 0/1 (NaN = unknown); row {r}, column {c} holds "
                        f"{float(y[r, c]):g}. Binarise uncertain labels first.")
    return y


def jaccard_matrix(labels: np.ndarray) -> np.ndarray:
    """Pairwise Jaccard index ``|a & b| / |a | b|`` of the label columns, ``[K, K]``.

    Rows where either label is unknown (NaN) are left out of that pair. Pairs whose union is
    empty (neither label ever positive) get NaN.
    """
    y = multihot(labels)
    known = (~np.isnan(y)).astype(np.float64)
    a = np.nan_to_num(y, nan=0.0)
    inter = a.T @ a
    s = a.T @ known                      # s[i, j] = #(y_i = 1 and y_j known)
    union = s + s.T - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.where(union > 0, inter / np.where(union > 0, union, 1.0), np.nan)
    np.fill_diagonal(j, np.where(np.diag(union) > 0, 1.0, np.nan))
    return j


def classify_jaccard(j: float | np.ndarray, bounds: tuple[float, float] = (0.1, 0.3)) -> np.ndarray:
    """Seed 000's categories: perfect J = 0, legitimate 0 < J < b0, mixed b0 <= J < b1,
    conflict J >= b1; NaN (neither label ever positive) -> 'undefined'.

    For comparison with the seed paper only: these categories are no evidence of mutual
    exclusivity (see :func:`evidence_matrix`)."""
    j = np.asarray(j, dtype=np.float64)
    lo, hi = bounds
    out = np.full(j.shape, "undefined", dtype=object)
    ok = ~np.isnan(j)
    out[ok & (j <= 0)] = "perfect"
    out[ok & (j > 0) & (j < lo)] = "legitimate"
    out[ok & (j >= lo) & (j < hi)] = "mixed"
    out[ok & (j >= hi)] = "conflict"
    return out


def _count(cats: np.ndarray) -> dict[str, int]:
    return {c: int(np.sum(cats == c)) for c in CATEGORIES}


def evidence_matrix(evidence: CooccurrenceEvidence) -> np.ndarray:
    """``[K, K]`` object array of each class pair's evidence category (``exclusive``,
    ``not_exclusive``, ``insufficient``; the diagonal ``insufficient``), in the evidence's class
    order."""
    k = len(evidence.class_names)
    out = np.full((k, k), "insufficient", dtype=object)
    idx = {c: i for i, c in enumerate(evidence.class_names)}
    for p in evidence.pairs:
        out[idx[p.a], idx[p.b]] = out[idx[p.b], idx[p.a]] = p.verdict
    return out


# ----------------------------------------------------------------------------- core
def _triples(weight: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """``[T, 3]`` (channel, positive class, negative class) of every polarized triple."""
    out = []
    for c in np.flatnonzero(pos.any(0) & neg.any(0)):
        p = np.flatnonzero(pos[:, c])
        n = np.flatnonzero(neg[:, c])
        pp, nn = np.meshgrid(p, n, indexing="ij")
        out.append(np.stack([np.full(pp.size, c), pp.ravel(), nn.ravel()], 1))
    return np.concatenate(out) if out else np.zeros((0, 3), np.int64)


def _channel_pairs(weight: np.ndarray, pos: np.ndarray, neg: np.ndarray,
                   max_channels: int | None) -> np.ndarray:
    """``[P, 3]`` (channel, strongest positive class, strongest negative class) of polarized
    channels, sorted by polarization strength min(w+, |w-|) (top ``max_channels`` kept)."""
    chans = np.flatnonzero(pos.any(0) & neg.any(0))
    if chans.size == 0:
        return np.zeros((0, 3), np.int64)
    wp = np.where(pos[:, chans], weight[:, chans], -np.inf)
    wn = np.where(neg[:, chans], weight[:, chans], np.inf)
    p = wp.argmax(0)
    n = wn.argmin(0)
    score = np.minimum(wp.max(0), -wn.min(0))
    order = np.argsort(-score, kind="stable")
    if max_channels is not None:
        order = order[:max_channels]
    return np.stack([chans[order], p[order], n[order]], 1)


def _fractions(counts: Mapping[str, float]) -> dict[str, float]:
    tot = sum(counts[c] for c in CATEGORIES if c != "undefined")
    return {c: (counts[c] / tot if tot else float("nan")) for c in CATEGORIES if c != "undefined"}


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


def _weights_of(weight: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(rows) == 0:
        return np.zeros(0), np.zeros(0)
    return weight[rows[:, 1], rows[:, 0]], weight[rows[:, 2], rows[:, 0]]


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
