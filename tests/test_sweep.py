"""Unstructured sparsity sweep: exact sparsity, resume, identity, random control."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medscalpel.compress.sweep import (SweepResult, global_unstructured_prune, prunable_weights,
                                       run_sweep, sparsity_report)
from medscalpel.data import ArrayDataset, Preprocess
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, RunError
from medscalpel.models.zoo import create_model


def _ds(n=16, seed=0, split="test"):
    rng = np.random.default_rng(seed)
    imgs = rng.random((n, 32, 32)).astype(np.float32)
    labels = (rng.random((n, 3)) > 0.5).astype(np.float32)
    labels[0], labels[1] = 1, 0  # every class has positives and negatives
    return ArrayDataset(imgs, labels, ["a", "b", "c"], "multilabel",
                        preprocess=Preprocess(size=32), split=split)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("vgg_tiny", 3, img_size=32)


@pytest.mark.parametrize("method", ["l1", "random"])
@pytest.mark.parametrize("ratio", [0.1, 0.37, 0.9])
def test_achieved_sparsity_equals_requested(model, method, ratio):
    pruned = global_unstructured_prune(model, ratio, method, seed=1)
    rep = sparsity_report(pruned)
    n = rep["overall"]["numel"]
    assert rep["overall"]["zeros"] == round(ratio * n)
    assert abs(rep["overall"]["sparsity"] - ratio) <= 1.0 / n
    assert "classifier" in rep["layers"]  # the classifier is part of the global pool
    # plain tensors afterwards (prune.remove), the caller's model untouched
    assert not any(hasattr(m, "weight_orig") for _, m in prunable_weights(pruned))
    assert sparsity_report(model)["overall"]["zeros"] == 0


def test_l1_removes_smallest_and_random_differs(model):
    l1 = global_unstructured_prune(model, 0.5, "l1")
    rnd = global_unstructured_prune(model, 0.5, "random", seed=0)
    orig = torch.cat([m.weight.detach().abs().flatten() for _, m in prunable_weights(model)])
    kept = torch.cat([m.weight.detach().abs().flatten() for _, m in prunable_weights(l1)])
    assert orig[kept == 0].max() <= orig[kept != 0].min()  # global magnitude threshold
    masks_l1 = torch.cat([(m.weight == 0).flatten() for _, m in prunable_weights(l1)])
    masks_rn = torch.cat([(m.weight == 0).flatten() for _, m in prunable_weights(rnd)])
    assert masks_l1.sum() == masks_rn.sum()
    assert (masks_l1 != masks_rn).float().mean() > 0.2
    x = torch.randn(2, 1, 32, 32)
    assert not torch.allclose(l1.eval()(x), rnd.eval()(x))
    # the random control is seeded
    again = global_unstructured_prune(model, 0.5, "random", seed=0)
    assert all(torch.equal(a.weight, b.weight) for (_, a), (_, b) in
               zip(prunable_weights(rnd), prunable_weights(again)))


def test_sweep_resume_skips_finished_cells(model, tmp_path):
    ds = _ds()
    out = tmp_path / "sweep"
    r1 = run_sweep([model], ds, out, ratios=[0, 0.5], methods=("l1", "random"), progress=False)
    assert (r1.n_computed, r1.n_skipped) == (4, 0)
    mid = r1.model_ids[0]
    c = r1.cell(mid, "l1", 0.5)
    cell = out / c.path
    assert (cell / "predictions.npz").is_file() and (cell / "sparsity.json").is_file()
    assert (out / r1.cell(mid, "random", 0.5, seed=0).path / "predictions.npz").is_file()
    assert [x.seed for x in r1.select(mid, "l1")] == [None, None]  # l1 does not use a seed
    p = Predictions.load(cell / "predictions.npz")
    assert p.n == len(ds) and p.model_id == mid and p.meta["sweep"]["ratio"] == 0.5
    sp = json.loads((cell / "sparsity.json").read_text())
    assert sp["requested"] == 0.5 and sp["overall"]["sparsity"] == pytest.approx(c.sparsity)

    r2 = run_sweep([model], ds, out, ratios=[0, 0.5, 0.8], methods=("l1", "random"),
                   progress=False)
    assert (r2.n_computed, r2.n_skipped) == (2, 4)
    assert len(SweepResult.load(out).cells) == 6
    # a rerun over fewer ratios still lists every finished cell of the directory
    r2b = run_sweep([model], ds, out, ratios=[0.5], methods=("l1",), progress=False)
    assert (r2b.n_computed, r2b.n_skipped, len(r2b.cells)) == (0, 1, 6)
    # a damaged cell (missing or truncated artifact) is recomputed, the others are kept
    (cell / "sparsity.json").unlink()
    other = out / r1.cell(mid, "random", 0.0, seed=0).path / "predictions.npz"
    other.write_bytes(other.read_bytes()[:100])
    r3 = run_sweep([model], ds, out, ratios=[0, 0.5, 0.8], methods=("l1", "random"),
                   progress=False)
    assert (r3.n_computed, r3.n_skipped) == (2, 4)
    res = SweepResult.load(out)
    ratios, auroc = res.curve(mid, "l1")
    assert ratios.tolist() == [0.0, 0.5, 0.8] and np.isfinite(auroc).all()
    dense = res.predictions(mid, "l1", 0.0)
    assert np.allclose(dense.logits, res.predictions(mid, "random", 0.0, seed=0).logits)
    assert res.cell(mid, "l1", 0.8).sparsity == pytest.approx(0.8, abs=1e-4)
    assert np.array_equal(res.predictions(mid, "l1", 0.5).logits, p.logits)  # same as before


def test_sweep_refuses_other_data(model, tmp_path):
    out = tmp_path / "sweep"
    run_sweep([model], _ds(), out, ratios=[0.5], methods=("l1",), progress=False)
    with pytest.raises(RunError, match="different data"):
        run_sweep([model], _ds(seed=1), out, ratios=[0.5], methods=("l1",), progress=False)


def test_sweep_finetune_keeps_sparsity(model, tmp_path):
    res = run_sweep([model], _ds(), tmp_path / "s", ratios=[0.6], methods=("l1",),
                    finetune_epochs=1, train_ds=_ds(seed=2, split="train"), progress=False)
    assert res.cells[0].sparsity == pytest.approx(0.6, abs=1e-4)
    assert res.cells[0].seed == 0 and res.cells[0].method == "l1"


def test_sweep_errors(model, tmp_path):
    ds = _ds()
    with pytest.raises(ConfigError, match="'ratios' parameter of run_sweep"):
        run_sweep([model], ds, tmp_path / "a", ratios=[1.0], progress=False)
    with pytest.raises(ConfigError, match="'methods' parameter of run_sweep"):
        run_sweep([model], ds, tmp_path / "b", methods=("l2",), progress=False)
    with pytest.raises(ConfigError, match="needs a 'train_ds'"):
        run_sweep([model], ds, tmp_path / "c", finetune_epochs=1, progress=False)
    with pytest.raises(ConfigError, match="more than once"):
        run_sweep([model, model], ds, tmp_path / "d", progress=False)


def test_cli_ratio_parsing():
    from medscalpel.cli.compress_cmd import parse_ratios

    assert parse_ratios("0:0.95:0.05") == pytest.approx(np.arange(0, 0.96, 0.05).tolist())
    assert len(parse_ratios("0:0.95:0.05")) == 20
    assert parse_ratios("0.5,0.65,0.9") == [0.5, 0.65, 0.9]
    with pytest.raises(ConfigError, match="--ratios"):
        parse_ratios("a:b")


def test_audit_commands_run_their_registered_stages(model, tmp_path):
    """`audit forgettability` / `audit pies` run the stages the demo's 'audit' stage runs and
    write the same relative paths (issue S); the manifest names the command."""
    from typer.testing import CliRunner

    from medscalpel.cli.main import app
    from medscalpel.layout import ARTIFACTS, read_artifact

    ds = _ds(n=40)
    run_sweep([model], ds, tmp_path / "sweep", ratios=[0, 0.5, 0.9], methods=("l1",),
              progress=False)
    r = CliRunner().invoke(app, ["audit", "forgettability", str(tmp_path / "sweep"), "--n-boot",
                                 "20", "--n-perm", "9", "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    f = read_artifact(tmp_path / "f", "forgettability")
    assert ARTIFACTS["forgettability"].locate(tmp_path / "f") == ARTIFACTS["forgettability"].path
    assert f["class_names"] == ["a", "b", "c"]
    man = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert man["command"] == "audit forgettability" and man["config"]["n_perm"] == 9
    r = CliRunner().invoke(app, ["audit", "pies", str(tmp_path / "sweep"), "--ratio", "0.9",
                                 "--quantile", "0.1", "--n-boot", "20", "--out",
                                 str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert read_artifact(tmp_path / "p", "pies")["n_pies"] == 4
    assert ARTIFACTS["pies"].locate(tmp_path / "p") == "audit/pies/pies.json"
    assert str(ARTIFACTS["pies"].dir_in(tmp_path / "p")) in r.output.replace("\n", "")
    # a failing stage leaves nothing behind
    r = CliRunner().invoke(app, ["audit", "pies", str(tmp_path / "nowhere"), "--out",
                                 str(tmp_path / "bad")])
    assert r.exit_code != 0 and not (tmp_path / "bad").exists()
