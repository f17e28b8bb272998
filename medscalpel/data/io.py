"""Reading image files safely: grey content in RGB/RGBA files becomes one channel; corrupt
or truncated files raise :class:`DataError` naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medscalpel.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_image(path: str | os.PathLike, colour: bool = False) -> np.ndarray:
    """Read an image file.

    Returns ``[H, W]`` uint8 (or uint16 for 16-bit PNGs) grey, or ``[H, W, 3]`` uint8 when
    ``colour=True`` and the file is a colour image (histopathology). RGB/RGBA files whose
    channels carry grey content are reduced to one channel; alpha is dropped.

    Raises:
        DataError: the file is missing, not an image, corrupt or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Image file not found: {path}. Check the dataset root and the id.")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.int64)
                top = 65535 if arr.max() > 255 else 255
                arr = (np.clip(arr, 0, top) * (255.0 / top)).round().astype(np.uint8)
                return arr
            if mode == "L":
                return np.asarray(im, dtype=np.uint8).copy()
            if mode == "LA":
                return np.asarray(im.convert("L"), dtype=np.uint8).copy()
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"Cannot read image {path}: {exc}. The file is corrupt, truncated or not an image; "
            "replace it, remove it from the label file, or add ?skip_corrupt=true to the dataset spec to skip such files."
        ) from exc
    if colour:
        return rgb.copy()
    if rgb.ndim == 3:
        return np.round(rgb.astype(np.float32).mean(-1)).astype(np.uint8)
    return rgb
