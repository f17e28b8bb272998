"""Settings and result of structured pruning: :class:`RecoveryConfig` (the recovery fine-tune)
and :class:`PruneResult` (what was removed, sizes, latency; saved as ``prune.json`` beside the
pruned model)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from medscalpel.errors import ModelError
from medscalpel.layout import write_artifact_at
from medscalpel.models.checkpoint import save_model
from medscalpel.validation import check_range


@dataclass
class RecoveryConfig:
    """Recovery fine-tune after pruning (through :func:`medscalpel.engine.train.train`).

    Attributes:
        epochs: total fine-tune epochs, spread over the iterative steps (the last step gets the
            remainder); 0 disables recovery.
        lr: learning rate (AdamW, cosine schedule).
        distill_from_dense: add a distillation term from the unpruned model's logits.
        soft_weight: weight of the teacher (the unpruned model) in the one distillation loss
            :class:`~medscalpel.compress.distill.DistillLoss`:
            ``(1 - soft_weight) * task + soft_weight * T^2 * soft``.
        T: distillation temperature.
    """

    epochs: int = 0
    lr: float = 5e-4
    distill_from_dense: bool = False
    soft_weight: float = 0.5
    T: float = 2.0
    batch_size: int = 32
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    max_steps_per_epoch: int | None = None

    def validate(self) -> "RecoveryConfig":
        o = "RecoveryConfig"
        check_range(self.epochs, "epochs", o, 0, integer=True)
        check_range(self.lr, "lr", o, 0, low_inclusive=False)
        check_range(self.soft_weight, "soft_weight", o, 0.0, 1.0)
        check_range(self.T, "T", o, 0, low_inclusive=False)
        check_range(self.batch_size, "batch_size", o, 1, integer=True)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- result
@dataclass
class PruneResult:
    """What :func:`prune_structured` did.

    Attributes:
        model: the pruned model (``None`` for a dry run); its ``card`` carries the lineage.
        layers: per layer (qualified name) ``{"before": channels, "after": channels,
            "removed": n}`` for every Conv/Linear/BatchNorm whose width changed.
        steps: one record per iterative step (channels removed per root layer, params, MACs,
            recovery history).
        speedup_macs: MACs before / after (theoretical speedup).
        latency: CPU latency of the dense and pruned model measured alternately in this run
            (``a_ms`` dense, ``b_ms`` pruned, ``ratio`` = measured speedup), or ``None``.
        max_abs_logit_delta: max |logit(pruned) - logit(dense)| on the calibration images.
    """

    model: nn.Module | None
    criterion: dict[str, Any]
    ratio: float
    target_speedup: float | None
    global_pruning: bool
    iterative_steps: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: dict[str, dict[str, int]]
    steps: list[dict[str, Any]]
    recovery: dict[str, Any] | None
    latency: dict[str, float] | None
    max_abs_logit_delta: float
    dry_run: bool
    seconds: float
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup_macs(self) -> float:
        return self.macs_before / self.macs_after if self.macs_after else float("nan")

    @property
    def param_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "criterion": self.criterion, "ratio": self.ratio,
                "target_speedup": self.target_speedup, "global_pruning": self.global_pruning,
                "iterative_steps": self.iterative_steps, "params_before": self.params_before,
                "params_after": self.params_after, "param_reduction": self.param_reduction,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "speedup_macs": self.speedup_macs, "latency": self.latency,
                "max_abs_logit_delta": self.max_abs_logit_delta, "dry_run": self.dry_run,
                "layers": self.layers, "steps": self.steps, "recovery": self.recovery,
                "seconds": self.seconds, "lineage": self.lineage}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the pruned model (``model.safetensors`` + ``model.json`` with lineage) and
        ``prune.json`` into ``directory``."""

        if self.model is None:
            raise ModelError("This PruneResult is a dry run: there is no pruned model to save. "
                             "Run prune_structured with dry_run=False.")
        if getattr(self.model, "card", None) is None:
            raise ModelError("The pruned model has no ModelCard (the input model had none); "
                             "set model.card (make_card) before pruning to save it.")
        directory = Path(directory)
        save_model(self.model, directory)
        write_artifact_at(directory, "prune", self)
        return directory


__all__ = ["PruneResult", "RecoveryConfig"]
