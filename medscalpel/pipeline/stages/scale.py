"""Scale-out stages: resumable experiment grids on a process pool or Ray (``scale prune`` /
``scale distill`` / ``scale triage``) and data-parallel training (``scale train``).

A grid stage's run directory IS its grid (index.json, manifest.json, cells/ at the top of
``--out``): the cell engine (:func:`medscalpel.cells.run_cells`) builds it in place, keeps every
finished cell, refuses another dataset or model and lets a rerun extend the grid. So a grid
stage runs on a :class:`~medscalpel.pipeline.stage.StageContext` at ``--out`` itself, not
inside a second, ``.partial`` run directory (which would be renamed at the end only onto
nothing: a rerun could then neither resume nor extend the grid). ``ddp_train`` is an ordinary
stage in a resumable run directory: an interrupted run keeps its ``.partial`` folder and its
per-epoch checkpoints, and the same command resumes it.

Example:
    >>> import medscalpel.pipeline.stages  # registers the stages
    >>> from medscalpel.pipeline.stage import STAGES
    >>> STAGES.get("grid_triage").writes
    ('sweep_grid',)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from medscalpel.cells import CellIndex
from medscalpel.engine.distributed import DDPSettings, fit_ddp
from medscalpel.engine.train import TrainConfig
from medscalpel.layout import write_artifact
from medscalpel.pipeline.grid import run_distill_grid, run_prune_grid, run_triage_grid
from medscalpel.pipeline.stage import Stage, StageContext, register_stage

#: sparsities of a pruning grid when none are given: 0, 0.05, ..., 0.95
DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(20))


def _grid_summary(ctx: StageContext, name: str, res: CellIndex) -> dict[str, Any]:
    """Keep the grid's index for the command to print; the stage's small summary."""
    ctx.results[name] = res
    return {"cells": len(res.cells), "computed": res.n_computed, "skipped": res.n_skipped,
            "executor": res.executor.get("executor")}


@dataclass(frozen=True)
class GridPruneSettings:
    models: tuple[str, ...]  # model directories (model.safetensors + model.json)
    data: str  # dataset spec of the evaluation data
    split: str = "test"
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    methods: tuple[str, ...] = ("l1", "random")
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 64
    executor: str = "local"  # local | serial | ray
    max_workers: int | None = None
    ray_address: str | None = None


@register_stage
class GridPruneStage(Stage):
    """Pruning grid (models x methods x seeds x ratios: global L1 / random unstructured
    sparsity, no fine-tune) on a process pool or Ray; the cells are those of ``compress
    sweep``, so 'audit forgettability|pies' read the grid directory (``scale prune``)."""

    name = "grid_prune"
    writes = ("sweep_grid",)
    Settings = GridPruneSettings

    def run(self, ctx: StageContext, s: GridPruneSettings) -> dict[str, Any]:
        res = run_prune_grid(list(s.models), s.data, ctx.dir_of("sweep_grid"), split=s.split,
                             ratios=list(s.ratios), methods=list(s.methods),
                             seeds=list(s.seeds), batch_size=s.batch_size,
                             executor=s.executor, max_workers=s.max_workers,
                             ray_address=s.ray_address, progress=ctx.progress)
        return _grid_summary(ctx, self.name, res)


@dataclass(frozen=True)
class GridDistillSettings:
    teacher: str  # teacher model directory
    data: str  # dataset spec: train / val for training, ``split`` for the evaluation
    students: tuple[str, ...]  # zoo architectures
    temperatures: tuple[float, ...] = (4.0,)
    soft_weights: tuple[float, ...] = (0.5,)
    seeds: tuple[int, ...] = (0,)
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    split: str = "test"
    executor: str = "local"
    max_workers: int | None = None
    ray_address: str | None = None


@register_stage
class GridDistillStage(Stage):
    """Distillation grid (students x temperatures x soft weights x seeds): each cell trains a
    student from the teacher and evaluates both (``scale distill``)."""

    name = "grid_distill"
    writes = ("sweep_grid",)
    Settings = GridDistillSettings

    def run(self, ctx: StageContext, s: GridDistillSettings) -> dict[str, Any]:
        res = run_distill_grid(s.teacher, s.data, list(s.students), ctx.dir_of("sweep_grid"),
                               temperatures=list(s.temperatures),
                               soft_weights=list(s.soft_weights), seeds=list(s.seeds),
                               epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
                               split=s.split, executor=s.executor,
                               max_workers=s.max_workers, ray_address=s.ray_address,
                               progress=ctx.progress)
        return _grid_summary(ctx, self.name, res)


@dataclass(frozen=True)
class GridTriageSettings:
    fit: str  # Features / Predictions file the router is fitted on
    held_out: str  # held-out Features / Predictions file
    budgets: tuple[float, ...] = (5.0,)
    max_auroc_drops: tuple[float, ...] = (0.01,)
    max_recall_drops: tuple[float, ...] = (0.05,)
    executor: str = "local"
    max_workers: int | None = None
    ray_address: str | None = None


@register_stage
class GridTriageStage(Stage):
    """Treatment-router grid (budgets x AUROC guards x recall guards) on saved Features or
    Predictions (``scale triage``)."""

    name = "grid_triage"
    writes = ("sweep_grid",)
    Settings = GridTriageSettings

    def run(self, ctx: StageContext, s: GridTriageSettings) -> dict[str, Any]:
        res = run_triage_grid(s.fit, s.held_out, ctx.dir_of("sweep_grid"),
                              budgets=list(s.budgets), max_auroc_drops=list(s.max_auroc_drops),
                              max_recall_drops=list(s.max_recall_drops), executor=s.executor,
                              max_workers=s.max_workers, ray_address=s.ray_address,
                              progress=ctx.progress)
        return _grid_summary(ctx, self.name, res)


@dataclass(frozen=True)
class DDPTrainSettings:
    data: str | None = None  # dataset spec; default: the run's (the command's --data)
    arch: str = "densenet121"
    size: int = 64
    channels: int = 1
    augment: bool = False
    epochs: int = 5
    batch_size: int = 64  # the GLOBAL batch, split over the processes
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3
    n_boot: int = 1000
    world_size: int = 2
    backend: str = "auto"  # auto | gloo | nccl
    batch_norm: str = "auto"  # auto | sync | local | frozen

    def train_config(self, seed: int) -> TrainConfig:
        """The optimisation (the same as 'train' at the same global batch); gloo trains on
        the CPU."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, patience=self.patience, seed=seed,
                           device="cpu" if self.backend == "gloo" else "auto")

    def ddp(self) -> DDPSettings:
        return DDPSettings(world_size=self.world_size, backend=self.backend,
                           batch_norm=self.batch_norm)


@register_stage
class DDPTrainStage(Stage):
    """Data-parallel training (DistributedDataParallel over ``world_size`` processes) of a zoo
    model, per-epoch checkpoints, test metrics; the model with its card (``scale train``)."""

    name = "ddp_train"
    writes = ("fit", "model")
    may_write = ("metrics",)
    Settings = DDPTrainSettings

    def run(self, ctx: StageContext, s: DDPTrainSettings) -> dict[str, Any]:
        spec = s.data or ctx.data_spec()
        # fit_ddp writes model/ (the declared 'model') and checkpoint/ (the per-epoch state a
        # resumed run continues from) into the run directory
        res = fit_ddp(spec, s.arch, ctx.out, s.train_config(ctx.seed),
                      world_size=s.world_size, size=s.size, channels=s.channels,
                      augment=s.augment, n_boot=s.n_boot, settings=s.ddp(),
                      progress=ctx.progress)
        res = replace(res, model_dir=ctx.final_dir_of("model"))  # not the .partial folder
        write_artifact(ctx.out, "fit", res)
        if res.test is not None:
            write_artifact(ctx.out, "metrics", res.test)
        ctx.results[self.name] = res
        return {"spec": spec, "epochs": len(res.train.history),
                "best_epoch": res.train.best_epoch,
                "macro_auroc": res.test.macro.get("auroc") if res.test is not None else None}


__all__ = ["DDPTrainSettings", "DDPTrainStage", "GridDistillSettings", "GridDistillStage",
           "GridPruneSettings", "GridPruneStage", "GridTriageSettings", "GridTriageStage"]
