"""The adapters on the real data beside the checkout (skips with a reason without it)."""

from __future__ import annotations

import numpy as np
import pytest

from medscalpel.data import Preprocess, open_dataset
from medscalpel.data.labels import NIH_CLASSES
from medscalpel.data.nih import read_nih_labels
from medscalpel.data.stats import dataset_statistics

pytestmark = pytest.mark.realdata

# positives per finding in nih14-sample64 (its README), CheXNet order
SAMPLE_POSITIVES = {"Atelectasis": 95, "Cardiomegaly": 83, "Effusion": 170, "Infiltration": 162,
                    "Mass": 35, "Nodule": 39, "Pneumonia": 11, "Pneumothorax": 40,
                    "Consolidation": 42, "Edema": 31, "Emphysema": 37, "Fibrosis": 32,
                    "Pleural_Thickening": 29, "Hernia": 9}


def test_nih_sample64(shared_data):
    root = shared_data / "nih14-sample64"
    all_ = open_dataset(f"nih:{root}", "all", Preprocess(size=64))
    assert len(all_) == 1000 and len(set(all_.patient_ids)) == 264
    assert dict(zip(NIH_CLASSES, all_.labels.sum(0).astype(int).tolist())) == SAMPLE_POSITIVES
    test = open_dataset(f"nih:{root}", "test")
    train = open_dataset(f"nih:{root}", "train")
    val = open_dataset(f"nih:{root}", "val")
    assert len(test) == 310 and len(train) + len(val) == 690
    assert not set(train.patient_ids) & set(val.patient_ids)
    assert not set(train.patient_ids + val.patient_ids) & set(test.patient_ids)
    # the RGBA files (grey content) load as one channel like the RGB ones
    rgba_names = _rgba_names(root)
    rgba = [i for i, p in enumerate(all_.paths) if p.name in rgba_names]
    assert len(rgba) == 21
    x, _ = all_[rgba[0]]
    assert x.shape == (1, 64, 64) and np.isfinite(x.numpy()).all()


def _rgba_names(root) -> set[str]:
    from PIL import Image

    out = set()
    for p in sorted((root / "images").iterdir()):
        with Image.open(p) as im:
            if im.mode == "RGBA":
                out.add(p.name)
    return out


def test_nih_full_label_table_statistics(shared_data, tmp_path):
    labels = shared_data / "nih14-labels"
    df = read_nih_labels(labels / "Data_Entry_2017_v2020.csv.gz")
    assert len(df) == 112_120 and df["patient_id"].nunique() == 30_805
    s = dataset_statistics(f"nih:{labels}?labels_only=true", "all", tmp_path)
    assert s.n == 112_120 and s.counts == df[list(NIH_CLASSES)].sum().astype(int).tolist()
    assert (tmp_path / "jaccard.png").is_file() and (tmp_path / "stats.json").is_file()
    assert len(open_dataset(f"nih:{labels}?labels_only=true", "test")) == 25_596


def test_kermany_folder_dedup(shared_data, record_property):
    root = shared_data / "kermany-pneumonia" / "train"
    all_ = open_dataset(f"folder:{root}?dedup=true", "all")
    rep = all_.meta["dedup"]
    record_property("kermany_dedup", rep)
    assert rep["n_files"] == 5216 and rep["duplicates_removed"] > 0
    assert len(all_) == rep["n_files"] - rep["duplicates_removed"]
    assert all_.class_names == ["NORMAL", "PNEUMONIA"]
    parts = [open_dataset(f"folder:{root}?dedup=true", s) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(all_)
    # no image content in two splits
    from medscalpel.data.folder import file_sha256

    hashes = [{file_sha256(q) for q in p.paths} for p in parts[1:]]
    assert not hashes[0] & hashes[1]
    assert sum(len(h) for h in hashes) == len(parts[1]) + len(parts[2])
