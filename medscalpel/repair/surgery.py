"""Surgical correction: zero a few weights of one classifier row to remove false positives.

Because ``logit_k = sum_c W[k, c] f_c(x) + b_k``, zeroing ``W[k, S]`` lowers image ``x``'s logit
for class ``k`` by exactly ``sum_{c in S} W[k, c] f_c(x)`` and leaves every other row, hence
every other class's logit, untouched. The procedure:

1. **Rank** the penultimate channels by how much more they push class ``k`` up on the target false
   positives than on ``k``'s true positives of the validation set:
   ``score_c = mean_FP(W[k,c] f_c) - mean_TP(W[k,c] f_c)`` (in logit units; the report also gives
   ``score_c / sum |score|``). Only channels with a positive score and a positive mean
   contribution on the targets are candidates.
2. **Search** (exactly, on cached features): add candidates in rank order, skipping one whose
   addition would push more validation true positives below threshold than ``tp_loss_budget``
   allows, until the goal is met (the targets' probability falls by ``delta_prob``, on average or
   for every target, or every target falls below its threshold); then a **pruning pass** drops any
   weight whose removal keeps the goal and the constraint; then an **exhaustive pass** looks for a
   smaller feasible set among the ``pool`` best-ranked candidates (when the number of subsets is
   small enough), so the set returned is the smallest within that pool.
   With ``adjust_bias=True`` the bias ``b_k`` may move as well: the shift closest to zero that
   keeps the true positives and still meets the goal.
3. **Plan, then apply**: :class:`SurgeryPlan` is data (row, channels, old weights, old/new bias);
   ``dry_run=True`` stops there.
4. **Verify** through the live ``nn.Linear``: the targets' probability change (mean and each),
   true positives lost, per-class AUROC before / after on the validation features, and that every
   other class's logits are bit-identical (``torch.equal``), which is checked, not assumed.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medscalpel.engine.metrics import auroc
from medscalpel.engine.predict import Features, extract_features
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError, ModelError, VerificationError
from medscalpel.explain.channels import channel_contributions
from medscalpel.models.checkpoint import save_model
from medscalpel.models.classifier import MedClassifier
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_fraction, check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
_EPS = 1e-6  # logit safety margin of the float64 search against float32 rounding


# ----------------------------------------------------------------------------- helpers
def class_index(class_names: Sequence[str], k: int | str, owner: str) -> int:
    """Index of class ``k`` (name or index) with a helpful error."""
    if isinstance(k, str):
        if k not in class_names:
            raise ConfigError(f"{owner}: unknown class {k!r}. Valid names: "
                              f"{', '.join(class_names)}.")
        return list(class_names).index(k)
    return int(check_range(k, "target_class", owner, 0, len(class_names) - 1, integer=True))


def contributions(features: np.ndarray, weight: np.ndarray, bias: np.ndarray, k: int
                  ) -> np.ndarray:
    """float64 ``[N, C]`` contributions ``W[k, c] * f_c(x)`` of every channel to logit ``k``
    (via :func:`medscalpel.explain.channels.channel_contributions`)."""
    return channel_contributions(features, weight, bias).for_class(k)


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))


def margins(logits: np.ndarray, k: int, task: str, threshold: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """(probability margin, decision margin) of class ``k``; both move one-for-one with logit k.

    Multi-label: ``p_k = sigmoid(z_k)``, decided positive when ``z_k >= logit(threshold)``.
    Multi-class: ``p_k = sigmoid(z_k - logsumexp_{j != k} z_j)`` (the softmax probability),
    decided positive when ``z_k`` is the largest logit.
    """
    z = np.asarray(logits, np.float64)
    if task == "multilabel":
        return z[:, k].copy(), z[:, k] - _logit(threshold)
    others = np.delete(z, k, axis=1)
    mx = others.max(1)
    lse = mx + np.log(np.exp(others - mx[:, None]).sum(1))
    return z[:, k] - lse, z[:, k] - mx


def class_probs(logits: np.ndarray, task: str) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    if task == "multilabel":
        return _sigmoid(z)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _linear_from(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.asarray(weight, np.float32)))
        lin.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))
    return lin


# ----------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class SurgeryPlan:
    """What to change in classifier row ``class_index`` (data; apply with :meth:`apply`)."""

    class_index: int
    class_name: str
    channels: tuple[int, ...]
    old_weights: tuple[float, ...]
    old_bias: float
    new_bias: float
    feature_dim: int
    scores: tuple[float, ...] = ()

    @property
    def n_weights(self) -> int:
        return len(self.channels)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "class_index": self.class_index,
                "class": self.class_name, "channels": list(self.channels),
                "old_weights": list(self.old_weights), "old_bias": self.old_bias,
                "new_bias": self.new_bias, "feature_dim": self.feature_dim,
                "scores": list(self.scores)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SurgeryPlan":
        return cls(int(d["class_index"]), str(d["class"]), tuple(int(c) for c in d["channels"]),
                   tuple(float(w) for w in d["old_weights"]), float(d["old_bias"]),
                   float(d["new_bias"]), int(d["feature_dim"]),
                   tuple(float(s) for s in d.get("scores", ())))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SurgeryPlan":
        return cls.from_dict(read_json(path))

    def _check(self, weight: torch.Tensor, where: str) -> None:
        if tuple(weight.shape)[1] != self.feature_dim or weight.shape[0] <= self.class_index:
            raise ModelError(f"{where}: the classifier is {tuple(weight.shape)} but the plan was "
                             f"made for row {self.class_index} of a [K, {self.feature_dim}] one.")
        if self.channels:
            cur = weight[self.class_index, list(self.channels)].detach().cpu().double().numpy()
            if not np.allclose(cur, np.asarray(self.old_weights), rtol=0, atol=1e-7):
                raise ModelError(f"{where}: the weights of row {self.class_index} differ from the "
                                 "plan's old weights: the plan was made for another model (or "
                                 "already applied).")

    def apply_linear(self, linear: nn.Linear, inplace: bool = False) -> nn.Linear:
        """Zero ``W[k, channels]`` and set ``b[k]``; returns the (copied) layer."""
        self._check(linear.weight, "SurgeryPlan.apply")
        lin = linear if inplace else copy.deepcopy(linear)
        with torch.no_grad():
            if self.channels:
                lin.weight[self.class_index, list(self.channels)] = 0.0
            if lin.bias is None:
                raise ModelError("SurgeryPlan.apply: the classifier has no bias.")
            lin.bias[self.class_index] = float(self.new_bias)
        return lin

    def apply(self, target: MedClassifier | Features, inplace: bool = False
              ) -> MedClassifier | Features:
        """Apply to a model (its ``classifier``) or to a :class:`Features` (its weight/bias)."""
        if isinstance(target, Features):
            w = target.weight.copy()
            b = target.bias.copy()
            self._check(torch.from_numpy(np.asarray(w, np.float64)), "SurgeryPlan.apply")
            w[self.class_index, list(self.channels)] = 0.0
            b[self.class_index] = np.float32(self.new_bias)
            return replace(target, weight=w, bias=b)
        model = target if inplace else copy.deepcopy(target)
        self.apply_linear(model.classifier, inplace=True)
        return model


# ----------------------------------------------------------------------------- search
@dataclass
class _Problem:
    """Everything the exact feasibility check needs (float64)."""

    ct: np.ndarray  # [nt, C] contributions on targets
    cv: np.ndarray  # [nv, C] contributions on validation true positives
    mt: np.ndarray  # target probability margins
    dt: np.ndarray  # target decision margins
    dv: np.ndarray  # validation TP decision margins
    goal: str  # mean | each | below
    delta: float
    budget: int
    adjust_bias: bool

    def bias_range(self, drop_t: np.ndarray, drop_v: np.ndarray) -> tuple[float, float]:
        """Feasible bias shifts [lo, hi] for the given drops (lo > hi: infeasible)."""
        # TP constraint: at most `budget` TPs with dv - drop_v + s < 0
        need = drop_v - self.dv + _EPS  # s >= need_n keeps TP n
        if need.size > self.budget:
            lo = float(np.sort(need)[::-1][self.budget])
        else:
            lo = -math.inf
        m = self.mt - drop_t
        p0 = _sigmoid(self.mt)
        if self.goal == "below":
            hi = float(np.min(-(self.dt - drop_t))) - _EPS
        elif self.goal == "each":
            tgt = p0 - self.delta
            if np.any(tgt <= 0):
                return lo, -math.inf
            hi = float(np.min(_logit(tgt) - m)) - _EPS
        else:
            tgt = float(p0.mean() - self.delta)
            if tgt <= 0:
                return lo, -math.inf

            def g(s: float) -> float:
                return float(_sigmoid(m + s).mean()) - tgt

            a, b = -60.0, 60.0
            if g(a) > 0:
                return lo, -math.inf
            if g(b) <= 0:
                hi = b
            else:
                for _ in range(100):
                    mid = 0.5 * (a + b)
                    if g(mid) <= 0:
                        a = mid
                    else:
                        b = mid
                hi = a - _EPS
        return lo, hi

    def check(self, drop_t: np.ndarray, drop_v: np.ndarray) -> tuple[bool, bool, float]:
        """(goal met, TP constraint met, bias shift) for a set with these drops."""
        lo, hi = self.bias_range(drop_t, drop_v)
        if self.adjust_bias:
            if lo <= hi:
                return True, True, float(min(max(0.0, lo), hi))
            return False, lo <= 0.0, 0.0
        return hi >= 0.0, lo <= 0.0, 0.0

    def drops(self, s: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        idx = list(s)
        return self.ct[:, idx].sum(1), self.cv[:, idx].sum(1)


def _search(p: _Problem, ranked: np.ndarray, max_weights: int, pool: int, max_subsets: int
            ) -> tuple[list[int] | None, float, dict[str, Any]]:
    info: dict[str, Any] = {"skipped_for_tp": [], "pruned": [], "exhaustive": None}
    chosen: list[int] = []
    drop_t = np.zeros(p.ct.shape[0])
    drop_v = np.zeros(p.cv.shape[0])
    goal, tp_ok, shift = p.check(drop_t, drop_v)
    found = goal and tp_ok
    if not found:
        for c in ranked:
            if len(chosen) >= max_weights:
                break
            nt, nv = drop_t + p.ct[:, c], drop_v + p.cv[:, c]
            goal, tp_ok, shift = p.check(nt, nv)
            if not tp_ok:
                info["skipped_for_tp"].append(int(c))
                continue
            chosen.append(int(c))
            drop_t, drop_v = nt, nv
            if goal:
                found = True
                break
    if not found:
        return None, 0.0, info
    # pruning pass: least important first
    for c in list(reversed(chosen)):
        trial = [x for x in chosen if x != c]
        goal, tp_ok, _ = p.check(*p.drops(trial))
        if goal and tp_ok:
            chosen = trial
            info["pruned"].append(c)
    # exhaustive pass for a smaller set among the top `pool` candidates
    cand = list(dict.fromkeys([int(c) for c in ranked[:pool]] + chosen))
    checked_sizes = []
    proved = len(chosen) <= 1  # the empty set was checked first
    size = len(chosen) - 1
    while size >= 1:
        if math.comb(len(cand), size) > max_subsets:
            break
        better = None
        for sub in itertools.combinations(cand, size):
            goal, tp_ok, _ = p.check(*p.drops(sub))
            if goal and tp_ok:
                better = list(sub)
                break
        checked_sizes.append(size)
        if better is None:
            proved = True
            break
        chosen = better
        size -= 1
        proved = size < 1
    info["exhaustive"] = {"pool": len(cand), "sizes_checked": checked_sizes,
                          "minimal_within_pool": bool(proved)}
    goal, tp_ok, shift = p.check(*p.drops(chosen))
    return chosen, shift, info


# ----------------------------------------------------------------------------- result
@dataclass
class SurgeryResult:
    """Plan, predicted and verified effects of one surgical correction."""

    success: bool
    message: str
    plan: SurgeryPlan | None
    applied: bool
    target_ids: list[str]
    target_prob_before: list[float]
    target_prob_after: list[float]
    tp_total: int
    tp_lost: int
    tp_lost_ids: list[str]
    auroc_before: dict[str, float]
    auroc_after: dict[str, float]
    other_logits_identical: bool | None
    other_weights_identical: bool | None
    ranking: list[dict[str, Any]]
    search: dict[str, Any]
    settings: dict[str, Any]
    seconds: float = 0.0
    # verified in the model's own dtype (float32) through the live layer, not in float64
    goal_met: bool | None = None
    fp_above_threshold_after: int | None = None  # targets still decided positive after
    model: MedClassifier | None = field(default=None, repr=False)
    features: Features | None = field(default=None, repr=False)
    model_dir: str | None = None

    @property
    def delta_prob(self) -> np.ndarray:
        return np.asarray(self.target_prob_after) - np.asarray(self.target_prob_before)

    def to_dict(self) -> dict[str, Any]:
        d = self.delta_prob
        n_t = len(self.target_ids)
        return {"schema_version": SCHEMA, "success": self.success, "message": self.message,
                "goal": self.settings.get("goal"), "delta_prob": self.settings.get("delta_prob"),
                "goal_met": self.goal_met,
                "false_positives_still_above_threshold": (
                    None if self.fp_above_threshold_after is None else
                    {"k": self.fp_above_threshold_after, "n": n_t,
                     "text": f"{self.fp_above_threshold_after}/{n_t}"}),
                "applied": self.applied, "plan": None if self.plan is None else self.plan.to_dict(),
                "n_weights_changed": 0 if self.plan is None else self.plan.n_weights,
                "targets": {"n": len(self.target_ids), "ids": self.target_ids,
                            "prob_before": self.target_prob_before,
                            "prob_after": self.target_prob_after,
                            "delta_prob_mean": float(d.mean()) if d.size else float("nan"),
                            "delta_prob_max": float(d.max()) if d.size else float("nan"),
                            "delta_prob_min": float(d.min()) if d.size else float("nan")},
                "true_positives": {"n": self.tp_total, "lost": self.tp_lost,
                                   "lost_ids": self.tp_lost_ids},
                "auroc_before": self.auroc_before, "auroc_after": self.auroc_after,
                "other_logits_identical": self.other_logits_identical,
                "other_weights_identical": self.other_weights_identical,
                "ranking": self.ranking, "search": self.search, "settings": self.settings,
                "seconds": self.seconds, "model_dir": self.model_dir}

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())


# ----------------------------------------------------------------------------- main
def _select_targets(targets: Features, k: int, fp_ids, fp_mask, decided: np.ndarray
                    ) -> np.ndarray:
    if fp_ids is not None and fp_mask is not None:
        raise ConfigError("surgical_correction: give fp_ids or fp_mask, not both.")
    if fp_ids is not None:
        pos = {i: r for r, i in enumerate(targets.ids)}
        missing = [i for i in fp_ids if str(i) not in pos]
        if missing:
            raise DataError(f"surgical_correction: {len(missing)} fp_ids are not in the target "
                            f"features (first: {missing[:3]}); pass ids of those images.")
        rows = np.array([pos[str(i)] for i in fp_ids], dtype=np.int64)
    elif fp_mask is not None:
        m = np.asarray(fp_mask, bool)
        if m.shape != (len(targets.ids),):
            raise DataError(f"surgical_correction: fp_mask has shape {m.shape}; expected "
                            f"({len(targets.ids)},) (one flag per target image).")
        rows = np.flatnonzero(m)
    else:
        y = _label_k(targets.labels, k, targets.task)
        rows = np.flatnonzero((y == 0) & decided)
    if rows.size == 0:
        raise DataError("surgical_correction: no target images selected (no false positives of "
                        f"class {targets.class_names[k]!r}); nothing to correct.")
    y = _label_k(targets.labels, k, targets.task)[rows]
    bad = rows[y == 1]
    if bad.size:
        raise DataError(f"surgical_correction: {bad.size} selected images are labelled positive "
                        f"for {targets.class_names[k]!r} (e.g. {targets.ids[bad[0]]!r}), so they "
                        "are not false positives; select negatives only.")
    return rows


def _label_k(labels: np.ndarray, k: int, task: str) -> np.ndarray:
    """1 / 0 / NaN for class k."""
    if task == "multilabel":
        return np.asarray(labels, np.float64)[:, k]
    return (np.asarray(labels) == k).astype(np.float64)


def _auroc_all(logits: np.ndarray, labels: np.ndarray, task: str, names: Sequence[str]
               ) -> dict[str, float]:
    probs = class_probs(logits, task)
    out = {}
    for j, n in enumerate(names):
        y = _label_k(labels, j, task)
        known = np.isfinite(y)
        out[n] = auroc(y[known] > 0.5, probs[known, j])
    return out


def surgical_correction(
    model: MedClassifier | Features,
    target_class: int | str,
    targets: Features,
    fp_ids: Sequence[str] | None = None,
    fp_mask: np.ndarray | None = None,
    val: Features | None = None,
    *,
    thresholds: Sequence[float] | None = None,
    delta_prob: float | None = None,
    below_threshold: bool = False,
    criterion: str = "mean",
    tp_loss_budget: int = 0,
    adjust_bias: bool = False,
    max_weights: int = 32,
    pool: int = 16,
    max_subsets: int = 20000,
    dry_run: bool = False,
    out_dir: str | os.PathLike | None = None,
) -> SurgeryResult:
    """Zero the smallest set of weights in classifier row ``k`` that removes the given false
    positives while keeping ``k``'s validation true positives.

    Args:
        model: a :class:`MedClassifier` (its ``classifier`` is patched in a copy) or a
            :class:`Features` (its cached weight/bias are patched).
        target_class: class name or index ``k``.
        targets: features of the images holding the false positives to fix.
        fp_ids / fp_mask: which target images are the false positives (default: every target
            image labelled negative for ``k`` and decided positive).
        val: validation features for the true-positive constraint and the AUROC report
            (default: ``targets``).
        thresholds: per-class probability thresholds (default: the model card's, else 0.5).
        delta_prob: required fall of the targets' probability (``criterion`` ``mean``: of their
            mean; ``each``: of every target).
        below_threshold: instead of ``delta_prob``, require every target below its threshold.
        tp_loss_budget: how many validation true positives of ``k`` may fall below threshold.
        adjust_bias: allow moving ``b_k`` too (the shift closest to 0 that stays feasible).
        max_weights: largest number of weights the greedy pass may zero.
        pool, max_subsets: the exhaustive minimality pass searches subsets of the ``pool``
            best-ranked candidates when there are at most ``max_subsets`` of one size.
        dry_run: compute the plan and its predicted effect only.
        out_dir: save the corrected model (model input only) with lineage into this directory,
            plus ``surgery.json``.

    Returns:
        A :class:`SurgeryResult`; ``success`` is False (with ``message``) when no set within
        ``max_weights`` meets the goal under the constraint; nothing is applied then.

    Steps: :func:`_validate_surgery` -> :func:`_plan_surgery` -> :func:`_apply_surgery` ->
    :func:`_verify_surgery`.
    """
    t0 = time.perf_counter()
    inp = _validate_surgery(model, target_class, targets, val, thresholds=thresholds,
                            delta_prob=delta_prob, below_threshold=below_threshold,
                            criterion=criterion, tp_loss_budget=tp_loss_budget,
                            max_weights=max_weights, pool=pool)
    planned = _plan_surgery(inp, targets, fp_ids, fp_mask, delta_prob=delta_prob,
                            tp_loss_budget=tp_loss_budget, adjust_bias=adjust_bias,
                            max_weights=max_weights, pool=pool, max_subsets=max_subsets)
    if planned.plan is None:
        return _infeasible_result(inp, planned, time.perf_counter() - t0)
    if dry_run:
        return _dry_run_result(inp, planned, time.perf_counter() - t0)
    applied = _apply_surgery(inp, planned.plan, targets)
    result = _verify_surgery(model, inp, planned, applied, time.perf_counter() - t0)
    if out_dir is not None:
        result.model_dir = str(save_surgery(result, out_dir, parent_card=inp.card))
    return result


@dataclass(frozen=True)
class _Inputs:
    """The validated inputs of one surgical correction."""

    val: Features
    names: tuple[str, ...]
    k: int
    live: nn.Linear  # the classifier being corrected (never changed)
    weight: np.ndarray
    bias: np.ndarray
    card: Any
    task: str
    thr_k: float  # probability threshold of class k (multi-label; argmax decides otherwise)
    goal: str  # mean | each | below
    delta: float


@dataclass(frozen=True)
class _Planned:
    """The plan and everything computed on the cached features (float64) to reach it."""

    plan: SurgeryPlan | None
    problem: _Problem
    rows: np.ndarray  # target rows (false positives to fix)
    tp_rows: np.ndarray  # validation true positives of k
    mt: np.ndarray  # probability margins of the targets
    dt: np.ndarray  # decision margins of the targets
    dv_tp: np.ndarray  # decision margins of the validation true positives
    shift: float
    info: dict[str, Any]
    ranking: list[dict[str, Any]]
    settings: dict[str, Any]
    target_ids: list[str]
    auroc_before: dict[str, float]


@dataclass(frozen=True)
class _Applied:
    """The corrected layer and both layers' logits on validation + target features."""

    layer: nn.Linear
    z0: torch.Tensor
    z1: torch.Tensor
    same_logits: bool
    same_weights: bool


def _live_classifier(model: Any, owner: str) -> tuple[nn.Linear, np.ndarray, np.ndarray, Any]:
    """(layer, weight, bias, card) of a model or of cached features."""
    if isinstance(model, Features):
        weight, bias = np.asarray(model.weight), np.asarray(model.bias)
        return _linear_from(weight, bias), weight, bias, None
    if isinstance(model, MedClassifier):
        live = model.classifier
        return (live, live.weight.detach().cpu().numpy(), live.bias.detach().cpu().numpy(),
                model.card)
    raise ModelError(f"{owner}: 'model' must be a MedClassifier or Features; got "
                     f"{type(model).__name__}.")


def _check_features(targets: Features, val: Features, weight: np.ndarray, bias: np.ndarray,
                    owner: str) -> None:
    for name, f in (("targets", targets), ("val", val)):
        if f.features.shape[1] != weight.shape[1]:
            raise DataError(f"{owner}: {name} features have {f.features.shape[1]} channels but "
                            f"the classifier takes {weight.shape[1]}.")
        if f.weight.shape != weight.shape or not np.allclose(f.weight, weight, atol=1e-6) or \
                not np.allclose(f.bias, bias, atol=1e-6):
            raise DataError(f"{owner}: the {name} features were extracted with another "
                            "classifier than the one being corrected; re-extract them with "
                            "this model.")


def _threshold_of(k: int, task: str, names: tuple[str, ...], thresholds: Any, card: Any,
                  owner: str) -> float:
    if task != "multilabel":
        return 0.5  # unused: argmax decides
    thr = np.asarray(thresholds if thresholds is not None else
                     (card.effective_thresholds() if card is not None else [0.5] * len(names)),
                     np.float64)
    if thr.shape != (len(names),):
        raise ConfigError(f"{owner}: {thr.size} thresholds for {len(names)} classes.")
    for t in thr:
        check_fraction(float(t), "thresholds", owner)
    return float(thr[k])


def _validate_surgery(model: Any, target_class: int | str, targets: Any, val: Any, *,
                      thresholds: Any, delta_prob: float | None, below_threshold: bool,
                      criterion: str, tp_loss_budget: int, max_weights: int, pool: int
                      ) -> _Inputs:
    """Step 1: check every argument and resolve the class, the live layer and the threshold."""
    owner = "surgical_correction"
    if isinstance(model, Predictions) or isinstance(targets, Predictions) or \
            isinstance(val, Predictions):
        raise DataError(f"{owner}: Predictions hold logits only; surgery needs penultimate "
                        "features. Use medscalpel.engine.predict.extract_features(model, dataset).")
    if not isinstance(targets, Features):
        raise DataError(f"{owner}: 'targets' must be a Features (cached penultimate features); "
                        f"got {type(targets).__name__}.")
    val = targets if val is None else val
    if tuple(val.class_names) != tuple(targets.class_names):
        raise DataError(f"{owner}: validation and target features have different classes.")
    names = tuple(targets.class_names)
    k = class_index(names, target_class, owner)
    check_in(criterion, "criterion", owner, ("mean", "each"))
    check_range(tp_loss_budget, "tp_loss_budget", owner, 0, integer=True)
    check_range(max_weights, "max_weights", owner, 1, integer=True)
    check_range(pool, "pool", owner, 1, integer=True)
    if below_threshold == (delta_prob is not None):
        raise ConfigError(f"{owner}: give exactly one goal: delta_prob=... (a fall in "
                          "probability) or below_threshold=True.")
    if delta_prob is not None:
        check_range(delta_prob, "delta_prob", owner, 0.0, 1.0, low_inclusive=False,
                    high_inclusive=False)
    live, weight, bias, card = _live_classifier(model, owner)
    _check_features(targets, val, weight, bias, owner)
    thr_k = _threshold_of(k, targets.task, names, thresholds, card, owner)
    return _Inputs(val=val, names=names, k=k, live=live, weight=weight, bias=bias, card=card,
                   task=targets.task, thr_k=thr_k, goal="below" if below_threshold else criterion,
                   delta=float(delta_prob or 0.0))


def _plan_surgery(inp: _Inputs, targets: Features, fp_ids: Any, fp_mask: Any, *,
                  delta_prob: float | None, tp_loss_budget: int, adjust_bias: bool,
                  max_weights: int, pool: int, max_subsets: int) -> _Planned:
    """Step 2: rank channels on the cached features (float64) and search the smallest set."""
    k, task, weight, bias, val = inp.k, inp.task, inp.weight, inp.bias, inp.val
    lt = targets.features.astype(np.float64) @ weight.T.astype(np.float64) + bias
    lv = val.features.astype(np.float64) @ weight.T.astype(np.float64) + bias
    mt_all, dt_all = margins(lt, k, task, inp.thr_k)
    _, dv_all = margins(lv, k, task, inp.thr_k)
    rows = _select_targets(targets, k, fp_ids, fp_mask, dt_all >= 0)
    yv = _label_k(val.labels, k, task)
    tp_rows = np.flatnonzero((yv == 1) & (dv_all >= 0))
    ct = contributions(targets.features[rows], weight, bias, k)
    cv = contributions(val.features[tp_rows], weight, bias, k)
    mean_fp = ct.mean(0)
    mean_tp = cv.mean(0) if tp_rows.size else np.zeros_like(mean_fp)
    score = mean_fp - mean_tp
    norm = float(np.abs(score).sum()) or 1.0
    ranked = np.flatnonzero((score > 0) & (mean_fp > 0))
    ranked = ranked[np.argsort(-score[ranked], kind="mergesort")]
    prob = _Problem(ct=ct, cv=cv, mt=mt_all[rows], dt=dt_all[rows], dv=dv_all[tp_rows],
                    goal=inp.goal, delta=inp.delta, budget=int(tp_loss_budget),
                    adjust_bias=adjust_bias)
    chosen, shift, info = _search(prob, ranked, max_weights, pool, max_subsets)
    ranking = [{"channel": int(c), "score": float(score[c]), "normalised": float(score[c] / norm),
                "mean_fp": float(mean_fp[c]), "mean_tp": float(mean_tp[c]),
                "weight": float(weight[k, c])} for c in ranked[:max(pool, 20)]]
    settings = {"class": inp.names[k], "class_index": k, "goal": inp.goal,
                "delta_prob": delta_prob, "threshold": inp.thr_k if task == "multilabel" else None,
                "tp_loss_budget": tp_loss_budget, "adjust_bias": adjust_bias,
                "max_weights": max_weights, "pool": pool, "n_targets": int(rows.size),
                "n_candidates": int(ranked.size), "val_split": val.split,
                "target_split": targets.split, "task": task}
    plan = None if chosen is None else SurgeryPlan(
        class_index=k, class_name=inp.names[k], channels=tuple(chosen),
        old_weights=tuple(float(weight[k, c]) for c in chosen), old_bias=float(bias[k]),
        new_bias=float(np.float32(bias[k] + shift)), feature_dim=int(weight.shape[1]),
        scores=tuple(float(score[c]) for c in chosen))
    return _Planned(plan=plan, problem=prob, rows=rows, tp_rows=tp_rows, mt=mt_all[rows],
                    dt=dt_all[rows], dv_tp=dv_all[tp_rows], shift=shift, info=info,
                    ranking=ranking, settings=settings,
                    target_ids=[targets.ids[r] for r in rows],
                    auroc_before=_auroc_all(lv, val.labels, task, inp.names))


def _infeasible_result(inp: _Inputs, pl: _Planned, seconds: float) -> SurgeryResult:
    """No set within ``max_weights`` meets the goal: nothing applied."""
    s = pl.settings
    msg = (f"no set of at most {s['max_weights']} weights of row {inp.names[inp.k]!r} meets the "
           f"goal ({inp.goal}) while losing at most {s['tp_loss_budget']} validation true "
           f"positives; {len(pl.info['skipped_for_tp'])} candidate channels were skipped because "
           "they carry the true positives. Relax delta_prob / tp_loss_budget, allow "
           "adjust_bias=True, or escalate to partial retraining.")
    p_before = _sigmoid(pl.mt).tolist()
    return SurgeryResult(False, msg, None, False, pl.target_ids, p_before, p_before,
                         int(pl.tp_rows.size), 0, [], pl.auroc_before, pl.auroc_before, None,
                         None, pl.ranking, pl.info, pl.settings, round(seconds, 4), False,
                         int(np.sum(pl.dt >= 0)))


def _dry_run_result(inp: _Inputs, pl: _Planned, seconds: float) -> SurgeryResult:
    """The plan with its effects predicted in float64 from the cached features."""
    drop_t, drop_v = pl.problem.drops(pl.plan.channels)
    after = _sigmoid(pl.mt - drop_t + pl.shift).tolist()
    lost = np.flatnonzero(pl.dv_tp - drop_v + pl.shift < 0)
    return SurgeryResult(True, "dry run: plan computed, nothing applied (effects predicted "
                         "in float64 from the cached features)", pl.plan, False, pl.target_ids,
                         _sigmoid(pl.mt).tolist(), after, int(pl.tp_rows.size), int(lost.size),
                         [inp.val.ids[pl.tp_rows[i]] for i in lost], pl.auroc_before, {}, None,
                         None, pl.ranking, pl.info, pl.settings, round(seconds, 4), None,
                         int(np.sum(pl.dt - drop_t + pl.shift >= 0)))


def _apply_surgery(inp: _Inputs, plan: SurgeryPlan, targets: Features) -> _Applied:
    """Step 3: apply the plan to a copy of the live layer and run both layers on the
    validation + target features; every other class's logits and weights must be identical."""
    new_lin = plan.apply_linear(inp.live, inplace=False)
    live = inp.live
    was_training = live.training
    try:
        live.eval()
        with torch.no_grad():
            xt = torch.from_numpy(np.ascontiguousarray(targets.features, np.float32))
            xv = torch.from_numpy(np.ascontiguousarray(inp.val.features, np.float32))
            x = torch.cat([xv, xt])
            z0 = live(x)
            z1 = new_lin(x)
            others = [j for j in range(len(inp.names)) if j != inp.k]
            same_logits = bool(torch.equal(z0[:, others], z1[:, others]))
            same_weights = bool(torch.equal(live.weight[others], new_lin.weight[others]) and
                                torch.equal(live.bias[others], new_lin.bias[others]))
    finally:
        live.train(was_training)
    if not (same_logits and same_weights):
        raise VerificationError(f"surgical_correction: after changing row {inp.k} only, the "
                                "logits of other classes are not bit-identical; this is a bug in "
                                "the surgery code or the classifier layer (please report it).")
    return _Applied(new_lin, z0, z1, same_logits, same_weights)


def _verify_surgery(model: Any, inp: _Inputs, pl: _Planned, ap: _Applied, seconds: float
                    ) -> SurgeryResult:
    """Step 4: the goal and the true-positive guard in the model's own dtype; the result with
    the corrected model (or features)."""
    plan, budget, n_val = pl.plan, pl.settings["tp_loss_budget"], len(inp.val.ids)
    v = _verify_in_model_dtype(ap.z0, ap.z1, n_val, pl.rows, pl.tp_rows, inp.k, inp.task,
                               inp.thr_k, inp.goal, inp.delta)
    lost, before, after = v["lost"], v["before"], v["after"]
    auroc_after = _auroc_all(ap.z1[:n_val].double().numpy(), inp.val.labels, inp.task, inp.names)
    msg = f"zeroed {plan.n_weights} weight(s) of row {inp.names[inp.k]!r}"
    if plan.new_bias != plan.old_bias:
        msg += f" and moved its bias by {plan.new_bias - plan.old_bias:+.4g}"
    msg += (f"; {v['above']}/{pl.rows.size} target false positives still above threshold "
            f"({v['dtype']})")
    if not v["goal_met"]:
        msg += (f"; the goal ({inp.goal}) is NOT met in {v['dtype']} (the float64 search met "
                "it: rounding at the threshold)")
    if lost.size > budget:
        msg += (f"; {lost.size} true positives lost in {v['dtype']} (budget "
                f"{budget}): rounding at the threshold")
    success = bool(v["goal_met"] and lost.size <= budget)
    patched_model = patched_feats = None
    if isinstance(model, MedClassifier):
        patched_model = copy.deepcopy(model)
        patched_model.classifier = ap.layer
    else:
        patched_feats = plan.apply(model)
    return SurgeryResult(success, msg, plan, True, pl.target_ids, before, after,
                         int(pl.tp_rows.size), int(lost.size), [inp.val.ids[i] for i in lost],
                         pl.auroc_before, auroc_after, ap.same_logits, ap.same_weights,
                         pl.ranking, pl.info, pl.settings, round(seconds, 4),
                         bool(v["goal_met"]), int(v["above"]), patched_model, patched_feats)


def _verify_in_model_dtype(z0: torch.Tensor, z1: torch.Tensor, n_val: int, rows: np.ndarray,
                           tp_rows: np.ndarray, k: int, task: str, thr_k: float, goal: str,
                           delta: float) -> dict[str, Any]:
    """Goal and true-positive checks on the live layer's logits in THEIR dtype (float32 for
    a float32 model): a decision is what the deployed model computes, not the float64 search.
    """
    dtype = str(z1.dtype).replace("torch.", "")
    thr_logit = torch.logit(torch.tensor(thr_k, dtype=z1.dtype)) if task == "multilabel" else None

    def decided(z: torch.Tensor) -> np.ndarray:
        if task == "multilabel":
            return (z[:, k] >= thr_logit).numpy()
        return (z.argmax(1) == k).numpy()

    def prob(z: torch.Tensor) -> np.ndarray:
        p = torch.sigmoid(z[:, k]) if task == "multilabel" else torch.softmax(z, 1)[:, k]
        return p.double().numpy()

    zt0, zt1 = z0[n_val:][rows], z1[n_val:][rows]
    before, after = prob(zt0), prob(zt1)
    above = int(decided(zt1).sum())
    if goal == "below":
        met = above == 0
    elif goal == "each":
        met = bool(np.all(before - after >= delta))
    else:
        met = bool(before.size == 0 or (before - after).mean() >= delta)
    kept = decided(z1[:n_val])
    lost = tp_rows[~kept[tp_rows]]
    return {"dtype": dtype, "before": before.tolist(), "after": after.tolist(), "above": above,
            "goal_met": bool(met), "lost": lost}


def save_surgery(result: "SurgeryResult | SurgeryLadder", out_dir: str | os.PathLike,
                 parent_card=None) -> Path:
    """Write ``surgery.json`` and, when the result holds a model, the corrected model directory
    (``model.safetensors`` + ``model.json`` with a ``surgical_correction`` lineage step).
    A :class:`SurgeryLadder` is saved with every attempt and its status (full / partial)."""
    ladder = result if isinstance(result, SurgeryLadder) else None
    result = ladder.result if ladder is not None else result
    out = Path(out_dir)
    if result.model is not None:
        card = parent_card if parent_card is not None else result.model.card
        if card is None:
            raise ModelError("save_surgery: the model has no ModelCard; load it with load_model "
                             "or train it with medscalpel first.")
        d = result.to_dict()
        new_card = card.with_lineage(
            "surgical_correction", parent=card.model_id, plan=d["plan"],
            verification={"delta_prob_mean": d["targets"]["delta_prob_mean"],
                          "tp_lost": result.tp_lost, "goal": d["goal"],
                          "goal_met": result.goal_met,
                          "false_positives_still_above_threshold":
                              d["false_positives_still_above_threshold"],
                          "ladder_status": None if ladder is None else ladder.status,
                          "other_logits_identical": result.other_logits_identical})
        save_model(result.model, out, new_card)
        result.model_dir = str(out)
    write_json(out / "surgery.json", (ladder or result).to_dict())
    return out


# ----------------------------------------------------------------------------- rules
def confounder_flags(dataset, name: str) -> np.ndarray:
    """Per-image boolean flags of a named confounder (e.g. the phantom's ``chest_tube``).

    Looked up, in order, as ``dataset.confounder(name)``, ``dataset.confounders[name]``,
    ``dataset.meta['confounders'][name]``, a ``name`` column of ``dataset.gt`` /
    ``dataset.groundtruth``; a subset view asks its parent and keeps its own rows.
    """
    n = len(dataset)

    def done(arr) -> np.ndarray:
        a = np.asarray(arr).astype(bool).reshape(-1)
        if a.shape != (n,):
            raise DataError(f"confounder {name!r} of {dataset.spec!r} has {a.size} flags for "
                            f"{n} images.")
        return a

    fn = getattr(dataset, "confounder", None)
    if callable(fn):
        return done(fn(name))
    for holder in (getattr(dataset, "confounders", None),
                   getattr(dataset, "meta", {}).get("confounders")):
        if holder is not None and name in holder:
            return done(holder[name])
    for attr in ("gt", "groundtruth"):
        table = getattr(dataset, attr, None)
        if table is not None and hasattr(table, "columns") and name in table.columns:
            return done(table[name].to_numpy())
    parent, idx = getattr(dataset, "parent", None), getattr(dataset, "indices", None)
    if parent is not None and idx is not None:
        return confounder_flags(parent, name)[np.asarray(idx)]
    raise DataError(f"Dataset {getattr(dataset, 'spec', '?')!r} exposes no confounder {name!r}. "
                    "Pass a rule function rule(dataset, index) -> bool instead, or use a dataset "
                    "with per-image confounder flags (the phantom: 'chest_tube', 'ap_marker').")


def surgery_from_rule(
    model: MedClassifier,
    dataset,
    rule: Callable[[Any, int], bool] | str,
    target_class: int | str,
    val: Features | Any | None = None,
    *,
    batch_size: int = 64,
    device: str | None = "auto",
    progress: bool | None = None,
    **kwargs: Any,
) -> SurgeryResult:
    """Surgical correction of the false positives selected by a rule.

    The targets are the images of ``dataset`` for which ``rule`` holds (a function
    ``rule(dataset, index) -> bool`` or the name of a confounder flag, e.g. ``"chest_tube"``),
    that are labelled negative for ``target_class`` and that the model decides positive.

    Args:
        val: validation :class:`Features`, or a dataset whose features are extracted here
            (default: ``dataset`` itself).
        **kwargs: passed to :func:`surgical_correction` (``delta_prob``, ``below_threshold``,
            ``tp_loss_budget``, ``adjust_bias``, ``out_dir``...).

    Example (the phantom's chest-tube shortcut)::

        surgery_from_rule(model, phantom_shifted, "chest_tube", "Pneumothorax",
                          val=phantom_val, below_threshold=True, out_dir="runs/ptx-surgery")
    """
    feats = extract_features(model, dataset, batch_size=batch_size, device=device,
                             progress=progress)
    k = class_index(feats.class_names, target_class, "surgery_from_rule")
    if isinstance(rule, str):
        flags = confounder_flags(dataset, rule)
        rule_desc = f"confounder {rule!r}"
    elif callable(rule):
        flags = np.array([bool(rule(dataset, i)) for i in range(len(dataset))])
        rule_desc = getattr(rule, "__name__", "rule")
    else:
        raise ConfigError("surgery_from_rule: 'rule' must be a function rule(dataset, index) -> "
                          f"bool or a confounder name; got {type(rule).__name__}.")
    if isinstance(val, Features):
        valf = val
    elif val is not None:
        valf = extract_features(model, val, batch_size=batch_size, device=device,
                                progress=progress)
    else:
        valf = feats
    thresholds = kwargs.pop("thresholds", None)
    thr = np.asarray(thresholds if thresholds is not None else
                     (model.card.effective_thresholds() if model.card is not None
                      else [0.5] * len(feats.class_names)), np.float64)
    _, dec = margins(feats.logits(), k, feats.task, float(thr[k]) if feats.task == "multilabel"
                     else 0.5)
    y = _label_k(feats.labels, k, feats.task)
    mask = flags & (y == 0) & (dec >= 0)
    if not mask.any():
        raise DataError(f"surgery_from_rule: no false positive of {feats.class_names[k]!r} in "
                        f"{getattr(dataset, 'spec', 'the dataset')!r} matches {rule_desc} "
                        f"({int(flags.sum())} images match the rule); nothing to correct.")
    res = surgical_correction(model, k, feats, fp_mask=mask, val=valf,
                              thresholds=thresholds, **kwargs)
    res.settings["rule"] = rule_desc
    res.settings["rule_matches"] = int(flags.sum())
    return res


# ----------------------------------------------------------------------------- goal ladder
@dataclass
class SurgeryLadder:
    """Surgery tried from the strictest goal to relaxed ones; every attempt is recorded.

    ``status`` is ``"full"`` when the first (strictest) goal was met, ``"partial"`` when only a
    relaxed goal was (a fallback: say so wherever the result is shown), ``"failed"`` when none.
    ``result`` is the kept attempt (the first that met its goal, else the last).
    """

    attempts: list[dict[str, Any]]
    kept: int | None
    status: str
    result: SurgeryResult

    def to_dict(self) -> dict[str, Any]:
        d = self.result.to_dict()
        d["ladder"] = {"status": self.status, "kept": self.kept, "attempts": self.attempts,
                       "strictest_goal": self.attempts[0]["goal"] if self.attempts else None}
        return d


def _goal_text(goal: dict[str, Any]) -> str:
    if goal.get("below_threshold"):
        return "every target false positive below threshold"
    crit = goal.get("criterion", "mean")
    return f"{crit} probability drop >= {goal.get('delta_prob')}"


def surgery_ladder(run: Callable[..., SurgeryResult],
                   goals: Sequence[dict[str, Any]]) -> SurgeryLadder:
    """Call ``run(**goal)`` for each goal in order until one is met.

    Args:
        run: e.g. ``functools.partial(surgery_from_rule, model, dataset, rule, cls, val=...)``.
        goals: keyword sets for the goal, strictest first (e.g. ``{"below_threshold": True}``,
            ``{"delta_prob": 0.1}``, ``{"delta_prob": 0.02}``).
    """
    if not goals:
        raise ConfigError("surgery_ladder: give at least one goal.")
    attempts: list[dict[str, Any]] = []
    res = None
    for i, goal in enumerate(goals):
        res = run(**goal)
        d = res.to_dict()
        attempts.append({"goal": dict(goal), "goal_text": _goal_text(goal),
                         "success": bool(res.success), "goal_met": res.goal_met,
                         "false_positives_still_above_threshold":
                             d["false_positives_still_above_threshold"],
                         "n_weights_changed": d["n_weights_changed"],
                         "true_positives_lost": res.tp_lost, "message": res.message})
        if res.success:
            return SurgeryLadder(attempts, i, "full" if i == 0 else "partial", res)
    return SurgeryLadder(attempts, None, "failed", res)
