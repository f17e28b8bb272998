"""Evidence that two labels are mutually exclusive: observed vs expected co-occurrence.

A low Jaccard index only says that one of two findings is rare: on NIH ChestX-ray14 25 of the 91
label pairs have Jaccard < 0.01, yet every one of them co-occurs, most at close to the rate
independence predicts. This module asks the question a report needs answered instead: *do the
two labels co-occur significantly less often than if they were independent, and is there enough
data to tell?*

For every pair ``(a, b)`` of a multi-hot label matrix (NaN = unknown; a row whose label a or b is
unknown is left out of that pair):

* ``n``: images with both labels known; ``count_a``, ``count_b``: positives among them;
* ``observed``: images positive for both;
* ``expected = n * p_a * p_b = count_a * count_b / n``: the co-occurrences independence predicts;
* ``lift = observed / expected`` (1 = independent, 0 = never together);
* ``p_value``: one-sided exact test for *fewer* co-occurrences than expected, conditional on the
  margins (hypergeometric lower tail ``P(X <= observed)``, identical to Fisher's exact test with
  ``alternative="less"``);
* ``lift_ci``: the exact (Garwood) Poisson confidence interval of ``observed`` divided by
  ``expected`` (margins fixed, as in the test). The hypergeometric count has a smaller variance
  than the Poisson one, so this interval is, if anything, wider than the exact conditional one:
  it errs on the side of *not* calling a pair exclusive.

The rule (:class:`ExclusionRule`, the defaults): a pair is mutually exclusive only when

1. the upper bound of the 95% CI of the lift is below ``max_lift_upper = 0.1`` (the pair
   co-occurs at most a tenth as often as independence predicts), AND
2. ``expected >= min_expected = 10`` co-occurrences (with fewer, "never seen together" is what
   chance alone gives), AND
3. ``n >= min_images = 5000`` images (below it no pair is excluded at all and the result carries
   a warning). Conditions 1-2 already demand dozens of expected co-occurrences; this one guards
   against judging exclusivity from a small sample at all, whose label mix may not represent
   the training population (the 1,000-image NIH sample has 26 pairs that never co-occur, by
   chance alone). 5,000 is a policy choice, deliberately above such samples; it is a parameter.

With ``observed = 0`` the upper bound is ``3.689 / expected``, so condition 1 needs about 37
expected co-occurrences: a pair is called exclusive only when dozens of joint cases were expected
and (almost) none were seen.

Example:
    >>> import numpy as np
    >>> y = np.array([[1, 1], [1, 0], [0, 1], [0, 0]] * 500, float)
    >>> ev = cooccurrence_evidence(y, ["a", "b"])
    >>> p = ev.pair("a", "b")
    >>> p.observed, p.expected, p.lift, p.exclusive
    (500, 500.0, 1.0, False)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import chi2, hypergeom

from medscalpel.errors import DataError
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_in, check_range

SCHEMA_VERSION = 1
#: what the rule says about a pair
VERDICTS = ("exclusive", "not_exclusive", "insufficient")


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _json_num(v: float) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


# ----------------------------------------------------------------------------- rule
@dataclass(frozen=True)
class ExclusionRule:
    """When the label statistics count a pair as mutually exclusive (see the module docstring).

    Attributes:
        max_lift_upper: the upper CI bound of the lift must be below this.
        min_expected: at least this many co-occurrences expected under independence.
        min_images: at least this many images with both labels known (below it: no exclusion).
        confidence: two-sided confidence level of the lift CI.
    """

    max_lift_upper: float = 0.1
    min_expected: float = 10.0
    min_images: int = 5000
    confidence: float = 0.95
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        o = "ExclusionRule"
        check_range(self.max_lift_upper, "max_lift_upper", o, 0.0, 1.0, low_inclusive=False)
        check_range(self.min_expected, "min_expected", o, 0.0, low_inclusive=False)
        check_range(self.min_images, "min_images", o, 1, integer=True)
        check_range(self.confidence, "confidence", o, 0.0, 1.0, low_inclusive=False,
                    high_inclusive=False)

    def describe(self) -> str:
        """The rule in one sentence (shown in reports)."""
        return (f"mutually exclusive only when the upper {self.confidence:.0%} confidence bound "
                f"of the lift (observed / expected co-occurrences) is below "
                f"{self.max_lift_upper:g}, at least {self.min_expected:g} co-occurrences are "
                f"expected under independence and at least {self.min_images} images have both "
                "labels")

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "max_lift_upper": self.max_lift_upper,
                "min_expected": self.min_expected, "min_images": self.min_images,
                "confidence": self.confidence}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExclusionRule":
        _check_schema(d, "ExclusionRule")
        return cls(max_lift_upper=float(d.get("max_lift_upper", 0.1)),
                   min_expected=float(d.get("min_expected", 10.0)),
                   min_images=int(d.get("min_images", 5000)),
                   confidence=float(d.get("confidence", 0.95)))


def _check_schema(d: Mapping[str, Any], what: str) -> None:
    if int(d.get("schema_version", 1)) > SCHEMA_VERSION:
        raise DataError(f"{what} schema {d.get('schema_version')} is newer than this medscalpel "
                        f"reads ({SCHEMA_VERSION}); upgrade medscalpel.")


# ----------------------------------------------------------------------------- one pair
@dataclass(frozen=True)
class PairEvidence:
    """Co-occurrence evidence of one label pair (see the module docstring for definitions).

    Attributes:
        a, b: the two class names.
        n: images with both labels known; count_a / count_b: positives among them.
        observed, expected, lift, lift_ci, p_value: as defined in the module docstring.
        jaccard: ``observed / (count_a + count_b - observed)`` (for comparison only).
        exclusive: the rule holds.
        reasons: why the pair is *not* exclusive (empty when it is).
        verdict: ``exclusive``; ``not_exclusive`` (enough data, the lift's upper bound is not
            low enough); ``insufficient`` (too few images or expected co-occurrences to tell,
            or a class without positives).
    """

    a: str
    b: str
    n: int
    count_a: int
    count_b: int
    observed: int
    expected: float
    lift: float
    lift_ci: tuple[float, float]
    p_value: float
    jaccard: float
    exclusive: bool
    reasons: tuple[str, ...] = ()

    verdict: str = ""

    def __post_init__(self) -> None:
        if not self.verdict:
            object.__setattr__(self, "verdict", "exclusive" if self.exclusive else
                               "not_exclusive")
        check_in(self.verdict, "verdict", "PairEvidence", VERDICTS)

    def summary(self) -> str:
        """``observed 21 vs expected 27.0 (lift 0.78, 95% CI 0.48-1.19, p = 0.14, n = 112120)``."""
        lo, hi = self.lift_ci
        return (f"observed {self.observed} vs expected {self.expected:.1f} (lift "
                f"{self.lift:.2f}, 95% CI {lo:.2f}-{hi:.2f}, p = {self.p_value:.3g}, "
                f"n = {self.n})")

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "n": self.n, "count_a": self.count_a,
                "count_b": self.count_b, "observed": self.observed,
                "expected": _json_num(self.expected), "lift": _json_num(self.lift),
                "lift_ci": [_json_num(self.lift_ci[0]), _json_num(self.lift_ci[1])],
                "p_value": _json_num(self.p_value), "jaccard": _json_num(self.jaccard),
                "exclusive": self.exclusive, "verdict": self.verdict,
                "reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PairEvidence":
        ci = d.get("lift_ci") or [None, None]
        return cls(a=str(d["a"]), b=str(d["b"]), n=int(d["n"]), count_a=int(d["count_a"]),
                   count_b=int(d["count_b"]), observed=int(d["observed"]),
                   expected=_num(d.get("expected")), lift=_num(d.get("lift")),
                   lift_ci=(_num(ci[0]), _num(ci[1])), p_value=_num(d.get("p_value")),
                   jaccard=_num(d.get("jaccard")), exclusive=bool(d["exclusive"]),
                   reasons=tuple(d.get("reasons", ())), verdict=str(d.get("verdict", "")))


# ----------------------------------------------------------------------------- all pairs
@dataclass(frozen=True)
class CooccurrenceEvidence:
    """Evidence for every label pair ``i < j`` and the rule it was judged by.

    Attributes:
        class_names: K names.
        n: images in the label table.
        rule: the :class:`ExclusionRule`.
        pairs: one :class:`PairEvidence` per pair ``i < j`` in class order.
        warnings: e.g. too few images to exclude anything.
        source: where the labels came from (dataset spec and split), for display.
        approximate: the counts are approximate (unknown labels counted as negative): no pair
            is called exclusive.
    """

    class_names: tuple[str, ...]
    n: int
    rule: ExclusionRule
    pairs: tuple[PairEvidence, ...]
    warnings: tuple[str, ...] = ()
    source: str = ""
    approximate: bool = False
    schema_version: int = SCHEMA_VERSION

    @property
    def enough_images(self) -> bool:
        return self.n >= self.rule.min_images

    def pair(self, a: str, b: str) -> PairEvidence:
        """The evidence of pair ``(a, b)`` (either order)."""
        for p in self.pairs:
            if (p.a, p.b) in ((a, b), (b, a)):
                return p
        raise DataError(f"No co-occurrence evidence for the pair ({a!r}, {b!r}); the classes are "
                        f"{list(self.class_names)}.")

    def exclusive_pairs(self) -> list[PairEvidence]:
        return [p for p in self.pairs if p.exclusive]

    def matrix(self, field_name: str, class_names: Sequence[str] | None = None) -> np.ndarray:
        """``[K, K]`` symmetric matrix of one pair field (``lift``, ``expected``, ``exclusive``,
        ...) in the order of ``class_names`` (default: this object's); the diagonal is NaN
        (False for ``exclusive``)."""
        names = list(self.class_names if class_names is None else class_names)
        idx = {c: i for i, c in enumerate(names)}
        boolean = field_name == "exclusive"
        out = np.zeros((len(names), len(names)), bool) if boolean else \
            np.full((len(names), len(names)), np.nan)
        for p in self.pairs:
            if p.a in idx and p.b in idx:
                v = getattr(p, field_name)
                out[idx[p.a], idx[p.b]] = out[idx[p.b], idx[p.a]] = v
        return out

    def with_rule(self, rule: ExclusionRule) -> "CooccurrenceEvidence":
        """The same counts judged by another rule (each pair keeps its n, counts, observed)."""
        if rule == self.rule:
            return self
        extra = tuple(w for w in self.warnings if not w.startswith(("only ", "approximate ")))
        names = {c: i for i, c in enumerate(self.class_names)}
        k = len(self.class_names)
        pair_n = np.zeros((k, k), np.int64)
        pos = np.zeros((k, k), np.int64)
        co = np.zeros((k, k), np.int64)
        for p in self.pairs:
            i, j = names[p.a], names[p.b]
            pair_n[i, j] = pair_n[j, i] = p.n
            pos[i, j], pos[j, i] = p.count_a, p.count_b
            co[i, j] = co[j, i] = p.observed
        return evidence_from_counts(self.class_names, self.n, pair_n, pos, co, rule,
                                    source=self.source, warnings=extra,
                                    approximate=self.approximate)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "kind": "cooccurrence_evidence",
                "class_names": list(self.class_names), "n": self.n,
                "rule": self.rule.to_dict(), "rule_text": self.rule.describe(),
                "enough_images": self.enough_images,
                "n_exclusive": len(self.exclusive_pairs()),
                "exclusive_pairs": [[p.a, p.b] for p in self.exclusive_pairs()],
                "warnings": list(self.warnings), "source": self.source,
                "approximate": self.approximate, "pairs": [p.to_dict() for p in self.pairs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CooccurrenceEvidence":
        _check_schema(d, "Co-occurrence evidence")
        return cls(class_names=tuple(d["class_names"]), n=int(d["n"]),
                   rule=ExclusionRule.from_dict(d.get("rule", {})),
                   pairs=tuple(PairEvidence.from_dict(p) for p in d.get("pairs", [])),
                   warnings=tuple(d.get("warnings", ())), source=str(d.get("source", "")),
                   approximate=bool(d.get("approximate", False)))

    def save(self, path: str | os.PathLike) -> Path:

        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CooccurrenceEvidence":

        return cls.from_dict(read_json(path))


# ----------------------------------------------------------------------------- statistics
def poisson_ci(observed: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) two-sided CI of a Poisson mean given one observed count.

    Example:
        >>> tuple(round(v, 3) for v in poisson_ci(0))
        (0.0, 3.689)
    """

    alpha = 1.0 - confidence
    lo = 0.0 if observed == 0 else float(chi2.ppf(alpha / 2, 2 * observed) / 2)
    hi = float(chi2.ppf(1 - alpha / 2, 2 * (observed + 1)) / 2)
    return lo, hi


def pair_evidence(a: str, b: str, n: int, count_a: int, count_b: int, observed: int,
                  rule: ExclusionRule = ExclusionRule()) -> PairEvidence:
    """Evidence of one pair from its 2x2 margins (``n`` images, ``count_a`` / ``count_b``
    positives, ``observed`` positive for both).

    Example:
        >>> p = pair_evidence("Effusion", "Hernia", 112120, 13317, 227, 21)
        >>> round(p.expected, 1), p.exclusive
        (27.0, False)
    """

    n, ca, cb, o = int(n), int(count_a), int(count_b), int(observed)
    if not (0 <= o <= min(ca, cb) and max(ca, cb) <= n):
        raise DataError(f"pair_evidence({a!r}, {b!r}): inconsistent counts n={n}, "
                        f"count_a={ca}, count_b={cb}, observed={o}.")
    reasons: list[str] = []
    if n == 0:
        return PairEvidence(a, b, 0, ca, cb, o, float("nan"), float("nan"),
                            (float("nan"), float("nan")), float("nan"), float("nan"), False,
                            ("no image has both labels known",), "insufficient")
    expected = ca * cb / n
    union = ca + cb - o
    jac = o / union if union > 0 else float("nan")
    if expected > 0:
        lift = o / expected
        lo, hi = poisson_ci(o, rule.confidence)
        ci = (lo / expected, hi / expected)
        p = float(min(1.0, hypergeom.cdf(o, n, ca, cb)))
    else:
        lift, ci, p = float("nan"), (float("nan"), float("nan")), float("nan")
        reasons.append(f"class {a if ca == 0 else b!r} has no positive image")
    if n < rule.min_images:
        reasons.append(f"too few images ({n} < {rule.min_images})")
    if expected < rule.min_expected and expected > 0:
        reasons.append(f"too few expected co-occurrences ({expected:.1f} < "
                       f"{rule.min_expected:g})")
    insufficient = bool(reasons)
    if expected > 0 and not ci[1] < rule.max_lift_upper:
        reasons.append(f"upper CI bound of the lift {ci[1]:.3g} >= {rule.max_lift_upper:g}")
    verdict = "insufficient" if insufficient else ("not_exclusive" if reasons else "exclusive")
    return PairEvidence(a=a, b=b, n=n, count_a=ca, count_b=cb, observed=o,
                        expected=float(expected), lift=float(lift),
                        lift_ci=(float(ci[0]), float(ci[1])), p_value=p, jaccard=float(jac),
                        exclusive=not reasons, reasons=tuple(reasons), verdict=verdict)


def evidence_from_counts(class_names: Sequence[str], n_images: int, pair_n: np.ndarray,
                         pos_known: np.ndarray, cooccurrence: np.ndarray,
                         rule: ExclusionRule = ExclusionRule(), source: str = "",
                         warnings: Sequence[str] = (), approximate: bool = False
                         ) -> CooccurrenceEvidence:
    """:class:`CooccurrenceEvidence` from count matrices.

    Args:
        class_names: K names.
        n_images: rows of the label table.
        pair_n: ``[K, K]`` images with both labels known.
        pos_known: ``[K, K]``, ``[i, j]`` = images positive for i whose label j is known.
        cooccurrence: ``[K, K]`` images positive for both.
        rule: the :class:`ExclusionRule`.
        source, warnings: recorded with the result.
        approximate: the counts are approximate (e.g. unknown labels counted as negative): every
            pair is judged ``insufficient`` and nothing is excluded.
    """
    names = tuple(str(c) for c in class_names)
    k = len(names)
    mats = [np.asarray(m) for m in (pair_n, pos_known, cooccurrence)]
    for m, what in zip(mats, ("pair_n", "pos_known", "cooccurrence")):
        if m.shape != (k, k):
            raise DataError(f"evidence_from_counts: '{what}' has shape {m.shape}; the {k} "
                            f"classes need ({k}, {k}).")
    nn_, s, co = mats
    pairs = tuple(pair_evidence(names[i], names[j], int(nn_[i, j]), int(s[i, j]), int(s[j, i]),
                                int(co[i, j]), rule)
                  for i in range(k) for j in range(i + 1, k))
    warns = list(warnings)
    if approximate:
        pairs = tuple(replace(p, exclusive=False, verdict="insufficient",
                              reasons=p.reasons + ("approximate counts",)) for p in pairs)
        warns.append("approximate counts: some labels are unknown and the statistics lack "
                     "per-pair known counts (written before label statistics schema 2), so no "
                     "pair is called exclusive; recompute them with 'medscalpel data stats'")
    if int(n_images) < rule.min_images:
        warns.append(f"only {int(n_images)} images in the label statistics (< {rule.min_images}): "
                     "too few to call any pair mutually exclusive, so none is and nothing is "
                     "excluded (pairs that never co-occur in a small sample mostly do so by "
                     "chance)")
    return CooccurrenceEvidence(class_names=names, n=int(n_images), rule=rule, pairs=pairs,
                                warnings=tuple(warns), source=source, approximate=approximate)


def count_matrices(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """``(pair_n, pos_known, cooccurrence)`` of a multi-hot ``[N, K]`` matrix (NaN = unknown) or
    multi-class indices ``[N]`` (see :func:`evidence_from_counts`)."""
    y = np.asarray(labels)
    if y.ndim == 1:
        if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0
                       or y.max() >= num_classes):
            raise DataError(f"cooccurrence_evidence: multi-class labels must be integers in "
                            f"[0, {num_classes}); got dtype {y.dtype}.")
        onehot = np.zeros((len(y), num_classes), np.float64)
        onehot[np.arange(len(y)), y.astype(np.int64)] = 1.0
        y = onehot
    if y.ndim != 2 or y.shape[1] != num_classes:
        raise DataError(f"cooccurrence_evidence: labels of shape {y.shape} do not match the "
                        f"{num_classes} class names.")
    y = y.astype(np.float64)
    known = np.isfinite(y)
    vals = y[known]
    if vals.size and not np.isin(vals, (0.0, 1.0)).all():
        raise DataError("cooccurrence_evidence: labels must be 0/1 (NaN = unknown); got values "
                        f"{sorted(set(vals.tolist()) - {0.0, 1.0})[:5]}.")
    pos = np.where(known, y, 0.0)
    kn = known.astype(np.float64)
    pair_n = (kn.T @ kn).astype(np.int64)
    pos_known = (pos.T @ kn).astype(np.int64)
    co = (pos.T @ pos).astype(np.int64)
    return pair_n, pos_known, co


def cooccurrence_evidence(labels: np.ndarray, class_names: Sequence[str],
                          rule: ExclusionRule | None = None, source: str = ""
                          ) -> CooccurrenceEvidence:
    """Co-occurrence evidence of every label pair, judged by ``rule``.

    Args:
        labels: multi-hot ``[N, K]`` (0/1, NaN = unknown: that row leaves the pairs of that
            label) or multi-class indices ``[N]``.
        class_names: K names.
        rule: the :class:`ExclusionRule` (default: upper 95% bound of the lift < 0.1, >= 10
            expected co-occurrences, >= 5000 images).
        source: where the labels came from (shown with the evidence).

    Returns:
        A :class:`CooccurrenceEvidence`.

    Raises:
        DataError: labels that are not 0/1/NaN or do not match the class names.
    """
    names = [str(c) for c in class_names]
    rule = ExclusionRule() if rule is None else rule
    pair_n, pos_known, co = count_matrices(labels, len(names))
    return evidence_from_counts(names, int(np.asarray(labels).shape[0]), pair_n, pos_known, co,
                                rule, source=source)
