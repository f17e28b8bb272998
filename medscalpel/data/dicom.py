"""DICOM radiograph folders (``dicom``): every ``.dcm`` under the root, patients from the DICOM
tags, identifiers pseudonymised.

Pixels: :func:`medscalpel.data.dicom_read.read_dicom` (Modality LUT, then the first VOI LUT /
window or the one ``window=N`` picks, then MONOCHROME1 inversion; float in ``[0, 1]``).
Refused with an error naming the file (or skipped and counted with ``skip_corrupt=true``):
unreadable files, multi-frame, colour, no pixel data, and modalities outside ``modalities``
(default ``CR,DX,DR``; ``modalities=any`` reads every one).

Labels (optional): ``labels=labels.csv`` (relative to the root, or absolute), keyed by
``SOPInstanceUID`` or by ``path`` (relative to the root): ``key=auto`` (default) takes the
``SOPInstanceUID`` column when there is one, else ``path``. ``task=multilabel`` (default; 0/1
columns, ``label_cols=a,b`` or every other numeric column) or ``task=multiclass`` (one
``label_col`` of class names, ``classes=a,b`` for the order). DICOM files without a row are left
out (counted in ``meta["unlabelled_files"]``); rows naming no file are counted
(``meta["label_rows_without_file"]``) with a warning, and a CSV none of whose rows names a file
is an error. Without
``labels`` the dataset is UNLABELLED: ``medscalpel predict`` gives the model's classes with
unknown labels, ``evaluate`` refuses it.

Views: ``ViewPosition`` (0018,5101) of every file is counted in ``meta["views"]`` (``unknown``
when absent); ``views=PA,AP`` keeps only those (``unknown`` may be listed too).

Splits: by PATIENT (``PatientID``; files without one are split one image at a time and
``meta["split_unit"]`` says so): a seeded ``test_fraction`` (0.2) and ``val_fraction`` (0.1) of
the patients; ``all`` = every image. The split is drawn on the real PatientIDs, so it does not
depend on the pseudonym salt.

Identifiers: image ids are ``img-<16 hex>`` pseudonyms of the SOPInstanceUID and patient ids
``pt-<16 hex>`` pseudonyms of the PatientID (HMAC-SHA256 keyed by the secret salt of
:func:`medscalpel.data.dicom_read.load_salt`: per user, or ``salt_file=`` for one experiment's
own); file names never become ids, since they can hold names or IDs too. Patient names, birth
dates, accession numbers and the other tags are never read into the dataset.
``keep_identifiers=true`` opts out: ids are the files' paths relative to the root and patient
ids the raw PatientIDs. ``meta["identifiers"]`` records ``kept`` (else ``pseudonymised``),
``meta["id_source"]`` what the ids are made of, ``meta["key_id"]`` the salt's fingerprint
(equal fingerprints = comparable ids) and ``meta["salt_source"]`` where the salt came from.
The ``folder`` and ``csv`` adapters identify ``.dcm`` files the same way
(:mod:`medscalpel.data.dicom_read` holds the shared steps). :func:`identifiers_kept` tells a
report from the spec string.

Example:
    >>> spec = "dicom:/site/scans?labels=labels.csv&views=PA,AP"
    >>> ds = open_dataset(spec, split="all")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medscalpel.data.base import CXRDataset, Task, record_split_unit, split_by_patient
from medscalpel.data.csvfile import PATIENT_COLUMN
from medscalpel.data.dicom_read import (DICOM_EXTENSIONS, RADIOGRAPHY, DicomFile, dataset_salt,
                                        identifiers, identity_meta, read_dicom, read_headers)
from medscalpel.data.labels import (binary_labels, check_common, csv_row, read_table,
                                    require_columns, require_dir, select_split, split_list_option)
from medscalpel.data.spec import DATASETS, DatasetSpec
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import ConfigError, DataError
from medscalpel.validation import check_fraction, check_in, check_range

logger = logging.getLogger(__name__)

UID_KEY = "SOPInstanceUID"
PATH_KEY = "path"
UNKNOWN_VIEW = "unknown"


class DicomDataset(CXRDataset):
    """DICOM radiographs read with one VOI choice; ``views`` holds each row's view position."""

    name = "dicom"

    def __init__(self, files: list[DicomFile], ids: list[str], labels: np.ndarray,
                 class_names: list[str], task: Task, patient_ids: list[str | None],
                 preprocess: Preprocess | None, split: str, window: int, voi: bool,
                 modalities: tuple[str, ...] | None, meta: dict[str, Any]):
        super().__init__(preprocess, spec="dicom", split=split)
        self.files = list(files)
        self.paths = [f.path for f in self.files]
        self.views = [f.view for f in self.files]
        self.window, self.voi, self.modalities = int(window), bool(voi), modalities
        self._set_tables(ids, labels, class_names, task, patient_ids)
        self.meta = dict(meta)

    def load_raw(self, index: int) -> np.ndarray:
        return read_dicom(self.paths[index], window=self.window, voi=self.voi,
                          modalities=self.modalities)

    def with_classes(self, class_names: list[str], task: Task) -> "DicomDataset":
        """This unlabelled dataset in a model's classes with unknown labels (NaN multi-label;
        class 0 as a placeholder multi-class, which ``predict`` replaces by -1)."""
        if not self.meta.get("unlabelled"):
            raise DataError(f"{self.spec}: with_classes is for unlabelled DICOM folders; this one "
                            "has labels.")
        n, k = len(self), len(class_names)
        labels = np.full((n, k), np.nan, np.float32) if task == "multilabel" else \
            np.zeros(n, np.int64)
        out = DicomDataset(self.files, self.ids, labels, list(class_names), task,
                           self.patient_ids, self.preprocess, self.split, self.window, self.voi,
                           self.modalities, self.meta)
        out.spec, out.skip_report = self.spec, self.skip_report
        return out


# ----------------------------------------------------------------------------- adapter
@DATASETS.register("dicom", help="a folder of DICOM radiographs (+ a label CSV keyed by "
                                 "SOPInstanceUID or path); patient ids pseudonymised")
def open_dicom(root: str | None, split: str = "train", preprocess: Preprocess | None = None,
               labels: str | None = None, key: str = "auto", task: str = "multilabel",
               label_cols: str | None = None, label_col: str = "label",
               classes: str | None = None, views: str | None = None,
               modalities: str = "CR,DX,DR", window: int = 0, voi: bool = True,
               keep_identifiers: bool = False, salt_file: str | None = None,
               val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
               skip_corrupt: bool = False) -> CXRDataset:
    """Open a folder of DICOM radiographs (see the module docstring).

    Args:
        root: the folder; every ``.dcm`` / ``.dicom`` below it is read (hidden ones skipped).
        split: ``train``, ``val``, ``test`` or ``all``.
        labels: label CSV (relative to ``root`` or absolute); none = unlabelled.
        key: ``auto``, ``SOPInstanceUID`` or ``path``: the CSV column naming each image.
        task, label_cols, label_col, classes: the labels (as the ``csv`` adapter's).
        views: comma-separated view positions to keep (``PA,AP``; ``unknown`` = no tag).
        modalities: comma-separated accepted modalities, or ``any``.
        window: which VOI LUT / window center-width pair (0 = the first).
        voi: apply the VOI LUT / window (``false``: the full stored range).
        keep_identifiers: ids = file paths and raw PatientIDs instead of pseudonyms.
        salt_file: this experiment's own salt file (created the first time; keep it out of
            run directories) instead of the per-user salt (:func:`load_salt`).
        val_fraction, test_fraction, seed: the seeded patient-wise split.
        skip_corrupt: skip unusable files (counted in ``dataset.skip_report``) instead of
            stopping at the first.
    """
    check_common("dicom", split, val_fraction, seed)
    check_fraction(test_fraction, "test_fraction", "the 'dicom' adapter")
    check_in(task, "task", "the 'dicom' adapter", ("multilabel", "multiclass"))
    check_range(window, "window", "the 'dicom' adapter", 0, integer=True)
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"The 'val_fraction' + 'test_fraction' of the 'dicom' adapter must be "
                          f"below 1. Got {val_fraction} + {test_fraction} instead.")
    base = require_dir(root, "dicom", "dicom:/site/scans")
    if not base.is_dir():
        raise DataError(f"{base} is a file; the 'dicom' adapter takes a folder of DICOM files "
                        "(one file: give its path to 'medscalpel predict --data').")
    accepted = _modalities(modalities)
    salt, salt_source = dataset_salt(keep_identifiers, salt_file)
    files, skipped = scan(base, accepted, window if voi else None, skip_corrupt, salt=salt)
    files, n_dup = _unique(files)
    view_counts = Counter(f.view or UNKNOWN_VIEW for f in files)
    wanted = _views(views)
    if wanted is not None:
        files = [f for f in files if (f.view or UNKNOWN_VIEW) in wanted]
    meta: dict[str, Any] = {
        "root": str(base), **identity_meta(keep_identifiers, salt, salt_source),
        "n_files": len(files) + n_dup + len(skipped), "duplicates_removed": n_dup,
        "views": dict(sorted(view_counts.items())), "views_kept": wanted,
        "modalities": list(accepted) if accepted else "any", "window": window, "voi": voi,
        "labels": None, "label_key": None, "unlabelled": labels is None, "unlabelled_files": 0,
        "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
    }
    if labels is None:
        y, class_names, task_ = np.zeros((len(files), 0), np.float32), [], "multilabel"
    else:
        files, y, class_names, task_, info = _labels(base, labels, key, task, label_cols,
                                                     label_col, classes, files)
        meta.update(info)
    patients = [f.patient for f in files]
    rows = split_rows(patients, split, val_fraction, test_fraction, seed)
    chosen = [files[i] for i in rows]
    ids, pids = identifiers(chosen, salt, keep_identifiers)
    ds = DicomDataset(chosen, ids, y[rows], class_names, task_, pids, preprocess, split,
                      window, voi, accepted, meta)
    ds.skip_report.skipped.extend(skipped)
    ds.meta["skipped"] = len(skipped)
    # the split unit is counted on the real ids: the same patients as the pseudonyms
    record_split_unit(ds, patients, basis="seeded split, patient = DICOM PatientID",
                      key=f"dicom:{base}")
    return ds.require_nonempty()


#: the adapters that read DICOM files and take ``keep_identifiers``
KEEPS_IDENTIFIERS = ("dicom", "folder", "csv")


def identifiers_kept(spec: str) -> bool:
    """Whether a dataset spec string asks a DICOM-reading adapter (:data:`KEEPS_IDENTIFIERS`)
    to keep identifiers (``keep_identifiers=true``): a report made from its predictions must
    say so.

    >>> identifiers_kept("dicom:/s?keep_identifiers=true"), identifiers_kept("dicom:/s")
    (True, False)
    >>> identifiers_kept("csv:/s/labels.csv?keep_identifiers=true")
    True
    """
    try:
        parsed = DatasetSpec.parse(spec)
    except Exception:  # noqa: BLE001 - an unparsable spec is not a dicom spec
        return False
    return (parsed.adapter in KEEPS_IDENTIFIERS
            and parsed.options.get("keep_identifiers") is True)


# ----------------------------------------------------------------------------- steps
def _modalities(value: Any) -> tuple[str, ...] | None:
    names = split_list_option(value)
    if names is None or [n.lower() for n in names] == ["any"]:
        return None if names else RADIOGRAPHY
    return tuple(n.upper() for n in names)


def _views(value: Any) -> list[str] | None:
    names = split_list_option(value)
    if names is None:
        return None
    return [UNKNOWN_VIEW if n.lower() == UNKNOWN_VIEW else n.upper() for n in names]


def list_dicom_files(base: Path) -> list[Path]:
    """Every ``.dcm`` / ``.dicom`` file under ``base`` (sorted; hidden files and folders
    skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(DICOM_EXTENSIONS)]
    return out


def scan(base: Path, modalities: tuple[str, ...] | None, window: int | None, skip: bool,
         progress: bool | None = None, salt: bytes | None = None
         ) -> tuple[list[DicomFile], list[tuple[str, str]]]:
    """Read the header of every DICOM file under ``base`` (:func:`read_headers`).

    Raises:
        DataError: no DICOM file under ``base``; without ``skip``, the first bad file.
    """
    paths = list_dicom_files(base)
    if not paths:
        raise DataError(f"No DICOM file ({', '.join(DICOM_EXTENSIONS)}) under {base}. Point the "
                        "'dicom' spec at the folder that holds the exported images.")
    rels = [p.relative_to(base).as_posix() for p in paths]
    return read_headers(paths, rels, modalities, window, skip, progress, what="dicom", salt=salt)


def _unique(files: list[DicomFile]) -> tuple[list[DicomFile], int]:
    """The first file of each SOPInstanceUID (copies of one image must not sit in two
    splits); files without a UID are kept."""
    seen: set[str] = set()
    out = []
    for f in files:
        if f.uid and f.uid in seen:
            continue
        seen.add(f.uid)
        out.append(f)
    if len(out) < len(files):
        logger.warning("dicom: %d file(s) repeat an image (same SOPInstanceUID) and were left "
                       "out", len(files) - len(out))
    return out, len(files) - len(out)


def split_rows(patients: list[str | None], split: str, val_fraction: float,
               test_fraction: float, seed: int) -> np.ndarray:
    """Rows of ``split``: ``test_fraction`` of the patients to test, ``val_fraction`` (of
    all patients) to val, the rest to train; no patient in two splits."""
    if split == "all":
        return np.arange(len(patients))
    rest, test = split_by_patient(patients, test_fraction, seed)
    if split == "test":
        return np.sort(test)
    frac = val_fraction / (1.0 - test_fraction)
    return np.sort(rest[select_split([patients[i] for i in rest], split, frac, seed + 1)])


def _labels(base: Path, labels: str, key: str, task: str, label_cols: str | None,
            label_col: str, classes: str | None, files: list[DicomFile]
            ) -> tuple[list[DicomFile], np.ndarray, list[str], Task, dict[str, Any]]:
    """Match the label CSV's rows to the files; returns the labelled files, their labels,
    the class names, the task and what the meta records."""
    csv_path = Path(labels).expanduser()
    csv_path = csv_path if csv_path.is_absolute() else base / csv_path
    header = list(read_table(csv_path, (), what="DICOM label CSV", nrows=0).columns)
    key_col = _key_column(key, header, csv_path)
    df = read_table(csv_path, [key_col] + ([label_col] if task == "multiclass" else []),
                    what="DICOM label CSV", dtype={key_col: str})
    keys = [_norm_key(v, key_col) for v in df[key_col].fillna("").astype(str)]
    blank = [i for i, k in enumerate(keys) if not k]
    if blank:
        raise DataError(f"{csv_path}, line {csv_row(blank[0])}, column {key_col!r}: empty. Fill "
                        "it in or remove the row.")
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k in first:
            raise DataError(f"{csv_path}, line {csv_row(i)}, column {key_col!r}: {k!r} repeats "
                            f"line {csv_row(first[k])}; one row per image.")
        first[k] = i
    y, class_names = _label_matrix(df, task, key_col, label_cols, label_col, classes, csv_path)
    file_key = {(f.uid if key_col == UID_KEY else f.rel): f for f in files}
    known = set(file_key)
    # rows whose file exists but was filtered out (views) are fine; rows naming no file are not
    missing = [k for k in keys if k not in known]
    scanned = {f.uid for f in files} | {f.rel for f in files}
    unknown = [k for k in missing if k not in scanned]
    if unknown and len(unknown) == len(keys):
        raise DataError(f"No row of {csv_path} names a DICOM file under {base} (column "
                        f"{key_col!r}, e.g. {unknown[0]!r}). Check the key column and the root.")
    rows = [i for i, k in enumerate(keys) if k in known]
    matched = [file_key[keys[i]] for i in rows]
    info = {"labels": str(csv_path), "label_key": key_col,
            "unlabelled_files": len(files) - len(matched),
            "label_rows_filtered": len(missing) - len(unknown),
            "label_rows_without_file": len(unknown)}
    if info["unlabelled_files"]:
        logger.warning("dicom: %d file(s) have no row in %s and were left out",
                       info["unlabelled_files"], csv_path.name)
    if unknown:
        logger.warning("dicom: %d row(s) of %s name no DICOM file under the root (or one that "
                       "was skipped)", len(unknown), csv_path.name)
    return matched, y[rows], class_names, task, info  # type: ignore[return-value]


def _key_column(key: str, header: list[str], csv_path: Path) -> str:
    k = str(key).strip()
    if k.lower() == "auto":
        if UID_KEY in header:
            return UID_KEY
        if PATH_KEY in header:
            return PATH_KEY
        raise DataError(f"The DICOM label CSV {csv_path} has neither a {UID_KEY!r} nor a "
                        f"{PATH_KEY!r} column (it has {header}); add one, or name the key "
                        "column with key=.")
    if k not in header:
        raise DataError(f"The DICOM label CSV {csv_path} has no key column {k!r}; it has "
                        f"{header}.")
    return k


def _norm_key(value: str, key_col: str) -> str:
    v = str(value).strip()
    if key_col == UID_KEY:
        return v
    v = v.replace("\\", "/")
    while v.startswith("./"):
        v = v[2:]
    return v


def _label_matrix(df: pd.DataFrame, task: str, key_col: str, label_cols: str | None,
                  label_col: str, classes: str | None, csv_path: Path
                  ) -> tuple[np.ndarray, list[str]]:
    if task == "multilabel":
        cols = split_list_option(label_cols)
        if cols is None:
            cols = [c for c in df.columns if c != key_col and c not in (UID_KEY, PATH_KEY)
                    and not PATIENT_COLUMN.match(str(c).strip()) and c.lower() != "split"
                    and pd.api.types.is_numeric_dtype(df[c])]
            if not cols:
                raise DataError(f"The DICOM label CSV {csv_path} has no numeric label column "
                                f"besides {key_col!r}; it has {list(df.columns)}. Add 0/1 "
                                "columns or name them with label_cols=a,b,c.")
        else:
            require_columns(df, cols, csv_path, "DICOM label CSV")
        return binary_labels(df, cols, csv_path, blank=np.nan), list(cols)
    names = df[label_col].fillna("").astype(str).str.strip()
    if names.eq("").any():
        i = int(np.flatnonzero(names.eq("").to_numpy())[0])
        raise DataError(f"{csv_path}, line {csv_row(i)}, column {label_col!r}: empty class "
                        "name. Fill it in or remove the row.")
    class_names = split_list_option(classes) or sorted(names.unique())
    index = {c: k for k, c in enumerate(class_names)}
    bad = ~names.isin(list(index))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{csv_path}, line {csv_row(i)}, column {label_col!r}: unknown class "
                        f"{names.iloc[i]!r}; the classes are {class_names}.")
    return names.map(index).to_numpy(np.int64), list(class_names)
