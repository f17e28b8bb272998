"""Per-class decision thresholds fitted on validation predictions.

A multi-label classifier decides "finding present" when its probability reaches a threshold;
0.5 is the default and usually far from good for rare findings. :class:`ThresholdCalibrator`
fits one threshold per class on validation :class:`~medscalpel.engine.predictions.Predictions`:

* ``youden``: maximise Youden's J = sensitivity + specificity - 1;
* ``f1``: maximise F1 = 2 TP / (2 TP + FP + FN);
* ``sensitivity``: the highest threshold whose sensitivity reaches ``target_sensitivity``.

The optima are exact: every distinct score is a candidate cut point ("positive" means
``score >= cut``), the confusion counts at all of them come from one sort and cumulative sums,
and the best one is taken (ties go to the higher threshold, i.e. fewer positives). The returned
threshold is the midpoint between the chosen cut score and the next lower distinct score, which
makes exactly the same decisions on the fitting data and sits in the gap rather than on a training
score. :func:`evaluate_thresholds` then compares F1 / recall / precision with the 0.5 default on
another split, and :func:`save_with_thresholds` writes them into ``model.json``.

Example:
    >>> import numpy as np
    >>> probs = np.array([[0.9], [0.8], [0.3], [0.2]])
    >>> labels = np.array([[1.], [1.], [0.], [0.]])
    >>> cal = ThresholdCalibrator("youden").fit(probs, labels)
    >>> float(cal.thresholds_[0])
    0.55
"""


# One concept a module: cuts (cut tables, threshold objectives, best cut), estimator
# (ThresholdCalibrator), evaluation (against a baseline), flow (calibrate_thresholds), operating
# (operating points and the cards / saved models that carry them) and multiclass (binary view,
# temperature scaling).
from medscalpel.repair.calibrate.cuts import THRESHOLD_METHODS, CutTable, best_cut, cut_table
from medscalpel.repair.calibrate.estimator import SCHEMA, ThresholdCalibrator
from medscalpel.repair.calibrate.evaluation import ThresholdEvaluation, evaluate_thresholds
from medscalpel.repair.calibrate.flow import CalibrationResult, calibrate_thresholds
from medscalpel.repair.calibrate.multiclass import (TOP_LABEL_ECE_BINS, TemperatureResult,
                                                    binary_view, calibrate_temperature,
                                                    expected_calibration_error, fit_temperature)
from medscalpel.repair.calibrate.operating import (calibrated_card, fit_summary,
                                                   guarantee_operating_point,
                                                   measure_operating_point,
                                                   save_with_operating_point,
                                                   save_with_thresholds,
                                                   temperature_operating_point,
                                                   threshold_operating_point)

__all__ = ["SCHEMA", "THRESHOLD_METHODS", "TOP_LABEL_ECE_BINS", "CalibrationResult", "CutTable",
           "TemperatureResult", "ThresholdCalibrator", "ThresholdEvaluation", "best_cut",
           "binary_view", "calibrate_temperature", "calibrate_thresholds", "calibrated_card",
           "cut_table", "evaluate_thresholds", "expected_calibration_error", "fit_summary",
           "fit_temperature", "guarantee_operating_point", "measure_operating_point",
           "save_with_operating_point", "save_with_thresholds", "temperature_operating_point",
           "threshold_operating_point"]
