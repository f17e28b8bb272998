"""Once-for-all students (issue 30): elastic ops, extraction, round-trip, budgeted search,
resume of the progressive-shrinking training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medscalpel.compress.ofa import train as ofa_train
from medscalpel.compress.ofa.search import (LatencySpec, SearchConfig, latency_spec_from_deploy,
                                            search_subnets)
from medscalpel.compress.ofa.supernet import (DynamicDepthwise, OFASpace, OFASupernet,
                                              SubnetConfig, extract_subnet, recalibrate_bn)
from medscalpel.compress.ofa.train import (OFATrainConfig, load_supernet, save_supernet,
                                           train_supernet)
from medscalpel.data import ArrayDataset, Preprocess
from medscalpel.engine.train import TrainConfig, train
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.models.checkpoint import load_model, make_card, save_model
from medscalpel.models.zoo import create_model

SIZE = 16
SPACE = OFASpace(stage_widths=(4, 8), stage_strides=(1, 2), max_depth=2, depth_choices=(1, 2),
                 kernel_choices=(3, 5, 7), expand_choices=(1.0, 2.0), stem_width=4,
                 head_width=8)


def _toy(n: int, seed: int) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    imgs = rng.normal(0.3, 0.05, (n, SIZE, SIZE)).astype(np.float32)
    y = (rng.random((n, 2)) < 0.5).astype(np.float32)
    imgs[y[:, 0] > 0, 2:6, 2:6] += 0.5
    imgs[y[:, 1] > 0, 10:14, 10:14] += 0.5
    return ArrayDataset(np.clip(imgs, 0, 1), y, ["left", "right"], "multilabel",
                        preprocess=Preprocess(size=SIZE), spec=f"toy-{seed}", split=f"s{seed}")


@pytest.fixture(scope="module")
def data():
    return _toy(32, 0), _toy(24, 1)


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(0)
    tr, va = data
    m = train(create_model("vgg_tiny", 2, img_size=SIZE, cfg=(8, "M", 16)), tr, va,
              TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2), progress=False).model
    m.card = make_card(m, tr.class_names, tr.task, tr.preprocess)
    return m


def _perturbed_net(seed: int = 0) -> OFASupernet:
    """A supernet with random weights, BN statistics and kernel transforms (nothing trivial)."""
    torch.manual_seed(seed)
    net = OFASupernet(SPACE, num_classes=3, in_chans=1, img_size=SIZE)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "transforms" in name:
                p.add_(0.2 * torch.randn_like(p))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net.eval()


# ----------------------------------------------------------------------------- elastic ops
def test_elastic_depthwise_at_max_kernel_is_the_plain_convolution():
    torch.manual_seed(0)
    dw = DynamicDepthwise(6, (3, 5, 7), stride=2)
    x = torch.randn(2, 6, 11, 11)
    ref = F.conv2d(x, dw.conv.weight, None, 2, 3, 1, 6)
    assert torch.equal(dw(x, 7), ref)


def test_fresh_transforms_make_smaller_kernels_plain_centre_crops():
    torch.manual_seed(0)
    dw = DynamicDepthwise(4, (3, 5, 7), stride=1)
    w = dw.conv.weight
    assert torch.allclose(dw.weight(5, 4), w[:, :, 1:6, 1:6])
    assert torch.allclose(dw.weight(3, 4), w[:, :, 2:5, 2:5])
    with pytest.raises(ConfigError, match="Kernel size 4"):
        dw.weight(4, 4)


def test_max_config_supernet_equals_the_full_static_network():
    net = _perturbed_net(1)
    x = torch.randn(3, 1, SIZE, SIZE)
    full = extract_subnet(net, SPACE.max_config()).eval()
    assert full.arch == "ofa_subnet" and full.num_parameters() < net.num_parameters()
    # the static network of plain convolutions, built from the arch kwargs alone
    rebuilt = create_model("ofa_subnet", 3, 1, SIZE, **{
        k: full.arch_kwargs[k] for k in ("stem_width", "blocks", "head_width", "stem_stride")})
    rebuilt.load_state_dict(full.state_dict())
    with torch.no_grad():
        assert torch.equal(net(x), full(x))
        assert torch.equal(full(x), rebuilt.eval()(x))


def test_sorting_channels_keeps_the_full_network_and_orders_importance():
    net = _perturbed_net(2)
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        before = net(x)
        net.sort_channels()
        after = net(x)
    assert (before - after).abs().max() < 1e-5
    block = net.backbone.stages[1][0]
    imp = block.project.conv.weight.abs().sum(dim=(0, 2, 3))
    assert torch.all(imp[:-1] >= imp[1:])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_extracted_subnet_equals_supernet_at_that_config(seed):
    net = _perturbed_net(seed)
    cfg = SPACE.sample(np.random.default_rng(seed))
    if seed == 0:
        cfg = SPACE.min_config()
    net.set_active(cfg)
    sub = extract_subnet(net, cfg).eval()
    x = torch.randn(4, 1, SIZE, SIZE)
    with torch.no_grad():
        delta = (net(x) - sub(x)).abs().max().item()
    assert delta < 1e-5
    assert sub.num_parameters() <= extract_subnet(net, SPACE.max_config()).num_parameters()
    # the supernet is unchanged by extraction and the CAM layer exists
    assert sub.feature_map(x).shape[:2] == (4, SPACE.head_width)


def test_invalid_configs_and_spaces_are_refused():
    net = _perturbed_net(0)
    with pytest.raises(ConfigError, match="outside the supernet's space"):
        net.set_active(SubnetConfig((1, 2), (3, 3, 3, 9), (1.0, 1.0, 1.0, 1.0)))
    with pytest.raises(ConfigError, match="2 depths"):
        net.set_active(SubnetConfig((1,), (3,), (1.0,)))
    with pytest.raises(ConfigError, match="depth_choices"):
        OFASpace(max_depth=2, depth_choices=(1, 3))
    with pytest.raises(ModelError, match="no pretrained weights"):
        create_model("ofa_subnet", 2, 1, SIZE, pretrained=True)
    with pytest.raises(ModelError, match="takes 5 channels"):
        create_model("ofa_subnet", 2, 1, SIZE, stem_width=4,
                     blocks=[{"in": 5, "out": 8, "mid": 8, "kernel": 3, "stride": 1}])


def test_bn_recalibration_copies_and_sets_statistics_from_images():
    net = _perturbed_net(0)
    sub = extract_subnet(net, SPACE.min_config()).eval()
    images = torch.rand(16, 1, SIZE, SIZE)
    rec = recalibrate_bn(sub, images, batch_size=16)
    stem_bn = rec.backbone.stem.bn
    with torch.no_grad():
        h = rec.backbone.stem.conv(images)
    assert torch.allclose(stem_bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not torch.equal(sub.backbone.stem.bn.running_mean, stem_bn.running_mean)


# ----------------------------------------------------------------------------- save / load
def test_subnet_save_load_round_trip_with_lineage(tmp_path, data):
    cfg = SPACE.sample(np.random.default_rng(5))
    tr = data[0]
    sub = extract_subnet(OFASupernet(SPACE, 2, 1, SIZE), cfg).eval()
    sub.card = make_card(sub, tr.class_names, tr.task, tr.preprocess).with_lineage(
        "ofa_subnet", parent="t", supernet_id="abc", subnet_config=cfg.to_dict(),
        latency_ms=0.1)
    path = save_model(sub, tmp_path / "m")
    back = load_model(path)
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(sub(x), back(x))
    assert back.arch == "ofa_subnet"
    assert back.card.lineage[-1]["supernet_id"] == "abc"
    assert SubnetConfig.from_dict(back.card.lineage[-1]["subnet_config"]) == cfg
    assert back.cam_layer() is back.backbone.head


# ----------------------------------------------------------------------------- search
def test_search_meets_a_generous_budget_and_refuses_an_impossible_one(data):
    tr, va = data
    net = _perturbed_net(0)
    net.classifier = torch.nn.Linear(SPACE.head_width, 2)
    images = torch.stack([tr.image(i) for i in range(16)])
    spec = LatencySpec(runtime="torch:fp32", rounds=1, repeats=2, warmup=1)
    res = search_subnets(net, [1e4, 1e-6], va, images, spec,
                         SearchConfig(n_random=3, generations=1, population=2, confirm_rounds=2,
                                      bn_images=16))
    ok, impossible = res.choices
    assert ok.met and ok.model is not None
    assert ok.confirm_latency_ms <= 1e4 and len(ok.confirm_rounds_ms) == 2
    assert ok.candidate.val_auroc is not None
    assert not impossible.met and impossible.model is None
    assert "no subnet measured within" in impossible.reason
    assert len(res.candidates) >= 2  # the extremes at least
    json.dumps(res.to_dict())  # serialisable
    with pytest.raises(ConfigError, match="budgets_ms"):
        search_subnets(net, [-1.0], va, images, spec)


def test_a_subnet_slower_when_re_timed_is_rejected_not_chosen(data, monkeypatch):
    from medscalpel.compress.ofa import search as ofa_search

    tr, va = data
    net = _perturbed_net(0)
    net.classifier = torch.nn.Linear(SPACE.head_width, 2)
    images = torch.stack([tr.image(i) for i in range(16)])

    def fake_latency(models, spec, example, calib=None, rounds=None):
        # 1 ms in the search, 5 ms when the best ones are re-timed (rounds given)
        return {k: [5.0 if rounds else 1.0] * (rounds or 1) for k in models}

    monkeypatch.setattr(ofa_search, "alternated_latency", fake_latency)
    res = search_subnets(net, [2.0], va, images, LatencySpec(runtime="torch:fp32"),
                         SearchConfig(n_random=3, generations=0, max_confirm=2, bn_images=16))
    (choice,) = res.choices
    assert not choice.met and choice.model is None
    assert "none of the best 2 stayed within it" in choice.reason
    assert [r["confirm_latency_ms"] for r in choice.rejected] == [5.0, 5.0]


def test_latency_spec_from_a_deploy_run(tmp_path):
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "serve.json").write_text(json.dumps(
        {"runtime": "onnxruntime", "precision": "fp32"}))
    spec = latency_spec_from_deploy(tmp_path)
    assert spec.runtime == "onnxruntime:fp32" and "serve.json" in spec.source
    with pytest.raises(DataError, match="No deploy.json or serve.json"):
        latency_spec_from_deploy(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="runtime"):
        LatencySpec(runtime="tpu:fp8")


# ----------------------------------------------------------------------------- training
CFG = OFATrainConfig(space=SPACE, phase_epochs=(1, 2, 1, 1), batch_size=16,
                     max_steps_per_epoch=2, bn_images=16, lr=3e-3, shrink_lr=1e-3)


class _Interrupt(Exception):
    pass


def test_training_resumes_after_an_interruption(tmp_path, data, teacher, monkeypatch):
    tr, va = data
    ref = train_supernet(teacher, tr, va, CFG, checkpoint_dir=tmp_path / "ref", progress=False)
    assert set(ref.history) == {"largest", "kernel", "depth", "width"}
    assert all(0.0 <= ref.history[p]["val_auroc_min_subnet"] <= 1.0 for p in ref.history)

    calls = {"n": 0}
    forward = ofa_train._PhaseSampler.forward

    def interrupted(self, x):
        calls["n"] += 1
        if calls["n"] == 6:  # largest: 2 steps, kernel epoch 1: 2 steps, kernel epoch 2 step 2
            raise _Interrupt("killed")
        return forward(self, x)

    monkeypatch.setattr(ofa_train._PhaseSampler, "forward", interrupted)
    with pytest.raises(_Interrupt):
        train_supernet(teacher, tr, va, CFG, checkpoint_dir=tmp_path / "run", progress=False)
    monkeypatch.setattr(ofa_train._PhaseSampler, "forward", forward)
    res = train_supernet(teacher, tr, va, CFG, checkpoint_dir=tmp_path / "run", progress=False)
    assert res.history["largest"]["resumed_from_epoch"] == 1  # finished: read back
    assert res.history["kernel"]["resumed_from_epoch"] == 1  # resumed after its first epoch
    assert res.history["depth"]["resumed_from_epoch"] == 0
    a, b = ref.supernet.state_dict(), res.supernet.state_dict()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5
    # save / load of the supernet keeps its function and id
    save_supernet(res, tmp_path / "sn")
    net, info = load_supernet(tmp_path / "sn")
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(net(x), res.supernet(x))
    assert info.supernet_id == res.supernet.fingerprint()


def test_training_refuses_bad_settings_and_untrained_teachers(data):
    tr, va = data
    with pytest.raises(ConfigError, match="phase_epochs"):
        OFATrainConfig(phase_epochs=(0, 1, 1, 1)).validate()
    with pytest.raises(ModelError, match="TRAINED teacher"):
        train_supernet("vgg_tiny", tr, va, CFG)


# ----------------------------------------------------------------------------- registry, CLI
def test_the_ofa_compressor_returns_the_contract_or_refuses(data, teacher):
    from medscalpel.compress.contract import COMPRESSORS, CompressionInputs, compress
    from medscalpel.compress.ofa.flow import OFAConfig
    from medscalpel.errors import VerificationError

    tr, va = data
    assert "ofa" in COMPRESSORS.names()
    cfg = OFAConfig(train=OFATrainConfig(space=SPACE, phase_epochs=(1, 0, 0, 1), batch_size=16,
                                         max_steps_per_epoch=1, bn_images=16),
                    search=SearchConfig(n_random=2, generations=0, confirm_rounds=1,
                                        bn_images=16), n_boot=0, latency_rounds=1,
                    saliency_images=0)
    spec = LatencySpec(runtime="torch:fp32", rounds=1, repeats=1, warmup=0)
    inputs = CompressionInputs(train=tr, val=va, test=va)
    res = compress("ofa", teacher, inputs, latency_budget_ms=1e4, config=cfg, latency=spec)
    assert res.method == "ofa" and res.model.arch == "ofa_subnet"
    step = res.lineage().lineage[-1]
    assert step["method"] == "ofa_subnet" and step["budget_ms"] == 1e4
    assert step["latency_ms"] <= 1e4 and step["supernet_id"] == res.settings["supernet_id"]
    assert res.verification["exact"] is False
    with pytest.raises(VerificationError, match="no subnet measured within"):
        compress("ofa", teacher, inputs, latency_budget_ms=1e-6, config=cfg, latency=spec)


@pytest.mark.parametrize("argv, message", [
    (["--student", "resnet_tiny", "--latency-budget", "1"], "go together"),
    (["--student", "ofa"], "go together"),
    (["--student", "ofa", "--latency-budget", "0,abc"], "comma list of milliseconds"),
    (["--student", "ofa", "--latency-budget", "1", "--feature-weight", "1"], "logits only"),
    (["--student", "ofa", "--latency-budget", "1", "--phase-epochs", "1,2"], "four integers"),
])
def test_cli_refuses_bad_ofa_options_in_one_line(argv, message, capsys, tmp_path, teacher,
                                                 data):
    from medscalpel.cli.main import run

    tdir = save_model(teacher, tmp_path / "teacher")
    with pytest.raises(SystemExit) as ex:
        run(["compress", "distill", "--teacher", str(tdir), "--data",
             "phantom?n=60&size=16", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert ex.value.code == 2
    assert message in err and err.strip().startswith("error:")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- dominance
def _pair(name, faster_rounds, reps, rounds=12, other="student", delta=None):
    """A pair whose candidate is 2x faster in ``faster_rounds`` of ``rounds`` rounds (2x
    slower in the rest) with the given AUROC replicates."""
    from medscalpel.compress.ofa.dominance import PairInput

    cand = [1.0] * faster_rounds + [4.0] * (rounds - faster_rounds)
    reps = np.asarray(reps, np.float64)
    return PairInput(name, other, float(np.nanmean(reps) if delta is None else delta), reps,
                     n=400, candidate_ms=cand, other_ms=[2.0] * rounds)


def _reps(k_low, value_low=-1.0, value_high=0.1, b=999):
    """``b`` replicates of which ``k_low`` sit at ``value_low`` (below any margin)."""
    return np.r_[np.full(k_low, value_low), np.full(b - k_low, value_high)]


def test_sign_test_is_the_exact_binomial_tail():
    from medscalpel.compress.ofa.dominance import sign_test

    assert sign_test([2.0] * 5) == (5, 1 / 32, 1.0)
    k, pf, ps = sign_test([2.0, 2.0, 2.0, 0.5, 1.0])     # a tie counts against both claims
    assert k == 3 and pf == pytest.approx(0.5) and ps == pytest.approx(31 / 32)


def test_dominance_outcomes_and_their_reasons():
    from medscalpel.compress.ofa.dominance import decide_dominance

    rng = np.random.default_rng(0)
    pairs = [_pair("better", 12, rng.normal(0.03, 0.005, 2000)),
             _pair("worse", 0, rng.normal(-0.03, 0.005, 2000), other="s2"),
             _pair("faster_less_accurate", 12, rng.normal(-0.05, 0.005, 2000), other="s3"),
             _pair("few_rounds", 3, rng.normal(0.03, 0.005, 2000), rounds=3, other="s4")]
    v = decide_dominance(pairs, margin=0.01)
    assert v.pair("better", "student").outcome == "dominates"
    assert v.pair("worse", "s2").outcome == "dominated"
    slow = v.pair("faster_less_accurate", "s3")
    assert slow.outcome == "undecided" and "not shown AUROC >= -0.01" in slow.reason
    few = v.pair("few_rounds", "s4")
    assert few.outcome == "undecided" and "3 rounds cannot reach" in few.reason
    assert few.p_faster == pytest.approx(1 / 8)
    b = v.pair("better", "student")
    # the interval is at the pair's Holm level and agrees with the outcome
    assert b.auroc_ci_low >= -0.01 and b.level_adj < 0.025
    assert b.rounds_candidate_faster == 12 and b.speed_ratio == pytest.approx(2.0)
    assert v.n_tests == 4 and v.alpha == pytest.approx(0.025)
    assert v.count("dominates") == 1 and v.count("undecided") == 2


def test_holm_decides_where_bonferroni_does_not():
    from medscalpel.compress.ofa.dominance import decide_dominance

    # AUROC p-values (1 + k) / 1000: 0.01 and 0.02; the sign tests (2**-12) are far smaller
    pairs = [_pair("a", 12, _reps(9), delta=0.05), _pair("b", 12, _reps(19), other="s2",
                                                          delta=0.05)]
    holm = decide_dominance(pairs, margin=0.01, correction="holm")
    bonf = decide_dominance(pairs, margin=0.01, correction="bonferroni")
    assert [p.p_dominates for p in holm.pairs] == pytest.approx([0.01, 0.02])
    assert [p.outcome for p in holm.pairs] == ["dominates", "dominates"]
    assert [p.outcome for p in bonf.pairs] == ["dominates", "undecided"]
    assert [p.level_adj for p in holm.pairs] == pytest.approx([0.0125, 0.025])


def test_nan_replicates_count_against_and_missing_evidence_is_unscorable():
    from medscalpel.compress.ofa.dominance import PairInput, decide_dominance

    reps = np.r_[np.full(100, np.nan), np.full(899, 0.2)]
    nan_pair = _pair("nan", 12, reps, delta=0.2)
    none = PairInput("none", "student", 0.1, None, n=10, candidate_ms=[1.0] * 12,
                     other_ms=[2.0] * 12)
    v = decide_dominance([nan_pair, none], margin=0.01)
    p = v.pair("nan", "student")
    assert p.p_auroc_noninferior == pytest.approx(101 / 1000) and p.n_nan_replicates == 100
    assert p.outcome == "undecided"
    u = v.pair("none", "student")
    assert u.outcome == "unscorable" and "no AUROC bootstrap replicates" in u.reason
    assert v.n_tests == 1


def test_pair_input_takes_the_paired_comparison_with_the_other_as_reference():
    from medscalpel.compress.ofa.dominance import macro_replicates, pair_input
    from medscalpel.engine.compare import compare_predictions
    from medscalpel.engine.predictions import Predictions

    rng = np.random.default_rng(1)
    y = (rng.random((120, 2)) < 0.4).astype(np.float32)
    good = y * 2.0 + rng.normal(0, 1.0, y.shape)
    bad = y * 0.5 + rng.normal(0, 1.0, y.shape)
    ids = tuple(f"i{i}" for i in range(120))

    def preds(z, mid):
        return Predictions(z.astype(np.float32), y, ids=ids, class_names=("a", "b"),
                           task="multilabel", model_id=mid)

    c = compare_predictions(preds(bad, "student"), preds(good, "ofa"), n_boot=200, seed=0)
    delta, reps, note = macro_replicates(c)
    assert delta == pytest.approx(c.macro["delta_auroc"]) and delta > 0
    assert reps.shape == (200,) and "2 of 2 classes" in note
    p = pair_input("ofa", "student", c, [1.0] * 5, [2.0] * 5)
    assert p.auroc_delta == pytest.approx(delta) and p.n == 120
    with pytest.raises(DataError, match="no class has"):
        macro_replicates(c, min_pos=1000)
    with pytest.raises(DataError, match="keeps no AUROC bootstrap replicates"):
        macro_replicates(compare_predictions(preds(bad, "s"), preds(good, "o"), n_boot=0))


def test_dominance_round_trip_and_refusals():
    from medscalpel.compress.ofa.dominance import DominanceVerdict, decide_dominance

    rng = np.random.default_rng(2)
    v = decide_dominance([_pair("a", 12, rng.normal(0.03, 0.005, 500))], margin=0.02,
                         meta={"split": "test"})
    d = json.loads(json.dumps(v.to_dict()))
    back = DominanceVerdict.from_dict(d)
    assert back.to_dict() == v.to_dict() and back.pairs[0].outcome == "dominates"
    assert "1 dominates of 1 pair(s)" in d["summary"]
    with pytest.raises(DataError, match="schema_version"):
        DominanceVerdict.from_dict({**d, "schema_version": 99})
    p = _pair("a", 12, rng.normal(0.03, 0.005, 500))
    with pytest.raises(ConfigError, match="unique"):
        decide_dominance([p, p])
    with pytest.raises(ConfigError, match="'correction' parameter"):
        decide_dominance([p], correction="none")
    with pytest.raises(ConfigError, match="'margin' parameter"):
        decide_dominance([p], margin=-0.1)
