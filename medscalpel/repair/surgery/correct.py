"""Surgical correction of one classifier row: validate -> plan -> apply -> verify
(:func:`surgical_correction`), and :func:`save_surgery`."""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medscalpel.engine.metrics import auroc
from medscalpel.engine.predict import Features
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError, ModelError, VerificationError
from medscalpel.layout import write_artifact_at
from medscalpel.models.checkpoint import save_model
from medscalpel.models.classifier import MedClassifier
from medscalpel.validation import check_fraction, check_in, check_range
from medscalpel.repair.surgery.helpers import (_linear_from, class_index, class_probs,
                                               contributions, label_k, margins, sigmoid)
from medscalpel.repair.surgery.ladder import SurgeryLadder
from medscalpel.repair.surgery.plan import SurgeryPlan, _Problem, _search
from medscalpel.repair.surgery.result import SurgeryResult

logger = logging.getLogger(__name__)


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
        y = label_k(targets.labels, k, targets.task)
        rows = np.flatnonzero((y == 0) & decided)
    if rows.size == 0:
        raise DataError("surgical_correction: no target images selected (no false positives of "
                        f"class {targets.class_names[k]!r}); nothing to correct.")
    y = label_k(targets.labels, k, targets.task)[rows]
    bad = rows[y == 1]
    if bad.size:
        raise DataError(f"surgical_correction: {bad.size} selected images are labelled positive "
                        f"for {targets.class_names[k]!r} (e.g. {targets.ids[bad[0]]!r}), so they "
                        "are not false positives; select negatives only.")
    return rows


def _auroc_all(logits: np.ndarray, labels: np.ndarray, task: str, names: Sequence[str]
               ) -> dict[str, float]:
    probs = class_probs(logits, task)
    out = {}
    for j, n in enumerate(names):
        y = label_k(labels, j, task)
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
    yv = label_k(val.labels, k, task)
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
    p_before = sigmoid(pl.mt).tolist()
    return SurgeryResult(False, msg, None, False, pl.target_ids, p_before, p_before,
                         int(pl.tp_rows.size), 0, [], pl.auroc_before, pl.auroc_before, None,
                         None, pl.ranking, pl.info, pl.settings, round(seconds, 4), False,
                         int(np.sum(pl.dt >= 0)))


def _dry_run_result(inp: _Inputs, pl: _Planned, seconds: float) -> SurgeryResult:
    """The plan with its effects predicted in float64 from the cached features."""
    drop_t, drop_v = pl.problem.drops(pl.plan.channels)
    after = sigmoid(pl.mt - drop_t + pl.shift).tolist()
    lost = np.flatnonzero(pl.dv_tp - drop_v + pl.shift < 0)
    return SurgeryResult(True, "dry run: plan computed, nothing applied (effects predicted "
                         "in float64 from the cached features)", pl.plan, False, pl.target_ids,
                         sigmoid(pl.mt).tolist(), after, int(pl.tp_rows.size), int(lost.size),
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
    write_artifact_at(out, "surgery", ladder or result)
    return out
