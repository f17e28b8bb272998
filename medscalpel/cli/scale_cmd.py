"""``medscalpel scale prune|distill|triage|train``: experiment grids on a local process pool or a
Ray cluster, and data-parallel training. Each command parses its options and runs one registered
stage of :mod:`medscalpel.pipeline.stages.scale` ('grid_prune', 'grid_distill', 'grid_triage',
'ddp_train'); a grid stage runs in the grid directory itself
(:func:`~medscalpel.cli.common.run_stage_in_place`).

Every grid command is resumable: rerun the same command after a kill and only the unfinished
cells run; a changed dataset or model is refused. ``--executor`` / ``--ray-address`` /
``--max-workers`` (the options :data:`EXECUTOR_OPTION`, :data:`RAY_ADDRESS_OPTION`,
:data:`MAX_WORKERS_OPTION`) can be added to other sweep commands the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli import deprecations
from medscalpel.cli.common import (N_BOOT, N_BOOT_HELP, console, fmt, one_of, run_stage,
                                   run_stage_in_place)
from medscalpel.errors import ConfigError

EXECUTOR_OPTION = typer.Option("local", "--executor",
                               help="local (process pool, default) | serial | ray.")
RAY_ADDRESS_OPTION = typer.Option(None, "--ray-address",
                                  help="Ray cluster to join with --executor ray ('auto', "
                                       "'ray://head:10001'); default: a local Ray.")
MAX_WORKERS_OPTION = typer.Option(None, "--max-workers",
                                  help="Cells run in parallel (default: the CPU count).")


def _floats(text: str, name: str) -> list[float]:
    from medscalpel.cli.compress_cmd import parse_ratios

    try:
        return parse_ratios(text)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--ratios", f"--{name}")) from exc


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"--{name} must be a comma list of integers; got {text!r}.") from exc
    if not vals:
        raise ConfigError(f"--{name} must list at least one integer; got {text!r}.")
    return vals


def _names(text: str, name: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise ConfigError(f"--{name} must list at least one name; got {text!r}.")
    return vals


def _summary(res, out: Path) -> None:
    console.print(f"{len(res.cells)} cells ({res.n_computed} computed, {res.n_skipped} already "
                  f"done) in {out} [{res.executor.get('executor')}]",
                  markup=False)  # '[serial]' is the executor, not a rich style tag




def prune(
    models_arg: Optional[list[Path]] = typer.Argument(None, hidden=True, metavar="MODELS"),
    models: Optional[list[Path]] = typer.Option(None, "--model", help="Model directory "
                                                "(model.safetensors + model.json); repeat for "
                                                "several."),
    data: str = typer.Option(..., help="Dataset spec of the evaluation data."),
    split: str = typer.Option("test", help="Split evaluated at every sparsity."),
    out: Path = typer.Option(Path("runs/scale-prune"), help="Grid directory (resumable)."),
    ratios: str = typer.Option("0:0.95:0.05", help="Sparsities: 'start:stop:step' or a list."),
    methods: str = typer.Option("l1,random", help="l1 and/or random."),
    seeds: str = typer.Option("0", help="Seeds of the random masks, comma list."),
    batch_size: int = typer.Option(64, help="Prediction batch size."),
    executor: str = EXECUTOR_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    max_workers: Optional[int] = MAX_WORKERS_OPTION,
) -> None:
    """Pruning sweep (models x methods x seeds x ratios) on a process pool or Ray; the grid
    directory has the index of a sweep directory: 'audit forgettability|pies' read it."""
    from medscalpel.pipeline.stages.scale import GridPruneSettings

    models = one_of(models or None, models_arg or None, "--model", "MODELS",
                    "the model directories", command="scale prune")
    settings = GridPruneSettings(models=tuple(str(m) for m in models), data=data, split=split,
                                 ratios=tuple(_floats(ratios, "ratios")),
                                 methods=tuple(_names(methods, "methods")),
                                 seeds=tuple(_ints(seeds, "seeds")), batch_size=batch_size,
                                 executor=executor, max_workers=max_workers,
                                 ray_address=ray_address)
    res = run_stage_in_place("grid_prune", out, settings)
    _summary(res, out)
    for c in res.cells:
        cell = c.cell
        console.print(f"{cell['method']:>6} seed {cell['seed']!s:>4} r={cell['ratio']:.2f}: "
                      f"sparsity {c.result['sparsity']:.3f} AUROC {fmt(c.result['macro_auroc'])}")


def distill(
    teacher_arg: Optional[Path] = typer.Argument(None, hidden=True, metavar="TEACHER"),
    teacher: Optional[Path] = typer.Option(None, "--model", "--teacher", help="Teacher model "
                                           "directory."),
    data: str = typer.Option(..., help="Dataset spec (train / val / --split)."),
    students: str = typer.Option("mobilenetv3_small_100", help="Student architectures, comma "
                                 "list (see 'models list')."),
    out: Path = typer.Option(Path("runs/scale-distill"), help="Grid directory (resumable)."),
    temperatures: str = typer.Option("4", help="Temperatures, comma list."),
    soft_weights: str = typer.Option("0.5", help="Weights of the teacher's soft targets in "
                                     "[0, 1] (1 - it weighs the ground truth), comma list."),
    seeds: str = typer.Option("0", help="Seeds, comma list."),
    epochs: int = typer.Option(5), batch_size: int = typer.Option(64),
    lr: float = typer.Option(1e-3),
    split: str = typer.Option("test", help="Split the students are evaluated on."),
    executor: str = EXECUTOR_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    max_workers: Optional[int] = MAX_WORKERS_OPTION,
) -> None:
    """Distillation grid (students x temperatures x soft weights x seeds) on a pool or Ray."""
    from medscalpel.pipeline.stages.scale import GridDistillSettings

    teacher = one_of(teacher, teacher_arg, "--model", "TEACHER", "the teacher model",
                     command="scale distill")
    settings = GridDistillSettings(teacher=str(teacher), data=data,
                                   students=tuple(_names(students, "students")),
                                   temperatures=tuple(_floats(temperatures, "temperatures")),
                                   soft_weights=tuple(_floats(soft_weights, "soft-weights")),
                                   seeds=tuple(_ints(seeds, "seeds")), epochs=epochs,
                                   batch_size=batch_size, lr=lr, split=split,
                                   executor=executor, max_workers=max_workers,
                                   ray_address=ray_address)
    res = run_stage_in_place("grid_distill", out, settings)
    _summary(res, out)
    for c in res.cells:
        r = c.result
        console.print(f"{c.cell['student']} T={c.cell['temperature']} soft_weight={c.cell['soft_weight']} "
                      f"seed {c.cell['seed']}: AUROC {fmt(r['student']['macro_auroc'])} "
                      f"(teacher {fmt(r['teacher']['macro_auroc'])}), "
                      f"{r['student_params']:,} params")


def triage(
    fit: Path = typer.Argument(..., help="Features / Predictions file the router is fitted on."),
    held_out: Path = typer.Argument(..., help="Held-out Features / Predictions file."),
    out: Path = typer.Option(Path("runs/scale-triage"), help="Grid directory (resumable)."),
    budgets: str = typer.Option("5", help="Cost budgets, comma list."),
    max_auroc_drops: str = typer.Option("0.01", help="AUROC guards, comma list."),
    max_recall_drops: str = typer.Option("0.05", help="Recall guards, comma list."),
    executor: str = EXECUTOR_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    max_workers: Optional[int] = MAX_WORKERS_OPTION,
) -> None:
    """Treatment-router grid (budgets x guards) on a pool or Ray."""
    from medscalpel.pipeline.stages.scale import GridTriageSettings

    settings = GridTriageSettings(
        fit=str(fit), held_out=str(held_out), budgets=tuple(_floats(budgets, "budgets")),
        max_auroc_drops=tuple(_floats(max_auroc_drops, "max-auroc-drops")),
        max_recall_drops=tuple(_floats(max_recall_drops, "max-recall-drops")),
        executor=executor, max_workers=max_workers, ray_address=ray_address)
    res = run_stage_in_place("grid_triage", out, settings)
    _summary(res, out)


def train(
    data: str = typer.Option(..., help="Dataset spec (train / val / test splits)."),
    arch: str = typer.Option("densenet121", help="Zoo architecture."),
    out: Path = typer.Option(..., help="Run directory (model/, checkpoint/, train.json)."),
    world_size: int = typer.Option(2, help="Processes (GPUs, or CPU processes over gloo)."),
    backend: str = typer.Option("auto", help="auto | gloo | nccl"),
    batch_norm: str = typer.Option("auto", help="auto | sync (GPU) | local | frozen"),
    size: int = typer.Option(64), channels: int = typer.Option(1),
    epochs: int = typer.Option(5),
    batch_size: int = typer.Option(64, help="GLOBAL batch (split over the processes)."),
    lr: float = typer.Option(1e-3), weight_decay: float = typer.Option(1e-4),
    patience: int = typer.Option(3), seed: int = typer.Option(0),
    augment: bool = typer.Option(False, help="Light augmentation (per-process draws)."),
    n_boot: int = typer.Option(N_BOOT, help=N_BOOT_HELP),
    resume: bool = typer.Option(False, hidden=True,
                                help="Deprecated: an interrupted run resumes by itself."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
) -> None:
    """Data-parallel training (DistributedDataParallel): same optimisation as 'train' at the
    same global batch; resumable per epoch."""
    deprecations.renamed(None, resume or None, "--resume", "scale train")
    from medscalpel.layout import artifact
    from medscalpel.models.zoo import ARCHS
    from medscalpel.pipeline.stages.scale import DDPTrainSettings

    settings = DDPTrainSettings(data=data, arch=arch, size=size, channels=channels,
                                augment=augment, epochs=epochs, batch_size=batch_size, lr=lr,
                                weight_decay=weight_decay, patience=patience, n_boot=n_boot,
                                world_size=world_size, backend=backend, batch_norm=batch_norm)
    cfg = settings.train_config(seed).validate()  # bad values fail before any write
    ddp = settings.ddp().validate()
    ARCHS.get(arch)
    config = {"data": data, "arch": arch, "size": size, "channels": channels,
              "augment": augment, "ddp": ddp.to_dict(), **cfg.to_dict()}
    res = run_stage("ddp_train", out, settings, "scale train", config, seed=seed,
                    overwrite=overwrite, resumable=True, spec=data, manifest_data=("spec",))
    if res.test is not None:
        console.print(f"macro AUROC {fmt(res.test.macro['auroc'])}")
    console.print(f"model saved to {artifact('model').dir_in(out)}")


def register(app: typer.Typer) -> None:
    """How the lead wires the group: ``register(app)`` adds ``medscalpel scale ...``."""
    scale_app = typer.Typer(no_args_is_help=True, help="Scale out: grids on a process pool or "
                            "Ray, data-parallel training; all resumable.")
    scale_app.command("prune")(prune)
    scale_app.command("distill")(distill)
    scale_app.command("triage")(triage)
    scale_app.command("train")(train)
    app.add_typer(scale_app, name="scale")
