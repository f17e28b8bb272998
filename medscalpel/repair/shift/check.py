"""The label-free shift check: is a new site's data shifted from the internal set (scores and
features), before any label is spent?"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import ks_2samp
from sklearn.covariance import LedoitWolf, ShrunkCovariance

from medscalpel.engine.predict import Features
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.repair.shift.estimator import SCHEMA
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- label-free check
@dataclass(frozen=True)
class ShiftCheck:
    """Label-free signs that a new site differs from the internal one.

    ``classes``: per class mean predicted probability internal / external, their difference and
    the two-sample KS statistic and p-value of the scores. ``feature``: distance between the
    internal and external penultimate-feature distributions (mean Mahalanobis distance to the
    internal features, external vs internal, and the share of external images above the
    internal 95th percentile), when features were given. ``shifted``: any KS p < ``alpha``
    (Bonferroni over classes) or more than twice the expected share of OOD images.
    """

    classes: tuple[dict[str, Any], ...]
    feature: dict[str, Any] | None
    shifted: bool
    reasons: tuple[str, ...]
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "kind": "shift_check", "classes": list(self.classes),
                "feature": self.feature, "shifted": self.shifted, "reasons": list(self.reasons),
                "alpha": self.alpha}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShiftCheck":
        return cls(tuple(d["classes"]), d.get("feature"), bool(d["shifted"]),
                   tuple(d["reasons"]), float(d["alpha"]))


def shift_check(internal: Predictions, external: Predictions,
                internal_features: Features | None = None,
                external_features: Features | None = None,
                train_features: Features | None = None, alpha: float = 0.01) -> ShiftCheck:
    """Compare score distributions (and features) of an internal and an external set without
    labels. ``train_features`` (default ``internal_features``) fit the OOD reference."""

    check_range(alpha, "alpha", "shift_check", 0.0, 1.0, low_inclusive=False)
    if tuple(internal.class_names) != tuple(external.class_names):
        raise DataError("shift_check: the two Predictions have different classes.")
    pi, pe = internal.probs(), external.probs()
    rows, reasons = [], []
    level = alpha / internal.num_classes
    for j, name in enumerate(internal.class_names):
        ks = ks_2samp(pi[:, j], pe[:, j])
        row = {"name": name, "mean_prob_internal": float(pi[:, j].mean()),
               "mean_prob_external": float(pe[:, j].mean()),
               "delta_mean_prob": float(pe[:, j].mean() - pi[:, j].mean()),
               "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue)}
        rows.append(row)
        if ks.pvalue < level:
            reasons.append(f"{name}: score distribution differs (KS {ks.statistic:.3f}, p "
                           f"{ks.pvalue:.2g}; mean probability {row['mean_prob_internal']:.3f} -> "
                           f"{row['mean_prob_external']:.3f})")
    feature = None
    if internal_features is not None and external_features is not None:
        ref = train_features if train_features is not None else internal_features
        scorer = OODScorer().fit(ref, calibration=internal_features)
        di, de = scorer.score(internal_features), scorer.score(external_features)
        share = float((de > scorer.threshold_95_).mean())
        feature = {"mean_distance_internal": float(di.mean()),
                   "mean_distance_external": float(de.mean()),
                   "distance_ratio": float(de.mean() / max(di.mean(), 1e-12)),
                   "share_external_above_p95": share, "expected_share": 0.05}
        if share > 0.10:
            reasons.append(f"feature space: {share:.0%} of external images lie beyond the internal "
                           "95th percentile of the distance to the training features (expected "
                           "5%)")
    return ShiftCheck(tuple(rows), feature, bool(reasons), tuple(reasons), alpha)


class OODScorer:
    """Per-image out-of-distribution score: the Mahalanobis distance of the penultimate features
    to the training features (Ledoit-Wolf shrunk covariance).

    Attributes (after :meth:`fit`): ``mean_``, ``precision_``, ``threshold_95_``,
    ``threshold_99_`` (percentiles of the distance on the calibration features: held-out
    internal images, else the training features themselves).
    """

    def __init__(self, shrinkage: float | None = None):
        self.shrinkage = shrinkage

    def fit(self, features: Features | np.ndarray,
            calibration: Features | np.ndarray | None = None) -> "OODScorer":

        x = _feat(features)
        if x.shape[0] < 2:
            raise DataError(f"OODScorer.fit needs at least 2 training feature rows; got "
                            f"{x.shape[0]}.")
        est = (LedoitWolf() if self.shrinkage is None
               else ShrunkCovariance(shrinkage=self.shrinkage)).fit(x)
        self.mean_ = est.location_
        self.precision_ = est.precision_
        cal = self.score(x if calibration is None else _feat(calibration))
        self.threshold_95_ = float(np.quantile(cal, 0.95))
        self.threshold_99_ = float(np.quantile(cal, 0.99))
        return self

    def score(self, features: Features | np.ndarray) -> np.ndarray:
        """Mahalanobis distance ``[N]`` of each row to the training features."""
        if not hasattr(self, "mean_"):
            raise ConfigError("This OODScorer is not fitted yet: call fit() first.")
        d = _feat(features) - self.mean_
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision_, d), 0.0))

    def flags(self, features: Features | np.ndarray, level: int = 99) -> np.ndarray:
        """Boolean ``[N]``: distance above the internal 95th or 99th percentile."""
        check_in(level, "level", "OODScorer.flags", (95, 99))
        thr = self.threshold_99_ if level == 99 else self.threshold_95_
        return self.score(features) > thr

    def image_report(self, features: Features) -> list[dict[str, Any]]:
        """Per image ``{"id", "ood_score", "ood_95", "ood_99"}`` for the clinical report."""
        s = self.score(features)
        return [{"id": i, "ood_score": float(v), "ood_95": bool(v > self.threshold_95_),
                 "ood_99": bool(v > self.threshold_99_)} for i, v in zip(features.ids, s)]


def _feat(f: Features | np.ndarray) -> np.ndarray:
    return np.asarray(f.features if isinstance(f, Features) else f, np.float64)
