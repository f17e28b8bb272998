"""Unstructured sparsity sweeps (PruneCXR): global L1 magnitude pruning, with random pruning as
the control, over many models and sparsity ratios; one :class:`Predictions` per cell for the
audit stage (forgettability curves, FCD, PIEs).

Pruning uses ``torch.nn.utils.prune.global_unstructured`` over the weights of *all* Conv and
Linear layers, the classifier included (``L1Unstructured``, or ``RandomUnstructured`` seeded),
then ``prune.remove`` so that the weights are plain tensors with exact zeros. No fine-tune by
default (as in PruneCXR); with ``finetune_epochs > 0`` the masks are kept during the fine-tune
so that the sparsity stays exact.

Layout of ``out_dir`` (read by the audit stage)::

    out_dir/
      manifest.json                  RunDir manifest; identity = data hash + model ids (+ fine-tune)
      sweep.json                     the index (SweepResult.to_dict(): one entry per cell)
      cells/{model_id}/{variant}/r{ratio:.2f}/
          predictions.npz            engine.Predictions on the evaluated split
          sparsity.json              requested / achieved sparsity per layer and overall,
                                     macro AUROC/AP, model id, method, seed, data hash

``variant`` is the method name (``l1``) when the cell does not depend on a seed, and
``{method}-s{seed}`` otherwise (``random-s0``; every method once ``finetune_epochs > 0``).
A cell whose two files are present and consistent is skipped when the sweep is run again.

Example:
    >>> # doctest: +SKIP
    >>> res = run_sweep(["runs/m1/model", "runs/m2/model"], test_ds, "runs/sweep")
    >>> res.predictions("ab12...", "l1", 0.65)       # one cell's Predictions
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError, RunError
from medscalpel.progress import track
from medscalpel.runs import RunDir, dumps_json, hash_bytes, read_json, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

OWNER = "run_sweep"
METHODS = ("l1", "random")
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
INDEX = "sweep.json"
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
@dataclass
class SweepCell:
    """One (model, method, seed, ratio) cell of the sweep."""

    model_id: str
    method: str
    seed: int | None
    ratio: float
    path: str  # relative to the sweep directory
    sparsity: float
    macro_auroc: float
    macro_ap: float
    computed: bool = True  # False when found finished on disk and skipped

    @property
    def key(self) -> tuple[str, str, int | None, float]:
        return (self.model_id, self.method, self.seed, round(self.ratio, 4))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepCell":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class SweepResult:
    """Index of a sweep directory (also written as ``sweep.json``).

    Layout (for readers such as the audit stage): ``cells/{model_id}/{variant}/r{ratio:.2f}/``
    holds ``predictions.npz`` (:class:`~medscalpel.engine.predictions.Predictions`) and
    ``sparsity.json`` (``requested``, ``overall`` and per-``layers`` zeros / numel / sparsity,
    ``macro`` AUROC/AP, ``model_id``, ``method``, ``seed``, ``data_hash``). ``variant`` is the
    method (``l1``) or ``{method}-s{seed}`` when the cell depends on a seed (``random-s0``, and
    every method when fine-tuning). Use :meth:`load`, :meth:`predictions` and :meth:`curve`
    rather than building paths by hand.

    Attributes:
        out_dir: the sweep directory.
        cells: every finished cell (this run's and earlier runs').
        n_computed / n_skipped: cells computed by this call / found finished and skipped.
        identity: data hash and model ids (refused when a rerun differs).
    """

    out_dir: str
    cells: list[SweepCell]
    n_computed: int
    n_skipped: int
    identity: dict[str, Any]
    config: dict[str, Any]
    seconds: float = 0.0
    schema_version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "out_dir": self.out_dir,
                "identity": self.identity, "config": self.config,
                "n_cells": len(self.cells), "n_computed": self.n_computed,
                "n_skipped": self.n_skipped, "seconds": self.seconds,
                "model_ids": self.model_ids, "methods": self.methods,
                "cells": [c.to_dict() for c in self.cells]}

    @property
    def model_ids(self) -> list[str]:
        return sorted({c.model_id for c in self.cells})

    @property
    def methods(self) -> list[str]:
        return sorted({c.method for c in self.cells})

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "SweepResult":
        out_dir = Path(out_dir)
        d = read_json(out_dir / INDEX)
        return cls(out_dir=str(out_dir), cells=[SweepCell.from_dict(c) for c in d["cells"]],
                   n_computed=d.get("n_computed", 0), n_skipped=d.get("n_skipped", 0),
                   identity=d.get("identity", {}), config=d.get("config", {}),
                   seconds=d.get("seconds", 0.0))

    def save(self) -> Path:
        return write_json(Path(self.out_dir) / INDEX, self.to_dict())

    def select(self, model_id: str | None = None, method: str | None = None,
               seed: int | None = None) -> list[SweepCell]:
        """Cells matching the filters, sorted by (model, method, seed, ratio)."""
        out = [c for c in self.cells if (model_id is None or c.model_id == model_id)
               and (method is None or c.method == method) and (seed is None or c.seed == seed)]
        return sorted(out, key=lambda c: (c.model_id, c.method, -1 if c.seed is None else c.seed,
                                          c.ratio))

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
        return Predictions.load(Path(self.out_dir) / c.path / "predictions.npz")

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
    from medscalpel.models.checkpoint import load_model

    if isinstance(item, nn.Module):
        return item
    if isinstance(item, (str, os.PathLike)):
        return load_model(item)
    raise ConfigError(f"The 'models' parameter of {OWNER} must hold model directories or "
                      f"MedClassifier objects. Got {type(item).__name__} instead.")


def _variant(method: str, seed: int, finetune_epochs: int) -> str:
    if method == "l1" and finetune_epochs == 0:
        return "l1"
    return f"{method}-s{seed}"


def _cell_dir(model_id: str, variant: str, ratio: float) -> str:
    return f"cells/{model_id}/{variant}/r{ratio:.2f}"


def _read_finished(path: Path, model_id: str, method: str, seed: int | None, ratio: float,
                   data_hash: str, n: int) -> SweepCell | None:
    sp, pr = path / "sparsity.json", path / "predictions.npz"
    if not (sp.is_file() and pr.is_file()):
        return None
    try:
        info = read_json(sp)
        preds = Predictions.load(pr)
    except DataError:
        return None
    ok = (info.get("model_id") == model_id and info.get("method") == method
          and info.get("seed") == seed and abs(float(info.get("requested", -1)) - ratio) < 1e-9
          and info.get("data_hash") == data_hash and preds.n == n)
    if not ok:
        return None
    macro = info.get("macro", {})
    return SweepCell(model_id, method, seed, ratio, "", info["overall"]["sparsity"],
                     _f(macro.get("auroc")), _f(macro.get("ap")), computed=False)


def _f(v: Any) -> float:
    return float("nan") if v is None else float(v)


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
    ratio) cell on ``dataset``, resumable.

    Args:
        models: model directories or :class:`MedClassifier` objects (one or many; e.g. the
            same architecture trained with N seeds).
        dataset: the evaluation split (a ``CXRDataset`` preprocessed as the models expect).
        out_dir: the sweep directory (see :class:`SweepResult` for the layout). Rerunning
            with the same directory skips finished cells; a different dataset, other models
            or other fine-tune settings are refused (:class:`~medscalpel.errors.RunError`).
        ratios: requested global sparsities in [0, 1) (default 0, 0.05, ..., 0.95).
        methods: ``l1`` (PruneCXR) and/or ``random`` (control).
        seeds: seeds for random masks and fine-tunes (``l1`` without fine-tune ignores them).
        finetune_epochs: optional fine-tune of each pruned model (masks kept; needs
            ``train_ds``).
        finetune_lr: learning rate of that fine-tune.

    Returns:
        A :class:`SweepResult` (also written as ``out_dir/sweep.json``).
    """
    from medscalpel.engine.metrics import evaluate
    from medscalpel.engine.predict import predict

    t0 = time.perf_counter()
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
    data_hash = dataset.content_hash()
    identity = {"data": data_hash, "split": dataset.split,
                "preprocess": dataset.preprocess.to_dict(), "models": sorted(ids),
                "finetune": {"epochs": finetune_epochs,
                             "lr": finetune_lr if finetune_epochs else None,
                             "train": train_ds.content_hash() if finetune_epochs else None}}
    identity = json.loads(dumps_json(identity))  # as stored (tuples -> lists) for the resume check
    config = {"ratios": ratios, "methods": methods, "seeds": seeds,
              "finetune_epochs": finetune_epochs, "finetune_lr": finetune_lr,
              "dataset": getattr(dataset, "spec", ""), "split": dataset.split, "n": len(dataset)}

    out = Path(out_dir)
    old: dict[tuple, SweepCell] = {}
    if (out / INDEX).is_file():
        try:
            for c in SweepResult.load(out).cells:
                old[c.key] = c
        except (DataError, KeyError, TypeError):
            logger.warning("ignoring an unreadable %s in %s", INDEX, out)
    plan = [(mi, method, seed, r) for mi in range(len(loaded)) for method in methods
            for seed in (seeds if _variant(method, 0, finetune_epochs) != "l1" else [None])
            for r in ratios]
    n_computed = n_skipped = 0
    cells: dict[tuple, SweepCell] = {}
    with RunDir(out, command="compress sweep", config=config, data={"hash": data_hash},
                identity=identity, resume=True) as run:
        result = SweepResult(str(out), [], 0, 0, identity, config)
        for mi, method, seed, r in track(plan, "sweep", progress=progress):
            model, mid = loaded[mi], ids[mi]
            rel = _cell_dir(mid, _variant(method, seed or 0, finetune_epochs), r)
            cdir = run.path / rel
            done = _read_finished(cdir, mid, method, seed, r, data_hash, len(dataset))
            if done is not None:
                done.path = rel
                cells[done.key] = done
                n_skipped += 1
                continue
            cell = _compute_cell(model, mid, method, seed, r, dataset, cdir, rel, data_hash,
                                 finetune_epochs, finetune_lr, train_ds, batch_size, device,
                                 predict, evaluate)
            cells[cell.key] = cell
            n_computed += 1
            result.cells = _merge(old, cells)
            result.n_computed, result.n_skipped = n_computed, n_skipped
            result.save()
        result.cells = _merge(old, cells)
        result.n_computed, result.n_skipped = n_computed, n_skipped
        result.seconds = round(time.perf_counter() - t0, 3)
        result.save()
    return result


def _merge(old: dict[tuple, SweepCell], new: dict[tuple, SweepCell]) -> list[SweepCell]:
    merged = {**old, **new}
    return sorted(merged.values(), key=lambda c: (c.model_id, c.method,
                                                  -1 if c.seed is None else c.seed, c.ratio))


def _compute_cell(model, mid, method, seed, ratio, dataset, cdir: Path, rel: str, data_hash,
                  finetune_epochs, finetune_lr, train_ds, batch_size, device, predict,
                  evaluate) -> SweepCell:
    keep = finetune_epochs > 0 and ratio > 0
    pruned = global_unstructured_prune(model, ratio, method, seed=seed or 0, keep_masks=keep)
    if keep:
        from medscalpel.engine.train import TrainConfig, train

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
    preds = Predictions(preds.logits, preds.labels, preds.ids, preds.class_names, preds.task,
                        preds.split, model_id=mid,
                        meta={**preds.meta, "sweep": {"method": method, "seed": seed,
                                                      "ratio": ratio, "sparsity": achieved}})
    ev = evaluate(preds, n_boot=0)
    cdir.mkdir(parents=True, exist_ok=True)
    preds.save(cdir / "predictions.npz")
    write_json(cdir / "sparsity.json", {
        "schema_version": 1, "model_id": mid, "method": method, "seed": seed,
        "requested": ratio, "data_hash": data_hash, "finetune_epochs": finetune_epochs,
        "macro": {"auroc": ev.macro.get("auroc"), "ap": ev.macro.get("ap")}, **rep})
    return SweepCell(mid, method, seed, ratio, rel, achieved, _f(ev.macro.get("auroc")),
                     _f(ev.macro.get("ap")), computed=True)


__all__ = ["SweepCell", "SweepResult", "global_unstructured_prune", "model_identity",
           "prunable_weights", "remove_masks", "run_sweep", "sparsity_report"]
