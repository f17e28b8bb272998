"""Measure estimate_lung_field (docs/explain.md, "Lung zones in practice"): fallback rate and
lung share on the 1,000 real images of nih14-sample64, IoU against the phantom's ground-truth
lungs, and how many sample images have an NIH bounding box.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/lung_field_measure.py \
        [--data ../shared/data] [--phantom-images 16]

Writes benchmarks/results/lung_field.json (the images stay in the shared data folder).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_result  # noqa: E402
from medscalpel.data.phantom.generate import generate_phantom  # noqa: E402
from medscalpel.explain.regions import estimate_lung_field, iou  # noqa: E402


def nih_sample(folder: Path) -> dict:
    files = sorted((folder / "images").glob("*.png"))
    fallback_sides, both, shares, fallback_ids = 0, 0, [], []
    for f in files:
        a = np.asarray(Image.open(f).convert("L"), dtype=np.float64)
        est = estimate_lung_field(a)
        n_atlas = sum(v == "atlas" for v in est.method.values())
        fallback_sides += n_atlas
        both += n_atlas == 2
        if n_atlas:
            fallback_ids.append(f.stem)
        shares.append(float(est.mask.mean()))
    s = np.asarray(shares)
    return {"n_images": len(files), "n_lungs": 2 * len(files),
            "lungs_atlas_fallback": int(fallback_sides),
            "lungs_atlas_fallback_share": fallback_sides / max(1, 2 * len(files)),
            "images_both_sides_fallback": int(both),
            "lung_share_median": float(np.median(s)),
            "lung_share_p05": float(np.percentile(s, 5)),
            "lung_share_p95": float(np.percentile(s, 95)),
            "fallback_images": fallback_ids}


def phantom_iou(n_images: int) -> dict:
    data = generate_phantom(n=200, size=64, seed=0)
    ds = data.dataset("test")
    ious = []
    for i in range(min(n_images, len(ds))):
        m = ds.masks(i)
        gt = m["lung_right"].astype(bool) | m["lung_left"].astype(bool)
        ious.append(iou(estimate_lung_field(ds.load_raw(i)).mask, gt))
    v = np.asarray(ious)
    return {"phantom": "generate_phantom(n=200, size=64, seed=0), test split",
            "n_images": len(v), "iou_mean": float(v.mean()), "iou_min": float(v.min()),
            "iou": v.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--phantom-images", type=int, default=16)
    args = ap.parse_args()
    t0 = time.time()
    data = Path(args.data)
    sample = nih_sample(data / "nih14-sample64")
    boxes = pd.read_csv(data / "nih14-labels" / "BBox_List_2017.csv.gz")
    ids = {p.name for p in (data / "nih14-sample64" / "images").glob("*.png")}
    with_box = sorted(set(boxes["Image Index"]) & ids)
    save_result("lung_field", {
        "nih14_sample64": sample, "phantom_vs_ground_truth": phantom_iou(args.phantom_images),
        "nih14_sample64_images_with_bbox": len(with_box), "bbox_images": with_box,
        "seconds": round(time.time() - t0, 1), "loadavg": list(os.getloadavg()),
    }, {"function": "medscalpel.explain.regions.estimate_lung_field (defaults)",
        "nih_images": "nih14-sample64/images/*.png, converted to grey (PIL 'L')"})


if __name__ == "__main__":
    main()
