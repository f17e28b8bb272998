"""CheXpert (``chexpert``): ``train.csv`` / ``valid.csv`` with a ``Path`` column.

Layout: the root is the folder holding ``train.csv`` and ``valid.csv`` (e.g.
``CheXpert-v1.0-small/``) or its parent. ``Path`` values such as
``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` start with the dataset
folder's own name, so they are resolved against that folder's parent (else against the folder);
a path may not leave the dataset folder.

Labels: the 14 observations of :data:`~medscalpel.data.labels.CHEXPERT_CLASSES`; ``1`` positive,
``0`` negative, blank -> 0 (not mentioned), ``-1`` (uncertain) by the ``uncertain`` policy:
``ignore`` -> NaN (unknown, masked by the loss and the metrics), ``zeros`` -> 0, ``ones`` -> 1.
Patient ids come from the ``patientNNNNN`` path component; the official files keep patients
apart, and ``dataset.meta["split_unit"]`` records it (see
:func:`~medscalpel.data.base.split_warning`).

Splits: ``train`` = train.csv, ``val`` = valid.csv (the official validation set), ``test`` =
``test.csv`` (or ``test_labels.csv``) when present (the official test labels are distributed
separately), ``all`` = every CSV present. ``frontal_only=true`` keeps frontal views.

Example:
    >>> ds = open_dataset("chexpert:/data/CheXpert-v1.0-small?uncertain=ones", split="val")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from medscalpel.data.base import CXRDataset, record_split_unit
from medscalpel.data.labels import (CHEXPERT_CLASSES, ImageFileDataset, binary_labels,
                                    check_common, csv_row, finish, read_table, require_dir,
                                    resolve_inside)
from medscalpel.data.spec import DATASETS
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import DataError
from medscalpel.validation import check_in

POLICIES = ("ignore", "zeros", "ones")
SPLIT_FILES = {"train": ("train.csv",), "val": ("valid.csv",), "test": ("test.csv", "test_labels.csv")}
_PATIENT = re.compile(r"(patient\d+)")


def find_chexpert_dir(root: Path) -> Path:
    """The folder holding train.csv / valid.csv: ``root`` or its single ``CheXpert*`` child."""
    if (root / "train.csv").is_file() or (root / "valid.csv").is_file():
        return root
    cands = sorted(p for p in root.glob("CheXpert*") if p.is_dir()
                   and ((p / "train.csv").is_file() or (p / "valid.csv").is_file()))
    if len(cands) == 1:
        return cands[0]
    if len(cands) > 1:
        raise DataError(f"Several CheXpert folders in {root}: {[c.name for c in cands]}. Point "
                        "the spec at the one to use.")
    raise DataError(f"No CheXpert label files in {root}: expected train.csv and valid.csv there or "
                    "in a CheXpert-v1.0*/ subfolder. Point the spec at the unpacked dataset.")


@DATASETS.register("chexpert", help="CheXpert (train.csv / valid.csv, uncertain-label policy)")
def open_chexpert(root: str | None, split: str = "train", preprocess: Preprocess | None = None,
                  uncertain: str = "ignore", frontal_only: bool = False,
                  skip_corrupt: bool = False) -> CXRDataset:
    """Open CheXpert (see the module docstring).

    Args:
        root: the CheXpert folder (or its parent).
        split: ``train``, ``val``, ``test`` or ``all``.
        uncertain: policy for ``-1`` labels: ``ignore`` (NaN), ``zeros`` or ``ones``.
        frontal_only: keep only frontal views (``Frontal/Lateral == Frontal``).
        skip_corrupt: drop missing/unreadable images (recorded in ``dataset.skip_report``).
    """
    check_common("chexpert", split)
    check_in(uncertain, "uncertain", "the 'chexpert' adapter", POLICIES)
    d = find_chexpert_dir(require_dir(root, "chexpert", "chexpert:/data/CheXpert-v1.0-small"))
    names = ("train", "val", "test") if split == "all" else (split,)
    frames = []
    for s in names:
        f = next((d / n for n in SPLIT_FILES[s] if (d / n).is_file()), None)
        if f is None:
            if split == "all":
                continue
            extra = (" CheXpert's test labels are distributed separately; put them there as "
                     "test.csv, or evaluate on split='val'." if s == "test" else "")
            raise DataError(f"The CheXpert '{s}' label file ({' or '.join(SPLIT_FILES[s])}) is "
                            f"missing in {d}.{extra}")
        frames.append(_read_one(f, d, uncertain, frontal_only))
    if not frames:
        raise DataError(f"No CheXpert label files in {d}.")
    df = pd.concat(frames, ignore_index=True)
    ds = ImageFileDataset("chexpert", df["__path"].tolist(), df["Path"].tolist(),
                          df[list(CHEXPERT_CLASSES)].to_numpy(np.float32), CHEXPERT_CLASSES,
                          "multilabel", df["__patient"].tolist(), preprocess, split,
                          meta={"uncertain": uncertain, "frontal_only": frontal_only,
                                "folder": str(d)})
    # the official files are patient-disjoint (train patients 1-64540, valid 64541-64740, test
    # after); the patient ids come from the path, so a row without one is flagged
    record_split_unit(ds, basis="official label files (patient-disjoint)", key=f"chexpert:{d}")
    return finish(ds, skip_corrupt)


def _read_one(f: Path, d: Path, uncertain: str, frontal_only: bool) -> pd.DataFrame:
    required = ("Path", *CHEXPERT_CLASSES) + (("Frontal/Lateral",) if frontal_only else ())
    df = read_table(f, required, what="CheXpert label file", dtype={"Path": str})
    lab = binary_labels(df, CHEXPERT_CLASSES, f, blank=0.0, allowed=(-1.0, 0.0, 1.0))
    lab[lab == -1] = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[uncertain]
    df[list(CHEXPERT_CLASSES)] = lab
    paths, patients = [], []
    for i, rel in enumerate(df["Path"].astype(str)):
        rel = rel.strip()
        first = Path(rel).parts[0] if Path(rel).parts else ""
        base = d.parent if first == d.name else d
        where = f"{f}, line {csv_row(i)}, column 'Path'"
        full = resolve_inside(base, rel, where)
        if base == d.parent and d.resolve() not in full.resolve().parents:
            raise DataError(f"{where}: image path {rel!r} leaves the dataset folder {d}.")
        paths.append(full)
        m = _PATIENT.search(rel)
        patients.append(m.group(1) if m else None)
    df["Path"] = df["Path"].astype(str).str.strip()
    df["__path"] = paths
    df["__patient"] = patients
    if frontal_only:
        df = df[df["Frontal/Lateral"].astype(str).str.strip().str.lower() == "frontal"]
    return df.reset_index(drop=True)
