"""End-to-end CLI: train -> predict -> evaluate on a tiny image folder; errors exit non-zero
with a clear message and leave no run directory behind."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medscalpel.cli.main import app

runner = CliRunner()


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c, cls in enumerate(["NORMAL", "PNEUMONIA"]):
        (root / cls).mkdir(parents=True)
        for i in range(24):
            img = (rng.random((24, 24)) * 60).astype(np.uint8)
            if c:
                img[6:18, 6:18] += 150
            Image.fromarray(img).save(root / cls / f"{cls.lower()}_{i}.png")
    return root


def _ok(res):
    assert res.exit_code == 0, res.output + repr(res.exception)


def test_train_predict_evaluate(tmp_path, folder):
    spec = f"folder:{folder}?dedup=true&val_fraction=0.25&test_fraction=0.25"
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--data", spec, "--arch", "vgg_tiny", "--size", "24",
                              "--epochs", "2", "--batch-size", "8", "--n-boot", "20",
                              "--out", str(out)])
    _ok(res)
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "train" and man["status"] == "complete"
    assert man["versions"]["torch"].startswith("2.14.1")
    card = json.loads((out / "model" / "model.json").read_text())
    assert card["class_names"] == ["NORMAL", "PNEUMONIA"] and card["task"] == "multiclass"
    assert card["input"]["size"] == 24
    res = runner.invoke(app, ["predict", "--model", str(out / "model"), "--data", spec,
                              "--split", "test", "--out", str(tmp_path / "pred")])
    _ok(res)
    res = runner.invoke(app, ["evaluate", str(tmp_path / "pred" / "predictions.npz"), "--model",
                              str(out / "model"), "--n-boot", "50", "--out", str(tmp_path / "ev")])
    _ok(res)
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 12 and 0.0 <= metrics["macro"]["accuracy"] <= 1.0
    assert "PNEUMONIA" in res.output


def test_missing_dir_is_clear_error_and_nothing_written(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--data", f"folder:{tmp_path / 'nope'}", "--arch",
                              "vgg_tiny", "--out", str(out)])
    assert res.exit_code != 0
    assert "nope" in str(res.exception)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_unknown_adapter_and_arch(tmp_path, folder):
    res = runner.invoke(app, ["train", "--data", "bogus:/x", "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "Valid names" in str(res.exception)
    res = runner.invoke(app, ["train", "--data", f"folder:{folder}", "--arch", "resnet9000",
                              "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "Unknown architecture 'resnet9000'" in str(res.exception)


def test_console_entry_point_exit_code(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from medscalpel.cli.main import run; run()",
                           "predict", "--model", str(tmp_path / "none"), "--data", "bogus",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "No weights" in proc.stderr


def test_models_list():
    res = runner.invoke(app, ["models", "list"])
    _ok(res)
    assert "densenet121" in res.output and "resnet50" in res.output
