"""DICOM in, no PHI out: pixels decoded as DICOM prescribes (Modality LUT, VOI LUT / window,
MONOCHROME1, bits stored, compressed syntaxes) checked against the known source arrays; the
``dicom:`` adapter's labels, views and patient-wise splits; refusals naming the file; and the
CLI (predict, evaluate, evaluate --external, report clinical, report experiment) on DICOMs with
planted identifiers, every output file searched for each of them."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="pydicom not installed: pip install "
                              "'medscalpel[dicom]'")

from PIL import Image  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (JPEG2000Lossless, JPEGBaseline8Bit, ExplicitVRLittleEndian,  # noqa: E402
                         RLELossless, generate_uid)

from medscalpel.data import open_dataset  # noqa: E402
from medscalpel.data import dicom_read  # noqa: E402
from medscalpel.data.dicom import identifiers_kept  # noqa: E402
from medscalpel.data.dicom_read import (key_id, load_salt, pseudonym, read_dicom,  # noqa: E402
                                        salt_path)
from medscalpel.data.io import read_image  # noqa: E402
from medscalpel.errors import ConfigError, DataError, MissingExtraError  # noqa: E402

SALT = "unit-test-salt-0123456789abcdef"
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


@pytest.fixture(autouse=True)
def salt(monkeypatch):
    monkeypatch.setenv("MEDSCALPEL_DICOM_SALT", SALT)


def write_dcm(path: Path, arr: np.ndarray, bits_stored: int = 12, photometric="MONOCHROME2",
              modality="DX", raw: np.ndarray | None = None, **tags) -> Path:
    """A single-frame uncompressed DICOM holding ``raw`` (default ``arr``) as its stored
    pixels; ``tags`` set any attribute."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = DX
    ds.Modality = modality
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16 if bits_stored > 8 else 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for k, v in tags.items():
        setattr(ds, k, v)
    data = arr if raw is None else raw
    ds.PixelData = data.astype(np.uint16 if ds.BitsAllocated == 16 else np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(bits: int, shape=(16, 16)) -> np.ndarray:
    n = shape[0] * shape[1]
    return np.round(np.linspace(0, 2 ** bits - 1, n)).astype(np.int64).reshape(shape)


# ----------------------------------------------------------------------------- pixels
def test_12bit_rescale_and_unused_high_bits(tmp_path):
    """12 of 16 bits stored, garbage in the 4 unused bits (masked), slope 2 / intercept -100:
    no VOI -> the stored range [0, 4095] through the rescale, scaled to [0, 1]."""
    src = ramp(12)
    p = write_dcm(tmp_path / "a.dcm", src, raw=src | 0xB000, RescaleSlope=2,
                  RescaleIntercept=-100)
    lo, hi = -100.0, 4095 * 2 - 100.0
    want = ((src * 2 - 100) - lo) / (hi - lo)
    got = read_dicom(p)
    assert got.dtype == np.float32 and got.shape == src.shape
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got, src / 4095.0, atol=1e-6)  # a linear rescale changes nothing
    np.testing.assert_array_equal(read_image(p), got)  # the io hook: folder / csv / predict


def test_16bit_monochrome1_is_inverted(tmp_path):
    src = ramp(16)
    p = write_dcm(tmp_path / "m1.dcm", src, bits_stored=16, photometric="MONOCHROME1")
    np.testing.assert_allclose(read_dicom(p), 1.0 - src / 65535.0, atol=1e-6)
    p2 = write_dcm(tmp_path / "m2.dcm", src, bits_stored=16)
    np.testing.assert_allclose(read_dicom(p2), src / 65535.0, atol=1e-6)


def _linear_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR, output scaled to [0, 1]."""
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


def test_window_first_or_chosen_and_monochrome1(tmp_path):
    src = ramp(12)
    tags = dict(WindowCenter=[1000, 2000], WindowWidth=[1001, 4000], RescaleSlope=1,
                RescaleIntercept=0)
    p = write_dcm(tmp_path / "w.dcm", src, **tags)
    np.testing.assert_allclose(read_dicom(p), _linear_window(src, 1000, 1001), atol=1e-6)
    np.testing.assert_allclose(read_dicom(p, window=1), _linear_window(src, 2000, 4000),
                               atol=1e-6)
    np.testing.assert_allclose(read_dicom(p, voi=False), src / 4095.0, atol=1e-6)
    with pytest.raises(DataError, match=r"w\.dcm offers 2 VOI .*window=5"):
        read_dicom(p, window=5)
    p1 = write_dcm(tmp_path / "w1.dcm", src, photometric="MONOCHROME1", **tags)
    np.testing.assert_allclose(read_dicom(p1), 1.0 - _linear_window(src, 1000, 1001),
                               atol=1e-6)


def test_voi_lut_sequence(tmp_path):
    """A VOI LUT Sequence (12-bit input, 16-bit entries, a square-root curve) beats the
    window; its output range is its entries' 16 bits."""
    src = ramp(12)
    table = np.round(65535 * np.sqrt(np.arange(4096) / 4095)).astype(int)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", table.tolist())  # LUTData
    p = write_dcm(tmp_path / "lut.dcm", src, VOILUTSequence=[item], WindowCenter=100,
                  WindowWidth=10)
    np.testing.assert_allclose(read_dicom(p), table[src] / 65535.0, atol=1e-6)


def test_rle_and_jpeg2000_lossless_decode_exactly(tmp_path):
    src = ramp(12, (32, 32))
    for syntax, name in ((RLELossless, "rle"), (JPEG2000Lossless, "j2k")):
        p = write_dcm(tmp_path / f"{name}.dcm", src)
        ds = pydicom.dcmread(p)
        try:
            ds.compress(syntax, src.astype(np.uint16))
        except (RuntimeError, NotImplementedError) as exc:
            if name == "rle":
                raise
            pytest.skip(f"no JPEG 2000 encoder plugin installed ({exc})")
        ds.save_as(p, enforce_file_format=True)
        assert pydicom.dcmread(p).file_meta.TransferSyntaxUID == syntax
        np.testing.assert_allclose(read_dicom(p), src / 4095.0, atol=1e-6, err_msg=name)


def test_jpeg_baseline(tmp_path):
    from pydicom.pixels.decoders import JPEGBaseline8BitDecoder

    if not JPEGBaseline8BitDecoder.is_available:
        pytest.skip("no JPEG baseline decoder plugin (pip install 'medscalpel[dicom]')")
    src = (np.add.outer(np.arange(32), np.arange(32)) * 4).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(src).save(buf, format="JPEG", quality=95)
    p = write_dcm(tmp_path / "jpg.dcm", src, bits_stored=8)
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(p, enforce_file_format=True)
    got = read_dicom(p)
    assert np.abs(got * 255 - src).max() <= 3.0  # lossy: within 3 grey levels of the source


def test_pydicom_shipped_compressed_files_match_the_uncompressed_one():
    """pydicom's wheel ships MR_small (not a chest X-ray: modalities=None) in several transfer
    syntaxes; each must decode to the same image."""
    from pydicom.data import get_testdata_file

    ref_path = get_testdata_file("MR_small.dcm", download=False)
    if ref_path is None:
        pytest.skip("pydicom's test files are not shipped in this installation")
    ref = read_dicom(ref_path, modalities=None)
    assert ref.shape == (64, 64) and 0.0 <= ref.min() and ref.max() <= 1.0 and ref.std() > 0
    with pytest.raises(DataError, match=r"MR_small\.dcm has modality 'MR'"):
        read_dicom(ref_path)
    checked = 0
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                 "MR_small_jpeg_ls_lossless.dcm"):
        p = get_testdata_file(name, download=False)
        if p is None:
            continue
        try:
            got = read_dicom(p, modalities=None)
        except DataError as exc:
            assert "medscalpel[dicom]" in str(exc)  # no decoder: the message names the extra
            continue
        np.testing.assert_array_equal(got, ref, err_msg=name)
        checked += 1
    assert checked >= 1


# ----------------------------------------------------------------------------- refusals
def test_refusals_name_the_file(tmp_path):
    src = ramp(12)
    cases = {
        "ct.dcm": (dict(modality="CT"), r"ct\.dcm has modality 'CT'"),
        "multi.dcm": (dict(NumberOfFrames=3), r"multi\.dcm is multi-frame \(3 frames\)"),
        "rgb.dcm": (dict(photometric="RGB"), r"rgb\.dcm is a colour image \(RGB"),
    }
    for name, (kw, pattern) in cases.items():
        p = write_dcm(tmp_path / name, src, **kw)
        with pytest.raises(DataError, match=pattern):
            read_dicom(p)
    p = write_dcm(tmp_path / "nopix.dcm", src)
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(DataError, match=r"nopix\.dcm holds no pixel data"):
        read_dicom(p)
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(DataError, match=r"Cannot read DICOM file .*junk\.dcm"):
        read_dicom(tmp_path / "junk.dcm")


def test_adapter_refuses_or_skips_bad_files_without_naming_them_in_outputs(tmp_path):
    root = tmp_path / "site"
    for i in range(3):
        write_dcm(root / f"ok{i}.dcm", ramp(12), PatientID=f"P{i}")
    write_dcm(root / "MRN123_ct.dcm", ramp(12), modality="CT", PatientID="MRN123")
    with pytest.raises(DataError, match=r"MRN123_ct\.dcm has modality 'CT'.*modalities=any"):
        open_dataset(f"dicom:{root}", split="all")
    ds = open_dataset(f"dicom:{root}?skip_corrupt=true", split="all")
    assert len(ds) == 3 and ds.skip_report.count == 1 and ds.meta["skipped"] == 1
    text = json.dumps(ds.describe())
    assert "MRN123" not in text and "modality 'CT'" in text  # the reason, not the file name
    assert len(open_dataset(f"dicom:{root}?modalities=any", split="all")) == 4


def test_missing_pydicom_names_the_extra(tmp_path, monkeypatch):
    p = write_dcm(tmp_path / "a.dcm", ramp(12))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(MissingExtraError, match=r"medscalpel\[dicom\]"):
        read_dicom(p)
    with pytest.raises(MissingExtraError, match=r"medscalpel\[dicom\]"):
        open_dataset(f"dicom:{tmp_path}", split="all")


# ----------------------------------------------------------------------------- adapter
def _site(root: Path, n_patients: int = 6, per_patient: int = 2) -> list[dict]:
    """DICOMs named after their PatientID (as some exports do); returns one row per file."""
    rows, rng = [], np.random.default_rng(0)
    for p in range(n_patients):
        for k in range(per_patient):
            pid = f"MRN{7000 + p}"
            view = ("PA", "AP", "LL")[(p + k) % 3]
            arr = rng.integers(0, 4096, (24, 24))
            label = "PNEUMONIA" if (p + k) % 2 else "NORMAL"
            if label == "PNEUMONIA":
                arr[6:18, 6:18] = 4000
            path = write_dcm(root / f"{pid}_{k}.dcm", arr, PatientID=pid, ViewPosition=view)
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            rows.append(dict(path=path.name, uid=uid, pid=pid, view=view, label=label))
    return rows


def test_adapter_labels_views_patient_splits_and_pseudonyms(tmp_path, monkeypatch):
    root = tmp_path / "site"
    rows = _site(root)
    import pandas as pd

    pd.DataFrame({"SOPInstanceUID": [r["uid"] for r in rows],
                  "label": [r["label"] for r in rows]}).to_csv(root / "labels.csv", index=False)
    spec = f"dicom:{root}?labels=labels.csv&task=multiclass"
    full = open_dataset(spec, split="all")
    assert len(full) == 12 and full.class_names == ["NORMAL", "PNEUMONIA"]
    by_uid = {pseudonym(r["uid"], "image", SALT.encode()): r for r in rows}
    assert set(full.ids) == set(by_uid)
    for i, iid in enumerate(full.ids):
        r = by_uid[iid]
        assert full.class_names[full.labels[i]] == r["label"]
        assert full.patient_ids[i] == pseudonym(r["pid"], "patient", SALT.encode())
        assert full.views[i] == r["view"]
    assert full.meta["views"] == {"AP": 4, "LL": 4, "PA": 4}
    assert full.meta["identifiers"] == "pseudonymised"
    assert full.meta["label_key"] == "SOPInstanceUID"
    assert full.meta["key_id"] == key_id(SALT.encode())
    assert not any("MRN" in s for s in full.ids + full.patient_ids)
    # patient-wise splits: disjoint patients, together every image
    parts = {s: open_dataset(spec, split=s, test_fraction=0.34, val_fraction=0.33)
             for s in ("train", "val", "test")}
    pats = {s: set(d.patient_ids) for s, d in parts.items()}
    assert not (pats["train"] & pats["test"]) and not (pats["train"] & pats["val"])
    assert not (pats["val"] & pats["test"])
    assert sorted(i for d in parts.values() for i in d.ids) == sorted(full.ids)
    assert full.meta["split_unit"]["unit"] == "patient"
    # views filter; a path-keyed CSV; keep_identifiers (same split: drawn on the real ids)
    pa = open_dataset(f"{spec}&views=PA,AP", split="all")
    assert len(pa) == 8 and set(pa.views) == {"PA", "AP"}
    pd.DataFrame({"path": [r["path"] for r in rows], "PNEUMONIA": [
        int(r["label"] == "PNEUMONIA") for r in rows]}).to_csv(root / "by_path.csv", index=False)
    kept = open_dataset(f"dicom:{root}?labels=by_path.csv&keep_identifiers=true", split="test")
    assert kept.meta["identifiers"] == "kept" and kept.meta["label_key"] == "path"
    assert all(i.startswith("MRN") for i in kept.ids) and kept.class_names == ["PNEUMONIA"]
    hashed = open_dataset(f"dicom:{root}?labels=by_path.csv", split="test")
    assert sorted(pseudonym(p, "patient", SALT.encode()) for p in kept.patient_ids) == \
        sorted(hashed.patient_ids)
    assert identifiers_kept(f"dicom:{root}?keep_identifiers=true")
    assert not identifiers_kept(spec)
    # another salt: other ids, the same split
    monkeypatch.setenv("MEDSCALPEL_DICOM_SALT", "another-salt-0123456789abcdef")
    other = open_dataset(f"dicom:{root}?labels=by_path.csv", split="test")
    assert not set(other.ids) & set(hashed.ids) and len(other) == len(hashed)
    # unlabelled folder, and a CSV naming no file
    bare = open_dataset(f"dicom:{root}", split="all")
    assert bare.meta["unlabelled"] and bare.num_classes == 0 and len(bare) == 12
    pd.DataFrame({"path": ["nope.dcm"], "x": [1]}).to_csv(root / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"No row of .*bad\.csv names a DICOM file"):
        open_dataset(f"dicom:{root}?labels=bad.csv", split="all")


def test_salt_file_is_private_stable_and_env_salt_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSCALPEL_DICOM_SALT")
    monkeypatch.setenv("MEDSCALPEL_DICOM_SALT_FILE", str(tmp_path / "cfg" / "salt"))
    a, source = load_salt()
    assert source == "file" and salt_path() == tmp_path / "cfg" / "salt"
    assert stat.S_IMODE(os.stat(salt_path()).st_mode) == 0o600 and len(a) == 64
    assert load_salt()[0] == a  # stable: predictions of the same data pair up
    monkeypatch.setenv("MEDSCALPEL_DICOM_SALT", "short")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_salt()
    assert dicom_read.MIN_SALT_CHARS == 16


# ----------------------------------------------------------------------------- no PHI out
PHI = {
    "PatientName": "Doe^Johnathan^Q",
    "PatientID": "MRN4711XYZ",
    "PatientBirthDate": "19450317",
    "AccessionNumber": "ACC99887766",
    "InstitutionName": "Saint Elsewhere General",
    "OtherPatientIDs": "OTHERID5550123",
    "ReferringPhysicianName": "House^Gregory",
    "StudyID": "STUDY8675309",
    "PatientAddress": "221B Baker Street",
}


def _contains(path: Path, needles: list[bytes]) -> list[bytes]:
    """The needles found in a file (zip archives such as .npz searched inside, decompressed)."""
    data = path.read_bytes()
    blobs = [data]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            blobs += [z.read(n) for n in z.namelist()] + [n.encode() for n in z.namelist()]
    low = [b.lower() for b in blobs] + [str(path).lower().encode()]
    return [n for n in needles if any(n.lower() in b for b in low)]


def test_cli_outputs_hold_no_planted_phi(tmp_path, monkeypatch, capsys):
    import pandas as pd
    import torch

    from medscalpel.cli.main import run
    from medscalpel.data import Preprocess
    from medscalpel.engine.predictions import Predictions
    from medscalpel.models import create_model, make_card, save_model

    site = tmp_path / "site"
    rng = np.random.default_rng(1)
    rows = []
    for i in range(12):
        pid = f"{PHI['PatientID']}{i % 6}"  # six patients, all carrying the planted ID
        arr = rng.integers(0, 2000, (24, 24))
        label = i % 2
        if label:
            arr[6:18, 6:18] = 4000
        tags = {**PHI, "PatientID": pid, "OtherPatientIDs": PHI["OtherPatientIDs"],
                "ViewPosition": "PA"}
        # file names carry the patient's name and ID, as some exports do
        p = write_dcm(site / f"{PHI['PatientName'].replace('^', '_')}_{pid}_{i}.dcm", arr,
                      **tags)
        rows.append({"path": p.name, "label": ("NORMAL", "PNEUMONIA")[label]})
    pd.DataFrame(rows).to_csv(site / "labels.csv", index=False)
    spec = f"dicom:{site}?labels=labels.csv&task=multiclass"

    torch.manual_seed(0)
    m = create_model("vgg_tiny", 2, 1, 24)
    save_model(m, tmp_path / "model", make_card(m, ["NORMAL", "PNEUMONIA"], "multiclass",
                                                Preprocess(size=24, channels=1)))
    plain = tmp_path / "plain"  # report clinical takes file paths: neutral names here
    plain.mkdir()
    for k in range(2):
        (plain / f"scan{k}.dcm").write_bytes((site / rows[k]["path"]).read_bytes())
    out = tmp_path / "out"
    model = str(tmp_path / "model")
    commands = [
        ["predict", "--model", model, "--data", spec, "--split", "all", "--out", f"{out}/pred"],
        ["evaluate", f"{out}/pred", "--model", model, "--n-boot", "20", "--out", f"{out}/ev"],
        ["evaluate", f"{out}/pred", "--model", model, "--external", spec, "--n-boot", "20",
         "--out", f"{out}/ext"],
        ["predict", "--model", model, "--data", f"dicom:{site}", "--out", f"{out}/unlab"],
        ["predict", "--model", model, "--data", str(plain), "--out", f"{out}/files"],
        ["report", "clinical", str(plain / "scan0.dcm"), str(plain / "scan1.dcm"), "--model",
         model, "--out", f"{out}/clin"],
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
    preds = Predictions.load(out / "pred")
    assert preds.n == 12 and all(i.startswith("img-") for i in preds.ids)
    unlab = Predictions.load(out / "unlab")
    assert unlab.meta["unlabelled"] and (unlab.labels == -1).all()
    assert sorted(unlab.ids) == sorted(preds.ids)  # same salt: the same images pair up
    files = Predictions.load(out / "files")
    assert set(files.ids) <= set(preds.ids)  # file predictions: pseudonyms of the same UIDs
    clin = json.loads((out / "clin" / "clinical.json").read_text())
    assert [r["id"] for r in clin["reports"]] == list(files.ids)
    needles = [v.encode() for v in PHI.values()] + \
        [v.replace("^", " ").encode() for v in PHI.values() if "^" in v] + [b"Johnathan"]
    # the search sees inside compressed .npz files: a planted id is found
    canary = tmp_path / "canary.npz"
    preds.__class__(preds.logits[:1], preds.labels[:1], (PHI["PatientID"],), preds.class_names,
                    preds.task).save(canary)
    assert _contains(canary, needles) == [PHI["PatientID"].encode()]
    written = [p for p in out.rglob("*") if p.is_file()]
    names = {str(p.relative_to(out)) for p in written}
    assert {"pred/manifest.json", "pred/predictions.npz", "ev/metrics.json", "clin/index.html",
            "clin/clinical.json", "exp/report.html", "unlab/predictions.npz"} <= names, names
    assert any(n.startswith("ext/") and n.endswith(".json") and "manifest" not in n
               for n in names), names
    leaks = {str(p.relative_to(out)): _contains(p, needles) for p in written}
    assert not {k: v for k, v in leaks.items() if v}, leaks
    for text in printed:
        assert not [n for n in needles if n.decode().lower() in text.lower()], text


def test_keep_identifiers_is_marked_at_the_top_of_every_report(tmp_path, monkeypatch, capsys):
    """--keep-identifiers (report clinical) and keep_identifiers=true (a dicom: spec) are the
    user's opt-in: the clinical pages, their index and the experiment report say so first."""
    import torch

    from medscalpel.cli.main import run
    from medscalpel.data import Preprocess
    from medscalpel.models import create_model, make_card, save_model
    from medscalpel.report.experiment import identifiers_kept_in

    rng = np.random.default_rng(2)
    plain = tmp_path / "scans"
    for k in range(2):
        write_dcm(plain / f"{PHI['PatientID']}_{k}.dcm", rng.integers(0, 4000, (24, 24)), **PHI)
    torch.manual_seed(0)
    m = create_model("vgg_tiny", 2, 1, 24)
    save_model(m, tmp_path / "model", make_card(m, ["NORMAL", "PNEUMONIA"], "multiclass",
                                                Preprocess(size=24, channels=1)))
    files = [str(p) for p in sorted(plain.glob("*.dcm"))]
    for flag, out in (([], tmp_path / "anon"), (["--keep-identifiers"], tmp_path / "kept")):
        args = ["report", "clinical", *files, "--model", str(tmp_path / "model"), "--out",
                str(out), *flag]
        monkeypatch.setattr(sys, "argv", ["medscalpel", *args])
        with pytest.raises(SystemExit) as ex:
            run(args)
        capsys.readouterr()
        assert ex.value.code == 0
    for page in ["index.html", *[p.name for p in (tmp_path / "kept").glob("*.html")]]:
        html = (tmp_path / "kept" / page).read_text()
        assert "IDENTIFIERS KEPT" in html, page
    assert PHI["PatientID"] in (tmp_path / "kept" / "clinical.json").read_text()
    assert not any("IDENTIFIERS KEPT" in p.read_text() for p in (tmp_path / "anon").glob("*.html"))
    assert PHI["PatientID"] not in (tmp_path / "anon" / "clinical.json").read_text()
    # the experiment report marks every run under it whose manifest shows the opt-in
    assert identifiers_kept_in(tmp_path) == ["kept"]
    assert identifiers_kept_in(tmp_path / "anon") == []
