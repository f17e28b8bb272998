"""The recalibrated model: a copy whose card carries the site's operating point."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from medscalpel.models.operating_point import OperatingPoint, task_of
from medscalpel.repair.shift.estimator import AFFINE, SiteRecalibrator
from medscalpel.repair.shift.workflow import SiteRecalibration

logger = logging.getLogger(__name__)


def site_operating_point(card: Any, recalibrator: SiteRecalibrator, site: str = "",
                         result: SiteRecalibration | None = None, split: str = ""
                         ) -> OperatingPoint:
    """The site's operating point of a model recalibrated by ``recalibrator`` (its logit map
    folded into the weights, so the temperature here is 1): per-class thresholds (multi-label),
    the positive (second) class's cut (two-class), argmax (multi-class); method ``site k-shot
    <method>``; fitted on the k-shot sample (images, patients when drawn by patient, positives /
    negatives per class, site); measured: ``result.after`` (sensitivity / specificity with
    bootstrap CIs on the rest of the site) when ``result`` is given."""
    recalibrator._check_fitted()
    names = tuple(card.class_names)
    thr = [float(t) for t in recalibrator.thresholds_]
    task = task_of(card.task, len(names))
    fitted: dict[str, Any] = {"site": site, "split": split, "n_images": recalibrator.n_fit_,
                              "params": recalibrator.get_params()}
    notes = []
    if recalibrator.method in AFFINE:
        notes.append(f"the {recalibrator.method} logit map is folded into the classifier's "
                     "weights: the probabilities are already recalibrated (temperature 1 here)")
    measured, on = (), {}
    if result is not None:
        fitted.update(n_patients=result.n_fit_patients, split_unit=result.split_unit,
                      **result.fit_counts)
        measured = tuple({"class": r["name"], "sensitivity": r["sensitivity"],
                          "sensitivity_ci": list(r.get("sensitivity_ci") or [None, None]),
                          "specificity": r["specificity"],
                          "specificity_ci": list(r.get("specificity_ci") or [None, None]),
                          "n_pos": r["n_pos"], "n_neg": r["n_neg"]} for r in result.after)
        on = {"split": f"rest of {site or 'the site'}" + (f" [{split}]" if split else ""),
              "n_images": result.n_rest, "held_out": True, "ci": "bootstrap (images)",
              "confidence": 0.95, "excluded_same_patient": result.n_excluded_same_patient}
    method = f"site k-shot {recalibrator.method}"
    if task == "multilabel":
        op = OperatingPoint(task, names, thresholds=tuple(thr), method=method, fitted_on=fitted,
                            notes=tuple(notes))
    elif task == "binary":
        op = OperatingPoint(task, names, positive=1, cut=thr[1], method=method,
                            fitted_on=fitted, notes=tuple(notes))
    else:
        op = OperatingPoint(task, names, method=method, fitted_on=fitted, notes=tuple(notes))
    return op.with_measurement(measured, on) if measured else op


def recalibrated_model(model: Any, recalibrator: SiteRecalibrator, site: str = "",
                       result: SiteRecalibration | None = None, split: str = ""):
    """A COPY of ``model`` that makes the recalibrated decisions by itself: the logit transform
    (``scale_ * z + bias_``) folded exactly into the final linear layer, the site's operating
    point (:func:`site_operating_point`; thresholds in its card), and a ``site_recalibration``
    lineage step."""

    recalibrator._check_fitted()
    m = copy.deepcopy(model)
    lin = m.classifier
    with torch.no_grad():
        s = torch.as_tensor(recalibrator.scale_, dtype=lin.weight.dtype)
        lin.weight.mul_(s[:, None])
        lin.bias.mul_(s).add_(torch.as_tensor(recalibrator.bias_, dtype=lin.bias.dtype))
    card = model.card
    op = site_operating_point(card, recalibrator, site, result, split)
    new = card.with_operating_point(op)
    m.card = new.with_lineage("site_recalibration", parent=card.model_id, site=site,
                              recalibration=recalibrator.get_params(),
                              n_fit=recalibrator.n_fit_)
    return m
