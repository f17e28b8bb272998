"""Provable (data-free) lossless folding: channels planted at the weight level (zero filters,
BatchNorm scale 0, duplicated and positively scaled filters with matching BatchNorms) are found
from the weights alone in DenseNet, ResNet and VGG, removed, and the logits stay within 1e-5 on
random inputs far outside the calibration distribution; nothing is found where nothing was
planted; sparsify -> provable fold removes the zeroed channels exactly; the tolerance mode hits
its target ratio."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from medscalpel.compress.graph import ParamCounter, build_channel_graph
from medscalpel.compress.lossless import fold_lossless
from medscalpel.compress.measure import count_parameters, max_abs_logit_delta
from medscalpel.compress.provable import channel_facts, plan_provable, random_inputs
from medscalpel.models.zoo import create_model

from test_lossless import IMG, alive, plant, removed  # noqa: E402

EX = torch.zeros(1, 1, IMG, IMG)


def wide_inputs(n: int = 48, seed: int = 3) -> torch.Tensor:
    """Random inputs from a wide range: uniform [-9, 9], Gaussian with std 4, and smooth."""
    g = torch.Generator().manual_seed(seed)
    a = -9 + 18 * torch.rand(n // 3, 1, IMG, IMG, generator=g)
    b = 4 * torch.randn(n // 3, 1, IMG, IMG, generator=g)
    c = random_inputs((1, 1, IMG, IMG), n - 2 * (n // 3), -3.0, 3.0, seed=seed)
    return torch.cat([a, b, c])


def _group_items(model: nn.Module, layer: str, idxs: list[int]):
    import torch_pruning as tp

    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=EX)
    return dg.get_pruning_group(model.get_submodule(layer), tp.prune_conv_out_channels,
                                idxs=idxs)


@torch.no_grad()
def plant_scaled(model: nn.Module, layer: str, ch: int, src: int, s: float) -> None:
    """Channel ``ch`` := ``s`` times channel ``src`` (s > 0) at the weight level: the producer
    filter (and bias) scaled, and every tied BatchNorm given the same scale/variance and a
    scaled mean and shift, so that the post-ReLU channels are exactly proportional."""
    import torch_pruning as tp

    for item in _group_items(model, layer, [src, ch]):
        mod, (i, j) = item.dep.target.module, [int(k) for k in item.idxs]
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight[j], mod.running_var[j] = mod.weight[i], mod.running_var[i]
            mod.running_mean[j], mod.bias[j] = s * mod.running_mean[i], s * mod.bias[i]
        elif isinstance(mod, nn.Conv2d) and item.dep.handler == tp.prune_conv_out_channels:
            mod.weight[j] = s * mod.weight[i]
            if mod.bias is not None:
                mod.bias[j] = s * mod.bias[i]


@torch.no_grad()
def plant_zero_filter(model: nn.Module, layer: str, ch: int, dead: bool) -> None:
    """Producer filter of channel ``ch`` all zero (bias, if any, -0.5); with ``dead`` the
    producer's own BatchNorm maps that constant to a negative value (dead after the ReLU),
    otherwise every tied BatchNorm maps 0 to a positive value (a constant channel)."""
    conv = model.get_submodule(layer)
    conv.weight[ch] = 0.0
    if conv.bias is not None:
        conv.bias[ch] = -0.5
    if dead:
        bn = next(item.dep.target.module for item in _group_items(model, layer, [ch])
                  if isinstance(item.dep.target.module, nn.BatchNorm2d))
        bn.running_mean[ch] = 0.0
        bn.bias[ch] = -0.2
        bn.weight[ch] = abs(float(bn.weight[ch]))
    else:
        for item in _group_items(model, layer, [ch]):
            bn = item.dep.target.module
            if isinstance(bn, nn.BatchNorm2d):
                j = int(item.idxs[0])
                bn.running_mean[j] = 0.0
                bn.bias[j] = abs(float(bn.bias[j])) + 0.1


def _check_fold(m: nn.Module, expect: dict[str, dict[int, str]]):
    res = fold_lossless(m, None, None, input_shape=(1, 1, IMG, IMG), latency=False,
                        progress=False)
    plan = res.report.plan
    for layer, want in expect.items():
        assert removed(plan, layer) == want, (layer, removed(plan, layer))
    assert plan.removed_channels == sum(len(v) for v in expect.values())
    assert res.report.mode == "provable" and res.report.guarantee.startswith("provable")
    assert res.report.n_random == 64 and res.report.max_abs_logit_delta_random <= 1e-5
    x = wide_inputs()
    assert max_abs_logit_delta(m, res.model, x) <= 1e-5
    assert count_parameters(res.model) == res.report.params_after < res.report.params_before
    return res


def test_random_init_models_have_nothing_provable():
    for arch in ("densenet_tiny", "resnet_tiny", "vgg_tiny"):
        torch.manual_seed(0)
        for m in (create_model(arch, num_classes=3, img_size=IMG),
                  alive(create_model(arch, num_classes=3, img_size=IMG))):
            plan = plan_provable(m, EX, progress=False)
            assert plan.removed_channels == 0, (arch, plan.counts())
            assert plan.settings["mode"] == "provable" and plan.n_calib == 0


def test_densenet_weight_level_plants():
    m = alive(create_model("densenet_tiny", num_classes=3, img_size=IMG))
    stored = "backbone.features.denseblock1.denselayer2.conv2"   # concatenated, no own BN
    bottleneck = "backbone.features.denseblock2.denselayer1.conv1"  # read by a padded 3x3
    trans = "backbone.features.transition2.conv"                 # avg-pooled, concatenated
    plant_scaled(m, stored, 6, 1, 2.5)                   # proportional through 4 consumer BNs
    plant_zero_filter(m, stored, 3, dead=False)          # raw 0 -> relu(BN_k(0)) > 0: constant
    plant_scaled(m, bottleneck, 9, 4, 0.37)              # duplicate read by a padded conv
    plant_zero_filter(m, bottleneck, 2, dead=True)       # dead behind its own BN
    plant(m, bottleneck, "constant", 5)                  # constant into a padded conv: KEPT
    plant(m, trans, "dead", 7)                           # BN scale 0, shift < 0 everywhere
    _check_fold(m, {stored: {3: "constant", 6: "dependent"},
                    bottleneck: {2: "dead", 9: "dependent"}, trans: {7: "dead"}})


def test_resnet_weight_level_plants():
    m = alive(create_model("resnet_tiny", num_classes=3, img_size=IMG))
    graph = build_channel_graph(m, EX, ignored=[m.classifier])
    roots = [g.root for g in graph.groups]
    stream2 = next(r for r in roots if r in ("backbone.layer2.0.conv2",
                                              "backbone.layer2.0.downsample.0"))
    inner = "backbone.layer3.0.conv1"
    plant(m, stream2, "dead", 4)             # dead in both adds of the stage's stream
    plant(m, stream2, "constant", 9)         # constant stream channel, read by a padded conv
    plant_scaled(m, inner, 11, 3, 1.75)
    plant_zero_filter(m, inner, 0, dead=True)
    _check_fold(m, {stream2: {4: "dead"}, inner: {0: "dead", 11: "dependent"}})


def test_vgg_weight_level_plants():
    m = alive(create_model("vgg_tiny", num_classes=3, img_size=IMG))
    plant_zero_filter(m, "backbone.features.4", 5, dead=True)   # conv with bias
    plant_scaled(m, "backbone.features.4", 20, 2, 3.0)
    plant_scaled(m, "backbone.features.15", 40, 8, 0.5)         # last conv: read by classifier
    plant(m, "backbone.features.15", "constant", 41)            # folded into the classifier
    plant(m, "backbone.features.8", "constant", 1)              # into a padded conv: kept ...
    plant(m, "backbone.features.8", "constant", 2, value=1.3)   # ... unless another constant
    _check_fold(m, {"backbone.features.4": {5: "dead", 20: "dependent"},
                    "backbone.features.15": {40: "dependent", 41: "constant"},
                    "backbone.features.8": {2: "constant"}})


def test_facts_follow_the_rules():
    m = alive(create_model("vgg_tiny", num_classes=3, img_size=IMG))
    plant_scaled(m, "backbone.features.0", 3, 1, 2.0)
    plant(m, "backbone.features.0", "constant", 5, value=0.25)
    facts = channel_facts(m, EX)
    f = facts["backbone.features.4"]          # after BN, ReLU, max-pool
    assert f.sid[3] == f.sid[1] and f.t[3] == pytest.approx(2.0 * f.t[1])
    assert f.t[5] == 0.0 and f.c[5] == pytest.approx(0.25)
    others = [k for k in range(len(f)) if k not in (1, 3, 5)]
    assert len(set(f.sid[others].tolist()) | {f.sid[1]}) == len(others) + 1
    # the classifier reads the pooled last map: one fact per feature
    assert len(facts["classifier"]) == m.classifier.in_features


def test_weight_rtol_zero_demands_exact_proportion():
    m = alive(create_model("vgg_tiny", num_classes=3, img_size=IMG))
    plant_scaled(m, "backbone.features.4", 20, 2, 3.0)
    with torch.no_grad():
        m.backbone.features[4].weight[20, 0, 0, 0] += 1e-3
    assert plan_provable(m, EX, progress=False).removed_channels == 0
    assert plan_provable(m, EX, weight_rtol=0.5, progress=False).removed_channels == 1


def test_empirical_report_says_empirical_and_reports_random_delta():
    g = torch.Generator().manual_seed(1)
    calib, held = torch.randn(64, 1, IMG, IMG, generator=g), torch.randn(16, 1, IMG, IMG,
                                                                          generator=g)
    m = alive(create_model("vgg_tiny", num_classes=3, img_size=IMG))
    plant(m, "backbone.features.0", "dead", 0)
    res = fold_lossless(m, calib, held, mode="empirical", latency=False, progress=False)
    rep = res.report
    assert rep.mode == "empirical" and rep.guarantee.startswith("empirical")
    assert "not a proof" in rep.guarantee
    assert rep.n_heldout == 16 and rep.n_calib == 64
    assert rep.max_abs_logit_delta_random is not None and rep.n_random == 64
    d = rep.to_dict()
    assert d["mode"] == "empirical" and json.dumps(d)
    from medscalpel.errors import ConfigError

    with pytest.raises(ConfigError, match="needs calibration images"):
        fold_lossless(m, None, held, mode="empirical", progress=False)
    with pytest.raises(ConfigError, match="'mode' parameter of fold_lossless"):
        fold_lossless(m, calib, held, mode="exact", progress=False)
    with pytest.raises(ConfigError, match="input shape"):
        fold_lossless(m, progress=False)


# ----------------------------------------------------------------------------- sparsify
def _toy(n: int, seed: int, task: str = "multiclass"):
    from medscalpel.data import ArrayDataset
    from medscalpel.data.transforms import Preprocess

    rng = np.random.default_rng(seed)
    imgs = (rng.random((n, IMG, IMG)) * 0.5).astype(np.float32)
    y = rng.integers(0, 2, n)
    for i in np.nonzero(y)[0]:
        r, c = rng.integers(4, 20, 2)
        imgs[i, r:r + 8, c:c + 8] += 0.5
    return ArrayDataset(imgs, y.astype(np.int64), ["neg", "pos"], task,
                        preprocess=Preprocess(size=IMG))


def test_sparsify_then_provable_fold_removes_zeroed_channels_exactly():
    from medscalpel.compress.sparsify import sparsify_and_fold, sparsify_channels

    tr, va = _toy(64, 0), _toy(32, 1)
    torch.manual_seed(0)
    dense = create_model("densenet_tiny", num_classes=2, img_size=IMG)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    held = torch.stack([va[i][0] for i in range(24)])
    res = sparsify_and_fold(dense, tr, va, held, target_ratio=0.4, epochs=2, batch_size=32,
                            latency=False, progress=False)
    rep = res.report
    sp = rep.sparsify
    assert sp.channels_zeroed > 0 and abs(sp.removable_ratio - 0.4) < 0.03
    # every zeroed channel is provably removable: the fold removes at least those
    assert rep.lossless.channels["removed"] >= sp.channels_zeroed
    assert rep.params_folded <= sp.params_after_removal + 64      # + biases created by folding
    assert rep.max_abs_logit_delta_fold <= 1e-5
    assert max_abs_logit_delta(res.sparse_model, res.model, wide_inputs()) <= 1e-5
    assert rep.metrics_sparse == rep.metrics_folded            # the fold changes nothing
    assert set(rep.metrics_dense) == {"accuracy", "macro_auroc", "n"}
    assert 30.0 < rep.params_removed_pct < 45.0
    json.dumps(rep.to_dict())
    # BN scales of zeroed channels are exactly zero; the dense model was not changed
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    zero = sum(int((mod.weight == 0).sum()) for mod in res.sparse_model.modules()
               if isinstance(mod, nn.BatchNorm2d))
    assert zero >= sp.channels_zeroed
    from medscalpel.errors import ConfigError

    with pytest.raises(ConfigError, match="'target_ratio' parameter of sparsify_channels"):
        sparsify_channels(dense, tr, None, target_ratio=1.0)


def test_param_counter_and_tolerance_ratio_hits_target():
    import copy

    import torch_pruning as tp

    from medscalpel.compress.reconstruct import allocate_keep, compress_with_tolerance

    m = alive(create_model("densenet_tiny", num_classes=3, img_size=IMG))
    graph = build_channel_graph(m, EX, ignored=[m.classifier])
    pc = ParamCounter(m, graph)
    keep = {g.index: max(1, g.size - 1 - (g.index * 3) % g.size) for g in graph.groups}
    pruned = copy.deepcopy(m)
    pg = build_channel_graph(pruned, EX, ignored=[pruned.classifier])
    for g in pg.groups:
        if keep[g.index] < g.size:
            pg.dg.get_pruning_group(g.module, tp.prune_conv_out_channels,
                                    idxs=list(range(keep[g.index], g.size))).prune()
    assert pc.count(keep) == count_parameters(pruned)
    for ratio in (0.3, 0.5):
        counts, total, predicted = allocate_keep(m, EX, ratio)
        assert abs((total - predicted) / total - ratio) < 0.01
    g = torch.Generator().manual_seed(1)
    calib, held = torch.randn(48, 1, IMG, IMG, generator=g), torch.randn(8, 1, IMG, IMG,
                                                                         generator=g)
    rep = compress_with_tolerance(m, calib, held, 0.3, latency=False, progress=False).report
    assert abs(rep.achieved_ratio - 0.3) <= 0.03, rep.achieved_ratio
    assert rep.params_removed_pct == pytest.approx(100 * rep.achieved_ratio)


def test_cli_sparsify_ratio_and_empirical_mode(tmp_path):
    import typer
    from typer.testing import CliRunner

    from medscalpel.cli.lossless_cmd import lossless
    from medscalpel.models.checkpoint import load_model, make_card, save_model
    from medscalpel.data.transforms import Preprocess
    from test_lossless import _register_test_dataset

    _register_test_dataset()
    torch.manual_seed(0)
    m = alive(create_model("vgg_tiny", num_classes=3, img_size=IMG))
    save_model(m, tmp_path / "dense", make_card(m, ["a", "b", "c"], "multilabel",
                                                Preprocess(size=IMG)))
    app = typer.Typer()
    app.command()(lossless)
    runner = CliRunner()
    r = runner.invoke(app, [str(tmp_path / "dense"), "lossless_test?n=48", "--out",
                            str(tmp_path / "sp"), "--sparsify-ratio", "0.3",
                            "--sparsify-epochs", "1", "--batch-size", "16", "--no-latency"])
    assert r.exit_code == 0, r.output
    top = json.loads((tmp_path / "sp" / "report.json").read_text())
    report = top["report"]
    assert top["method"] == "sparsify-fold" and top["verification"]["max_abs_logit_delta"] <= 1e-5
    assert report["max_abs_logit_delta_fold"] <= 1e-5
    assert report["lossless"]["mode"] == "provable"
    small = load_model(tmp_path / "sp" / "model")
    step = small.card.lineage[-1]
    assert step["method"] == "sparsify-fold" and step["target_ratio"] == 0.3
    assert small.num_parameters() == report["params_folded"] < m.num_parameters()
    r = runner.invoke(app, [str(tmp_path / "dense"), "lossless_test?n=48", "--out",
                            str(tmp_path / "emp"), "--mode", "empirical", "--no-latency"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "emp" / "report.json").read_text())["report"]
    assert rep["mode"] == "empirical" and "empirical" in rep["guarantee"]
    assert rep["n_heldout"] == 48      # the whole split when smaller than --heldout-images
    assert load_model(tmp_path / "emp" / "model").card.lineage[-1]["method"] == \
        "lossless-empirical"
