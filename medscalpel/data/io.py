"""Reading image files safely and at their real bit depth.

* 8-bit files (L, LA, P, RGB, RGBA, CMYK, ...) come back as ``uint8``; grey content in RGB/RGBA
  files becomes one channel (the channel mean); alpha is dropped.
* Files with more than 8 bits per sample (16-bit PNG / TIFF, Pillow modes ``I;16*``, ``I``,
  ``F``; 16-bit RGB / RGBA / grey+alpha PNGs, which Pillow cuts to their high byte, are decoded
  with OpenCV) come back as ``float32`` in ``[0, 1]``, divided by ``2**bits - 1`` where ``bits`` is
  the REAL bit depth: the PNG ``sBIT`` chunk when the file has one (samples below ``2**sBIT``
  are taken as they are; larger ones as scaled up to the container per the PNG specification,
  so they are shifted back down), else the data's range: the smallest of 8 / 10 / 12 / 14 / 16
  bits that holds the image's maximum. 12-bit data in a 16-bit PNG is therefore no longer
  divided by 65535. :func:`read_image_info` returns how the depth was found (:class:`PixelInfo`).
* Tiny images (under :data:`TINY_SIDE` pixels on a side) and huge ones (over
  :data:`HUGE_PIXELS` pixels) are read with a warning naming the file; images over Pillow's
  decompression-bomb limit are refused.
* Missing, corrupt or truncated files raise :class:`DataError` naming the file.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from medscalpel.data.dicom_read import DICOM_EXTENSIONS, is_dicom_path, read_dicom
from medscalpel.errors import DataError

#: file name endings Pillow reads (what :mod:`medscalpel.data.scan` checks quickly)
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_EXTENSIONS = PIL_EXTENSIONS + DICOM_EXTENSIONS

#: an image smaller than this on a side is read with a warning (upsampling it invents detail)
TINY_SIDE = 16
#: an image with more pixels than this (about 7000 x 7000) is read with a warning (memory)
HUGE_PIXELS = 50_000_000
#: bit depths the data's range is rounded up to when a file does not state its own (no sBIT)
RANGE_DEPTHS = (8, 10, 12, 14, 16)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour type -> number of colour (non-alpha) samples in its sBIT chunk
_SBIT_COLOUR_SAMPLES = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}
READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                Image.DecompressionBombError, struct.error)


@dataclass(frozen=True)
class PixelInfo:
    """How one image file's pixels were read.

    Attributes:
        container_bits: bits per sample in the file (8 or 16 for PNG).
        bits: the bit depth the samples were scaled by (``value / (2**bits - 1)``).
        source: how ``bits`` was found: ``file`` (an 8-bit file), ``sBIT`` (the PNG chunk),
            ``sBIT, scaled samples`` (sBIT with samples scaled up to the container, shifted
            back), ``range`` (the smallest of :data:`RANGE_DEPTHS` holding ``max_value``) or
            ``range, sBIT contradicted`` (the data exceed what sBIT states).
        max_value: the largest sample (``None`` for 8-bit files, where it is not needed).
    """

    path: str
    format: str
    mode: str
    width: int
    height: int
    container_bits: int
    bits: int
    source: str
    sbit: int | None = None
    max_value: int | None = None

    @property
    def label(self) -> str:
        """A short summary such as ``"12 bits (sBIT) in 16"``, used to count files by depth."""
        if self.container_bits == self.bits and self.source == "file":
            return f"{self.bits} bits (file)"
        return f"{self.bits} bits ({self.source}) in {self.container_bits}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- PNG header
def png_header(data: bytes) -> dict[str, Any] | None:
    """IHDR fields and the ``sBIT`` chunk of a PNG, from the bytes before its first ``IDAT``.

    Pillow does not expose ``sBIT`` when reading, so the chunk is parsed here (it must come
    before ``PLTE`` and ``IDAT``, so the file's first bytes suffice).

    Returns:
        ``{"width", "height", "bit_depth", "colour_type", "sbit"}`` (``sbit``: the largest
        significant-bit count of the colour samples, alpha ignored; ``None`` without the
        chunk), or ``None`` when ``data`` is not a PNG.

    >>> import struct, zlib
    >>> def chunk(t, d):
    ...     return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    >>> ihdr = struct.pack(">IIBBBBB", 4, 3, 16, 0, 0, 0, 0)  # 4 x 3, 16-bit grey
    >>> png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", ihdr) + chunk(b"sBIT", bytes([12]))
    ...        + chunk(b"IDAT", b""))
    >>> png_header(png)["sbit"], png_header(png)["bit_depth"]
    (12, 16)
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, out = len(_PNG_SIGNATURE), None
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR" and len(body) >= 13:
            w, h, depth, colour = struct.unpack(">IIBB", body[:10])
            out = {"width": w, "height": h, "bit_depth": depth, "colour_type": colour,
                   "sbit": None}
        elif ctype == b"sBIT" and out is not None and body:
            n = _SBIT_COLOUR_SAMPLES.get(out["colour_type"], 1)
            out["sbit"] = max(body[:n]) or None
        elif ctype in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return out


def read_png_header(path: Path, limit: int = 1 << 16) -> dict[str, Any] | None:
    """:func:`png_header` of a file (reads at most ``limit`` bytes: sBIT precedes IDAT)."""
    with open(path, "rb") as fh:
        return png_header(fh.read(limit))


# ----------------------------------------------------------------------------- bit depth
def bits_from_max(max_value: int) -> int:
    """The smallest of :data:`RANGE_DEPTHS` (8 / 10 / 12 / 14 / 16) that holds ``max_value``
    (beyond 16 bits: the value's own bit length).

    >>> bits_from_max(255), bits_from_max(256), bits_from_max(4095), bits_from_max(4096)
    (8, 10, 12, 14)
    """
    for bits in RANGE_DEPTHS:
        if max_value < (1 << bits):
            return bits
    return int(max_value).bit_length()


def scale_samples(arr: np.ndarray, container_bits: int, sbit: int | None = None
                  ) -> tuple[np.ndarray, int, str, int]:
    """Integer samples -> ``uint8`` (8 bits) or ``float32`` in ``[0, 1]`` at their real depth.

    Args:
        arr: non-negative integer samples (negative ones are clipped to 0).
        container_bits: bits per sample of the file (16 for a 16-bit PNG).
        sbit: the PNG ``sBIT`` value, if the file has one.

    Returns:
        ``(array, bits, source, max_value)``; see :class:`PixelInfo` for ``source``.

    >>> a = np.array([[0, 2048, 4095]], np.uint16)
    >>> out, bits, source, _ = scale_samples(a, 16)
    >>> bits, source, out.round(3).tolist()
    (12, 'range', [[0.0, 0.5, 1.0]])
    """
    arr = np.asarray(arr)
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        arr = np.clip(arr, 0, None)
    top = int(arr.max()) if arr.size else 0
    shift = 0
    if sbit is not None and 0 < sbit < container_bits:
        if top < (1 << sbit):
            bits, source = sbit, "sBIT"
        elif container_bits <= 16:
            # PNG spec: samples of a lower depth are scaled up to the container; undo it
            bits, source, shift = sbit, "sBIT, scaled samples", container_bits - sbit
        else:
            bits, source = bits_from_max(top), "range, sBIT contradicted"
    elif sbit is not None and sbit == container_bits:
        bits, source = sbit, "sBIT"
    else:
        bits, source = bits_from_max(top), "range"
    if shift:
        arr = np.right_shift(arr.astype(np.int64), shift)
    if bits <= 8:
        return arr.astype(np.uint8), 8, source, top
    out = arr.astype(np.float32) / float((1 << bits) - 1)
    return out, bits, source, top


# ----------------------------------------------------------------------------- size checks
def size_problem(width: int, height: int) -> str | None:
    """Why an image of this size deserves a warning (tiny or huge), else ``None``."""
    if min(width, height) < TINY_SIDE:
        return (f"is only {width}x{height} pixels (under {TINY_SIDE} on a side): it will be "
                "upsampled to the model's input size and predictions on it are unreliable; "
                "check that it is the intended image")
    if width * height > HUGE_PIXELS:
        return (f"is {width}x{height} = {width * height / 1e6:.0f} megapixels (over "
                f"{HUGE_PIXELS / 1e6:.0f}): reading it needs about "
                f"{width * height * 4 / 2**30:.1f} GiB per copy; downscale it first")
    return None


def warn_size(path: str | os.PathLike, width: int, height: int, stacklevel: int = 3) -> None:
    """``warnings.warn`` naming the file when its size is tiny or huge (:func:`size_problem`)."""
    problem = size_problem(width, height)
    if problem:
        warnings.warn(f"Image {path} {problem}.", UserWarning, stacklevel=stacklevel)


# ----------------------------------------------------------------------------- reading
def read_image(path: str | os.PathLike, colour: bool = False) -> np.ndarray:
    """Read an image file at its real bit depth.

    Returns ``[H, W]`` grey (``uint8`` for 8-bit files, ``float32`` in ``[0, 1]`` for deeper
    ones, see the module docstring), or ``[H, W, 3]`` when ``colour=True`` and the file is a
    colour image (histopathology). RGB/RGBA files whose channels carry grey content are reduced
    to one channel; alpha is dropped. Warns (naming the file) for tiny or huge images.

    Raises:
        DataError: the file is missing, not an image, corrupt, truncated or over Pillow's
            decompression-bomb limit.
    """
    if is_dicom_path(path):  # .dcm: Modality/VOI LUT, MONOCHROME1 (medscalpel.data.dicom_read)
        return read_dicom(path)
    return read_image_info(path, colour=colour)[0]


def read_image_info(path: str | os.PathLike, colour: bool = False
                    ) -> tuple[np.ndarray, PixelInfo]:
    """:func:`read_image` plus a :class:`PixelInfo` saying how the pixels were read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Image file not found: {path}. Check the dataset root and the id.")
    try:
        header = read_png_header(path)
        with Image.open(path) as im:
            warn_size(path, *im.size, stacklevel=4)
            if header and header["bit_depth"] == 16 and header["colour_type"] in (2, 4, 6):
                arr, info = _read_png16_colour(path, im, header)
            else:
                im.load()
                arr, info = _pixels(path, im, header)
    except DataError:
        raise
    except READ_ERRORS as exc:
        raise unreadable_error(path, exc) from exc
    if colour or arr.ndim == 2:
        return arr, info
    if arr.dtype == np.uint8:
        return np.round(arr.astype(np.float32).mean(-1)).astype(np.uint8), info
    return arr.astype(np.float32).mean(-1), info


def unreadable_error(path: Path, exc: BaseException) -> DataError:
    """The :class:`DataError` for a file that cannot be decoded (names the file and the fix)."""
    return DataError(
        f"Cannot read image {path}: {type(exc).__name__}: {exc}. The file is corrupt, truncated, "
        "too large or not an image: replace it or remove it (a dataset spec such as folder:, "
        "csv: or nih: skips such files with ?skip_corrupt=true; so does an image path, folder "
        "or glob given to predict, e.g. 'scans/*.png?skip_corrupt=true').")


def _info(path: Path, im: Image.Image, container: int, bits: int, source: str,
          sbit: int | None = None, top: int | None = None) -> PixelInfo:
    return PixelInfo(path=str(path), format=str(im.format), mode=im.mode, width=im.size[0],
                     height=im.size[1], container_bits=container, bits=bits, source=source,
                     sbit=sbit, max_value=top)


def _pixels(path: Path, im: Image.Image, header: dict[str, Any] | None
            ) -> tuple[np.ndarray, PixelInfo]:
    """Decoded Pillow image -> samples (see :func:`read_image`)."""
    mode = im.mode
    sbit = header["sbit"] if header else None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        container = 16 if mode.startswith("I;16") else 32
        if header:
            container = int(header["bit_depth"])
        arr, bits, source, top = scale_samples(np.asarray(im), container, sbit)
        return arr, _info(path, im, container, bits, source, sbit, top)
    if mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        top = float(arr.max()) if arr.size else 0.0
        if top <= 1.0:
            return np.clip(arr, 0.0, 1.0), _info(path, im, 32, 32, "float in [0, 1]")
        bits = bits_from_max(int(np.ceil(top)))
        out = np.clip(arr, 0.0, None) / float((1 << bits) - 1)
        return out.astype(np.float32), _info(path, im, 32, bits, "range", None, int(np.ceil(top)))
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).copy(), _info(path, im, 8, 8, "file", sbit)
    if mode in ("LA", "1", "La"):
        return np.asarray(im.convert("L"), dtype=np.uint8).copy(), _info(path, im, 8, 8, "file",
                                                                         sbit)
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return rgb, _info(path, im, 8, 8, "file", sbit)


def _read_png16_colour(path: Path, im: Image.Image, header: dict[str, Any]
                       ) -> tuple[np.ndarray, PixelInfo]:
    """16-bit RGB / RGBA / grey+alpha PNG: Pillow keeps only the high byte, so decode with
    OpenCV (a dependency of grad-cam, imported here because only these rare files need it)."""

    raw = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise OSError("OpenCV could not decode this 16-bit colour PNG")
    if raw.ndim == 3:
        raw = raw[..., :3][..., ::-1] if raw.shape[-1] >= 3 else raw[..., :1]  # BGR(A) -> RGB
        if header["colour_type"] == 4 or raw.shape[-1] == 1:
            raw = raw[..., 0]
    arr, bits, source, top = scale_samples(np.ascontiguousarray(raw), 16, header["sbit"])
    return arr, _info(path, im, 16, bits, source, header["sbit"], top)
