"""``scale prune|distill|triage|train`` run registered stages (issue S): each command parses its
flags, runs one stage ('grid_prune', 'grid_distill', 'grid_triage', 'ddp_train') and prints
from the stage's result; the declared artifact sits at its declared path, the stage declares
what it writes, and bad input leaves nothing at --out. A grid stage's run directory is the grid
itself, so a rerun still resumes (and extends) it cell by cell."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import medscalpel.pipeline.stages  # noqa: F401  (registers the stages)
from medscalpel.cells import CellIndex
from medscalpel.cli.main import app, run
from medscalpel.data import open_dataset
from medscalpel.engine.predict import extract_features
from medscalpel.layout import ARTIFACTS, read_artifact
from medscalpel.models import load_model
from medscalpel.models.checkpoint import ModelCard
from medscalpel.pipeline.stage import STAGES

sys.path.insert(0, str(Path(__file__).parent))
from test_executors import save_tiny_model, write_csv_dataset  # noqa: E402

SERIAL = ["--executor", "serial"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny multi-label CSV dataset (48 PNGs, 32 px), two untrained resnet_tiny models and
    the validation / test Features of the first."""
    root = tmp_path_factory.mktemp("scale")
    spec = write_csv_dataset(root / "data")
    m1 = save_tiny_model(spec, root / "m1", seed=0)
    m2 = save_tiny_model(spec, root / "m2", seed=1)
    model = load_model(m1)
    for split in ("val", "test"):
        ds = open_dataset(spec, split=split, preprocess=model.card.preprocess)
        extract_features(model, ds, progress=False).save(root / f"{split}.npz")
    return {"spec": spec, "m1": str(m1), "m2": str(m2), "val": str(root / "val.npz"),
            "test": str(root / "test.npz")}


def _invoke(args):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return " ".join(r.output.split())  # rich wraps long lines at the terminal's width


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _grid_stage(name):
    cls = STAGES.get(name)
    assert cls.reads == () and cls.writes == ("sweep_grid",)
    return cls


def _index(out, n_cells):
    assert ARTIFACTS["sweep_grid"].locate(out) == "index.json"
    idx = read_artifact(out, "sweep_grid")
    assert isinstance(idx, CellIndex) and len(idx.cells) == n_cells
    assert idx.out_dir == str(out)  # the grid directory itself, not a temporary folder
    return idx


def test_scale_prune_runs_grid_prune_resumable_at_out(inputs, tmp_path, capsys,
                                                      refused_nothing_written):
    _grid_stage("grid_prune")
    out = tmp_path / "prune"
    args = ["scale", "prune", "--model", inputs["m1"], "--data", inputs["spec"], "--out",
            str(out), "--methods", "l1", *SERIAL]
    text = _invoke(args + ["--ratios", "0,0.5"])
    assert "2 cells (2 computed, 0 already done)" in text and "[serial]" in text
    assert "l1 seed None r=0.50: sparsity 0.500" in text
    m = _manifest(out)
    assert m["command"] == "scale prune" and m["config"]["executor"] == "serial"
    idx = _index(out, 2)
    assert idx.command == "scale prune" and {c.cell["ratio"] for c in idx.cells} == {0.0, 0.5}
    # rerun with one more ratio: only the new cell is computed, in the same directory
    text = _invoke(args + ["--ratios", "0,0.5,0.7"])
    assert "3 cells (1 computed, 2 already done)" in text
    _index(out, 3)
    # another model into the same grid is refused, the grid left as it was
    with pytest.raises(SystemExit) as exc:
        run(["scale", "prune", "--model", inputs["m2"], "--data", inputs["spec"], "--out",
             str(out), "--methods", "l1", "--ratios", "0.5", *SERIAL])
    assert exc.value.code == 2 and "Cannot resume" in capsys.readouterr().err
    _index(out, 3)
    refused_nothing_written(["scale", "prune", "--model", inputs["m1"], "--data",
                             inputs["spec"], "--ratios", "1.5", *SERIAL], tmp_path / "bad",
                            "The 'ratios' parameter of prune_grid")


def test_scale_distill_runs_grid_distill(inputs, tmp_path, refused_nothing_written):
    _grid_stage("grid_distill")
    out = tmp_path / "distill"
    text = _invoke(["scale", "distill", "--model", inputs["m1"], "--data", inputs["spec"],
                    "--students", "resnet_tiny", "--out", str(out), "--epochs", "1",
                    "--batch-size", "8", *SERIAL])
    assert "1 cells (1 computed, 0 already done)" in text
    assert "resnet_tiny T=4.0 soft_weight=0.5 seed 0: AUROC" in text
    assert _manifest(out)["command"] == "scale distill"
    cell = _index(out, 1).cells[0]
    assert cell.kind == "distill" and cell.result["student"]["macro_auroc"] is not None
    assert (out / cell.path / "predictions.npz").is_file()
    refused_nothing_written(["scale", "distill", "--model", inputs["m1"], "--data",
                             inputs["spec"], "--students", "nosuch", *SERIAL],
                            tmp_path / "bad", "Unknown architecture 'nosuch'")


def test_scale_triage_runs_grid_triage(inputs, tmp_path, refused_nothing_written):
    _grid_stage("grid_triage")
    out = tmp_path / "triage"
    text = _invoke(["scale", "triage", inputs["val"], inputs["test"], "--out", str(out),
                    "--budgets", "1,5", *SERIAL])
    assert "2 cells (2 computed, 0 already done)" in text
    assert _manifest(out)["command"] == "scale triage"
    idx = _index(out, 2)
    assert sorted(c.cell["budget"] for c in idx.cells) == [1.0, 5.0]
    assert all("classes" in c.result for c in idx.cells)
    refused_nothing_written(["scale", "triage", inputs["val"], str(tmp_path / "missing.npz"),
                             *SERIAL], tmp_path / "bad", "does not exist")


def test_scale_train_runs_ddp_train(inputs, tmp_path, refused_nothing_written):
    cls = STAGES.get("ddp_train")
    assert cls.reads == () and cls.writes == ("fit", "model") and cls.may_write == ("metrics",)
    out = tmp_path / "train"
    args = ["scale", "train", "--data", inputs["spec"], "--arch", "resnet_tiny", "--backend",
            "gloo", "--size", "32", "--epochs", "1", "--n-boot", "0"]
    text = _invoke(args + ["--out", str(out), "--world-size", "1", "--batch-size", "8"])
    assert "macro AUROC" in text and f"modelsavedto{out / 'model'}" in text.replace(" ", "")
    m = _manifest(out)
    assert m["command"] == "scale train" and m["data"] == {"spec": inputs["spec"]}
    assert m["config"]["ddp"]["world_size"] == 1 and m["config"]["device"] == "cpu"
    fit = read_artifact(out, "fit")
    assert fit["model_dir"] == str(out / "model")  # the final folder, not the .partial one
    assert fit["test"]["macro"] == read_artifact(out, "metrics")["macro"]
    assert ARTIFACTS["model"].locate(out) == "model/model.json"
    card = read_artifact(out, "model")
    assert isinstance(card, ModelCard) and card.training["ddp"]["world_size"] == 1
    # a global batch that the processes cannot share fails inside the stage: nothing is left
    refused_nothing_written(args + ["--world-size", "2", "--batch-size", "7"],
                            tmp_path / "bad", "must be a multiple of world_size=2")
