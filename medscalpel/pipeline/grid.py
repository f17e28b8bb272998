"""Resumable experiment grids on any executor: pruning sweeps (models x methods x seeds x
ratios), distillation grids (students x temperatures x soft weights x seeds) and triage grids.

A grid is a list of JSON-able cells (``dict``) and one top-level cell function. :func:`run_grid`
runs the cells not yet finished on the chosen executor (:mod:`medscalpel.pipeline.executors`:
``local`` process pool, ``serial``, ``ray``) and, *in the calling process, as each cell
finishes*, writes::

    out_dir/
      manifest.json             RunDir manifest; identity = cell function + data/model hashes
      grid.json                 the index (GridResult.to_dict()), rewritten at the end
      cells/<cell_id>/...       the cell's artifacts (e.g. predictions.npz), written first
      cells/<cell_id>.json      {"cell", "result", "identity_hash", "seconds"}: written last,
                                atomically; its presence marks the cell finished

A kill (``kill -9``) loses at most the cells that were running: rerunning the same command
skips every cell whose JSON is present and whose stored ``cell`` equals the requested one.
Rerunning with another dataset or model (a different identity) raises
:class:`~medscalpel.errors.RunError` instead of mixing results. Workers return results; only the
calling process writes, so a Ray cluster needs no shared file system.

A pruning grid directory is also a sweep directory: ``sweep.json`` is a
:class:`~medscalpel.compress.sweep.SweepResult` whose cells point at ``cells/<cell_id>``, so the
audit stage reads it with ``SweepResult.load(out_dir)``.

Example:
    >>> cells = prune_grid(["runs/a/model"], "phantom?n=200&size=32", ratios=[0, 0.5])  # doctest: +SKIP
    >>> res = run_grid(cells, run_cell, "runs/grid", executor="ray", identity=grid_identity(cells))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.errors import ConfigError, DataError, RunError
from medscalpel.pipeline.executors import EXECUTORS, imap_cells
from medscalpel.registry import Registry
from medscalpel.runs import RunDir, atomic_path, dumps_json, hash_file, read_json, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

GRID_SCHEMA = 1
INDEX = "grid.json"
CELLS = "cells"

#: cell kind -> cell function ``fn(cell) -> result dict`` (dispatched by :func:`run_cell`)
CELL_FNS: Registry[Callable[[dict[str, Any]], dict[str, Any]]] = Registry("grid cell kind")


# ----------------------------------------------------------------------------- cells
def canonical(obj: Any) -> str:
    """Canonical JSON of a cell (sorted keys, no spaces): the basis of ids and comparisons."""
    return json.dumps(json.loads(dumps_json(obj)), sort_keys=True, separators=(",", ":"))


def cell_id(cell: dict[str, Any]) -> str:
    """A stable, file-name-safe id: a readable prefix of the short values + a content hash.

    Example:
        >>> cell_id({"kind": "prune", "method": "l1", "ratio": 0.5})[:15]
        'prune_l1_r0.5-'
    """
    text = canonical(cell)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    parts = []
    for k in sorted(cell):
        v = cell[k]
        if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
            continue
        if isinstance(v, str) and (len(v) > 16 or "/" in v or ":" in v):
            continue
        parts.append(str(v) if k in ("kind", "method", "student") else f"{k[0]}{v}")
    readable = re.sub(r"[^A-Za-z0-9._=-]+", "", "_".join(parts))[:60]
    return f"{readable}-{digest}" if readable else digest


def _check_cells(cells: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    cells = list(cells)
    if not cells:
        raise ConfigError("The 'cells' parameter of run_grid must not be empty.")
    out = []
    for i, c in enumerate(cells):
        if not isinstance(c, dict):
            raise ConfigError(f"Cell {i} of the grid must be a dict. Got {type(c).__name__}.")
        try:
            out.append(json.loads(canonical(c)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"Cell {i} of the grid is not JSON-able ({exc}); cells must hold "
                              "strings, numbers, lists and dicts only.") from exc
    ids = [cell_id(c) for c in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"The grid lists the cell {dup!r} more than once; remove the duplicate.")
    return out, ids


# ----------------------------------------------------------------------------- results
@dataclass
class GridCell:
    """One finished cell: its definition, its result (JSON) and where its files are."""

    cell_id: str
    cell: dict[str, Any]
    result: dict[str, Any]
    seconds: float = 0.0
    computed: bool = True  # False when found finished on disk and skipped

    def to_dict(self) -> dict[str, Any]:
        return {"cell_id": self.cell_id, "cell": self.cell, "result": self.result,
                "seconds": self.seconds, "computed": self.computed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GridCell":
        return cls(d["cell_id"], d["cell"], d["result"], d.get("seconds", 0.0),
                   d.get("computed", False))


@dataclass
class GridResult:
    """Index of a grid directory (``grid.json``); cells in the order they were requested."""

    out_dir: str
    cells: list[GridCell]
    n_computed: int
    n_skipped: int
    identity: dict[str, Any]
    identity_hash: str
    executor: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    schema_version: int = GRID_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "out_dir": self.out_dir,
                "identity": self.identity, "identity_hash": self.identity_hash,
                "executor": self.executor, "n_cells": len(self.cells),
                "n_computed": self.n_computed, "n_skipped": self.n_skipped,
                "seconds": self.seconds, "cells": [c.to_dict() for c in self.cells]}

    def results(self) -> list[dict[str, Any]]:
        """The cells' results, in the order of the cells."""
        return [c.result for c in self.cells]

    def artifact(self, cid: str, name: str) -> Path:
        """The path of artifact ``name`` of cell ``cid`` (e.g. ``predictions.npz``)."""
        p = Path(self.out_dir) / CELLS / cid / name
        if not p.is_file():
            raise DataError(f"Grid {self.out_dir} has no artifact {name!r} for cell {cid!r}.")
        return p

    def save(self) -> Path:
        return write_json(Path(self.out_dir) / INDEX, self.to_dict())

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "GridResult":
        d = read_json(Path(out_dir) / INDEX)
        return cls(str(out_dir), [GridCell.from_dict(c) for c in d["cells"]],
                   d.get("n_computed", 0), d.get("n_skipped", 0), d.get("identity", {}),
                   d.get("identity_hash", ""), d.get("executor", {}), d.get("seconds", 0.0))


# ----------------------------------------------------------------------------- running
def _timed_call(fn: Callable[[dict[str, Any]], Any], cell: dict[str, Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(cell)
    return out, round(time.perf_counter() - t0, 3)


def _fn_name(fn: Callable) -> str:
    f = fn.func if isinstance(fn, functools.partial) else fn
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(identity).encode()).hexdigest()[:16]


def _read_done(path: Path, cell: dict[str, Any], ihash: str) -> GridCell | None:
    if not path.is_file():
        return None
    try:
        d = read_json(path)
    except DataError:
        logger.warning("ignoring the unreadable cell file %s (it will be recomputed)", path)
        return None
    if d.get("identity_hash") != ihash:
        raise RunError(f"Cannot resume: the finished cell {path} was made with identity "
                       f"{d.get('identity_hash')!r}, this run has {ihash!r} (another dataset, "
                       "model or cell function). Use a new --out; results are never mixed.")
    if canonical(d.get("cell")) != canonical(cell):
        return None
    return GridCell(d["cell_id"], d["cell"], d["result"], d.get("seconds", 0.0), computed=False)


def _write_cell(cells_dir: Path, cid: str, cell: dict[str, Any], result: Any, seconds: float,
                ihash: str) -> GridCell:
    """Artifacts first (each atomically), the cell JSON last (the commit marker)."""
    if not isinstance(result, dict):
        result = {"value": result}
    result = dict(result)
    artifacts = result.pop("artifacts", None) or {}
    names = []
    for name, obj in sorted(artifacts.items()):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name.startswith("."):
            raise ConfigError(f"Cell {cid}: artifact name {name!r} is not a plain file name.")
        target = cells_dir / cid / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if hasattr(obj, "save"):
            obj.save(target)
        elif isinstance(obj, np.ndarray):
            with atomic_path(target) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, obj, allow_pickle=False)
        else:
            raise ConfigError(f"Cell {cid}: artifact {name!r} must be a numpy array or have a "
                              f".save(path) method; got {type(obj).__name__}.")
        names.append(name)
    res_json = json.loads(dumps_json(result))
    if names:
        res_json["artifacts"] = names
    write_json(cells_dir / f"{cid}.json", {"schema_version": GRID_SCHEMA, "cell_id": cid,
                                           "cell": cell, "result": res_json,
                                           "identity_hash": ihash, "seconds": seconds})
    return GridCell(cid, cell, res_json, seconds, computed=True)


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
) -> GridResult:
    """Run every unfinished cell of a grid; resumable, atomic, identity-checked.

    Args:
        cells: JSON-able dicts, one per cell (ids from :func:`cell_id`).
        cell_fn: picklable top-level ``fn(cell) -> dict`` (e.g. :func:`run_cell`); a result key
            ``artifacts`` maps file names to numpy arrays or objects with ``save(path)``
            (``Predictions``), written under ``cells/<cell_id>/``.
        out_dir: the grid directory (created, or resumed when it exists).
        executor: ``local`` (default), ``serial`` or ``ray``.
        identity: what the results depend on besides the cells (data and model hashes, e.g.
            :func:`grid_identity`); a rerun with another identity raises ``RunError``.
        max_workers, ray_address, **executor_kw: see :func:`~medscalpel.pipeline.executors.map_cells`.

    Returns:
        A :class:`GridResult` (also written as ``out_dir/grid.json``).
    """
    t0 = time.perf_counter()
    EXECUTORS.get(executor)  # an unknown name fails before anything is written
    if ray_address is not None and executor != "ray":
        raise ConfigError(f"--ray-address is only used with --executor ray (got --executor "
                          f"{executor}).")
    cells, ids = _check_cells(cells)
    ident = json.loads(dumps_json({"cell_fn": _fn_name(cell_fn), **(identity or {})}))
    ihash = identity_hash(ident)
    out = Path(out_dir)
    cfg = {"n_cells": len(cells), "executor": executor, "max_workers": max_workers,
           "ray_address": ray_address, **(config or {})}
    with RunDir(out, command=command, config=cfg, identity=ident, resume=True,
                data={"identity_hash": ihash}) as run:
        cdir = run.path / CELLS
        cdir.mkdir(parents=True, exist_ok=True)
        done: dict[int, GridCell] = {}
        for i, (c, cid) in enumerate(zip(cells, ids)):
            found = _read_done(cdir / f"{cid}.json", c, ihash)
            if found is not None:
                done[i] = found
        n_skipped = len(done)
        todo = [i for i in range(len(cells)) if i not in done]
        logger.info("grid %s: %d cells, %d finished earlier, %d to run", out, len(cells),
                    n_skipped, len(todo))
        fn = functools.partial(_timed_call, cell_fn)
        if todo:
            for j, (res, secs) in imap_cells(fn, [cells[i] for i in todo], executor,
                                             max_workers=max_workers, ray_address=ray_address,
                                             progress=progress, **executor_kw):
                i = todo[j]
                done[i] = _write_cell(cdir, ids[i], cells[i], res, secs, ihash)
        result = GridResult(str(out), [done[i] for i in range(len(cells))], len(todo), n_skipped,
                            ident, ihash, {"executor": executor, "max_workers": max_workers,
                                           "ray_address": ray_address},
                            round(time.perf_counter() - t0, 3))
        result.save()
    return result


# ----------------------------------------------------------------------------- identity
def _model_hash(path: str) -> str:
    from medscalpel.models.checkpoint import WEIGHTS

    p = Path(path)
    w = p / WEIGHTS if p.is_dir() else p
    if not w.is_file():
        raise DataError(f"Grid cell model {path}: no {WEIGHTS} there. Give model directories "
                        "written by medscalpel (model.safetensors + model.json).")
    return hash_file(w)[:16]


def _data_hash(spec: str, split: str, preprocess=None) -> str:
    from medscalpel.data import open_dataset

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
    from medscalpel.models.zoo import ARCHS

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
    from medscalpel.models.checkpoint import load_model

    return load_model(path)


@functools.lru_cache(maxsize=8)
def _cached_data(spec: str, split: str, model_path: str):
    from medscalpel.data import open_dataset

    return open_dataset(spec, split=split, preprocess=_cached_model(model_path).card.preprocess)


def _metrics(preds) -> dict[str, Any]:
    from medscalpel.engine.metrics import evaluate

    ev = evaluate(preds, n_boot=0)
    return {"macro_auroc": ev.macro.get("auroc"), "macro_ap": ev.macro.get("ap"),
            "per_class": {c.name: {"auroc": c.auroc, "ap": c.ap} for c in ev.classes}}


def _strip_seconds(preds):
    from medscalpel.engine.predictions import Predictions

    meta = {k: v for k, v in preds.meta.items() if k != "seconds"}
    return Predictions(preds.logits, preds.labels, preds.ids, preds.class_names, preds.task,
                       preds.split, preds.model_id, meta)


@CELL_FNS.register("prune", help="global L1/random unstructured pruning of a model, no fine-tune")
def prune_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Prune ``cell['model']`` to ``cell['ratio']`` (``method``, ``seed``), predict
    ``cell['data']``/``split``: sparsity, macro and per-class AUROC/AP, ``predictions.npz``."""
    from medscalpel.compress.sweep import global_unstructured_prune, model_identity, sparsity_report
    from medscalpel.engine.predict import predict

    model = _cached_model(cell["model"])
    ds = _cached_data(cell["data"], cell.get("split", "test"), cell["model"])
    pruned = global_unstructured_prune(model, float(cell["ratio"]), cell["method"],
                                       seed=cell.get("seed") or 0)
    rep = sparsity_report(pruned)
    preds = predict(pruned, ds, batch_size=int(cell.get("batch_size", 64)), device="cpu",
                    progress=False)
    preds = _strip_seconds(preds)
    return {"model_id": model_identity(model), "sparsity": rep["overall"]["sparsity"],
            "n": preds.n, **_metrics(preds), "artifacts": {"predictions.npz": preds}}


@CELL_FNS.register("distill", help="train a student with hybrid KD from a teacher, evaluate it")
def distill_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Train ``cell['student']`` from ``cell['teacher']`` on ``data``'s train split (early
    stopping on val) with :func:`medscalpel.compress.distill.teacher_loss` (the one
    distillation loss); evaluate student and teacher on ``split``."""
    from medscalpel.compress.distill import teacher_loss
    from medscalpel.data import open_dataset
    from medscalpel.engine.predict import predict
    from medscalpel.engine.train import TrainConfig, train
    from medscalpel.models.checkpoint import make_card
    from medscalpel.models.zoo import create_model

    teacher = _cached_model(cell["teacher"])
    pp = teacher.card.preprocess
    tr = open_dataset(cell["data"], split="train", preprocess=pp)
    va = open_dataset(cell["data"], split="val", preprocess=pp)
    te = _cached_data(cell["data"], cell.get("split", "test"), cell["teacher"])
    import torch

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
    from medscalpel.engine.predict import Features
    from medscalpel.engine.predictions import Predictions

    with np.load(path, allow_pickle=False) as z:
        is_features = "features" in z.files
    return Features.load(path) if is_features else Predictions.load(path)


@CELL_FNS.register("triage", help="the cost-aware treatment router on saved features")
def triage_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`medscalpel.repair.triage.triage` with the cell's budget and guards."""
    from medscalpel.repair.triage import triage

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
def write_sweep_index(result: GridResult) -> Path:
    """Write ``sweep.json`` (a :class:`~medscalpel.compress.sweep.SweepResult`) for the prune
    cells of a grid, so that the audit stage reads the grid directory as a sweep."""
    from medscalpel.compress.sweep import SweepCell, SweepResult

    cells = [SweepCell(c.result["model_id"], c.cell["method"], c.cell.get("seed"),
                       float(c.cell["ratio"]), f"{CELLS}/{c.cell_id}", c.result["sparsity"],
                       _nan(c.result.get("macro_auroc")), _nan(c.result.get("macro_ap")),
                       computed=c.computed)
             for c in result.cells if c.cell.get("kind") == "prune"]
    sr = SweepResult(result.out_dir, cells, result.n_computed, result.n_skipped, result.identity,
                     {"grid": True, "executor": result.executor}, result.seconds)
    return sr.save()


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _run(cells, out_dir, executor, max_workers, ray_address, progress, command, **kw):
    res = run_grid(cells, run_cell, out_dir, executor=executor, identity=grid_identity(cells),
                   max_workers=max_workers, ray_address=ray_address, progress=progress,
                   command=command, **kw)
    if any(c.get("kind") == "prune" for c in cells):
        write_sweep_index(res)
    return res


def run_prune_grid(models: Sequence[str | os.PathLike], data: str, out_dir: str | os.PathLike,
                   split: str = "test",
                   ratios: Sequence[float] = tuple(round(0.05 * i, 2) for i in range(20)),
                   methods: Sequence[str] = ("l1", "random"), seeds: Sequence[int] = (0,),
                   batch_size: int = 64, executor: str = "local", max_workers: int | None = None,
                   ray_address: str | None = None, progress: bool | None = None,
                   **executor_kw: Any) -> GridResult:
    """A resumable pruning sweep on any executor (:func:`prune_grid` + :func:`run_grid`);
    the directory is also readable with ``SweepResult.load``."""
    cells = prune_grid(models, data, split, ratios, methods, seeds, batch_size)
    return _run(cells, out_dir, executor, max_workers, ray_address, progress, "scale prune",
                **executor_kw)


def run_distill_grid(teacher: str | os.PathLike, data: str, students: Sequence[str],
                     out_dir: str | os.PathLike, temperatures: Sequence[float] = (4.0,),
                     soft_weights: Sequence[float] = (0.5,), seeds: Sequence[int] = (0,),
                     epochs: int = 5, batch_size: int = 64, lr: float = 1e-3,
                     split: str = "test", executor: str = "local",
                     max_workers: int | None = None, ray_address: str | None = None,
                     progress: bool | None = None, **executor_kw: Any) -> GridResult:
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
                    progress: bool | None = None, **executor_kw: Any) -> GridResult:
    """A resumable treatment-router grid on any executor (:func:`triage_grid` + :func:`run_grid`)."""
    cells = triage_grid(fit, held_out, budgets, max_auroc_drops, max_recall_drops)
    return _run(cells, out_dir, executor, max_workers, ray_address, progress, "scale triage",
                **executor_kw)


__all__ = ["CELL_FNS", "GridCell", "GridResult", "canonical", "cell_id",
           "distill_cell", "distill_grid", "grid_identity", "identity_hash", "prune_cell",
           "prune_grid", "run_cell", "run_distill_grid", "run_grid", "run_prune_grid",
           "run_triage_grid", "triage_cell", "triage_grid", "write_sweep_index"]
