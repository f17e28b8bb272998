"""Lossless folding: planted dead / constant / duplicated channels are found exactly, removed
physically through DenseNet concatenations, ResNet additions and VGG chains, and the logits stay
within 1e-5; plans and models round-trip; verification refuses loudly."""

from __future__ import annotations

import torch
import pytest
from torch import nn

from medscalpel.compress.graph import build_channel_graph
from medscalpel.compress.lossless import LosslessPlan, apply_plan, fold_lossless, plan_lossless
from medscalpel.compress.measure import (count_macs, count_parameters, cpu_latency,
                                         max_abs_logit_delta)
from medscalpel.errors import ConfigError, ModelError, VerificationError
from medscalpel.models.zoo import create_model

IMG = 32


def alive(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm data statistics (one pass over random images) and a positive shift,
    so that no channel is dead, constant or dependent by accident (baseline: nothing to fold)."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.3 + 0.5 * torch.rand(n, generator=g))
            m.reset_running_stats()
            m.momentum = None
        model.train()
        model(torch.randn(64, 1, IMG, IMG, generator=g))
        for m in bns:
            m.momentum = 0.1
    return model.eval()


def plant(model: nn.Module, layer: str, kind: str, ch: int, src: int | None = None,
          value: float = 0.7) -> None:
    """Plant a dead / constant channel (every BatchNorm tied to the channel: weight 0 and a
    negative / positive bias) or a duplicate (producer filters and tied BatchNorms copied from
    channel ``src``) in the output channels of ``layer``."""
    import torch_pruning as tp

    root = model.get_submodule(layer)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 1, IMG, IMG))
    idxs = [ch] if src is None else [src, ch]
    group = dg.get_pruning_group(root, tp.prune_conv_out_channels, idxs=idxs)
    with torch.no_grad():
        for item in group:
            mod, ix = item.dep.target.module, [int(i) for i in item.idxs]
            if isinstance(mod, nn.BatchNorm2d):
                if kind == "dead":
                    mod.weight[ix[0]] = 0.0
                    mod.bias[ix[0]] = -1.0
                elif kind == "constant":
                    mod.weight[ix[0]] = 0.0
                    mod.bias[ix[0]] = value
                else:
                    for t in (mod.weight, mod.bias, mod.running_mean, mod.running_var):
                        t[ix[1]] = t[ix[0]]
            elif kind == "duplicate" and isinstance(mod, nn.Conv2d) and \
                    item.dep.handler == tp.prune_conv_out_channels:
                mod.weight[ix[1]] = mod.weight[ix[0]]
                if mod.bias is not None:
                    mod.bias[ix[1]] = mod.bias[ix[0]]


def removed(plan: LosslessPlan, *layers: str) -> dict[int, str]:
    for g in plan.groups:
        if g.layer in layers:
            return dict(zip(g.removed, g.kinds))
    raise AssertionError(f"no group rooted at {layers}: {[g.layer for g in plan.groups]}")


def others_removed(plan: LosslessPlan, *layers: str) -> int:
    return sum(len(g.removed) for g in plan.groups if g.layer not in layers)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(96, 1, IMG, IMG, generator=g), torch.randn(24, 1, IMG, IMG, generator=g)


def test_baseline_alive_models_fold_nothing(data):
    calib, held = data
    for arch in ("densenet_tiny", "resnet_tiny", "vgg_tiny"):
        m = alive(create_model(arch, num_classes=3, img_size=IMG))
        plan = plan_lossless(m, calib, progress=False)
        assert plan.removed_channels == 0, (arch, plan.counts())


def test_densenet_planted_channels_found_exactly(data, tmp_path):
    from medscalpel.data.transforms import Preprocess
    from medscalpel.models.checkpoint import load_model, make_card, save_model

    calib, held = data
    m = alive(create_model("densenet_tiny", num_classes=3, img_size=IMG))
    stored = "backbone.features.denseblock1.denselayer1.conv2"     # concatenated channels
    bottleneck = "backbone.features.denseblock1.denselayer1.conv1"  # read by a padded 3x3 conv
    last = "backbone.features.denseblock4.denselayer2.conv2"       # read by norm5 -> classifier
    plant(m, stored, "dead", 1)
    plant(m, stored, "constant", 3)
    plant(m, stored, "duplicate", 5, src=2)
    plant(m, bottleneck, "dead", 4)
    plant(m, bottleneck, "constant", 6)  # NOT exact through the zero-padded 3x3 conv: kept
    plant(m, last, "constant", 0, value=0.3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = fold_lossless(m, calib, held, latency=False, progress=False)
    plan = res.report.plan
    assert removed(plan, stored) == {1: "dead", 3: "constant", 5: "dependent"}
    assert removed(plan, bottleneck) == {4: "dead"}
    assert removed(plan, last) == {0: "constant"}
    assert others_removed(plan, stored, bottleneck, last) == 0
    assert res.report.channels == {"dead": 2, "constant": 2, "dependent": 1, "removed": 5,
                                   "total": plan.counts()["total"]}
    assert res.report.max_abs_logit_delta <= 1e-5
    assert res.report.params_after < res.report.params_before
    assert res.report.macs_after < res.report.macs_before
    # physically smaller, the caller's model untouched
    small = res.model
    assert small.get_submodule(stored).out_channels == 5
    assert small.get_submodule(bottleneck).out_channels == m.get_submodule(bottleneck).out_channels - 1
    assert small.classifier.in_features == m.classifier.in_features - 1
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    # save / reload through medscalpel's own files gives the same logits
    card = make_card(m, ["a", "b", "c"], "multilabel", Preprocess(size=IMG))
    out = save_model(small, tmp_path / "m", card.with_lineage("lossless", parent="x"))
    back = load_model(out)
    assert count_parameters(back) == count_parameters(small)
    assert max_abs_logit_delta(back, small, held) == 0.0
    assert max_abs_logit_delta(back, m, held) <= 1e-5


def test_resnet_planted_channels_through_residual_groups(data):
    calib, held = data
    m = alive(create_model("resnet_tiny", num_classes=3, img_size=IMG))
    graph = build_channel_graph(m, calib[:1], ignored=[m.classifier])
    roots = [g.root for g in graph.groups]
    stream1 = next(r for r in roots if r in ("backbone.conv1", "backbone.layer1.0.conv2"))
    stream4 = next(r for r in roots if r in ("backbone.layer4.0.conv2",
                                              "backbone.layer4.0.downsample.0"))
    inner2 = "backbone.layer2.0.conv1"
    plant(m, stream1, "dead", 2)            # dead in every member of the addition group
    plant(m, inner2, "duplicate", 3, src=0)  # duplicate read by a padded 3x3 conv (no intercept)
    plant(m, stream4, "constant", 5)        # constant read by the classifier through the pool
    res = fold_lossless(m, calib, held, latency=False, progress=False)
    plan = res.report.plan
    assert removed(plan, stream1) == {2: "dead"}
    assert removed(plan, inner2) == {3: "dependent"}
    assert removed(plan, stream4) == {5: "constant"}
    assert others_removed(plan, stream1, inner2, stream4) == 0
    assert res.report.max_abs_logit_delta <= 1e-5
    assert res.model.backbone.conv1.out_channels == 7
    assert res.model.backbone.layer1[0].conv2.out_channels == 7
    assert res.model.classifier.in_features == 63


def test_vgg_planted_constant_not_folded_through_padding(data):
    calib, held = data
    m = alive(create_model("vgg_tiny", num_classes=3, img_size=IMG))
    plant(m, "backbone.features.0", "dead", 0)
    plant(m, "backbone.features.0", "constant", 1)       # next conv is 3x3 padded: kept
    plant(m, "backbone.features.4", "duplicate", 7, src=2)
    res = fold_lossless(m, calib, held, latency=False, progress=False)
    plan = res.report.plan
    assert removed(plan, "backbone.features.0") == {0: "dead"}
    assert removed(plan, "backbone.features.4") == {7: "dependent"}
    assert others_removed(plan, "backbone.features.0", "backbone.features.4") == 0
    assert res.report.max_abs_logit_delta <= 1e-5
    assert res.model.backbone.features[0].out_channels == 15


def test_plan_roundtrip_and_dependent_switch(data, tmp_path):
    calib, held = data
    m = alive(create_model("vgg_tiny", num_classes=3, img_size=IMG))
    plant(m, "backbone.features.0", "dead", 0)
    plant(m, "backbone.features.4", "duplicate", 7, src=2)
    plan = plan_lossless(m, calib, progress=False)
    plan.save(tmp_path / "plan.json")
    again = LosslessPlan.load(tmp_path / "plan.json")
    assert again == plan
    a, b = apply_plan(m, plan), apply_plan(m, again)
    assert max_abs_logit_delta(a, b, held) == 0.0
    only_dead = plan_lossless(m, calib, dependent=False, progress=False)
    assert only_dead.counts()["removed"] == 1 and only_dead.counts()["dead"] == 1
    with pytest.raises(ModelError, match="does not fit this model"):
        apply_plan(create_model("vgg_tiny", num_classes=3, img_size=IMG,
                                cfg=(8, "M", 8)), plan)


def test_verification_refuses_when_calibration_is_unrepresentative(data):
    _, held = data
    m = alive(create_model("densenet_tiny", num_classes=3, img_size=IMG))
    flat = torch.full((64, 1, IMG, IMG), 0.25)  # every channel is constant on blank images
    with pytest.raises(VerificationError, match=r"held-out images \(allowed atol"):
        fold_lossless(m, flat, held, latency=False, progress=False, mode="empirical")
    res = fold_lossless(m, flat, held, latency=False, progress=False, verify=False,
                        mode="empirical")
    assert not res.report.verified and res.report.max_abs_logit_delta > 1e-5
    assert res.report.max_abs_logit_delta_calib < res.report.max_abs_logit_delta


def test_parameter_checks(data):
    calib, held = data
    m = create_model("vgg_tiny", num_classes=3, img_size=IMG)
    with pytest.raises(ConfigError, match="'rank_rtol' parameter of plan_lossless"):
        plan_lossless(m, calib, rank_rtol=2.0, progress=False)
    with pytest.raises(ConfigError, match=r"\[N, C, H, W\]"):
        plan_lossless(m, calib[0], progress=False)


def test_measure_helpers(data):
    calib, held = data
    m = alive(create_model("vgg_tiny", num_classes=3, img_size=IMG))
    plant(m, "backbone.features.0", "dead", 0)
    small = fold_lossless(m, calib, held, latency=True, progress=False).model
    x = held[:1]
    assert count_parameters(small) == sum(p.numel() for p in small.parameters())
    assert count_macs(small, x) < count_macs(m, x)
    # one input channel less in features.4 (16 -> 15) saves exactly 32*15... per position
    conv = m.backbone.features[4]
    saved = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] * (IMG // 2) ** 2
    assert count_macs(m, x) - count_macs(small, x) >= saved
    assert cpu_latency(small, x, batch_size=2, warmup=1, repeats=2) > 0
    assert m.training is False and small.training is False
    m.train()
    max_abs_logit_delta(m, small, held)
    assert m.training is True


# ----------------------------------------------------------------------------- tolerance mode
def test_tolerance_mode_reconstructs_better_than_plain_removal(data):
    import copy

    import numpy as np
    import torch_pruning as tp

    from medscalpel.compress.reconstruct import compress_with_tolerance

    calib, held = data
    m = alive(create_model("vgg_tiny", num_classes=3, img_size=IMG))
    labels = (np.random.default_rng(0).random((len(held), 3)) > 0.5).astype(np.float32)
    res = compress_with_tolerance(m, calib, held, 0.3, heldout_labels=labels, latency=False,
                                  progress=False)
    rep = res.report
    assert 25.0 <= rep.params_removed_pct <= 45.0
    assert rep.params_after == count_parameters(res.model) < rep.params_before
    assert rep.delta_macro_auroc == pytest.approx(rep.macro_auroc_after - rep.macro_auroc_before)
    assert rep.max_abs_logit_delta == pytest.approx(
        max_abs_logit_delta(m, res.model, held), rel=1e-6)
    # plain removal of the same number of channels per layer, without LASSO/refit, is worse
    naive = copy.deepcopy(m)
    graph = build_channel_graph(naive, calib[:1], ignored=[naive.classifier])
    kept = {d["layer"]: d["kept"] for d in rep.layers}
    for cg in graph.groups:
        if kept.get(cg.root, cg.size) < cg.size:
            graph.dg.get_pruning_group(cg.module, tp.prune_conv_out_channels,
                                       idxs=list(range(kept[cg.root], cg.size))).prune()
    assert count_parameters(naive) == rep.params_after
    assert rep.max_abs_logit_delta < 0.5 * max_abs_logit_delta(m, naive, held)
    with pytest.raises(ConfigError, match="'target_ratio' parameter"):
        compress_with_tolerance(m, calib, held, 1.5, progress=False)


# ----------------------------------------------------------------------------- CLI
def _register_test_dataset():
    import numpy as np

    from medscalpel.data import DATASETS, ArrayDataset

    if "lossless_test" in DATASETS:
        return

    @DATASETS.register("lossless_test")
    def _factory(root, split, preprocess, n: int = 48):
        rng = np.random.default_rng(0 if split == "train" else 1)
        imgs = rng.random((n, IMG, IMG)).astype(np.float32)
        labels = (rng.random((n, 3)) > 0.5).astype(np.float32)
        return ArrayDataset(imgs, labels, ["a", "b", "c"], "multilabel", preprocess=preprocess,
                            split=split)


def test_cli_lossless_saves_verified_model_with_lineage(data, tmp_path):
    import json

    import typer
    from typer.testing import CliRunner

    from medscalpel.cli.lossless_cmd import lossless
    from medscalpel.data.transforms import Preprocess
    from medscalpel.models.checkpoint import load_model, make_card, save_model

    _register_test_dataset()
    m = alive(create_model("densenet_tiny", num_classes=3, img_size=IMG))
    plant(m, "backbone.features.denseblock1.denselayer1.conv2", "dead", 1)
    plant(m, "backbone.features.denseblock1.denselayer1.conv2", "duplicate", 5, src=2)
    card = make_card(m, ["a", "b", "c"], "multilabel", Preprocess(size=IMG))
    save_model(m, tmp_path / "dense", card)
    app = typer.Typer()
    app.command()(lossless)
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, [str(tmp_path / "dense"), "lossless_test?n=48", "--out", str(out),
                            "--calib-images", "48", "--heldout-images", "16", "--no-latency"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "lossless" and report["verification"]["exact"]
    ch = report["report"]["channels"]
    assert ch["dead"] >= 1 and ch["dependent"] >= 1
    assert report["verification"]["max_abs_logit_delta"] <= 1e-5
    # accuracy beside the compression: the paired comparison on the held-out images
    assert report["comparison"]["n"] == 16 and abs(report["comparison"]["macro"]["delta_auroc"]) < 1e-6
    assert "macro AUROC" in r.output and "paired bootstrap" in r.output
    small = load_model(out / "model")
    step = small.card.lineage[-1]
    assert step["method"] == "lossless" and step["parent"] == m.card.model_id
    assert step["verification"]["max_abs_logit_delta"] <= 1e-5
    assert small.num_parameters() == report["params_after"] < m.num_parameters()
    x = torch.rand(4, 1, IMG, IMG)
    assert max_abs_logit_delta(small, m, x) <= 1e-5
    # a failing verification saves nothing and says why
    bad = tmp_path / "bad"
    r = runner.invoke(app, [str(tmp_path / "dense"), "lossless_test?n=48", "--out", str(bad),
                            "--calib-images", "2", "--heldout-images", "16", "--no-latency",
                            "--rank-rtol", "0.5", "--mode", "empirical"])
    from medscalpel.errors import VerificationError

    assert r.exit_code != 0 and isinstance(r.exception, VerificationError)
    assert "held-out" in str(r.exception) and "Nothing was saved" in str(r.exception)
    assert not bad.exists()


def test_lasso_design_matrix_is_bounded_over_all_consumers(monkeypatch):
    """A group read by many consumers (a DenseNet transition feeds every layer of the next
    block) shares one row budget: the design matrix stays within ``max_design`` rows."""
    import numpy as np

    from medscalpel.compress.reconstruct import _lasso_order

    seen = {}

    def fake_lasso_path(A, b, alphas, eps):
        seen["shape"] = A.shape
        coefs = np.zeros((A.shape[1], alphas))
        coefs[2, 5:] = 1.0  # channel 2 enters the path first
        coefs[0, 9:] = 1.0
        return None, coefs, None

    import medscalpel.compress.reconstruct as reconstruct

    monkeypatch.setattr(reconstruct, "lasso_path", fake_lasso_path)
    g = torch.Generator().manual_seed(0)
    blocks = [(torch.randn(1000, 4, generator=g, dtype=torch.float64),
               torch.randn(50, 4, generator=g, dtype=torch.float64),
               torch.randn(1000, 50, generator=g, dtype=torch.float64), [0, 1, 2, 3], 1)
              for _ in range(24)]
    order = _lasso_order(blocks, 4, max_design=10_000)
    # at most one extra row (x its 50 outputs) per consumer from the slicing; it was 24x before
    assert seen["shape"][1] == 4 and seen["shape"][0] <= 10_000 + 24 * 50
    assert order[:2] == [2, 0]


def test_ridge_to_prior_falls_back_to_plain_removal_when_rows_are_too_few():
    """Nearly as many columns as rows (late DenseNet blocks at 64 px): an unregularised refit
    interpolates the calibration rows and is far worse than plain removal on new images; the
    held-out choice keeps the refit at least as good as the prior there."""
    from medscalpel.compress.reconstruct import ridge_to_prior

    g = torch.Generator().manual_seed(0)
    d, o, per_img = 120, 6, 4
    w_true = torch.randn(d, o, generator=g, dtype=torch.float64)
    prior = w_true + 0.05 * torch.randn(d, o, generator=g, dtype=torch.float64)

    def sample(n_img):
        X = torch.randn(n_img * per_img, d, generator=g, dtype=torch.float64)
        noise = 2.0 * torch.randn(X.shape[0], o, generator=g, dtype=torch.float64)
        return X, X @ w_true + noise, torch.arange(n_img).repeat_interleave(per_img)

    X, Y, img = sample(32)              # 128 rows for 120 columns
    Xt, Yt, _ = sample(200)             # new images
    sol, alpha, info = ridge_to_prior(X, Y, prior, img)
    naive = torch.linalg.solve(X.T @ X + 1e-6 * torch.eye(d, dtype=X.dtype), X.T @ Y)

    def err(w):
        return float((Xt @ w - Yt).pow(2).mean())

    assert err(naive) > 5 * err(prior)  # the defect this guards against
    assert err(sol) <= 1.05 * err(prior)
    assert info["heldout_mse"] <= info["heldout_mse_prior"]
    if alpha is None:
        assert torch.equal(sol, prior)


def test_ridge_to_prior_recovers_an_exact_linear_map_when_rows_suffice():
    from medscalpel.compress.reconstruct import RIDGE_ALPHAS, ridge_to_prior

    g = torch.Generator().manual_seed(1)
    X = torch.randn(2000, 30, generator=g, dtype=torch.float64)
    X[:, 3] *= 1e3  # badly scaled column: the ridge works on scaled columns
    w = torch.randn(30, 4, generator=g, dtype=torch.float64)
    sol, alpha, info = ridge_to_prior(X, X @ w, torch.zeros(30, 4, dtype=torch.float64),
                                      torch.arange(2000) // 10)
    assert alpha == min(RIDGE_ALPHAS)
    assert float((X @ sol - X @ w).abs().max()) < 1e-5
    assert info["heldout_mse"] < 1e-6 * info["heldout_mse_prior"]


def test_cli_tolerance_mode_saves_model_with_lineage_and_refit_counts(tmp_path):
    import json

    import typer
    from typer.testing import CliRunner

    from medscalpel.cli.lossless_cmd import lossless
    from medscalpel.data.transforms import Preprocess
    from medscalpel.models.checkpoint import load_model, make_card, save_model

    _register_test_dataset()
    m = alive(create_model("densenet_tiny", num_classes=3, img_size=IMG))
    save_model(m, tmp_path / "dense", make_card(m, ["a", "b", "c"], "multilabel",
                                                Preprocess(size=IMG)))
    app = typer.Typer()
    app.command()(lossless)
    out = tmp_path / "tol"
    r = CliRunner().invoke(app, [str(tmp_path / "dense"), "lossless_test?n=48", "--out",
                                 str(out), "--tolerance", "0.3", "--calib-images", "48",
                                 "--heldout-images", "16", "--no-latency"])
    assert r.exit_code == 0, r.output
    top = json.loads((out / "report.json").read_text())
    report = top["report"]
    assert top["method"] == "tolerance" and not top["verification"]["exact"]
    assert 0 < report["refits"] and 0 <= report["refits_plain_removal"] <= report["refits"]
    assert f"of {report['refits']} consumer refits beat plain removal" in r.output
    small = load_model(out / "model")
    step = small.card.lineage[-1]
    assert step["method"] == "tolerance" and step["parent"] == m.card.model_id
    assert step["refits"] == report["refits"]
    assert abs(report["achieved_ratio"] - 0.3) < 0.05
    assert small.num_parameters() == report["params_after"]
    assert step["verification"]["max_abs_logit_delta"] == report["max_abs_logit_delta"] > 0
    with torch.no_grad():
        assert small.eval()(torch.rand(4, 1, IMG, IMG)).shape == (4, 3)
