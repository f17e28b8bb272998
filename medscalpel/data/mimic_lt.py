"""MIMIC-CXR-LT (``mimic-lt``): 19-class long-tailed labels for MIMIC-CXR-JPG.

Layout: the root is the MIMIC-CXR-JPG folder (holding ``files/p10/...``); one label CSV per
split named ``*mimic-cxr-lt_labels_{split}.csv`` (e.g. ``miccai2023_mimic-cxr-lt_labels_val.csv``)
in the root, ``root/labels`` or ``labels_dir``. Each CSV has a ``path`` column (relative to the
root, e.g. ``files/p10/p10000032/s50414267/<dicom_id>.jpg``; it may not leave the root) and one
0/1 column per class of :data:`~medscalpel.data.labels.MIMIC_LT_CLASSES`; optional
``subject_id`` / ``dicom_id`` columns give patient and image ids (else the ``pNNNNNNNN`` path
component and the file stem).

Splits (by subject = patient; ``dataset.meta["split_unit"]`` records it): as for ``nih-lt``:
the per-split CSVs; ``val`` carved from train by PATIENT (seeded
``val_fraction``) only when there is no val CSV; ``all`` concatenates every CSV.

Example:
    >>> ds = open_dataset("mimic-lt:/data/mimic-cxr-jpg/2.0.0", split="test")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from medscalpel.data.base import CXRDataset, record_split_unit
from medscalpel.data.labels import (MIMIC_LT_CLASSES, ImageFileDataset, check_common,
                                    finish, require_dir, resolve_inside)
from medscalpel.data.nih_lt import load_split_tables
from medscalpel.data.spec import DATASETS
from medscalpel.data.transforms import Preprocess

_SUBJECT = re.compile(r"(?:^|/)p(\d{6,})(?:/|$)")


def _mimic_patient(df: pd.DataFrame, path: Path) -> list[str | None]:
    if "subject_id" in df.columns:
        return df["subject_id"].astype(str).str.strip().tolist()
    out = []
    for p in df["path"].astype(str):
        m = _SUBJECT.search(p.replace("\\", "/"))
        out.append(m.group(1) if m else None)
    return out


@DATASETS.register("mimic-lt", help="MIMIC-CXR-LT: 19-class label CSVs per split + image root")
def open_mimic_lt(root: str | None, split: str = "train", preprocess: Preprocess | None = None,
                  labels_dir: str | None = None,
                  label_pattern: str = "*mimic-cxr-lt_labels_{split}.csv",
                  val_fraction: float = 0.1, seed: int = 0,
                  skip_corrupt: bool = False) -> CXRDataset:
    """Open MIMIC-CXR-LT (see the module docstring).

    Args:
        root: the MIMIC-CXR-JPG folder the ``path`` column is relative to.
        split: ``train``, ``val``, ``test`` or ``all``.
        labels_dir: folder of the label CSVs (default: the root, then ``root/labels``).
        label_pattern: glob of a split's CSV; ``{split}`` is replaced by the split name.
        val_fraction, seed: carving of ``val`` from train when there is no val CSV.
        skip_corrupt: drop missing/unreadable images (recorded in ``dataset.skip_report``).
    """
    check_common("mimic-lt", split, val_fraction, seed)
    base = require_dir(root, "mimic-lt", "mimic-lt:/data/mimic-cxr-jpg/2.0.0")
    dirs = [Path(labels_dir).expanduser()] if labels_dir else [base, base / "labels"]
    df, files = load_split_tables("mimic-lt", dirs, label_pattern, split,
                                  ("path", *MIMIC_LT_CLASSES), MIMIC_LT_CLASSES, val_fraction,
                                  seed, _mimic_patient)
    rels = df["path"].astype(str).str.strip().tolist()
    paths = [resolve_inside(base, r, f"{src}, line {line}, column 'path'")
             for r, src, line in zip(rels, df["__source"], df["__line"])]
    if "dicom_id" in df.columns:
        ids = df["dicom_id"].astype(str).str.strip().tolist()
    else:
        ids = [Path(r).stem for r in rels]
    if len(set(ids)) != len(ids):
        ids = rels
    ds = ImageFileDataset("mimic-lt", paths, ids, df[list(MIMIC_LT_CLASSES)].to_numpy(np.float32),
                          MIMIC_LT_CLASSES, "multilabel", df["__patient"].tolist(), preprocess,
                          split, meta={"label_files": files, "val_fraction": val_fraction,
                                       "seed": seed})
    # MIMIC-CXR's official split is by subject; val carved from train is by subject too
    record_split_unit(ds, basis="per-split label files (by subject) + val carved by subject",
                      key=f"mimic-lt:{base}")
    return finish(ds, skip_corrupt)
