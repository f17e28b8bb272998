"""DL-Backtrace (native torch): hand calculation, the rule's defining properties, zoo CNNs,
determinism, the caller's model left alone, channel relevance, the prune criterion and CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from medscalpel.cli.main import app
from medscalpel.compress.importance import IMPORTANCE, BacktraceCriterion, make_criterion
from medscalpel.compress.structured import prune_structured
from medscalpel.data import Preprocess
from medscalpel.data.phantom import generate_phantom
from medscalpel.errors import ConfigError, ModelError
from medscalpel.explain.attributions import ATTRIBUTIONS, attribute
from medscalpel.explain.backtrace import Backtrace, BacktraceSession, backtrace
from medscalpel.explain.lrp import lrp
from medscalpel.explain.relevance import channel_relevance
from medscalpel.models import create_model, make_card, save_model

ARCHS = ("densenet_tiny", "resnet_tiny", "vgg_tiny")


def two_layer() -> nn.Sequential:
    """x (3 inputs) -> Linear(3, 2) -> ReLU -> Linear(2, 2), numbers chosen by hand.

    For x = [1, -2, 3]: hidden unit 0 has t = 1 - 4 + 3 - 1 = -1 (ReLU off, a = 0), hidden unit 1
    has t = -1 - 2 + 6 + 0.5 = 3.5 (a = 3.5); logit 0 = 2 * 0 + 1 * 3.5 + 0.5 = 4.0, logit 1 =
    0.5 * 0 - 1 * 3.5 + 0 = -3.5.
    """
    m = nn.Sequential(nn.Flatten(1), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([[1.0, 2.0, 1.0], [-1.0, 1.0, 2.0]]))
        m[1].bias.copy_(torch.tensor([-1.0, 0.5]))
        m[3].weight.copy_(torch.tensor([[2.0, 1.0], [0.5, -1.0]]))
        m[3].bias.copy_(torch.tensor([0.5, 0.0]))
    return m


X = torch.tensor([1.0, -2.0, 3.0]).view(1, 1, 1, 3)


def zoo(arch: str, seed: int = 0) -> nn.Module:
    """A zoo model with non-trivial BatchNorm statistics (as after training)."""
    torch.manual_seed(seed)
    m = create_model(arch, num_classes=3, img_size=32)
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(0.3 * torch.randn(c, generator=g))
            mod.running_var.copy_(0.5 + torch.rand(c, generator=g))
            mod.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            mod.bias.data.copy_(0.2 * torch.randn(c, generator=g))
    return m.eval()


# ----------------------------------------------------------------------------- hand calculation
def test_two_layer_hand_calculation():
    res = backtrace(two_layer(), X, target=0)
    # output layer: contributions |2 * 0| = 0, |1 * 3.5| = 3.5, bias |0.5|: D = 4.0, so the
    # hidden units get 0 and 3.5 / 4 * 4.0 = 3.5 (the bias absorbs 0.5).
    # hidden unit 1: contributions |-1 * 1| = 1, |1 * -2| = 2, |2 * 3| = 6, bias 0.5: D = 9.5,
    # so x gets 3.5 * [1, 2, 6] / 9.5 = [7/19, 14/19, 42/19].
    expected = torch.tensor([7 / 19, 14 / 19, 42 / 19])
    assert torch.allclose(res.attribution.flatten(), expected, atol=1e-6)
    assert res.output.item() == pytest.approx(4.0)
    # sum R_input = 63/19; delta = (63/19 - 4) / 4 = -13/76 (the two biases' shares)
    assert res.delta.item() == pytest.approx(-13 / 76, abs=1e-6)


def test_two_layer_zero_bias_and_negative_logit():
    res = backtrace(two_layer(), X, target=0, zero_bias=True)
    # no bias shares: the hidden unit 1 gets all 4.0, x gets 4.0 * [1, 2, 6] / 9
    assert torch.allclose(res.attribution.flatten(), torch.tensor([4 / 9, 8 / 9, 24 / 9]),
                          atol=1e-6)
    assert abs(res.delta.item()) < 1e-6
    neg = backtrace(two_layer(), X, target=1)
    # logit 1 = -3.5, its only non-zero contribution is -1 * 3.5 (bias 0): the hidden unit gets
    # all of it, x gets -3.5 * [1, 2, 6] / 9.5: every relevance has the sign of the logit
    assert neg.output.item() == pytest.approx(-3.5)
    assert torch.allclose(neg.attribution.flatten(), -3.5 * torch.tensor([1.0, 2.0, 6.0]) / 9.5,
                          atol=1e-6)


def test_intermediate_relevance_and_zero_activation():
    m = two_layer()
    session = BacktraceSession(m)
    with session:
        _, _, cap = session.relevance(X, torch.tensor([0]), capture=["1", "2"])
    # the ReLU output: the off unit (a = 0) gets exactly 0 although its weight (2) is the
    # largest; the on unit gets 3.5. The ReLU passes relevance to its pre-activation unchanged.
    assert torch.equal(cap["2"], torch.tensor([[0.0, 3.5]]))
    assert torch.equal(cap["1"], cap["2"])


def test_negative_contributions_get_same_sign_unlike_lrp_epsilon():
    m = two_layer()
    bt = backtrace(m, X, target=0, zero_bias=True).attribution.flatten()
    eps = lrp(m, X, target=0, composite="epsilon", zero_bias=True).attribution.flatten()
    # x2 = -2 pushed hidden unit 1 down (contribution -2): DL-Backtrace credits its magnitude
    # (+8/9), LRP-epsilon charges it (-2 / 3 * 4 = -8/3); both conserve the logit 4.0
    assert bt[1].item() == pytest.approx(8 / 9, abs=1e-6)
    assert eps[1].item() == pytest.approx(-8 / 3, abs=1e-4)
    assert bt.sum().item() == pytest.approx(4.0, abs=1e-5)
    assert eps.sum().item() == pytest.approx(4.0, abs=1e-4)


# ----------------------------------------------------------------------------- zoo CNNs
@pytest.mark.parametrize("arch", ARCHS)
def test_zoo_conservation_sign_and_bias_share(arch):
    m = zoo(arch)
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 2])
    exact = backtrace(m, x, t, zero_bias=True)
    assert exact.attribution.shape == x.shape
    assert exact.delta.abs().max() < 1e-4  # no bias shares: conserved layer to layer
    with torch.no_grad():
        logits = m(x).gather(1, t.view(-1, 1)).squeeze(1)
    assert torch.allclose(exact.output, logits)
    # every relevance has the sign of the explained logit
    signed = exact.attribution * torch.sign(exact.output).view(-1, 1, 1, 1)
    assert float(signed.min()) >= -1e-7
    biased = backtrace(m, x, t)
    # biases only absorb: the input keeps a fraction in [0, 1] of the logit, so delta is minus
    # the absorbed fraction times the logit's sign
    kept = biased.delta * torch.sign(biased.output)
    assert float(kept.max()) <= 1e-5 and float(kept.min()) >= -1 - 1e-5
    assert float(kept.min()) < -1e-4  # and they do absorb something


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_equals_pass_without_bias(arch):
    # folding a BN scales all contributions of a unit by the same |gamma / sigma|, so without
    # bias shares the two BN rules give the same relevance; with biases they differ
    m = zoo(arch, seed=2)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    a = backtrace(m, x, 1, zero_bias=True, bn_rule="pass").attribution
    b = backtrace(m, x, 1, zero_bias=True, bn_rule="fold").attribution
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-6 * float(a.abs().max()))
    c = backtrace(m, x, 1, bn_rule="fold")
    assert not torch.allclose(a, c.attribution, rtol=1e-3)
    assert c.settings["canonizer_max_abs_diff"] < 1e-4


def test_cut_layers_carry_the_whole_logit():
    # with zero_bias every layer that every path crosses holds exactly the logit: each conv / BN
    # of a VGG, each residual stage's output of a ResNet (additions split, never duplicate)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    vgg = zoo("vgg_tiny")
    cr = channel_relevance(vgg, x, targets=[2], method="backtrace", aggregate="signed",
                           normalize=None, zero_bias=True, progress=False)
    with torch.no_grad():
        total = float(vgg(x)[:, 2].sum())
    assert len(cr.raw_scores) == 10  # 5 convs + 5 BNs
    for name, v in cr.raw_scores.items():
        assert float(v.sum()) == pytest.approx(total, rel=1e-4, abs=1e-6), name
    res = zoo("resnet_tiny")
    blocks = [f"backbone.layer{i}" for i in range(1, 5)]
    with BacktraceSession(res, zero_bias=True) as session:
        _, logit, cap = session.relevance(x, torch.tensor([2, 2]), capture=blocks)
    for name in blocks:
        assert torch.allclose(cap[name].flatten(1).sum(1), logit, rtol=1e-4, atol=1e-6), name
    # DenseNet: a transition conv reads the whole concatenation of its block and is read only
    # by the next block, so its output is a cut too (the concatenation split loses nothing)
    dense = zoo("densenet_tiny")
    cuts = ["backbone.features.transition1.conv", "backbone.features.transition2.conv"]
    for bn_rule in ("pass", "fold"):
        with BacktraceSession(dense, zero_bias=True, bn_rule=bn_rule) as session:
            _, logit, cap = session.relevance(x, torch.tensor([0, 1]), capture=cuts)
        for name in cuts:
            assert torch.allclose(cap[name].flatten(1).sum(1), logit, rtol=1e-4, atol=1e-6), name


def test_deterministic_and_caller_model_untouched():
    m = zoo("resnet_tiny")
    m.train()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    inplace = [mod.inplace for mod in m.modules() if isinstance(mod, nn.ReLU)]
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    r1 = attribute("backtrace", m, x, target=0)
    r2 = attribute("backtrace", m, x, target=0)
    assert torch.equal(r1.attribution, r2.attribution) and torch.equal(r1.delta, r2.delta)
    assert m.training and all(mod.training for mod in m.modules())
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert inplace == [mod.inplace for mod in m.modules() if isinstance(mod, nn.ReLU)]
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks and not mod._backward_hooks
               for mod in m.modules())
    assert all(p.grad is None for p in m.parameters())


def test_registry_settings_and_errors():
    assert "backtrace" in ATTRIBUTIONS.names()
    m = two_layer()
    res = ATTRIBUTIONS.create("backtrace", model=m, bn_rule="fold").attribute(X, 0)
    assert res.method == "backtrace" and res.settings["bn_rule"] == "fold"
    assert res.to_dict()["delta"] == [pytest.approx(-13 / 76, abs=1e-6)]
    with pytest.raises(ConfigError, match="'bn_rule' parameter of backtrace"):
        Backtrace(m, bn_rule="epsilon")
    silu = nn.Sequential(nn.Flatten(1), nn.Linear(3, 2), nn.SiLU(), nn.Linear(2, 2))
    with pytest.raises(ModelError, match="DL-Backtrace does not support .*SiLU"):
        backtrace(silu, X, 0)


# ----------------------------------------------------------------------------- channels, pruning
def test_channel_relevance_backtrace_type_and_bn_share():
    m = zoo("vgg_tiny")
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    cr = channel_relevance(m, x, targets=[0, 1], method="backtrace", progress=False)
    assert type(cr).__name__ == "ChannelRelevance" and cr.method == "backtrace"
    assert cr.n_pairs == 8 and cr.settings["bn_rule"] == "pass"
    # BN is transparent under bn_rule='pass': a conv and its BN share one score
    assert torch.allclose(cr.raw_scores["backbone.features.0"],
                          cr.raw_scores["backbone.features.1"], rtol=1e-5)
    assert cr.scores["backbone.features.0"].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_prune_criterion_end_to_end():
    assert "backtrace" in IMPORTANCE.names()
    crit = make_criterion("backtrace")
    assert isinstance(crit, BacktraceCriterion)
    m = zoo("vgg_tiny")
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(7))
    crit.prepare(m, x, None, progress=False)
    ref = channel_relevance(m, x, None, method="backtrace", progress=False,
                            layers=list(crit.scores))
    assert all(torch.allclose(crit.scores[k], ref.scores[k]) for k in ref.scores)
    res = prune_structured(m, x, "backtrace", target_speedup=2.0, measure_latency=False,
                           progress=False)
    assert res.speedup_macs == pytest.approx(2.0, rel=0.15)
    assert res.model(x).shape == (8, 3)
    assert next(m.parameters()).shape[0] == 16  # the caller's model keeps its channels


# ----------------------------------------------------------------------------- CLI
def test_cli_attribute_and_prune(tmp_path):
    runner = CliRunner()
    generate_phantom(n=96, size=32, seed=0, out=tmp_path / "ph", progress=False)
    spec = f"phantom:{tmp_path / 'ph'}"
    names = list(generate_phantom(n=1, size=16, progress=False).class_names)
    m = create_model("densenet_tiny", 14, 1, 32)
    save_model(m, tmp_path / "m", make_card(m, names, "multilabel", Preprocess(size=32)))
    r = runner.invoke(app, ["explain", "attribute", "--model", str(tmp_path / "m"), "--data",
                            spec, "--class", "Effusion", "--method", "backtrace", "--n", "2",
                            "--out", str(tmp_path / "bt")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    meta = json.loads((tmp_path / "bt" / "attribution.json").read_text())
    assert meta["method"] == "backtrace" and len(meta["delta"]) == len(meta["ids"]) >= 1
    r = runner.invoke(app, ["compress", "prune", str(tmp_path / "m"), "--data", spec,
                            "--criterion", "backtrace", "--target-speedup", "2", "--calib", "8",
                            "--out", str(tmp_path / "pr")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    report = json.loads((tmp_path / "pr" / "prune.json").read_text())
    assert "backtrace" in json.dumps(report)
