"""``train``, ``predict`` and ``evaluate`` run registered stages (issue S): each command writes
its declared artifacts at their declared paths through the stage, records the same manifest,
and a bad input fails before anything is written at --out."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import medscalpel.pipeline.stages  # noqa: F401  (registers the stages)
from medscalpel.cli.main import app, run
from medscalpel.data import Preprocess
from medscalpel.data.spec import open_dataset
from medscalpel.engine.api import predict_spec
from medscalpel.engine.external import ExternalValidation
from medscalpel.engine.predictions import Predictions
from medscalpel.engine.train import _Checkpointer
from medscalpel.layout import ARTIFACTS, read_artifact
from medscalpel.models.checkpoint import make_card, save_model
from medscalpel.models.zoo import create_model
from medscalpel.pipeline.stage import STAGES

runner = CliRunner()
SPEC = "phantom?n=60&size=32&seed=0"
EXTERNAL = "phantom?n=40&size=32&seed=5"


def _ok(res):
    assert res.exit_code == 0, res.output + repr(res.exception)


def _manifest(out):
    return json.loads(ARTIFACTS["manifest"].path_in(out).read_text())


def _bad(args, capsys, match):
    """``medscalpel ARGS`` fails with one error line and exit code 2."""
    with pytest.raises(SystemExit) as ex:
        run(args)
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.startswith("error:") and match in err, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    names = open_dataset(SPEC, "all", Preprocess(size=32)).class_names
    m = create_model("vgg_tiny", num_classes=len(names), in_chans=1, img_size=32)
    card = make_card(m, names, "multilabel", Preprocess(size=32), training={"data": SPEC})
    return save_model(m, tmp_path_factory.mktemp("m") / "model", card)


def test_train_runs_the_train_stage_and_resumes_after_an_interruption(tmp_path, monkeypatch,
                                                                     capsys):
    cls = STAGES.get("train")
    assert cls.writes == ("model", "fit", "metrics") and cls.may_read == ("phantom_data",)
    out = tmp_path / "run"
    args = ["train", "--data", SPEC, "--arch", "vgg_tiny", "--size", "32", "--epochs", "2",
            "--batch-size", "16", "--n-boot", "0", "--out", str(out)]
    real_save = _Checkpointer.save

    def save_then_interrupt(self, *a, **kw):  # Ctrl-C right after epoch 1's checkpoint
        real_save(self, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(_Checkpointer, "save", save_then_interrupt)
    with pytest.raises(SystemExit) as ex:
        run(args)
    assert ex.value.code == 130 and not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and _manifest(partial[0])["status"] == "running"
    monkeypatch.undo()

    res = runner.invoke(app, args)  # the same command again: resumes at epoch 2
    _ok(res)
    assert "macro AUROC" in res.output and "model saved to" in res.output
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    man = _manifest(out)
    assert man["command"] == "train" and man["status"] == "complete"
    assert man["data"] == {"spec": SPEC} and man["config"]["epochs"] == 2
    assert ARTIFACTS["fit"].locate(out) == "train.json"
    assert ARTIFACTS["metrics"].locate(out) == "metrics.json"
    assert ARTIFACTS["model"].locate(out) == "model/model.json"
    fit = read_artifact(out, "fit")
    assert fit["train"]["resumed_from"] == 1 and len(fit["train"]["history"]) == 2
    assert fit["model_dir"] == str(out / "model")  # the final folder, not the .partial one
    assert read_artifact(out, "model").input["size"] == 32
    assert read_artifact(out, "metrics")["split"] == "test"

    bad = tmp_path / "bad"
    _bad(["train", "--data", SPEC, "--arch", "vgg_tiny", "--augment-profile", "heavy",
          "--out", str(bad)], capsys, "Unknown augmentation profile 'heavy'")
    assert not bad.exists()


def test_predict_runs_the_predict_stage(tmp_path, model_dir, capsys):
    cls = STAGES.get("predict")
    assert cls.writes == ("predictions_file", "predictions_meta", "findings_csv")
    out = tmp_path / "p"
    res = runner.invoke(app, ["predict", "--model", str(model_dir), "--data", SPEC,
                              "--out", str(out)])
    _ok(res)
    man = _manifest(out)
    assert man["command"] == "predict" and man["seed"] is None
    assert man["config"]["artifact"] is None and man["config"]["bulk"] is None
    assert list(man["config"]) == ["model", "data", "split", "artifact", "batch_size", "bulk"]
    preds = Predictions.load(ARTIFACTS["predictions_file"].path_in(out))
    assert man["data"] == {"spec": SPEC, "split": "test", "split_unit": preds.meta["split_unit"],
                           "n_used": preds.n, "n_total": 60}
    assert ARTIFACTS["predictions_file"].locate(out) == "predictions.npz"
    assert read_artifact(out, "predictions_meta")["n"] == preds.n
    rows = ARTIFACTS["findings_csv"].path_in(out).read_text().strip().splitlines()
    assert len(rows) == preds.n + 1
    assert f"{preds.n}predictions->{out / 'predictions.npz'}" in "".join(res.output.split())

    bad = tmp_path / "bad"
    _bad(["predict", "--model", str(model_dir), "--data", SPEC, "--batch-size", "0",
          "--out", str(bad)], capsys, "--batch-size")
    _bad(["predict", "--model", str(tmp_path / "none"), "--data", SPEC, "--out", str(bad)],
         capsys, "No weights")
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


def test_evaluate_runs_its_three_stages(tmp_path, model_dir, capsys):
    assert STAGES.get("evaluate").writes == ("metrics",)
    assert STAGES.get("evaluate_reference").writes == ("comparison",)
    assert STAGES.get("evaluate_external").writes == ("external", "external_predictions",
                                                      "external_reliability")
    internal = predict_spec(model_dir, SPEC, "test")
    p = internal.save(tmp_path / "p.npz")

    ev = tmp_path / "ev"
    res = runner.invoke(app, ["evaluate", str(p), "--n-boot", "20", "--out", str(ev)])
    _ok(res)
    man = _manifest(ev)
    assert man["command"] == "evaluate" and man["seed"] == 0
    assert man["config"] == {"predictions": str(p), "n_boot": 20}
    assert man["data"] == {"split_unit": internal.meta["split_unit"]}
    assert ARTIFACTS["metrics"].locate(ev) == "metrics.json"
    assert read_artifact(ev, "metrics")["n"] == internal.n

    ref = tmp_path / "ref"
    res = runner.invoke(app, ["evaluate", str(p), "--reference", str(p), "--n-boot", "20",
                              "--out", str(ref)])
    _ok(res)
    assert _manifest(ref)["command"] == "evaluate --reference" and _manifest(ref)["data"] is None
    assert ARTIFACTS["comparison"].locate(ref) == "comparison.json"
    assert read_artifact(ref, "comparison")["n"] == internal.n

    ext = tmp_path / "ext"
    res = runner.invoke(app, ["evaluate", str(p), "--model", str(model_dir), "--external",
                              EXTERNAL, "--n-boot", "20", "--out", str(ext)])
    _ok(res)
    man = _manifest(ext)
    assert man["command"] == "evaluate --external"
    assert man["data"] == {"spec": EXTERNAL, "split": "all", "n_used": 40, "n_total": 40,
                           "split_unit": man["data"]["split_unit"]}
    assert ARTIFACTS["external"].locate(ext) == "external.json"
    assert ExternalValidation.load(ext).external["n"] == 40
    assert Predictions.load(ARTIFACTS["external_predictions"].path_in(ext)).n == 40
    assert ARTIFACTS["external_reliability"].path_in(ext).stat().st_size > 0

    bad = tmp_path / "bad"
    _bad(["evaluate", str(p), "--reference", str(p), "--external", EXTERNAL, "--out", str(bad)],
         capsys, "not both")
    _bad(["evaluate", str(p), "--external", EXTERNAL, "--out", str(bad)], capsys,
         "needs --model")
    _bad(["evaluate", str(tmp_path / "none.npz"), "--out", str(bad)], capsys, "none.npz")
    assert not bad.exists() and not [q for q in tmp_path.iterdir() if q.name.startswith(".bad")]
