"""Unstructured sparsity sweeps (PruneCXR): global L1 magnitude pruning, with random pruning as
the control, over many models and sparsity ratios; one :class:`Predictions` per cell for the
audit stage (forgettability curves, FCD, PIEs).

Pruning uses ``torch.nn.utils.prune.global_unstructured`` over the weights of *all* Conv and
Linear layers, the classifier included (``L1Unstructured``, or ``RandomUnstructured`` seeded),
then ``prune.remove`` so that the weights are plain tensors with exact zeros. No fine-tune by
default (as in PruneCXR); with ``finetune_epochs > 0`` the masks are kept during the fine-tune
so that the sparsity stays exact.

The sweep is a grid of ``prune`` cells ``{"kind": "prune", "model_id", "method", "seed",
"ratio"}`` on the one cell engine (:mod:`medscalpel.cells`), so ``out_dir`` has the layout of
every grid (read by the audit stage through its index)::

    out_dir/
      manifest.json                  RunDir manifest; identity = data hash + model ids (+ fine-tune)
      index.json                     the index (CellIndex.to_dict(): one entry per finished cell)
      cells/<cell_id>.json           the cell's definition and result (its commit marker)
      cells/<cell_id>/
          predictions.npz            engine.Predictions on the evaluated split
          sparsity.json              requested / achieved sparsity per layer and overall

``seed`` is None when the cell does not depend on one (``l1`` without fine-tune); ``random``
cells, and every cell once ``finetune_epochs > 0``, have one per seed. A cell whose files are
present with their recorded sizes is skipped when the sweep is run again.

Example:
    >>> res = run_sweep(["runs/m1/model", "runs/m2/model"], test_ds, "runs/sweep")  # doctest: +SKIP
    >>> res.predictions("ab12...", "l1", 0.65)  # one cell's Predictions  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from medscalpel.audit.sweepio import PREDICTIONS, SweepCell, prune_cells, read_index
from medscalpel.cells import CellIndex, run_cells
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import predict
from medscalpel.engine.predictions import Predictions
from medscalpel.engine.train import TrainConfig, train
from medscalpel.errors import ConfigError, DataError, RunError
from medscalpel.models.checkpoint import load_model
from medscalpel.runs import hash_bytes
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

OWNER = "run_sweep"
METHODS = ("l1", "random")
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
DEFAULT_RATIOS = tuple(round(float(r), 2) for r in np.arange(0, 0.96, 0.05))


# ----------------------------------------------------------------------------- pruning
def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Conv/Linear layer with a weight (the classifier included)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, PRUNABLE) and getattr(m, "weight", None) is not None]


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Zeros per Conv/Linear weight and overall (the quantity the sweep controls)."""
    layers: dict[str, dict[str, Any]] = {}
    total = zeros = 0
    for name, m in prunable_weights(model):
        w = m.weight.detach()
        n, z = int(w.numel()), int((w == 0).sum())
        layers[name] = {"numel": n, "zeros": z, "sparsity": z / n if n else 0.0}
        total += n
        zeros += z
    return {"overall": {"numel": total, "zeros": zeros,
                        "sparsity": zeros / total if total else 0.0},
            "layers": layers}


def global_unstructured_prune(model: nn.Module, ratio: float, method: str = "l1",
                              seed: int = 0, inplace: bool = False,
                              keep_masks: bool = False) -> nn.Module:
    """Zero the fraction ``ratio`` of all Conv/Linear weights, ranked globally.

    Args:
        method: ``l1`` (smallest |w| first) or ``random`` (seeded; a control).
        keep_masks: leave the ``torch.nn.utils.prune`` re-parametrisation in place (for a
            fine-tune that must keep the zeros); call :func:`remove_masks` afterwards.

    Returns:
        The pruned model (a copy unless ``inplace``); exactly ``round(ratio * n_weights)``
        weights are zeroed by the mask.
    """
    check_in(method, "method", "global_unstructured_prune", METHODS)
    check_range(ratio, "ratio", "global_unstructured_prune", 0.0, 1.0)
    model = model if inplace else copy.deepcopy(model)
    params = [(m, "weight") for _, m in prunable_weights(model)]
    if not params:
        raise ConfigError(f"global_unstructured_prune: {type(model).__name__} has no Conv/Linear "
                          "weights to prune.")
    if ratio == 0:
        return model
    pm = prune.L1Unstructured if method == "l1" else prune.RandomUnstructured
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prune.global_unstructured(params, pruning_method=pm, amount=float(ratio))
    if not keep_masks:
        remove_masks(model)
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Make pruning permanent: plain weight tensors with exact zeros, no hooks."""
    for _, m in prunable_weights(model):
        if prune.is_pruned(m) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")
    return model


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SweepResult:
    """A pruning sweep: the typed view of a grid index (:class:`~medscalpel.cells.CellIndex`)
    whose prune cells (:class:`~medscalpel.audit.sweepio.SweepCell`) each hold
    ``cells/<cell_id>/predictions.npz`` and ``sparsity.json``. A ``compress sweep`` directory
    and a ``scale prune`` grid are both read with :meth:`load`. Use :meth:`predictions` and
    :meth:`curve` rather than building paths by hand.

    Attributes:
        index: the grid index (``out_dir/index.json``).
    """

    index: CellIndex

    @property
    def out_dir(self) -> str:
        return self.index.out_dir

    @property
    def cells(self) -> list[SweepCell]:
        """Every finished prune cell (this run's and earlier runs'), sorted by (model, method,
        seed, ratio)."""
        return prune_cells(self.index)

    @property
    def n_computed(self) -> int:
        return self.index.n_computed

    @property
    def n_skipped(self) -> int:
        return self.index.n_skipped

    @property
    def identity(self) -> dict[str, Any]:
        return self.index.identity

    @property
    def config(self) -> dict[str, Any]:
        return self.index.config

    @property
    def seconds(self) -> float:
        return self.index.seconds

    @property
    def model_ids(self) -> list[str]:
        return sorted({c.model_id for c in self.cells})

    @property
    def methods(self) -> list[str]:
        return sorted({c.method for c in self.cells})

    def to_dict(self) -> dict[str, Any]:
        return self.index.to_dict()

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "SweepResult":
        return cls(read_index(out_dir))

    def select(self, model_id: str | None = None, method: str | None = None,
               seed: int | None = None) -> list[SweepCell]:
        """Cells matching the filters, sorted by (model, method, seed, ratio)."""
        return [c for c in self.cells if (model_id is None or c.model_id == model_id)
                and (method is None or c.method == method) and (seed is None or c.seed == seed)]

    def cell(self, model_id: str, method: str, ratio: float, seed: int | None = None) -> SweepCell:
        hits = [c for c in self.select(model_id, method, seed) if abs(c.ratio - ratio) < 1e-6]
        if not hits:
            raise DataError(f"No sweep cell for model {model_id!r}, method {method!r}, ratio "
                            f"{ratio:.2f}{'' if seed is None else f', seed {seed}'} in "
                            f"{self.out_dir}. Run the sweep for it first.")
        return hits[0]

    def predictions(self, model_id: str, method: str, ratio: float,
                    seed: int | None = None) -> Predictions:
        """The :class:`Predictions` of one cell."""
        c = self.cell(model_id, method, ratio, seed)
        return Predictions.load(self.index.artifact(c.cell_id, PREDICTIONS))

    def curve(self, model_id: str, method: str = "l1", seed: int | None = None,
              metric: str = "macro_auroc") -> tuple[np.ndarray, np.ndarray]:
        """(ratios, metric) of one model and method, sorted by ratio."""
        cells = self.select(model_id, method, seed)
        return (np.array([c.ratio for c in cells]),
                np.array([getattr(c, metric) for c in cells], dtype=float))


# ----------------------------------------------------------------------------- helpers
def model_identity(model: nn.Module) -> str:
    """The model's id: its card's ``model_id`` or a hash of its weights."""
    card = getattr(model, "card", None)
    if card is not None and getattr(card, "model_id", ""):
        return str(card.model_id)
    h = []
    for k, v in sorted(model.state_dict().items()):
        h.append(k.encode())
        h.append(v.detach().cpu().contiguous().numpy().tobytes())
    return "w" + hash_bytes(b"".join(h))[:15]


def _load(item: Any) -> nn.Module:
    if isinstance(item, nn.Module):
        return item
    if isinstance(item, (str, os.PathLike)):
        return load_model(item)
    raise ConfigError(f"The 'models' parameter of {OWNER} must hold model directories or "
                      f"MedClassifier objects. Got {type(item).__name__} instead.")


def prune_cell_result(model: nn.Module, method: str, ratio: float, seed: int | None, dataset,
                      *, finetune_epochs: int = 0, finetune_lr: float = 1e-4, train_ds=None,
                      batch_size: int = 64, device: str = "auto") -> dict[str, Any]:
    """The one prune cell: prune ``model`` (``global_unstructured_prune``; optionally a
    mask-keeping fine-tune), predict ``dataset``, and return the cell result shared by
    ``compress sweep`` and ``scale prune``: ``model_id``, achieved ``sparsity``, ``n``,
    ``macro_auroc``/``macro_ap``, ``per_class``, and the artifacts ``predictions.npz`` and
    ``sparsity.json`` (requested / achieved sparsity per layer and overall)."""
    mid = model_identity(model)
    keep = finetune_epochs > 0 and ratio > 0
    pruned = global_unstructured_prune(model, ratio, method, seed=seed or 0, keep_masks=keep)
    if keep:
        cfg = TrainConfig(epochs=finetune_epochs, lr=finetune_lr, seed=seed or 0, device=device,
                          batch_size=min(batch_size, 64))
        pruned = train(pruned, train_ds, None, config=cfg, progress=False, inplace=True).model
        remove_masks(pruned)
    rep = sparsity_report(pruned)
    achieved = rep["overall"]["sparsity"]
    n = rep["overall"]["numel"]
    if achieved + 1.0 / n < ratio:
        raise RunError(f"{OWNER}: model {mid} reached sparsity {achieved:.4f} but {ratio:.4f} was "
                       "requested; the pruning did not apply (please report this).")
    preds = predict(pruned, dataset, batch_size=batch_size, device=device, progress=False)
    meta = {k: v for k, v in preds.meta.items() if k != "seconds"}  # same bytes on every run
    preds = Predictions(preds.logits, preds.labels, preds.ids, preds.class_names, preds.task,
                        preds.split, model_id=mid,
                        meta={**meta, "sweep": {"method": method, "seed": seed, "ratio": ratio,
                                                "sparsity": achieved}})
    ev = evaluate(preds, n_boot=0)
    return {"model_id": mid, "sparsity": achieved, "n": preds.n,
            "macro_auroc": ev.macro.get("auroc"), "macro_ap": ev.macro.get("ap"),
            "per_class": {c.name: {"auroc": c.auroc, "ap": c.ap} for c in ev.classes},
            "artifacts": {PREDICTIONS: preds,
                          "sparsity.json": {"schema_version": 1, "model_id": mid,
                                            "method": method, "seed": seed, "requested": ratio,
                                            "finetune_epochs": finetune_epochs, **rep}}}


def _sweep_cell(models: dict[str, nn.Module], dataset, finetune_epochs: int,
                finetune_lr: float, train_ds, batch_size: int, device: str,
                cell: dict[str, Any]) -> dict[str, Any]:
    return prune_cell_result(models[cell["model_id"]], cell["method"], float(cell["ratio"]),
                             cell["seed"], dataset, finetune_epochs=finetune_epochs,
                             finetune_lr=finetune_lr, train_ds=train_ds, batch_size=batch_size,
                             device=device)


# ----------------------------------------------------------------------------- public API
def run_sweep(
    models: Sequence[str | os.PathLike | nn.Module] | str | os.PathLike | nn.Module,
    dataset,
    out_dir: str | os.PathLike,
    ratios: Sequence[float] | np.ndarray = DEFAULT_RATIOS,
    methods: Sequence[str] = ("l1", "random"),
    seeds: Sequence[int] = (0,),
    finetune_epochs: int = 0,
    train_ds=None,
    finetune_lr: float = 1e-4,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool | None = None,
) -> SweepResult:
    """Global unstructured pruning sweep: one :class:`Predictions` per (model, method, seed,
    ratio) cell on ``dataset``, resumable: a grid of ``prune`` cells on the one cell engine
    (:func:`medscalpel.cells.run_cells`), run in this process.

    Args:
        models: model directories or :class:`MedClassifier` objects (one or many; e.g. the
            same architecture trained with N seeds).
        dataset: the evaluation split (a ``CXRDataset`` preprocessed as the models expect).
        out_dir: the sweep directory (see the module docstring for the layout). Rerunning
            with the same directory skips finished cells; a different dataset, other models
            or other fine-tune settings are refused (:class:`~medscalpel.errors.RunError`).
        ratios: requested global sparsities in [0, 1) (default 0, 0.05, ..., 0.95).
        methods: ``l1`` (PruneCXR) and/or ``random`` (control).
        seeds: seeds for random masks and fine-tunes (``l1`` without fine-tune ignores them:
            its cells have seed None).
        finetune_epochs: optional fine-tune of each pruned model (masks kept; needs
            ``train_ds``).
        finetune_lr: learning rate of that fine-tune.

    Returns:
        A :class:`SweepResult` (its index is also written as ``out_dir/index.json``).
    """
    items = list(models) if isinstance(models, (list, tuple)) else [models]
    if not items:
        raise ConfigError(f"The 'models' parameter of {OWNER} must name at least one model.")
    ratios = [round(float(r), 6) for r in np.atleast_1d(np.asarray(ratios, dtype=float))]
    if not ratios:
        raise ConfigError(f"The 'ratios' parameter of {OWNER} must not be empty.")
    for r in ratios:
        check_range(r, "ratios", OWNER, 0.0, 1.0, high_inclusive=False)
    methods = list(methods)
    if not methods:
        raise ConfigError(f"The 'methods' parameter of {OWNER} must not be empty.")
    for m in methods:
        check_in(m, "methods", OWNER, METHODS)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError(f"The 'seeds' parameter of {OWNER} must not be empty.")
    check_range(finetune_epochs, "finetune_epochs", OWNER, 0, integer=True)
    if finetune_epochs and train_ds is None:
        raise ConfigError(f"{OWNER}: finetune_epochs={finetune_epochs} needs a 'train_ds'.")
    dataset.require_nonempty()

    loaded = [_load(it) for it in items]
    ids = [model_identity(m) for m in loaded]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"{OWNER}: model {dup!r} is given more than once.")
    identity = {"data": dataset.content_hash(), "split": dataset.split,
                "preprocess": dataset.preprocess.to_dict(), "models": sorted(ids),
                "finetune": {"epochs": finetune_epochs,
                             "lr": finetune_lr if finetune_epochs else None,
                             "train": train_ds.content_hash() if finetune_epochs else None}}
    config = {"ratios": ratios, "methods": methods, "seeds": seeds,
              "finetune_epochs": finetune_epochs, "finetune_lr": finetune_lr,
              "dataset": getattr(dataset, "spec", ""), "split": dataset.split, "n": len(dataset)}
    seeded = lambda m: m != "l1" or finetune_epochs > 0  # noqa: E731
    cells = [{"kind": "prune", "model_id": mid, "method": m, "seed": s, "ratio": r}
             for mid in ids for m in methods for s in (seeds if seeded(m) else [None])
             for r in ratios]
    fn = functools.partial(_sweep_cell, dict(zip(ids, loaded)), dataset, finetune_epochs,
                           finetune_lr, train_ds, batch_size, device)
    index = run_cells(cells, fn, out_dir, identity=identity, command="compress sweep",
                      config=config, progress=progress)
    return SweepResult(index)


__all__ = ["SweepCell", "SweepResult", "global_unstructured_prune", "model_identity",
           "prunable_weights", "prune_cell_result", "remove_masks", "run_sweep",
           "sparsity_report"]
