"""Structured pruning on Torch-Pruning graphs: shapes, reload, concatenation mapping, lineage."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from medscalpel.compress.importance import IMPORTANCE, ScoresCriterion
from medscalpel.compress.structured import (RecoveryConfig, prune_structured, remove_channels)
from medscalpel.data import ArrayDataset, Preprocess
from medscalpel.errors import ConfigError, ModelError
from medscalpel.models.checkpoint import load_model, make_card
from medscalpel.models.zoo import create_model

HAS_RELEVANCE = importlib.util.find_spec("medscalpel.explain.relevance") is not None
CRITERIA = ["l1", "bn_scale", "taylor"] + (["lrp"] if HAS_RELEVANCE else [])


def _model(arch, k=3):
    torch.manual_seed(0)
    m = create_model(arch, k, img_size=32)
    m.card = make_card(m, ["a", "b", "c"][:k], "multilabel", Preprocess(size=32))
    return m


def _ds(n=16, seed=0, split="train"):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 3)) > 0.5).astype(np.float32)
    labels[0], labels[1] = 1, 0
    return ArrayDataset(rng.random((n, 32, 32)).astype(np.float32), labels, ["a", "b", "c"],
                        "multilabel", preprocess=Preprocess(size=32), split=split)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("arch", ["densenet_tiny", "resnet_tiny", "vgg_tiny"])
def test_prune_shapes_params_and_reload(arch, criterion, tmp_path):
    m = _model(arch)
    x = torch.randn(6, 1, 32, 32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = prune_structured(m, x, criterion, ratio=0.5, iterative_steps=2,
                           measure_latency=False, progress=False)
    p = res.model
    assert p(x).shape == (6, 3)  # classifier outputs never pruned
    assert p.classifier.in_features == p.backbone(x).shape[1] < m.classifier.in_features
    assert res.params_after < 0.6 * res.params_before
    assert res.params_after == sum(t.numel() for t in p.parameters())
    assert res.speedup_macs > 1.5 and len(res.steps) == 2 and res.layers
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # caller untouched
    step = p.card.lineage[-1]
    assert step["method"] == "prune_structured" and step["parent"] == m.card.model_id
    assert step["criterion"] == criterion and step["params_after"] == res.params_after
    out = res.save(tmp_path / "pruned")
    q = load_model(out)
    with torch.no_grad():
        assert torch.equal(p.eval()(x), q(x))
    assert q.card.lineage[-1]["macs_after"] == res.macs_after
    assert (out / "prune.json").is_file()


def test_densenet_concat_mapping_removes_the_right_channel():
    """A channel that no consumer reads can be removed without changing the logits: checks that
    the concatenation index mapping removes exactly that channel everywhere."""
    m = _model("densenet_tiny").eval()
    f = m.backbone.features
    c = 5
    off = f.denseblock1.denselayer1.conv1.in_channels + c  # position in the concatenation
    with torch.no_grad():
        f.denseblock1.denselayer2.conv1.weight[:, off] = 0
        f.transition1.conv.weight[:, off] = 0
    x = torch.randn(4, 1, 32, 32)
    name = "backbone.features.denseblock1.denselayer1.conv2"
    p = remove_channels(m, {name: [c]}, x)
    assert p.get_submodule(name).out_channels == 7
    assert p.backbone.features.transition1.conv.in_channels == f.transition1.conv.in_channels - 1
    with torch.no_grad():
        assert (p(x) - m(x)).abs().max() < 1e-5
        # removing a channel that *is* read changes the output
        q = remove_channels(m, {name: [c + 1]}, x)
        assert (q(x) - m(x)).abs().max() > 1e-4


def test_scores_criterion_prunes_lowest_channels():
    m = _model("vgg_tiny")
    first = "backbone.features.0"
    scores = {first: torch.arange(16, dtype=torch.float32)}
    res = prune_structured(m, torch.randn(4, 1, 32, 32), scores, ratio=0.25,
                           measure_latency=False, progress=False)
    w = res.model.get_submodule(first).weight
    assert torch.equal(w, m.get_submodule(first).weight[4:])
    assert res.criterion["scored_groups"] >= 1 and res.criterion["fallback_groups"] >= 1
    with pytest.raises(ModelError, match="output channels"):
        prune_structured(m, torch.randn(4, 1, 32, 32), {first: torch.ones(5)}, ratio=0.25,
                         measure_latency=False, progress=False)


def test_dry_run_plans_without_changing():
    m = _model("resnet_tiny")
    n0 = m.num_parameters()
    res = prune_structured(m, torch.randn(4, 1, 32, 32), "l2", ratio=0.3, global_pruning=True,
                           dry_run=True, progress=False)
    assert res.model is None and res.dry_run and res.latency is None
    assert m.num_parameters() == n0
    assert sum(v["removed"] for v in res.layers.values()) > 0
    assert "classifier" not in res.layers
    with pytest.raises(ModelError, match="dry run"):
        res.save("unused")


def test_target_speedup_search():
    m = _model("vgg_tiny")
    res = prune_structured(m, torch.randn(4, 1, 32, 32), "l1", target_speedup=2.0,
                           progress=False)
    assert 2.0 <= res.speedup_macs < 2.3
    assert 0 < res.ratio < 0.9 and res.lineage["ratio_search"]
    assert res.latency is not None and res.latency["ratio"] > 0


def test_iterative_recovery_with_distillation():
    m = _model("resnet_tiny")
    rec = RecoveryConfig(epochs=2, lr=1e-3, distill_from_dense=True, soft_weight=0.5, T=2.0,
                         batch_size=8, device="cpu")
    res = prune_structured(m, torch.randn(8, 1, 32, 32), "taylor", ratio=0.4, iterative_steps=2,
                           recovery=rec, train_ds=_ds(), val_ds=_ds(seed=1, split="val"),
                           measure_latency=False, progress=False)
    assert [s["recovery"]["epochs"] for s in res.steps] == [1, 1]
    assert all(s["recovery"]["distilled"] for s in res.steps)
    assert np.isfinite(res.steps[-1]["recovery"]["history"][-1]["train_loss"])
    assert res.model.card.lineage[-1]["recovery"]["distill_from_dense"] is True


def test_prune_errors():
    m = _model("vgg_tiny")
    x = torch.randn(4, 1, 32, 32)
    with pytest.raises(ConfigError, match="'ratio' parameter of prune_structured"):
        prune_structured(m, x, "l1", ratio=1.0, progress=False)
    with pytest.raises(ConfigError, match="not both"):
        prune_structured(m, x, "l1", ratio=0.5, target_speedup=2.0, progress=False)
    with pytest.raises(ConfigError, match="Unknown pruning criterion 'l3'. Valid names"):
        prune_structured(m, x, "l3", progress=False)
    with pytest.raises(ConfigError, match="needs a 'train_ds'"):
        prune_structured(m, x, "l1", recovery=RecoveryConfig(epochs=1), progress=False)
    with pytest.raises(ConfigError, match="calib_images"):
        prune_structured(m, torch.randn(1, 32, 32), "l1", progress=False)
    with pytest.raises(ConfigError, match="cannot be reached"):
        prune_structured(m, x, "l1", target_speedup=1000.0, progress=False)
    with pytest.raises(ConfigError, match="ignored_layers"):
        prune_structured(m, x, "l1", ignored_layers=["backbone.nope"], progress=False)
    with pytest.raises(ModelError, match="classifier"):
        remove_channels(m, {"classifier": [0]}, x)
    with pytest.raises(ModelError, match="out of range"):
        remove_channels(m, {"backbone.features.0": [99]}, x)


def test_ignored_layers_are_kept():
    m = _model("vgg_tiny")
    res = prune_structured(m, torch.randn(4, 1, 32, 32), "l1", ratio=0.5,
                           ignored_layers=["backbone.features.0"], measure_latency=False,
                           progress=False)
    assert res.model.backbone.features[0].out_channels == 16
    assert res.model.backbone.features[4].out_channels == 16  # 32 -> 16


def test_registry_lists_all_criteria():
    assert set(IMPORTANCE.names()) == {"l1", "l2", "bn_scale", "taylor", "lrp", "ig",
                                       "backtrace"}
    with pytest.raises(ConfigError, match="non-empty"):
        ScoresCriterion({})


# ----------------------------------------------------------------------------- round_to / latency
def test_rounded_width_keeps_a_nonzero_multiple():
    from medscalpel.compress.structured.channels import _rounded_pruned

    # Torch-Pruning floors the kept width: 128 channels at 90% kept 13 -> 0 -> group skipped
    assert _rounded_pruned(115, 128, 16) == 112  # keeps 16
    assert _rounded_pruned(29, 32, 16) == 16  # a DenseNet growth slice keeps 16 of 32
    assert _rounded_pruned(10, 32, 16) == 16  # 22 kept rounds to the nearest multiple: 16
    assert _rounded_pruned(5, 8, 16) == 0  # narrower than round_to: left alone
    assert _rounded_pruned(3, 48, 16) == 0  # 45 kept -> 48: nothing to prune


def test_round_to_on_densenet_concatenation_groups():
    m = _model("densenet_tiny")
    x = torch.randn(4, 1, 32, 32)
    plain = prune_structured(m, x, "l1", ratio=0.9, measure_latency=False, progress=False)
    res = prune_structured(m, x, "l1", ratio=0.9, round_to=8, measure_latency=False,
                           progress=False)
    before = {n: mod.out_channels for n, mod in m.named_modules()
              if isinstance(mod, torch.nn.Conv2d)}
    after = {n: mod.out_channels for n, mod in res.model.named_modules()
             if isinstance(mod, torch.nn.Conv2d)}
    pruned = [n for n in after if after[n] != before[n]]
    assert len(pruned) >= len(before) // 2  # the concat groups are pruned, not skipped
    assert all(after[n] % 8 == 0 and after[n] >= 8 for n in pruned)
    # every concatenation's width (a dense layer's conv1 input) is a multiple of 8 too
    assert all(mod.in_channels % 8 == 0 for n, mod in res.model.named_modules()
               if n.endswith("conv1") and isinstance(mod, torch.nn.Conv2d))
    assert res.speedup_macs > 1.8 and plain.speedup_macs > res.speedup_macs
    out = res.model(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 3)
    # the target-speedup search works with rounding on DenseNet (it used to raise)
    tgt = prune_structured(m, x, "l1", target_speedup=2.0, round_to=8, measure_latency=False,
                           progress=False)
    assert tgt.speedup_macs >= 2.0


def test_measured_latency_search_on_onnxruntime():
    torch.manual_seed(0)
    m = create_model("vgg_tiny", 2, img_size=64)
    x = torch.randn(4, 1, 64, 64)
    res = prune_structured(m, x, "l1", target_speedup_measured=1.5, runtime="onnxruntime:fp32",
                           progress=False)
    trace = res.lineage["ratio_search"]
    assert len(trace) == 7 and all(t["ms"] > 0 and t["dense_ms"] > 0 for t in trace)
    assert 0 < res.ratio <= 0.9 and res.lineage["round_to"] in (8, 16)
    assert all(mod.out_channels % res.lineage["round_to"] == 0
               for mod in res.model.modules() if isinstance(mod, torch.nn.Conv2d))
    assert res.latency["runtime"] == "onnxruntime:fp32"
    assert res.latency["runtime_ratio"] > 1.1  # loose: the machine is shared
    with pytest.raises(ConfigError, match="cannot be reached"):
        prune_structured(m, x, "l1", target_latency_ms=1e-6, progress=False)
    with pytest.raises(ConfigError, match="Unknown deployment runtime 'tensorrt:fp32'"):
        prune_structured(m, x, "l1", target_latency_ms=1.0, runtime="tensorrt:fp32",
                         progress=False)
