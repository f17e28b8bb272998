"""The dataset interface every adapter gives.

An adapter turns an on-disk layout into a :class:`CXRDataset`: a torch ``Dataset`` of
``(image [C,H,W] float tensor, target)`` pairs plus the tables every later stage reads:
image ids, patient ids (when known), class names, the task type and the label matrix.

Labels:
    * multi-label: ``labels`` is float32 ``[N, K]`` of 0/1, ``NaN`` where a label is unknown
      (e.g. CheXpert's uncertain label under the ``ignore`` policy);
    * multi-class (binary included): ``labels`` is int64 ``[N]`` of class indices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from medscalpel.data.transforms import Preprocess
from medscalpel.errors import DataError
from medscalpel.runs import hash_array, hash_strings

logger = logging.getLogger(__name__)

Task = Literal["multilabel", "multiclass"]
TASKS = ("multilabel", "multiclass")


@dataclass
class SkipReport:
    """Files that could not be read and were skipped (``skip_corrupt=True``)."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "files": [{"id": i, "reason": r} for i, r in self.skipped]}


class CXRDataset(Dataset):
    """Base class of every dataset adapter.

    Subclasses fill the tables in ``__init__`` (through :meth:`_set_tables`) and implement
    :meth:`load_raw` returning one image as a 2-D ``uint8`` or float array in ``[0, 1]``
    (grey), or an ``[H, W, 3]`` array only for genuinely colour data (histopathology).

    Args:
        preprocess: how raw images become model input (size, channels, normalisation,
            augmentation). ``None`` uses :class:`Preprocess` defaults.
    """

    name: str = "base"

    def __init__(self, preprocess: Preprocess | None = None, spec: str = "", split: str = "all"):
        self.preprocess = preprocess or Preprocess()
        self.spec = spec
        self.split = split
        self.skip_report = SkipReport()
        self.ids: list[str] = []
        self.patient_ids: list[str | None] = []
        self.class_names: list[str] = []
        self.task: Task = "multilabel"
        self.labels: np.ndarray = np.zeros((0, 0), np.float32)
        self.meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ tables
    def _set_tables(
        self,
        ids: Sequence[str],
        labels: np.ndarray,
        class_names: Sequence[str],
        task: Task,
        patient_ids: Sequence[str | None] | None = None,
    ) -> None:
        if task not in TASKS:
            raise DataError(f"Unknown task type {task!r}; use one of {TASKS}.")
        ids = [str(i) for i in ids]
        labels = np.asarray(labels)
        if task == "multilabel":
            labels = labels.astype(np.float32, copy=False)
            if labels.ndim != 2 or labels.shape[1] != len(class_names):
                raise DataError(
                    f"{self.spec or self.name}: label matrix has shape {labels.shape}, expected "
                    f"[{len(ids)}, {len(class_names)}] for classes {list(class_names)}."
                )
        else:
            labels = labels.astype(np.int64, copy=False)
            if labels.ndim != 1:
                raise DataError(f"{self.spec or self.name}: multi-class labels must be 1-D.")
            if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
                raise DataError(f"{self.spec or self.name}: class index out of range.")
        if len(labels) != len(ids):
            raise DataError(f"{self.spec or self.name}: {len(ids)} ids but {len(labels)} labels.")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"{self.spec or self.name}: image id {dup!r} appears more than once.")
        self.ids = ids
        self.labels = labels
        self.class_names = [str(c) for c in class_names]
        self.task = task
        self.patient_ids = list(patient_ids) if patient_ids is not None else [None] * len(ids)

    def require_nonempty(self) -> "CXRDataset":
        if len(self) == 0:
            raise DataError(
                f"The '{self.split}' split of {self.spec or self.name} is empty: check the split "
                "lists / filters (e.g. view position) or choose another split."
            )
        return self

    # ------------------------------------------------------------------ torch protocol
    def __len__(self) -> int:
        return len(self.ids)

    def load_raw(self, index: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def image(self, index: int) -> torch.Tensor:
        """The preprocessed image tensor ``[C, H, W]`` of one item."""
        return self.preprocess(self.load_raw(index))

    def target(self, index: int) -> torch.Tensor:
        if self.task == "multilabel":
            return torch.from_numpy(self.labels[index].copy())
        return torch.tensor(int(self.labels[index]), dtype=torch.long)

    def __getitem__(self, index: int):
        return self.image(index), self.target(index)

    # ------------------------------------------------------------------ helpers
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def labels_multihot(self) -> np.ndarray:
        """Labels as a float ``[N, K]`` matrix for both task types (one-hot for multi-class)."""
        if self.task == "multilabel":
            return self.labels
        out = np.zeros((len(self.labels), self.num_classes), np.float32)
        out[np.arange(len(self.labels)), self.labels] = 1.0
        return out

    def subset(self, indices: Sequence[int], split: str | None = None) -> "SubsetDataset":
        return SubsetDataset(self, indices, split=split)

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "adapter": self.name,
            "split": self.split,
            "n_images": len(self),
            "task": self.task,
            "class_names": self.class_names,
            "preprocess": self.preprocess.to_dict(),
            "skipped": self.skip_report.to_dict(),
            # bit depths / unreadable / tiny files found by medscalpel.data.scan (when scanned)
            "pixels": self.meta.get("pixels"),
        }

    def content_hash(self) -> str:
        """A hash of ids, labels and class names: detects a changed dataset between runs."""

        return hash_strings([hash_strings(self.ids), hash_array(np.nan_to_num(self.labels, nan=-1)),
                             hash_strings(self.class_names), self.task])


class SubsetDataset(CXRDataset):
    """A view on some rows of a parent dataset (splits, de-duplication, patient carving)."""

    def __init__(self, parent: CXRDataset, indices: Sequence[int], split: str | None = None):
        super().__init__(parent.preprocess, spec=parent.spec, split=split or parent.split)
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name = parent.name
        self.meta = dict(parent.meta)
        pids = [parent.patient_ids[i] for i in self.indices]
        self._set_tables([parent.ids[i] for i in self.indices], parent.labels[self.indices],
                         parent.class_names, parent.task, pids)
        self.skip_report = parent.skip_report

    def load_raw(self, index: int) -> np.ndarray:
        return self.parent.load_raw(int(self.indices[index]))

    def with_preprocess(self, preprocess: Preprocess) -> "SubsetDataset":
        out = SubsetDataset(self.parent, self.indices, self.split)
        out.preprocess = preprocess
        return out


class ArrayDataset(CXRDataset):
    """Images held in memory (MedMNIST arrays, the phantom, tests)."""

    name = "array"

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        task: Task,
        ids: Sequence[str] | None = None,
        patient_ids: Sequence[str | None] | None = None,
        preprocess: Preprocess | None = None,
        spec: str = "array",
        split: str = "all",
    ):
        super().__init__(preprocess, spec=spec, split=split)
        if images.ndim not in (3, 4):
            raise DataError(f"{spec}: images must be [N,H,W] or [N,H,W,C]; got {images.shape}.")
        self.images = images
        ids = ids if ids is not None else [f"img{i:06d}" for i in range(len(images))]
        self._set_tables(ids, labels, class_names, task, patient_ids)

    def load_raw(self, index: int) -> np.ndarray:
        return self.images[index]


def split_by_patient(
    patient_ids: Sequence[str | None], fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (rest, held) so that no patient is in both; ``fraction`` of
    patients (not images) go to ``held``. Rows without a patient id count as their own patient."""
    pids = [p if p is not None else f"__row{i}" for i, p in enumerate(patient_ids)]
    uniq = sorted(set(pids))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    n_held = int(round(len(uniq) * fraction))
    held_set = set(uniq[:n_held])
    held = np.array([i for i, p in enumerate(pids) if p in held_set], dtype=np.int64)
    rest = np.array([i for i, p in enumerate(pids) if p not in held_set], dtype=np.int64)
    return rest, held




# ----------------------------------------------------------------------------- split unit
#: what kept train/val/test apart: whole patients, single images, or both (some rows had no
#: patient id and were split as single images)
SPLIT_UNITS = ("patient", "image", "mixed")
_WARNED: set[tuple[str, str]] = set()


def split_unit_info(patient_ids: Sequence[str | None], basis: str = "") -> dict[str, Any]:
    """How a split of these rows separates them: ``{"unit", "n_images", "n_with_patient",
    "n_without_patient", "n_patients", "basis"}``.

    ``unit`` is ``patient`` when every row has a patient id, ``image`` when none has, and
    ``mixed`` otherwise (the rows without one are split as single images, which can leak a
    patient across splits).
    """
    known = [p for p in patient_ids if p is not None and str(p) != ""]
    n, k = len(patient_ids), len(known)
    unit = "patient" if n and k == n else ("image" if k == 0 else "mixed")
    return {"unit": unit, "n_images": n, "n_with_patient": k, "n_without_patient": n - k,
            "n_patients": len(set(known)), "basis": basis}


def record_split_unit(ds: "CXRDataset", patient_ids: Sequence[str | None] | None = None,
                      basis: str = "", key: str | None = None) -> dict[str, Any]:
    """Store :func:`split_unit_info` in ``ds.meta["split_unit"]`` and warn ONCE per ``key``
    (default: the dataset's spec) when the split is not patient-wise.

    Args:
        patient_ids: the rows the split was drawn from (default: the dataset's own rows).
        basis: how the split was made, e.g. ``"official split files"``.
    """
    info = split_unit_info(ds.patient_ids if patient_ids is None else patient_ids, basis)
    ds.meta["split_unit"] = info
    msg = split_warning(ds)
    warn_key = (str(key or ds.spec or ds.name), info["unit"])
    if msg and warn_key not in _WARNED:
        _WARNED.add(warn_key)
        logger.warning("%s", msg)
    return info


def split_warning(obj: Any) -> str | None:
    """A one-line warning when the train/val/test split of ``obj`` was not patient-wise, else
    ``None``.

    Args:
        obj: a :class:`CXRDataset`, a :class:`~medscalpel.engine.predictions.Predictions` (its
            ``meta["split_unit"]``, set by :func:`medscalpel.engine.api.predict_spec`) or a
            ``meta`` / ``split_unit`` dict.

    Returns ``None`` for split ``all`` (nothing was split) and when the split unit is unknown.
    """
    meta = obj if isinstance(obj, dict) else getattr(obj, "meta", None) or {}
    info = meta.get("split_unit", meta if "unit" in meta else None)
    split = getattr(obj, "split", None) or meta.get("split")
    if not info or split == "all":
        return None
    if info["unit"] == "image":
        return (f"split by IMAGE: no patient id for any of the {info['n_images']} images, so one "
                "patient's images can sit in train and test (test numbers may be optimistic)")
    if info["unit"] == "mixed":
        return (f"split partly by image: {info['n_without_patient']} of {info['n_images']} "
                "images have no patient id and were split one image at a time (a patient can "
                "sit in train and test)")
    return None
