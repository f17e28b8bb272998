"""A fast check of every image file of a dataset BEFORE training (or prediction) starts.

A corrupt JPEG in a training folder used to be found after an epoch had trained. The scan
opens every file once, cheaply: every header is parsed (Pillow ``open``: format, size, mode);
PNGs are verified (every chunk read, CRCs checked, no pixel decoding: truncation and flipped
bytes show); JPEGs, which carry no checksum, must end with their end-of-image marker (a
truncated file does not); other formats are decoded. A file
that fails the quick check is read once with the real reader
(:func:`medscalpel.data.io.read_image`) and only reported when that fails too, so the scan
never refuses a file training could have read. Not found by the scan: a JPEG damaged inside
its data (no checksum to see it by; the reader often decodes such a file with a smeared band, or
fails when training reads it, naming the file).

Files of other formats (DICOM: ``.dcm``) are left to their adapter's own reader and counted as
not checked.

The scan also counts the files' bit depths from their headers (8-bit files and 16-bit PNGs
with ``sBIT``; 16-bit files without it take their depth from each image's range when read,
and a sample of them is decoded to say which depths that gives) and names tiny and huge
images. Its :class:`ImageScan` goes into ``dataset.meta["pixels"]``.

Example:
    >>> from medscalpel.data.scan import scan_files
    >>> scan_files([]).n_files
    0
"""

from __future__ import annotations

import inspect
import logging
import re
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medscalpel.data.base import CXRDataset, SubsetDataset
from medscalpel.data.io import (PIL_EXTENSIONS, READ_ERRORS, TINY_SIDE, read_image,
                                read_image_info, read_png_header, size_problem)
from medscalpel.data.spec import DATASETS, DatasetSpec
from medscalpel.errors import ConfigError, DataError, MedScalpelError
from medscalpel.progress import track

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: how many 16-bit files without sBIT the scan decodes to report the depths their range gives
RANGE_SAMPLE = 32
#: files named in a message before "and N more"
_SHOWN = 5
#: tiny / huge image ids kept in a scan (the counts are complete)
KEEP = 100
#: options an image path, folder or glob takes after '?': ``scans/*.png?skip_corrupt=true``
FILE_OPTIONS = ("skip_corrupt",)
_QUERY = re.compile(r"^[A-Za-z_]+=[^/\\]*(&[A-Za-z_]+=[^/\\]*)*$")


@dataclass(frozen=True)
class ImageScan:
    """What the pre-flight scan of a dataset's image files found.

    Attributes:
        n_files: files checked.
        unreadable: ``(id, reason)`` of the files the reader cannot read.
        tiny, huge: ids (with their size) of images under / over the size limits (the first
            :data:`KEEP` of each; ``n_tiny`` / ``n_huge`` count them all).
        bit_depths: files per bit depth found from the headers, e.g.
            ``{"8 bits (file)": 990, "12 bits (sBIT) in 16": 10}``; 16-bit files without sBIT
            count as ``"range (per image, when read)"``.
        range_sample: depths that the range gives on a decoded sample of those files
            (``n_range_sampled`` of them); empty when there are none.
        scope: which files were checked (e.g. ``"train, val, test"``).
        seconds: time the scan took.
    """

    n_files: int
    unreadable: tuple[tuple[str, str], ...] = ()
    tiny: tuple[str, ...] = ()
    huge: tuple[str, ...] = ()
    n_tiny: int = 0
    n_huge: int = 0
    bit_depths: dict[str, int] = field(default_factory=dict)
    range_sample: dict[str, int] = field(default_factory=dict)
    n_range_sampled: int = 0
    scope: str = ""
    seconds: float = 0.0
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return not self.unreadable

    @property
    def mixed_range_depths(self) -> bool:
        """True when the range gives different depths to files without sBIT (a dark image of
        a 12-bit set read as 10-bit is stretched)."""
        return len({k.split(" ")[0] for k in self.range_sample}) > 1

    def summary(self) -> str:
        """One line: ``"1000 image files checked in 0.8 s: 1000 x 8 bits (file); ..."``."""
        depths = ", ".join(f"{n} x {k}" for k, n in sorted(self.bit_depths.items()))
        line = f"{self.n_files} image files checked in {self.seconds:.1f} s: {depths or 'none'}"
        if self.range_sample:
            line += (f" (range on a sample of {self.n_range_sampled}: "
                     + ", ".join(f"{n} x {k}" for k, n in sorted(self.range_sample.items())) + ")")
        for what, n in (("unreadable", len(self.unreadable)), ("tiny", self.n_tiny),
                        ("huge", self.n_huge)):
            if n:
                line += f"; {n} {what}"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "n_files": self.n_files,
                "unreadable": [{"id": i, "reason": r} for i, r in self.unreadable],
                "tiny": list(self.tiny), "huge": list(self.huge), "n_tiny": self.n_tiny,
                "n_huge": self.n_huge,
                "bit_depths": dict(self.bit_depths), "range_sample": dict(self.range_sample),
                "n_range_sampled": self.n_range_sampled, "scope": self.scope,
                "seconds": self.seconds, "summary": self.summary()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageScan":
        if int(d.get("schema_version", SCHEMA_VERSION)) > SCHEMA_VERSION:
            raise DataError(f"An image scan of schema version {d['schema_version']} is newer "
                            f"than this medscalpel reads ({SCHEMA_VERSION}); upgrade medscalpel.")
        return cls(n_files=int(d["n_files"]),
                   unreadable=tuple((u["id"], u["reason"]) for u in d.get("unreadable", [])),
                   tiny=tuple(d.get("tiny", [])), huge=tuple(d.get("huge", [])),
                   n_tiny=int(d.get("n_tiny", len(d.get("tiny", [])))),
                   n_huge=int(d.get("n_huge", len(d.get("huge", [])))),
                   bit_depths={str(k): int(v) for k, v in d.get("bit_depths", {}).items()},
                   range_sample={str(k): int(v) for k, v in d.get("range_sample", {}).items()},
                   n_range_sampled=int(d.get("n_range_sampled", 0)), scope=str(d.get("scope", "")),
                   seconds=float(d.get("seconds", 0.0)))


# ----------------------------------------------------------------------------- one file
def check_file(path: Path) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """Quick check of one image file.

    Returns:
        ``(depth_label, (width, height), problem)``: ``depth_label`` is ``None`` when the depth
        is decided per image from its range (16-bit without sBIT, 32-bit); ``problem`` is why
        the reader cannot read the file (then the other two are ``None``), else ``None``.
    """
    try:
        header = read_png_header(path)
        with Image.open(path) as im:
            size, mode, fmt = im.size, im.mode, im.format
            if fmt == "PNG":
                im.verify()
            elif fmt == "JPEG":
                _require_jpeg_end(path)
            else:
                im.load()
    except READ_ERRORS:
        # the quick check failed: confirm with the real reader (never refuse a readable file;
        # formats Pillow does not open, such as DICOM, are read here)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = read_image(path)
        except MedScalpelError as err:
            return None, None, str(err)
        label = "8 bits (file)" if arr.dtype == np.uint8 else "float (read in full)"
        return label, (int(arr.shape[1]), int(arr.shape[0])), None
    depth = header["bit_depth"] if header else (16 if mode.startswith("I;16") else
                                                32 if mode in ("I", "F") else 8)
    return _depth_label(depth, header["sbit"] if header else None, mode), size, None


def _require_jpeg_end(path: Path, tail: int = 1024) -> None:
    """Raise ``OSError`` when a JPEG lacks its end-of-image marker ``FF D9`` in its last bytes
    (a truncated file). Entropy-coded data cannot contain ``FF D9`` (an ``FF`` there is always
    followed by ``00`` or a restart marker), so the marker is the real end."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - tail))
        if b"\xff\xd9" not in fh.read():
            raise OSError("no JPEG end-of-image marker: the file is truncated")


def _depth_label(container: int, sbit: int | None, mode: str) -> str | None:
    if container <= 8:
        return "8 bits (file)"
    if sbit is not None:
        return f"{sbit} bits (sBIT) in {container}"
    return None


# ----------------------------------------------------------------------------- many files
def scan_files(paths: Sequence[str | Path], ids: Sequence[str] | None = None, scope: str = "",
               progress: bool | None = None, range_sample: int = RANGE_SAMPLE) -> ImageScan:
    """Check every file quickly (see the module docstring); returns an :class:`ImageScan`."""
    start = time.perf_counter()
    paths = [Path(p) for p in paths]
    ids = [str(p) for p in paths] if ids is None else [str(i) for i in ids]
    unreadable, depths, ranged = [], Counter(), []
    sized: dict[str, list[str]] = {"tiny": [], "huge": []}
    if progress is None and len(paths) < 1000:
        progress = False  # under a second: no progress lines
    for i in track(range(len(paths)), "checking image files", progress=progress):
        suffix = paths[i].suffix.lower()
        if suffix not in PIL_EXTENSIONS:  # e.g. DICOM: its adapter reads and checks it
            depths[f"not checked ({suffix or 'no extension'}: read by its adapter)"] += 1
            continue
        label, size, problem = check_file(paths[i])
        if problem is not None:
            unreadable.append((ids[i], problem))
            continue
        if label is None:
            ranged.append(i)
            label = "range (per image, when read)"
        depths[label] += 1
        if size is not None and size_problem(*size):
            sized["tiny" if min(size) < TINY_SIDE else "huge"].append(
                f"{ids[i]} ({size[0]}x{size[1]})")
    sample = Counter()
    picks = np.unique(np.linspace(0, len(ranged) - 1, min(range_sample, len(ranged))).round()
                      .astype(int)) if ranged else []
    for j in picks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, info = read_image_info(paths[ranged[int(j)]])
        sample[f"{info.bits} bits ({info.source})"] += 1
    return ImageScan(n_files=len(paths), unreadable=tuple(unreadable),
                     tiny=tuple(sized["tiny"][:KEEP]), huge=tuple(sized["huge"][:KEEP]),
                     n_tiny=len(sized["tiny"]), n_huge=len(sized["huge"]),
                     bit_depths=dict(depths), range_sample=dict(sample),
                     n_range_sampled=len(picks), scope=scope,
                     seconds=round(time.perf_counter() - start, 3))


def dataset_files(ds: CXRDataset) -> tuple[list[Path], list[str]] | None:
    """The image files behind a dataset (and their ids), or ``None`` for in-memory data."""
    if isinstance(ds, SubsetDataset):
        inner = dataset_files(ds.parent)
        if inner is None:
            return None
        return [inner[0][i] for i in ds.indices], list(ds.ids)
    paths = getattr(ds, "paths", None)
    if paths is None:
        return None
    return [Path(p) for p in paths], list(ds.ids)


def require_readable(*datasets: CXRDataset | None, progress: bool | None = None
                     ) -> ImageScan | None:
    """Scan the image files of ``datasets`` (e.g. the train, val and test splits) before any
    work starts; store the scan in each dataset's ``meta["pixels"]``.

    Returns ``None`` when no dataset is backed by files (the phantom, MedMNIST arrays).

    Raises:
        DataError: a file cannot be read; the message names the files and a fix that works
            for this dataset (``?skip_corrupt=true`` where its adapter takes it).

    Warns (``warnings.warn``) naming tiny or huge images, and when 16-bit files without
    sBIT get different depths from their range.
    """
    present = [ds for ds in datasets if ds is not None]
    seen: dict[Path, str] = {}
    scopes = []
    for ds in present:
        files = dataset_files(ds)
        if files is None:
            continue
        scopes.append(ds.split)
        for p, i in zip(*files):
            seen.setdefault(p, i)
    if not scopes:
        return None
    scan = scan_files(list(seen), list(seen.values()), scope=", ".join(dict.fromkeys(scopes)),
                      progress=progress)
    logger.info("%s", scan.summary())
    for ds in present:
        ds.meta["pixels"] = scan.to_dict()
    spec = next((ds.spec for ds in present if ds.spec), "")
    if scan.unreadable:
        raise DataError(f"{_unreadable_line(scan, spec)} (checked before any work started). "
                        f"{skip_hint(spec)}")
    _warn_about(scan, spec)
    return scan


def skip_hint(spec: str) -> str:
    """The fix for unreadable files of dataset ``spec``: ``?skip_corrupt=true`` when its
    adapter takes that option, else replacing / removing the files."""
    base = "Replace or remove the file(s)"
    try:
        parsed = DatasetSpec.parse(spec)
        takes = "skip_corrupt" in inspect.signature(DATASETS.get(parsed.adapter)).parameters
    except (MedScalpelError, ValueError, TypeError):
        return base + "."
    if not takes:
        return base + "."
    sep = "&" if "?" in spec else "?"
    return (f"{base}, or skip them (they are counted in the output): "
            f"'{spec}{sep}skip_corrupt=true'.")


def _unreadable_line(scan: ImageScan, where: str) -> str:
    shown = "; ".join(f"{i}: {_short(r)}" for i, r in scan.unreadable[:_SHOWN])
    more = f"; and {len(scan.unreadable) - _SHOWN} more" if len(scan.unreadable) > _SHOWN else ""
    return (f"{len(scan.unreadable)} of {scan.n_files} image file(s) of {where or 'the data'} "
            f"cannot be read: {shown}{more}")


def _short(reason: str) -> str:
    """The cause part of :func:`medscalpel.data.io.unreadable_error`'s message."""
    m = re.match(r"Cannot read image .*?: (.*?)\. The file is corrupt", reason)
    return m.group(1) if m else reason


def _warn_about(scan: ImageScan, where: str) -> None:
    for what, items, n in (
            (f"tiny (under {TINY_SIDE} px on a side: predictions on them are unreliable)",
             scan.tiny, scan.n_tiny),
            ("huge (memory: downscale them)", scan.huge, scan.n_huge)):
        if n:
            more = f" and {n - _SHOWN} more" if n > _SHOWN else ""
            warnings.warn(f"{n} image(s) of {where or 'the data'} are {what}: "
                          f"{', '.join(items[:_SHOWN])}{more}.", UserWarning, stacklevel=3)
    if scan.mixed_range_depths:
        found = ", ".join(f"{k} in {n}" for k, n in sorted(scan.range_sample.items()))
        warnings.warn(f"16-bit images of {where or 'the data'} without an sBIT chunk get "
                      f"different bit depths from their range ({found}, a sample of "
                      f"{scan.n_range_sampled}): a dark image of a 12-bit set is then stretched. "
                      "Write the files with an sBIT chunk stating their real depth.",
                      UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------- image files
def split_file_query(data: str) -> tuple[str, dict[str, Any]]:
    """Split ``scans/*.png?skip_corrupt=true`` into the path / glob and its options.

    A ``?`` that is not followed by ``key=value`` pairs stays (a glob wildcard).

    Raises:
        ConfigError: an option other than :data:`FILE_OPTIONS`, or a value other than
            true / false.

    >>> split_file_query("scans/*.png?skip_corrupt=true")
    ('scans/*.png', {'skip_corrupt': True})
    >>> split_file_query("scans/img?.png")
    ('scans/img?.png', {})
    """
    head, sep, query = data.rpartition("?")
    if not sep or not _QUERY.match(query):
        return data, {}
    opts: dict[str, Any] = {}
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key not in FILE_OPTIONS:
            raise ConfigError(f"Unknown option {key!r} after the image path {head!r}. Image "
                              f"files take only {', '.join(FILE_OPTIONS)} (e.g. "
                              f"'{head}?skip_corrupt=true'); labelled data is a dataset spec.")
        low = value.strip().lower()
        if low not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            raise ConfigError(f"The image-file option '{key}' is true or false; got {value!r} "
                              f"(e.g. '{head}?{key}=true').")
        opts[key] = low in ("true", "yes", "1", "on")
    return head, opts


def readable_image_files(paths: Sequence[Path], data: str, progress: bool | None = None
                         ) -> tuple[list[Path], list[tuple[str, str]]]:
    """Scan unlabelled image files (``predict`` on a file, folder or glob) before predicting.

    Args:
        data: what the user gave (``scans/*.png``, optionally with ``?skip_corrupt=true``).

    Returns:
        ``(readable paths, [(path, reason) skipped])``; skipping happens only with
        ``?skip_corrupt=true``.

    Raises:
        DataError: unreadable files without ``skip_corrupt`` (the message names them and gives
            the spelling that skips them), or no readable file left.
    """
    head, opts = split_file_query(data)
    scan = scan_files(paths, scope="image files", progress=progress)
    _warn_about(scan, head)
    if not scan.unreadable:
        return [Path(p) for p in paths], []
    if not opts.get("skip_corrupt"):
        fix = ("Replace or remove it." if len(paths) == 1 else
               f"Replace or remove them, or skip them (counted in the output): "
               f"'{head}?skip_corrupt=true'.")
        raise DataError(f"{_unreadable_line(scan, head)}. {fix}")
    bad = {i for i, _ in scan.unreadable}
    kept = [Path(p) for p in paths if str(p) not in bad]
    if not kept:
        raise DataError(f"{_unreadable_line(scan, head)}: no readable image is left to predict.")
    logger.warning("%s: skipped %d unreadable image file(s)", head, len(bad))
    return kept, list(scan.unreadable)
