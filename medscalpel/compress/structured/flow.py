"""Structured pruning as its steps: validate -> plan (the ratio) -> apply (prune, recover) ->
verify, and :func:`prune_structured`, which runs them and records the lineage."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medscalpel.compress.distill import teacher_loss
from medscalpel.compress.importance import Criterion
from medscalpel.compress.measure import (count_macs, count_parameters, latency_pair,
                                         max_abs_logit_delta)
from medscalpel.compress.structured.channels import (_ignored, _layer_diff, _make_pruner,
                                                     _prune_step, _widths)
from medscalpel.compress.structured.ratio import _plan
from medscalpel.compress.structured.result import PruneResult, RecoveryConfig
from medscalpel.compress.structured.validate import _Job, _validate
from medscalpel.deploy.runtimes import runtime_latency
from medscalpel.engine.train import TrainConfig, train
from medscalpel.progress import track


def _apply(work: nn.Module, dense: nn.Module, job: _Job, ratio: float, calib_targets,
           global_pruning, iterative_steps, max_layer_ratio, train_ds, val_ds, dry_run,
           batch_size, progress) -> list[dict[str, Any]]:
    """Steps 3-4: prune in ``iterative_steps`` steps, re-scoring, with a recovery fine-tune
    after each step when asked."""
    crit, rec, example = job.crit, job.rec, job.images[:1]
    names = {m: n for n, m in work.named_modules()}
    ignored = _ignored(work, job.ignored_names)
    pruner = None
    steps: list[dict[str, Any]] = []
    teacher = copy.deepcopy(dense).eval() if (rec.distill_from_dense and rec.epochs) else None
    for step in track(range(iterative_steps), f"prune {crit.name or 'scores'}", progress=progress):
        crit.prepare(work, job.images, calib_targets, task=job.task, batch_size=batch_size,
                     progress=progress)
        try:
            if pruner is None:
                pruner = _make_pruner(work, example, crit.importance(), ratio, global_pruning,
                                      iterative_steps, max_layer_ratio, ignored, job.round_to)
            else:
                pruner.importance = crit.importance()
            work.eval()
            removed = _prune_step(pruner, names)
        finally:
            crit.finish(work)
        record: dict[str, Any] = {"step": step + 1, "removed": removed,
                                  "channels_removed": int(sum(removed.values())),
                                  "params": count_parameters(work),
                                  "macs": count_macs(work, example)}
        share = rec.epochs // iterative_steps + (rec.epochs % iterative_steps
                                                 if step == iterative_steps - 1 else 0)
        if share and not dry_run:
            record["recovery"] = _recover(work, train_ds, val_ds, rec, share, teacher, job.task,
                                          step, progress)
        steps.append(record)
    return steps


def _verify(dense: nn.Module, work: nn.Module, job: _Job, measure_latency: bool,
            dry_run: bool) -> tuple[float, dict[str, float] | None]:
    """Step 5: max |delta logit| on the calibration images and the measured speedup (torch
    eager, and the search runtime in measured mode), alternated in this run."""
    delta = max_abs_logit_delta(dense, work, job.images)
    latency = None
    if measure_latency and not dry_run:
        latency = latency_pair(dense, work, job.images[:1], batch_size=1, warmup=3, repeats=10,
                               rounds=3)
        if job.measured is not None:
            rt, b, ex = job.measured["runtime"], job.measured["batch"], job.images[:1]
            t = torch.get_num_threads()
            pairs = [(runtime_latency(dense, rt, ex, b, t), runtime_latency(work, rt, ex, b, t))
                     for _ in range(3)]
            d_ms = float(np.median([p[0] for p in pairs]))
            p_ms = float(np.median([p[1] for p in pairs]))
            latency.update({"runtime": rt, "runtime_batch": b, "runtime_dense_ms": d_ms,
                            "runtime_pruned_ms": p_ms, "runtime_ratio": d_ms / p_ms})
    return delta, latency


def prune_structured(
        model: nn.Module, calib_images: torch.Tensor,
        criterion: str | Criterion | Mapping[str, torch.Tensor] = "l1",
        ratio: float | None = None, target_speedup: float | None = None,
        global_pruning: bool = False, iterative_steps: int = 1,
        recovery: RecoveryConfig | None = None, train_ds=None, val_ds=None,
        ignored_layers: Sequence[str | nn.Module] | None = None,
        calib_targets: torch.Tensor | None = None, max_layer_ratio: float = 0.9,
        round_to: int | None = None, dry_run: bool = False, measure_latency: bool = True,
        batch_size: int = 16, inplace: bool = False, progress: bool | None = None,
        target_latency_ms: float | None = None, target_speedup_measured: float | None = None,
        runtime: str = "onnxruntime:fp32", latency_batch: int = 1) -> PruneResult:
    """Prune output channels on the Torch-Pruning dependency graph and return a smaller model.

    Reads as its steps: validate -> plan (the ratio) -> apply (prune, recover) -> verify.

    Args:
        model: a :class:`~medscalpel.models.classifier.MedClassifier` (DenseNet, ResNet, VGG).
        calib_images: calibration images ``[N, C, H, W]`` (scores for data-driven criteria,
            tracing, MACs, latency and the logit check).
        criterion: a name of :data:`~medscalpel.compress.importance.IMPORTANCE`, a
            :class:`~medscalpel.compress.importance.Criterion`, or a mapping layer name ->
            per-channel scores (e.g. ``channel_relevance(...).scores``).
        ratio: fraction of the channels of each coupled group to remove (local), or of all
            channels (global). Default 0.5 when no target is given.
        target_speedup: instead of ``ratio``: the ratio is searched (bisection on one-shot
            copies) so that MACs drop by this factor.
        global_pruning: rank channels across all groups instead of within each group.
        iterative_steps: prune in this many equal steps, re-scoring (and recovering) in between.
        recovery: fine-tune after each step (needs ``train_ds``); see :class:`RecoveryConfig`.
        train_ds, val_ds: datasets for the recovery fine-tune (val for early stopping).
        ignored_layers: layers (names or modules) never pruned; the classifier always is.
        calib_targets: labels of ``calib_images``: the Taylor criterion's loss targets
            (default: the model's own hard predictions) and, for the attribution criteria
            (lrp, ig, backtrace), the classes scored per image (its positive classes; default:
            every class of every image, K times the work).
        max_layer_ratio: no layer loses more than this fraction of its channels.
        round_to: keep channel counts multiples of this and at least this (hardware-friendly
            widths; also on DenseNet concatenation groups). Default in the measured modes: the
            CPU's fp32 vector width (8 with AVX2, 16 with AVX-512).
        dry_run: only plan: prune a copy without recovery and report the per-layer channel
            counts that would be removed; ``result.model`` is ``None``.
        measure_latency: measure dense vs pruned CPU latency (batch 1) in this run.
        batch_size: batch size for scoring.
        inplace: prune ``model`` itself instead of a copy.
        target_latency_ms: instead of ``ratio``: search the ratio whose MEASURED latency in
            ``runtime`` at ``latency_batch`` is at most this.
        target_speedup_measured: instead of ``ratio``: search the ratio whose measured latency
            in ``runtime`` is this many times lower than the dense model's (timed alternately).
        runtime: a :data:`~medscalpel.deploy.runtimes.RUNTIMES` variant for the measured
            modes (default ``onnxruntime:fp32``).

    Returns:
        A :class:`PruneResult`; ``result.model.card`` (when the input had a card) records the
        lineage (parent id, criterion, ratio, params / MACs before-after, measured speedup).
    """
    t0 = time.perf_counter()
    job = _validate(model, calib_images, criterion, ratio, target_speedup, iterative_steps,
                    recovery, train_ds, calib_targets, max_layer_ratio, round_to, dry_run,
                    batch_size, ignored_layers, target_latency_ms, target_speedup_measured,
                    runtime, latency_batch)
    dense, was_training = model, model.training
    work = copy.deepcopy(model) if (dry_run or not inplace) else model
    work.eval()
    widths_before, example = _widths(work), job.images[:1]
    params_before, macs_before = count_parameters(work), count_macs(work, example)
    ratio, search_trace = _plan(work, job, calib_targets, target_speedup, global_pruning,
                                max_layer_ratio, batch_size, macs_before, progress)
    steps = _apply(work, dense, job, ratio, calib_targets, global_pruning, iterative_steps,
                   max_layer_ratio, train_ds, val_ds, dry_run, batch_size, progress)
    sizes = {"params_before": params_before, "params_after": count_parameters(work),
             "macs_before": macs_before, "macs_after": count_macs(work, example)}
    delta, latency = _verify(dense, work, job, measure_latency, dry_run)
    lineage = _lineage(job, ratio, target_speedup, global_pruning, iterative_steps,
                       max_layer_ratio, sizes, delta, latency, search_trace)
    _attach_card(dense, work, lineage, dry_run)
    dense.train(was_training)
    return _result(work, job, lineage, steps, latency, delta, dry_run,
                   layers=_layer_diff(widths_before, _widths(work)),
                   seconds=round(time.perf_counter() - t0, 3))


def _lineage(job: _Job, ratio: float, target_speedup: float | None, global_pruning: bool,
             iterative_steps: int, max_layer_ratio: float, sizes: dict[str, int], delta: float,
             latency: dict[str, Any] | None, search_trace: list[dict[str, float]]
             ) -> dict[str, Any]:
    """The lineage step of the pruned model's card: the settings, the sizes before / after,
    the measured speedup and the logit check (and the ratio search, when there was one)."""
    rec, crit = job.rec, job.crit
    lineage = {
        "criterion": crit.name or "scores", "ratio": float(ratio),
        "target_speedup": target_speedup, "global_pruning": bool(global_pruning),
        "iterative_steps": int(iterative_steps), "max_layer_ratio": max_layer_ratio,
        "round_to": job.round_to, "recovery": rec.to_dict() if rec.epochs else None,
        "calibration_images": int(job.images.shape[0]), **sizes,
        "speedup_macs": (sizes["macs_before"] / sizes["macs_after"] if sizes["macs_after"]
                         else float("nan")),
        "latency_speedup_cpu_b1": latency["ratio"] if latency else None,
        "max_abs_logit_delta_calib": delta,
    }
    if job.measured is not None:
        lineage["measured_target"] = job.measured
        lineage["latency_speedup_runtime"] = latency.get("runtime_ratio") if latency else None
    if search_trace:
        lineage["ratio_search"] = search_trace
    return lineage


def _result(work: nn.Module, job: _Job, lineage: dict[str, Any], steps: list[dict[str, Any]],
            latency: dict[str, float] | None, delta: float, dry_run: bool,
            layers: dict[str, dict[str, int]], seconds: float) -> PruneResult:
    """The :class:`PruneResult` of a finished call (its settings as the lineage records them)."""
    return PruneResult(
        model=None if dry_run else work, criterion=job.crit.to_dict(), ratio=lineage["ratio"],
        target_speedup=lineage["target_speedup"], global_pruning=lineage["global_pruning"],
        iterative_steps=lineage["iterative_steps"], params_before=lineage["params_before"],
        params_after=lineage["params_after"], macs_before=lineage["macs_before"],
        macs_after=lineage["macs_after"], layers=layers, steps=steps,
        recovery=job.rec.to_dict() if job.rec.epochs else None, latency=latency,
        max_abs_logit_delta=delta, dry_run=bool(dry_run), seconds=seconds, lineage=lineage)


def _attach_card(dense: nn.Module, work: nn.Module, lineage: dict[str, Any],
                 dry_run: bool) -> None:
    """Give the pruned model its parent's card with the pruning step (when the parent has one)."""
    parent_card = getattr(dense, "card", None)
    if parent_card is not None and not dry_run:
        work.card = parent_card.with_lineage("prune_structured", parent=parent_card.model_id,
                                             **lineage)


def _recover(model: nn.Module, train_ds, val_ds, rec: RecoveryConfig, epochs: int,
             teacher: nn.Module | None, task: str, step: int,
             progress: bool | None) -> dict[str, Any]:

    cfg = TrainConfig(epochs=epochs, batch_size=rec.batch_size, lr=rec.lr,
                      weight_decay=rec.weight_decay, seed=rec.seed + step, device=rec.device,
                      max_steps_per_epoch=rec.max_steps_per_epoch, patience=max(3, epochs),
                      warmup_epochs=min(0.5, epochs / 4))
    loss_fn = (teacher_loss(teacher, task, rec.soft_weight, rec.T) if teacher is not None
               else None)
    res = train(model, train_ds, val_ds, config=cfg, loss_fn=loss_fn, progress=progress,
                inplace=True)
    model.eval()
    return {"epochs": epochs, "best_epoch": res.best_epoch, "best_metric": res.best_metric,
            "seconds": res.seconds, "history": res.history,
            "distilled": teacher is not None}


__all__ = ["prune_structured"]
