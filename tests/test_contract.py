"""The compressor contract: every registered compressor returns one CompressionResult with
consistent counts, a verification record, a lineage step built in the library and (when asked) a
paired accuracy comparison against the input model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medscalpel.compress.contract import (COMPRESSORS, CompressionInputs, CompressionResult,
                                          compress)
from medscalpel.compress.distill import DistillConfig
from medscalpel.compress.measure import count_parameters, max_abs_logit_delta
from medscalpel.data.base import ArrayDataset
from medscalpel.data.transforms import Preprocess
from medscalpel.engine.train import TrainConfig
from medscalpel.errors import ConfigError
from medscalpel.models.checkpoint import load_model, make_card
from medscalpel.models.zoo import create_model

IMG = 32
NAMES = ["a", "b", "c"]


def _ds(n, seed, split):
    rng = np.random.default_rng(seed)
    imgs = rng.random((n, IMG, IMG)).astype(np.float32)
    y = (rng.random((n, 3)) > 0.5).astype(np.float32)
    imgs[y[:, 0] > 0, 8:16, 8:16] += 0.8  # a learnable signal for class a
    return ArrayDataset(imgs, y, NAMES, "multilabel", preprocess=Preprocess(size=IMG), split=split,
                        ids=[f"{split}{i}" for i in range(n)])


@pytest.fixture(scope="module")
def setup():
    from test_lossless import alive  # BN statistics so that no channel is dead by accident

    torch.manual_seed(0)
    m = alive(create_model("vgg_tiny", num_classes=3, img_size=IMG)).eval()
    m.card = make_card(m, NAMES, "multilabel", Preprocess(size=IMG))
    with torch.no_grad():  # a dead channel: something for the lossless fold to remove
        m.backbone.features[1].weight[3] = 0.0
        m.backbone.features[1].bias[3] = -1.0
    tr, va, te = _ds(48, 0, "train"), _ds(24, 1, "val"), _ds(32, 2, "test")
    calib = torch.stack([tr.image(i) for i in range(32)])
    held = torch.stack([va.image(i) for i in range(24)])
    inputs = CompressionInputs(calib=calib, heldout=held, heldout_labels=va.labels, train=tr,
                               val=va, test=te, evaluate=te)
    return m, inputs


def test_registry_lists_every_compressor():
    assert set(COMPRESSORS.names()) == {"lossless", "lossless-empirical", "tolerance",
                                        "sparsify-fold", "prune", "distill", "ofa"}
    with pytest.raises(ConfigError, match="Unknown compressor 'zip'. Valid names: distill"):
        compress("zip", torch.nn.Linear(1, 1), CompressionInputs())


@pytest.mark.parametrize("method,kw", [
    ("lossless", {"latency": False}),
    ("lossless-empirical", {"latency": False}),
    ("tolerance", {"ratio": 0.3, "latency": False}),
    ("prune", {"ratio": 0.3, "measure_latency": False}),
])
def test_every_compressor_returns_the_contract(setup, method, kw, tmp_path):
    m, inputs = setup
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = compress(method, m, inputs, n_boot=50, **kw)
    assert isinstance(res, CompressionResult) and res.method == method
    assert res.params_before == count_parameters(m)
    assert res.params_after == count_parameters(res.model) <= res.params_before
    assert res.macs_after <= res.macs_before
    assert {"max_abs_logit_delta", "guarantee", "exact"} <= set(res.verification)
    # the caller's model is unchanged
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    # the paired comparison is on the evaluation split, both models predicted there
    c = res.comparison
    assert c is not None and c.n == 32 and c.split == "test" and c.n_boot == 50
    if res.verification["exact"]:
        assert max_abs_logit_delta(m, res.model, inputs.heldout) <= 1e-5
        assert abs(c.macro["delta_auroc"]) < 1e-6
    # lineage: built in the library, one step on the parent card
    card = res.lineage()
    assert len(card.lineage) == len(m.card.lineage) + 1
    step = card.lineage[-1]
    assert step["method"] == ("prune_structured" if method == "prune" else method)
    assert step["parent"] == m.card.model_id
    assert step["accuracy_delta"]["delta_macro_auroc"] == c.macro["delta_auroc"]
    d = res.save(tmp_path / method).joinpath("report.json")
    back = load_model(tmp_path / method / "model")
    assert back.card.lineage[-1]["method"] == step["method"]
    assert d.is_file() and count_parameters(back) == res.params_after


def test_sparsify_fold_and_distill_through_the_contract(setup):
    m, inputs = setup
    res = compress("sparsify-fold", m, inputs, ratio=0.3, epochs=1, latency=False, n_boot=0)
    assert res.method == "sparsify-fold" and res.params_after < res.params_before
    assert res.verification["max_abs_logit_delta"] <= 1e-5  # the fold step is exact
    cfg = DistillConfig(soft_weight=0.5, temperature=2.0, baseline=False, n_boot=0,
                        saliency_images=0, train=TrainConfig(epochs=1, batch_size=16))
    res = compress("distill", m, inputs, student="resnet_tiny", config=cfg, n_boot=0)
    assert res.method == "distill" and res.model.arch == "resnet_tiny"
    card = res.lineage()
    assert card.arch == "resnet_tiny" and card.lineage[-1]["method"] == "distill"
    assert "accuracy_delta" in card.lineage[-1]


def test_calib_labels_make_attribution_criteria_score_the_positive_classes(setup, monkeypatch):
    """With calib_labels the lrp criterion scores each calibration image's positive classes
    only (the seed's recipe), not every class of every image: fewer (image, class) pairs."""
    from dataclasses import replace

    import medscalpel.compress.importance as rel  # the criterion's own name for it

    m, inputs = setup
    seen = []
    real = rel.channel_relevance

    def spy(model, images, targets=None, **kw):
        out = real(model, images, targets, **kw)
        seen.append(out.n_pairs)
        return out

    monkeypatch.setattr(rel, "channel_relevance", spy)
    labels = inputs.train.labels[:32]
    for inp in (inputs, replace(inputs, calib_labels=labels)):
        compress("prune", m, replace(inp, evaluate=None), criterion="lrp", ratio=0.3,
                 measure_latency=False, n_boot=0)
    assert seen == [32 * 3, int((np.asarray(labels) > 0.5).sum())] and seen[1] < seen[0]


def test_missing_inputs_name_the_fix():
    m = create_model("vgg_tiny", num_classes=3, img_size=IMG)
    with pytest.raises(ConfigError, match="Compressor 'tolerance' needs calib, heldout"):
        compress("tolerance", m, CompressionInputs(), ratio=0.3)
    with pytest.raises(ConfigError, match="'distill' needs train, test"):
        compress("distill", m, CompressionInputs(), student="resnet_tiny")


def test_cli_prune_prints_and_saves_the_paired_accuracy_delta(tmp_path):
    """'compress prune' goes through the contract: accuracy beside the compression."""
    import json

    from typer.testing import CliRunner

    from medscalpel.cli.main import app
    from medscalpel.data.phantom import generate_phantom
    from medscalpel.models.checkpoint import save_model

    generate_phantom(n=120, size=32, seed=0, out=tmp_path / "ph", progress=False)
    names = list(generate_phantom(n=1, size=16, progress=False).class_names)
    torch.manual_seed(0)
    m = create_model("densenet_tiny", 14, 1, 32)
    save_model(m, tmp_path / "m", make_card(m, names, "multilabel", Preprocess(size=32)))
    r = CliRunner().invoke(app, ["compress", "prune", str(tmp_path / "m"), "--data",
                                 f"phantom:{tmp_path / 'ph'}", "--ratio", "0.3", "--calib", "8",
                                 "--n-boot", "50", "--out", str(tmp_path / "pr")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    rep = json.loads((tmp_path / "pr" / "report.json").read_text())
    assert rep["method"] == "prune" and rep["comparison"]["split"] == "test"
    assert rep["comparison"]["n"] > 0 and len(rep["comparison"]["classes"]) == 14
    assert "paired bootstrap" in r.output and "macro AUROC" in r.output
    back = load_model(tmp_path / "pr" / "model")
    assert "accuracy_delta" in back.card.lineage[-1]
    assert (tmp_path / "pr" / "prune.json").is_file()
    assert "internal: accuracy vs the default floor" in r.output
    # the same verdict on a second site (the phantom's scanner B)
    r = CliRunner().invoke(app, ["compress", "prune", str(tmp_path / "m"), "--data",
                                 f"phantom:{tmp_path / 'ph'}", "--ratio", "0.3", "--calib", "8",
                                 "--n-boot", "50", "--external",
                                 f"phantom:{tmp_path / 'ph'}?site=B", "--out",
                                 str(tmp_path / "pe")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    from medscalpel.layout import read_artifact

    ext = read_artifact(tmp_path / "pe", "external_comparison")
    assert ext["spec"].endswith("site=B") and ext["comparison"]["n"] == 120
    assert ext["verdict"]["outcome"] in ("pass", "fail", "undecided")
    assert "external: accuracy vs the default floor" in r.output


def test_latency_protocol_reports_round_ratios_and_spread(caplog, monkeypatch):
    """One latency protocol: alternated rounds, median ratio, per-round ratios, their spread,
    and a warning when the spread is large (planted timings, then a real measurement)."""
    import medscalpel.compress.measure as measure

    a = create_model("vgg_tiny", num_classes=2, img_size=IMG)
    x = torch.randn(1, 1, IMG, IMG)
    real = measure.latency_pair(a, a, x, repeats=2, rounds=3, warmup=1)
    assert len(real["round_ratios"]) == real["rounds"] == 3 and real["spread"] >= 0
    times = iter([10.0, 5.0, 10.0, 10.0, 10.0, 5.0])  # a, b alternated: ratios 2, 1, 2
    monkeypatch.setattr(measure, "cpu_latency", lambda *args, **kw: next(times))
    lat = measure.latency_pair(a, a, x, rounds=3)
    assert lat["round_ratios"] == [2.0, 1.0, 2.0] and lat["ratio"] == 2.0
    assert lat["spread"] == pytest.approx(0.5) and lat["noisy"]
    assert "varies by 50% between 3 alternated rounds" in caplog.text
