"""Calibrated thresholds against a baseline on another split: F1, recall, precision and
specificity per class and macro (:func:`evaluate_thresholds`, :class:`ThresholdEvaluation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError
from medscalpel.repair.calibrate.estimator import SCHEMA, _as_probs_labels


def _prf(y: np.ndarray, decided: np.ndarray) -> dict[str, float]:
    tp = int(np.sum(y & decided))
    fp = int(np.sum(~y & decided))
    fn = int(np.sum(y & ~decided))
    tn = int(np.sum(~y & ~decided))
    rec = tp / (tp + fn) if tp + fn else float("nan")
    prec = tp / (tp + fp) if tp + fp else 0.0  # nothing predicted: precision 0 (sklearn's choice)
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    return {"f1": f1, "recall": rec, "precision": prec, "specificity": spec,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ratio(a: float, b: float) -> float:
    return float(a / b) if np.isfinite(a) and np.isfinite(b) and b > 0 else float("nan")


@dataclass
class ThresholdEvaluation:
    """F1 / recall / precision per class and macro, calibrated thresholds vs a baseline."""

    class_names: tuple[str, ...]
    thresholds: list[float]
    baseline: list[float]
    calibrated: list[dict[str, float]]
    default: list[dict[str, float]]
    macro: dict[str, dict[str, float]]
    split: str = ""
    n: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "split": self.split, "n": self.n,
                "class_names": list(self.class_names), "thresholds": self.thresholds,
                "baseline_thresholds": self.baseline, "macro": self.macro,
                "classes": [{"class": c, "threshold": t, "calibrated": a, "default": b}
                            for c, t, a, b in zip(self.class_names, self.thresholds,
                                                  self.calibrated, self.default)]}

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for c, t, a, b in zip(self.class_names, self.thresholds, self.calibrated, self.default):
            rows.append({"class": c, "thr": t, "F1@0.5": b["f1"], "F1": a["f1"],
                         "recall@0.5": b["recall"], "recall": a["recall"],
                         "precision@0.5": b["precision"], "precision": a["precision"]})
        m = self.macro
        rows.append({"class": "macro", "thr": float("nan"), "F1@0.5": m["default"]["f1"],
                     "F1": m["calibrated"]["f1"], "recall@0.5": m["default"]["recall"],
                     "recall": m["calibrated"]["recall"],
                     "precision@0.5": m["default"]["precision"],
                     "precision": m["calibrated"]["precision"]})
        return rows


def evaluate_thresholds(preds: Predictions, thresholds: np.ndarray | list[float],
                        baseline: float | list[float] = 0.5) -> ThresholdEvaluation:
    """F1, recall and precision per class (and macro) at ``thresholds`` and at ``baseline``.

    Macro values are unweighted means over the classes with at least one positive; the ``ratio``
    entry of ``macro`` divides calibrated by baseline macro values (e.g. F1 x1.6).
    """
    probs, lab, names = _as_probs_labels(preds, None, "evaluate_thresholds")
    k = probs.shape[1]
    thr = np.asarray(thresholds, np.float64).reshape(-1)
    base = np.full(k, float(baseline)) if np.isscalar(baseline) else np.asarray(baseline, float)
    if thr.shape != (k,) or base.shape != (k,):
        raise ConfigError(f"evaluate_thresholds: {thr.size} thresholds / {base.size} baseline "
                          f"values given for {k} classes ({names[:3]}...).")
    cal_rows, def_rows = [], []
    for j in range(k):
        known = np.isfinite(lab[:, j])
        y = lab[known, j] > 0.5
        s = probs[known, j]
        cal_rows.append(_prf(y, s >= thr[j]))
        def_rows.append(_prf(y, s >= base[j]))
    scored = [j for j in range(k) if cal_rows[j]["tp"] + cal_rows[j]["fn"] > 0]
    macro: dict[str, dict[str, float]] = {"calibrated": {}, "default": {}, "ratio": {}}
    for m in ("f1", "recall", "precision", "specificity"):
        a = float(np.nanmean([cal_rows[j][m] for j in scored])) if scored else float("nan")
        b = float(np.nanmean([def_rows[j][m] for j in scored])) if scored else float("nan")
        macro["calibrated"][m], macro["default"][m], macro["ratio"][m] = a, b, _ratio(a, b)
    macro["calibrated"]["n_classes"] = macro["default"]["n_classes"] = len(scored)
    return ThresholdEvaluation(class_names=names, thresholds=thr.tolist(), baseline=base.tolist(),
                               calibrated=cal_rows, default=def_rows, macro=macro,
                               split=getattr(preds, "split", ""), n=probs.shape[0])
