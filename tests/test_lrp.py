"""LRP through DenseNet concatenations, ResNet additions and VGG: conservation, canonizers,
channel relevance, model hygiene."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medscalpel.errors import ConfigError, ModelError
from medscalpel.explain.canonizers import ChannelAffine, DenseNetCanonizer, canonizers_for
from medscalpel.explain.lrp import LRPSession, lrp
from medscalpel.explain.relevance import channel_relevance
from medscalpel.models.zoo import create_model

ARCHS = ["densenet_tiny", "resnet_tiny", "vgg_tiny"]


def randomise_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial eval-mode BN statistics (fresh models have mean 0 / var 1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def tiny(arch: str, k: int = 3) -> nn.Module:
    return randomise_bn(create_model(arch, num_classes=k, img_size=32))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


# measured on these seeds (docs/explain_attributions.md); tolerance on |relative delta|
CONSERVING = {
    ("densenet_tiny", "epsilon_gamma_box"): 1e-3,
    ("densenet_tiny", "epsilon_plus_flat"): 5e-2,
    ("resnet_tiny", "epsilon_plus_flat"): 1e-3,
    ("vgg_tiny", "epsilon_plus_flat"): 1e-3,
    ("vgg_tiny", "epsilon_gamma_box"): 1e-3,
}


@pytest.mark.parametrize("arch,composite", sorted(CONSERVING))
def test_conservation_input_relevance_sums_to_logit(arch, composite):
    m = tiny(arch)
    x = torch.randn(4, 1, 32, 32)
    res = lrp(m, x, target=torch.tensor([0, 1, 2, 1]), composite=composite, zero_bias=True)
    logit = m(x).gather(1, torch.tensor([[0], [1], [2], [1]])).squeeze(1)
    assert torch.allclose(res.output, logit.detach(), atol=1e-5)
    assert res.delta.abs().max() < CONSERVING[(arch, composite)], res.delta
    # the canonized copy (BN folded, BN-after-concat as affine) reproduces the logits
    assert res.settings["canonizer_max_abs_diff"] < 1e-5
    assert res.attribution.shape == x.shape


def test_bias_absorbs_relevance_without_zero_bias():
    m = tiny("vgg_tiny")
    x = torch.randn(2, 1, 32, 32)
    with_bias = lrp(m, x, target=0)
    without = lrp(m, x, target=0, zero_bias=True)
    # biases (BN shifts folded into convs) take a share: conservation visibly breaks
    assert with_bias.delta.abs().min() > 10 * without.delta.abs().max()


def test_resnet_needs_its_sum_canonizer():
    """Negative control: without the residual Sum canonizer relevance is duplicated."""
    m = tiny("resnet_tiny")
    x = torch.randn(3, 1, 32, 32)
    ok = lrp(m, x, target=1, zero_bias=True)
    bad = lrp(m, x, target=1, zero_bias=True, canonize=False)
    assert ok.delta.abs().max() < 1e-3
    assert bad.delta.abs().max() > 0.1


def test_densenet_canonizer_plan_and_restore():
    m = tiny("densenet_tiny")
    merge, affine = DenseNetCanonizer.plan(m)
    assert ("backbone.features.conv0", "backbone.features.norm0") in merge
    assert ("backbone.features.denseblock1.denselayer1.conv1",
            "backbone.features.denseblock1.denselayer1.norm2") in merge
    assert "backbone.features.norm5" in affine
    assert "backbone.features.transition1.norm" in affine
    assert "backbone.features.denseblock2.denselayer2.norm1" in affine
    # one BN per layer, each handled exactly once
    n_bn = sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert len(merge) + len(affine) == n_bn
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 1, 32, 32)
    ref = m(x)
    handles = []
    for c in canonizers_for(m):
        handles += c.apply(m)
    assert isinstance(m.get_submodule("backbone.features.norm5"), ChannelAffine)
    assert isinstance(m.get_submodule("backbone.features.norm0"), nn.Identity)
    assert torch.allclose(m(x), ref, atol=1e-5)   # exact rewrite
    for h in reversed(handles):
        h.remove()
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(m.get_submodule("backbone.features.norm5"), nn.BatchNorm2d)


def test_relevance_conserved_at_a_cut_after_concatenation():
    """Everything after transition1 reads only its output: the relevance there sums to f_t."""
    m = tiny("densenet_tiny")
    x = torch.randn(3, 1, 32, 32)
    layer = "backbone.features.transition1.conv"
    with LRPSession(m, composite="epsilon_gamma_box", zero_bias=True, low=-4.0, high=4.0) as s:
        rel, logit, cap = s.relevance(x, torch.tensor([2, 2, 2]), capture=[layer])
    at_cut = cap[layer].flatten(1).sum(1)
    assert torch.allclose(at_cut, logit, rtol=1e-3, atol=1e-5)
    assert torch.allclose(rel.flatten(1).sum(1), logit, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_callers_model_is_unchanged(arch):
    m = tiny(arch)
    m.train()   # a train-mode caller: LRP must use eval statistics on a copy, then leave m as is
    before = {k: v.clone() for k, v in m.state_dict().items()}
    n_hooks = hook_count(m)
    lrp(m, torch.randn(2, 1, 32, 32), target=0)
    channel_relevance(m, torch.randn(2, 1, 32, 32), targets=0, method="lrp", progress=False)
    assert m.training and all(mod.training for mod in m.modules())
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # BN stats untouched too
    assert hook_count(m) == n_hooks == 0
    relus = [mod for mod in m.modules() if isinstance(mod, nn.ReLU)]
    assert any(r.inplace for r in relus) == (arch != "vgg_tiny")  # in-place flags restored


def _planted_channel_densenet(channel: int = 5) -> nn.Module:
    m = tiny("densenet_tiny", k=2)
    with torch.no_grad():
        m.classifier.weight.zero_()
        m.classifier.weight[1, channel] = 3.0
        m.classifier.bias.zero_()
        m.backbone.features.norm5.bias[channel] = 3.0   # keep the channel alive after the ReLU
    return m


@pytest.mark.parametrize("method", ["lrp", "ig", "taylor"])
def test_channel_relevance_finds_planted_channel_after_concat(method):
    """Only channel 5 of norm5 (BN after the last concatenation) reaches logit 1."""
    m = _planted_channel_densenet(5)
    x = torch.randn(6, 1, 32, 32)
    layer = "backbone.features.norm5"
    cr = channel_relevance(m, x, targets=1, method=method, layers=[layer], batch_size=34,
                           progress=False, n_steps=8)
    s = cr.scores[layer]
    assert cr.raw_scores[layer][5] > 0
    assert cr.ranking(layer)[0] == 5
    assert s[5] > 0.99 * s.sum()
    assert cr.n_pairs == 6 and cr.class_counts == {1: 6}


def test_channel_relevance_lrp_defaults_cover_conv_and_bn():
    m = tiny("resnet_tiny")
    cr = channel_relevance(m, torch.randn(3, 1, 32, 32), targets=None, method="lrp",
                           batch_size=4, progress=False)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d))]
    assert list(cr.scores) == convs
    assert cr.n_pairs == 9 and cr.class_counts == {0: 3, 1: 3, 2: 3}
    for n, s in cr.scores.items():
        assert torch.isclose(s.abs().sum(), torch.tensor(1.0), atol=1e-5) or s.abs().sum() == 0
    # a conv and the BN merged into it share one score
    assert torch.allclose(cr.raw_scores["backbone.conv1"], cr.raw_scores["backbone.bn1"])
    again = type(cr).from_dict(cr.to_dict())
    assert torch.allclose(again.scores["backbone.conv1"], cr.scores["backbone.conv1"])


def test_lrp_rejects_unsupported_architecture():
    vit = create_model("vit_test", num_classes=2, img_size=32)
    with pytest.raises(ModelError, match="LRP does not support architecture 'vit_test'"):
        lrp(vit, torch.randn(1, 1, 32, 32), target=0)


def test_lrp_parameter_errors():
    m = tiny("vgg_tiny")
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(ConfigError, match="'composite' parameter of lrp"):
        lrp(m, x, target=0, composite="alpha9")
    with pytest.raises(ConfigError, match="'bn_rule' parameter of lrp"):
        lrp(m, x, target=0, bn_rule="skip")
    with pytest.raises(ConfigError, match=r"'target' parameter of lrp must be in the range \[0, 2\]"):
        lrp(m, x, target=3)
    with pytest.raises(ConfigError, match="never picks the argmax"):
        lrp(m, x, target=None)
    with pytest.raises(ModelError, match="layer\\(s\\) 'nope' not found"):
        channel_relevance(m, x, targets=0, layers=["nope"], progress=False)
    with pytest.raises(ConfigError, match="'method' parameter of channel_relevance"):
        channel_relevance(m, x, targets=0, method="shap", progress=False)
