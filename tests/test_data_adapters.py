"""Every file-format adapter on a tiny fixture written here in the real on-disk format."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medscalpel.data import Preprocess, open_dataset
from medscalpel.data.labels import (CHEXPERT_CLASSES, MIMIC_LT_CLASSES, NIH_CLASSES,
                                    NIH_LT_CLASSES, resolve_inside)
from medscalpel.data.medmnist import download_medmnist
from medscalpel.data.nih import read_nih_labels
from medscalpel.errors import ConfigError, DataError, MissingExtraError

PRE = Preprocess(size=16)


def img(path: Path, value: int = 100, mode: str = "L", size: int = 20) -> Path:
    """Write a small image; grey content in any mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    a = rng.integers(0, 255, (size, size), dtype=np.uint8)
    im = Image.fromarray(a, "L")
    if mode != "L":
        im = im.convert(mode)
    im.save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ============================================================================ NIH
NIH_ROWS = [  # id, findings, patient, view
    ("00000001_000.png", "Cardiomegaly", 1, "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, "PA"),
    ("00000002_000.png", "No Finding", 2, "AP"),
    ("00000003_000.png", "Hernia|Effusion|Mass", 3, "PA"),
    ("00000004_000.png", "No Finding", 4, "PA"),
    ("00000005_000.png", "Effusion", 5, "AP"),
    ("00000006_000.png", "Pleural_Thickening", 6, "PA"),
    ("00000007_000.png", "Atelectasis|Effusion", 7, "AP"),
]
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


def make_nih(root: Path, nested: bool = False, gz: bool = False, rows=NIH_ROWS) -> Path:
    text = NIH_HEADER + "".join(f"{i},{f},0,{p},50,M,{v},2500,2048,0.14,0.14\n"
                                for i, f, p, v in rows)
    if gz:
        root.mkdir(parents=True, exist_ok=True)
        with gzip.open(root / "Data_Entry_2017_v2020.csv.gz", "wt") as fh:
            fh.write(text)
    else:
        write(root / "Data_Entry_2017.csv", text)
    for k, (i, *_rest) in enumerate(rows):
        sub = (root / f"images_{k % 2 + 1:03d}" / "images") if nested else root / "images"
        img(sub / i, k, mode="RGBA" if k % 3 == 0 else "RGB")
    write(root / "train_val_list.txt", "\n".join(r[0] for r in rows[:6]) + "\n")
    write(root / "test_list.txt", "\n".join(r[0] for r in rows[6:]) + "\n")
    return root


def test_nih_splits_labels_patients(tmp_path):
    root = make_nih(tmp_path / "nih")
    all_ = open_dataset(f"nih:{root}", "all", PRE)
    assert len(all_) == 8 and all_.class_names == list(NIH_CLASSES)
    assert all_.task == "multilabel" and all_.labels.dtype == np.float32
    lab = dict(zip(all_.ids, all_.labels))
    assert lab["00000002_000.png"].sum() == 0  # No Finding = all zeros
    hot = lab["00000003_000.png"]
    assert [NIH_CLASSES[k] for k in np.flatnonzero(hot)] == ["Effusion", "Mass", "Hernia"]
    assert all_.patient_ids[0] == "1"
    test = open_dataset(f"nih:{root}", "test", PRE)
    assert test.ids == ["00000006_000.png", "00000007_000.png"]
    train = open_dataset(f"nih:{root}?val_fraction=0.4&seed=3", "train", PRE)
    val = open_dataset(f"nih:{root}?val_fraction=0.4&seed=3", "val", PRE)
    assert len(train) + len(val) == 6 and len(val) > 0
    assert not set(train.patient_ids) & set(val.patient_ids)  # carved by patient
    x, y = all_[0]  # an RGBA file with grey content -> one channel
    assert x.shape == (1, 16, 16) and y.shape == (14,)
    three = open_dataset(f"nih:{root}", "all", Preprocess(size=16, channels=3))
    assert three[1][0].shape == (3, 16, 16)


def test_nih_view_filter_nested_layout_gz_and_labels_only(tmp_path):
    root = make_nih(tmp_path / "nih", nested=True, gz=True)
    ap = open_dataset(f"nih:{root}?view=ap", "all", PRE)
    assert sorted(ap.ids) == ["00000002_000.png", "00000005_000.png", "00000007_000.png"]
    assert ap[0][0].shape == (1, 16, 16)  # found under images_00X/images
    lo = open_dataset(f"nih:{root}?labels_only=true", "test")
    assert len(lo) == 2
    with pytest.raises(DataError, match="labels_only=true"):
        lo[0]
    df = read_nih_labels(root / "Data_Entry_2017_v2020.csv.gz")
    assert len(df) == 8 and list(df.columns[:3]) == ["id", "patient_id", "view"]
    assert df[list(NIH_CLASSES)].to_numpy().sum() == 10  # 1+2+0+3+0+1+1+2


def test_nih_view_empty_split_raises(tmp_path):
    rows = [r for r in NIH_ROWS if r[3] == "PA"][:3] + [r for r in NIH_ROWS if r[3] == "AP"]
    root = make_nih(tmp_path / "nih", rows=rows)
    # test_list = the last two rows, both AP -> PA test split is empty
    with pytest.raises(DataError, match="'test' split of nih.* is empty"):
        open_dataset(f"nih:{root}?view=PA", "test", PRE)


def test_nih_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(f"nih:{tmp_path / 'nope'}", "all")
    root = make_nih(tmp_path / "nih")
    (root / "test_list.txt").unlink()
    with pytest.raises(DataError, match="test_list.txt is missing"):
        open_dataset(f"nih:{root}", "test")
    with pytest.raises(ConfigError, match="'view' parameter"):
        open_dataset(f"nih:{root}?view=LL", "all")
    with pytest.raises(ConfigError, match="Unknown option"):
        open_dataset(f"nih:{root}?colour_mode=1", "all")
    bad = tmp_path / "bad"
    make_nih(bad)
    csv = bad / "Data_Entry_2017.csv"
    csv.write_text(csv.read_text().replace("Hernia|Effusion|Mass", "Hernia|Efusion"))
    with pytest.raises(DataError, match=r"line 5, column 'Finding Labels': unknown class name "
                                        r"'Efusion'"):
        open_dataset(f"nih:{bad}", "all")
    csv.write_text("Image Index,Labels\nx.png,Mass\n")
    with pytest.raises(DataError, match=r"lacks the required column\(s\) \['Finding Labels', "
                                        r"'Patient ID'\]. It has the columns \['Image Index', "
                                        r"'Labels'\]"):
        open_dataset(f"nih:{bad}", "all")


def test_nih_missing_and_corrupt_images(tmp_path):
    root = make_nih(tmp_path / "nih")
    (root / "images" / "00000004_000.png").unlink()
    with pytest.raises(DataError, match="1 of 8 image file.*skip_corrupt=true"):
        open_dataset(f"nih:{root}", "all")
    p = root / "images" / "00000005_000.png"
    p.write_bytes(p.read_bytes()[:60])  # truncated PNG
    ds = open_dataset(f"nih:{root}?skip_corrupt=true", "all", PRE)
    assert len(ds) == 6 and ds.skip_report.count == 2
    reasons = dict(ds.skip_report.skipped)
    assert reasons["00000004_000.png"] == "file not found"
    assert "00000005_000.png" in reasons
    assert ds.describe()["skipped"]["count"] == 2
    plain = open_dataset(f"nih:{root}", "test", PRE)  # the damaged files are not in test
    assert len(plain) == 2
    ds2 = open_dataset(f"nih:{root}?skip_corrupt=false&labels_file=Data_Entry_2017.csv", "test")
    assert len(ds2) == 2


# ============================================================================ NIH-CXR-LT
def make_nih_lt(root: Path, with_val: bool) -> Path:
    header = "id," + ",".join(NIH_LT_CLASSES) + ",subj_id\n"
    rng = np.random.default_rng(0)
    splits = ("train", "val", "test") if with_val else ("train", "test")
    n = 0
    for s in splits:
        lines = []
        for k in range(6 if s == "train" else 3):
            name = f"{n // 2 + 1:08d}_{n % 2:03d}.png"
            row = rng.integers(0, 2, len(NIH_LT_CLASSES))
            lines.append(name + "," + ",".join(map(str, row)) + f",{n // 2 + 1}")
            img(root / "images" / name, n)
            n += 1
        write(root / "labels" / f"miccai2023_nih-cxr-lt_labels_{s}.csv",
              header + "\n".join(lines) + "\n")
    return root


def test_nih_lt(tmp_path):
    root = make_nih_lt(tmp_path / "lt", with_val=True)
    tr = open_dataset(f"nih-lt:{root}", "train", PRE)
    assert len(tr) == 6 and tr.num_classes == 20 and tr.class_names[0] == "No Finding"
    assert tr.patient_ids[:2] == ["1", "1"]
    assert len(open_dataset(f"nih-lt:{root}", "val", PRE)) == 3
    assert len(open_dataset(f"nih-lt:{root}", "all", PRE)) == 12
    x, y = tr[0]
    assert x.shape == (1, 16, 16) and y.shape == (20,)
    src = (root / "labels" / "miccai2023_nih-cxr-lt_labels_train.csv").read_text()
    assert torch.equal(y, torch.tensor([float(v) for v in src.splitlines()[1].split(",")[1:21]]))


def test_nih_lt_val_carved_and_errors(tmp_path):
    root = make_nih_lt(tmp_path / "lt", with_val=False)
    tr = open_dataset(f"nih-lt:{root}?val_fraction=0.34", "train", PRE)
    va = open_dataset(f"nih-lt:{root}?val_fraction=0.34", "val", PRE)
    assert len(tr) + len(va) == 6 and len(va) == 2  # 1 of 3 patients, 2 images each
    assert not set(tr.patient_ids) & set(va.patient_ids)
    f = root / "labels" / "miccai2023_nih-cxr-lt_labels_test.csv"
    f.write_text(f.read_text().replace(",subj_id", ",subject").replace("\n0", "\n2", 1)
                 .replace("Hernia,", "Hernia_x,"))
    with pytest.raises(DataError, match=r"lacks the required column\(s\) \['Hernia'\]"):
        open_dataset(f"nih-lt:{root}", "test")
    with pytest.raises(DataError, match="No nih-lt label files"):
        open_dataset(f"nih-lt:{root}?labels_dir={tmp_path}", "all")


# ============================================================================ CheXpert
def make_chexpert(parent: Path) -> Path:
    d = parent / "CheXpert-v1.0-small"
    head = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_CLASSES) + "\n"
    rows_train = [
        ("patient00001/study1/view1_frontal.jpg", "Frontal", ["1.0", "", "-1.0"] + [""] * 11),
        ("patient00001/study1/view2_lateral.jpg", "Lateral", ["", "0.0", "1.0"] + [""] * 11),
        ("patient00002/study1/view1_frontal.jpg", "Frontal", ["", "-1.0", ""] + ["0.0"] * 11),
    ]
    lines = []
    for p, fl, lab in rows_train:
        rel = f"CheXpert-v1.0-small/train/{p}"
        img(parent / rel, len(lines))
        lines.append(f"{rel},Female,68,{fl},AP," + ",".join(lab))
    write(d / "train.csv", head + "\n".join(lines) + "\n")
    rel = "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"
    img(parent / rel, 9)
    write(d / "valid.csv", head + f"{rel},Male,73,Frontal,AP," + ",".join(["0.0"] * 13 + ["1.0"])
          + "\n")
    return d


@pytest.mark.parametrize("policy,expect", [("ignore", np.nan), ("zeros", 0.0), ("ones", 1.0)])
def test_chexpert_uncertain_policies(tmp_path, policy, expect):
    d = make_chexpert(tmp_path)
    ds = open_dataset(f"chexpert:{d}?uncertain={policy}", "train", PRE)
    assert ds.class_names == list(CHEXPERT_CLASSES) and len(ds) == 3
    k = CHEXPERT_CLASSES.index("Cardiomegaly")
    assert ds.labels[0, 0] == 1.0 and ds.labels[0, 1] == 0.0  # blank -> 0
    np.testing.assert_equal(ds.labels[0, k], expect)
    np.testing.assert_equal(ds.labels[2, 1], expect)
    assert ds.patient_ids == ["patient00001", "patient00001", "patient00002"]
    assert ds.meta["split_unit"]["unit"] == "patient"  # official files, patient from the path
    assert ds.meta["split_unit"]["n_patients"] == 2
    assert ds[0][0].shape == (1, 16, 16)


def test_chexpert_parent_root_frontal_splits_errors(tmp_path):
    make_chexpert(tmp_path)
    fr = open_dataset(f"chexpert:{tmp_path}?frontal_only=true", "train", PRE)  # parent as root
    assert len(fr) == 2 and all("frontal" in i for i in fr.ids)
    val = open_dataset(f"chexpert:{tmp_path}", "val", PRE)
    assert len(val) == 1 and val.labels[0, -1] == 1.0
    assert len(open_dataset(f"chexpert:{tmp_path}", "all", PRE)) == 4
    with pytest.raises(DataError, match="test.csv or test_labels.csv\\) is missing"):
        open_dataset(f"chexpert:{tmp_path}", "test")
    f = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    f.write_text(f.read_text().replace(",-1.0,", ",2.0,", 1))
    with pytest.raises(DataError, match=r"train.csv, line 2, column 'Cardiomegaly': value '2.0'"):
        open_dataset(f"chexpert:{tmp_path}", "train")
    f.write_text(f.read_text().replace(",2.0,", ",-1.0,").replace(
        "CheXpert-v1.0-small/train/patient00002", "CheXpert-v1.0-small/../../etc"))
    with pytest.raises(DataError, match="line 4, column 'Path'.* escapes the dataset root"):
        open_dataset(f"chexpert:{tmp_path}?uncertain=zeros", "train")


# ============================================================================ MIMIC-CXR-LT
def test_mimic_lt(tmp_path):
    root = tmp_path / "mimic"
    head = "subject_id,study_id,dicom_id,path," + ",".join(MIMIC_LT_CLASSES) + "\n"
    for s, subjects in (("train", (10000032, 10000033, 10000034)), ("test", (10000040,))):
        lines = []
        for j, sub in enumerate(subjects):
            rel = f"files/p10/p{sub}/s5000{j}/dcm{sub}.jpg"
            img(root / rel, sub % 97)
            lab = [0] * 19
            lab[j] = 1
            lines.append(f"{sub},5000{j},dcm{sub},{rel}," + ",".join(map(str, lab)))
        write(root / f"miccai2023_mimic-cxr-lt_labels_{s}.csv", head + "\n".join(lines) + "\n")
    tr = open_dataset(f"mimic-lt:{root}?val_fraction=0.34", "train", PRE)
    va = open_dataset(f"mimic-lt:{root}?val_fraction=0.34", "val", PRE)
    te = open_dataset(f"mimic-lt:{root}", "test", PRE)
    assert (len(tr), len(va), len(te)) == (2, 1, 1)
    assert te.ids == ["dcm10000040"] and te.patient_ids == ["10000040"]
    assert not set(tr.patient_ids) & set(va.patient_ids)
    assert tr.meta["split_unit"]["unit"] == te.meta["split_unit"]["unit"] == "patient"
    assert te.num_classes == 19 and te.labels[0, 0] == 1
    assert te[0][0].shape == (1, 16, 16)
    f = root / "miccai2023_mimic-cxr-lt_labels_test.csv"
    f.write_text(f.read_text().replace("files/p10/p10000040", "/abs/p10000040"))
    with pytest.raises(DataError, match="line 2, column 'path': image path '/abs/.*absolute"):
        open_dataset(f"mimic-lt:{root}", "test")


# ============================================================================ MedMNIST
def make_npz(path: Path, multilabel: bool, colour: bool = False) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 6), ("val", 2), ("test", 3)):
        shape = (n, 28, 28, 3) if colour else (n, 28, 28)
        arrays[f"{s}_images"] = rng.integers(0, 255, shape, dtype=np.uint8)
        arrays[f"{s}_labels"] = (rng.integers(0, 2, (n, 14), dtype=np.uint8) if multilabel
                                 else rng.integers(0, 2, (n, 1), dtype=np.uint8))
    np.savez_compressed(path, **arrays)
    return path


def test_medmnist_chest_and_pneumonia(tmp_path):
    f = make_npz(tmp_path / "chestmnist_64.npz", multilabel=True)
    ds = open_dataset(f"medmnist:{f}", "val", PRE)
    assert ds.task == "multilabel" and ds.class_names == list(NIH_CLASSES) and len(ds) == 2
    assert ds.ids == ["val_000000", "val_000001"] and ds[1][0].shape == (1, 16, 16)
    assert len(open_dataset(f"medmnist:{f}", "all", PRE)) == 11
    p = make_npz(tmp_path / "pneumoniamnist.npz", multilabel=False)
    pn = open_dataset(f"medmnist:{p}", "test", PRE)
    assert pn.task == "multiclass" and pn.class_names == ["NORMAL", "PNEUMONIA"]
    with np.load(p) as z:
        assert pn.labels.tolist() == z["test_labels"][:, 0].tolist()
    assert pn[0][1].dtype == torch.long


def test_medmnist_colour_flag_and_errors(tmp_path):
    f = make_npz(tmp_path / "mine.npz", multilabel=False, colour=True)
    with pytest.raises(DataError, match="Cannot tell the MedMNIST set"):
        open_dataset(f"medmnist:{f}", "train")
    ds = open_dataset(f"medmnist:{f}?flag=breastmnist", "train", Preprocess(size=16, colour=True,
                                                                             channels=3))
    assert ds.class_names == ["malignant", "normal, benign"] and ds[0][0].shape == (3, 16, 16)
    g = tmp_path / "bloodmnist_28.npz"
    np.savez(g, train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"lacks the arrays \['train_labels'\]; it has "
                                        r"\['train_images'\]"):
        open_dataset(f"medmnist:{g}", "train")
    with pytest.raises(DataError, match="Unknown MedMNIST flag 'foomnist'"):
        open_dataset(f"medmnist:{f}?flag=foomnist", "train")


def test_download_medmnist_without_package_or_network(tmp_path, monkeypatch):
    import medscalpel.data.medmnist as mm

    def missing(module, extra, feature=""):
        raise MissingExtraError(module, extra, feature)

    monkeypatch.setattr(mm, "optional_import", missing)
    with pytest.raises(MissingExtraError, match=r"pip install 'medscalpel\[medmnist\]'"):
        download_medmnist("pneumoniamnist", 28, tmp_path)

    class Offline:  # stands in for medmnist's dataset class on a machine without internet
        def __init__(self, **kw):
            raise OSError("[Errno -3] Temporary failure in name resolution")

    class FakeMedMNIST:
        INFO = {"pneumoniamnist": {"python_class": "PneumoniaMNIST"}}
        PneumoniaMNIST = Offline

    monkeypatch.setattr(mm, "optional_import", lambda *a, **k: FakeMedMNIST)
    with pytest.raises(DataError, match="failed: OSError.*no internet access"):
        download_medmnist("pneumoniamnist", 64, tmp_path)
    with pytest.raises(ConfigError, match="'size' parameter"):
        download_medmnist("pneumoniamnist", 32, tmp_path)


# ============================================================================ folder
def make_folder(root: Path) -> Path:
    for k in range(10):
        img(root / "NORMAL" / f"IM-{k:04d}-0001.jpeg", k)
    for k in range(20):
        img(root / "PNEUMONIA" / f"person{k // 2}_bacteria_{k}.jpeg", 100 + k)
    # byte-identical copies inside a class, and one across classes (contradictory label)
    for name in ("dupA.jpeg", "dupB.jpeg"):
        (root / "PNEUMONIA" / name).write_bytes((root / "PNEUMONIA" / "person0_bacteria_0.jpeg")
                                                .read_bytes())
    (root / "PNEUMONIA" / "cross.jpeg").write_bytes((root / "NORMAL" / "IM-0003-0001.jpeg")
                                                    .read_bytes())
    (root / ".DS_Store").write_bytes(b"\0junk")
    img(root / "NORMAL" / "lung masks" / "IM-0000-0001.png", 1)  # ignored (mask folder)
    return root


def test_folder_dedup_and_stratified_splits(tmp_path):
    root = make_folder(tmp_path / "kermany")
    all_ = open_dataset(f"folder:{root}", "all", PRE)
    rep = all_.meta["dedup"]
    assert rep["n_files"] == 33 and rep["duplicate_groups"] == 2 and rep["label_conflicts"] == 1
    assert rep["duplicates_removed"] == 4 and len(all_) == 29  # 2 copies + both conflict files
    assert all_.class_names == ["NORMAL", "PNEUMONIA"] and all_.task == "multiclass"
    assert "NORMAL/IM-0003-0001.jpeg" not in all_.ids
    parts = {s: open_dataset(f"folder:{root}?seed=3", s, PRE) for s in ("train", "val", "test")}
    ids = [set(p.ids) for p in parts.values()]
    assert sum(len(i) for i in ids) == 29 and not (ids[0] & ids[1] or ids[0] & ids[2]
                                                   or ids[1] & ids[2])
    assert np.bincount(parts["test"].labels).tolist() == [2, 4]  # round(0.2 * 9), round(0.2 * 20)
    assert np.bincount(parts["val"].labels).tolist() == [1, 2]
    again = open_dataset(f"folder:{root}?seed=3", "test", PRE)
    assert again.ids == parts["test"].ids
    x, y = parts["train"][0]
    assert x.shape == (1, 16, 16) and y.dtype == torch.long
    raw = open_dataset(f"folder:{root}?dedup=false", "all", PRE)
    assert len(raw) == 33 and raw.meta["dedup"] is None


def test_folder_patient_groups_classes_colour_and_errors(tmp_path):
    root = make_folder(tmp_path / "k")
    rx = "^(person[0-9]*|IM-[0-9]*)"
    parts = {s: open_dataset(f"folder:{root}?patient_regex={rx}&test_fraction=0.3", s, PRE)
             for s in ("train", "val", "test")}
    pats = [set(p.patient_ids) - {None} for p in parts.values()]
    assert not (pats[0] & pats[1] or pats[0] & pats[2] or pats[1] & pats[2])
    assert parts["train"].patient_ids[0] is not None
    one = open_dataset(f"folder:{root}?classes=PNEUMONIA,NORMAL", "all", PRE)
    assert one.class_names == ["PNEUMONIA", "NORMAL"] and one.labels[one.ids.index(
        "NORMAL/IM-0000-0001.jpeg")] == 1
    with pytest.raises(DataError, match=r"Unknown class name\(s\) \['COVID'\].*\['NORMAL', "
                                        r"'PNEUMONIA'\]"):
        open_dataset(f"folder:{root}?classes=NORMAL,COVID", "all")
    with pytest.raises(ConfigError, match="below 1"):
        open_dataset(f"folder:{root}?val_fraction=0.5&test_fraction=0.5", "all")
    col = tmp_path / "lc"
    for j, c in enumerate(("lung_aca", "lung_n")):
        for k in range(3):
            p = col / c / f"{c}{k}.jpeg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((12, 12, 3), (200, 30 * k, 90 + 60 * j), np.uint8)).save(p)
    rgb = open_dataset(f"folder:{col}?colour=true", "all",
                       Preprocess(size=16, channels=3, colour=True))
    assert rgb[0][0].shape == (3, 16, 16)
    assert not torch.allclose(rgb[0][0][0], rgb[0][0][1])  # colour kept
    (col / "lung_n" / "lung_n0.jpeg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="Cannot read image .*lung_n0.jpeg"):
        open_dataset(f"folder:{col}", "all", PRE)[3]
    ok = open_dataset(f"folder:{col}?skip_corrupt=true", "all", PRE)
    assert len(ok) == 5 and ok.skip_report.skipped[0][0] == "lung_n/lung_n0.jpeg"


# ============================================================================ csv
def test_csv_multilabel_multiclass_and_splits(tmp_path):
    root = tmp_path / "study"
    lines = ["path,pid,fold,effusion,mass,note"]
    for k in range(10):
        img(root / "imgs" / f"a{k}.png", k)
        eff = "" if k == 3 else str(k % 2)
        lines.append(f"imgs/a{k}.png,P{k // 2},{'test' if k >= 8 else 'train'},{eff},"
                     f"{int(k % 3 == 0)},x")
    write(root / "labels.csv", "\n".join(lines) + "\n")
    ds = open_dataset(f"csv:{root}?patient_col=pid", "all", PRE)
    assert ds.class_names == ["effusion", "mass"] and ds.task == "multilabel"  # numeric only
    assert np.isnan(ds.labels[3, 0]) and ds.labels[1, 0] == 1 and ds.labels[3, 1] == 1
    assert ds.patient_ids[:3] == ["P0", "P0", "P1"]
    spl = f"csv:{root / 'labels.csv'}?patient_col=pid&split_col=fold&label_cols=mass"
    te = open_dataset(spl, "test", PRE)
    assert te.ids == ["imgs/a8.png", "imgs/a9.png"] and te.class_names == ["mass"]
    tr = open_dataset(spl + "&val_fraction=0.25", "train", PRE)
    va = open_dataset(spl + "&val_fraction=0.25", "val", PRE)
    assert len(tr) + len(va) == 8 and len(va) == 2 and not set(tr.patient_ids) & set(va.patient_ids)
    auto = {s: open_dataset(f"csv:{root}?patient_col=pid&val_fraction=0.2", s, PRE)
            for s in ("train", "val", "test")}  # 5 patients: 1 test, 1 val, 3 train
    assert sum(len(d) for d in auto.values()) == 10
    assert [len(set(auto[s].patient_ids)) for s in ("train", "val", "test")] == [3, 1, 1]
    assert not set(auto["train"].patient_ids) & set(auto["test"].patient_ids)
    assert auto["train"][0][0].shape == (1, 16, 16)

    mc = root / "mc.csv"
    write(mc, "path,label\nimgs/a0.png,COVID\nimgs/a1.png,Normal\nimgs/a2.png,COVID\n")
    m = open_dataset(f"csv:{mc}?task=multiclass", "all", PRE)
    assert m.class_names == ["COVID", "Normal"] and m.labels.tolist() == [0, 1, 0]
    with pytest.raises(DataError, match=r"line 3, column 'label': unknown class name 'Normal'"):
        open_dataset(f"csv:{mc}?task=multiclass&classes=COVID,Viral", "all")


@pytest.mark.parametrize("bad,msg", [
    ("../outside.png", r"line 3, column 'path': image path '../outside.png' escapes the dataset "
                       "root"),
    ("imgs/../../outside.png", "escapes the dataset root"),
    ("/etc/passwd", r"line 3, column 'path': image path '/etc/passwd' is absolute"),
])
def test_csv_paths_stay_inside_root(tmp_path, bad, msg):
    root = tmp_path / "study"
    img(root / "imgs" / "a.png")
    img(tmp_path / "outside.png")
    write(root / "labels.csv", f"path,y\nimgs/a.png,1\n{bad},0\n")
    with pytest.raises(DataError, match=msg):
        open_dataset(f"csv:{root}", "all")


def test_csv_errors(tmp_path):
    root = tmp_path / "s"
    img(root / "a.png")
    write(root / "labels.csv", "file,y\na.png,1\n")
    with pytest.raises(DataError, match=r"labels.csv lacks the required column\(s\) \['path'\]. "
                                        r"It has the columns \['file', 'y'\]"):
        open_dataset(f"csv:{root}", "all")
    assert len(open_dataset(f"csv:{root}?path_col=file", "all")) == 1
    with pytest.raises(DataError, match="label CSV .*nothere.csv does not exist"):
        open_dataset(f"csv:{root}?file=nothere.csv", "all")
    write(root / "l2.csv", "path,y\na.png,yes\n")
    with pytest.raises(DataError, match=r"l2.csv, line 2, column 'y': value 'yes'"):
        open_dataset(f"csv:{root}?file=l2.csv&label_cols=y", "all")
    write(root / "l3.csv", "path,y\n")
    with pytest.raises(DataError, match="no rows"):
        open_dataset(f"csv:{root}?file=l3.csv", "all")
    write(root / "l4.csv", "path,y\na.png,1\nb.png,0\n")
    with pytest.raises(DataError, match=r"1 of 2 image file.*b.png"):
        open_dataset(f"csv:{root}?file=l4.csv", "all")
    with pytest.raises(ConfigError, match="'split' parameter"):
        open_dataset(f"csv:{root}?path_col=file", "holdout")


def test_resolve_inside_symlink_escape(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(DataError, match="escapes"):
        resolve_inside(root, "link/x.png", "here")
    assert resolve_inside(root, "sub/x.png", "here") == root / "sub" / "x.png"
