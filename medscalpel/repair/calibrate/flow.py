"""The one call: fit per-class thresholds on one split, evaluate them on another, measure
the operating point and optionally save the model with it (:func:`calibrate_thresholds`,
:class:`CalibrationResult`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import DataError
from medscalpel.models.operating_point import OperatingPoint
from medscalpel.repair.calibrate.estimator import SCHEMA, ThresholdCalibrator
from medscalpel.repair.calibrate.evaluation import ThresholdEvaluation, evaluate_thresholds
from medscalpel.repair.calibrate.operating import (measure_operating_point, save_with_thresholds,
                                                   threshold_operating_point)

logger = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    """Thresholds fitted on one split and evaluated on another."""

    calibrator: ThresholdCalibrator
    evaluation: ThresholdEvaluation | None
    fit_split: str = ""
    model_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: the fitted thresholds as the model's operating point (measured on the evaluation split)
    operating_point: OperatingPoint | None = None

    @property
    def thresholds(self) -> np.ndarray:
        return self.calibrator.thresholds_

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "fit_split": self.fit_split,
                "calibrator": self.calibrator.to_dict(),
                "evaluation": None if self.evaluation is None else self.evaluation.to_dict(),
                "model_dir": self.model_dir, **self.extra,
                "operating_point": None if self.operating_point is None
                else self.operating_point.to_dict()}


def calibrate_thresholds(fit_preds: Predictions, eval_preds: Predictions | None = None,
                         method: str = "youden", target_sensitivity: float = 0.9,
                         baseline: float = 0.5, model=None,
                         model_out: str | os.PathLike | None = None) -> CalibrationResult:
    """Fit per-class thresholds on ``fit_preds`` and evaluate them on ``eval_preds``.

    With ``model`` and ``model_out``, a copy of the model is saved there with the thresholds in
    ``model.json`` (:func:`save_with_thresholds`).

    Example:
        >>> import numpy as np
        >>> from medscalpel.engine.predictions import Predictions
        >>> p = Predictions(np.array([[2.], [1.], [-1.], [-2.]]),
        ...                 np.array([[1.], [1.], [0.], [0.]]),
        ...                 ids=("a", "b", "c", "d"), class_names=("x",), task="multilabel")
        >>> r = calibrate_thresholds(p, p)
        >>> r.evaluation.macro["calibrated"]["f1"]
        1.0
    """
    if eval_preds is not None:
        if tuple(eval_preds.class_names) != tuple(fit_preds.class_names):
            raise DataError("calibrate_thresholds: the fitting and evaluation predictions have "
                            f"different classes ({fit_preds.class_names[:3]}... vs "
                            f"{eval_preds.class_names[:3]}...).")
        shared = set(fit_preds.ids) & set(eval_preds.ids)
        if shared and len(shared) == len(set(eval_preds.ids)) and fit_preds is not eval_preds:
            logger.warning("the evaluation images are all in the fitting split: the evaluation "
                           "is not held out")
    cal = ThresholdCalibrator(method, target_sensitivity, baseline).fit(fit_preds)
    ev = evaluate_thresholds(eval_preds, cal.thresholds_, baseline) if eval_preds is not None \
        else None
    op = threshold_operating_point(cal, fit_preds)
    # a binary view's operating point is of the two-class model: measured on its own predictions
    if eval_preds is not None and "binary_view" not in fit_preds.meta:
        op = measure_operating_point(op, eval_preds, held_out=not _same_images(fit_preds,
                                                                               eval_preds))
    res = CalibrationResult(calibrator=cal, evaluation=ev, fit_split=fit_preds.split,
                            operating_point=op)
    if model is not None and model_out is not None:
        res.model_dir = str(save_with_thresholds(
            model, model_out, cal, fit_split=fit_preds.split, operating_point=op,
            evaluation=None if ev is None else {"split": ev.split, "macro": ev.macro}))
    return res


def _same_images(a: Predictions, b: Predictions) -> bool:
    return a is b or bool(set(a.ids) & set(b.ids))
