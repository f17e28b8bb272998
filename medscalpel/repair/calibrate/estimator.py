"""The per-class threshold estimator, :class:`ThresholdCalibrator` (scikit-learn contract:
``fit`` returns self, learned state ends in ``_``), and the reading of its inputs
(Predictions, or probabilities with labels).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.repair.calibrate.cuts import THRESHOLD_METHODS, best_cut
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

#: schema of every result dict of :mod:`medscalpel.repair.calibrate`
SCHEMA = 1


def _as_probs_labels(preds_or_probs, labels, owner: str):
    """(probs [N,K] float64, labels [N,K] float with NaN, class_names)"""
    if isinstance(preds_or_probs, Predictions):
        if preds_or_probs.task != "multilabel":
            raise ConfigError(
                f"{owner}: per-class thresholds apply to multi-label predictions; these are "
                f"{preds_or_probs.task} (decided by argmax). Calibrate a multi-label model.")
        probs = preds_or_probs.probs().astype(np.float64)
        lab = preds_or_probs.targets() if labels is None else np.asarray(labels, np.float64)
        names = tuple(preds_or_probs.class_names)
    else:
        probs = np.asarray(preds_or_probs, np.float64)
        if probs.ndim == 1:
            probs = probs[:, None]
        if labels is None:
            raise DataError(f"{owner}: labels are required when probabilities are given as an "
                            "array (pass a Predictions to take its labels).")
        lab = np.asarray(labels, np.float64)
        if lab.ndim == 1:
            lab = lab[:, None]
        names = tuple(f"class{j}" for j in range(probs.shape[1]))
    if probs.ndim != 2 or lab.shape != probs.shape:
        raise DataError(f"{owner}: probabilities {probs.shape} and labels {lab.shape} must both "
                        "be [N, K].")
    if probs.size and (np.nanmin(probs) < 0 or np.nanmax(probs) > 1
                       or not np.isfinite(probs).all()):
        raise DataError(f"{owner}: scores must be probabilities in [0, 1] (finite); got range "
                        f"[{np.nanmin(probs):.3g}, {np.nanmax(probs):.3g}]. Apply a sigmoid "
                        "first, or pass a Predictions (its logits are converted).")
    return probs, lab, names


class ThresholdCalibrator:
    """Per-class decision thresholds (scikit-learn estimator contract).

    Args:
        method: ``youden``, ``f1`` or ``sensitivity`` (see the module docstring).
        target_sensitivity: for ``sensitivity``, the sensitivity to reach.
        default: threshold kept for a class that cannot be fitted (no positive or no negative
            validation image); such classes are listed in ``fallback_``.

    Attributes (after :meth:`fit`):
        thresholds_: ``[K]`` thresholds.
        objective_: ``[K]`` the objective reached on the fitting data (J, F1 or sensitivity).
        class_names_: class names (from the Predictions, or ``class0..``).
        fallback_: names of the classes that kept ``default``.
        n_pos_, n_neg_: positives / negatives per class in the fitting data.
    """

    def __init__(self, method: str = "youden", target_sensitivity: float = 0.9,
                 default: float = 0.5):
        self.method = method
        self.target_sensitivity = target_sensitivity
        self.default = default

    def _validate(self) -> None:
        o = "ThresholdCalibrator"
        check_in(self.method, "method", o, THRESHOLD_METHODS.names())
        check_range(self.target_sensitivity, "target_sensitivity", o, 0.0, 1.0,
                    low_inclusive=False)
        check_range(self.default, "default", o, 0.0, 1.0)

    def fit(self, preds_or_probs: Predictions | np.ndarray, labels: np.ndarray | None = None
            ) -> "ThresholdCalibrator":
        """Fit one threshold per class (labels NaN are ignored per class)."""
        self._validate()
        probs, lab, names = _as_probs_labels(preds_or_probs, labels, "ThresholdCalibrator.fit")
        k = probs.shape[1]
        thr = np.full(k, float(self.default))
        obj = np.full(k, np.nan)
        npos = np.zeros(k, int)
        nneg = np.zeros(k, int)
        fallback = []
        for j in range(k):
            known = np.isfinite(lab[:, j])
            y = lab[known, j] > 0.5
            npos[j], nneg[j] = int(y.sum()), int((~y).sum())
            if npos[j] == 0 or nneg[j] == 0:
                fallback.append(names[j])
                logger.warning("class %s has %d positives / %d negatives: threshold stays %s",
                               names[j], npos[j], nneg[j], self.default)
                continue
            thr[j], obj[j] = best_cut(y, probs[known, j], self.method, self.target_sensitivity)
        self.thresholds_ = thr
        self.objective_ = obj
        self.class_names_ = names
        self.fallback_ = fallback
        self.n_pos_, self.n_neg_ = npos, nneg
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "thresholds_"):
            raise ConfigError("This ThresholdCalibrator is not fitted yet: call fit() first.")

    def transform(self, preds_or_probs: Predictions | np.ndarray) -> np.ndarray:
        """Decisions ``probs >= thresholds_`` as bool ``[N, K]``."""
        self._check_fitted()
        if isinstance(preds_or_probs, Predictions):
            probs = preds_or_probs.probs().astype(np.float64)
        else:
            probs = np.asarray(preds_or_probs, np.float64)
            probs = probs[:, None] if probs.ndim == 1 else probs
        if probs.shape[1] != self.thresholds_.size:
            raise DataError(f"ThresholdCalibrator.transform: {probs.shape[1]} columns but "
                            f"{self.thresholds_.size} fitted thresholds.")
        return probs >= self.thresholds_[None, :]

    predict = transform

    def fit_transform(self, preds_or_probs, labels=None) -> np.ndarray:
        return self.fit(preds_or_probs, labels).transform(preds_or_probs)

    def get_params(self) -> dict[str, Any]:
        return {"method": self.method, "target_sensitivity": self.target_sensitivity,
                "default": self.default}

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"schema_version": SCHEMA, "params": self.get_params(),
                "class_names": list(self.class_names_),
                "thresholds": self.thresholds_.tolist(), "objective": self.objective_.tolist(),
                "fallback": list(self.fallback_), "n_pos": self.n_pos_.tolist(),
                "n_neg": self.n_neg_.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ThresholdCalibrator":
        cal = cls(**d["params"])
        cal.thresholds_ = np.asarray(d["thresholds"], float)
        cal.objective_ = np.asarray([np.nan if v is None else v for v in d["objective"]], float)
        cal.class_names_ = tuple(d["class_names"])
        cal.fallback_ = list(d.get("fallback", []))
        cal.n_pos_ = np.asarray(d.get("n_pos", [0] * cal.thresholds_.size), int)
        cal.n_neg_ = np.asarray(d.get("n_neg", [0] * cal.thresholds_.size), int)
        return cal

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ThresholdCalibrator":
        return cls.from_dict(read_json(path))
