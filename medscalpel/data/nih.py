"""NIH ChestX-ray14 (``nih``): the official on-disk layout.

Layout under the root::

    Data_Entry_2017_v2020.csv[.gz] or Data_Entry_2017.csv[.gz]   (labels, one row per image)
    train_val_list.txt, test_list.txt                          (the official patient-wise split)
    images/*.png  or  images_001/images/*.png ... images_012/images/*.png

Labels: the 14 findings in CheXNet order (:data:`~medscalpel.data.labels.NIH_CLASSES`) parsed
from ``Finding Labels`` (``A|B``); ``No Finding`` = all zeros. Patient ids from ``Patient ID``.

Splits: ``test`` = ``test_list.txt``; ``train`` and ``val`` are carved from ``train_val_list.txt``
by PATIENT: a seeded ``val_fraction`` (default 0.1) of its patients forms ``val``; ``all`` = every
row. ``split_lists=DIR`` uses ``DIR/{train,val,test}.txt`` instead (first token of each line is
the image name, e.g. ``chexnet_split``). ``view=PA|AP`` keeps one view position.

``labels_only=true`` opens the label table without images (statistics, predictions import);
:func:`read_nih_labels` returns the same table as a DataFrame.

Example:
    >>> from medscalpel.data import open_dataset
    >>> ds = open_dataset("nih:/data/nih?view=PA", split="val")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from medscalpel.data.base import CXRDataset
from medscalpel.data.labels import (NIH_CLASSES, ImageFileDataset, check_common, finish,
                                    parse_finding_labels, read_table, require_dir, select_split)
from medscalpel.data.spec import DATASETS
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import DataError
from medscalpel.validation import check_in

LABEL_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv",
               "Data_Entry_2017.csv.gz")
REQUIRED = ("Image Index", "Finding Labels", "Patient ID")
VIEWS = ("all", "PA", "AP")


def find_nih_label_file(path: str | os.PathLike) -> Path:
    """The Data_Entry CSV: ``path`` itself when it is a file, else the first of
    :data:`LABEL_FILES` inside the directory ``path``."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"NIH label path {path} does not exist. Give the folder holding "
                        f"{LABEL_FILES[0]} (or {LABEL_FILES[2]}) or the CSV file itself.")
    for name in LABEL_FILES:
        if (path / name).is_file():
            return path / name
    raise DataError(f"No NIH label file in {path}: looked for {', '.join(LABEL_FILES)}. Download "
                    "Data_Entry_2017_v2020.csv from the NIH ChestX-ray14 release into that folder.")


def read_nih_labels(path: str | os.PathLike, view: str = "all") -> pd.DataFrame:
    """The NIH label table without images.

    Args:
        path: the Data_Entry CSV (``.csv`` or ``.csv.gz``) or the folder holding it.
        view: ``all``, ``PA`` or ``AP``.

    Returns:
        A DataFrame with columns ``id`` (Image Index), ``patient_id`` (str), ``view`` and one
        0/1 float column per finding in :data:`NIH_CLASSES` order, in file order.

    Example:
        >>> df = read_nih_labels("/data/nih/Data_Entry_2017_v2020.csv.gz")  # doctest: +SKIP
        >>> df[list(NIH_CLASSES)].sum()  # doctest: +SKIP
    """
    view = _check_view(view)
    file = find_nih_label_file(path)
    df = read_table(file, REQUIRED, what="NIH label file",
                    dtype={"Image Index": str, "Finding Labels": str, "Patient ID": str})
    blank = df["Image Index"].isna() | (df["Image Index"].astype(str).str.strip() == "")
    if blank.any():
        line = int(np.flatnonzero(blank.to_numpy())[0]) + 2  # 1-based, after the header
        raise DataError(f"{file}, line {line}: the 'Image Index' cell is empty. Every row needs "
                        "the image file name; fix or remove that row.")
    labels = parse_finding_labels(df["Finding Labels"].tolist(), NIH_CLASSES, file)
    views = (df["View Position"].astype(str).str.strip().str.upper()
             if "View Position" in df.columns else pd.Series(["?"] * len(df)))
    out = pd.DataFrame({"id": df["Image Index"].astype(str).str.strip(),
                        "patient_id": df["Patient ID"].astype(str).str.strip(),
                        "view": views.to_numpy()})
    out = pd.concat([out, pd.DataFrame(labels, columns=list(NIH_CLASSES))], axis=1)
    if view != "all":
        if "View Position" not in df.columns:
            raise DataError(f"{file} has no 'View Position' column, so view={view} cannot be "
                            f"applied. It has the columns {list(df.columns)}; use view=all.")
        out = out[out["view"] == view].reset_index(drop=True)
    dup = out["id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"{file}: image {out['id'].iloc[i]!r} appears more than once. Remove the "
                        "duplicate rows.")
    return out


def _check_view(view: str) -> str:
    v = str(view).strip()
    v = "all" if v.lower() == "all" else v.upper()
    return check_in(v, "view", "the 'nih' adapter", VIEWS)


def _read_list(path: Path) -> list[str]:
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts:
            names.append(parts[0])
    return names


def index_nih_images(root: Path) -> dict[str, Path]:
    """Map image file name -> path over ``root/images`` and ``root/images_*/images`` (and
    ``root/images_*`` itself, for archives unpacked without the inner folder)."""
    dirs = [root / "images"]
    dirs += sorted(p / "images" for p in root.glob("images_*") if p.is_dir())
    dirs += sorted(p for p in root.glob("images_*") if p.is_dir())
    found: dict[str, Path] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        with os.scandir(d) as it:
            for entry in it:
                if entry.is_file() and not entry.name.startswith("."):
                    found.setdefault(entry.name, Path(entry.path))
    return found


#: age bands of the ``age_band`` attribute (shared with the phantom): (label, lowest age)
AGE_BANDS = (("<40", 0), ("40-59", 40), ("60+", 60))


def _age_band(age: pd.Series) -> pd.Series:
    years = pd.to_numeric(age.astype(str).str.extract(r"(\d+)")[0], errors="coerce")
    out = pd.Series([None] * len(years), index=age.index, dtype=object)
    for name, lo in AGE_BANDS:
        out[(years >= lo).to_numpy()] = name
    out[years.isna().to_numpy() | (years > 120).to_numpy()] = None   # missing or implausible
    return out


def read_nih_attributes(path: str | os.PathLike) -> pd.DataFrame:
    """Per-image attributes from the NIH metadata, indexed by image id: ``sex`` (M/F, from
    ``Patient Gender``), ``age_band`` (:data:`AGE_BANDS`, from ``Patient Age``; ages over 120,
    a known NIH data error, become missing) and ``view`` (``View Position``). A column the file
    lacks is left out."""
    file = find_nih_label_file(path)
    df = read_table(file, ("Image Index",), what="NIH label file", dtype=str)
    out = pd.DataFrame(index=pd.Index(df["Image Index"].astype(str).str.strip(), name="id"))
    if "Patient Gender" in df.columns:
        out["sex"] = df["Patient Gender"].astype(str).str.strip().str.upper().str[:1].where(
            df["Patient Gender"].notna(), None).to_numpy()
    if "Patient Age" in df.columns:
        out["age_band"] = _age_band(df["Patient Age"]).to_numpy()
    if "View Position" in df.columns:
        out["view"] = df["View Position"].astype(str).str.strip().str.upper().to_numpy()
    return out


class NIHImages(ImageFileDataset):
    """NIH images with per-image attributes (:meth:`attributes`)."""

    attribute_table: pd.DataFrame | None = None

    def attributes(self) -> pd.DataFrame:
        """``sex``, ``age_band``, ``view`` of every image, indexed like :attr:`ids`."""
        if self.attribute_table is None:
            raise DataError(f"{self.spec}: no attribute table was read; reopen the dataset.")
        return self.attribute_table.reindex([str(i) for i in self.ids])


class NIHLabelsOnly(NIHImages):
    """NIH labels opened with ``labels_only=true``: every table, no pixels."""

    def load_raw(self, index: int) -> np.ndarray:
        raise DataError(f"The dataset {self.spec} was opened with labels_only=true, so it has no "
                        "images. Open it without labels_only to read images.")


@DATASETS.register("nih", help="NIH ChestX-ray14 (images/ + Data_Entry_2017*.csv + split lists)")
def open_nih(root: str | None, split: str = "train", preprocess: Preprocess | None = None,
             view: str = "all", val_fraction: float = 0.1, seed: int = 0,
             labels_only: bool = False, labels_file: str | None = None,
             split_lists: str | None = None, skip_corrupt: bool = False) -> CXRDataset:
    """Open NIH ChestX-ray14 (see the module docstring for layout and splits).

    Args:
        root: the dataset folder.
        split: ``train``, ``val``, ``test`` or ``all``.
        view: ``all``, ``PA`` or ``AP``.
        val_fraction: fraction of train_val PATIENTS carved out as ``val``.
        seed: seed of that carving.
        labels_only: open the label table only (no image files needed).
        labels_file: a label CSV to use instead of the default Data_Entry file (relative to root
            or absolute).
        split_lists: a folder (relative to root or absolute) with ``train.txt``, ``val.txt``,
            ``test.txt`` that replaces the official lists.
        skip_corrupt: drop missing/unreadable images (recorded in ``dataset.skip_report``).
    """
    check_common("nih", split, val_fraction, seed)
    base = require_dir(root, "nih", "nih:/data/nih")
    view = _check_view(view)
    if base.is_file():  # a CSV given directly as the root: images and lists beside it
        label_path, base = base, base.parent
    else:
        label_path = find_nih_label_file(base / labels_file if labels_file else base)
    table = read_nih_labels(label_path, view=view)
    rows = _split_rows(base, table, split, val_fraction, seed, split_lists, label_path)
    table = table.iloc[rows].reset_index(drop=True)
    ids = table["id"].tolist()
    labels = table[list(NIH_CLASSES)].to_numpy(np.float32)
    meta = {"label_file": str(label_path), "view": view, "val_fraction": val_fraction,
            "seed": seed}
    if labels_only:
        ds = NIHLabelsOnly("nih", [base / "images" / i for i in ids], ids, labels, NIH_CLASSES,
                           "multilabel", table["patient_id"].tolist(), preprocess, split, meta=meta)
        ds.attribute_table = read_nih_attributes(label_path)
        return ds.require_nonempty()
    index = index_nih_images(base)
    if not index:
        raise DataError(f"No images found under {base}/images or {base}/images_*/images. Unpack "
                        "the NIH image archives there, or add ?labels_only=true to the spec for the labels.")
    paths = [index.get(i, base / "images" / i) for i in ids]
    ds = NIHImages("nih", paths, ids, labels, NIH_CLASSES, "multilabel",
                   table["patient_id"].tolist(), preprocess, split, meta=meta)
    ds.attribute_table = read_nih_attributes(label_path)
    return finish(ds, skip_corrupt, fix=f"{len(index)} image(s) were found under {base}. ")


def _split_rows(base: Path, table: pd.DataFrame, split: str, val_fraction: float, seed: int,
                split_lists: str | None, label_path: Path) -> np.ndarray:
    if split == "all":
        return np.arange(len(table))
    pos = {name: k for k, name in enumerate(table["id"])}
    if split_lists:
        d = Path(split_lists) if Path(split_lists).is_absolute() else base / split_lists
        f = d / f"{split}.txt"
        if not f.is_file():
            raise DataError(f"Split list {f} not found (split_lists={split_lists!r}). The folder "
                            "must hold train.txt, val.txt and test.txt.")
        return np.array(sorted(pos[n] for n in _read_list(f) if n in pos), dtype=np.int64)
    name = "test_list.txt" if split == "test" else "train_val_list.txt"
    f = base / name
    if not f.is_file():
        raise DataError(f"The official split list {f} is missing, so split='{split}' cannot be "
                        "made. Put train_val_list.txt / test_list.txt from the NIH release beside "
                        f"{label_path.name}, or use split='all'.")
    rows = np.array(sorted(pos[n] for n in _read_list(f) if n in pos), dtype=np.int64)
    if split == "test":
        return rows
    pids = table["patient_id"].to_numpy()[rows].tolist()
    return rows[select_split(pids, split, val_fraction, seed)]
