"""Reading one DICOM radiograph, and the pseudonyms that keep patient identifiers inside.

Pixels (:func:`read_dicom`), in the order DICOM PS3.3 C.11 prescribes:

1. the stored values, unused high bits masked (``BitsStored`` of ``BitsAllocated``; pydicom);
2. the Modality LUT: ``RescaleSlope`` / ``RescaleIntercept`` or a Modality LUT Sequence
   (:func:`pydicom.pixels.apply_modality_lut`);
3. the VOI LUT: a VOI LUT Sequence item or a window center / width pair, the first one unless
   ``window`` picks another (:func:`pydicom.pixels.apply_voi_lut`; LINEAR, LINEAR_EXACT and
   SIGMOID windows); ``voi=False`` skips it;
4. scaled to ``[0, 1]`` by the output range DICOM defines for that step: the VOI LUT's entry
   bits, the window's output range (the stored range through the rescale, as pydicom computes
   it), or without a VOI the stored range ``[0, 2**BitsStored - 1]`` through the rescale (no
   per-image min/max stretch, so brightness means the same in every image);
5. MONOCHROME1 (white = low values) inverted, so bone is bright in every image.

Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) decode through pydicom's plugins
(``pip install 'medscalpel[dicom]'`` brings python-gdcm and pylibjpeg-openjpeg). Refused, with a
one-line :class:`~medscalpel.errors.DataError` naming the file: multi-frame images, colour
(``SamplesPerPixel`` != 1 or a photometric interpretation other than MONOCHROME1/2), files
without pixel data, and modalities other than chest radiography (``CR``, ``DX``, ``DR``; pass
``modalities=None`` to accept any).

Pseudonyms (:func:`pseudonym`): ``img-<16 hex>`` / ``pt-<16 hex>``, an HMAC-SHA256 of the
identifier keyed by a secret salt (:func:`load_salt`): a dataset spec's ``salt_file=`` (one
experiment's own salt), else the ``MEDSCALPEL_DICOM_SALT`` environment variable, else the file
``MEDSCALPEL_DICOM_SALT_FILE`` names, else a random 256-bit salt created once per user in
``~/.config/medscalpel/dicom-salt`` (salt files are created with mode 0600). The salt is never
written to a run directory: only its fingerprint (:func:`key_id`) and its source, so two runs
can tell whether their pseudonyms are comparable. The same salt gives the same ids for the same
images, so predictions of the same data pair up across runs; exports made with different salts
cannot be linked; without the secret, an id cannot be turned back into the identifier, even for
short patient numbers.

Dataset files (the steps the ``dicom``, ``folder`` and ``csv`` adapters share, one
implementation): :func:`read_headers` (every file's header checked, UIDs / PatientID / view
kept, unusable files refused or skipped by pseudonym), :func:`identifiers` (image and patient
ids: pseudonyms, or the paths and raw PatientIDs when kept), :func:`identity_meta` (what the
dataset's meta records about them), :func:`dataset_salt` and :func:`dicom_only` (a dataset is
all DICOM or has none: a mix is refused).

Example:
    >>> img = read_dicom("/site/scans/1.2.826.0.1.dcm")  # doctest: +SKIP
    >>> img.dtype, float(img.min()) >= 0.0, float(img.max()) <= 1.0  # doctest: +SKIP
    (dtype('float32'), True, True)
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.errors import ConfigError, DataError, optional_import
from medscalpel.progress import track

logger = logging.getLogger(__name__)

#: file name endings read as DICOM (compared in lower case)
DICOM_EXTENSIONS = (".dcm", ".dicom")
#: modalities of chest radiographs: computed / digital radiography (``DR`` is not a DICOM
#: modality but some vendors write it)
RADIOGRAPHY = ("CR", "DX", "DR")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
SALT_ENV = "MEDSCALPEL_DICOM_SALT"
SALT_FILE_ENV = "MEDSCALPEL_DICOM_SALT_FILE"
#: the shortest salt accepted from the environment (a short secret can be guessed)
MIN_SALT_CHARS = 16
#: where :func:`load_salt` found the salt: a spec's ``salt_file=`` option, the
#: ``MEDSCALPEL_DICOM_SALT`` variable, the ``MEDSCALPEL_DICOM_SALT_FILE`` file, the per-user file
SALT_SOURCES = ("spec", "env", "file", "user")
PREFIXES = {"image": "img", "patient": "pt", "file": "file"}


def is_dicom_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a DICOM file by its ending (``.dcm``, ``.dicom``)."""
    return str(path).lower().endswith(DICOM_EXTENSIONS)


def _pydicom():
    return optional_import("pydicom", "dicom", "reading DICOM files")


# ----------------------------------------------------------------------------- headers
def read_header(path: str | os.PathLike) -> Any:
    """The DICOM dataset of ``path`` without loading its pixel data (values over 1 KB are
    deferred), or :class:`DataError` naming the file when it is not readable DICOM."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(str(path), defer_size="1 KB")
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, KeyError,
            TypeError) as exc:
        raise DataError(f"Cannot read DICOM file {path}: {exc}. It is corrupt, truncated or "
                        "not DICOM; remove it or add ?skip_corrupt=true to the dataset spec."
                        ) from exc


def check_radiograph(ds: Any, path: str | os.PathLike,
                     modalities: Sequence[str] | None = RADIOGRAPHY) -> None:
    """Refuse what is not one grey radiograph: no pixel data, several frames, colour, or (when
    ``modalities`` is given) another modality. The message names the file and the fix."""
    if "PixelData" not in ds:
        raise DataError(f"DICOM file {path} holds no pixel data (a report, structured report or "
                        "presentation state?); remove it from the image folder.")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"DICOM file {path} is multi-frame ({frames} frames); a chest "
                        "radiograph has one frame. Export the frame you want as its own file.")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if spp != 1 or photometric not in MONOCHROME:
        what = photometric or "no photometric interpretation"
        raise DataError(f"DICOM file {path} is a colour image ({what}, {spp} samples per "
                        "pixel); only grey MONOCHROME1/2 radiographs are read.")
    modality = str(ds.get("Modality", "")).strip().upper()
    if modalities is not None and modality not in {m.upper() for m in modalities}:
        raise DataError(f"DICOM file {path} has modality {modality or '(none)'!r}, not a chest "
                        f"radiograph ({', '.join(modalities)}). Remove it, or add "
                        "?modalities=any to the dataset spec to read it anyway.")


def view_position(ds: Any) -> str:
    """The view position tag (0018,5101) in upper case (``PA``, ``AP``, ``LL``, ...); ``""``
    when absent."""
    return str(ds.get("ViewPosition", "") or "").strip().upper()


def n_voi(ds: Any) -> int:
    """How many VOI transforms a file offers: VOI LUT Sequence items, else window pairs."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        return len(ds.VOILUTSequence)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        from pydicom.multival import MultiValue  # pydicom: the optional [dicom] extra

        return len(ds.WindowCenter) if isinstance(ds.WindowCenter, MultiValue) else 1
    return 0


# ----------------------------------------------------------------------------- pixels
def _stored_range(ds: Any) -> tuple[float, float]:
    """The range of the Modality LUT's output (PS3.3 C.11.1; as pydicom's windowing)."""
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** bits - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2 ** bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        a, b = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
        lo, hi = min(a, b), max(a, b)
    return lo, hi


def decode(ds: Any, path: str | os.PathLike = "", window: int = 0, voi: bool = True
           ) -> np.ndarray:
    """The pixels of a checked DICOM dataset as float32 ``[H, W]`` in ``[0, 1]`` (see the
    module docstring for the steps).

    Args:
        window: which VOI LUT / window pair to apply (0 = the first).
        voi: apply the VOI LUT / window; ``False`` shows the full stored range.

    Raises:
        DataError: the pixels cannot be decoded (a compressed syntax without its plugin: the
            message names the extra) or ``window`` is beyond the file's windows.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut  # the [dicom] extra

    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - every decoder failure names the file
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise DataError(f"Cannot decode the pixels of DICOM file {path} (transfer syntax "
                        f"{name}): {str(exc).splitlines()[0]}. Install the decoders with "
                        "pip install 'medscalpel[dicom]', or remove the file.") from exc
    if stored.ndim != 2:
        raise DataError(f"DICOM file {path}: pixel array of shape {stored.shape}; one grey "
                        "frame [rows, columns] is expected.")
    values = np.asarray(apply_modality_lut(stored, ds))
    lo, hi = _stored_range(ds)
    n = n_voi(ds) if voi else 0
    if n:
        if not 0 <= int(window) < n:
            raise DataError(f"DICOM file {path} offers {n} VOI window(s)/LUT(s); window={window} "
                            f"does not exist (use 0 to {n - 1}, or voi=false).")
        lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
        if lut and values.dtype.kind == "f":  # a LUT is indexed by whole values
            values = np.rint(values).astype(np.int64)
        values = apply_voi_lut(values, ds, index=int(window), prefer_lut=True)
        if lut:
            bits = int(ds.VOILUTSequence[int(window)].LUTDescriptor[2])
            lo, hi = 0.0, float(2 ** bits - 1)
    values = np.asarray(values, dtype=np.float64)
    if hi <= lo:
        raise DataError(f"DICOM file {path}: empty output range [{lo}, {hi}] (check "
                        "BitsStored / RescaleSlope).")
    out = np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        out = 1.0 - out
    return out


def read_dicom(path: str | os.PathLike, window: int = 0, voi: bool = True,
               modalities: Sequence[str] | None = RADIOGRAPHY) -> np.ndarray:
    """Read one DICOM radiograph as float32 ``[H, W]`` in ``[0, 1]`` (bright = dense).

    Args:
        window: which VOI LUT / window center-width pair (0 = the first).
        voi: apply it (``False``: the full stored range).
        modalities: accepted modalities; ``None`` accepts any.

    Raises:
        DataError: missing, unreadable, not one grey frame, another modality, or not decodable;
            the message names the file.
        MissingExtraError: pydicom is not installed (``pip install 'medscalpel[dicom]'``).
    """
    pydicom = _pydicom()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"DICOM file not found: {path}. Check the dataset root and the id.")
    try:
        ds = pydicom.dcmread(str(path))
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, KeyError,
            TypeError) as exc:
        raise DataError(f"Cannot read DICOM file {path}: {exc}. It is corrupt, truncated or "
                        "not DICOM; remove it or add ?skip_corrupt=true to the dataset spec."
                        ) from exc
    check_radiograph(ds, path, modalities)
    return decode(ds, path, window=window, voi=voi)


# ----------------------------------------------------------------------------- pseudonyms
def salt_path() -> Path:
    """Where the per-user salt lives: ``$MEDSCALPEL_DICOM_SALT_FILE``, else
    ``$XDG_CONFIG_HOME/medscalpel/dicom-salt`` (``~/.config`` by default)."""
    given = os.environ.get(SALT_FILE_ENV)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "medscalpel" / "dicom-salt"


def load_salt(salt_file: str | os.PathLike | None = None) -> tuple[bytes, str]:
    """The secret salt of the pseudonyms and where it came from (:data:`SALT_SOURCES`).

    In this order: ``salt_file`` (a dataset spec's ``salt_file=`` option: one experiment's own
    salt, ``spec``); the ``MEDSCALPEL_DICOM_SALT`` environment variable (at least
    :data:`MIN_SALT_CHARS` characters, ``env``); the file ``MEDSCALPEL_DICOM_SALT_FILE`` names
    (``file``); the per-user salt file (``user``). A salt file that does not exist yet is
    created with 32 random bytes (mode 0600). Creation is atomic (written aside, then
    hard-linked into place), so parallel runs agree on one salt.

    The salt is per user (or per experiment, opted in), never per run: the pseudonyms are the
    image ids, which the data hashes that a resumed ``train`` and compress sweeps / grids
    compare, and which ``evaluate --reference`` / ``Predictions.align`` pair up; a new salt in
    every run would change them all (docs/dicom.md, *The salt*).

    Raises:
        ConfigError: the environment salt is too short, or the salt file is empty / unreadable.
    """
    if salt_file is not None and str(salt_file).strip():
        return _read_salt_file(Path(str(salt_file).strip()).expanduser(), "spec"), "spec"
    env = os.environ.get(SALT_ENV)
    if env is not None:
        if len(env) < MIN_SALT_CHARS:
            raise ConfigError(f"The {SALT_ENV} environment variable must hold at least "
                              f"{MIN_SALT_CHARS} characters (a random secret; e.g. "
                              "python -c 'import secrets; print(secrets.token_hex(32))'). Got "
                              f"{len(env)} characters instead.")
        return env.encode(), "env"
    source = "file" if os.environ.get(SALT_FILE_ENV) else "user"
    return _read_salt_file(salt_path(), source), source


def _read_salt_file(path: Path, source: str) -> bytes:
    """The salt in ``path`` (made first when it does not exist)."""
    if path.is_dir():
        raise ConfigError(f"The DICOM pseudonym salt file {path} is a folder; name a file (it is "
                          "created, with a random secret, the first time).")
    if not path.is_file():
        _create_salt(path)
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read the DICOM pseudonym salt file {path}: {exc}. Fix its "
                          f"permissions, or set {SALT_ENV}.") from exc
    if len(text) < MIN_SALT_CHARS:
        raise ConfigError(f"The DICOM pseudonym salt file {path} holds {len(text)} characters; "
                          f"it needs at least {MIN_SALT_CHARS}. Delete it to make a new one (ids "
                          "made with the old salt will no longer match).")
    return text.encode()


def _create_salt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    finally:
        tmp.unlink(missing_ok=True)


def pseudonym(value: str, kind: str, salt: bytes) -> str:
    """``<prefix>-<16 hex>``: HMAC-SHA256 of ``kind`` and ``value`` keyed by ``salt``.

    >>> pseudonym("PAT-001", "patient", b"0123456789abcdef")
    'pt-d041fa47d59f22b2'
    """
    if kind not in PREFIXES:
        raise ConfigError(f"The 'kind' parameter of pseudonym must be one of "
                          f"{sorted(PREFIXES)}. Got {kind!r} instead.")
    digest = hmac.new(salt, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
    return f"{PREFIXES[kind]}-{digest[:16]}"


def key_id(salt: bytes) -> str:
    """A fingerprint of the salt (8 hex): equal fingerprints = comparable pseudonyms. It does
    not reveal the salt."""
    return hmac.new(salt, b"medscalpel-dicom-key-id", hashlib.sha256).hexdigest()[:8]


def file_image_id(path: str | os.PathLike, salt: bytes | None = None) -> str:
    """The pseudonymous id of one DICOM file given by path (``predict`` / ``report clinical``
    on files): the pseudonym of its SOPInstanceUID, else of its resolved path."""
    salt = load_salt()[0] if salt is None else salt
    uid = ""
    try:
        uid = str(read_header(path).get("SOPInstanceUID", "") or "").strip()
    except DataError:
        uid = ""
    if uid:
        return pseudonym(uid, "image", salt)
    return pseudonym(Path(path).resolve().as_posix(), "file", salt)


def file_ids(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Ids of image files given by path: :func:`file_image_id` pseudonyms for DICOM files (their
    names can hold identifiers), the path as given for the others."""
    salt = load_salt()[0] if any(is_dicom_path(p) for p in paths) else b""
    return [file_image_id(p, salt) if is_dicom_path(p) else str(p) for p in paths]


def deidentified_inputs(paths: Sequence[str | os.PathLike], keep_identifiers: bool = False
                        ) -> tuple[list[Any], list[str], list[str]]:
    """Image files for a per-image report without their DICOM files' paths: ``(items, ids,
    recorded)``. A DICOM file becomes its decoded pixels (so no report names its path), its
    pseudonym as id and as what the run records; another file stays its path, with its file
    name as id (as before). ``keep_identifiers=True`` (the user's explicit opt-in) names every
    file by its own name and records its path."""
    if keep_identifiers:
        items_k: list[Any] = [read_dicom(p) if is_dicom_path(p) else str(p) for p in paths]
        return items_k, [Path(p).name for p in paths], [str(p) for p in paths]
    ids = file_ids(paths)
    items: list[Any] = [read_dicom(p) if is_dicom_path(p) else str(p) for p in paths]
    named = [i if is_dicom_path(p) else Path(p).name for p, i in zip(paths, ids)]
    recorded = [i if is_dicom_path(p) else str(p) for p, i in zip(paths, ids)]
    return items, named, recorded


# ----------------------------------------------------------------------------- dataset files
@dataclass(frozen=True)
class DicomFile:
    """What an adapter keeps of one file's header (no name, date or accession number).

    Attributes:
        path: the file; rel: its id when identifiers are kept (its path relative to the
        dataset root, or as a label CSV wrote it); uid: SOPInstanceUID (``""`` when absent);
        patient: PatientID (``None`` when absent); view: ViewPosition (``""`` when absent);
        n_voi: how many VOI windows / LUTs it offers.
    """

    path: Path
    rel: str
    uid: str
    patient: str | None
    view: str
    n_voi: int


def dicom_only(paths: Sequence[str | os.PathLike], where: str) -> bool:
    """Whether a dataset's image files are DICOM (``True``) or none is (``False``).

    A mix is refused: a DICOM file is identified by its tags (pseudonymised SOPInstanceUID,
    patient = PatientID), another image by its path and file name, and a patient's PNG and
    DICOM images cannot be recognised as one patient (nor a PNG copy of a DICOM as the same
    image), so a mixed dataset could put one patient in train and test.

    Raises:
        DataError: both kinds are present; the message counts them and names an example of each.
    """
    dcm = [p for p in paths if is_dicom_path(p)]
    if not dcm:
        return False
    if len(dcm) == len(paths):
        return True
    other = next(p for p in paths if not is_dicom_path(p))
    raise DataError(f"{where} mixes {len(dcm)} DICOM file(s) (e.g. {dcm[0]}) with "
                    f"{len(paths) - len(dcm)} other image file(s) (e.g. {other}). Their patients "
                    "cannot be matched (DICOM: the PatientID tag; others: the file name), so the "
                    "split could not keep a patient in one split. Convert them to one format, or "
                    "give them as two datasets.")


def read_headers(paths: Sequence[Path], rels: Sequence[str],
                 modalities: Sequence[str] | None = RADIOGRAPHY, window: int | None = 0,
                 skip: bool = False, progress: bool | None = None, what: str = "dataset",
                 salt: bytes | None = None) -> tuple[list[DicomFile], list[tuple[str, str]]]:
    """Read every file's header (not its pixels) and check it is one grey radiograph.

    Args:
        rels: each file's id when identifiers are kept (see :class:`DicomFile`).
        modalities: accepted modalities (``None``: any).
        window: the VOI window the dataset will apply (``None``: no VOI): refused when a file
            does not offer it.
        skip: skip unusable files instead of raising.
        salt: what skipped files' pseudonyms are keyed by (default / empty: :func:`load_salt`).

    Returns:
        ``(files, skipped)``; ``skipped`` holds ``(file pseudonym, reason)`` pairs (with
        ``skip``); without ``skip`` the first bad file raises :class:`DataError` naming it.
    """
    files: list[DicomFile] = []
    skipped: list[tuple[str, str]] = []
    for p, rel in track(list(zip(paths, rels)), "reading DICOM headers", progress=progress):
        try:
            if not Path(p).is_file():
                raise DataError(f"DICOM file not found: {p}. Check the dataset root and the "
                                "label file.")
            ds = read_header(p)
            check_radiograph(ds, p, modalities)
            nv = n_voi(ds)
            if window is not None and nv and window >= nv:
                raise DataError(f"DICOM file {p} offers {nv} VOI window(s)/LUT(s); window="
                                f"{window} does not exist (use 0 to {nv - 1}, or voi=false).")
        except DataError as exc:
            if not skip:
                raise
            salt = salt or load_salt()[0]
            skipped.append((pseudonym(rel, "file", salt), str(exc).replace(str(p), "<file>")))
            continue
        pid = str(ds.get("PatientID", "") or "").strip() or None
        files.append(DicomFile(Path(p), rel, str(ds.get("SOPInstanceUID", "") or "").strip(),
                               pid, view_position(ds), nv))
    if skipped:
        logger.warning("%s: skipped %d unusable DICOM file(s) of %d", what, len(skipped),
                       len(paths))
    return files, skipped


def dataset_salt(keep_identifiers: bool, salt_file: str | None = None) -> tuple[bytes, str]:
    """The salt an adapter pseudonymises with and its source; ``(b"", "none")`` when the user
    keeps identifiers (nothing is hashed)."""
    return (b"", "none") if keep_identifiers else load_salt(salt_file)


def identifiers(files: Sequence[DicomFile], salt: bytes, keep: bool
                ) -> tuple[list[str], list[str | None]]:
    """Image and patient ids: pseudonyms (SOPInstanceUID, else the file's ``rel``; PatientID),
    or with ``keep`` the ``rel`` paths and raw PatientIDs."""
    if keep:
        return [f.rel for f in files], [f.patient for f in files]
    ids = [pseudonym(f.uid, "image", salt) if f.uid else pseudonym(f.rel, "file", salt)
           for f in files]
    pids = [pseudonym(f.patient, "patient", salt) if f.patient else None for f in files]
    return ids, pids


def identity_meta(keep: bool, salt: bytes, salt_source: str, patient: str = "PatientID"
                  ) -> dict[str, Any]:
    """What a DICOM dataset's meta records about its ids: ``identifiers`` (``kept`` /
    ``pseudonymised``), ``id_source`` (which values the image and patient ids are made of),
    ``key_id`` (the salt's fingerprint; equal = comparable pseudonyms) and ``salt_source``."""
    if keep:
        source = {"image": "file path", "patient": patient}
    else:
        source = {"image": "pseudonym of SOPInstanceUID (of the file path without one)",
                  "patient": f"pseudonym of {patient}"}
    return {"identifiers": "kept" if keep else "pseudonymised", "id_source": source,
            "key_id": None if keep else key_id(salt), "salt_source": salt_source}
