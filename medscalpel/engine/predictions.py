"""The ``Predictions`` artifact: the currency that links every stage.

Computed once per (model, dataset split) and reused by audits, calibration, triage and reports.
Saved as one ``.npz`` (arrays only, read with ``allow_pickle=False``) whose ``meta`` entry is JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.errors import DataError
from medscalpel.layout import artifact
from medscalpel.runs import atomic_path, dumps_json

SCHEMA = 1


@dataclass(frozen=True)
class Predictions:
    """Model outputs on one dataset split.

    Attributes:
        logits: float32 ``[N, K]``.
        labels: multi-label float32 ``[N, K]`` (0/1, NaN = unknown) or multi-class int64 ``[N]``.
        ids: image ids (length N).
        class_names: K names.
        task: ``multilabel`` or ``multiclass``.
        split: the split name.
        model_id: the model's id (weights hash) or a free-form name for imported predictions.
        meta: anything else (dataset spec and hash, thresholds used, timing).
    """

    logits: np.ndarray
    labels: np.ndarray
    ids: tuple[str, ...]
    class_names: tuple[str, ...]
    task: str
    split: str = "test"
    model_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        logits = np.asarray(self.logits, dtype=np.float32)
        if logits.ndim != 2 or logits.shape[1] != len(self.class_names):
            raise DataError(f"Predictions: logits of shape {logits.shape} do not fit "
                            f"{len(self.class_names)} classes.")
        if logits.shape[0] != len(self.ids):
            raise DataError(f"Predictions: {logits.shape[0]} rows of logits but {len(self.ids)} ids.")
        nan = np.isnan(logits)
        if nan.any():
            i, j = (int(v) for v in np.argwhere(nan)[0])
            raise DataError(
                f"Predictions: {int(nan.sum())} of {logits.size} logits are NaN (first: image "
                f"{self.ids[i]!r}, class {self.class_names[j]!r}); no metric, threshold or "
                "report can be computed from them. A NaN logit means the model diverged or the "
                "file was damaged: predict again with a model whose outputs are finite.")
        labels = np.asarray(self.labels)
        if self.task == "multilabel":
            labels = labels.astype(np.float32)
            if labels.shape != logits.shape:
                raise DataError(f"Predictions: labels {labels.shape} vs logits {logits.shape}.")
        elif self.task == "multiclass":
            labels = labels.astype(np.int64)
            if labels.shape != (logits.shape[0],):
                raise DataError(f"Predictions: multi-class labels must be [N]; got {labels.shape}.")
        else:
            raise DataError(f"Predictions: unknown task {self.task!r}.")
        object.__setattr__(self, "logits", logits)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))

    # ------------------------------------------------------------------ views
    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def probs(self) -> np.ndarray:
        """Sigmoid (multi-label) or softmax (multi-class) probabilities."""
        z = self.logits.astype(np.float64)
        if self.task == "multilabel":
            return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(1, keepdims=True)).astype(np.float32)

    def targets(self) -> np.ndarray:
        """Labels as float ``[N, K]`` (one-hot for multi-class), NaN where unknown."""
        if self.task == "multilabel":
            return self.labels
        out = np.zeros_like(self.logits)
        out[np.arange(self.n), self.labels] = 1.0
        return out

    def known_labels(self) -> np.ndarray:
        """Boolean ``[N, K]``: where a label is known (multi-class: a row with a class index
        ``>= 0`` is known in every column)."""
        if self.task == "multilabel":
            return np.isfinite(self.labels)
        return np.repeat((self.labels >= 0)[:, None], self.num_classes, axis=1)

    def require_labels(self, purpose: str, source: str = "") -> "Predictions":
        """``self``, or :class:`DataError` when not one image has a known label (predictions
        of unlabelled images, or labels that are all NaN): ``purpose`` (e.g. ``"fitting
        thresholds"``) needs labels. ``source`` names the file in the message."""
        if self.n and self.known_labels().any():
            return self
        where = f"{source}: " if source else ""
        raise DataError(
            f"{where}the predictions of {self.n} image(s) carry no known label (every label is "
            f"unknown / NaN); {purpose} needs labelled predictions. Predict a labelled dataset "
            "spec (e.g. 'csv:labels.csv' with 0/1 columns), not bare image files.")

    def select(self, rows: np.ndarray | list[int]) -> "Predictions":
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return replace(self, logits=self.logits[rows], labels=self.labels[rows],
                       ids=tuple(self.ids[i] for i in rows))

    def align(self, other: "Predictions") -> tuple["Predictions", "Predictions"]:
        """Both restricted to their common ids, in ``self``'s order."""
        pos = {i: k for k, i in enumerate(other.ids)}
        rows_self = [k for k, i in enumerate(self.ids) if i in pos]
        if not rows_self:
            raise DataError("The two Predictions share no image id.")
        rows_other = [pos[self.ids[k]] for k in rows_self]
        if self.class_names != other.class_names:
            raise DataError(f"Predictions have different classes: {self.class_names[:3]}... vs "
                            f"{other.class_names[:3]}...")
        return self.select(rows_self), other.select(rows_other)

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        """Summary (not the arrays) for JSON output."""
        return {"n": self.n, "class_names": list(self.class_names), "task": self.task,
                "split": self.split, "model_id": self.model_id, "meta": self.meta}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        meta = {"schema_version": SCHEMA, "ids": list(self.ids), "class_names": list(self.class_names),
                "task": self.task, "split": self.split, "model_id": self.model_id,
                "meta": self.meta}

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, logits=self.logits, labels=self.labels,
                                    meta=np.frombuffer(dumps_json(meta).encode(), dtype=np.uint8))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Predictions":
        path = Path(path)
        if path.is_dir():
            path = path / artifact("predictions_file").filename
        if not path.is_file():
            raise DataError(f"Predictions file not found: {path}.")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                logits, labels = z["logits"], z["labels"]
            return cls(logits=logits, labels=labels, ids=tuple(meta["ids"]),
                       class_names=tuple(meta["class_names"]), task=meta["task"],
                       split=meta.get("split", ""), model_id=meta.get("model_id", ""),
                       meta=meta.get("meta", {}))
        except DataError as exc:
            msg = str(exc)
            if msg.startswith("Predictions: "):  # name the file the bad content came from
                raise DataError(f"{path}: {msg[len('Predictions: '):]}") from None
            raise
        except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path} is not a medscalpel Predictions file: {exc}.") from exc
