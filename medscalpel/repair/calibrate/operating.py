"""Fitted thresholds, temperatures and guarantees as a model's operating point: what it was
fitted on (:func:`fit_summary`), the point itself (``*_operating_point``), its measured
sensitivity / specificity (:func:`measure_operating_point`) and model cards / saved models
that carry it (:func:`calibrated_card`, :func:`save_with_thresholds`,
:func:`save_with_operating_point`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.models.checkpoint import save_model
from medscalpel.models.operating_point import OperatingPoint
from medscalpel.repair.calibrate.estimator import ThresholdCalibrator
from medscalpel.repair.calibrate.evaluation import _prf
from medscalpel.repair.calibrate.multiclass import TemperatureResult
from medscalpel.repair.one_sample import clopper_pearson
from medscalpel.validation import check_range


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
