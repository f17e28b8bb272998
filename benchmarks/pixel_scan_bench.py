"""Issue R (pixels): how long the pre-training scan of image files takes (medscalpel.data.scan),
against one full decode of the same files (what a training epoch reads), on

* the real Kermany folder (../shared/data/kermany-pneumonia/train: 224x224 JPEGs, every split),
* the real NIH sample (../shared/data/nih14-sample64: 64x64 RGB/RGBA PNGs),
* generated full-size files: 2048x2048 12-bit-in-16-bit PNGs with sBIT, and 2048x2048 JPEGs.

The files are read once before timing (warm page cache, as on a second epoch); the scan is
timed before and after the full decode. Writes benchmarks/results/pixel_scan.json.

    nice -n 10 .venv/bin/python benchmarks/pixel_scan_bench.py --n-large 24
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

from medscalpel.data import open_dataset  # noqa: E402
from medscalpel.data.io import read_image  # noqa: E402
from medscalpel.data.scan import dataset_files, scan_files  # noqa: E402

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _time(paths: list[Path]) -> dict:
    for p in paths:  # warm the page cache
        p.read_bytes()
    t = time.perf_counter()
    scan = scan_files(paths, progress=False)
    scan_s = time.perf_counter() - t
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in paths:
            read_image(p)
    full_s = time.perf_counter() - t
    t = time.perf_counter()
    scan_files(paths, progress=False)
    scan2_s = time.perf_counter() - t
    best = min(scan_s, scan2_s)
    return {"n_files": len(paths), "scan_s": round(scan_s, 3), "scan_again_s": round(scan2_s, 3),
            "full_decode_s": round(full_s, 3), "scan_ms_per_file": round(1000 * best / len(paths), 3),
            "full_decode_ms_per_file": round(1000 * full_s / len(paths), 3),
            "full_over_scan": round(full_s / best, 1), "bit_depths": scan.bit_depths,
            "unreadable": len(scan.unreadable)}


def _large(tmp: Path, n: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    import struct
    import zlib

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:2048, 0:2048] / 2047
    pngs, jpgs = [], []
    for i in range(n):
        img = 0.5 * xx + 0.3 * np.sin((4 + i % 5) * yy) ** 2 + 0.2 * rng.random((2048, 2048))
        a12 = np.round(img / img.max() * 4095).astype(np.uint16)
        p = tmp / f"cxr{i:03d}_12bit.png"
        Image.fromarray(a12).save(p)
        raw = p.read_bytes()
        body = bytes([12])
        chunk = struct.pack(">I", 1) + b"sBIT" + body + struct.pack(">I", zlib.crc32(b"sBIT" + body))
        p.write_bytes(raw[:33] + chunk + raw[33:])
        pngs.append(p)
        j = tmp / f"cxr{i:03d}.jpg"
        Image.fromarray((a12 >> 4).astype(np.uint8)).save(j, quality=90)
        jpgs.append(j)
    return pngs, jpgs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-large", type=int, default=24)
    args = ap.parse_args()
    out: dict = {}
    kermany = SHARED / "kermany-pneumonia" / "train"
    if kermany.is_dir():
        ds = open_dataset(f"folder:{kermany}", split="all")
        out["kermany_224_jpeg"] = _time(dataset_files(ds)[0])
    nih = SHARED / "nih14-sample64"
    if nih.is_dir():
        ds = open_dataset(f"nih:{nih}", split="all")
        out["nih_sample64_png"] = _time(dataset_files(ds)[0])
    with tempfile.TemporaryDirectory() as d:
        pngs, jpgs = _large(Path(d), args.n_large)
        out["png16_sbit12_2048"] = _time(pngs)
        out["jpeg_2048"] = _time(jpgs)
    for k, v in out.items():
        print(k, {x: v[x] for x in ("n_files", "scan_ms_per_file", "full_decode_ms_per_file",
                                    "full_over_scan")})
    save_result("pixel_scan", out, vars(args))


if __name__ == "__main__":
    main()
