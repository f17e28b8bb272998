"""Integrated Gradients, the attribution registry, DL-Backtrace on a planted patch, planted
patches and IG layer conductance."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from medscalpel.errors import ConfigError, DataError
from medscalpel.explain.attributions import (ATTRIBUTIONS, Attribution, AttributionResult,
                                             attribute, integrated_gradients)
from medscalpel.explain.lrp import lrp
from medscalpel.explain.relevance import channel_relevance
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.zoo import create_model


def patch_model() -> MedClassifier:
    """Logit 1 = mean over the image of relu(x - 2): only pixels brighter than 2 count."""
    conv = nn.Conv2d(1, 1, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
        conv.bias.fill_(-2.0)
    backbone = nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
                                         flatten=nn.Flatten(1)))
    clf = nn.Linear(1, 2)
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[0.0], [50.0]]))
        clf.bias.zero_()
    return MedClassifier(backbone, clf, "patch_test", cam_layer="backbone.relu").eval()


def patched_images(n: int = 3):
    x = torch.randn(n, 1, 16, 16) * 0.5
    x[:, :, 4:8, 9:13] = 3.0 + torch.rand(n, 1, 4, 4)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:8, 9:13] = True
    return x, mask


@pytest.mark.parametrize("method,settings,ratio", [
    ("ig", {}, 20.0),
    ("lrp", {"composite": "epsilon_plus"}, 20.0),
    # the Flat first-layer rule spreads relevance evenly over each 3x3 receptive field, so the
    # ring around the patch gets a share: most, not all, of the relevance is inside
    ("lrp", {}, 1.5),
    # DL-Backtrace: pixels whose ReLU is off get exactly zero
    ("backtrace", {}, 20.0),
])
def test_planted_patch_gets_the_attribution(method, settings, ratio):
    m = patch_model()
    x, mask = patched_images()
    res = attribute(method, m, x, target=1, **settings)
    a = res.attribution[:, 0]
    inside = a[:, mask].sum(1)
    outside = a[:, ~mask].abs().sum(1)
    assert (inside > 0).all()
    assert (inside > ratio * outside).all(), (inside, outside)
    # the top pixel of each map lies in the patch
    top = a.flatten(1).argmax(1)
    assert mask.flatten()[top].all()


def test_ig_completeness_delta_shrinks_with_steps():
    torch.manual_seed(0)
    m = create_model("resnet_tiny", num_classes=3, img_size=32).eval()
    # random BatchNorm statistics and shifts: ReLUs switch along the path, so the function is
    # clearly non-linear there (at a fresh init it is nearly linear and both deltas are at
    # float rounding, ~1e-8, so "fine < coarse" compared two rounding errors)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.running_mean.copy_(0.3 * torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g))
            bn.bias.copy_(0.5 * torch.randn(bn.num_features, generator=g))
    x = torch.randn(2, 1, 32, 32)
    coarse = integrated_gradients(m, x, target=2, n_steps=2, internal_batch_size=8)
    fine = integrated_gradients(m, x, target=2, n_steps=64, internal_batch_size=64)
    with torch.no_grad():
        gap = m(x)[:, 2] - m(torch.zeros_like(x))[:, 2]
    assert torch.allclose(fine.total(), gap, atol=5e-3 * max(1.0, float(gap.abs().max())))
    assert fine.delta.abs().max() < 5e-3 * max(1.0, float(gap.abs().max()))
    assert fine.delta.abs().max() < coarse.delta.abs().max()
    assert fine.method == "ig" and fine.settings["n_steps"] == 64


def test_ig_per_image_targets_and_baseline():
    m = patch_model()
    x, _ = patched_images(2)
    res = integrated_gradients(m, x, target=torch.tensor([1, 0]), baseline=-1.0, n_steps=48)
    assert res.target.tolist() == [1, 0]
    assert res.attribution[1].abs().sum() == 0          # class 0 has zero weight
    with torch.no_grad():
        gap = m(x)[0, 1] - m(torch.full_like(x, -1.0))[0, 1]
    assert torch.isclose(res.total()[0], gap, rtol=1e-2)


@pytest.mark.parametrize("arch", ["densenet_tiny", "vit_test"])
def test_ig_leaves_callers_model_unchanged(arch):
    m = create_model(arch, num_classes=2, img_size=32)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    integrated_gradients(m, torch.randn(2, 1, 32, 32), target=1, n_steps=4)
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks and not mod._backward_hooks
               for mod in m.modules())
    assert all(p.grad is None for p in m.parameters())


def test_registry_and_base_class():
    assert ATTRIBUTIONS.names() == ["backtrace", "ig", "lrp"]
    m = patch_model()
    ig = ATTRIBUTIONS.create("ig", model=m, n_steps=8)
    assert isinstance(ig, Attribution)
    with pytest.raises(ConfigError, match="Unknown attribution method 'shap'"):
        ATTRIBUTIONS.create("shap", model=m)


def test_result_to_dict_save_load(tmp_path):
    m = patch_model()
    x, _ = patched_images(2)
    res = lrp(m, x, target=1, zero_bias=True)
    d = res.to_dict()
    assert d["method"] == "lrp" and d["shape"] == [2, 1, 16, 16] and len(d["delta"]) == 2
    path = res.save(tmp_path / "lrp")
    back = AttributionResult.load(path)
    assert torch.equal(back.attribution, res.attribution)
    assert back.settings["composite"] == "epsilon_plus_flat"


def test_backtrace_on_planted_patch():
    # logit 1 = mean(relu(x - 2)) weighted by the head: DL-Backtrace puts relevance only on the
    # pixels whose ReLU is on (x > 2); everywhere else the activation is 0 and so is relevance
    m = patch_model()
    x, mask = patched_images(2)
    res = attribute("backtrace", m, x, target=1, zero_bias=True)
    assert res.method == "backtrace"
    on = (x > 2.0)
    assert torch.all(res.attribution[~on] == 0)
    assert torch.all(res.attribution[on] * torch.sign(res.output).view(-1, 1, 1, 1)
                     .expand_as(res.attribution)[on] > 0)
    assert torch.allclose(res.total(), res.output, rtol=1e-5)


def test_input_and_target_errors():
    m = patch_model()
    x, _ = patched_images(2)
    with pytest.raises(ConfigError, match="never picks the argmax"):
        integrated_gradients(m, x, target=None)
    with pytest.raises(ConfigError, match=r"one class per image \(2\)"):
        integrated_gradients(m, x, target=torch.tensor([0, 1, 1]))
    with pytest.raises(ConfigError, match="integer class indices"):
        integrated_gradients(m, x, target=torch.tensor([0.0, 1.0]))
    with pytest.raises(DataError, match=r"shape \[N, C, H, W\]"):
        integrated_gradients(m, x[0], target=0)
    with pytest.raises(ConfigError, match="'n_steps' parameter of IntegratedGradients"):
        integrated_gradients(m, x, target=0, n_steps=0)
    with pytest.raises(DataError, match="must broadcast"):
        integrated_gradients(m, x, target=0, baseline=torch.zeros(3, 5))


def test_ig_conductance_is_complete_at_a_cut_and_matches_captum():
    """Layer conductance summed over a cut layer's channels = f(x) - f(baseline)."""
    from captum.attr import LayerConductance

    torch.manual_seed(0)
    m = create_model("vgg_tiny", num_classes=2, img_size=16).eval()
    x = torch.randn(1, 1, 16, 16)
    layer = "backbone.features.4"   # second conv: every path to the logit crosses it
    cr = channel_relevance(m, x, targets=1, method="ig", layers=[layer], aggregate="signed",
                           normalize=None, n_steps=64, batch_size=130, progress=False)
    with torch.no_grad():
        gap = float(m(x)[0, 1] - m(torch.zeros_like(x))[0, 1])
    total = float(cr.raw_scores[layer].sum())
    assert abs(total - gap) < 2e-2 * max(1.0, abs(gap))
    ref = LayerConductance(m, m.get_submodule(layer)).attribute(x, target=1, n_steps=128)
    ref_ch = ref.detach().flatten(2).sum(2)[0]
    # different quadratures (captum: Gauss-Legendre; here: trapezoid): agree to a few %
    assert torch.allclose(cr.raw_scores[layer], ref_ch, atol=5e-2 * float(ref_ch.abs().max()))
    assert torch.corrcoef(torch.stack([cr.raw_scores[layer], ref_ch]))[0, 1] > 0.99


def test_channel_relevance_targets_from_labels():
    m = create_model("vgg_tiny", num_classes=3, img_size=16)
    x = torch.randn(3, 1, 16, 16)
    labels = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    cr = channel_relevance(m, x, targets=None, labels=labels, method="taylor", progress=False)
    assert cr.class_counts == {0: 1, 1: 1, 2: 1} and cr.n_pairs == 3 and cr.n_images == 2
    with pytest.raises(ConfigError, match="class indices in \\[0, 2\\]"):
        channel_relevance(m, x, targets=[0, 7], method="taylor", progress=False)
