"""Image folders (``folder``): one subfolder per class (multi-class).

Works for Kermany pneumonia (``train/NORMAL``, ``train/PNEUMONIA``), COVID-QU-Ex (a class folder's
``images/`` subfolder is used and its ``lung masks/`` ignored), LC25000 (colour histopathology:
pass ``colour=true`` with ``Preprocess(colour=True)``) and any similar layout. Images are found
recursively inside each class folder; hidden files and folders whose name contains ``mask`` are
skipped. Class names are the folder names (sorted), or the ``classes=a,b,c`` option (subset and
order).

De-duplication (``dedup=true``, the default): files are hashed (sha256 of the bytes); of each
group of byte-identical files one is kept (the first by path), so no image can sit in two
splits; a group whose copies lie in different class folders is dropped entirely (its label is
contradictory). What was found is in ``dataset.meta["dedup"]``.

Splits: a seeded split stratified by class: ``test_fraction`` (default 0.2) and ``val_fraction``
(default 0.1) of each class's images go to test and val, the rest to train; ``all`` = every
image. Splits are by PATIENT: ``patient_regex`` is a regular expression whose first group,
searched in the file name, is the patient id; the default ``auto`` is :data:`KERMANY_PATIENT`
(``person<N>_...``, ``IM-<N>-...``, ``NORMAL2-IM-<N>-...``), ``none`` turns it off. All images of
a patient go to the same split; files without a patient id are split one image at a time, a
warning says so once and ``dataset.meta["split_unit"]`` records it (see
:func:`~medscalpel.data.base.split_warning`). In a spec string write ``+`` as ``%2B``.

DICOM folders (every image a ``.dcm`` / ``.dicom`` file) are identified as the ``dicom``
adapter identifies them (:mod:`medscalpel.data.dicom_read`): image ids are ``img-<16 hex>``
pseudonyms of the SOPInstanceUID and patient ids ``pt-<16 hex>`` pseudonyms of the PatientID
(never the file names, which can hold identifiers), the split is drawn on the real PatientIDs,
copies of one SOPInstanceUID are kept once (``dedup``), headers are checked when the dataset is
opened (``skip_corrupt=true`` skips unusable files, listed by pseudonym) and
``keep_identifiers=true`` / ``salt_file=`` work as there; ``meta`` records ``identifiers``,
``id_source``, ``key_id`` and ``salt_source``. A folder that mixes DICOM and other image files
is refused (:func:`~medscalpel.data.dicom_read.dicom_only`: the two kinds' patients cannot be
matched).

Unreadable images: ``train`` checks every file of the splits it uses before it starts
(:func:`medscalpel.data.scan.require_readable`) and names the bad ones; ``skip_corrupt=true``
drops them when the dataset is opened (each file decoded once; they are listed in
``dataset.skip_report``). Pixels are read at their real bit depth
(:func:`medscalpel.data.io.read_image`).

Example:
    >>> ds = open_dataset("folder:/data/kermany/train?dedup=true", split="test")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.data.base import CXRDataset, record_split_unit
from medscalpel.data.dicom_read import (RADIOGRAPHY, dataset_salt, dicom_only, identifiers,
                                        identity_meta, read_headers)
from medscalpel.data.io import IMAGE_EXTENSIONS
from medscalpel.data.labels import (ImageFileDataset, check_common, finish, require_dir,
                                    split_list_option)
from medscalpel.data.spec import DATASETS
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import ConfigError, DataError
from medscalpel.progress import track
from medscalpel.validation import check_fraction


#: Kermany et al. (2018) file names: ``person1000_bacteria_2931.jpeg`` (patient ``person1000``),
#: ``IM-0115-0001.jpeg`` (``IM-0115``), ``NORMAL2-IM-0381-0001.jpeg`` (``NORMAL2-IM-0381``).
KERMANY_PATIENT = r"^(person[0-9]+|NORMAL2-IM-[0-9]+|IM-[0-9]+)(?=[_-])"


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def list_class_images(class_dir: Path) -> list[Path]:
    """Image files of one class folder (its ``images/`` subfolder when it has one)."""
    top = class_dir / "images" if (class_dir / "images").is_dir() else class_dir
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d) and "mask" not in d.lower())
        for f in sorted(filenames):
            if not _hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(Path(dirpath) / f)
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def deduplicate(paths: list[Path], labels: np.ndarray, names: list[str],
                progress: bool | None = None, keys: list[str | None] | None = None
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """Rows to keep after removing byte-identical copies, and a report.

    Args:
        names: each row's id, as the report's examples name it.
        keys: what makes two rows one image (DICOM files: their SOPInstanceUID); a ``None``
            key, or no ``keys``, falls back to the sha256 of the file's bytes.

    Returns:
        ``(keep_indices, report)``; the report counts files, duplicate groups, removed copies
        and label conflicts, with a few example groups.
    """
    groups: dict[str, list[int]] = {}
    for i in track(range(len(paths)), "hashing images", progress=progress):
        key = keys[i] if keys is not None else None
        groups.setdefault(f"uid:{key}" if key else file_sha256(paths[i]), []).append(i)
    keep, dup_groups, conflicts = [], [], []
    for members in groups.values():
        if len(members) == 1:
            keep.append(members[0])
            continue
        members = sorted(members, key=lambda i: str(paths[i]))
        dup_groups.append([names[i] for i in members])
        if len({int(labels[i]) for i in members}) > 1:
            conflicts.append([names[i] for i in members])
            continue
        keep.append(members[0])
    report = {
        "n_files": len(paths),
        "n_unique": len(groups),
        "duplicate_groups": len(dup_groups),
        "duplicates_removed": len(paths) - len(keep),
        "label_conflicts": len(conflicts),
        "conflict_files_removed": sum(len(g) for g in conflicts),
        "examples": dup_groups[:10],
    }
    return np.array(sorted(keep), dtype=np.int64), report


def stratified_group_split(labels: np.ndarray, groups: list[str], val_fraction: float,
                           test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded split of rows into train/val/test, stratified by class, whole groups at a time.

    Per class, the groups (labelled by their first row's class) are shuffled and dealt to test
    until it holds ``round(n * test_fraction)`` images, then to val, the rest to train.
    """
    first: dict[str, int] = {}
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
        members.setdefault(g, []).append(i)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    classes = sorted({int(labels[first[g]]) for g in members})
    for c in classes:
        gs = sorted(g for g in members if int(labels[first[g]]) == c)
        rng = np.random.default_rng([seed, c])
        rng.shuffle(gs)
        n = sum(len(members[g]) for g in gs)
        target = {"test": round(n * test_fraction), "val": round(n * val_fraction)}
        count = {"test": 0, "val": 0}
        for g in gs:
            if count["test"] < target["test"]:
                s = "test"
            elif count["val"] < target["val"]:
                s = "val"
            else:
                s = "train"
            out[s] += members[g]
            if s in count:
                count[s] += len(members[g])
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in out.items()}


def patients_from_names(names: list[str], patient_regex: str | None) -> list[str | None]:
    """The patient id of each file name (``None`` where the pattern does not match).

    Args:
        patient_regex: a regex whose first group (else whole match) is the id; ``auto`` =
            :data:`KERMANY_PATIENT`; ``None`` / ``""`` / ``none`` = no ids.
    """
    if patient_regex is None or str(patient_regex).strip().lower() in ("", "none", "false"):
        return [None] * len(names)
    pattern = KERMANY_PATIENT if str(patient_regex).strip().lower() == "auto" else str(patient_regex)
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"The 'patient_regex' parameter of the 'folder' adapter must be a "
                          f"regular expression. Got {patient_regex!r} instead ({exc}).") from exc
    out: list[str | None] = []
    for name in names:
        m = rx.search(name)
        out.append((m.group(1) if m.groups() else m.group(0)) if m else None)
    return out


@DATASETS.register("folder", help="one subfolder per class (Kermany, COVID-QU-Ex, LC25000)")
def open_folder(root: str | None, split: str = "train", preprocess: Preprocess | None = None,
                dedup: bool = True, val_fraction: float = 0.1, test_fraction: float = 0.2,
                seed: int = 0, colour: bool = False, classes: str | None = None,
                patient_regex: str | None = "auto", keep_identifiers: bool = False,
                salt_file: str | None = None, skip_corrupt: bool = False) -> CXRDataset:
    """Open a class-per-subfolder image collection (see the module docstring).

    Args:
        root: the folder holding one subfolder per class.
        split: ``train``, ``val``, ``test`` or ``all``.
        dedup: drop byte-identical copies (sha256) before splitting.
        val_fraction, test_fraction: per-class fractions of images for val and test.
        seed: seed of the split.
        colour: keep RGB (colour data such as LC25000); needs ``Preprocess(colour=True)``.
        classes: comma-separated class folder names to use, in this order.
        patient_regex: regex whose first group in a file name is the patient id; ``auto``
            (default) = :data:`KERMANY_PATIENT`; ``none`` = split by image. Not for DICOM
            folders (their patient is the PatientID tag).
        keep_identifiers, salt_file: DICOM folders only, as the ``dicom`` adapter's.
        skip_corrupt: drop unreadable images (recorded in ``dataset.skip_report``).
    """
    check_common("folder", split, val_fraction, seed)
    check_fraction(test_fraction, "test_fraction", "the 'folder' adapter")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"The 'val_fraction' + 'test_fraction' of the 'folder' adapter must be "
                          f"below 1. Got {val_fraction} + {test_fraction} instead.")
    base = require_dir(root, "folder", "folder:/data/kermany/train")
    if not base.is_dir():
        raise DataError(f"{base} is a file; the 'folder' adapter takes a folder holding one "
                        "subfolder per class.")
    present = sorted(p.name for p in base.iterdir() if p.is_dir() and not _hidden(p.name))
    wanted = split_list_option(classes)
    if wanted is None:
        wanted = present
    unknown = [c for c in wanted if c not in present]
    if unknown:
        raise DataError(f"Unknown class name(s) {unknown} for {base}: its class folders are "
                        f"{present}. Fix the 'classes' option.")
    if len(wanted) < 2:
        raise DataError(f"{base} needs at least two class subfolders (one per class); found "
                        f"{present}. Point the spec at the folder that holds the class folders.")
    paths: list[Path] = []
    labels: list[int] = []
    for k, c in enumerate(wanted):
        files = list_class_images(base / c)
        if not files:
            raise DataError(f"Class folder {base / c} holds no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)}). Add images or drop the class.")
        paths += files
        labels += [k] * len(files)
    y = np.asarray(labels, dtype=np.int64)
    ids = [p.relative_to(base).as_posix() for p in paths]
    meta: dict[str, Any] = {"root": str(base), "dedup": None, "val_fraction": val_fraction,
                            "test_fraction": test_fraction, "seed": seed}
    if dicom_only(paths, f"The folder {base}"):
        return _open_dicom_folder(base, paths, ids, y, wanted, split, preprocess, meta,
                                  dedup, patient_regex, keep_identifiers, salt_file,
                                  skip_corrupt)
    if keep_identifiers or salt_file:
        raise ConfigError(f"The 'keep_identifiers' and 'salt_file' options of the 'folder' "
                          f"adapter are for DICOM folders; {base} holds no .dcm file. Remove "
                          "them.")
    if dedup:
        keep, report = deduplicate(paths, y, ids)
        meta["dedup"] = report
        paths, y, ids = [paths[i] for i in keep], y[keep], [ids[i] for i in keep]
    patients = patients_from_names([p.name for p in paths], patient_regex)
    rows = _split(y, ids, patients, split, val_fraction, test_fraction, seed)
    ds = ImageFileDataset("folder", [paths[i] for i in rows], [ids[i] for i in rows], y[rows],
                          wanted, "multiclass", [patients[i] for i in rows], preprocess,
                          split, colour=colour, meta=meta)
    record_split_unit(ds, patients, basis=f"patient_regex={patient_regex}",
                      key=f"folder:{base}")
    return finish(ds, skip_corrupt)


def _split(y: np.ndarray, ids: list[str], patients: list[str | None], split: str,
           val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Rows of ``split``: the class-stratified split of whole patients (rows without one as
    single images)."""
    if split == "all":
        return np.arange(len(ids))
    groups = [pid if pid is not None else f"__file:{ids[i]}" for i, pid in enumerate(patients)]
    return stratified_group_split(y, groups, val_fraction, test_fraction, seed)[split]


def _open_dicom_folder(base: Path, paths: list[Path], rels: list[str], y: np.ndarray,
                       classes: list[str], split: str, preprocess: Preprocess | None,
                       meta: dict[str, Any], dedup: bool, patient_regex: str | None,
                       keep: bool, salt_file: str | None, skip: bool) -> CXRDataset:
    """A class-per-subfolder collection of DICOM files, identified as the ``dicom`` adapter
    identifies them: ids and patients from the SOPInstanceUID / PatientID tags (pseudonymised
    unless ``keep``), the split drawn on the real PatientIDs, copies of one SOPInstanceUID kept
    once. Headers are read (and checked) before the split."""
    if str(patient_regex).strip().lower() != "auto":
        raise ConfigError(f"The 'patient_regex' option of the 'folder' adapter reads patients "
                          f"from file names; the DICOM files of {base} take their patient from "
                          "the PatientID tag. Remove the option.")
    salt, source = dataset_salt(keep, salt_file)
    files, skipped = read_headers(paths, rels, RADIOGRAPHY, 0, skip, what="folder", salt=salt)
    index = {p: i for i, p in enumerate(paths)}
    y = y[[index[f.path] for f in files]]
    ids, pids = identifiers(files, salt, keep)
    meta.update(identity_meta(keep, salt, source), n_files=len(paths))
    if dedup:
        keep_rows, report = deduplicate([f.path for f in files], y, ids,
                                        keys=[f.uid or None for f in files])
        report["key"] = "SOPInstanceUID (sha256 of the bytes without one)"
        meta["dedup"] = report
        files, y = [files[i] for i in keep_rows], y[keep_rows]
        ids, pids = [ids[i] for i in keep_rows], [pids[i] for i in keep_rows]
    patients = [f.patient for f in files]
    rows = _split(y, ids, patients, split, meta["val_fraction"], meta["test_fraction"],
                  meta["seed"])
    ds = ImageFileDataset("folder", [files[i].path for i in rows], [ids[i] for i in rows],
                          y[rows], classes, "multiclass", [pids[i] for i in rows], preprocess,
                          split, meta=meta)
    ds.skip_report.skipped.extend(skipped)
    # the split unit is counted on the real ids: the same patients as the pseudonyms
    record_split_unit(ds, patients, basis="class-stratified split, patient = DICOM PatientID",
                      key=f"folder:{base}")
    return finish(ds, skip_corrupt=False)  # unusable headers were skipped above
