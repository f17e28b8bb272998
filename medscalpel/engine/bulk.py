"""Bulk inference: many images through one model (a served ONNX Runtime / OpenVINO artifact or
a torch model) with flat memory.

The generic :func:`medscalpel.engine.predict.predict` loop decodes every image in the calling
process and keeps every batch's logits in a Python list. :func:`bulk_predict` instead

1. decodes and preprocesses images in ``workers`` worker processes (a torch ``DataLoader``)
   that run ahead of the model by at most ``workers * prefetch`` batches (a bounded queue), so
   decoding overlaps inference;
2. hands the model whole batches of ``batch_size`` images (the last one may be smaller) with the
   thread count set (``threads``: torch's intra-op threads for a torch model; a served runtime
   takes its threads when it is loaded, ``load_any(path, threads)``, and that number is
   recorded);
3. streams the logits to disk as they come (an ``.npy`` memory map in a temporary folder,
   flushed every ``chunk`` images) and reads them back once at the end, so what the process
   holds does not grow with the number of images (the logits themselves, ``N x K`` float32,
   are the only thing proportional to N);
4. returns the same :class:`~medscalpel.engine.predictions.Predictions` as ``predict``, with
   ``meta["bulk"]`` saying how it ran (batch size, workers, threads, images/s).

A served runtime model is recognised by its attributes (``supports_gradients`` False, a
``provenance()``), never by importing :mod:`medscalpel.compress` (engine sits below compress).

Example:
    >>> from medscalpel.data import Preprocess, open_dataset
    >>> from medscalpel.models import create_model, make_card
    >>> ds = open_dataset("phantom?n=12&size=32", split="all", preprocess=Preprocess(size=32))
    >>> m = create_model("densenet_tiny", ds.num_classes, 1, 32)
    >>> m.card = make_card(m, ds.class_names, ds.task, ds.preprocess)
    >>> p = bulk_predict(m, ds, batch_size=5, workers=0)
    >>> p.logits.shape, p.meta["bulk"]["batches"]
    ((12, 14), 3)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medscalpel.data.base import CXRDataset
from medscalpel.engine.predict import _model_id, check_compatible
from medscalpel.engine.predictions import Predictions
from medscalpel.progress import track
from medscalpel.validation import check_range

OWNER = "bulk_predict"
#: images between two flushes of the streamed logits
DEFAULT_CHUNK = 1024
#: batches each decoding worker may hold ready ahead of the model
DEFAULT_PREFETCH = 2


def default_workers() -> int:
    """Decoding processes when none are asked for: half the CPUs, 1 to 4 (the runtime keeps
    the other half)."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def is_runtime_model(model: Any) -> bool:
    """Whether ``model`` is a served runtime artifact (no gradients, names its artifact)."""
    return getattr(model, "supports_gradients", True) is False and callable(
        getattr(model, "provenance", None))


@dataclass(frozen=True)
class BulkSettings:
    """How :func:`bulk_predict` runs. ``workers=None``: :func:`default_workers`; 0 decodes in
    this process. ``threads=None``: leave the model's threads as they are."""

    batch_size: int = 64
    workers: int | None = None
    threads: int | None = None
    chunk: int = DEFAULT_CHUNK
    prefetch: int = DEFAULT_PREFETCH

    def validate(self) -> "BulkSettings":
        check_range(self.batch_size, "batch_size", OWNER, 1, 2**16, integer=True)
        if self.workers is not None:
            check_range(self.workers, "workers", OWNER, 0, 256, integer=True)
        if self.threads is not None:
            check_range(self.threads, "threads", OWNER, 1, 1024, integer=True)
        check_range(self.chunk, "chunk", OWNER, 1, 2**24, integer=True)
        check_range(self.prefetch, "prefetch", OWNER, 1, 64, integer=True)
        return self

    @property
    def n_workers(self) -> int:
        return default_workers() if self.workers is None else int(self.workers)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "workers": self.n_workers,
                "threads": self.threads, "chunk": self.chunk, "prefetch": self.prefetch}


def bulk_predict(model: Any, dataset: CXRDataset, batch_size: int = 64,
                 workers: int | None = None, threads: int | None = None,
                 chunk: int = DEFAULT_CHUNK, progress: bool | None = None,
                 workdir: str | os.PathLike | None = None) -> Predictions:
    """Logits of ``model`` on every image of ``dataset`` (see the module docstring): batched,
    decoded ahead in worker processes, streamed to disk; the same :class:`Predictions` as
    :func:`~medscalpel.engine.predict.predict` (bit-identical logits for a deterministic model
    at the same batch size), plus ``meta["bulk"]``.

    Args:
        model: a torch :class:`~medscalpel.models.classifier.MedClassifier` or a served
            runtime model (:func:`medscalpel.deploy.served.load_any`).
        batch_size: images the model gets per call (whole batches; the last may be smaller).
        workers: decoding processes (``None``: :func:`default_workers`; 0: none).
        threads: torch intra-op threads for a torch model (restored afterwards); a served
            runtime's threads are fixed when it is loaded and only recorded here.
        chunk: images between flushes of the streamed logits.
        workdir: folder for the streamed logits (default: a temporary folder, removed).
    """
    cfg = BulkSettings(batch_size, workers, threads, chunk).validate()
    check_compatible(model, dataset)
    dataset.require_nonempty()
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="medscalpel-bulk-", dir=workdir))
    try:
        logits, stats = _stream(model, dataset, cfg, tmp / "logits.npy", progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    served = is_runtime_model(model)
    bulk = {**cfg.to_dict(), **stats, "seconds": round(seconds, 3),
            "images_per_s": round(len(dataset) / seconds, 3) if seconds > 0 else None,
            "model": _model_label(model) if served else "torch eager",
            "threads_note": ("the served runtime's threads are set when it is loaded "
                             "(load_any(path, threads))") if served else
                            "torch intra-op threads during the run"}
    if served and threads is None:
        bulk["threads"] = None
    return Predictions(logits=logits, labels=dataset.labels, ids=tuple(dataset.ids),
                       class_names=tuple(dataset.class_names), task=dataset.task,
                       split=dataset.split, model_id=_model_id(model),
                       meta={"dataset": dataset.spec, "dataset_hash": dataset.content_hash(),
                             "seconds": round(seconds, 3), "bulk": bulk})


def _model_label(model: Any) -> str:
    """``served onnxruntime:fp32`` from a served model's provenance."""
    prov = model.provenance() or {}
    return f"served {prov.get('runtime', '?')}:{prov.get('precision', '?')}"


def _loader(dataset: CXRDataset, cfg: BulkSettings) -> DataLoader:
    """Whole batches in order, decoded by ``cfg.n_workers`` processes at most ``prefetch``
    batches ahead each (the bounded queue that keeps memory flat)."""
    n = cfg.n_workers
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=n,
                      prefetch_factor=cfg.prefetch if n > 0 else None,
                      persistent_workers=False, drop_last=False)


@torch.inference_mode()
def _stream(model: Any, dataset: CXRDataset, cfg: BulkSettings, path: Path,
            progress: bool | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Run every batch and write its logits into an ``.npy`` memory map at ``path``; the
    logits read back from disk and the run's counters."""
    n, k = len(dataset), int(model.num_classes)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, k))
    served = is_runtime_model(model)
    old_threads = torch.get_num_threads()
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    if cfg.threads is not None and not served:
        torch.set_num_threads(cfg.threads)
    done, flushed, batches, model_s = 0, 0, 0, 0.0
    try:
        loader = _loader(dataset, cfg)
        total = (n + cfg.batch_size - 1) // cfg.batch_size
        for x, _ in track(loader, f"predict {dataset.split} (bulk)", total=total,
                          progress=progress):
            t = time.perf_counter()
            y = model(x)
            model_s += time.perf_counter() - t
            y = y.float().cpu().numpy()
            out[done:done + len(y)] = y
            done += len(y)
            batches += 1
            if done - flushed >= cfg.chunk:
                out.flush()
                flushed = done
        out.flush()
    finally:
        torch.set_num_threads(old_threads)
        if hasattr(model, "train"):
            model.train(was_training)
    if done != n:  # pragma: no cover - a DataLoader that lost batches
        raise RuntimeError(f"{OWNER}: {done} of {n} images predicted")
    del out
    logits = np.array(np.load(path, mmap_mode="r"), dtype=np.float32)
    return logits, {"batches": batches, "model_seconds": round(model_s, 3),
                    "streamed_to": "npy memory map, flushed every chunk"}


__all__ = ["BulkSettings", "bulk_predict", "default_workers", "is_runtime_model"]
