"""DICOM files through the ``folder:`` and ``csv:`` specs (identified as ``dicom:`` identifies
them: pseudonyms of SOPInstanceUID / PatientID, patient-wise splits on PatientID,
``keep_identifiers``, mixed folders refused), and the salt: per user by default, per
experiment with ``salt_file=``, never per run (why: the ids feed the data hashes that resume
and sweep identities compare)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pydicom", reason="pydicom not installed: pip install 'medscalpel[dicom]'")

from test_dicom import PHI, _contains, write_dcm  # noqa: E402

from medscalpel.data import open_dataset  # noqa: E402
from medscalpel.data.dicom import identifiers_kept  # noqa: E402
from medscalpel.data.dicom_read import (dicom_only, key_id, load_salt, pseudonym,  # noqa: E402
                                        read_dicom)
from medscalpel.errors import ConfigError, DataError  # noqa: E402

SALT = "specs-test-salt-0123456789abcdef"
CLASSES = ("NORMAL", "PNEUMONIA")


@pytest.fixture(autouse=True)
def salt(monkeypatch):
    monkeypatch.setenv("MEDSCALPEL_DICOM_SALT", SALT)
    monkeypatch.delenv("MEDSCALPEL_DICOM_SALT_FILE", raising=False)


def _uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _images(root: Path, n_patients: int = 6, per_patient: int = 2, subdir: bool = True,
            **tags) -> list[dict]:
    """DICOMs named after their patient (as some exports do), one class per patient: in
    ``root/<class>/`` (``subdir``) or ``root/``; one row per file."""
    rows, rng = [], np.random.default_rng(0)
    for p in range(n_patients):
        pid, label = f"MRN{5100 + p}", CLASSES[p % 2]
        for k in range(per_patient):
            arr = rng.integers(0, 4096, (20, 20))
            rel = f"{label}/{pid}_{k}.dcm" if subdir else f"{pid}_{k}.dcm"
            path = write_dcm(root / rel, arr, PatientID=pid, **tags)
            rows.append(dict(rel=rel, path=path, uid=_uid(path), pid=pid, label=label))
    return rows


def _hash(value: str, kind: str, salt: str = SALT) -> str:
    return pseudonym(value, kind, salt.encode())


def _disjoint_splits(spec: str) -> dict[str, object]:
    parts = {s: open_dataset(spec, split=s, test_fraction=0.34, val_fraction=0.33)
             for s in ("train", "val", "test")}
    pats = {s: set(d.patient_ids) for s, d in parts.items()}
    assert not (pats["train"] & pats["test"]) and not (pats["train"] & pats["val"])
    assert not (pats["val"] & pats["test"])
    return parts


# ----------------------------------------------------------------------------- folder:
def test_folder_of_dicoms_is_identified_by_tags(tmp_path):
    root = tmp_path / "site"
    rows = _images(root)
    full = open_dataset(f"folder:{root}", split="all")
    by_id = {_hash(r["uid"], "image"): r for r in rows}
    assert len(full) == 12 and set(full.ids) == set(by_id)
    for i, iid in enumerate(full.ids):
        r = by_id[iid]
        assert full.patient_ids[i] == _hash(r["pid"], "patient")
        assert full.class_names[full.labels[i]] == r["label"]
    assert full.meta["identifiers"] == "pseudonymised"
    assert full.meta["id_source"]["patient"] == "pseudonym of PatientID"
    assert full.meta["key_id"] == key_id(SALT.encode()) and full.meta["salt_source"] == "env"
    assert full.meta["split_unit"]["unit"] == "patient"
    assert full.meta["split_unit"]["n_patients"] == 6
    assert "MRN" not in json.dumps([full.ids, full.patient_ids, full.meta, full.describe()])
    np.testing.assert_array_equal(full.load_raw(0), read_dicom(full.paths[0]))
    parts = _disjoint_splits(f"folder:{root}")
    assert sorted(i for d in parts.values() for i in d.ids) == sorted(full.ids)
    # keep_identifiers: paths and raw PatientIDs; the same split (drawn on the real ids)
    kept = open_dataset(f"folder:{root}?keep_identifiers=true", split="test",
                        test_fraction=0.34, val_fraction=0.33)
    assert kept.meta["identifiers"] == "kept" and kept.meta["key_id"] is None
    assert sorted(kept.ids) == sorted(r["rel"] for r in rows if _hash(r["uid"], "image")
                                      in parts["test"].ids)
    assert sorted(_hash(p, "patient") for p in kept.patient_ids) == \
        sorted(parts["test"].patient_ids)
    assert identifiers_kept(f"folder:{root}?keep_identifiers=true")
    assert not identifiers_kept(f"folder:{root}")


def test_folder_dicom_copies_conflicts_refusals_and_skips(tmp_path):
    root = tmp_path / "site"
    rows = _images(root, n_patients=4)
    # a copy of one image (same SOPInstanceUID, other name) in its own class: kept once
    first = rows[0]
    (root / first["label"] / "copy_MRN9.dcm").write_bytes(first["path"].read_bytes())
    ds = open_dataset(f"folder:{root}", split="all")
    assert len(ds) == 8 and ds.meta["dedup"]["duplicates_removed"] == 1
    assert ds.meta["dedup"]["examples"] == [[_hash(first["uid"], "image")] * 2]
    # the same image under the other class: a contradictory label, the group dropped
    other = CLASSES[1 - CLASSES.index(first["label"])]
    (root / other / "copy_MRN9b.dcm").write_bytes(first["path"].read_bytes())
    ds = open_dataset(f"folder:{root}", split="all")
    assert len(ds) == 7 and ds.meta["dedup"]["label_conflicts"] == 1
    with pytest.raises(DataError, match="appears more than once"):
        open_dataset(f"folder:{root}?dedup=false", split="all")
    (root / other / "copy_MRN9b.dcm").unlink()
    (root / first["label"] / "copy_MRN9.dcm").unlink()
    # the patient comes from the tag: a file-name pattern is refused, not silently ignored
    with pytest.raises(ConfigError, match=r"PatientID tag.*Remove the option"):
        open_dataset(f"folder:{root}?patient_regex=MRN([0-9]%2B)", split="all")
    # an unusable file: refused naming it, or skipped and listed by pseudonym only
    (root / CLASSES[0] / "MRN7777_junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(DataError, match=r"MRN7777_junk\.dcm"):
        open_dataset(f"folder:{root}", split="all")
    ds = open_dataset(f"folder:{root}?skip_corrupt=true", split="all")
    assert len(ds) == 8 and ds.meta["skipped"] == 1 and ds.skip_report.count == 1
    text = json.dumps(ds.describe())
    assert "MRN7777" not in text and "<file>" in text
    assert ds.skip_report.skipped[0][0] == _hash(f"{CLASSES[0]}/MRN7777_junk.dcm", "file")


def test_mixed_folders_and_tables_are_refused(tmp_path):
    from PIL import Image

    root = tmp_path / "mixed"
    _images(root, n_patients=2)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / CLASSES[0] / "person1_x.png")
    with pytest.raises(DataError, match=r"mixes 4 DICOM file\(s\).*1 other image file"):
        open_dataset(f"folder:{root}", split="all")
    pd.DataFrame({"path": [f"{CLASSES[0]}/person1_x.png", f"{CLASSES[0]}/MRN5100_0.dcm"],
                  "a": [0, 1]}).to_csv(root / "labels.csv", index=False)
    with pytest.raises(DataError, match=r"labels\.csv mixes 1 DICOM file"):
        open_dataset(f"csv:{root}/labels.csv", split="all")
    assert dicom_only([Path("a.png")], "x") is False and dicom_only([Path("a.DCM")], "x")
    # PNG-only datasets: unchanged, and the DICOM options are refused rather than ignored
    png = tmp_path / "png"
    for k, c in enumerate(CLASSES):
        (png / c).mkdir(parents=True)
        Image.fromarray(np.full((20, 20), k, np.uint8)).save(png / c / f"person1_{c}.png")
    ds = open_dataset(f"folder:{png}", split="all")
    assert sorted(ds.ids) == ["NORMAL/person1_NORMAL.png", "PNEUMONIA/person1_PNEUMONIA.png"]
    assert "identifiers" not in ds.meta
    with pytest.raises(ConfigError, match="for DICOM folders"):
        open_dataset(f"folder:{png}?keep_identifiers=true", split="all")


# ----------------------------------------------------------------------------- csv:
def test_csv_of_dicoms_is_identified_by_tags(tmp_path):
    root = tmp_path / "site"
    rows = _images(root, subdir=False)
    df = pd.DataFrame({"path": [r["rel"] for r in rows],
                       "patient_id": [f"row{i}" for i in range(len(rows))],  # not the tag
                       "PNEUMONIA": [int(r["label"] == "PNEUMONIA") for r in rows]})
    df.to_csv(root / "labels.csv", index=False)
    spec = f"csv:{root}/labels.csv"
    full = open_dataset(spec, split="all")
    by_id = {_hash(r["uid"], "image"): r for r in rows}
    assert set(full.ids) == set(by_id) and full.class_names == ["PNEUMONIA"]
    for i, iid in enumerate(full.ids):
        assert full.patient_ids[i] == _hash(by_id[iid]["pid"], "patient")  # the tag (auto)
        assert full.labels[i, 0] == float(by_id[iid]["label"] == "PNEUMONIA")
    assert full.meta["identifiers"] == "pseudonymised" and full.meta["patient_col"] is None
    assert full.meta["split_unit"]["unit"] == "patient"
    assert full.meta["split_unit"]["n_patients"] == 6
    assert "MRN" not in json.dumps([full.ids, full.patient_ids, full.meta])
    np.testing.assert_array_equal(full.load_raw(3), read_dicom(full.paths[3]))
    parts = _disjoint_splits(spec)
    assert sorted(i for d in parts.values() for i in d.ids) == sorted(full.ids)
    # a patient column the user names is used instead of the tag (pseudonymised too)
    named = open_dataset(f"{spec}?patient_col=patient_id", split="all")
    assert sorted(named.patient_ids) == sorted(_hash(f"row{i}", "patient") for i in range(12))
    assert named.meta["id_source"]["patient"] == "pseudonym of column 'patient_id'"
    # keep_identifiers: the paths as written and the raw PatientIDs
    kept = open_dataset(f"{spec}?keep_identifiers=true", split="all")
    assert sorted(kept.ids) == sorted(r["rel"] for r in rows)
    assert sorted(set(kept.patient_ids)) == [f"MRN{5100 + p}" for p in range(6)]
    assert identifiers_kept(f"{spec}?keep_identifiers=true")


def test_csv_of_dicoms_missing_and_bad_rows(tmp_path):
    root = tmp_path / "site"
    rows = _images(root, n_patients=3, subdir=False)
    (root / "MRN8888.dcm").write_bytes(b"junk")
    df = pd.DataFrame({"path": [r["rel"] for r in rows] + ["MRN8888.dcm", "MRN9999_gone.dcm"],
                       "label": [r["label"] for r in rows] + ["NORMAL", "NORMAL"]})
    df.to_csv(root / "labels.csv", index=False)
    spec = f"csv:{root}/labels.csv?task=multiclass"
    with pytest.raises(DataError, match=r"MRN8888\.dcm"):
        open_dataset(spec, split="all")
    ds = open_dataset(f"{spec}&skip_corrupt=true", split="all")
    assert len(ds) == 6 and ds.meta["skipped"] == 2
    assert [i for i, _ in ds.skip_report.skipped] == [_hash("MRN8888.dcm", "file"),
                                                      _hash("MRN9999_gone.dcm", "file")]
    assert "MRN" not in json.dumps(ds.describe())
    test = open_dataset(f"{spec}&skip_corrupt=true", split="test", test_fraction=0.34)
    assert 0 < len(test) < 6 and set(test.ids) <= set(ds.ids)
    with pytest.raises(ConfigError, match="tables of DICOM files"):
        pd.DataFrame({"path": ["a.png"], "x": [1]}).to_csv(tmp_path / "p.csv", index=False)
        open_dataset(f"csv:{tmp_path}/p.csv?salt_file={tmp_path}/s", split="all")


# ----------------------------------------------------------------------------- the salt
def test_salt_sources_and_per_experiment_salt_file(tmp_path, monkeypatch):
    root = tmp_path / "site"
    rows = _images(root, subdir=False)
    pd.DataFrame({"path": [r["rel"] for r in rows],
                  "a": [int(r["label"] == "PNEUMONIA") for r in rows]}).to_csv(
        root / "labels.csv", index=False)
    exp = tmp_path / "secrets" / "exp42.salt"
    spec = f"csv:{root}/labels.csv"
    env_ds = open_dataset(spec, split="test")
    a = open_dataset(f"{spec}?salt_file={exp}", split="test")
    assert a.meta["salt_source"] == "spec" and exp.is_file()
    assert stat.S_IMODE(os.stat(exp).st_mode) == 0o600
    salt = exp.read_text().strip()
    assert a.ids == [_hash(r["uid"], "image", salt) for r in rows
                     if _hash(r["uid"], "image") in env_ds.ids]
    assert a.meta["key_id"] == key_id(salt.encode()) != env_ds.meta["key_id"]
    # stable within the experiment (same file: same ids, train -> evaluate -> report agree),
    # unlinkable to the user's other exports (no id in common), the same split
    again = open_dataset(f"{spec}?salt_file={exp}", split="test")
    assert again.ids == a.ids and again.content_hash() == a.content_hash()
    assert not set(a.ids) & set(env_ds.ids) and not set(a.patient_ids) & set(env_ds.patient_ids)
    assert len(a) == len(env_ds)
    b = open_dataset(f"dicom:{root}?salt_file={exp}", split="all")  # one salt, one id per image
    assert set(a.ids) <= set(b.ids) and b.meta["salt_source"] == "spec"
    # the sources: spec > env > MEDSCALPEL_DICOM_SALT_FILE > the per-user file
    monkeypatch.delenv("MEDSCALPEL_DICOM_SALT")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert load_salt()[1] == "user" and (tmp_path / "cfg" / "medscalpel" / "dicom-salt").is_file()
    monkeypatch.setenv("MEDSCALPEL_DICOM_SALT_FILE", str(tmp_path / "moved"))
    assert load_salt()[1] == "file" and load_salt(exp) == (salt.encode(), "spec")
    with pytest.raises(ConfigError, match="is a folder"):
        load_salt(tmp_path)


def test_a_new_salt_per_run_would_break_resume_and_pairing(tmp_path, monkeypatch):
    """The evidence for a per-user (or per-experiment) salt rather than a per-run one: the
    pseudonyms are the image ids, and the ids are what a dataset's content hash (the identity
    that ``train --resume``, compress sweeps and grids compare) and ``Predictions.align`` (the
    pairing of ``evaluate --reference``) are made of. Two salts = another dataset."""
    from medscalpel.engine.predictions import Predictions

    root = tmp_path / "site"
    _images(root, subdir=False)
    first = open_dataset(f"dicom:{root}", split="all")
    monkeypatch.setenv("MEDSCALPEL_DICOM_SALT", "a-fresh-per-run-salt-0123456789")
    second = open_dataset(f"dicom:{root}", split="all")
    assert first.content_hash() != second.content_hash()
    monkeypatch.setenv("MEDSCALPEL_DICOM_SALT", SALT)
    assert open_dataset(f"dicom:{root}", split="all").content_hash() == first.content_hash()
    zeros = np.zeros((len(first), 1), np.float32)
    p1 = Predictions(zeros, zeros, tuple(first.ids), ("a",), "multilabel")
    p2 = Predictions(zeros, zeros, tuple(second.ids), ("a",), "multilabel")
    with pytest.raises(DataError, match="share no image id"):
        p1.align(p2)
    assert p1.align(p1)[0].n == len(first)


# ----------------------------------------------------------------------------- no PHI out
def test_cli_on_folder_and_csv_dicoms_writes_no_planted_phi(tmp_path, monkeypatch, capsys):
    """predict / evaluate / evaluate --external / report experiment on ``folder:`` and
    ``csv:`` specs of DICOMs whose tags AND file names carry planted identifiers: no output
    file (inside .npz archives too) and no console line holds any of them."""
    import torch

    from medscalpel.cli.main import run
    from medscalpel.data import Preprocess
    from medscalpel.engine.predictions import Predictions
    from medscalpel.models import create_model, make_card, save_model

    site = tmp_path / "site"
    rng = np.random.default_rng(3)
    rows = []
    for i in range(12):
        pid, label = f"{PHI['PatientID']}{i % 6}", CLASSES[i % 2]
        arr = rng.integers(0, 2000, (24, 24))
        if i % 2:
            arr[6:18, 6:18] = 4000
        rel = f"{label}/{PHI['PatientName'].replace('^', '_')}_{pid}_{i}.dcm"
        write_dcm(site / rel, arr, **{**PHI, "PatientID": pid})
        rows.append({"path": rel, "label": label})
    pd.DataFrame(rows).to_csv(site / "labels.csv", index=False)
    torch.manual_seed(0)
    m = create_model("vgg_tiny", 2, 1, 24)
    model = str(tmp_path / "model")
    save_model(m, model, make_card(m, list(CLASSES), "multiclass",
                                   Preprocess(size=24, channels=1)))
    folder, table = f"folder:{site}", f"csv:{site}/labels.csv?task=multiclass"
    out = tmp_path / "out"
    commands = [
        ["predict", "--model", model, "--data", folder, "--split", "all", "--out", f"{out}/f"],
        ["predict", "--model", model, "--data", table, "--split", "all", "--out", f"{out}/c"],
        ["evaluate", f"{out}/f", "--model", model, "--n-boot", "20", "--out", f"{out}/ev"],
        ["evaluate", f"{out}/f", "--model", model, "--external", table, "--n-boot", "20",
         "--out", f"{out}/ext"],
        ["report", "experiment", f"{out}/ev", "--out", f"{out}/exp/report.html"],
    ]
    printed = []
    for args in commands:
        monkeypatch.setattr(sys, "argv", ["medscalpel", *args])
        with pytest.raises(SystemExit) as ex:
            run(args)
        cap = capsys.readouterr()
        printed.append(cap.out + cap.err)
        assert ex.value.code == 0, f"{args}: {cap.out} {cap.err}"
    f, c = Predictions.load(out / "f"), Predictions.load(out / "c")
    assert f.n == c.n == 12 and all(i.startswith("img-") for i in f.ids)
    assert sorted(f.ids) == sorted(c.ids)  # one image, one id, whichever spec read it
    needles = [v.encode() for v in PHI.values()] + [b"Johnathan", b"Doe Johnathan"]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {"f/predictions.npz", "c/predictions.npz", "ev/metrics.json", "exp/report.html"} <= \
        {str(p.relative_to(out)) for p in written}
    leaks = {str(p.relative_to(out)): _contains(p, needles) for p in written}
    assert not {k: v for k, v in leaks.items() if v}, leaks
    for text in printed:
        assert not [n for n in needles if n.decode().lower() in text.lower()], text
