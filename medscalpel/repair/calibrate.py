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

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy.optimize import minimize_scalar

from medscalpel.engine.metrics import expected_calibration_error as binary_ece
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.models.checkpoint import save_model
from medscalpel.models.operating_point import OperatingPoint
from medscalpel.registry import Registry
from medscalpel.repair.conformal import clopper_pearson
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1

#: objective(tp, fp, fn, tn, npos, nneg, **params) -> score per cut (higher is better), or a
#: boolean feasibility mask for constraint methods (see :func:`_choose`).
THRESHOLD_METHODS: Registry[Callable[..., np.ndarray]] = Registry("threshold method")


# ----------------------------------------------------------------------------- cut points
@dataclass(frozen=True)
class CutTable:
    """Confusion counts at every distinct score, from the highest cut down.

    ``cuts[i]`` is a distinct score; predicting ``score >= cuts[i]`` gives ``tp[i]``, ``fp[i]``.
    Row 0 is the empty prediction (cut ``+inf``: nothing positive).
    """

    cuts: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    npos: int
    nneg: int

    @property
    def fn(self) -> np.ndarray:
        return self.npos - self.tp

    @property
    def tn(self) -> np.ndarray:
        return self.nneg - self.fp

    @property
    def sensitivity(self) -> np.ndarray:
        return self.tp / max(self.npos, 1)

    @property
    def specificity(self) -> np.ndarray:
        return self.tn / max(self.nneg, 1)


def cut_table(y: np.ndarray, s: np.ndarray) -> CutTable:
    """Confusion counts for every distinct cut point of ``s`` (labels ``y`` in {0, 1})."""
    y = np.asarray(y, bool)
    s = np.asarray(s, np.float64)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1] if s.size else np.zeros(0, int)
    return CutTable(cuts=np.r_[np.inf, s_sorted[last]], tp=np.r_[0, tp[last]].astype(np.int64),
                    fp=np.r_[0, fp[last]].astype(np.int64), npos=int(y.sum()),
                    nneg=int((~y).sum()))


@THRESHOLD_METHODS.register("youden", help="maximise sensitivity + specificity - 1")
def _youden(t: CutTable, **_: Any) -> np.ndarray:
    return t.tp / max(t.npos, 1) - t.fp / max(t.nneg, 1)


@THRESHOLD_METHODS.register("f1", help="maximise F1 = 2TP / (2TP + FP + FN)")
def _f1(t: CutTable, **_: Any) -> np.ndarray:
    den = 2 * t.tp + t.fp + t.fn
    return np.where(den > 0, 2 * t.tp / np.maximum(den, 1), 0.0)


@THRESHOLD_METHODS.register("sensitivity",
                            help="highest threshold with sensitivity >= target_sensitivity")
def _sensitivity(t: CutTable, target_sensitivity: float = 0.9, **_: Any) -> np.ndarray:
    sens = t.tp / max(t.npos, 1)
    # feasible cuts score by their height: the first feasible (highest) cut wins
    return np.where(sens >= target_sensitivity - 1e-12, -np.arange(t.cuts.size, dtype=float),
                    -np.inf)


def best_cut(y: np.ndarray, s: np.ndarray, method: str = "youden",
             target_sensitivity: float = 0.9) -> tuple[float, float]:
    """Exact optimal threshold of one class: ``(threshold, objective at it)``.

    Ties go to the higher cut. The threshold is the midpoint between the chosen cut score and the
    next lower distinct score (the same decisions on ``s``); above the top score when the best is
    to predict nothing positive; below the lowest when everything should be positive.
    """
    fn = THRESHOLD_METHODS.get(method)
    t = cut_table(y, s)
    obj = fn(t, target_sensitivity=target_sensitivity)
    i = int(np.argmax(obj))  # first maximum = highest cut
    value = float(t.tp[i] / max(t.npos, 1)) if method == "sensitivity" else float(obj[i])
    cuts = t.cuts
    if cuts.size == 1:  # no scores at all
        return 0.5, value
    if i == 0:  # predict nothing positive: go above the top score
        top = cuts[1]
        thr = 0.5 * (top + 1.0) if top < 1.0 else float(np.nextafter(top, np.inf))
    elif i + 1 < cuts.size:
        thr = 0.5 * (cuts[i] + cuts[i + 1])
    else:  # everything positive: go below the lowest score
        thr = 0.5 * cuts[i] if cuts[i] > 0 else float(cuts[i])
    return float(thr), value


# ----------------------------------------------------------------------------- estimator
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
    if probs.size and (np.nanmin(probs) < 0 or np.nanmax(probs) > 1 or not np.isfinite(probs).all()):
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


# ----------------------------------------------------------------------------- evaluation
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


# ----------------------------------------------------------------------------- one call
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
        >>> p = Predictions(np.array([[2.], [1.], [-1.], [-2.]]), np.array([[1.], [1.], [0.], [0.]]),
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


# ----------------------------------------------------------------------------- operating points
def _same_images(a: Predictions, b: Predictions) -> bool:
    return a is b or bool(set(a.ids) & set(b.ids))


def fit_summary(preds: Predictions, patient_ids: Sequence[str | None] | None = None,
                source: str | None = None, **more: Any) -> dict[str, Any]:
    """What an operating point was fitted on: split, images, patients (when known: ids given,
    or ``preds.meta['patient_ids']``), positives / negatives per class, the source (hash or id
    of the predictions, default their model id and dataset hash) and ``more``."""
    t = preds.targets()
    known = np.isfinite(t)
    pids = patient_ids if patient_ids is not None else preds.meta.get("patient_ids")
    n_pat = None
    if pids is not None and len(pids) == preds.n and any(p is not None for p in pids):
        n_pat = len({p if p is not None else f"__row{i}" for i, p in enumerate(pids)})
    src = source or ":".join(str(x) for x in (preds.model_id, preds.meta.get("dataset_hash"))
                             if x) or None
    return {"split": preds.split, "n_images": int(preds.n), "n_patients": n_pat,
            "positives": {c: int(((t[:, j] > 0.5) & known[:, j]).sum())
                          for j, c in enumerate(preds.class_names)},
            "negatives": {c: int(((t[:, j] < 0.5) & known[:, j]).sum())
                          for j, c in enumerate(preds.class_names)},
            "source": src, "dataset": preds.meta.get("dataset"), **more}


def threshold_operating_point(cal: ThresholdCalibrator, fit_preds: Predictions,
                              class_names: Sequence[str] | None = None,
                              **fit_info: Any) -> OperatingPoint:
    """A fitted :class:`ThresholdCalibrator` as an operating point: per-class thresholds
    (multi-label), or, for a calibrator fitted on :func:`binary_view` predictions, the
    positive class's cut of the two-class model whose ``class_names`` are given (default: the
    view's ``meta['binary_view']``)."""
    cal._check_fitted()
    params = {**cal.get_params()}
    view = fit_preds.meta.get("binary_view")
    info = fit_summary(fit_preds, **fit_info)
    info["params"] = params
    if view is None:
        return OperatingPoint("multilabel", tuple(cal.class_names_),
                              thresholds=tuple(float(t) for t in cal.thresholds_),
                              method=cal.method, fitted_on=info, fallback=tuple(cal.fallback_))
    names = tuple(class_names) if class_names is not None else None
    if names is None:
        names = tuple(view.get("class_names") or (view["negative"], view["positive"]))
    pos = names.index(view["positive"])
    info["positives"] = {names[pos]: info["positives"][view["positive"]],
                         names[1 - pos]: info["negatives"][view["positive"]]}
    info["negatives"] = {names[pos]: info["positives"][names[1 - pos]],
                         names[1 - pos]: info["positives"][names[pos]]}
    return OperatingPoint("binary", names, positive=pos, cut=float(cal.thresholds_[0]),
                          method=cal.method, fitted_on=info,
                          fallback=tuple(names[pos] for _ in cal.fallback_))


def temperature_operating_point(res: "TemperatureResult", fit_preds: Predictions,
                                **fit_info: Any) -> OperatingPoint:
    """Temperature scaling of a multi-class model as its operating point (argmax of
    ``softmax(logits / T)``)."""
    info = fit_summary(fit_preds, **fit_info)
    info["params"] = {"temperature": res.temperature, "nll_before": res.before.get("nll"),
                      "nll_after": res.after.get("nll"), "ece_before": res.before.get("ece"),
                      "ece_after": res.after.get("ece"), "measured_on": res.eval_split,
                      "held_out": res.held_out}
    return OperatingPoint("multiclass", tuple(res.class_names), temperature=res.temperature,
                          method="temperature", fitted_on=info)


def measure_operating_point(op: OperatingPoint, preds: Predictions, confidence: float = 0.95,
                            held_out: bool = True) -> OperatingPoint:
    """``op`` with its sensitivity and specificity per class on the labelled ``preds``
    (decisions by ``op`` itself; the counts of :func:`evaluate_thresholds`' ``_prf``) and their
    exact Clopper-Pearson intervals at ``confidence``."""
    if tuple(preds.class_names) != tuple(op.class_names):
        raise DataError(f"measure_operating_point: predictions of classes "
                        f"{list(preds.class_names)[:4]} for an operating point of "
                        f"{list(op.class_names)[:4]}.")
    check_range(confidence, "confidence", "measure_operating_point", 0.0, 1.0,
                low_inclusive=False, high_inclusive=False)
    decided = op.decide(op.probabilities(preds.logits))
    t = preds.targets()
    rows = []
    for j, name in enumerate(op.class_names):
        known = np.isfinite(t[:, j])
        y = t[known, j] > 0.5
        c = _prf(y, decided[known, j])
        npos, nneg = c["tp"] + c["fn"], c["tn"] + c["fp"]
        rows.append({"class": name, "sensitivity": c["recall"],
                     "sensitivity_ci": list(clopper_pearson(c["tp"], npos, confidence)),
                     "specificity": c["specificity"],
                     "specificity_ci": list(clopper_pearson(c["tn"], nneg, confidence)),
                     "n_pos": npos, "n_neg": nneg, "tp": c["tp"], "fn": c["fn"],
                     "tn": c["tn"], "fp": c["fp"]})
    return op.with_measurement(rows, {"split": preds.split, "n_images": int(preds.n),
                                      "held_out": bool(held_out), "ci": "Clopper-Pearson",
                                      "confidence": confidence})


def guarantee_operating_point(g: Any, class_names: Sequence[str], task: str,
                              kept: Sequence[float] | None = None, **fit_info: Any
                              ) -> OperatingPoint:
    """A conformal :class:`~medscalpel.repair.conformal.GuaranteeResult` as the operating
    point of a model with ``class_names`` / ``task`` (``guarantee`` holds the result).

    Multi-label: the certified thresholds; a class that could not be certified keeps ``kept``
    (the model's current threshold, default 0.5) and is listed in ``fallback``. Two-class (the
    guarantee was certified on :func:`binary_view` predictions): the positive class's cut; an
    uncertified cut is refused (nothing to write).
    """
    names = tuple(class_names)
    thr = np.asarray(g.thresholds_prob(fill=np.nan), float)
    info = {"split": g.split, "n_images": g.n_images, "n_patients": g.n_patients,
            "params": {"guarantee": g.spec, "alpha": g.alpha}, **fit_info}
    method = f"guarantee {g.spec}"
    if task != "multilabel":
        if len(names) != 2 or len(g.class_names) != 1 or g.class_names[0] not in names:
            raise ConfigError("guarantee_operating_point: a two-class model needs a guarantee "
                              "certified on its binary view (one positive class).")
        if not np.isfinite(thr[0]):
            raise ConfigError(f"{g.spec} could not be certified for {g.class_names[0]} (too few "
                              "positives): no operating point to write; drop --model.")
        return OperatingPoint("binary", names, positive=names.index(g.class_names[0]),
                              cut=float(thr[0]), method=method, fitted_on=info,
                              guarantee=g.to_dict())
    if tuple(g.class_names) != names:
        raise ConfigError(f"The guarantee is of classes {list(g.class_names)[:4]}, the model's "
                          f"are {list(names)[:4]}.")
    base = np.full(len(names), 0.5) if kept is None else np.asarray(kept, float)
    miss = ~np.isfinite(thr)
    return OperatingPoint("multilabel", names, thresholds=tuple(np.where(miss, base, thr)),
                          method=method, fitted_on=info, guarantee=g.to_dict(),
                          fallback=tuple(n for n, m in zip(names, miss) if m),
                          notes=(f"not certified (threshold kept): "
                                 f"{[n for n, m in zip(names, miss) if m]}",) if miss.any()
                          else ())


def save_with_operating_point(model, directory: str | os.PathLike, op: OperatingPoint,
                              **details: Any) -> Path:
    """Save a copy of ``model`` into ``directory`` deciding by ``op`` (``model.json``'s
    ``operating_point`` and ``thresholds``) with an ``operating_point`` lineage step; the
    weights (hence ``model_id``) are unchanged and the caller's model is not modified."""

    if model.card is None:
        raise ModelError("save_with_operating_point: the model has no ModelCard (load it with "
                         "load_model or train it with medscalpel first).")
    if tuple(model.card.class_names) != tuple(op.class_names):
        raise ModelError(f"The operating point is of classes {list(op.class_names)[:4]} but the "
                         f"model's are {list(model.card.class_names)[:4]}.")
    card = model.card.with_operating_point(op).with_lineage(
        "operating_point", parent=model.card.model_id,
        method_params={"method": op.method, **(op.fitted_on.get("params") or {})},
        fit_split=op.fitted_on.get("split", ""), fallback=list(op.fallback), **details)
    return save_model(copy.deepcopy(model), directory, card)


def calibrated_card(card, calibrator: ThresholdCalibrator,
                    operating_point: OperatingPoint | None = None, **details: Any):
    """A new :class:`~medscalpel.models.checkpoint.ModelCard` carrying the fitted thresholds as
    its operating point (``operating_point``, else one built from the calibrator with the
    ``fit_split`` detail) and a ``threshold_calibration`` lineage step."""
    calibrator._check_fitted()
    if len(card.class_names) != calibrator.thresholds_.size:
        raise ModelError(f"The model has {len(card.class_names)} classes but "
                         f"{calibrator.thresholds_.size} thresholds were fitted.")
    if calibrator.class_names_ and not calibrator.class_names_[0].startswith("class") and \
            tuple(calibrator.class_names_) != tuple(card.class_names):
        raise ModelError("The thresholds were fitted on predictions of other classes "
                         f"({calibrator.class_names_[:3]}...) than the model's "
                         f"({card.class_names[:3]}...).")
    op = operating_point
    if op is None:
        fitted = {"split": details.get("fit_split", ""), "params": calibrator.get_params(),
                  "positives": dict(zip(card.class_names, calibrator.n_pos_.tolist())),
                  "negatives": dict(zip(card.class_names, calibrator.n_neg_.tolist()))}
        op = OperatingPoint("multilabel", tuple(card.class_names),
                            thresholds=tuple(float(t) for t in calibrator.thresholds_),
                            method=calibrator.method, fitted_on=fitted,
                            fallback=tuple(calibrator.fallback_))
    new = card.with_operating_point(op)
    return new.with_lineage("threshold_calibration", parent=card.model_id,
                            method_params=calibrator.get_params(),
                            fallback=list(calibrator.fallback_), **details)


def save_with_thresholds(model, directory: str | os.PathLike, calibrator: ThresholdCalibrator,
                         operating_point: OperatingPoint | None = None,
                         **details: Any) -> Path:
    """Save a copy of ``model`` into ``directory`` with the thresholds in ``model.json``.

    The weights are unchanged (the weights hash, hence ``model_id``, stays the same); the card
    gains the thresholds and a lineage step. The caller's model is not modified.
    """

    if model.card is None:
        raise ModelError("save_with_thresholds: the model has no ModelCard (load it with "
                         "load_model or train it with medscalpel first).")
    clone = copy.deepcopy(model)
    return save_model(clone, directory, calibrated_card(model.card, calibrator,
                                                        operating_point, **details))


# ----------------------------------------------------------------------------- multi-class
def binary_view(preds: Predictions, positive: str | None = None) -> Predictions:
    """A two-class multi-class :class:`Predictions` as one multi-label column for the
    ``positive`` class (default: the second class): logit ``l_pos - l_neg`` (its sigmoid is
    exactly the softmax probability of the positive class) and label ``y == positive``. The
    per-class threshold machinery then fits an operating point for the positive class."""
    if preds.task != "multiclass" or preds.num_classes != 2:
        raise ConfigError(f"binary_view: needs two-class multi-class predictions; these are "
                          f"{preds.task} with {preds.num_classes} classes.")
    names = tuple(preds.class_names)
    pos = names[1] if positive is None else positive
    if pos not in names:
        raise ConfigError(f"Unknown positive class {pos!r}; the classes are {list(names)} "
                          "(--positive NAME).")
    j = names.index(pos)
    logits = np.asarray(preds.logits, np.float64)
    margin = (logits[:, j] - logits[:, 1 - j])[:, None].astype(np.float32)
    labels = (np.asarray(preds.labels) == j).astype(np.float32)[:, None]
    return Predictions(logits=margin, labels=labels, ids=tuple(preds.ids), class_names=(pos,),
                       task="multilabel", split=preds.split, model_id=preds.model_id,
                       meta={**preds.meta, "binary_view": {"positive": pos,
                                                           "negative": names[1 - j],
                                                           "class_names": list(names)}})


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(y)), y]))


#: equal-width bins of the top-label ECE of temperature scaling (Guo et al. 2017 use 15)
TOP_LABEL_ECE_BINS = 15


def expected_calibration_error(probs: np.ndarray, y: np.ndarray,
                               bins: int = TOP_LABEL_ECE_BINS) -> float:
    """Top-label ECE of a multi-class model: :func:`medscalpel.engine.metrics.
    expected_calibration_error` of the outcome "argmax is right" against the top-class
    confidence (the same equal-width binning as every ECE in medscalpel)."""
    probs = np.asarray(probs, np.float64)
    hit = probs.argmax(axis=1) == np.asarray(y)
    return binary_ece(hit, probs.max(axis=1), bins)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05,
                    hi: float = 20.0, *, task: str = "multiclass",
                    weights: np.ndarray | None = None) -> float:
    """The temperature T in ``[lo, hi]`` minimising the (weighted) mean negative
    log-likelihood of ``softmax(logits / T)`` (multi-class) or ``sigmoid(logits / T)`` over the
    known cells (multi-label, NaN labels skipped): ``scipy.optimize.minimize_scalar``
    (bounded Brent) on log T. The one temperature fit of medscalpel (site recalibration uses it
    too).

    Args:
        logits: ``[N, K]``.
        labels: multi-class: class indices ``[N]`` or one-hot ``[N, K]``; multi-label: ``[N, K]``
            0/1 with NaN for unknown.
        task: ``multiclass`` or ``multilabel``.
        weights: per-row ``[N]`` (multi-class) or per-cell ``[N, K]`` (multi-label) weights;
            None: all ones.

    >>> z = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    >>> round(fit_temperature(z, np.array([0, 1, 1, 0])), 2)   # half right: no confidence
    20.0
    """
    check_in(task, "task", "fit_temperature", ("multiclass", "multilabel"))
    z = np.asarray(logits, np.float64)
    t = np.asarray(labels, np.float64)
    if task == "multiclass":
        y = t.argmax(1) if t.ndim == 2 else t.astype(np.int64)
        w = np.ones(z.shape[0]) if weights is None else np.asarray(weights, np.float64)

        def nll(log_t: float) -> float:
            s = z / np.exp(log_t)
            s = s - s.max(1, keepdims=True)
            lse = np.log(np.exp(s).sum(1))
            return float(np.sum(w * (lse - s[np.arange(len(s)), y])) / np.sum(w))
    else:
        known = np.isfinite(t)
        w = np.ones(t.shape) if weights is None else np.asarray(weights, np.float64)
        zk, yk, wk = z[known], t[known], w[known]

        def nll(log_t: float) -> float:
            s = zk / np.exp(log_t)
            return float(np.sum(wk * (np.logaddexp(0, s) - yk * s)) / np.sum(wk))

    res = minimize_scalar(nll, bounds=(np.log(lo), np.log(hi)), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


@dataclass(frozen=True)
class TemperatureResult:
    """Temperature scaling of a multi-class model: fitted on one split, measured (NLL, ECE,
    accuracy: unchanged by construction) before and after on another. ``ece`` is the top-label
    ECE over ``ece_bins`` equal-width bins (:func:`expected_calibration_error`)."""

    temperature: float
    class_names: tuple[str, ...]
    fit_split: str
    eval_split: str
    n_fit: int
    n_eval: int
    before: dict[str, float]
    after: dict[str, float]
    held_out: bool
    schema_version: int = SCHEMA
    ece_bins: int = TOP_LABEL_ECE_BINS

    def apply(self, logits: np.ndarray) -> np.ndarray:
        return np.asarray(logits, np.float64) / self.temperature

    def table(self) -> list[dict[str, Any]]:
        return [{"measure": k, "before": self.before[k], "after": self.after[k]}
                for k in ("nll", "ece", "accuracy")]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "method": "temperature",
                "temperature": self.temperature, "class_names": list(self.class_names),
                "fit_split": self.fit_split, "eval_split": self.eval_split,
                "n_fit": self.n_fit, "n_eval": self.n_eval, "before": dict(self.before),
                "after": dict(self.after), "held_out": self.held_out,
                "ece_bins": self.ece_bins}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TemperatureResult":
        if int(d.get("schema_version", 0)) != SCHEMA:
            raise DataError(f"TemperatureResult: schema_version {d.get('schema_version')} is "
                            f"not {SCHEMA}.")
        return cls(temperature=float(d["temperature"]), class_names=tuple(d["class_names"]),
                   fit_split=d["fit_split"], eval_split=d["eval_split"], n_fit=int(d["n_fit"]),
                   n_eval=int(d["n_eval"]), before=dict(d["before"]), after=dict(d["after"]),
                   held_out=bool(d["held_out"]),
                   ece_bins=int(d.get("ece_bins", TOP_LABEL_ECE_BINS)))


def calibrate_temperature(fit_preds: Predictions,
                          eval_preds: Predictions | None = None) -> TemperatureResult:
    """Fit a temperature on ``fit_preds`` (multi-class) and measure NLL / ECE / accuracy
    before and after on ``eval_preds`` (on ``fit_preds`` itself when None: marked
    ``held_out=False``)."""
    for p, what in ((fit_preds, "fitting"), (eval_preds, "evaluation")):
        if p is not None and p.task != "multiclass":
            raise ConfigError(f"calibrate_temperature: the {what} predictions are {p.task}; "
                              "temperature scaling is for multi-class (softmax) models.")
    if eval_preds is not None and tuple(eval_preds.class_names) != tuple(fit_preds.class_names):
        raise DataError("calibrate_temperature: the fitting and evaluation predictions have "
                        "different classes.")
    y = np.asarray(fit_preds.labels, np.int64)
    if len(y) == 0:
        raise DataError("calibrate_temperature: no predictions to fit on.")
    t = fit_temperature(fit_preds.logits, y)
    ev = eval_preds if eval_preds is not None else fit_preds
    ze, ye = np.asarray(ev.logits, np.float64), np.asarray(ev.labels, np.int64)

    def measures(temp: float) -> dict[str, float]:
        pr = _softmax(ze / temp)
        return {"nll": _nll(ze, ye, temp), "ece": expected_calibration_error(pr, ye),
                "accuracy": float(np.mean(pr.argmax(1) == ye))}

    return TemperatureResult(temperature=t, class_names=tuple(fit_preds.class_names),
                             fit_split=fit_preds.split, eval_split=ev.split, n_fit=len(y),
                             n_eval=len(ye), before=measures(1.0), after=measures(t),
                             held_out=eval_preds is not None)
