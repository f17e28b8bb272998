"""``compress sweep``, ``compress students`` and ``compress deploy`` run registered stages
(issue S): each command parses its flags, runs one stage into its run directory and prints
from the stage's result; the declared artifact sits at its declared path, the stage declares
what it reads and writes, and bad input leaves nothing at --out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medscalpel.pipeline.stages  # noqa: F401  (registers the stages)
from medscalpel.cells import CellIndex
from medscalpel.cli.main import app
from medscalpel.compress.sweep import SweepResult
from medscalpel.data import Preprocess
from medscalpel.deploy.result import DeployResult
from medscalpel.deploy.served import load_any, serve_folder
from medscalpel.layout import ARTIFACTS, read_artifact
from medscalpel.models.checkpoint import make_card, save_model
from medscalpel.models.zoo import create_model
from medscalpel.pipeline.stage import STAGES

SIZE = 32


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny two-class MedMNIST-format file (a bright square marks PNEUMONIA) and an
    untrained densenet_tiny with its card."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 32), ("val", 16), ("test", 24)):
        y = np.zeros((n, 1), dtype=np.int64)
        y[n // 2:] = 1
        x = rng.integers(0, 60, (n, SIZE, SIZE)).astype(np.uint8)
        x[y[:, 0] == 1, 8:20, 8:20] = 220
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    npz = root / "pneumoniamnist_32.npz"
    np.savez(npz, **arrays)
    torch.manual_seed(0)
    m = create_model("densenet_tiny", 2, img_size=SIZE)
    m.card = make_card(m, ["NORMAL", "PNEUMONIA"], "multiclass", Preprocess(size=SIZE))
    save_model(m, root / "model")
    return {"spec": f"medmnist:{npz}", "model": str(root / "model")}


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_sweep_runs_the_registered_grid_stage_resumable_at_out(inputs, tmp_path,
                                                               refused_nothing_written):
    cls = STAGES.get("sweep_grid")
    assert cls.writes == ("sweep_grid",) and cls.reads == ()
    assert STAGES.get("sweep").writes == ("sweep_index",)  # the demo's: the same run() code
    assert issubclass(cls, STAGES.get("sweep"))
    out = tmp_path / "sweep"
    args = ["compress", "sweep", inputs["model"], "--data", inputs["spec"], "--out", str(out),
            "--methods", "l1"]
    r = CliRunner().invoke(app, args + ["--ratios", "0,0.5"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "2 cells (2 computed, 0 already done)" in r.output
    assert _manifest(out)["command"] == "compress sweep"
    assert ARTIFACTS["sweep_grid"].locate(out) == "index.json"
    index = read_artifact(out, "sweep_grid")
    assert isinstance(index, CellIndex) and len(index.cells) == 2
    # the grid is resumable in place: a rerun with one more ratio computes only that cell
    r = CliRunner().invoke(app, args + ["--ratios", "0,0.5,0.9"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "3 cells (1 computed, 2 already done)" in r.output
    res = SweepResult.load(out)
    assert sorted(c.ratio for c in res.cells) == [0.0, 0.5, 0.9]
    assert sorted(p.name for p in out.iterdir()) == ["cells", "index.json", "manifest.json"]
    refused_nothing_written(["compress", "sweep", inputs["model"], "--data", inputs["spec"],
                             "--ratios", "0,1.5"], tmp_path / "bad", "ratios")


def test_students_runs_the_registered_stage(inputs, tmp_path, refused_nothing_written):
    cls = STAGES.get("students")
    assert cls.writes == ("students",) and cls.reads == ()
    out = tmp_path / "st"
    r = CliRunner().invoke(app, ["compress", "students", "--model", inputs["model"], "--data",
                                 inputs["spec"], "--candidates", "resnet_tiny",
                                 "--latency-budget-ms", "1000", "--proxy-steps", "1",
                                 "--batch-size", "16", "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "chosen: resnet_tiny" in r.output
    man = _manifest(out)
    assert man["command"] == "compress students" and man["config"]["candidates"] == \
        ["resnet_tiny"]
    assert set(man["data"]) == {"train", "val"} and all(man["data"].values())
    assert ARTIFACTS["students"].locate(out) == "students.json"
    doc = read_artifact(out, "students")
    assert doc["chosen"] == "resnet_tiny" and len(doc["candidates"]) == 1
    refused_nothing_written(["compress", "students", "--model", inputs["model"], "--data",
                             "medmnist:/nonexistent/pneumoniamnist_32.npz", "--candidates",
                             "resnet_tiny", "--latency-budget-ms", "1000"],
                            tmp_path / "bad", "nonexistent")


def test_deploy_runs_the_registered_stage_with_one_manifest(inputs, tmp_path,
                                                            refused_nothing_written):
    cls = STAGES.get("deploy")
    assert cls.writes == ("deploy",) and cls.reads == () and cls.may_read == ("compress",)
    out = tmp_path / "dep"
    r = CliRunner().invoke(app, ["compress", "deploy", "--model", inputs["model"], "--data",
                                 inputs["spec"], "--runtimes", "torch", "--precisions", "fp32",
                                 "--batch", "1", "--rounds", "1", "--repeats", "1",
                                 "--n-boot", "20", "--n-images", "16", "--n-calib", "4",
                                 "--no-explain", "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "recommended: torch:fp32" in r.output
    # one run directory, one manifest: deploy()'s own config and data hashes moved into it
    assert [p.relative_to(out) for p in out.rglob("manifest.json")] == \
        [ARTIFACTS["manifest"].path_in(out).relative_to(out)]
    man = _manifest(out)
    assert man["command"] == "compress deploy"
    assert man["config"]["model"] == inputs["model"] and man["config"]["batches"] == [1]
    assert man["config"]["variants"] == ["torch:fp32"] and man["config"]["rounds"] == 1
    assert man["config"]["floor_macro"] == -0.005 and man["config"]["floor_class"] == -0.01
    assert set(man["data"]) == {"eval", "calib"} and man["data"]["eval"] != man["data"]["calib"]
    assert ARTIFACTS["deploy"].locate(out) == "deploy/deploy.json"
    res = read_artifact(out, "deploy")
    assert isinstance(res, DeployResult) and res.recommended == "torch:fp32"
    assert res.n_images == 16 and res.n_calib == 4 and res.split == "test"
    # the served artifact loads from the run, its deploy folder and its serve folder
    served = out / "deploy" / "serve"
    assert serve_folder(out) == serve_folder(out / "deploy") == serve_folder(served) == served
    assert load_any(out).card.class_names == ("NORMAL", "PNEUMONIA")
    refused_nothing_written(["compress", "deploy", "--model", inputs["model"], "--data",
                             "medmnist:/nonexistent/pneumoniamnist_32.npz"],
                            tmp_path / "bad", "nonexistent")
