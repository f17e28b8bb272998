"""The treatments the router can try, one class each, registered in :data:`TREATMENTS`.

A treatment has one required method, :meth:`Treatment.apply`: given the current
:class:`RepairState` (classifier weights, bias, thresholds), a class index and the split to fit
on, it returns an :class:`Attempt` holding the new state (or ``None`` with the reason when it
cannot run). Measuring the effect on held-out data, timing and deciding belong to the router
(:mod:`medscalpel.repair.triage`); a treatment never sees the held-out split.

Initial costs (seed 000): none 0, threshold calibration 1, surgical correction 2, partial
retraining 2, F re-optimization 3, augmentation 8, full retraining 10; added here: Platt
recalibration of one row 1.5 (for a miscalibrated class; decisions kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
from sklearn.linear_model import LogisticRegression

from medscalpel.engine.predict import Features
from medscalpel.engine.predictions import Predictions
from medscalpel.registry import Registry
from medscalpel.repair.calibrate import best_cut
from medscalpel.repair.retrain import finetune_classifier, reoptimize_classifier
from medscalpel.repair.surgery import surgical_correction
from medscalpel.repair.surgery.helpers import label_k, sigmoid

#: issue kinds the diagnosis can report (see :mod:`medscalpel.repair.triage`)
ISSUES = ("low_recall", "low_precision", "miscalibrated", "fp_cluster", "confounder",
          "low_auroc")


@dataclass
class RepairState:
    """What the router changes: the final layer (None when only predictions are known) and the
    per-class thresholds."""

    thresholds: np.ndarray
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None

    def copy(self) -> "RepairState":
        return RepairState(self.thresholds.copy(),
                           None if self.weight is None else self.weight.copy(),
                           None if self.bias is None else self.bias.copy())

    def logits(self, data: Features | Predictions) -> np.ndarray:
        """float64 logits of ``data`` under this state."""
        if isinstance(data, Features) and self.weight is not None:
            return data.features.astype(np.float64) @ self.weight.astype(np.float64).T + \
                self.bias.astype(np.float64)
        return np.asarray(data.logits, np.float64)

    def features_view(self, data: Features) -> Features:
        return replace(data, weight=self.weight.astype(np.float32),
                       bias=self.bias.astype(np.float32))


@dataclass
class Attempt:
    """A treatment's proposal: the new state, or ``None`` with ``reason``."""

    state: RepairState | None
    detail: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


TREATMENTS: Registry[type["Treatment"]] = Registry("treatment")


class Treatment:
    """Base class: subclasses set the class attributes and implement :meth:`apply`."""

    name: ClassVar[str] = ""
    initial_cost: ClassVar[float] = 0.0
    treats: ClassVar[frozenset[str]] = frozenset()
    needs_features: ClassVar[bool] = False
    runnable: ClassVar[bool] = True
    #: typical wall time when it is proposed rather than run (seconds)
    typical_seconds: ClassVar[float] = 0.0

    def __init__(self, **params: Any):
        self.params = params

    def apply(self, state: RepairState, k: int, fit: Features | Predictions,
              issues: list[dict[str, Any]]) -> Attempt:  # pragma: no cover - abstract
        raise NotImplementedError

    def can_run(self, fit: Features | Predictions, state: RepairState) -> str:
        """Empty string when it can run on this data, else why not."""
        if not self.runnable:
            return "proposal only: needs images and a training pipeline"
        if self.needs_features and (not isinstance(fit, Features) or state.weight is None):
            return "needs cached penultimate features (Features), not only predictions"
        return ""


def _refit_threshold(state: RepairState, k: int, fit, method: str = "youden") -> float:

    y = label_k(fit.labels, k, fit.task)
    known = np.isfinite(y)
    yk = y[known] > 0.5
    if yk.all() or not yk.any():
        return float(state.thresholds[k])
    p = sigmoid(state.logits(fit)[known, k])
    return best_cut(yk, p, method)[0]


@TREATMENTS.register("none", help="no action")
class NoAction(Treatment):
    name = "none"
    initial_cost = 0.0

    def apply(self, state, k, fit, issues):
        return Attempt(state.copy(), {"action": "none"})


@TREATMENTS.register("threshold", help="per-class threshold calibration (Youden's J or F1)")
class ThresholdCalibration(Treatment):
    """Refit class ``k``'s threshold: F1-optimal when the issue is low precision only, else
    Youden's J (``method=`` overrides)."""

    name = "threshold"
    initial_cost = 1.0
    treats = frozenset({"low_recall", "low_precision"})
    typical_seconds = 0.1

    def apply(self, state, k, fit, issues):
        kinds = {i["kind"] for i in issues}
        method = self.params.get("method") or ("f1" if kinds == {"low_precision"} else "youden")
        new = state.copy()
        new.thresholds[k] = _refit_threshold(state, k, fit, method)
        return Attempt(new, {"method": method, "old_threshold": float(state.thresholds[k]),
                             "new_threshold": float(new.thresholds[k])})


@TREATMENTS.register("platt", help="per-class Platt recalibration of row k (decisions kept)")
class PlattRecalibration(Treatment):
    """Platt scaling of class ``k`` written into its classifier row: ``logit' = a * logit + b``
    (a logistic regression of the labels on the class's logits of the fit split) becomes
    ``W[k] <- a W[k]``, ``b[k] <- a b[k] + b``; the threshold moves to ``sigmoid(a logit(t) + b)``
    so every decision stays what it was (``a > 0``; a non-positive slope is refused). Only the
    probabilities change: the treatment for a miscalibrated class, e.g. at a new site."""

    name = "platt"
    initial_cost = 1.5  # not in seed 000; after threshold calibration on a tie of issues
    treats = frozenset({"miscalibrated"})
    needs_features = True
    typical_seconds = 0.1

    def can_run(self, fit, state):
        why = super().can_run(fit, state)
        if not why and fit.task != "multilabel":
            return "per-class sigmoid outputs only (multi-label)"
        return why

    def apply(self, state, k, fit, issues):

        y = label_k(fit.labels, k, fit.task)
        known = np.isfinite(y)
        yk = y[known] > 0.5
        if yk.all() or not yk.any():
            return Attempt(None, reason="the fit split has one label only for this class")
        z = state.logits(fit)[known, k:k + 1]
        lr = LogisticRegression(C=self.params.get("C", 100.0)).fit(z, yk)
        a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        if a <= 0:
            return Attempt(None, reason=f"fitted slope {a:.3g} <= 0: the logits do not rank "
                                        "the class on the fit split")
        new = state.copy()
        new.weight[k] = a * state.weight[k]
        new.bias[k] = a * state.bias[k] + b
        t = float(np.clip(state.thresholds[k], 1e-7, 1 - 1e-7))
        new.thresholds[k] = float(1.0 / (1.0 + math.exp(-(a * math.log(t / (1 - t)) + b))))
        return Attempt(new, {"scale": a, "offset": b, "old_threshold": t,
                             "new_threshold": float(new.thresholds[k])})


@TREATMENTS.register("surgery", help="zero a few weights of classifier row k")
class SurgicalCorrection(Treatment):
    """:func:`~medscalpel.repair.surgery.surgical_correction` on the false positives named by a
    ``fp_cluster`` / ``confounder`` issue (else all false positives of ``k``), lowering their mean
    probability by ``delta_prob`` (default 0.1) within a TP-loss budget of
    ``tp_loss_fraction`` (default 1 %) of the fit split's true positives."""

    name = "surgery"
    initial_cost = 2.0
    treats = frozenset({"fp_cluster", "confounder", "low_precision"})
    needs_features = True
    typical_seconds = 2.0

    def apply(self, state, k, fit, issues):

        feats = state.features_view(fit)
        rows = sorted({r for i in issues for r in i.get("rows", [])})
        mask = None
        if rows:
            mask = np.zeros(len(fit.ids), bool)
            mask[rows] = True
        y = fit.labels[:, k] if fit.task == "multilabel" else (fit.labels == k)
        n_tp_budget = int(math.floor(self.params.get("tp_loss_fraction", 0.01) *
                                     float(np.nansum(y))))
        res = surgical_correction(feats, k, feats, fp_mask=mask, val=feats,
                                  thresholds=state.thresholds,
                                  delta_prob=self.params.get("delta_prob", 0.1),
                                  tp_loss_budget=n_tp_budget,
                                  max_weights=self.params.get("max_weights", 10))
        if not res.success:
            return Attempt(None, {"search": res.search}, res.message)
        new = state.copy()
        new.weight, new.bias = res.features.weight.copy(), res.features.bias.copy()
        d = res.to_dict()
        return Attempt(new, {"plan": d["plan"], "fit_delta_prob_mean":
                             d["targets"]["delta_prob_mean"], "fit_tp_lost": res.tp_lost,
                             "other_logits_identical": res.other_logits_identical})


@TREATMENTS.register("retrain_partial", help="fine-tune classifier row k on cached features")
class PartialRetraining(Treatment):
    """:func:`~medscalpel.repair.retrain.finetune_classifier` of row ``k`` only (others stay
    bit-identical), then Youden's J threshold on the fit split (seed 000's recipe)."""

    name = "retrain_partial"
    initial_cost = 2.0
    treats = frozenset(ISSUES)
    needs_features = True
    typical_seconds = 5.0

    def apply(self, state, k, fit, issues):

        feats = state.features_view(fit)
        r = finetune_classifier(feats, feats, classes=[k], steps=self.params.get("steps", 300),
                                lr=self.params.get("lr", 1e-2),
                                pos_weight=self.params.get("pos_weight", "balanced"),
                                progress=False)
        new = state.copy()
        new.weight, new.bias = r.weight.astype(np.float64), r.bias.astype(np.float64)
        new.thresholds[k] = _refit_threshold(new, k, fit)
        return Attempt(new, {"trainable_params": r.trainable_params,
                             "best_step": r.settings["best_step"],
                             "new_threshold": float(new.thresholds[k])})


@TREATMENTS.register("reoptimize", help="F re-optimization: logistic-regression refit of row k")
class FReoptimization(Treatment):
    """:func:`~medscalpel.repair.retrain.reoptimize_classifier` of row ``k`` (C chosen on a
    seeded 20 % of the fit split), then Youden's J threshold."""

    name = "reoptimize"
    initial_cost = 3.0
    treats = frozenset(ISSUES)
    needs_features = True
    typical_seconds = 30.0

    def apply(self, state, k, fit, issues):

        if fit.task != "multilabel":
            return Attempt(None, {}, "a per-row refit applies to multi-label models; refit the "
                           "whole layer with reoptimize_classifier for multi-class")
        feats = state.features_view(fit)
        r = reoptimize_classifier(feats, classes=[k], Cs=self.params.get("Cs", (0.01, 0.1, 1.0)),
                                  progress=False)
        new = state.copy()
        new.weight, new.bias = r.weight.astype(np.float64), r.bias.astype(np.float64)
        new.thresholds[k] = _refit_threshold(new, k, fit)
        return Attempt(new, {"chosen_C": r.settings["chosen_C"],
                             "new_threshold": float(new.thresholds[k])})


@TREATMENTS.register("augmentation", help="retrain with targeted augmentation (proposal)")
class Augmentation(Treatment):
    name = "augmentation"
    initial_cost = 8.0
    treats = frozenset({"confounder", "fp_cluster", "low_auroc", "low_recall"})
    runnable = False
    typical_seconds = 3 * 3600.0

    def apply(self, state, k, fit, issues):
        return Attempt(None, {"proposal": "retrain with augmentation that breaks the shortcut "
                              "(e.g. paste / remove the confounder in both labels) or oversample "
                              "the class: medscalpel train --augment ..."},
                       "proposal only: needs images and a training pipeline")


@TREATMENTS.register("full_retrain", help="retrain the whole model (proposal)")
class FullRetraining(Treatment):
    name = "full_retrain"
    initial_cost = 10.0
    treats = frozenset(ISSUES)
    runnable = False
    typical_seconds = 10 * 3600.0

    def apply(self, state, k, fit, issues):
        return Attempt(None, {"proposal": "retrain every parameter (medscalpel train) with the "
                              "issues above in mind (more data, relabelling, class weights)"},
                       "proposal only: needs images and a training pipeline")


def initial_costs() -> dict[str, float]:
    """Seed 000's cost matrix, from the registered treatments."""
    return {n: float(TREATMENTS.get(n).initial_cost) for n in TREATMENTS.names()}
