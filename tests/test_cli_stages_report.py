"""Issue S: `audit changes`, `report clinical` and `report experiment` run registered stages
('changes', 'clinical', 'experiment') that write their declared artifacts at the paths the
commands always wrote; bad input fails with one error line and leaves nothing at --out."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import medscalpel.pipeline.stages  # noqa: F401  (registers the stages)
from medscalpel.audit.changes import ChangesAudit
from medscalpel.cli.main import app, run
from medscalpel.data.phantom import generate_phantom
from medscalpel.data.spec import open_dataset
from medscalpel.data.transforms import Preprocess
from medscalpel.layout import ARTIFACTS, read_artifact
from medscalpel.models import create_model, make_card, save_model
from medscalpel.pipeline.stage import STAGES

SIZE = 32


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny phantom, a dense densenet_tiny, a 'compressed' copy (scaled classifier row
    weights), a model of another label set and one PNG image."""
    root = tmp_path_factory.mktemp("hreport")
    generate_phantom(n=60, size=SIZE, seed=3, out=root / "ph", progress=False)
    spec = f"phantom:{root / 'ph'}"
    names = list(open_dataset(spec, split="all").class_names)
    torch.manual_seed(0)
    dense = create_model("densenet_tiny", len(names), 1, SIZE)
    save_model(dense, root / "dense", make_card(dense, names, "multilabel", Preprocess(SIZE)))
    small = copy.deepcopy(dense)
    with torch.no_grad():
        small.classifier.weight.mul_(0.5)
    save_model(small, root / "sweep" / "half",
               make_card(small, names, "multilabel", Preprocess(SIZE)))
    other = create_model("densenet_tiny", 3, 1, SIZE)
    save_model(other, root / "other", make_card(other, ["x", "y", "z"], "multilabel",
                                                Preprocess(SIZE)))
    Image.fromarray(np.linspace(0, 255, 40 * 40).reshape(40, 40).astype(np.uint8)).save(
        root / "cxr.png")
    return {"root": root, "spec": spec}


@pytest.fixture(scope="module")
def changes_run(inputs):
    """``audit changes`` of the dense model against the sweep: (its --out, what it printed)."""
    root, out = inputs["root"], inputs["root"] / "changes"
    text = _ok(["audit", "changes", root / "dense", root / "sweep", "--data", inputs["spec"],
                "--split", "all", "--n-images", "16", "--n-boot", "5", "--measures",
                "calibration", "--out", out])
    return out, text


def _ok(args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output


def _refused(args, capsys) -> str:
    """The one error line of a command that must exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        run([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


def _manifest(out):
    return json.loads(ARTIFACTS["manifest"].path_in(out).read_text())


def test_audit_changes_runs_the_changes_stage(inputs, changes_run, tmp_path, capsys):
    root, (out, text) = inputs["root"], changes_run
    assert "half vs dense (16 images of" in text and "written to" in text
    man = _manifest(out)
    assert man["command"] == "audit changes" and man["seed"] == 0
    assert man["config"]["compressed"] == [str(root / "sweep" / "half")]
    assert man["config"]["artifacts"] == {}  # no served artifact among the models
    assert list(man["config"])[-1] == "artifacts"  # the stage's summary, last as before
    assert ARTIFACTS["changes"].locate(out) == "audit/changes/changes.json"
    res = read_artifact(out, "changes")
    assert isinstance(res, ChangesAudit) and [p.name for p in res.pairs] == ["half"]
    assert res.n == 16 and res.pairs[0].calibration is not None
    assert res.pairs[0].explanation is None and res.pairs[0].robustness is None
    cls = STAGES.get("changes")
    assert cls.writes == ("changes",) and cls.reads == ()
    assert set(cls.may_read) == {"compress", "calibrated_card", "phantom_data"}
    # a compressed model of another label set: refused by the stage, nothing at --out
    bad = tmp_path / "bad"
    err = _refused(["audit", "changes", root / "dense", root / "other", "--data",
                    inputs["spec"], "--split", "all", "--out", bad], capsys)
    assert "must share the data's class list" in err
    assert not bad.exists() and list(tmp_path.iterdir()) == []


def test_report_clinical_runs_the_clinical_stage(inputs, tmp_path, capsys):
    root, out = inputs["root"], tmp_path / "clin"
    text = _ok(["report", "clinical", root / "cxr.png", "--model", root / "dense",
                "--out", out])
    assert "No calibrated thresholds" in text and "cxr.png" in text
    man = _manifest(out)
    assert man["command"] == "report clinical" and man["seed"] is None  # no --seed
    # filled from the stage's summary at their places in the config
    assert man["config"]["images"] == [str(root / "cxr.png")]
    assert man["config"]["artifact"] is None
    assert list(man["config"])[:2] == ["model", "images"]
    assert ARTIFACTS["clinical_reports"].locate(out) == "clinical.json"
    doc = read_artifact(out, "clinical_reports")
    assert [r["id"] for r in doc["reports"]] == ["cxr.png"]
    assert (out / "index.html").is_file() and (out / "cxr.html").is_file()
    cls = STAGES.get("clinical")
    assert cls.writes == ("clinical_reports",) and cls.reads == () and cls.may_read == ()
    # a CAM method that does not exist: refused, nothing at --out
    bad = tmp_path / "bad"
    err = _refused(["report", "clinical", root / "cxr.png", "--model", root / "dense",
                    "--cam-method", "nocam", "--out", bad], capsys)
    assert "Unknown CAM method 'nocam'" in err and not bad.exists()


def test_report_experiment_runs_the_experiment_stage(changes_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(changes_run[0], run_dir)
    # a compressor's report.json in the run (compress lossless / prune write one) survives
    (run_dir / "report.json").write_text('{"method": "l1_unstructured"}')
    before = sorted(p.name for p in run_dir.iterdir())
    # without --out: report.html and report.summary.json INTO the run directory, its manifest
    # kept
    text = _ok(["report", "experiment", run_dir])
    assert "no --out: writing into the input run directory" in text
    assert "sections:" in text and "written to" in text
    assert ARTIFACTS["experiment_page"].locate(run_dir) == "report.html"
    summary = read_artifact(run_dir, "experiment_summary")
    assert summary["kind"] == "experiment_report" and "changes" in summary["present"]
    assert summary["html"] == str(run_dir / "report.html")
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(before + [
        "report.html", "report.summary.json"])
    assert json.loads((run_dir / "report.json").read_text()) == {"method": "l1_unstructured"}
    assert _manifest(run_dir)["command"] == "audit changes"  # no new run directory
    # with --out FILE.html: the page and FILE.summary.json there, nothing added to the run
    page = tmp_path / "pages" / "page.html"
    _ok(["report", "experiment", run_dir, "--out", page])
    assert sorted(p.name for p in page.parent.iterdir()) == ["page.html", "page.summary.json"]
    assert json.loads(page.with_suffix(".summary.json").read_text())["html"] == str(page)
    cls = STAGES.get("experiment")
    assert cls.writes == () and cls.reads == ()
    assert set(cls.may_write) == {"experiment_page", "experiment_summary"}
    assert {"changes", "compress", "demo", "baseline_metrics"} <= set(cls.may_read)
    # a folder without artifacts: refused, nothing written there or at --out
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _refused(["report", "experiment", empty, "--out", tmp_path / "e.html"], capsys)
    assert f"No medscalpel artifacts in {empty}" in err
    assert not list(empty.iterdir()) and not (tmp_path / "e.html").exists()
    assert not (tmp_path / "e.json").exists()
