"""One resumable cell engine and one index format, shared by every grid of experiments.

A *grid* is a list of JSON-able cells (``dict``: e.g. ``{"kind": "prune", "method": "l1",
"ratio": 0.5, ...}``) and one cell function ``fn(cell) -> result``. :func:`run_cells` runs the
cells not yet finished, through any executor callable (in this process by default; the
pipeline's process pool or Ray via :mod:`medscalpel.pipeline.executors`), and in the calling
process, as each cell finishes, writes::

    out_dir/
      manifest.json          RunDir manifest; identity = cell function + data/model hashes
      index.json             the index: CellIndex.to_dict() (rewritten as cells finish)
      cells/<cell_id>/...    the cell's artifacts (predictions.npz, sparsity.json, ...), first
      cells/<cell_id>.json   {"cell", "result", "artifacts", "identity_hash", "seconds"}: last,
                             atomically; its presence marks the cell finished

A kill (``kill -9``) loses at most the cells that were running: rerunning skips every cell whose
JSON is readable, whose stored ``cell`` equals the requested one and whose artifacts are present
with their recorded sizes; anything else is recomputed. A rerun with another identity (dataset,
model, cell function) raises :class:`~medscalpel.errors.RunError` instead of mixing results.

``compress sweep`` (:func:`medscalpel.compress.sweep.run_sweep`) and every ``scale`` grid
(:func:`medscalpel.pipeline.grid.run_grid`) use this engine, so their directories have the same
index, which the audit stage reads (:func:`medscalpel.audit.sweepio.load_sweep`) with
:meth:`CellIndex.load`: typed cells, no path parsing.

Example:
    >>> import tempfile
    >>> out = tempfile.mkdtemp() + "/g"
    >>> idx = run_cells([{"x": 2}, {"x": 3, "y": 1}], len, out, progress=False)
    >>> [c.result["value"] for c in idx.cells], idx.n_computed
    ([1, 2], 2)
    >>> run_cells([{"x": 2}, {"x": 3, "y": 1}], len, out, progress=False).n_skipped
    2
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.errors import ConfigError, DataError, RunError
from medscalpel.layout import artifact, write_artifact_at
from medscalpel.progress import track
from medscalpel.runs import RunDir, atomic_path, dumps_json, read_json, write_json

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
#: the index file of a grid directory (declared in medscalpel/layout.py)
INDEX = artifact("sweep_index").filename
CELLS = "cells"
#: index files of the two engines that came before this one (no longer read)
LEGACY_INDEXES = ("sweep.json", "grid.json")
_NAME = re.compile(r"[A-Za-z0-9._-]+")

CellFn = Callable[[dict[str, Any]], Any]
#: ``imap(fn, cells) -> iterator of (position in cells, fn(cell))`` in any order
ImapFn = Callable[[Callable[[dict[str, Any]], Any], list[dict[str, Any]]],
                  Iterator[tuple[int, Any]]]


# ----------------------------------------------------------------------------- identity
def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces, NaN -> null): the basis of ids and comparisons."""
    return json.dumps(json.loads(dumps_json(obj)), sort_keys=True, separators=(",", ":"))


def cell_id(cell: dict[str, Any]) -> str:
    """A stable, file-name-safe id: a readable prefix of the short values + a content hash.

    Example:
        >>> cell_id({"kind": "prune", "method": "l1", "ratio": 0.5})[:14]
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


def identity_hash(identity: dict[str, Any]) -> str:
    """Short hash of a grid's identity (stored in every finished cell's JSON)."""
    return hashlib.sha256(canonical(identity).encode()).hexdigest()[:16]


def fn_name(fn: Callable) -> str:
    """``module.qualname`` of a cell function (of the wrapped one for a ``functools.partial``,
    of its class for a callable object): stable across processes, part of a grid's identity."""
    f = fn.func if isinstance(fn, functools.partial) else fn
    if not hasattr(f, "__qualname__"):
        f = type(f)
    return f"{getattr(f, '__module__', '?')}.{f.__qualname__}"


def check_cells(cells: Sequence[dict[str, Any]], owner: str = "run_cells"
                ) -> tuple[list[dict[str, Any]], list[str]]:
    """Cells as canonical JSON dicts and their ids; refuses an empty grid, non-dict or
    non-JSON-able cells and duplicates."""
    cells = list(cells)
    if not cells:
        raise ConfigError(f"The 'cells' parameter of {owner} must not be empty.")
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
@dataclass(frozen=True)
class Cell:
    """One finished cell of a grid.

    Attributes:
        cell_id: stable id (:func:`cell_id`); the cell's files are ``cells/<cell_id>/``.
        cell: the cell's definition (what was asked: ``kind``, ``method``, ``ratio``...).
        result: the JSON result of the cell function (without its artifacts).
        artifacts: ``{file name: size in bytes}`` of the files under ``cells/<cell_id>/``.
        seconds: time the cell function took.
        computed: True when computed by the call that wrote the index, False when found
            finished on disk and skipped.
    """

    cell_id: str
    cell: dict[str, Any]
    result: dict[str, Any]
    artifacts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    computed: bool = True

    @property
    def kind(self) -> str | None:
        return self.cell.get("kind")

    @property
    def path(self) -> str:
        """The cell's artifact folder, relative to the grid directory."""
        return f"{CELLS}/{self.cell_id}"

    def to_dict(self) -> dict[str, Any]:
        return {"cell_id": self.cell_id, "cell": self.cell, "result": self.result,
                "artifacts": dict(self.artifacts), "seconds": self.seconds,
                "computed": self.computed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cell":
        arts = d.get("artifacts") or {}
        if not isinstance(arts, dict):
            raise DataError(f"Cell {d.get('cell_id')!r}: 'artifacts' must map file names to "
                            f"sizes. Got {type(arts).__name__}.")
        return cls(str(d["cell_id"]), dict(d["cell"]), dict(d["result"]),
                   {str(k): int(v) for k, v in arts.items()}, float(d.get("seconds", 0.0)),
                   bool(d.get("computed", False)))


@dataclass(frozen=True)
class CellIndex:
    """The index of a grid directory (``index.json``): one format for sweeps and grids.

    Cells come in the order they were requested, followed by cells finished by earlier runs of
    the same directory that this run did not request (so the index lists every finished cell).

    Attributes:
        out_dir: the grid directory (set from where it was loaded).
        command: what wrote it (``compress sweep``, ``scale prune``...).
        cells: every finished cell.
        n_computed / n_skipped: requested cells computed by this call / found finished.
        identity / identity_hash: what the results depend on besides the cells.
        executor: the executor that ran this call.
        config: the call's settings.
    """

    out_dir: str
    command: str
    cells: tuple[Cell, ...]
    n_computed: int
    n_skipped: int
    identity: dict[str, Any]
    identity_hash: str
    executor: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "command": self.command,
                "out_dir": self.out_dir, "identity": self.identity,
                "identity_hash": self.identity_hash, "executor": self.executor,
                "config": self.config, "n_cells": len(self.cells),
                "n_computed": self.n_computed, "n_skipped": self.n_skipped,
                "seconds": self.seconds, "cells": [c.to_dict() for c in self.cells]}

    @classmethod
    def from_dict(cls, d: dict[str, Any], out_dir: str | os.PathLike | None = None
                  ) -> "CellIndex":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(f"Grid index {out_dir or d.get('out_dir')} has schema_version "
                            f"{version!r}; this medscalpel reads {SCHEMA_VERSION}. Re-run the "
                            "sweep / grid into a new --out.")
        try:
            cells = tuple(Cell.from_dict(c) for c in d["cells"])
            return cls(str(out_dir if out_dir is not None else d.get("out_dir", "")),
                       str(d.get("command", "")), cells, int(d.get("n_computed", 0)),
                       int(d.get("n_skipped", 0)), dict(d.get("identity") or {}),
                       str(d.get("identity_hash", "")), dict(d.get("executor") or {}),
                       dict(d.get("config") or {}), float(d.get("seconds", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"Grid index {out_dir or d.get('out_dir')} is malformed ({exc!r}). "
                            "Re-run the sweep / grid with the same --out to rebuild it.") from exc

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "CellIndex":
        """Read ``out_dir/index.json``; a directory of the older engines (``sweep.json`` /
        ``grid.json``) is refused with the fix."""
        out_dir = Path(out_dir)
        index = out_dir / INDEX
        if not index.is_file():
            legacy = [n for n in LEGACY_INDEXES if (out_dir / n).is_file()]
            if legacy:
                raise DataError(f"{out_dir} was written by an older medscalpel ({legacy[0]}, "
                                f"no {INDEX}); its layout is no longer read. Re-run the sweep / "
                                "grid into a new --out.")
            raise DataError(f"{out_dir} has no {INDEX}: it is not a sweep / grid directory, or "
                            "its run has not finished a cell yet. Run 'medscalpel compress sweep' "
                            "(or 'medscalpel scale ...') with this --out first.")
        return cls.from_dict(read_json(index), out_dir=out_dir)

    def save(self) -> Path:
        return write_artifact_at(self.out_dir, "sweep_index", self)

    # ------------------------------------------------------------------ views
    def results(self) -> list[dict[str, Any]]:
        """The cells' results, in the order of the cells."""
        return [c.result for c in self.cells]

    def select(self, kind: str | None = None, **match: Any) -> list[Cell]:
        """Cells of ``kind`` whose definition has every ``key=value`` of ``match``."""
        return [c for c in self.cells if (kind is None or c.kind == kind)
                and all(c.cell.get(k) == v for k, v in match.items())]

    def get(self, cid: str) -> Cell:
        for c in self.cells:
            if c.cell_id == cid:
                return c
        raise DataError(f"Grid {self.out_dir} has no cell {cid!r}.")

    def artifact(self, cid: str, name: str) -> Path:
        """The path of artifact ``name`` of cell ``cid`` (e.g. ``predictions.npz``)."""
        p = Path(self.out_dir) / CELLS / cid / name
        if name not in self.get(cid).artifacts or not p.is_file():
            raise DataError(f"Grid {self.out_dir} has no artifact {name!r} for cell {cid!r}; "
                            "rerun the grid with the same --out to recompute it.")
        return p


# ----------------------------------------------------------------------------- engine
def _timed_call(fn: CellFn, cell: dict[str, Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(cell)
    return out, round(time.perf_counter() - t0, 3)


def serial_imap(fn: CellFn, cells: list[dict[str, Any]]) -> Iterator[tuple[int, Any]]:
    """The default executor: in this process, one cell after the other."""
    for i, cell in enumerate(cells):
        yield i, fn(cell)


def _read_done(cells_dir: Path, cid: str, cell: dict[str, Any], ihash: str) -> Cell | None:
    """The finished cell ``cid`` on disk, or None when it must be (re)computed."""
    path = cells_dir / f"{cid}.json"
    if not path.is_file():
        return None
    try:
        d = read_json(path)
        done = Cell(d["cell_id"], d["cell"], d["result"],
                    {str(k): int(v) for k, v in (d.get("artifacts") or {}).items()},
                    float(d.get("seconds", 0.0)), computed=False)
    except (DataError, KeyError, TypeError, ValueError, AttributeError):
        logger.warning("ignoring the unreadable cell file %s (it will be recomputed)", path)
        return None
    if d.get("identity_hash") != ihash:
        raise RunError(f"Cannot resume: the finished cell {path} was made with identity "
                       f"{d.get('identity_hash')!r}, this run has {ihash!r} (another dataset, "
                       "model or cell function). Use a new --out; results are never mixed.")
    if canonical(done.cell) != canonical(cell):
        return None
    for name, size in done.artifacts.items():
        f = cells_dir / cid / name
        if not f.is_file() or f.stat().st_size != size:
            logger.warning("cell %s: artifact %s is missing or damaged (it will be recomputed)",
                           cid, name)
            return None
    return done


def _save_artifact(target: Path, obj: Any, cid: str, name: str) -> None:
    if hasattr(obj, "save") and not isinstance(obj, (dict, np.ndarray)):
        obj.save(target)
    elif isinstance(obj, np.ndarray):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, obj, allow_pickle=False)
    elif isinstance(obj, dict):
        write_json(target, obj)
    else:
        raise ConfigError(f"Cell {cid}: artifact {name!r} must be a numpy array, a dict (JSON) "
                          f"or have a .save(path) method; got {type(obj).__name__}.")


def write_cell(cells_dir: Path, cid: str, cell: dict[str, Any], result: Any, seconds: float,
               ihash: str) -> Cell:
    """Persist one finished cell: artifacts first (each atomically), the cell JSON last (the
    commit marker). A result key ``artifacts`` maps file names to numpy arrays, dicts (JSON)
    or objects with ``save(path)`` (``Predictions``)."""
    result = dict(result) if isinstance(result, dict) else {"value": result}
    artifacts = result.pop("artifacts", None) or {}
    sizes: dict[str, int] = {}
    for name, obj in sorted(artifacts.items()):
        if not _NAME.fullmatch(name) or name.startswith("."):
            raise ConfigError(f"Cell {cid}: artifact name {name!r} is not a plain file name.")
        target = cells_dir / cid / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _save_artifact(target, obj, cid, name)
        sizes[name] = target.stat().st_size
    res_json = json.loads(dumps_json(result))
    write_json(cells_dir / f"{cid}.json", {"schema_version": SCHEMA_VERSION, "cell_id": cid,
                                           "cell": cell, "result": res_json, "artifacts": sizes,
                                           "identity_hash": ihash, "seconds": seconds})
    return Cell(cid, cell, res_json, sizes, seconds, computed=True)


def _earlier_cells(cells_dir: Path, requested: set[str], ihash: str) -> list[Cell]:
    """Cells finished by earlier runs of this directory that this run does not request (read
    from their own commit files, so a run killed before it rewrote the index loses none)."""
    kept = []
    for f in sorted(cells_dir.glob("*.json")):
        cid = f.stem
        if cid in requested or not _NAME.fullmatch(cid):
            continue
        try:
            stored = read_json(f).get("cell")
        except (DataError, AttributeError):
            stored = None
        if not isinstance(stored, dict):
            logger.warning("ignoring the unreadable cell file %s", f)
            continue
        done = _read_done(cells_dir, cid, stored, ihash)
        if done is not None and done.cell_id == cid:
            kept.append(done)
    return kept


def _refuse_legacy(out: Path) -> None:
    """A directory of the engines before this one (``sweep.json`` / ``grid.json``, no
    ``index.json``) cannot be resumed: refuse it with the fix."""
    legacy = [n for n in LEGACY_INDEXES if (out / n).is_file()]
    if legacy and not (out / INDEX).is_file():
        raise RunError(f"{out} was written by an older medscalpel ({legacy[0]}); this version "
                       "cannot resume it. Use a new --out (the grid is recomputed).")


def _found_cells(cells_dir: Path, cells: list[dict[str, Any]], ids: list[str], ihash: str
                 ) -> dict[int, Cell]:
    """The requested cells already finished on disk, by their position in ``cells``."""
    done: dict[int, Cell] = {}
    for i, (c, cid) in enumerate(zip(cells, ids)):
        found = _read_done(cells_dir, cid, c, ihash)
        if found is not None:
            done[i] = found
    return done


@dataclass
class _Grid:
    """A grid being run: what its results depend on, the cells finished so far (requested ones
    by position, earlier runs' others) and the :class:`CellIndex` they make."""

    out: Path
    command: str
    n_cells: int
    ident: dict[str, Any]
    ihash: str
    executor: dict[str, Any]
    config: dict[str, Any]
    t0: float
    done: dict[int, Cell] = field(default_factory=dict)
    earlier: list[Cell] = field(default_factory=list)
    n_skipped: int = 0

    def index(self) -> CellIndex:
        finished = tuple(self.done[i] for i in range(self.n_cells) if i in self.done) \
            + tuple(self.earlier)
        return CellIndex(str(self.out), self.command, finished,
                         sum(c.computed for c in self.done.values()), self.n_skipped,
                         self.ident, self.ihash, self.executor, dict(self.config),
                         round(time.perf_counter() - self.t0, 3))


def _compute(grid: _Grid, cells_dir: Path, cells: list[dict[str, Any]], ids: list[str],
             todo: list[int], cell_fn: CellFn, run_imap: ImapFn, index_every_s: float) -> None:
    """Run the cells at positions ``todo`` through the executor, write each as it finishes and
    rewrite the index at most every ``index_every_s`` seconds."""
    fn = functools.partial(_timed_call, cell_fn)
    last = time.monotonic()
    for j, (res, secs) in run_imap(fn, [cells[i] for i in todo]):
        i = todo[j]
        grid.done[i] = write_cell(cells_dir, ids[i], cells[i], res, secs, grid.ihash)
        if time.monotonic() - last >= index_every_s:
            grid.index().save()
            last = time.monotonic()


def run_cells(
    cells: Sequence[dict[str, Any]],
    cell_fn: CellFn,
    out_dir: str | os.PathLike,
    *,
    identity: dict[str, Any] | None = None,
    imap: ImapFn | None = None,
    executor: dict[str, Any] | None = None,
    command: str = "grid",
    config: dict[str, Any] | None = None,
    progress: bool | None = None,
    index_every_s: float = 2.0,
) -> CellIndex:
    """Run every unfinished cell of a grid; resumable, atomic, identity-checked.

    Args:
        cells: JSON-able dicts, one per cell (ids from :func:`cell_id`).
        cell_fn: ``fn(cell) -> dict`` (or any JSON-able value, stored as ``{"value": ...}``);
            a result key ``artifacts`` maps file names to numpy arrays, dicts or objects with
            ``save(path)``, written under ``cells/<cell_id>/``. Must be picklable (a top-level
            function or a ``functools.partial`` of one) when ``imap`` runs it elsewhere.
        out_dir: the grid directory (created, or resumed when it exists).
        identity: what the results depend on besides the cells (data and model hashes); a
            rerun with another identity raises :class:`~medscalpel.errors.RunError`.
        imap: the executor: ``imap(fn, cells)`` yields ``(position, fn(cell))`` as cells
            finish (default :func:`serial_imap`, in this process); e.g. a
            ``functools.partial`` of :func:`medscalpel.pipeline.executors.imap_cells`.
        executor: how the executor is described in the index (default ``{"executor":
            "serial"}``).
        command / config: recorded in the run manifest and the index.
        progress: progress bar of the default executor.
        index_every_s: ``index.json`` is rewritten as cells finish, at most this often (and
            always at the end).

    Returns:
        The :class:`CellIndex` (also written as ``out_dir/index.json``).
    """
    t0 = time.perf_counter()
    cells, ids = check_cells(cells)
    ident = json.loads(dumps_json({"cell_fn": fn_name(cell_fn), **(identity or {})}))
    ihash = identity_hash(ident)
    out = Path(out_dir)
    _refuse_legacy(out)
    executor = dict(executor or {"executor": "serial"})
    cfg = {"n_cells": len(cells), **executor, **(config or {})}
    with RunDir(out, command=command, config=cfg, identity=ident, in_place=True,
                data={"identity_hash": ihash}) as run:
        cdir = run.path / CELLS
        cdir.mkdir(parents=True, exist_ok=True)
        done = _found_cells(cdir, cells, ids, ihash)
        grid = _Grid(out, command, len(cells), ident, ihash, executor, dict(config or {}), t0,
                     done=done, earlier=_earlier_cells(cdir, set(ids), ihash),
                     n_skipped=len(done))
        todo = [i for i in range(len(cells)) if i not in grid.done]
        logger.info("grid %s: %d cells, %d finished earlier, %d to run", out, len(cells),
                    grid.n_skipped, len(todo))
        if todo:
            run_imap = imap or (lambda f, cs: track(serial_imap(f, cs), command,
                                                    total=len(cs), progress=progress))
            _compute(grid, cdir, cells, ids, todo, cell_fn, run_imap, index_every_s)
        result = grid.index()
        result.save()
    return result

__all__ = ["CELLS", "INDEX", "SCHEMA_VERSION", "Cell", "CellIndex", "canonical", "cell_id",
           "check_cells", "fn_name", "identity_hash", "run_cells", "serial_imap", "write_cell"]
