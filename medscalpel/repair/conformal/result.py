"""The certified thresholds as results: one :class:`ClassGuarantee` per class (or one for the
whole label set) and the :class:`GuaranteeResult` that holds them, saved as ``guarantee.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.errors import DataError
from medscalpel.layout import artifact, write_artifact_at
from medscalpel.repair.conformal.spec import _sigmoid
from medscalpel.runs import read_json, write_json

SCHEMA = 1
FILENAME = artifact("guarantee").filename


@dataclass(frozen=True)
class ClassGuarantee:
    """The certified threshold of one class (or of the whole label set, for ``fnr``).

    Attributes:
        name: the class name (``all classes`` for the set FNR).
        kind, target, alpha: what was asked (``alpha`` None for in-expectation kinds).
        certified: whether the guarantee could be given; ``reason`` says why not.
        threshold_logit, threshold_prob: the decision rule ``logit >= threshold_logit``
            (None when not certified).
        n_images, n_positives, n_patients, n_patients_positive: calibration data of this row
            (patients None when unknown).
        min_positives: the fewest positives for which the guarantee is certifiable at all.
        guarantee: the wording, e.g. ``recall >= 0.90 with 90% confidence``.
        calibration: what the threshold does on the calibration data (misses, recall,
            flagged share, precision, and the bound or p-value behind the certificate).
    """

    name: str
    kind: str
    target: float
    alpha: float | None
    certified: bool
    threshold_logit: float | None
    threshold_prob: float | None
    n_images: int
    n_positives: int
    n_patients: int | None
    n_patients_positive: int | None
    min_positives: int
    guarantee: str
    reason: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassGuarantee":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class GuaranteeResult:
    """Certified thresholds of every class for one guarantee, with their calibration data."""

    spec: str
    kind: str
    target: float
    alpha: float | None
    class_names: tuple[str, ...]
    classes: tuple[ClassGuarantee, ...]
    n_images: int
    n_patients: int | None
    split: str = ""
    model_id: str = ""
    notes: tuple[str, ...] = ()
    #: the fixed logit grid the precision test ran over, highest first (precision only; empty
    #: for the other kinds and for results stored before it was recorded)
    grid: tuple[float, ...] = ()
    schema_version: int = SCHEMA

    @property
    def shared(self) -> bool:
        """True for the set FNR: one threshold for every class."""
        return self.kind == "fnr"

    def thresholds_logit(self, fill: float = float("nan")) -> np.ndarray:
        """``[K]`` logit thresholds (``fill`` where not certified)."""
        if self.shared:
            t = self.classes[0].threshold_logit
            return np.full(len(self.class_names), fill if t is None else t, float)
        return np.array([fill if c.threshold_logit is None else c.threshold_logit
                         for c in self.classes], float)

    def thresholds_prob(self, fill: float = float("nan")) -> np.ndarray:
        z = self.thresholds_logit(np.nan)
        out = np.array([fill if not np.isfinite(v) else _sigmoid(v) for v in z], float)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "kind_of_result": "guarantee",
                "spec": self.spec, "kind": self.kind, "target": self.target,
                "alpha": self.alpha, "class_names": list(self.class_names),
                "classes": [c.to_dict() for c in self.classes], "n_images": self.n_images,
                "n_patients": self.n_patients, "split": self.split, "model_id": self.model_id,
                "notes": list(self.notes), **({"grid": list(self.grid)} if self.grid else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GuaranteeResult":
        if d.get("schema_version") != SCHEMA or d.get("kind_of_result") != "guarantee":
            raise DataError(f"Not a guarantee result of schema {SCHEMA}: schema_version="
                            f"{d.get('schema_version')!r}, kind_of_result="
                            f"{d.get('kind_of_result')!r}.")
        return cls(spec=d["spec"], kind=d["kind"], target=float(d["target"]),
                   alpha=None if d["alpha"] is None else float(d["alpha"]),
                   class_names=tuple(d["class_names"]),
                   classes=tuple(ClassGuarantee.from_dict(c) for c in d["classes"]),
                   n_images=int(d["n_images"]), n_patients=d["n_patients"],
                   split=d.get("split", ""), model_id=d.get("model_id", ""),
                   notes=tuple(d.get("notes", ())),
                   grid=tuple(float(v) for v in d.get("grid") or ()))

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` when it names a ``.json`` file, else as the declared
        ``guarantee`` artifact's file name inside the folder ``path``."""
        path = Path(path)
        if path.suffix != ".json":
            return write_artifact_at(path, "guarantee", self)
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GuaranteeResult":
        path = Path(path)
        return cls.from_dict(read_json(path / FILENAME if path.is_dir() else path))

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for c in self.classes:
            cal = c.calibration
            rows.append({"class": c.name, "certified": "yes" if c.certified else "NO",
                         "thr (prob)": c.threshold_prob, "thr (logit)": c.threshold_logit,
                         "positives": c.n_positives, "min": c.min_positives,
                         "cal rate": cal.get("rate"), "flagged": cal.get("flagged_share"),
                         "guarantee / reason": c.guarantee if c.certified else c.reason})
        return rows

