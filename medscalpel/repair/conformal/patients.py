"""Images and patients: patient ids of the calibration images, one image per patient
(:func:`one_per_group`) and the patient-wise calibration / held-out split
(:func:`patient_split`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medscalpel.data.base import split_by_patient
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import DataError
from medscalpel.validation import check_range


def _pids(patient_ids, n) -> list[str | None] | None:
    if patient_ids is None:
        return None
    pids = [None if p is None or str(p) == "" else str(p) for p in patient_ids]
    if len(pids) != n:
        raise DataError(f"patient_ids: {len(pids)} ids for {n} predictions; give one per "
                        "image, in the Predictions' order.")
    return pids


def _n_patients(pids, rows) -> int | None:
    if pids is None:
        return None
    return len({pids[i] if pids[i] is not None else f"__row{i}" for i in rows})



def one_per_group(rows: np.ndarray, groups: Sequence[str | None], seed: Any = 0
                  ) -> np.ndarray:
    """One uniformly random row of ``rows`` per group (``groups[row]``; None: the row is its own
    group), drawn with ``seed``; returned in increasing order.

    Example:
        >>> one_per_group(np.arange(5), ["a", "a", None, "b", "b"], seed=0).size
        3
    """
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return rows
    order = np.random.default_rng(seed).permutation(rows.size)
    keys = np.array([f"r{r}" if groups[r] is None else f"g{groups[r]}" for r in rows[order]])
    _, first = np.unique(keys, return_index=True)
    return np.sort(rows[order][first])


@dataclass(frozen=True)
class PatientSplit:
    """Rows of a calibration part and a held-out part, kept apart by patient."""

    calibration: np.ndarray
    held_out: np.ndarray
    unit: str  # patient / image / mixed
    n_patients: tuple[int | None, int | None]


def patient_split(n_or_preds: int | Predictions, patient_ids: Sequence[str | None] | None,
                  held_out: float = 0.5, seed: int = 0) -> PatientSplit:
    """Split rows into calibration and held-out by PATIENT (``held_out`` of the patients go to
    the held-out part) with :func:`medscalpel.data.base.split_by_patient`; rows without a
    patient id (or all rows, when ``patient_ids`` is None) are their own patient, and ``unit``
    says so (``image`` / ``mixed``)."""
    n = n_or_preds.n if isinstance(n_or_preds, Predictions) else int(n_or_preds)
    check_range(held_out, "held_out", "patient_split", 0.0, 1.0, low_inclusive=False,
                high_inclusive=False)
    pids = _pids(patient_ids, n) if patient_ids is not None else [None] * n
    cal, held = split_by_patient(pids, held_out, seed)
    known = sum(p is not None for p in pids)
    unit = "patient" if known == n and n else ("image" if known == 0 else "mixed")
    if patient_ids is None:
        return PatientSplit(cal, held, unit, (None, None))
    return PatientSplit(cal, held, unit, (_n_patients(pids, cal), _n_patients(pids, held)))
