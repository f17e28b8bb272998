"""``report clinical --dicom-sr``: one DICOM Structured Report per DICOM input (highdicom),
referencing the source image, holding the report's probabilities and calls, and no planted
identifier unless --keep-identifiers (highdicom copies the evidence's patient and study
attributes, so the SR file is searched too)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="pydicom not installed: pip install "
                              "'medscalpel[dicom]'")
hd = pytest.importorskip("highdicom", reason="highdicom not installed: pip install "
                         "'medscalpel[dicom]'")

from pydicom.sr.codedict import codes  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from test_dicom import PHI, _contains, write_dcm  # noqa: E402

from medscalpel.data.dicom_read import pseudonym  # noqa: E402
from medscalpel.errors import ConfigError, DataError, MissingExtraError  # noqa: E402
from medscalpel.report.dicom_sr import require_sr_inputs  # noqa: E402

SALT = "sr-test-salt-0123456789abcdef"
CLASSES = ["NORMAL", "PNEUMONIA"]


@pytest.fixture(autouse=True)
def salt(monkeypatch):
    monkeypatch.setenv("MEDSCALPEL_DICOM_SALT", SALT)


def _scan(path: Path, seed: int, **extra) -> Path:
    arr = np.random.default_rng(seed).integers(0, 4000, (24, 24))
    tags = {**PHI, "PatientSex": "F", "StudyDate": "20190704", "StudyTime": "101500",
            "StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(), **extra}
    return write_dcm(path, arr, **tags)


def _model(tmp_path: Path) -> str:
    import torch

    from medscalpel.data import Preprocess
    from medscalpel.models import create_model, make_card, save_model

    torch.manual_seed(0)
    m = create_model("vgg_tiny", 2, 1, 24)
    save_model(m, tmp_path / "model", make_card(m, CLASSES, "multiclass",
                                                Preprocess(size=24, channels=1)))
    return str(tmp_path / "model")


def _run(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from medscalpel.cli.main import run

    monkeypatch.setattr(sys, "argv", ["medscalpel", *args])
    with pytest.raises(SystemExit) as ex:
        run(args)
    cap = capsys.readouterr()
    return int(ex.value.code), cap.out + cap.err


def _needles() -> list[bytes]:
    return [v.encode() for v in PHI.values()] + [b"Johnathan", b"19450317", b"20190704"]


def test_sr_references_the_source_holds_the_report_and_no_phi(tmp_path, monkeypatch, capsys):
    from PIL import Image

    scans = tmp_path / "scans"
    srcs = [_scan(scans / f"scan{k}.dcm", k) for k in range(2)]
    png = scans / "plain.png"
    Image.fromarray(np.full((24, 24), 90, np.uint8)).save(png)
    out = tmp_path / "out"
    code, text = _run(["report", "clinical", *map(str, srcs), str(png), "--model",
                       _model(tmp_path), "--out", str(out), "--dicom-sr"], monkeypatch, capsys)
    assert code == 0, text
    assert "DICOM SR: 2 of 3 image(s)" in text
    reports = json.loads((out / "clinical.json").read_text())["reports"]
    srs = sorted(out.glob("*.sr.dcm"))
    assert len(srs) == 2 and len(reports) == 3  # the PNG gets no SR
    for src, rep in zip(srcs, reports[:2]):
        sr_path = out / f"{Path(rep['html']).stem}.sr.dcm"
        source = pydicom.dcmread(src, stop_before_pixels=True)
        sr = hd.sr.srread(sr_path)
        # the reference: same study, the source's SOP instance in the evidence and the group
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        ev = sr.CurrentRequestedProcedureEvidenceSequence[0]
        ref = ev.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == source.SOPClassUID
        group = sr.content.get_image_measurement_groups()[0]
        assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
        # the report's numbers and calls
        probs = {m.name.meaning: m.value for m in group.get_measurements()}
        for row in rep["probabilities"]:
            assert probs[f"Probability of {row['class']}"] == pytest.approx(row["probability"])
        calls = {e.name.meaning: e.value for e in group.get_qualitative_evaluations()}
        decided = rep["decision"]
        assert calls[decided] == codes.SCT.Present
        assert all(v == codes.SCT.Absent for k, v in calls.items() if k != decided)
        assert (sr.PreliminaryFlag, sr.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED")
        # no PHI: the pseudonym, empty type-2 attributes, identity-removed flag
        assert sr.PatientID == pseudonym(PHI["PatientID"], "patient", SALT.encode())
        assert str(sr.PatientName) == "" and sr.PatientBirthDate == ""
        assert sr.AccessionNumber == "" and sr.PatientIdentityRemoved == "YES"
    leaks = {str(p.relative_to(out)): _contains(p, _needles()) for p in out.rglob("*")
             if p.is_file()}
    assert not {k: v for k, v in leaks.items() if v}, leaks
    # the search does see into an SR: the source's own header is full of the planted values
    assert _contains(srcs[0], _needles())


def test_keep_identifiers_copies_the_source_patient_and_study(tmp_path, monkeypatch, capsys):
    src = _scan(tmp_path / "scans" / "scan.dcm", 5)
    out = tmp_path / "kept"
    code, text = _run(["report", "clinical", str(src), "--model", _model(tmp_path), "--out",
                       str(out), "--dicom-sr", "--keep-identifiers"], monkeypatch, capsys)
    assert code == 0, text
    sr = pydicom.dcmread(next(out.glob("*.sr.dcm")))
    assert sr.PatientID == PHI["PatientID"] and str(sr.PatientName) == PHI["PatientName"]
    assert sr.AccessionNumber == PHI["AccessionNumber"] and "PatientIdentityRemoved" not in sr


def test_refusals_before_any_work(tmp_path, monkeypatch, capsys):
    from PIL import Image

    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(png)
    model = _model(tmp_path)
    code, text = _run(["report", "clinical", str(png), "--model", model, "--out",
                       str(tmp_path / "o1"), "--dicom-sr"], monkeypatch, capsys)
    assert code == 2 and "error:" in text and "needs DICOM images" in text
    assert not (tmp_path / "o1").exists()
    no_study = write_dcm(tmp_path / "nostudy.dcm", np.zeros((24, 24), np.int64))
    code, text = _run(["report", "clinical", str(no_study), "--model", model, "--out",
                       str(tmp_path / "o2"), "--dicom-sr"], monkeypatch, capsys)
    assert code == 2 and "lacks StudyInstanceUID, SeriesInstanceUID" in text
    assert not (tmp_path / "o2").exists()
    with pytest.raises(ConfigError, match="needs DICOM images"):
        require_sr_inputs([png])
    with pytest.raises(DataError, match="lacks StudyInstanceUID"):
        require_sr_inputs([no_study])
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(MissingExtraError, match=r"medscalpel\[dicom\]"):
        require_sr_inputs([no_study])
