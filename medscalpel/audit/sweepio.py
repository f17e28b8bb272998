"""Reading a compression sweep into aligned arrays.

A *sweep* is a set of :class:`~medscalpel.engine.predictions.Predictions`, one per
(model or seed, compression level) on the same images. The level is any number that orders the
compression: a sparsity ratio (0, 0.05, ..., 0.95), a structured pruning ratio, or a step index
(0 = teacher, 1 = distilled student). The smallest level is the reference (the dense model)
unless another one is named.

Two sources give a :class:`Sweep`:

* a sweep directory written by ``medscalpel compress sweep`` or a pruning grid written by
  ``medscalpel scale prune``: both are grids of the one cell engine (:mod:`medscalpel.cells`),
  read through their index ``index.json`` (:class:`~medscalpel.cells.CellIndex`), never by
  parsing paths. Each prune cell (:class:`SweepCell`: model id, method, seed, ratio, achieved
  sparsity) has ``cells/<cell_id>/predictions.npz``; each model (or model and seed) is one
  member of the sweep, i.e. one curve;

* an in-memory mapping ``{(seed, level): Predictions}`` (or ``{level: Predictions}`` for a
  single model), e.g. predictions of a distilled student next to its teacher.

Example:
    >>> import numpy as np
    >>> from medscalpel.engine.predictions import Predictions
    >>> y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)
    >>> p = lambda z: Predictions(z, y, ids=("a", "b", "c", "d"), class_names=("x", "y"),
    ...                           task="multilabel")
    >>> sw = as_sweep({("s0", 0.0): p(y * 4 - 2), ("s0", 0.5): p(y * 2 - 1)})
    >>> sw.levels.tolist(), sw.seeds
    ([0.0, 0.5], ('s0',))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from medscalpel.cells import CELLS, INDEX, Cell, CellIndex
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.layout import artifact

logger = logging.getLogger(__name__)

LEVEL_DECIMALS = 6


def _key_level(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"Sweep: compression level {value!r} is not a number.") from exc
    if not np.isfinite(v):
        raise DataError(f"Sweep: compression level {value!r} is not finite.")
    return round(v, LEVEL_DECIMALS)


def _fmt_levels(levels) -> str:
    return ", ".join(f"{v:g}" for v in levels)


@dataclass
class Sweep:
    """Predictions of several models (seeds) at several compression levels, aligned by image id.

    Args:
        cells: ``{(seed, level): Predictions}``.
        method: the compression method (``l1``, ``random``, ``structured``, ``distill``...).
        level_name: what the level measures (``sparsity``, ``ratio``, ``step``).
        source: where it was read from (a directory or ``<memory>``).
        reference_level: the dense / uncompressed level (default: the smallest level).

    All cells must share class names and task. Rows are restricted to the image ids present in
    every cell, in the order of the first reference cell; the labels come from that cell and
    must agree with every other cell's.
    """

    cells: dict[tuple[str, float], Predictions]
    method: str = ""
    level_name: str = "sparsity"
    source: str = "<memory>"
    reference_level: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.cells:
            raise DataError(f"Sweep from {self.source} is empty: no (seed, level) Predictions "
                            "were found. Run 'medscalpel compress sweep' first or check the path.")
        cells: dict[tuple[str, float], Predictions] = {}
        for key, pred in self.cells.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise DataError(f"Sweep: cell key {key!r} must be a (seed, level) pair.")
            if not isinstance(pred, Predictions):
                raise DataError(f"Sweep: cell {key!r} holds a {type(pred).__name__}, not "
                                "Predictions.")
            cells[(str(key[0]), _key_level(key[1]))] = pred
        self.cells = cells
        levels = sorted({lv for _, lv in cells})
        self.levels = np.asarray(levels, dtype=np.float64)
        self.seeds = tuple(sorted({s for s, _ in cells}))
        if self.reference_level is None:
            self.reference_level = float(self.levels[0])
        else:
            self.reference_level = self.level(self.reference_level)
        ref_seeds = [s for s in self.seeds if (s, self.reference_level) in cells]
        if not ref_seeds:
            raise DataError(f"Sweep from {self.source}: no model has the reference level "
                            f"{self.reference_level:g}.")
        missing_ref = [s for s in self.seeds if s not in ref_seeds]
        if missing_ref:
            raise DataError(
                f"Sweep from {self.source}: model(s) {missing_ref} have no cell at the reference "
                f"level {self.reference_level:g}, so their relative changes cannot be computed. "
                "Re-run the sweep for those models or remove them.")
        first = cells[(self.seeds[0], self.reference_level)]
        for key, pred in cells.items():
            if pred.class_names != first.class_names:
                raise DataError(f"Sweep cell {key} has classes {list(pred.class_names)[:4]}... "
                                f"but {(self.seeds[0], self.reference_level)} has "
                                f"{list(first.class_names)[:4]}...; all cells must share classes.")
            if pred.task != first.task:
                raise DataError(f"Sweep cell {key} is {pred.task} but the reference cell is "
                                f"{first.task}.")
        common = set(first.ids)
        for pred in cells.values():
            common &= set(pred.ids)
        if not common:
            raise DataError(f"Sweep from {self.source}: the cells share no image id.")
        ids = tuple(i for i in first.ids if i in common)
        dropped = len(first.ids) - len(ids)
        if dropped:
            logger.warning("Sweep: %d images are missing from some cells and are left out.",
                           dropped)
        self.ids = ids
        self.class_names = first.class_names
        self.task = first.task
        self.split = first.split
        ref = _rows(first, ids)
        self.labels = ref.labels
        self._probs: dict[tuple[str, float], np.ndarray] = {}
        for key, pred in cells.items():
            al = _rows(pred, ids)
            same = (np.array_equal(al.labels, ref.labels, equal_nan=True)
                    if self.task == "multilabel" else np.array_equal(al.labels, ref.labels))
            if not same:
                raise DataError(f"Sweep cell {key} has different labels from the reference cell "
                                "for the same image ids: the cells were not evaluated on the same "
                                "split.")
            self._probs[key] = al.probs()
        self.info = {**self.info, "n_images_dropped": dropped}

    # ------------------------------------------------------------------ views
    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def targets(self) -> np.ndarray:
        """Labels as float ``[N, K]`` (one-hot for multi-class), NaN where unknown."""
        if self.task == "multilabel":
            return self.labels.astype(np.float32)
        out = np.zeros((self.n, self.num_classes), np.float32)
        out[np.arange(self.n), self.labels] = 1.0
        return out

    def level(self, value: float) -> float:
        """The sweep's level equal to ``value`` (to 1e-6), or a ConfigError listing the levels."""
        try:
            v = float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"Compression level {value!r} is not a number; available levels: "
                              f"{_fmt_levels(self.levels)}.") from exc
        hit = np.flatnonzero(np.abs(self.levels - v) < 1e-6)
        if hit.size == 0:
            raise ConfigError(
                f"Level {v:g} is not in the sweep ({self.source}); available {self.level_name} "
                f"levels: {_fmt_levels(self.levels)}.")
        return float(self.levels[hit[0]])

    def seeds_at(self, level: float) -> tuple[str, ...]:
        lv = self.level(level)
        return tuple(s for s in self.seeds if (s, lv) in self._probs)

    def probs(self, seed: str, level: float) -> np.ndarray:
        """Probabilities ``[N, K]`` of one cell, rows in :attr:`ids` order."""
        lv = self.level(level)
        key = (str(seed), lv)
        if key not in self._probs:
            raise ConfigError(f"Sweep has no cell for model {seed!r} at level {lv:g}; models at "
                              f"that level: {list(self.seeds_at(lv))}.")
        return self._probs[key]

    def mean_probs(self, level: float, seeds: tuple[str, ...] | None = None) -> np.ndarray:
        """Probabilities averaged over the models (seeds) that have ``level``."""
        lv = self.level(level)
        seeds = seeds if seeds is not None else self.seeds_at(lv)
        return np.mean([self._probs[(s, lv)] for s in seeds], axis=0)

    def predictions(self, seed: str, level: float) -> Predictions:
        """The cell's :class:`Predictions` restricted to :attr:`ids`."""
        lv = self.level(level)
        return _rows(self.cells[(str(seed), lv)], self.ids)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "method": self.method, "level_name": self.level_name,
                "levels": self.levels.tolist(), "reference_level": self.reference_level,
                "seeds": list(self.seeds), "n_cells": len(self.cells), "n_images": self.n,
                "class_names": list(self.class_names), "task": self.task, "split": self.split,
                **self.info}


def _rows(pred: Predictions, ids: tuple[str, ...]) -> Predictions:
    if pred.ids == ids:
        return pred
    pos = {i: k for k, i in enumerate(pred.ids)}
    return pred.select([pos[i] for i in ids])


# ----------------------------------------------------------------------------- loading
PRUNE_KIND = "prune"
PREDICTIONS = artifact("predictions_file").filename


@dataclass(frozen=True)
class SweepCell:
    """A pruning cell of a grid index, typed: what the audit needs from
    :class:`medscalpel.cells.Cell` (``kind == "prune"``). The same view serves a
    ``compress sweep`` directory and a ``scale prune`` grid, which share the index format.

    Attributes:
        model_id: the pruned model's id.
        method: ``l1``, ``random``...
        seed: the mask / fine-tune seed, None when the cell does not depend on one.
        ratio: the requested sparsity (the sweep level).
        sparsity: the achieved sparsity.
        macro_auroc / macro_ap: of the cell's predictions (NaN when undefined).
        cell_id / path: the cell's id and its folder relative to the sweep directory.
        computed: False when the run that wrote the index found it finished and skipped it.
    """

    model_id: str
    method: str
    seed: int | None
    ratio: float
    sparsity: float
    macro_auroc: float
    macro_ap: float
    cell_id: str
    path: str
    computed: bool = True

    @property
    def key(self) -> tuple[str, str, int | None, float]:
        return (self.model_id, self.method, self.seed, round(self.ratio, 4))

    @property
    def member(self) -> str:
        """The sweep member (one curve): the model, or the model and mask/fine-tune seed."""
        return self.model_id if self.seed is None else f"{self.model_id}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_cell(cls, cell: Cell) -> "SweepCell":
        """The typed view of a finished prune cell; a cell lacking a field is refused."""
        try:
            seed = cell.cell.get("seed")
            return cls(str(cell.result["model_id"]), str(cell.cell["method"]),
                       None if seed is None else int(seed), float(cell.cell["ratio"]),
                       _num(cell.result["sparsity"]), _num(cell.result.get("macro_auroc")),
                       _num(cell.result.get("macro_ap")), cell.cell_id, cell.path,
                       cell.computed)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"Prune cell {cell.cell_id} lacks {exc} in its definition or "
                            "result; re-run the sweep into a new --out.") from exc


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def prune_cells(index: CellIndex) -> list[SweepCell]:
    """The typed prune cells of a grid index that have their predictions, sorted by (model,
    method, seed, ratio)."""
    out = [SweepCell.from_cell(c) for c in index.select(kind=PRUNE_KIND)
           if PREDICTIONS in c.artifacts]
    return sorted(out, key=lambda c: (c.model_id, c.method, -1 if c.seed is None else c.seed,
                                      c.ratio))


def _sweep_root(path: Path) -> Path:
    """The sweep directory itself, also when its ``cells`` folder is given."""
    if not (path / INDEX).is_file() and path.name == CELLS and (path.parent / INDEX).is_file():
        return path.parent
    return path


def read_index(sweep_dir: str | os.PathLike) -> CellIndex:
    """The index of a sweep / grid directory (or of its ``cells`` folder)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise DataError(f"Sweep directory {root} does not exist; pass the --out folder of "
                        "'medscalpel compress sweep' or 'medscalpel scale prune'.")
    return CellIndex.load(_sweep_root(root))


def sweep_methods(sweep_dir: str | os.PathLike) -> list[str]:
    """The method names (``l1``, ``random``...) of the prune cells of a sweep directory."""
    return sorted({c.method for c in prune_cells(read_index(sweep_dir))})


def load_sweep(
    sweep_dir: str | os.PathLike,
    method: str | None = None,
    *,
    level_name: str = "sparsity",
    reference_level: float | None = None,
) -> Sweep:
    """Read the pruning cells of a sweep directory (``medscalpel compress sweep``) or of a
    pruning grid (``medscalpel scale prune``) through its index (:class:`medscalpel.cells.
    CellIndex`). A sweep member (one curve) is a model, or a (model, seed) pair for seeded
    cells (random masks, fine-tunes).

    Args:
        sweep_dir: the sweep's output directory (or its ``cells`` folder).
        method: which method's cells to read; needed when the sweep holds several (e.g. ``l1``
            and ``random``), optional when it holds one.
        level_name: what the ratio measures.
        reference_level: the uncompressed level (default: the smallest).
    """
    index = read_index(sweep_dir)
    root = Path(index.out_dir)
    found = prune_cells(index)
    if not found:
        raise DataError(f"Sweep directory {root} is empty: its index lists no finished pruning "
                        "cell with predictions. Run 'medscalpel compress sweep' first (or let it "
                        "finish).")
    methods = sorted({f.method for f in found})
    if method is None:
        if len(methods) > 1:
            raise ConfigError(f"Sweep {root} holds several methods ({', '.join(methods)}); choose "
                              "one with method= / --method.")
        method = methods[0]
    elif method not in methods:
        raise ConfigError(f"Sweep {root} has no cells for method {method!r}; available methods: "
                          f"{', '.join(methods)}.")
    cells: dict[tuple[str, float], Predictions] = {}
    achieved: dict[str, float] = {}
    for f in found:
        if f.method != method:
            continue
        cells[(f.member, f.ratio)] = Predictions.load(index.artifact(f.cell_id, PREDICTIONS))
        if np.isfinite(f.sparsity):
            achieved[f"{f.member}@{f.ratio:g}"] = f.sparsity
    info: dict[str, Any] = {"achieved_sparsity": achieved} if achieved else {}
    return Sweep(cells=cells, method=method, level_name=level_name, source=str(root),
                 reference_level=reference_level, info=info)


SweepLike = Union[Sweep, str, os.PathLike, Mapping]


def as_sweep(obj: SweepLike, method: str | None = None, **kwargs: Any) -> Sweep:
    """A :class:`Sweep` from a Sweep, a sweep directory or a mapping of Predictions.

    Mappings may be ``{(seed, level): Predictions}`` or ``{level: Predictions}`` (one model).
    """
    if isinstance(obj, Sweep):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return load_sweep(obj, method=method, **kwargs)
    if isinstance(obj, Mapping):
        if not obj:
            raise DataError("Sweep is empty: the mapping of (seed, level) -> Predictions has no "
                            "entries.")
        cells: dict[tuple[str, float], Predictions] = {}
        for key, pred in obj.items():
            if isinstance(key, tuple):
                cells[key] = pred
            else:
                cells[("0", key)] = pred
        return Sweep(cells=cells, method=method or "", **kwargs)
    raise DataError(f"Cannot read a sweep from a {type(obj).__name__}; pass a sweep directory, a "
                    "Sweep or a {(seed, level): Predictions} mapping.")
