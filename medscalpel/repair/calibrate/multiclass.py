"""Two-class and multi-class models: the one-column binary view of a two-class model
(:func:`binary_view`) and temperature scaling (:func:`fit_temperature`,
:func:`calibrate_temperature`, :class:`TemperatureResult`, with the top-label ECE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from medscalpel.engine.metrics import expected_calibration_error as binary_ece
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.repair.calibrate.estimator import SCHEMA
from medscalpel.validation import check_in


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
