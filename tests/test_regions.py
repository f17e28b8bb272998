"""Lung zones, lung-field estimation, localization metrics and the NIH box reader."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from medscalpel.errors import ConfigError, DataError
from medscalpel.explain.cams import CamResult
from medscalpel.explain.regions import (ZONE_NAMES, box_mask, bbox_localization,
                                        describe_location, estimate_lung_field,
                                        localization_metrics, pointing_hit, read_nih_bboxes,
                                        mask_localization, split_lungs, topk_iou, topk_mask,
                                        zone_report, zones_for_item,
                                        zones_from_masks)


def synthetic_lungs(h: int = 60, w: int = 60):
    """Two rectangular lungs (rows 6..41 inclusive, i.e. 36 rows = 3 x 12) and a heart."""
    lung = np.zeros((h, w), bool)
    lung[6:42, 5:25] = True       # image left = patient's right lung
    lung[6:42, 35:55] = True      # image right = patient's left lung
    heart = np.zeros((h, w), bool)
    heart[28:42, 25:40] = True
    return lung, heart


def test_zone_mapping_on_synthetic_mask():
    lung, heart = synthetic_lungs()
    z = zones_from_masks(lung, heart)
    lm = z.label_map
    idx = {n: i for i, n in enumerate(ZONE_NAMES)}
    assert lm[6, 5] == idx["right_upper"] and lm[17, 24] == idx["right_upper"]
    assert lm[18, 10] == idx["right_middle"] and lm[29, 10] == idx["right_middle"]
    assert lm[30, 10] == idx["right_lower"] and lm[41, 10] == idx["right_lower"]
    assert lm[6, 40] == idx["left_upper"] and lm[41, 54] == idx["left_lower"]
    assert lm[35, 30] == idx["cardiac"]
    assert lm[10, 30] == idx["mediastinal"]
    assert lm[50, 30] == idx["outside"] and lm[10, 2] == idx["outside"]
    areas = z.areas()
    assert areas["right_upper"] == areas["right_middle"] == areas["right_lower"] == 12 * 20
    assert areas["cardiac"] == 14 * 10             # heart cols 25..34 lie between the lungs
    # saliency placed in one zone
    sal = np.zeros(lung.shape)
    sal[35, 40] = 3.0
    sal[12, 12] = 1.0
    fr = z.fractions(sal)
    assert fr["left_lower"] == pytest.approx(0.75) and fr["right_upper"] == pytest.approx(0.25)
    assert sum(fr.values()) == pytest.approx(1.0)
    assert describe_location(sal, z) == "left lower zone"
    sal[12, 12] = 2.9
    assert describe_location(sal, z) == "left lower zone and right upper zone"
    assert describe_location(sal, z, second_ratio=1.0) == "left lower zone"
    sal2 = np.zeros(lung.shape)
    sal2[55, 2] = 1.0
    assert describe_location(sal2, z) == "outside the lung fields"
    assert describe_location(np.zeros(lung.shape), z) == "no positive saliency"


def test_zone_without_heart_and_merged_lungs():
    lung, _ = synthetic_lungs()
    z = zones_from_masks(lung)
    # no heart mask: lower half of the between-lungs band is cardiac, the upper mediastinal
    assert z.label_map[35, 30] == ZONE_NAMES.index("cardiac")
    assert z.label_map[10, 30] == ZONE_NAMES.index("mediastinal")
    merged = lung.copy()
    merged[20:22, 20:40] = True                    # a bridge joins the two lungs
    right, left = split_lungs(merged)
    assert right[:, :30].sum() == right.sum() and left[:, 30:].sum() == left.sum()
    small = zones_from_masks(lung).resized((30, 30))
    assert small.shape == (30, 30)
    assert small.label_map[20, 7] == ZONE_NAMES.index("right_lower")


def test_localization_metrics():
    sal = np.zeros((20, 20))
    sal[5, 5] = 1.0
    sal[4:7, 4:7] += 0.5
    target = np.zeros((20, 20), bool)
    target[3:8, 3:8] = True
    assert pointing_hit(sal, target)
    assert not pointing_hit(sal, ~target)
    far = np.zeros((20, 20), bool)
    far[5, 8] = True
    assert not pointing_hit(sal, far) and pointing_hit(sal, far, tolerance=3)
    # top 9 pixels = the 3x3 block, inside the 5x5 target: IoU = 9 / 25
    assert topk_mask(sal, 9 / 400).sum() == 9
    assert topk_iou(sal, target, 9 / 400) == pytest.approx(9 / 25)
    m = box_mask((3, 3, 5, 5), (20, 20))
    np.testing.assert_array_equal(m, target)
    res = localization_metrics(np.stack([sal, sal]), [target, far], frac=9 / 400,
                               ids=["a", "b"], groups=["X", "Y"])
    assert res.hit_rate == 0.5 and res.hits.tolist() == [True, False]
    assert res.ious[0] == pytest.approx(9 / 25) and res.ious[1] == 0
    lo, hi = res.hit_rate_ci()
    assert 0 < lo < 0.5 < hi < 1
    assert res.to_dict()["by_group"]["X"]["hit_rate"] == 1.0
    assert not pointing_hit(np.zeros((20, 20)), target)


def _write_bbox_csv(path):
    text = ("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
            "img1.png,Atelectasis,512,256,128,64\n"
            "img2.png,Infiltrate,0,0,1024,1024\n")
    with gzip.open(path, "wt") as fh:
        fh.write(text)


def test_read_nih_bboxes_scaling_and_localization(tmp_path):
    p = tmp_path / "BBox_List_2017.csv.gz"
    _write_bbox_csv(p)
    df = read_nih_bboxes(p, size=64)
    assert df.loc[0, ["x", "y", "w", "h"]].tolist() == [32.0, 16.0, 8.0, 4.0]
    assert df.loc[1, "finding"] == "Infiltration"
    maps = np.zeros((2, 64, 64), np.float32)
    maps[0, 18, 36] = 1.0          # inside img1's box (rows 16..19, cols 32..39)
    maps[1, 5, 5] = 1.0
    cams = CamResult(maps, "gradcam", (0, 1), ("Atelectasis", "Infiltration"), "layer",
                     ids=("img1.png", "img2.png"))
    res = bbox_localization(cams, df)
    assert res.hits.tolist() == [True, True]
    assert res.groups == ("Atelectasis", "Infiltration")
    with pytest.raises(DataError, match="no \\(image, class\\) of the CAMs has a box"):
        bbox_localization(CamResult(maps, "gradcam", (1, 0), ("Atelectasis", "Infiltration"),
                                    "layer", ids=("img1.png", "img2.png")), df)


def test_real_nih_bbox_file(shared_data):
    df = read_nih_bboxes(shared_data / "nih14-labels" / "BBox_List_2017.csv.gz", size=224)
    assert len(df) == 984
    assert set(df["finding"]) == {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltration",
                                  "Mass", "Nodule", "Pneumonia", "Pneumothorax"}
    assert (df["x"] >= 0).all() and (df["x"] + df["w"] <= 224 + 1e-6).all()


def test_lung_field_on_real_images(shared_data):
    from medscalpel.data.io import read_image

    files = sorted((shared_data / "nih14-sample64" / "images").glob("*.png"))[:40]
    assert files
    fallbacks = 0
    for f in files:
        est = estimate_lung_field(read_image(f))
        z = est.zones()
        fallbacks += sum(m == "atlas" for m in est.method.values())
        # the patient's right lung is on the image's left
        cr = np.argwhere(est.right)[:, 1].mean()
        cl = np.argwhere(est.left)[:, 1].mean()
        assert cr < 32 < cl
        lung_share = est.mask.mean()
        assert 0.08 < lung_share < 0.6, f.name
        assert z.areas()["outside"] < 0.85 * 64 * 64
    assert fallbacks <= 8   # at most 10% of lungs fall back to the atlas on this sample


def test_lung_field_on_synthetic_radiograph():
    # bright body, two dark lungs: the estimate must recover them
    img = np.full((64, 64), 0.8)
    img[:, :3] = img[:, -3:] = 0.0
    lung, _ = synthetic_lungs(64, 64)
    lung = np.zeros((64, 64), bool)
    yy, xx = np.mgrid[0:64, 0:64]
    lung |= ((xx - 19) / 9) ** 2 + ((yy - 28) / 17) ** 2 <= 1
    lung |= ((xx - 45) / 9) ** 2 + ((yy - 28) / 17) ** 2 <= 1
    img[lung] = 0.25
    est = estimate_lung_field(img)
    assert est.method == {"right": "threshold", "left": "threshold"}
    inter = (est.mask & lung).sum()
    assert inter / (est.mask | lung).sum() > 0.8


def test_zone_report_and_overlay(tmp_path):
    from medscalpel.explain.figures import cam_overlay_figure

    lung, heart = synthetic_lungs(64, 64)
    z = zones_from_masks(lung, heart)
    maps = np.zeros((2, 64, 64), np.float32)
    maps[0, 35, 10] = 1.0
    maps[1, 10, 45] = 1.0
    cams = CamResult(maps, "gradcam", (0, 0), ("Effusion",), "layer", ids=("a", "b"))
    rep = zone_report(cams, zones=[z, z])
    assert rep.descriptions == ("right lower zone", "left upper zone")
    d = rep.to_dict()
    assert d["images"][0]["fractions"]["right_lower"] == 1.0
    img = np.where(lung, 0.2, 0.8)
    p = cam_overlay_figure(np.stack([img, img]), cams, tmp_path / "ov.png", zones=[z, z])
    assert p.stat().st_size > 5000


def test_region_errors(tmp_path):
    lung, _ = synthetic_lungs()
    z = zones_from_masks(lung)
    with pytest.raises(DataError, match="does not match the zones"):
        z.fractions(np.zeros((10, 10)))
    with pytest.raises(DataError, match="lung-field mask is empty"):
        zones_from_masks(np.zeros((10, 10), bool))
    with pytest.raises(ConfigError, match="needs lung_mask"):
        zones_from_masks()
    with pytest.raises(ConfigError, match="Unknown zone 'apex'"):
        z.mask("apex")
    with pytest.raises(DataError, match="outside an image"):
        box_mask((100, 100, 5, 5), (20, 20))
    with pytest.raises(ConfigError, match="'frac' parameter of topk_mask"):
        topk_mask(np.ones((4, 4)), 0.0)
    with pytest.raises(DataError, match="bounding-box file not found"):
        read_nih_bboxes(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("Image Index,Finding Label\nimg,Mass\n")
    with pytest.raises(DataError, match="lacks the column"):
        read_nih_bboxes(bad)
    with pytest.raises(DataError, match="at least 16x16"):
        estimate_lung_field(np.zeros((8, 8)))
    with pytest.raises(ConfigError, match="'area_range' parameter"):
        estimate_lung_field(np.zeros((32, 32)), area_range=(2.0, 3.0))


def test_phantom_ground_truth_zones_and_localization():
    from medscalpel.data import open_dataset

    ds = open_dataset("phantom?n=12&size=64", split="all")
    z = zones_for_item(ds, 0)
    assert z.source == "ground_truth"
    m = ds.masks(0)
    assert z.mask("right_lower").sum() > 0
    assert (z.lung_mask() == (m["lung_right"] | m["lung_left"])).all()
    # a "CAM" equal to each finding's own mask hits it (pointing game and IoU)
    rows, names = [], []
    for i in range(len(ds)):
        found = [k for k, v in ds.masks(i).items() if k in ds.class_names and v.any()]
        if found:
            rows.append(i)
            names.append(found[0])
    assert rows
    maps = np.stack([ds.masks(i)[nm].astype(np.float32) for i, nm in zip(rows, names)])
    cams = CamResult(maps, "gradcam", tuple(ds.class_names.index(nm) for nm in names),
                     tuple(ds.class_names), "layer")
    res = mask_localization(cams, ds, rows, frac=0.01)
    assert res.hit_rate == 1.0
    # the estimator recovers the phantom's lung fields reasonably
    from medscalpel.explain.regions import iou
    est = estimate_lung_field(ds.load_raw(0)).mask
    assert iou(est, m["lung_right"] | m["lung_left"]) > 0.6
