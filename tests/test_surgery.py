"""Surgical correction: minimal set on a planted case, invariants, plan/apply, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medscalpel.engine.predict import Features
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.repair.surgery import (SurgeryPlan, confounder_flags, surgery_from_rule,
                                       surgical_correction)

N, C, K = 200, 12, 3


def planted(seed=0):
    """Class 'a': TPs (rows 0-59) driven by channels 2-5; FPs (rows 60-79) driven by channels 0
    and 1 only. Zeroing W[a, 0] and W[a, 1] is the unique smallest fix."""
    rng = np.random.default_rng(seed)
    f = rng.uniform(0, 0.2, (N, C)).astype(np.float32)
    lab = np.zeros((N, K), np.float32)
    lab[:60, 0] = 1
    f[:60, 2:6] += 1.0
    f[60:80, 0] += 1.5
    f[60:80, 1] += 1.5
    lab[100:150, 1] = 1
    lab[120:180, 2] = 1
    w = rng.normal(0, 0.3, (K, C)).astype(np.float32)
    w[0, :6] = 1.0
    b = np.array([-2.0, 0.1, -0.1], np.float32)
    return Features(f, w, b, lab, tuple(f"i{i}" for i in range(N)), ("a", "b", "c"),
                    "multilabel", "val")


def test_minimal_set_on_planted_case():
    ft = planted()
    r = surgical_correction(ft, "a", ft, below_threshold=True)
    assert r.success and sorted(r.plan.channels) == [0, 1]
    assert r.search["exhaustive"]["minimal_within_pool"]
    assert all(p < 0.5 for p in r.target_prob_after)
    assert r.tp_lost == 0 and r.tp_total == 60
    assert r.other_logits_identical and r.other_weights_identical
    for name in ("b", "c"):
        assert r.auroc_after[name] == r.auroc_before[name]
    # the patched features: only row a changed, exactly those two weights
    w0, w1 = ft.weight, r.features.weight
    assert np.array_equal(np.flatnonzero((w0 != w1).any(1)), [0])
    assert np.array_equal(np.flatnonzero(w0[0] != w1[0]), [0, 1])
    np.testing.assert_array_equal(ft.logits()[:, 1:], r.features.logits()[:, 1:])


def test_single_weight_suffices_for_small_delta():
    ft = planted()
    r = surgical_correction(ft, 0, ft, fp_ids=[f"i{i}" for i in range(60, 80)], delta_prob=0.2)
    assert r.success and len(r.plan.channels) == 1
    assert np.mean(r.delta_prob) <= -0.2


def test_tp_constraint_honoured_and_budget():
    ft = planted()
    # make channel 0 also carry the TPs: zeroing it would kill TPs
    f = ft.features.copy()
    f[:60, 0] += 1.5
    f[:60, 2:6] = 0.1
    ft2 = Features(f, ft.weight, ft.bias, ft.labels, ft.ids, ft.class_names, ft.task, "val")
    mask = (np.arange(N) >= 60) & (np.arange(N) < 80)
    r = surgical_correction(ft2, "a", ft2, fp_mask=mask, below_threshold=True, tp_loss_budget=0)
    assert not r.success and r.plan is None and not r.applied
    assert "true positives" in r.message
    assert r.search["skipped_for_tp"]  # candidates carrying the TPs were refused
    # with a budget the TP loss stays within it (and the constraint was binding)
    r2 = surgical_correction(ft2, "a", ft2, fp_mask=mask, below_threshold=True,
                             tp_loss_budget=60)
    assert r2.success and 0 < r2.tp_lost <= 60
    assert all(p < 0.5 for p in r2.target_prob_after)


def test_adjust_bias_keeps_true_positives():
    ft = planted()
    r = surgical_correction(ft, "a", ft, below_threshold=True, adjust_bias=True)
    assert r.success and r.tp_lost == 0
    assert all(p < 0.5 for p in r.target_prob_after)


def test_dry_run_and_plan_apply_on_model(tmp_path):
    from medscalpel.data.transforms import Preprocess
    from medscalpel.models.checkpoint import load_model, make_card
    from medscalpel.models.zoo import create_model

    ft = planted()
    model = create_model("vgg_tiny", K, img_size=32)
    # give the live model the planted classifier (feature dim must match): use a fresh Linear
    model.classifier = torch.nn.Linear(C, K)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(ft.weight))
        model.classifier.bias.copy_(torch.from_numpy(ft.bias))
    model.card = make_card(model, ["a", "b", "c"], "multilabel", Preprocess(size=32))
    dry = surgical_correction(model, "a", ft, below_threshold=True, dry_run=True)
    assert dry.success and not dry.applied and dry.model is None
    w_before = model.classifier.weight.detach().clone()
    r = surgical_correction(model, "a", ft, below_threshold=True, out_dir=tmp_path / "m")
    assert torch.equal(model.classifier.weight, w_before)  # caller's model untouched
    loaded = load_model(tmp_path / "m")
    assert loaded.card.lineage[-1]["method"] == "surgical_correction"
    assert torch.equal(loaded.classifier.weight[1:], w_before[1:])
    assert (tmp_path / "m" / "surgery.json").is_file()
    plan = SurgeryPlan.from_dict(r.plan.to_dict())
    again = plan.apply(model)
    assert torch.equal(again.classifier.weight, r.model.classifier.weight)
    with pytest.raises(ModelError, match="differ from the plan's old weights"):
        plan.apply(again)


def test_errors():
    ft = planted()
    with pytest.raises(ConfigError, match="exactly one goal"):
        surgical_correction(ft, "a", ft)
    with pytest.raises(ConfigError, match="unknown class 'zz'"):
        surgical_correction(ft, "zz", ft, below_threshold=True)
    with pytest.raises(DataError, match="labelled positive"):
        surgical_correction(ft, "a", ft, fp_ids=["i0"], below_threshold=True)
    with pytest.raises(DataError, match="not in the target features"):
        surgical_correction(ft, "a", ft, fp_ids=["nope"], below_threshold=True)
    p = Predictions(ft.logits(), ft.labels, ft.ids, ft.class_names, "multilabel")
    with pytest.raises(DataError, match="needs penultimate features"):
        surgical_correction(ft, "a", p, below_threshold=True)
    other = Features(ft.features, ft.weight * 2, ft.bias, ft.labels, ft.ids, ft.class_names,
                     ft.task)
    with pytest.raises(DataError, match="another classifier"):
        surgical_correction(ft, "a", other, below_threshold=True)


def test_surgery_from_rule_with_confounder_flags():
    from medscalpel.data.base import ArrayDataset
    from medscalpel.data.transforms import Preprocess
    from medscalpel.models.zoo import create_model

    rng = np.random.default_rng(0)
    n = 40
    img = rng.random((n, 32, 32)).astype(np.float32)
    tube = np.zeros(n, bool)
    tube[::3] = True
    img[tube, 10:20, 14:18] = 1.0  # a bright "tube"
    lab = np.zeros((n, 2), np.float32)
    lab[1::4, 0] = 1
    ds = ArrayDataset(img, lab, ["Pneumothorax", "Other"], "multilabel",
                      preprocess=Preprocess(size=32))
    ds.confounders = {"chest_tube": tube}
    model = create_model("vgg_tiny", 2, img_size=32)
    with torch.no_grad():
        model.classifier.bias[0] = 5.0  # everything predicted positive: many false positives
    assert np.array_equal(confounder_flags(ds.subset([0, 3, 4]), "chest_tube"), tube[[0, 3, 4]])
    r = surgery_from_rule(model, ds, "chest_tube", "Pneumothorax", delta_prob=0.001,
                          adjust_bias=True, progress=False, device="cpu")
    assert r.settings["rule"] == "confounder 'chest_tube'"
    assert r.settings["n_targets"] == int((tube & (lab[:, 0] == 0)).sum())
    with pytest.raises(DataError, match="exposes no confounder 'ap_marker'"):
        surgery_from_rule(model, ds, "ap_marker", 0, below_threshold=True, progress=False,
                          device="cpu")


def test_ladder_records_every_goal_and_marks_a_fallback_partial():
    import functools

    from medscalpel.repair.surgery import surgery_ladder

    ft = planted()
    # FPs (rows 60-79) share channel 0 with the TPs, so "below threshold" is impossible without
    # losing TPs; a mean drop of 0.2 is possible with a bias shift
    f = ft.features.copy()
    f[:60, 0] += 1.5
    f[:60, 2:6] = 0.1
    ft2 = Features(f, ft.weight, ft.bias, ft.labels, ft.ids, ft.class_names, ft.task, "val")
    mask = (np.arange(N) >= 60) & (np.arange(N) < 80)
    run = functools.partial(surgical_correction, ft2, "a", ft2, fp_mask=mask)
    lad = surgery_ladder(run, [{"below_threshold": True},
                               {"delta_prob": 0.2, "adjust_bias": True}])
    assert lad.status == "partial" and lad.kept == 1 and len(lad.attempts) == 2
    first, second = lad.attempts
    assert not first["success"] and second["success"] and second["goal_met"]
    d = lad.to_dict()
    assert d["ladder"]["status"] == "partial" and d["goal"] == "mean"
    still = d["false_positives_still_above_threshold"]
    # honest count, recomputed here from the kept result's float32 probabilities
    k = int(np.sum(np.asarray(lad.result.target_prob_after) >= 0.5))
    assert still == {"k": k, "n": 20, "text": f"{k}/20"} and k > 0
    assert first["false_positives_still_above_threshold"]["k"] == 20  # nothing applied
    full = surgery_ladder(functools.partial(surgical_correction, ft, "a", ft),
                          [{"below_threshold": True}])
    assert full.status == "full" and full.to_dict()["false_positives_still_above_threshold"][
        "text"] == "0/20"
    with pytest.raises(ConfigError, match="at least one goal"):
        surgery_ladder(run, [])


def test_success_is_decided_in_the_model_dtype_not_float64():
    """A target whose float64 margin is a hair below the threshold but whose float32 logit
    rounds onto it is still decided positive by the float32 model: not a success."""
    from medscalpel.repair.surgery.correct import _verify_in_model_dtype

    thr_logit = float(torch.logit(torch.tensor(0.5)))  # 0.0
    z0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float32)
    z1 = torch.tensor([[np.float32(thr_logit), 0.0], [1.0, 0.0]], dtype=torch.float32)
    v = _verify_in_model_dtype(z0, z1, 1, np.array([0]), np.array([0]), 0, "multilabel", 0.5,
                               "below", 0.0)
    assert v["dtype"] == "float32" and v["above"] == 1 and not v["goal_met"]
    assert v["lost"].size == 0
