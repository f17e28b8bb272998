"""``repair calibrate`` (each of its modes) and ``repair recalibrate-site`` run registered
stages (issue S): the command checks its flags and inputs, runs one stage into its run
directory and prints from the stage's result; the declared artifact sits at its declared path,
the stage declares what it writes, and bad input leaves nothing at --out."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medscalpel.pipeline.stages  # noqa: F401  (registers the stages)
from medscalpel.cli.main import app
from medscalpel.data import Preprocess
from medscalpel.data.spec import open_dataset
from medscalpel.engine.api import predict_spec
from medscalpel.engine.predictions import Predictions
from medscalpel.layout import ARTIFACTS, read_artifact
from medscalpel.models.checkpoint import load_model, make_card, save_model
from medscalpel.models.zoo import create_model
from medscalpel.pipeline.stage import STAGES
from medscalpel.repair.conformal import GuaranteeResult, Recertification
from medscalpel.repair.label_shift import LabelShiftTransfer

SPEC = "phantom?n=200&size=16&seed=0"


def _multilabel(rng, n, split, first):
    """Two classes with a planted signal (logit 3 higher on positives)."""
    y = (rng.random((n, 2)) < [0.4, 0.3]).astype(np.float32)
    z = (3.0 * y + rng.normal(size=(n, 2))).astype(np.float32)
    return Predictions(z, y, tuple(f"c{i}" for i in range(first, first + n)), ("a", "b"),
                       "multilabel", split=split)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Labelled multi-label predictions (fit / eval), two-class ones, and an untrained tiny
    model of the same classes a, b."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    _multilabel(rng, 400, "val", 0).save(root / "fit.npz")
    _multilabel(rng, 300, "test", 400).save(root / "eval.npz")
    y = rng.integers(0, 2, 120)
    z = np.c_[np.zeros(120), 2.0 * (2 * y - 1) + rng.normal(size=120)].astype(np.float32)
    Predictions(z, y.astype(np.int64), tuple(f"b{i}" for i in range(120)),
                ("NORMAL", "PNEUMONIA"), "multiclass", split="val").save(root / "bin.npz")
    torch.manual_seed(0)
    m = create_model("resnet_tiny", num_classes=2, in_chans=1, img_size=16)
    m.card = make_card(m, ["a", "b"], "multilabel", Preprocess(size=16))
    save_model(m, root / "model")
    return root


@pytest.fixture(scope="module")
def certified(inputs, tmp_path_factory):
    """``repair calibrate --guarantee --model``: the run directory whose calibrate/model card
    carries the certified guarantee."""
    out = tmp_path_factory.mktemp("cert") / "g"
    r = CliRunner().invoke(app, ["repair", "calibrate", str(inputs / "fit.npz"), "--guarantee",
                                 "recall>=0.90", "--eval", str(inputs / "eval.npz"), "--model",
                                 str(inputs / "model"), "--seed", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return out, r.output


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_calibrate_point_runs_the_registered_stage(inputs, tmp_path, refused_nothing_written):
    cls = STAGES.get("calibrate_point")
    assert cls.reads == () and cls.writes == ("calibration",)
    assert cls.may_write == ("calibrated_card",)
    out = tmp_path / "cal"
    r = CliRunner().invoke(app, ["repair", "calibrate", str(inputs / "fit.npz"), "--eval",
                                 str(inputs / "eval.npz"), "--model", str(inputs / "model"),
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    man = _manifest(out)
    assert man["command"] == "repair calibrate"
    assert man["config"]["kind"] == "thresholds" and man["config"]["method"] == "youden"
    assert ARTIFACTS["calibration"].locate(out) == "calibrate/calibration.json"
    d = read_artifact(out, "calibration")
    # the recorded model folder is the finished run's, not the .partial one
    assert d["model_dir"] == str(out / "calibrate" / "model")
    assert d["operating_point"]["measured_on"]["split"] == "test"
    card = load_model(ARTIFACTS["calibrated_card"].dir_in(out)).card
    assert card.effective_thresholds() == pytest.approx(d["calibrator"]["thresholds"])
    assert "operating point:" in r.output and "model deciding by this operating point" in r.output
    # two classes: the positive class's cut, no model
    out2 = tmp_path / "bin"
    r = CliRunner().invoke(app, ["repair", "calibrate", str(inputs / "bin.npz"), "--out",
                                 str(out2)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert read_artifact(out2, "calibration")["binary"]["positive"] == "PNEUMONIA"
    assert not ARTIFACTS["calibrated_card"].exists(out2)
    refused_nothing_written(["repair", "calibrate", str(inputs / "fit.npz"), "--positive", "a"],
                            tmp_path / "bad", "--positive applies to two-class")
    # FIT may be the run directory of 'predict' (its predictions.npz), as elsewhere
    pred_run = tmp_path / "pred_run"
    pred_run.mkdir()
    shutil.copy(inputs / "bin.npz", pred_run / "predictions.npz")
    r = CliRunner().invoke(app, ["repair", "calibrate", str(pred_run), "--out",
                                 str(tmp_path / "from_dir")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert (read_artifact(tmp_path / "from_dir", "calibration")["binary"]
            == read_artifact(out2, "calibration")["binary"])


def test_calibrate_guarantee_runs_the_registered_stage(inputs, certified, tmp_path,
                                                       refused_nothing_written):
    cls = STAGES.get("certify")
    assert cls.writes == ("guarantee",)
    assert set(cls.may_write) == {"guarantee_check", "calibrated_card"}
    out, printed = certified
    man = _manifest(out)
    assert man["command"] == "repair calibrate" and man["config"]["guarantee"] == "recall>=0.9"
    assert man["seed"] == 3 and man["config"]["seed"] == 3
    assert ARTIFACTS["guarantee"].locate(out) == "calibrate/guarantee.json"
    g = read_artifact(out, "guarantee")
    assert isinstance(g, GuaranteeResult) and g.n_images == 400
    chk = read_artifact(out, "guarantee_check")
    assert isinstance(chk, Recertification) and chk.n_images == 300
    op = load_model(ARTIFACTS["calibrated_card"].dir_in(out)).card.decision_point()
    assert op.guarantee == g.to_dict()
    assert "recall>=0.9: certified on 400 images" in printed and "re-check on 300" in printed
    refused_nothing_written(["repair", "calibrate", str(inputs / "fit.npz"), "--guarantee",
                             "recall>=0.9", "--eval", str(inputs / "eval.npz"), "--holdout",
                             "0.3"], tmp_path / "bad", "Give --eval or --holdout")


def test_recertify_runs_the_registered_stage(inputs, certified, tmp_path, refused_nothing_written):
    cls = STAGES.get("recertify")
    assert cls.reads == () and cls.writes == ("guarantee_check",)
    model_dir = ARTIFACTS["calibrated_card"].dir_in(certified[0])
    out = tmp_path / "chk"
    r = CliRunner().invoke(app, ["repair", "calibrate", "--recertify", str(model_dir), "--eval",
                                 str(inputs / "eval.npz"), "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert _manifest(out)["command"] == "repair calibrate"
    assert _manifest(out)["config"]["recertify"] == str(model_dir)
    assert ARTIFACTS["guarantee_check"].locate(out) == "calibrate/guarantee_check.json"
    chk = read_artifact(out, "guarantee_check")
    assert isinstance(chk, Recertification) and chk.n_images == 300
    assert chk.outcome.upper() in r.output and "minimum k:" in r.output
    # a model whose card carries no guarantee: one error, nothing written
    refused_nothing_written(["repair", "calibrate", "--recertify", str(inputs / "model"),
                             "--eval", str(inputs / "eval.npz")], tmp_path / "bad",
                            "carries no guarantee")


def test_transfer_runs_the_registered_stage(inputs, certified, tmp_path, refused_nothing_written):
    cls = STAGES.get("transfer_guarantee")
    assert cls.writes == ("label_shift_transfer",) and cls.may_write == ("calibrated_card",)
    model_dir = ARTIFACTS["calibrated_card"].dir_in(certified[0])
    out = tmp_path / "tr"
    r = CliRunner().invoke(app, ["repair", "calibrate", str(inputs / "fit.npz"), "--recertify",
                                 str(model_dir), "--transfer-to", str(inputs / "eval.npz"),
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert _manifest(out)["command"] == "repair calibrate"
    assert _manifest(out)["config"]["transfer_to"] == str(inputs / "eval.npz")
    assert ARTIFACTS["label_shift_transfer"].locate(out) == \
        "calibrate/label_shift_transfer.json"
    t = read_artifact(out, "label_shift_transfer")
    assert isinstance(t, LabelShiftTransfer) and t.n_new_images == 300
    assert f"{t.outcome.upper()}" in r.output
    # a model is written exactly when the guarantee transferred
    assert ARTIFACTS["calibrated_card"].exists(out) == (t.transferable and t.guarantee
                                                        is not None)
    refused_nothing_written(["repair", "calibrate", "--recertify", str(model_dir),
                             "--transfer-to", str(inputs / "eval.npz")], tmp_path / "bad",
                            "needs FIT")


def test_recalibrate_site_runs_the_registered_stage(tmp_path, refused_nothing_written):
    cls = STAGES.get("recalibrate_site")
    assert cls.reads == () and cls.writes == ("recalibration", "model")
    torch.manual_seed(0)
    names = open_dataset(SPEC, "all", Preprocess(size=16)).class_names
    m = create_model("resnet_tiny", num_classes=len(names), in_chans=1, img_size=16)
    m.card = make_card(m, names, "multilabel", Preprocess(size=16))
    model_dir = save_model(m, tmp_path / "model")
    predict_spec(model_dir, SPEC, "test").save(tmp_path / "internal.npz")
    out = tmp_path / "rc"
    r = CliRunner().invoke(app, ["repair", "recalibrate-site", "--model", str(model_dir),
                                 "--internal", str(tmp_path / "internal.npz"), "--external",
                                 SPEC + "&site=B", "--external-split", "test", "--k", "2",
                                 "--method", "quantile", "--classes", "Infiltration,Effusion",
                                 "--n-boot", "0", "--seed", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    man = _manifest(out)
    assert man["command"] == "repair recalibrate-site" and man["seed"] == 1
    assert man["data"]["spec"] == SPEC + "&site=B" and man["data"]["split"] == "test"
    assert man["config"]["k"] == 2 and man["config"]["method"] == "quantile"
    assert ARTIFACTS["recalibration"].locate(out) == "recalibration.json"
    assert read_artifact(out, "recalibration")["k"] == 2
    rm = load_model(ARTIFACTS["model"].dir_in(out))
    assert rm.card.operating_point is not None
    assert "new site: used" in r.output and "operating point:" in r.output
    refused_nothing_written(["repair", "recalibrate-site", "--model", str(model_dir),
                             "--internal", str(tmp_path / "internal.npz"), "--external", SPEC,
                             "--class-map", "nonsense"], tmp_path / "bad",
                            "--class-map takes EXTERNAL=MODEL pairs")
    # an unknown method is refused as a flag, before any data is read
    refused_nothing_written(["repair", "recalibrate-site", "--model", str(model_dir),
                             "--internal", str(tmp_path / "internal.npz"), "--external", SPEC,
                             "--method", "nope"], tmp_path / "bad_method", "--method")
    # too few labelled images is found by the stage itself: its run directory is removed
    refused_nothing_written(["repair", "recalibrate-site", "--model", str(model_dir),
                             "--internal", str(tmp_path / "internal.npz"), "--external",
                             SPEC + "&site=B", "--external-split", "test", "--k", "50"],
                            tmp_path / "few", "Too few labelled images")
