"""Label sets of the supported datasets and helpers shared by the file-based adapters.

Label sets (class names exactly as the official label files spell them):

* :data:`NIH_CLASSES`: ChestX-ray14's 14 findings in CheXNet order.
* :data:`NIH_LT_CLASSES`: NIH-CXR-LT's 20 classes (``No Finding`` is a class there).
* :data:`CHEXPERT_CLASSES`: CheXpert's 14 observations.
* :data:`MIMIC_LT_CLASSES`: MIMIC-CXR-LT's 19 classes.

Shared helpers: :func:`read_table` (a CSV reader whose errors name the file, row and column),
:func:`require_columns`, :func:`binary_labels`, :func:`parse_finding_labels`,
:func:`resolve_inside`, :class:`ImageFileDataset` (a dataset of image files read with
:func:`medscalpel.data.io.read_image`), :func:`select_split` (seeded patient-wise carving) and
:func:`drop_unreadable` (the ``skip_corrupt`` option).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from medscalpel.data.base import CXRDataset, Task, split_by_patient
from medscalpel.data.io import read_image
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import DataError
from medscalpel.progress import track
from medscalpel.validation import check_fraction, check_in, check_range

logger = logging.getLogger(__name__)

#: NIH ChestX-ray14, CheXNet order (Rajpurkar et al. 2017).
NIH_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)

#: NIH-CXR-LT (Holste et al. 2022/2023): the column names of its label CSVs.
NIH_LT_CLASSES: tuple[str, ...] = (
    "No Finding", "Infiltration", "Effusion", "Atelectasis", "Nodule", "Mass", "Consolidation",
    "Pneumothorax", "Pleural Thickening", "Cardiomegaly", "Emphysema", "Edema", "Fibrosis",
    "Subcutaneous Emphysema", "Pneumonia", "Tortuous Aorta", "Calcification of the Aorta",
    "Pneumoperitoneum", "Hernia", "Pneumomediastinum",
)

#: CheXpert's 14 observations (columns of train.csv / valid.csv).
CHEXPERT_CLASSES: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)

#: MIMIC-CXR-LT (Holste et al. 2023): the column names of its label CSVs.
MIMIC_LT_CLASSES: tuple[str, ...] = (
    "Support Devices", "Lung Opacity", "Cardiomegaly", "Pleural Effusion", "Atelectasis",
    "Pneumonia", "Edema", "No Finding", "Enlarged Cardiomediastinum", "Consolidation",
    "Pneumothorax", "Fracture", "Calcification of the Aorta", "Tortuous Aorta",
    "Subcutaneous Emphysema", "Lung Lesion", "Pneumomediastinum", "Pneumoperitoneum",
    "Pleural Other",
)

SPLITS = ("train", "val", "test", "all")


# ----------------------------------------------------------------------------- CSV reading
def csv_row(index: int) -> int:
    """The 1-based line number in the file of DataFrame row ``index`` (line 1 is the header)."""
    return int(index) + 2


def read_table(path: str | os.PathLike, required: Sequence[str] = (), what: str = "label file",
               **read_kw: Any) -> pd.DataFrame:
    """Read a CSV (plain or ``.gz``) and check it has the ``required`` columns.

    Raises:
        DataError: the file is missing, cannot be parsed (the message names the line), or lacks
            required columns (the message names them and the columns the file has).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The {what} {path} does not exist. Check the dataset root / file name.")
    try:
        df = pd.read_csv(path, **read_kw)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"The {what} {path} is empty; it needs a header row and data.") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"Cannot parse the {what} {path}: {exc}. Fix that line or re-download "
                        "the file.") from exc
    df.columns = [str(c).strip() for c in df.columns]
    require_columns(df, required, path, what)
    return df


def require_columns(df: pd.DataFrame, required: Sequence[str], path: str | os.PathLike,
                    what: str = "label file") -> None:
    """Raise :class:`DataError` naming the missing columns and the columns ``df`` has."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"The {what} {path} lacks the required column(s) {missing}. It has the columns "
            f"{list(df.columns)}. Use the official file, or rename its columns accordingly.")


def binary_labels(df: pd.DataFrame, columns: Sequence[str], path: str | os.PathLike, *,
                  blank: float = np.nan, allowed: Sequence[float] = (0.0, 1.0)) -> np.ndarray:
    """Columns of 0/1 values as a float32 ``[N, K]`` matrix.

    Args:
        blank: the value a blank cell gets (NaN = unknown, or 0).
        allowed: the numeric values accepted (e.g. ``(-1, 0, 1)`` for CheXpert).

    Raises:
        DataError: a cell is not numeric or not in ``allowed``; the message names file, line
            and column.
    """
    out = np.empty((len(df), len(columns)), np.float32)
    for j, col in enumerate(columns):
        raw = df[col]
        num = np.array(pd.to_numeric(raw, errors="coerce"), dtype=np.float64)  # writable copy
        is_blank = raw.isna().to_numpy() | raw.astype(str).str.strip().eq("").to_numpy()
        bad = (~is_blank) & (np.isnan(num) | ~np.isin(num, np.asarray(allowed, np.float64)))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{path}, line {csv_row(i)}, column {col!r}: value {str(raw.iloc[i])!r} is not "
                f"one of {list(allowed)} (blank = {'unknown' if np.isnan(blank) else blank}). "
                f"Fix the label file ({int(bad.sum())} such cell(s) in this column).")
        num[is_blank] = blank
        out[:, j] = num
    return out


def require_some_labels(labels: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                        n_rows: int) -> None:
    """Refuse a label table in which a class column holds no label at all (every cell blank or
    NaN): such a column is no label column, and training on it learns nothing (loss 0).

    Raises:
        DataError: naming the file and every empty column, and how to fix it.
    """
    known = np.isfinite(labels).any(axis=0) if labels.size else np.zeros(len(class_names), bool)
    empty = [c for c, k in zip(class_names, known) if not k]
    if not empty:
        return
    keep = [c for c, k in zip(class_names, known) if k]
    if not keep:
        raise DataError(
            f"{path}: no label in any of its {n_rows} row(s): every cell of the label column(s) "
            f"{list(class_names)} is blank or NaN. Fill in 0/1 labels (1 = finding present); "
            "to predict unlabelled images, pass the image files or their folder to "
            "'medscalpel predict --data'.")
    raise DataError(
        f"{path}: the label column(s) {empty} hold no label in any of the {n_rows} row(s) "
        f"(every cell blank or NaN). Fill them in, or leave them out with "
        f"label_cols={','.join(keep)}.")


def require_known_labels(ds: "CXRDataset", purpose: str) -> list[str]:
    """Refuse a dataset split with no known label at all (every label NaN: ``purpose``, e.g.
    ``training``, would learn nothing, loss 0); warn for single classes without a known label
    (that class is not learned) and return their names.

    Raises:
        DataError: naming the dataset, the split and how to fix it.
    """
    if ds.task != "multilabel" or len(ds) == 0:
        return []
    known = np.isfinite(np.asarray(ds.labels, dtype=np.float64)).any(axis=0)
    empty = [c for c, k in zip(ds.class_names, known) if not k]
    if empty and len(empty) == ds.num_classes:
        raise DataError(
            f"The '{ds.split}' split of {ds.spec!r} has no known label in any of its {len(ds)} "
            f"image(s) (every label blank / NaN): {purpose} needs labels. Fill in 0/1 labels, "
            "or give a split / dataset that has them.")
    if empty:
        logger.warning("the '%s' split of %r has no known label for %s: %s does not learn or "
                       "measure them", ds.split, ds.spec, empty, purpose)
    return empty


def parse_finding_labels(values: Sequence[Any], class_names: Sequence[str], path: str | os.PathLike,
                         column: str = "Finding Labels", sep: str = "|",
                         no_finding: str = "No Finding") -> np.ndarray:
    """Multi-hot ``[N, K]`` float32 from strings like ``"Cardiomegaly|Effusion"``.

    ``no_finding`` (and an empty cell) means all zeros.

    Raises:
        DataError: a name is not in ``class_names`` (the message names line, name and valid names).
    """
    index = {c: k for k, c in enumerate(class_names)}
    out = np.zeros((len(values), len(class_names)), np.float32)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        for name in str(v).split(sep):
            name = name.strip()
            if not name or name == no_finding:
                continue
            k = index.get(name)
            if k is None:
                raise DataError(
                    f"{path}, line {csv_row(i)}, column {column!r}: unknown class name {name!r}. "
                    f"Valid names: {', '.join(class_names)} (and {no_finding!r}). Fix the label "
                    "file or use the adapter that matches its label set.")
            out[i, k] = 1.0
    return out


# ----------------------------------------------------------------------------- paths
def require_dir(root: str | os.PathLike | None, adapter: str, example: str) -> Path:
    """The dataset root as a :class:`Path`; :class:`DataError` when missing."""
    if root is None or str(root).strip() == "":
        raise DataError(f"The '{adapter}' adapter needs a dataset root, e.g. '{example}'.")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"Dataset root {path} does not exist (adapter '{adapter}'). Check the "
                        f"path in the spec, e.g. '{example}'.")
    return path


def resolve_inside(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` refusing absolute paths and ``..`` that escape ``root``.

    Args:
        where: names the source in the error, e.g. ``"labels.csv, line 7, column 'path'"``.
    """
    rel = str(rel).strip()
    if not rel:
        raise DataError(f"{where}: empty image path. Fill in the path or remove the row.")
    p = Path(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise DataError(f"{where}: image path {rel!r} is absolute; paths must be relative to the "
                        f"dataset root {root}. Make the path relative.")
    root_abs = root.resolve()
    full = (root_abs / p).resolve()
    if full != root_abs and root_abs not in full.parents:
        raise DataError(f"{where}: image path {rel!r} escapes the dataset root {root} (via '..' or "
                        "a link). Paths must stay inside the root.")
    return root / p


# ----------------------------------------------------------------------------- datasets
class ImageFileDataset(CXRDataset):
    """A dataset of image files on disk with a label table (used by the file-based adapters).

    Args:
        paths: one image file per row.
        colour: keep RGB for genuinely colour data (needs ``Preprocess(colour=True)`` too).
        Remaining arguments: see :meth:`CXRDataset._set_tables`.
    """

    def __init__(self, name: str, paths: Sequence[Path], ids: Sequence[str], labels: np.ndarray,
                 class_names: Sequence[str], task: Task,
                 patient_ids: Sequence[str | None] | None, preprocess: Preprocess | None,
                 split: str, colour: bool = False, meta: dict[str, Any] | None = None):
        super().__init__(preprocess, spec=name, split=split)
        self.name = name
        self.paths = [Path(p) for p in paths]
        self.colour = bool(colour)
        self._set_tables(ids, labels, class_names, task, patient_ids)
        if len(self.paths) != len(self.ids):
            raise DataError(f"{name}: {len(self.paths)} paths but {len(self.ids)} ids.")
        self.meta = dict(meta or {})

    def load_raw(self, index: int) -> np.ndarray:
        return read_image(self.paths[index], colour=self.colour and self.preprocess.colour)

    def take(self, keep: np.ndarray) -> None:
        """Keep only the rows in ``keep`` (boolean mask or indices), in place."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, int)
        self.paths = [self.paths[i] for i in idx]
        self._set_tables([self.ids[i] for i in idx], self.labels[idx], self.class_names,
                         self.task, [self.patient_ids[i] for i in idx])


def check_common(adapter: str, split: str, val_fraction: float | None = None,
                 seed: int | None = None) -> None:
    """Validate the options every adapter shares."""
    check_in(split, "split", f"the '{adapter}' adapter", SPLITS)
    if val_fraction is not None:
        check_fraction(val_fraction, "val_fraction", f"the '{adapter}' adapter")
    if seed is not None:
        check_range(seed, "seed", f"the '{adapter}' adapter", 0, integer=True)


def select_split(patient_ids: Sequence[str | None], split: str, val_fraction: float,
                 seed: int) -> np.ndarray:
    """Rows of a train(+val) table that form ``split`` ('train' or 'val'): a seeded
    ``val_fraction`` of PATIENTS goes to val, so no patient is in both."""
    rest, held = split_by_patient(patient_ids, val_fraction, seed)
    return np.sort(held if split == "val" else rest)


def drop_missing(ds: ImageFileDataset, skip: bool, fix: str = "") -> None:
    """Rows whose image file does not exist: a :class:`DataError` listing them, or (``skip``)
    dropped and recorded in ``ds.skip_report``."""
    exists = np.array([p.is_file() for p in ds.paths], dtype=bool)
    if exists.all():
        return
    missing = [str(ds.paths[i]) for i in np.flatnonzero(~exists)]
    if not skip:
        raise DataError(
            f"{ds.name}: {len(missing)} of {len(ds.paths)} image file(s) of the '{ds.split}' split "
            f"do not exist, e.g. {missing[:3]}. {fix}Check the dataset root, or pass "
            "skip_corrupt=true to skip missing/unreadable files (they are counted in the report).")
    for i in np.flatnonzero(~exists):
        ds.skip_report.skipped.append((ds.ids[i], "file not found"))
    ds.take(exists)


def drop_unreadable(ds: ImageFileDataset, progress: bool | None = None) -> None:
    """Decode every image with PIL once; drop the unreadable ones and record them (with the
    reason) in ``ds.skip_report``."""

    keep = np.ones(len(ds.paths), dtype=bool)
    for i in track(range(len(ds.paths)), f"checking {ds.name} images", progress=progress):
        try:
            with Image.open(ds.paths[i]) as im:
                im.load()
        except Exception as exc:  # noqa: BLE001 - any decoder failure means unreadable
            keep[i] = False
            ds.skip_report.skipped.append((ds.ids[i], f"{type(exc).__name__}: {exc}"))
    if not keep.all():
        logger.warning("%s: skipped %d unreadable image(s)", ds.name, int((~keep).sum()))
        ds.take(keep)


def finish(ds: ImageFileDataset, skip_corrupt: bool, fix: str = "") -> ImageFileDataset:
    """The common end of a file adapter: missing files, optional decode check, non-empty."""
    drop_missing(ds, skip_corrupt, fix)
    if skip_corrupt:
        drop_unreadable(ds)
    ds.meta["skipped"] = ds.skip_report.count
    return ds.require_nonempty()


def split_list_option(value: Any) -> list[str] | None:
    """A comma-separated option (or a list) as a list of stripped names; ``None`` stays."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip() for s in str(value).split(",") if s.strip()]
