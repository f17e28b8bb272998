"""Patient-wise splits by default: the Kermany file-name pattern, the csv patient column, and the
labelled image-wise fallback (warned once, recorded in ``dataset.meta["split_unit"]``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medscalpel.data import Preprocess, open_dataset
from medscalpel.data.base import split_unit_info, split_warning
from medscalpel.data.folder import KERMANY_PATIENT, patients_from_names
from medscalpel.errors import ConfigError

PRE = Preprocess(size=16)
SPLITS = ("train", "val", "test")


def img(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(value).integers(0, 255, (12, 12), dtype=np.uint8)
    Image.fromarray(a, "L").save(path)


def kermany_like(root: Path, extra_unnamed: int = 0) -> Path:
    """12 IM- patients and 6 NORMAL2-IM- patients (1-3 images each) in NORMAL; 20 person
    patients with 2-4 images (bacteria and virus) in PNEUMONIA; optional files without a
    patient pattern."""
    v = 0
    for p in range(12):
        for s in range(1 + p % 3):
            img(root / "NORMAL" / f"IM-{p:04d}-{s + 1:04d}.jpeg", v := v + 1)
    for p in range(6):
        for s in range(1 + p % 2):
            img(root / "NORMAL" / f"NORMAL2-IM-{p:04d}-{s + 1:04d}.jpeg", v := v + 1)
    for p in range(20):
        for s in range(2 + p % 3):
            kind = "bacteria" if s % 2 == 0 else "virus"
            img(root / "PNEUMONIA" / f"person{p + 1}_{kind}_{v}.jpeg", v := v + 1)
    for k in range(extra_unnamed):
        img(root / "NORMAL" / f"scan_{k}.jpeg", v := v + 1)
    return root


def test_kermany_pattern_on_names():
    names = ["person1000_bacteria_2931.jpeg", "person1000_virus_1681.jpeg",
             "person12_virus_1_2.jpeg", "IM-0115-0001.jpeg", "IM-0117-0001-0002.jpeg",
             "NORMAL2-IM-0381-0001.jpeg", "NORMAL2-IM-1345-0001-0002.jpeg", "scan_7.jpeg",
             "person_x.jpeg", "IM-12.jpeg"]
    assert patients_from_names(names, "auto") == [
        "person1000", "person1000", "person12", "IM-0115", "IM-0117", "NORMAL2-IM-0381",
        "NORMAL2-IM-1345", None, None, None]
    assert patients_from_names(names, "none") == [None] * len(names)
    assert patients_from_names(["a-7_x.png"], r"^a-(\d+)") == ["7"]
    assert KERMANY_PATIENT.startswith("^")
    with pytest.raises(ConfigError, match="'patient_regex' parameter of the 'folder' adapter"):
        patients_from_names(["x"], "(unclosed")


def test_folder_default_split_is_by_patient(tmp_path, caplog):
    root = kermany_like(tmp_path / "k")
    with caplog.at_level(logging.WARNING):
        parts = {s: open_dataset(f"folder:{root}?seed=1", s, PRE) for s in SPLITS}
    assert not [r for r in caplog.records if "split" in r.getMessage()]  # fully patient-wise
    n_all = len(open_dataset(f"folder:{root}", "all", PRE))
    assert n_all == sum(len(p) for p in parts.values()) == 24 + 9 + 59
    pats = {s: set(parts[s].patient_ids) for s in SPLITS}
    assert None not in pats["train"] | pats["val"] | pats["test"]
    assert not (pats["train"] & pats["val"] or pats["train"] & pats["test"]
                or pats["val"] & pats["test"])
    assert len(pats["train"] | pats["val"] | pats["test"]) == 38
    info = parts["test"].meta["split_unit"]
    assert info["unit"] == "patient" and info["n_images"] == 92 and info["n_patients"] == 38
    assert info["n_without_patient"] == 0 and "auto" in info["basis"]
    assert split_warning(parts["test"]) is None
    # the same images split image-wise put one patient on both sides
    img_parts = {s: open_dataset(f"folder:{root}?seed=1&patient_regex=none", s, PRE)
                 for s in SPLITS}
    assert img_parts["test"].meta["split_unit"]["unit"] == "image"
    assert "split by IMAGE" in split_warning(img_parts["test"])
    names = {s: {Path(i).name.rsplit("_", 1)[0] for i in img_parts[s].ids} for s in SPLITS}
    assert names["train"] & names["test"]  # person<N>_<kind> shared: leakage the default avoids


def test_folder_no_patient_fallback_warns_once_and_records(tmp_path, caplog):
    root = kermany_like(tmp_path / "k", extra_unnamed=5)
    with caplog.at_level(logging.WARNING, logger="medscalpel.data.base"):
        parts = {s: open_dataset(f"folder:{root}", s, PRE) for s in SPLITS}
        open_dataset(f"folder:{root}", "test", PRE)
    msgs = [r.getMessage() for r in caplog.records if "split partly by image" in r.getMessage()]
    assert len(msgs) == 1 and "5 of 97 images have no patient id" in msgs[0]
    for s in SPLITS:
        info = parts[s].meta["split_unit"]
        assert (info["unit"], info["n_without_patient"], info["n_with_patient"]) == \
            ("mixed", 5, 92)
        assert split_warning(parts[s]) == msgs[0]
    every = [i for s in SPLITS for i in parts[s].ids]
    assert sorted(every) == sorted(open_dataset(f"folder:{root}", "all", PRE).ids)
    assert split_warning(open_dataset(f"folder:{root}", "all", PRE)) is None  # nothing split
    pats = [set(parts[s].patient_ids) - {None} for s in SPLITS]
    assert not (pats[0] & pats[1] or pats[0] & pats[2] or pats[1] & pats[2])


def test_split_unit_info_counts():
    assert split_unit_info(["a", "a", "b"])["unit"] == "patient"
    info = split_unit_info(["a", None, "", "b"], basis="x")
    assert (info["unit"], info["n_with_patient"], info["n_patients"], info["basis"]) == \
        ("mixed", 2, 2, "x")
    assert split_unit_info([None, None])["unit"] == "image"
    assert split_warning({"split_unit": info, "split": "test"}).startswith("split partly")
    assert split_warning({"split_unit": info, "split": "all"}) is None
    assert split_warning({}) is None


def _csv(root: Path, header: str, rows: list[str]) -> Path:
    for k in range(len(rows)):
        img(root / f"i{k}.png", k)
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return root


def test_csv_patient_column_is_found_and_used(tmp_path, caplog):
    rows = [f"i{k}.png,{1000 + k // 3},{k % 2}" for k in range(30)]  # 10 patients x 3 images
    root = _csv(tmp_path / "a", "path,Patient ID,effusion", rows)
    parts = {s: open_dataset(f"csv:{root}", s, PRE) for s in SPLITS}
    for s in SPLITS:
        assert parts[s].class_names == ["effusion"]  # the numeric id column is not a label
        assert parts[s].meta["patient_col"] == "Patient ID"
        assert parts[s].meta["split_unit"]["unit"] == "patient"
    pats = [set(parts[s].patient_ids) for s in SPLITS]
    assert [len(p) for p in pats] == [7, 1, 2] and not (pats[0] & pats[2] or pats[1] & pats[2])
    root2 = _csv(tmp_path / "b", "path,subject_id,effusion", rows)
    assert open_dataset(f"csv:{root2}", "test", PRE).meta["patient_col"] == "subject_id"
    with caplog.at_level(logging.WARNING, logger="medscalpel.data.base"):
        off = {s: open_dataset(f"csv:{root2}?patient_col=none&label_cols=effusion", s, PRE)
               for s in SPLITS}
    assert off["test"].meta["split_unit"]["unit"] == "image"
    assert sum("split by IMAGE" in r.getMessage() for r in caplog.records) == 1
    blank = _csv(tmp_path / "c", "path,pid,y", [f"i{k}.png,{'' if k < 2 else 'P' + str(k // 2)},"
                                                f"{k % 2}" for k in range(8)])
    ds = open_dataset(f"csv:{blank}", "all", PRE)
    assert ds.patient_ids[:3] == [None, None, "P1"]  # a blank cell is unknown, not 'nan'
    assert ds.meta["split_unit"]["unit"] == "mixed"
