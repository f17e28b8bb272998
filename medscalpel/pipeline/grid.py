"""Resumable experiment grids on any executor: pruning sweeps (models x methods x seeds x
ratios), distillation grids (students x temperatures x soft weights x seeds) and triage grids.

A grid is a list of JSON-able cells (``dict``) and one top-level cell function. :func:`run_grid`
runs the cells on the chosen executor (:mod:`medscalpel.pipeline.executors`: ``local`` process
pool, ``serial``, ``ray``) through the one resumable cell engine, :func:`medscalpel.cells.
run_cells`, which writes, in the calling process, as each cell finishes::

    out_dir/
      manifest.json             RunDir manifest; identity = cell function + data/model hashes
      index.json                the index (CellIndex.to_dict())
      cells/<cell_id>/...       the cell's artifacts (e.g. predictions.npz), written first
      cells/<cell_id>.json      {"cell", "result", "artifacts", "identity_hash", "seconds"}:
                                written last, atomically; its presence marks the cell finished

A kill (``kill -9``) loses at most the cells that were running: rerunning the same command
skips every finished cell whose stored ``cell`` equals the requested one. Rerunning with another
dataset or model (a different identity) raises :class:`~medscalpel.errors.RunError` instead of
mixing results. Workers return results; only the calling process writes, so a Ray cluster needs
no shared file system.

A pruning grid's cells are those of ``compress sweep`` (same result, same artifacts), so the
audit stage reads a pruning grid directory exactly as a sweep directory: through its index.

Example:
    >>> cells = prune_grid(["runs/a/model"], "phantom?n=200&size=32", ratios=[0, 0.5])  # doctest: +SKIP
    >>> res = run_grid(cells, run_cell, "runs/grid", executor="ray", identity=grid_identity(cells))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscalpel.cells import CellIndex, canonical, cell_id, check_cells, identity_hash, run_cells
from medscalpel.compress.distill import teacher_loss
from medscalpel.compress.sweep import prune_cell_result
from medscalpel.data import open_dataset
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import Features, predict
from medscalpel.engine.predictions import Predictions
from medscalpel.engine.train import TrainConfig, train
from medscalpel.errors import ConfigError, DataError
from medscalpel.models.checkpoint import WEIGHTS, load_model, make_card
from medscalpel.models.zoo import ARCHS, create_model
from medscalpel.pipeline.executors import get_executor, imap_cells
from medscalpel.registry import Registry
from medscalpel.repair.triage import triage
from medscalpel.runs import hash_file
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

#: cell kind -> cell function ``fn(cell) -> result dict`` (dispatched by :func:`run_cell`)
CELL_FNS: Registry[Callable[[dict[str, Any]], dict[str, Any]]] = Registry("grid cell kind")


# ----------------------------------------------------------------------------- running
def run_grid(
    cells: Sequence[dict[str, Any]],
    cell_fn: Callable[[dict[str, Any]], Any],
    out_dir: str | os.PathLike,
    executor: str = "local",
    identity: dict[str, Any] | None = None,
    max_workers: int | None = None,
    ray_address: str | None = None,
    progress: bool | None = None,
    command: str = "grid",
    config: dict[str, Any] | None = None,
    **executor_kw: Any,
) -> CellIndex:
    """Run every unfinished cell of a grid on an executor: the one cell engine
    (:func:`medscalpel.cells.run_cells`) with :func:`~medscalpel.pipeline.executors.imap_cells`.

    Args:
        cells: JSON-able dicts, one per cell (ids from :func:`~medscalpel.cells.cell_id`).
        cell_fn: picklable top-level ``fn(cell) -> dict`` (e.g. :func:`run_cell`); a result key
            ``artifacts`` maps file names to numpy arrays, dicts or objects with ``save(path)``
            (``Predictions``), written under ``cells/<cell_id>/``.
        out_dir: the grid directory (created, or resumed when it exists).
        executor: ``local`` (default), ``serial`` or ``ray``.
        identity: what the results depend on besides the cells (data and model hashes, e.g.
            :func:`grid_identity`); a rerun with another identity raises ``RunError``.
        max_workers, ray_address, **executor_kw: see :func:`~medscalpel.pipeline.executors.map_cells`.

    Returns:
        The :class:`~medscalpel.cells.CellIndex` (also written as ``out_dir/index.json``).
    """
    ex = get_executor(executor, max_workers=max_workers,
                      **({"ray_address": ray_address} if ray_address is not None else {}),
                      **executor_kw)  # an unknown name or bad option fails before any write
    if ray_address is not None and ex.name != "ray":
        raise ConfigError(f"--ray-address is only used with --executor ray (got --executor "
                          f"{executor}).")
    check_cells(cells, "run_grid")
    imap = functools.partial(imap_cells, executor=ex, progress=progress)
    return run_cells(cells, cell_fn, out_dir, identity=identity, imap=imap,
                     executor={"executor": ex.name, "max_workers": max_workers,
                               "ray_address": ray_address},
                     command=command, config=config)


# ----------------------------------------------------------------------------- identity
def _model_hash(path: str) -> str:

    p = Path(path)
    w = p / WEIGHTS if p.is_dir() else p
    if not w.is_file():
        raise DataError(f"Grid cell model {path}: no {WEIGHTS} there. Give model directories "
                        "written by medscalpel (model.safetensors + model.json).")
    return hash_file(w)[:16]


def _data_hash(spec: str, split: str, preprocess=None) -> str:

    return open_dataset(spec, split=split, preprocess=preprocess).content_hash()[:16]


def grid_identity(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Hashes of every model file and dataset split the cells name (keys ``model``,
    ``teacher``, ``fit``, ``held_out`` and ``data`` + ``split``): a changed file or dataset
    changes the identity, so a resumed grid refuses to mix results."""
    models: dict[str, str] = {}
    data: dict[str, str] = {}
    files: dict[str, str] = {}
    for c in cells:
        for key in ("model", "teacher"):
            if key in c and c[key] not in models:
                models[c[key]] = _model_hash(c[key])
        for key in ("fit", "held_out"):
            if key in c and c[key] not in files:
                if not Path(c[key]).is_file():
                    raise DataError(f"Grid cell file {c[key]} ({key}) does not exist.")
                files[c[key]] = hash_file(c[key])[:16]
        if "data" in c:
            splits = [c.get("split", "test")] + (["train", "val"] if c.get("kind") == "distill"
                                                 else [])
            for s in splits:
                k = f"{c['data']}#{s}"
                if k not in data:
                    data[k] = _data_hash(c["data"], s)
    return {"models": models, "data": data, "files": files}


# ----------------------------------------------------------------------------- grids
def _floats(values: Sequence[float], name: str, owner: str, low: float, high: float,
            high_inclusive: bool = True) -> list[float]:
    vals = [round(float(v), 6) for v in values]
    if not vals:
        raise ConfigError(f"The '{name}' parameter of {owner} must not be empty.")
    for v in vals:
        check_range(v, name, owner, low, high, high_inclusive=high_inclusive)
    return vals


def _ints(values: Sequence[int], name: str, owner: str) -> list[int]:
    vals = list(values)
    if not vals:
        raise ConfigError(f"The '{name}' parameter of {owner} must not be empty.")
    for v in vals:
        check_range(v, name, owner, 0, integer=True)
    return [int(v) for v in vals]


def prune_grid(models: Sequence[str | os.PathLike], data: str, split: str = "test",
               ratios: Sequence[float] = tuple(round(0.05 * i, 2) for i in range(20)),
               methods: Sequence[str] = ("l1", "random"), seeds: Sequence[int] = (0,),
               batch_size: int = 64) -> list[dict[str, Any]]:
    """Cells of a global unstructured pruning sweep (PruneCXR): models x methods x seeds x
    ratios; ``l1`` is deterministic, so it gets one cell per (model, ratio) (seed ``None``)."""
    owner = "prune_grid"
    if not models:
        raise ConfigError(f"The 'models' parameter of {owner} must name at least one model.")
    ratios = _floats(ratios, "ratios", owner, 0.0, 1.0, high_inclusive=False)
    seeds = _ints(seeds, "seeds", owner)
    for m in methods:
        check_in(m, "methods", owner, ("l1", "random"))
    check_range(batch_size, "batch_size", owner, 1, integer=True)
    return [{"kind": "prune", "model": str(mdl), "data": data, "split": split, "method": m,
             "seed": s, "ratio": r, "batch_size": batch_size}
            for mdl in models for m in methods for s in ([None] if m == "l1" else seeds)
            for r in ratios]


def distill_grid(teacher: str | os.PathLike, data: str, students: Sequence[str],
                 temperatures: Sequence[float] = (4.0,), soft_weights: Sequence[float] = (0.5,),
                 seeds: Sequence[int] = (0,), epochs: int = 5, batch_size: int = 64,
                 lr: float = 1e-3, split: str = "test") -> list[dict[str, Any]]:
    """Cells of a distillation grid: students x temperatures x soft weights x seeds; each trains a
    student on ``train`` (early stopping on ``val``) and evaluates on ``split``."""
    owner = "distill_grid"

    if not students:
        raise ConfigError(f"The 'students' parameter of {owner} must not be empty.")
    for s in students:
        ARCHS.get(s)
    temps = _floats(temperatures, "temperatures", owner, 1e-3, 1e3)
    alph = _floats(soft_weights, "soft_weights", owner, 0.0, 1.0)
    seeds = _ints(seeds, "seeds", owner)
    check_range(epochs, "epochs", owner, 1, integer=True)
    check_range(batch_size, "batch_size", owner, 1, integer=True)
    check_range(lr, "lr", owner, 0, low_inclusive=False)
    return [{"kind": "distill", "teacher": str(teacher), "data": data, "split": split,
             "student": st, "temperature": t, "soft_weight": a, "seed": sd, "epochs": epochs,
             "batch_size": batch_size, "lr": lr}
            for st in students for t in temps for a in alph for sd in seeds]


def triage_grid(fit: str | os.PathLike, held_out: str | os.PathLike,
                budgets: Sequence[float] = (5.0,), max_auroc_drops: Sequence[float] = (0.01,),
                max_recall_drops: Sequence[float] = (0.05,)) -> list[dict[str, Any]]:
    """Cells of a treatment-router grid over its guards and budget (``fit`` / ``held_out``:
    saved ``Features`` or ``Predictions`` files)."""
    owner = "triage_grid"
    b = _floats(budgets, "budgets", owner, 0.0, 1e6)
    da = _floats(max_auroc_drops, "max_auroc_drops", owner, 0.0, 1.0)
    dr = _floats(max_recall_drops, "max_recall_drops", owner, 0.0, 1.0)
    return [{"kind": "triage", "fit": str(fit), "held_out": str(held_out), "budget": x,
             "max_auroc_drop": y, "max_recall_drop": z} for x in b for y in da for z in dr]


# ----------------------------------------------------------------------------- cell functions
@functools.lru_cache(maxsize=8)
def _cached_model(path: str):

    return load_model(path)


@functools.lru_cache(maxsize=8)
def _cached_data(spec: str, split: str, model_path: str):

    return open_dataset(spec, split=split, preprocess=_cached_model(model_path).card.preprocess)


def _metrics(preds) -> dict[str, Any]:

    ev = evaluate(preds, n_boot=0)
    return {"macro_auroc": ev.macro.get("auroc"), "macro_ap": ev.macro.get("ap"),
            "per_class": {c.name: {"auroc": c.auroc, "ap": c.ap} for c in ev.classes}}


def _strip_seconds(preds):

    meta = {k: v for k, v in preds.meta.items() if k != "seconds"}
    return Predictions(preds.logits, preds.labels, preds.ids, preds.class_names, preds.task,
                       preds.split, preds.model_id, meta)


@CELL_FNS.register("prune", help="global L1/random unstructured pruning of a model, no fine-tune")
def prune_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Prune ``cell['model']`` to ``cell['ratio']`` (``method``, ``seed``), predict
    ``cell['data']``/``split``: the prune cell of ``compress sweep``
    (:func:`medscalpel.compress.sweep.prune_cell_result`), so the audit reads both alike."""
    return prune_cell_result(_cached_model(cell["model"]), cell["method"], float(cell["ratio"]),
                             cell.get("seed"),
                             _cached_data(cell["data"], cell.get("split", "test"), cell["model"]),
                             batch_size=int(cell.get("batch_size", 64)), device="cpu")


@CELL_FNS.register("distill", help="train a student with hybrid KD from a teacher, evaluate it")
def distill_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Train ``cell['student']`` from ``cell['teacher']`` on ``data``'s train split (early
    stopping on val) with :func:`medscalpel.compress.distill.teacher_loss` (the one
    distillation loss); evaluate student and teacher on ``split``."""

    teacher = _cached_model(cell["teacher"])
    pp = teacher.card.preprocess
    tr = open_dataset(cell["data"], split="train", preprocess=pp)
    va = open_dataset(cell["data"], split="val", preprocess=pp)
    te = _cached_data(cell["data"], cell.get("split", "test"), cell["teacher"])

    torch.manual_seed(int(cell["seed"]))
    student = create_model(cell["student"], num_classes=tr.num_classes, in_chans=pp.channels,
                           img_size=pp.size)
    student.card = make_card(student, tr.class_names, tr.task, pp)
    cfg = TrainConfig(epochs=int(cell["epochs"]), batch_size=int(cell["batch_size"]),
                      lr=float(cell["lr"]), seed=int(cell["seed"]), device="cpu")
    loss = teacher_loss(teacher, tr.task, cell["soft_weight"], cell["temperature"])
    res = train(student, tr, va, cfg, loss_fn=loss, progress=False)
    res.model.card = student.card
    sp = _strip_seconds(predict(res.model, te, device="cpu", progress=False))
    tp = predict(teacher, te, device="cpu", progress=False)
    return {"student_params": res.model.num_parameters(),
            "teacher_params": teacher.num_parameters(), "best_epoch": res.best_epoch,
            "history": [{k: v for k, v in h.items() if k != "seconds"} for h in res.history],
            "student": _metrics(sp), "teacher": _metrics(tp),
            "artifacts": {"predictions.npz": sp}}


def _load_scores(path: str):

    with np.load(path, allow_pickle=False) as z:
        is_features = "features" in z.files
    return Features.load(path) if is_features else Predictions.load(path)


@CELL_FNS.register("triage", help="the cost-aware treatment router on saved features")
def triage_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`medscalpel.repair.triage.triage` with the cell's budget and guards."""

    res = triage(_load_scores(cell["fit"]), _load_scores(cell["held_out"]),
                 budget=float(cell["budget"]), max_auroc_drop=float(cell["max_auroc_drop"]),
                 max_recall_drop=float(cell["max_recall_drop"]))
    return {k: v for k, v in res.to_dict().items() if k != "seconds"}


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Dispatch a cell to the cell function of its ``kind`` (:data:`CELL_FNS`)."""
    if not isinstance(cell, dict) or "kind" not in cell:
        raise ConfigError(f"A grid cell needs a 'kind' ({', '.join(CELL_FNS.names())}). Got "
                          f"{cell!r}.")
    return CELL_FNS.get(cell["kind"])(cell)


# ----------------------------------------------------------------------------- one call each
def _run(cells, out_dir, executor, max_workers, ray_address, progress, command, **kw):
    return run_grid(cells, run_cell, out_dir, executor=executor, identity=grid_identity(cells),
                    max_workers=max_workers, ray_address=ray_address, progress=progress,
                    command=command, **kw)


def run_prune_grid(models: Sequence[str | os.PathLike], data: str, out_dir: str | os.PathLike,
                   split: str = "test",
                   ratios: Sequence[float] = tuple(round(0.05 * i, 2) for i in range(20)),
                   methods: Sequence[str] = ("l1", "random"), seeds: Sequence[int] = (0,),
                   batch_size: int = 64, executor: str = "local", max_workers: int | None = None,
                   ray_address: str | None = None, progress: bool | None = None,
                   **executor_kw: Any) -> CellIndex:
    """A resumable pruning sweep on any executor (:func:`prune_grid` + :func:`run_grid`);
    its prune cells are those of ``compress sweep``, so ``SweepResult.load`` and the audit
    read the directory as a sweep."""
    cells = prune_grid(models, data, split, ratios, methods, seeds, batch_size)
    return _run(cells, out_dir, executor, max_workers, ray_address, progress, "scale prune",
                **executor_kw)


def run_distill_grid(teacher: str | os.PathLike, data: str, students: Sequence[str],
                     out_dir: str | os.PathLike, temperatures: Sequence[float] = (4.0,),
                     soft_weights: Sequence[float] = (0.5,), seeds: Sequence[int] = (0,),
                     epochs: int = 5, batch_size: int = 64, lr: float = 1e-3,
                     split: str = "test", executor: str = "local",
                     max_workers: int | None = None, ray_address: str | None = None,
                     progress: bool | None = None, **executor_kw: Any) -> CellIndex:
    """A resumable distillation grid on any executor (:func:`distill_grid` + :func:`run_grid`)."""
    cells = distill_grid(teacher, data, students, temperatures, soft_weights, seeds, epochs,
                         batch_size, lr, split)
    return _run(cells, out_dir, executor, max_workers, ray_address, progress, "scale distill",
                **executor_kw)


def run_triage_grid(fit: str | os.PathLike, held_out: str | os.PathLike,
                    out_dir: str | os.PathLike, budgets: Sequence[float] = (5.0,),
                    max_auroc_drops: Sequence[float] = (0.01,),
                    max_recall_drops: Sequence[float] = (0.05,), executor: str = "local",
                    max_workers: int | None = None, ray_address: str | None = None,
                    progress: bool | None = None, **executor_kw: Any) -> CellIndex:
    """A resumable treatment-router grid on any executor (:func:`triage_grid` + :func:`run_grid`)."""
    cells = triage_grid(fit, held_out, budgets, max_auroc_drops, max_recall_drops)
    return _run(cells, out_dir, executor, max_workers, ray_address, progress, "scale triage",
                **executor_kw)


__all__ = ["CELL_FNS", "CellIndex", "canonical", "cell_id", "distill_cell", "distill_grid",
           "grid_identity", "identity_hash", "prune_cell", "prune_grid", "run_cell",
           "run_distill_grid", "run_grid", "run_prune_grid", "run_triage_grid", "triage_cell",
           "triage_grid"]
