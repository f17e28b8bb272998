"""NIH-CXR-LT (``nih-lt``): the 20-class long-tailed relabelling of NIH ChestX-ray14.

Layout: the NIH images (``images/`` or ``images_0XX/images/``, as for :mod:`.nih`) under the
root, and one label CSV per split, named ``*nih-cxr-lt_labels_{split}.csv`` (e.g.
``miccai2023_nih-cxr-lt_labels_train.csv``), in the root, in ``root/labels`` or in
``labels_dir``. Each CSV has an ``id`` column (the NIH image file name), optionally ``subj_id``
(patient), and one 0/1 column per class of
:data:`~medscalpel.data.labels.NIH_LT_CLASSES` (``No Finding`` is a class here).

Splits: ``train``, ``val`` and ``test`` are the CSVs; when no ``val`` CSV exists, ``val`` is
carved from the train CSV by PATIENT (seeded ``val_fraction``) and ``train`` is the rest;
``all`` concatenates every CSV. Patient ids come from ``subj_id`` or the image name prefix
(``00000001_000.png`` -> ``00000001``).

Example:
    >>> ds = open_dataset("nih-lt:/data/nih?labels_dir=/data/nih-cxr-lt", split="test")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medscalpel.data.base import CXRDataset
from medscalpel.data.labels import (NIH_LT_CLASSES, ImageFileDataset, binary_labels,
                                    check_common, finish, read_table, require_dir, select_split)
from medscalpel.data.nih import index_nih_images
from medscalpel.data.spec import DATASETS
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import DataError


def find_split_csv(dirs: list[Path], pattern: str, split: str, adapter: str) -> Path | None:
    """The label CSV of ``split`` matching ``pattern`` (``{split}`` is substituted) in the first
    of ``dirs`` that has one; ``None`` when there is none. Two matches in one folder -> error."""
    for d in dirs:
        if not d.is_dir():
            continue
        hits = sorted(d.glob(pattern.format(split=split)))
        if len(hits) > 1:
            raise DataError(f"Several {adapter} label files for split '{split}' in {d}: "
                            f"{[h.name for h in hits]}. Keep one, or choose with the "
                            "label_pattern option (e.g. 'miccai2023_*_{split}.csv').")
        if hits:
            return hits[0]
    return None


def load_split_tables(adapter: str, dirs: list[Path], pattern: str, split: str,
                      required: tuple[str, ...], label_columns: tuple[str, ...],
                      val_fraction: float, seed: int,
                      patient_of) -> tuple[pd.DataFrame, list[str]]:
    """Read the CSV(s) that make ``split``; carve ``val`` from train by patient when no val CSV.

    The ``label_columns`` are checked (0/1, blank = 0; errors name file, line and column) and
    replaced by floats before any carving.

    Returns:
        The rows (with ``__patient``, ``__source`` (file) and ``__line`` (line in that file)
        columns) and the list of files read.
    """
    def read(s: str) -> tuple[pd.DataFrame | None, Path | None]:
        f = find_split_csv(dirs, pattern, s, adapter)
        if f is None:
            return None, None
        df = read_table(f, required, what=f"{adapter} label file", dtype={required[0]: str})
        df[list(label_columns)] = binary_labels(df, label_columns, f, blank=0.0)
        df["__patient"] = patient_of(df, f)
        df["__source"] = str(f)
        df["__line"] = np.arange(len(df)) + 2
        return df, f

    where = ", ".join(str(d) for d in dirs)
    if split == "all":
        parts = [read(s) for s in ("train", "val", "test")]
        found = [(df, f) for df, f in parts if df is not None]
        if not found:
            raise DataError(f"No {adapter} label files ({pattern.format(split='*')}) in {where}. "
                            "Download the label CSVs there or point labels_dir at them.")
        return (pd.concat([df for df, _ in found], ignore_index=True),
                [str(f) for _, f in found])
    has_val = find_split_csv(dirs, pattern, "val", adapter) is not None
    if split == "test" or has_val:
        df, f = read(split)
        if df is not None:
            return df, [str(f)]
    if split == "test":
        raise DataError(f"No {adapter} test label file ({pattern.format(split='test')}) in "
                        f"{where}. Download it there or point labels_dir at it.")
    train, ft = read("train")
    if train is None:
        raise DataError(f"No {adapter} train label file ({pattern.format(split='train')}) in "
                        f"{where}. Download the label CSVs there or point labels_dir at them.")
    # no val CSV: carve val from train by patient
    rows = select_split(train["__patient"].tolist(), split, val_fraction, seed)
    return train.iloc[rows].reset_index(drop=True), [str(ft)]


def _nih_patient(df: pd.DataFrame, path: Path) -> list[str]:
    if "subj_id" in df.columns:
        return df["subj_id"].astype(str).str.strip().tolist()
    return [str(i).split("_")[0] for i in df["id"]]


@DATASETS.register("nih-lt", help="NIH-CXR-LT: 20-class label CSVs per split + NIH images")
def open_nih_lt(root: str | None, split: str = "train", preprocess: Preprocess | None = None,
                labels_dir: str | None = None, label_pattern: str = "*nih-cxr-lt_labels_{split}.csv",
                val_fraction: float = 0.1, seed: int = 0, skip_corrupt: bool = False) -> CXRDataset:
    """Open NIH-CXR-LT (see the module docstring).

    Args:
        root: the NIH image folder (holding ``images/`` or ``images_0XX/``).
        split: ``train``, ``val``, ``test`` or ``all``.
        labels_dir: folder of the label CSVs (default: the root, then ``root/labels``).
        label_pattern: glob of a split's CSV; ``{split}`` is replaced by the split name.
        val_fraction, seed: carving of ``val`` from train when there is no val CSV.
        skip_corrupt: drop missing/unreadable images (recorded in ``dataset.skip_report``).
    """
    check_common("nih-lt", split, val_fraction, seed)
    base = require_dir(root, "nih-lt", "nih-lt:/data/nih?labels_dir=/data/nih-cxr-lt")
    dirs = [Path(labels_dir).expanduser()] if labels_dir else [base, base / "labels"]
    required = ("id", *NIH_LT_CLASSES)
    df, files = load_split_tables("nih-lt", dirs, label_pattern, split, required,
                                  NIH_LT_CLASSES, val_fraction, seed, _nih_patient)
    labels = df[list(NIH_LT_CLASSES)].to_numpy(np.float32)
    ids = df["id"].astype(str).str.strip().tolist()
    index = index_nih_images(base)
    paths = [index.get(i, base / "images" / i) for i in ids]
    ds = ImageFileDataset("nih-lt", paths, ids, labels, NIH_LT_CLASSES, "multilabel",
                          df["__patient"].tolist(), preprocess, split,
                          meta={"label_files": files, "val_fraction": val_fraction, "seed": seed})
    return finish(ds, skip_corrupt)
