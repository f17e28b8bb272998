"""A generic label CSV (``csv``): a path column plus label columns.

The spec root is a CSV file (image paths relative to its folder) or a folder holding the CSV
(``file=labels.csv`` by default). Every image path must lie INSIDE that folder: absolute paths
and ``..`` that escape it are refused with the offending line named.

Tasks:
    * ``task=multilabel`` (default): ``label_cols=a,b,c`` (default: every other numeric column,
      except the patient and split columns) of 0/1 values; a blank cell is unknown (NaN).
    * ``task=multiclass``: one ``label_col`` (default ``label``) of class names; the classes are
      the sorted names found, or ``classes=a,b,c`` (then a name outside that list is an error).

Splits: with ``split_col`` (values ``train``, ``val``/``valid``/``validation``, ``test``) the
column decides, and when it has no ``val`` rows, ``val`` is carved from train by PATIENT
(seeded ``val_fraction``). Without it, a seeded patient-wise split makes ``test``
(``test_fraction``, default 0.2) and ``val`` (``val_fraction``, default 0.1) of the patients.
``patient_col=auto`` (the default) uses the first column named like a patient / subject id
(``patient``, ``patient_id``, ``Patient ID``, ``subject_id``, ``pid``, ...); ``patient_col=none``
or a table without such a column splits by ROW (image): a warning says so once and
``dataset.meta["split_unit"]`` records it. ``all`` = every row.

Tables of DICOM files (every path a ``.dcm`` / ``.dicom``) are identified as the ``dicom``
adapter identifies them (:mod:`medscalpel.data.dicom_read`): image ids are ``img-<16 hex>``
pseudonyms of the SOPInstanceUID (never the path, which can hold identifiers), and patients are
the PatientID tag (``patient_col=auto``, the default; a column named with ``patient_col=`` is
used instead, ``none`` splits by image), pseudonymised as ``pt-<16 hex>``; the split is drawn
on the real values. Every row's header is read (and checked) when the dataset is opened
(``skip_corrupt=true`` skips unusable or missing files, listed by pseudonym).
``keep_identifiers=true`` keeps the paths as written and the raw patient ids; ``salt_file=``
names the experiment's own salt; ``meta`` records ``identifiers``, ``id_source``, ``key_id``
and ``salt_source``. A table that mixes DICOM and other image files is refused
(:func:`~medscalpel.data.dicom_read.dicom_only`).

Example:
    >>> ds = open_dataset("csv:/data/study/labels.csv?patient_col=pid", split="val")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from medscalpel.data.base import CXRDataset, Task, record_split_unit, split_by_patient
from medscalpel.data.dicom_read import (RADIOGRAPHY, DicomFile, dataset_salt, dicom_only,
                                        identifiers, identity_meta, read_headers)
from medscalpel.data.labels import (ImageFileDataset, binary_labels, check_common, csv_row,
                                    finish, read_table, require_columns, require_dir,
                                    require_some_labels, resolve_inside, select_split,
                                    split_list_option)
from medscalpel.data.spec import DATASETS
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import ConfigError, DataError
from medscalpel.validation import check_fraction, check_in

#: column names taken as the patient id by ``patient_col=auto`` (case, spaces, ``_``/``-`` ignored)
PATIENT_COLUMN = re.compile(r"^(patient|subject|pid|participant|case)[ _-]?(id|no|number|nr)?$",
                            re.IGNORECASE)

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


@DATASETS.register("csv", help="a CSV with a path column + label columns, paths inside the root")
def open_csv(root: str | None, split: str = "train", preprocess: Preprocess | None = None,
             file: str = "labels.csv", path_col: str = "path", label_cols: str | None = None,
             task: str = "multilabel", label_col: str = "label", classes: str | None = None,
             patient_col: str | None = "auto", split_col: str | None = None,
             val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
             colour: bool = False, keep_identifiers: bool = False, salt_file: str | None = None,
             skip_corrupt: bool = False) -> CXRDataset:
    """Open a generic label CSV (see the module docstring).

    Args:
        root: the CSV file, or the folder holding ``file``.
        split: ``train``, ``val``, ``test`` or ``all``.
        file: the CSV's name inside a folder root.
        path_col: the column of image paths (relative to the CSV's folder).
        label_cols: comma-separated multi-label columns (default: the other numeric columns).
        task: ``multilabel`` or ``multiclass``.
        label_col: the class-name column for ``multiclass``.
        classes: comma-separated class names (order) for ``multiclass``.
        patient_col: column of patient ids (splits keep a patient's images together);
            ``auto`` (default): a column named like a patient / subject id; ``none``: none.
        split_col: column of split names.
        val_fraction, test_fraction, seed: the seeded patient-wise carving (see above).
        colour: keep RGB for colour data (needs ``Preprocess(colour=True)``).
        keep_identifiers, salt_file: DICOM tables only, as the ``dicom`` adapter's.
        skip_corrupt: drop missing/unreadable images (recorded in ``dataset.skip_report``).
    """
    check_common("csv", split, val_fraction, seed)
    check_fraction(test_fraction, "test_fraction", "the 'csv' adapter")
    check_in(task, "task", "the 'csv' adapter", ("multilabel", "multiclass"))
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"The 'val_fraction' + 'test_fraction' of the 'csv' adapter must be "
                          f"below 1. Got {val_fraction} + {test_fraction} instead.")
    given = require_dir(root, "csv", "csv:/data/study/labels.csv")
    csv_path = given if given.is_file() else given / file
    base = csv_path.parent
    header = read_table(csv_path, (), what="label CSV", nrows=0).columns
    patient_arg = patient_col
    patient_col = resolve_patient_col(patient_col, list(header), csv_path)
    required = [path_col] + [c for c in (patient_col, split_col) if c]
    if task == "multiclass":
        required.append(label_col)
    df = read_table(csv_path, required, what="label CSV", dtype={path_col: str})
    if len(df) == 0:
        raise DataError(f"The label CSV {csv_path} has a header but no rows. Add one row per "
                        "image.")

    # ---- labels
    if task == "multilabel":
        class_names, labels = _multilabel_labels(df, label_cols, (path_col, patient_col,
                                                                  split_col), csv_path)
    else:
        class_names, labels = _multiclass_labels(df, label_col, classes, csv_path)

    # ---- paths (inside the root only) and patients
    rels = df[path_col].fillna("").astype(str).tolist()
    paths = [resolve_inside(base, r, f"{csv_path}, line {csv_row(i)}, column {path_col!r}")
             for i, r in enumerate(rels)]
    ids = [r.strip().replace("\\", "/") for r in rels]
    patients = _patient_cells(df, patient_col)

    if dicom_only(paths, f"The label CSV {csv_path}"):
        given = patient_col if _named(patient_arg) else (None if _off(patient_arg) else "tag")
        return _open_dicom_rows(df, csv_path, paths, ids, labels, class_names, task, given,
                                split, split_col, preprocess, keep_identifiers, salt_file,
                                skip_corrupt, (val_fraction, test_fraction, seed))
    if keep_identifiers or salt_file:
        raise ConfigError(f"The 'keep_identifiers' and 'salt_file' options of the 'csv' adapter "
                          f"are for tables of DICOM files; {csv_path} names none. Remove them.")

    # ---- split
    rows = _split_rows(df, split, split_col, patients, val_fraction, test_fraction, seed,
                       csv_path)
    ds = ImageFileDataset("csv", [paths[i] for i in rows], [ids[i] for i in rows], labels[rows],
                          class_names, task, [patients[i] for i in rows], preprocess, split,
                          colour=colour, meta={"file": str(csv_path), "seed": seed,
                                               "patient_col": patient_col})
    basis = f"split column {split_col!r}" if split_col else "seeded split"
    record_split_unit(ds, patients, basis=f"{basis}, patient column {patient_col!r}",
                      key=f"csv:{csv_path}")
    return finish(ds, skip_corrupt)


def _multilabel_labels(df: pd.DataFrame, label_cols: str | None,
                       other: tuple[str | None, ...], csv_path: Path
                       ) -> tuple[list[str], np.ndarray]:
    """Class names and 0/1 labels (blank: NaN) of a multi-label table: the ``label_cols``
    given, else every numeric column that is not one of ``other`` (path, patient, split).

    Raises:
        DataError: no label column, a named column missing, a bad value, no label at all.
    """
    cols = split_list_option(label_cols)
    if cols is None:
        skip = set(other)
        cols = [c for c in df.columns if c not in skip
                and pd.api.types.is_numeric_dtype(df[c])]
        if not cols:
            raise DataError(f"The label CSV {csv_path} has no numeric label columns besides "
                            f"{other[0]!r}; it has {list(df.columns)}. Add 0/1 columns or "
                            "name them with label_cols=a,b,c.")
    else:
        require_columns(df, cols, csv_path, "label CSV")
    class_names = list(cols)
    labels = binary_labels(df, cols, csv_path, blank=np.nan)
    require_some_labels(labels, class_names, csv_path, len(df))
    return class_names, labels


def _multiclass_labels(df: pd.DataFrame, label_col: str, classes: str | None, csv_path: Path
                       ) -> tuple[list[str], np.ndarray]:
    """Class names (``classes`` in order, else the sorted names found) and class indices of a
    multi-class table's ``label_col``.

    Raises:
        DataError: an empty class name, or a name outside ``classes`` (the line is named).
    """
    names = df[label_col]
    blank = names.isna() | names.astype(str).str.strip().eq("")
    if blank.any():
        i = int(np.flatnonzero(blank.to_numpy())[0])
        raise DataError(f"{csv_path}, line {csv_row(i)}, column {label_col!r}: empty class "
                        "name. Fill it in or remove the row.")
    names = names.astype(str).str.strip()
    class_names = split_list_option(classes) or sorted(names.unique())
    index = {c: k for k, c in enumerate(class_names)}
    bad = ~names.isin(list(index))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{csv_path}, line {csv_row(i)}, column {label_col!r}: unknown class "
                        f"name {names.iloc[i]!r}; the classes are {class_names}. Fix the "
                        "'classes' option or the row.")
    return class_names, names.map(index).to_numpy(np.int64)


def _patient_cells(df: pd.DataFrame, patient_col: str | None) -> list[str | None]:
    """Each row's patient id (stripped text); None without a patient column, and for a blank
    cell (an unknown patient, split as its own image, not "nan")."""
    if not patient_col:
        return [None] * len(df)
    raw = df[patient_col]
    text = raw.astype(str).str.strip()
    return [None if (pd.isna(v) or t == "") else t for v, t in zip(raw, text)]


def _off(patient_col: str | None) -> bool:
    return patient_col is None or str(patient_col).strip().lower() in ("", "none", "false")


def _named(patient_col: str | None) -> bool:
    """Whether the user named a patient column (not ``auto``, not off)."""
    return not _off(patient_col) and str(patient_col).strip().lower() != "auto"


def _open_dicom_rows(df: pd.DataFrame, csv_path: Path, paths: list[Path], rels: list[str],
                     labels: np.ndarray, class_names: list[str], task: Task,
                     patient: str | None, split: str, split_col: str | None,
                     preprocess: Preprocess | None, keep: bool, salt_file: str | None,
                     skip: bool, fractions: tuple[float, float, int]) -> CXRDataset:
    """A label CSV of DICOM files, identified as the ``dicom`` adapter identifies them: ids
    from the SOPInstanceUID and patients from the PatientID tag (``patient="tag"``; a column
    the user named, or ``None`` for none), pseudonymised unless ``keep``; the split is drawn
    on the real values. Headers are read (and checked) for every row before the split."""
    salt, source = dataset_salt(keep, salt_file)
    found, skipped = read_headers(paths, rels, RADIOGRAPHY, 0, skip, what="csv", salt=salt)
    files: list[DicomFile | None] = []
    it = iter(found)
    nxt = next(it, None)
    for p, r in zip(paths, rels):  # found is the rows that were read, in order
        if nxt is not None and (nxt.path, nxt.rel) == (Path(p), r):
            files.append(nxt)
            nxt = next(it, None)
        else:
            files.append(None)
    if patient != "tag":
        column = [None] * len(df) if patient is None else [
            None if (pd.isna(v) or str(v).strip() == "") else str(v).strip()
            for v in df[patient]]
        files = [replace(f, patient=c) if f is not None else None
                 for f, c in zip(files, column)]
    patients = [f.patient if f is not None else None for f in files]
    val_fraction, test_fraction, seed = fractions
    rows = [int(i) for i in _split_rows(df, split, split_col, patients, val_fraction,
                                        test_fraction, seed, csv_path) if files[i] is not None]
    chosen = [files[i] for i in rows]
    ids, pids = identifiers(chosen, salt, keep)  # type: ignore[arg-type]
    name = "PatientID" if patient == "tag" else (f"column {patient!r}" if patient else "none")
    meta = {"file": str(csv_path), "seed": seed,
            "patient_col": None if patient == "tag" else patient,
            **identity_meta(keep, salt, source, patient=name)}
    ds = ImageFileDataset("csv", [f.path for f in chosen], ids, labels[rows], class_names,
                          task, pids, preprocess, split, meta=meta)
    ds.skip_report.skipped.extend(skipped)
    basis = f"split column {split_col!r}" if split_col else "seeded split"
    # the split unit is counted on the real ids: the same patients as the pseudonyms
    record_split_unit(ds, [p for f, p in zip(files, patients) if f is not None],
                      basis=f"{basis}, patient = {'DICOM ' if patient == 'tag' else ''}{name}",
                      key=f"csv:{csv_path}")
    return finish(ds, skip_corrupt=False)  # unusable headers were skipped above


def resolve_patient_col(patient_col: str | None, columns: list[str], csv_path: Path
                        ) -> str | None:
    """The patient column to use: ``auto`` -> the first column matching :data:`PATIENT_COLUMN`
    (``None`` when there is none); ``none`` / empty -> ``None``; else the name given."""
    if patient_col is None or str(patient_col).strip().lower() in ("", "none", "false"):
        return None
    if str(patient_col).strip().lower() != "auto":
        return str(patient_col)
    return next((c for c in columns if PATIENT_COLUMN.match(str(c).strip())), None)


def _split_rows(df: pd.DataFrame, split: str, split_col: str | None,
                patients: list[str | None], val_fraction: float, test_fraction: float,
                seed: int, csv_path: Path) -> np.ndarray:
    n = len(df)
    if split == "all":
        return np.arange(n)
    if split_col:
        raw = df[split_col].astype(str).str.strip().str.lower()
        mapped = raw.map(SPLIT_ALIASES)
        if mapped.isna().any():
            i = int(np.flatnonzero(mapped.isna().to_numpy())[0])
            raise DataError(f"{csv_path}, line {csv_row(i)}, column {split_col!r}: unknown split "
                            f"{df[split_col].iloc[i]!r}; use train, val or test.")
        mapped = mapped.to_numpy()
        if split == "test" or (split == "val" and (mapped == "val").any()):
            return np.flatnonzero(mapped == split)
        if split == "train" and (mapped == "val").any():
            return np.flatnonzero(mapped == "train")
        train = np.flatnonzero(mapped == "train")  # no val rows: carve val from train
        return train[select_split([patients[i] for i in train], split, val_fraction, seed)]
    rest, test = split_by_patient(patients, test_fraction, seed)
    if split == "test":
        return np.sort(test)
    # val is val_fraction of ALL patients, taken from the non-test part
    frac = val_fraction / (1.0 - test_fraction) if test_fraction < 1 else 0.0
    sub = rest[select_split([patients[i] for i in rest], split, frac, seed + 1)]
    return np.sort(sub)
