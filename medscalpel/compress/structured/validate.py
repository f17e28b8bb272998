"""Step 1 of :func:`~medscalpel.compress.structured.prune_structured`: check every argument
and gather the validated inputs of one call (:class:`_Job`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medscalpel.compress.importance import (Criterion, RelevanceCriterion, ScoresCriterion,
                                            make_criterion)
from medscalpel.compress.structured.channels import OWNER, _ignored_names
from medscalpel.compress.structured.result import RecoveryConfig
from medscalpel.deploy.runtimes import RUNTIMES, vector_width
from medscalpel.errors import ConfigError, ModelError
from medscalpel.validation import check_range


def _check_images(images: Any) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"The 'calib_images' parameter of {OWNER} must be a non-empty image "
                          f"tensor [N, C, H, W] (e.g. from engine.predict.collect_images). Got "
                          f"{shape} instead.")
    return images.detach().float().cpu()


def _task_of(model: nn.Module) -> str:
    card = getattr(model, "card", None)
    return card.task if card is not None else "multilabel"


@dataclass
class _Job:
    """The validated inputs of one :func:`prune_structured` call (internal)."""

    images: torch.Tensor
    crit: Criterion
    rec: RecoveryConfig
    ratio: float | None
    task: str
    ignored_names: list[str]
    round_to: int | None
    measured: dict[str, Any] | None  # target_latency_ms / target_speedup_measured + runtime


def _validate(model, calib_images, criterion, ratio, target_speedup, iterative_steps, recovery,
              train_ds, calib_targets, max_layer_ratio, round_to, dry_run, batch_size,
              ignored_layers, target_latency_ms, target_speedup_measured, runtime,
              latency_batch) -> _Job:
    """Step 1: check every argument; one error per mistake, naming the fix."""
    images = _check_images(calib_images)
    targets = [n for n, v in (("ratio", ratio), ("target_speedup", target_speedup),
                              ("target_latency_ms", target_latency_ms),
                              ("target_speedup_measured", target_speedup_measured))
               if v is not None]
    if len(targets) > 1:
        raise ConfigError(f"{OWNER}: give one of 'ratio', 'target_speedup', 'target_latency_ms'"
                          f", 'target_speedup_measured', not both; got {targets}.")
    if not targets:
        ratio = 0.5
    if ratio is not None:
        check_range(ratio, "ratio", OWNER, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    if target_speedup is not None:
        check_range(target_speedup, "target_speedup", OWNER, 1.0, low_inclusive=False)
    if target_speedup_measured is not None:
        check_range(target_speedup_measured, "target_speedup_measured", OWNER, 1.0,
                    low_inclusive=False)
    if target_latency_ms is not None:
        check_range(target_latency_ms, "target_latency_ms", OWNER, 0.0, low_inclusive=False)
    check_range(iterative_steps, "iterative_steps", OWNER, 1, integer=True)
    check_range(max_layer_ratio, "max_layer_ratio", OWNER, 0.0, 1.0, low_inclusive=False,
                high_inclusive=False)
    check_range(batch_size, "batch_size", OWNER, 1, integer=True)
    check_range(latency_batch, "latency_batch", OWNER, 1, integer=True)
    if round_to is not None:
        check_range(round_to, "round_to", OWNER, 1, integer=True)
    measured = None
    if target_latency_ms is not None or target_speedup_measured is not None:
        RUNTIMES.get(runtime)  # unknown runtime names list the valid ones
        measured = {"target_latency_ms": target_latency_ms, "runtime": runtime,
                    "target_speedup_measured": target_speedup_measured,
                    "batch": latency_batch}
        round_to = vector_width() if round_to is None else round_to
    if not isinstance(getattr(model, "classifier", None), nn.Linear):
        raise ModelError(f"{OWNER} needs a MedClassifier (a model with a Linear 'classifier'); "
                         f"got {type(model).__name__}.")
    rec = (recovery or RecoveryConfig()).validate()
    if rec.epochs and not dry_run and train_ds is None:
        raise ConfigError(f"{OWNER}: recovery.epochs={rec.epochs} needs a 'train_ds' to "
                          "fine-tune on; pass train_ds or set recovery epochs to 0.")
    if calib_targets is not None and len(calib_targets) != images.shape[0]:
        raise ConfigError(f"{OWNER}: {len(calib_targets)} calib_targets for "
                          f"{images.shape[0]} calib_images.")
    crit = make_criterion(criterion)  # raises for unknown names
    if ratio is not None and isinstance(crit, ScoresCriterion) and not isinstance(
            crit, RelevanceCriterion) and iterative_steps > 1:
        raise ConfigError(f"{OWNER}: fixed channel scores fit the unpruned model only; use "
                          "iterative_steps=1 or a criterion that re-scores (lrp, ig, taylor).")
    return _Job(images, crit, rec, ratio, _task_of(model), _ignored_names(model, ignored_layers),
                round_to, measured)
