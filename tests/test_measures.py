"""One implementation of each measure (issue 32, deliverables 3 and 8): faithfulness on a scale
that does not measure confidence, one ECE, one temperature fit, the "nothing positive" cut,
bootstrap CIs that count the replicates they drop."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from medscalpel.audit.changes import calibration_change, explanation_change
from medscalpel.audit.changes._util import boot_weights, mean_with_ci
from medscalpel.audit.changes.faithfulness import deletion_insertion, road_scores
from medscalpel.audit.stats import correlate
from medscalpel.engine import external as ext
from medscalpel.engine.metrics import (calibration_bins, evaluate, expected_calibration_error,
                                       weighted_ece)
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError
from medscalpel.models.zoo import create_model
from medscalpel.repair import calibrate, triage
from medscalpel.repair.shift import SiteRecalibrator


def _ml(z, y, names=None):
    z = np.asarray(z, np.float32)
    names = names or tuple(f"c{j}" for j in range(z.shape[1]))
    return Predictions(z, np.asarray(y, np.float32), ids=tuple(str(i) for i in range(len(z))),
                       class_names=names, task="multilabel")


# ----------------------------------------------------------------------------- faithfulness
def _linear_model() -> nn.Module:
    """logit = 3 x00 + x01 + x10 + x11 - 1 on a 1x2x2 image."""
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([[3.0, 1.0, 1.0, 1.0]]))
        m[1].bias.fill_(-1.0)
    return m


def test_deletion_insertion_by_hand():
    """x = [[2, 0], [0, 0]]: clean logit 5, mean image (0) logit -1, blurred image (3x3 mean,
    replicate padding: [[8, 4], [4, 2]] / 9) logit 25/9. Steps of one pixel (steps=4); each
    log-odds curve is scaled to its own span, then integrated (trapezoid, dx = 1/4)."""
    m = _linear_model()
    x = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    bad = np.array([[[0.1, 0.2], [0.3, 0.4]]])      # the one informative pixel last
    good = bad[:, ::-1, ::-1].copy()                 # ... first
    t = np.array([0])
    d, i = deletion_insertion(m, x, bad, t, steps=4)
    # deletion log-odds 5, 5, 5, 5, -1 -> over its span [-1, 5]: 1, 1, 1, 1, 0
    assert d[0] == pytest.approx(0.25 * (0.5 + 1 + 1 + 1 + 0))
    # insertion (25, 23, 19, 15, 45) / 9 -> over [15/9, 45/9]: 1/3, 4/15, 2/15, 0, 1
    assert i[0] == pytest.approx(0.25 * (0.5 / 3 + 4 / 15 + 2 / 15 + 0 + 0.5))
    d, i = deletion_insertion(m, x, good, t, steps=4)
    assert d[0] == pytest.approx(0.25 * 0.5)                          # 5, -1, -1, -1, -1
    # insertion (25, 55, 51, 47, 45) / 9 -> 0, 1, 26/30, 22/30, 20/30
    assert i[0] == pytest.approx(0.25 * (1 + 26 / 30 + 22 / 30 + 10 / 30))
    # the raw RISE probability curve, by hand
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    d, i = deletion_insertion(m, x, good, t, steps=4, measure="probability")
    assert d[0] == pytest.approx(0.25 * (0.5 * sig(5) + 3 * sig(-1) + 0.5 * sig(-1)), abs=1e-6)
    ins = sig(np.array([25, 55, 51, 47, 45]) / 9)
    assert i[0] == pytest.approx(0.25 * (0.5 * ins[0] + ins[1:4].sum() + 0.5 * ins[4]), abs=1e-6)
    with pytest.raises(ConfigError, match="measure"):
        deletion_insertion(m, x, good, t, steps=4, measure="logit")


def _scaled(model: nn.Module, a: float) -> nn.Module:
    """A copy whose logits are ``a`` times the original's (linear head scaled)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.classifier.weight.mul_(a)
        out.classifier.bias.mul_(a)
    return out


@pytest.mark.parametrize("multiclass", [False, True])
def test_normalised_faithfulness_ignores_a_logit_scale(multiclass):
    """Issue 32: the same pixel order on a copy of a model whose logits are scaled by 0.3 changed
    raw-probability deletion by -0.200 and insertion by -0.210. The log-odds curve min-max
    normalised per image is invariant to a positive scale exactly (log-odds / margin scale by
    0.3, the ratio cancels); the tolerance 1e-4 only covers float32 rounding of the forward
    passes."""
    torch.manual_seed(0)
    m = create_model("densenet_tiny", num_classes=3, img_size=32).eval()
    cold = _scaled(m, 0.3)
    x = torch.randn(8, 1, 32, 32)
    maps = np.random.default_rng(1).random((8, 32, 32)).astype(np.float32)
    t = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    kw = dict(steps=4, multiclass=multiclass)
    d0, i0 = deletion_insertion(m, x, maps, t, **kw)
    d1, i1 = deletion_insertion(cold, x, maps, t, **kw)
    assert np.isfinite(d0).sum() >= 6
    assert np.nanmin(np.r_[d0, i0]) >= 0.0 and np.nanmax(np.r_[d0, i0]) <= 1.0   # bounded
    np.testing.assert_allclose(d1, d0, atol=1e-4, equal_nan=True)
    np.testing.assert_allclose(i1, i0, atol=1e-4, equal_nan=True)
    r0 = road_scores(m, x, maps, t, fractions=(0.2, 0.5), multiclass=multiclass, seed=3)
    r1 = road_scores(cold, x, maps, t, fractions=(0.2, 0.5), multiclass=multiclass, seed=3)
    np.testing.assert_allclose(r1, r0, atol=1e-4, equal_nan=True)
    # the raw probabilities are NOT invariant: the artefact this fixes
    p0, q0 = deletion_insertion(m, x, maps, t, measure="probability", **kw)
    p1, q1 = deletion_insertion(cold, x, maps, t, measure="probability", **kw)
    assert np.abs(p1 - p0).max() > 1e-2 and np.abs(q1 - q0).max() > 1e-2


def test_explanation_change_of_a_temperature_copy_is_unchanged():
    """End to end: a 0.3 logit-scaled copy has the same Grad-CAM maps (scaled gradients,
    min-max normalised) and so the same normalised faithfulness; the probability measure,
    kept for comparison, reports a change."""
    torch.manual_seed(0)
    dense = create_model("densenet_tiny", num_classes=3, img_size=64)
    cold = _scaled(dense, 0.3)
    x = torch.randn(10, 1, 64, 64)
    kw = dict(class_names=["a", "b", "c"], n_faithfulness=10, steps=4, n_boot=50,
              road_fractions=(0.3,), progress=False)
    r = explanation_change(dense, cold, x, **kw)
    for k in ("deletion", "insertion", "road"):
        f = r.faithfulness[k]
        assert f["delta"]["n"] >= 5 and abs(f["delta"]["mean"]) < 1e-3, (k, f["delta"])
        assert set(f["flat_images"]) == {"ref", "new"} and f["delta"]["dropped"] == 0
    assert r.meta["faithfulness_measure"].startswith("normalised")
    assert r.schema_version == 2
    raw = explanation_change(dense, cold, x, faithfulness_measure="probability", **kw)
    assert abs(raw.faithfulness["deletion"]["delta"]["mean"]) > 1e-2
    assert raw.meta["faithfulness_measure"].startswith("probability")
    back = type(r).from_dict(r.to_dict())
    assert back.faithfulness["deletion"]["flat_images"] == r.faithfulness["deletion"][
        "flat_images"]


def test_flat_images_are_not_scored():
    """An image whose output does not move under deletion / insertion (a black image: blurred
    and deleted are itself) carries nothing to order."""
    m = _linear_model()
    x = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    maps = np.random.default_rng(0).random((2, 2, 2))
    d, i = deletion_insertion(m, x, maps, np.array([0, 0]), steps=4)
    assert np.isfinite(d[0]) and np.isnan(d[1]) and np.isnan(i[1])


# ----------------------------------------------------------------------------- ECE
def test_one_ece_by_hand_and_golden():
    y = np.array([1, 0, 0, 1, 1])
    p = np.array([0.75, 0.75, 0.25, 0.25, 1.0])
    # 4 equal-width bins [0, .25), [.25, .5), [.5, .75), [.75, 1]: p = 1.0 joins the last one
    assert calibration_bins(p, 4).tolist() == [3, 3, 1, 1, 3]
    assert calibration_bins(np.array([0.0, 0.1, 0.5, 0.999, 1.0]), 10).tolist() == [0, 1, 5, 9, 9]
    # bin 3: |(-.25) + .75 + 0| = .5; bin 1: |.25 - .75| = .5 -> (0.5 + 0.5) / 5
    assert expected_calibration_error(y, p, 4) == pytest.approx(0.2)
    # weights 2, 0, 0, 0, 1: bin 3 |2 * (-.25) + 0| = .5 over weight 3
    w = np.array([[1, 1, 1, 1, 1], [2, 0, 0, 0, 1], [0, 0, 0, 0, 0]], float)
    got = weighted_ece(y, p, w, 4)
    assert got[:2] == pytest.approx([0.2, 0.5 / 3]) and np.isnan(got[2])
    # golden value on seeded data (10 bins), so a change of binning fails here
    rng = np.random.default_rng(0)
    pg = rng.random(500)
    yg = (rng.random(500) < pg ** 1.5).astype(float)
    assert expected_calibration_error(yg, pg) == pytest.approx(0.1008699118, abs=1e-9)


def test_every_caller_uses_the_one_ece():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, (300, 2))
    y = (rng.random((300, 2)) < 1 / (1 + np.exp(-0.5 * z))).astype(np.float32)
    a = _ml(z, y)
    pa = a.probs().astype(np.float64)
    want = [expected_calibration_error(y[:, j], pa[:, j], 10) for j in range(2)]
    # engine/external.py (per class, internal side)
    r = ext.external_validation(None, a, _ml(-z, y), n_boot=0)
    assert [c["ece"] for c in r.internal["classes"]] == pytest.approx(want, abs=1e-12)
    assert ext.weighted_ece is weighted_ece
    # audit/changes/calibration.py
    cc = calibration_change(a, a, n_boot=0)
    assert [c.ece_ref for c in cc.classes] == pytest.approx(want, abs=1e-12)
    # repair/triage/diagnosis.py
    assert triage.ece_binary(y[:, 0], pa[:, 0]) == pytest.approx(want[0], abs=1e-12)
    # repair/calibrate/multiclass.py: top-label ECE of a multi-class model = ECE of
    # (argmax right, max p)
    probs = rng.dirichlet(np.ones(4), 200)
    lab = rng.integers(0, 4, 200)
    assert calibrate.expected_calibration_error(probs, lab) == pytest.approx(
        expected_calibration_error(probs.argmax(1) == lab, probs.max(1), 15), abs=1e-12)


# ----------------------------------------------------------------------------- temperature
def _grid_t(nll, lo=0.05, hi=20.0):
    ts = np.exp(np.linspace(np.log(lo), np.log(hi), 4001))
    return ts[int(np.argmin([nll(t) for t in ts]))], ts[1] / ts[0]


def test_one_temperature_fit_matches_a_grid_search():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (800, 4))
    pr = np.exp(z / 2.5) / np.exp(z / 2.5).sum(1, keepdims=True)
    lab = np.array([rng.choice(4, p=q) for q in pr])

    def nll_mc(t):
        s = z / t
        s = s - s.max(1, keepdims=True)
        return -np.mean(s[np.arange(len(lab)), lab] - np.log(np.exp(s).sum(1)))

    got = calibrate.fit_temperature(z, lab)
    best, step = _grid_t(nll_mc)
    assert abs(np.log(got) - np.log(best)) <= np.log(step) and 2.0 < got < 3.1
    onehot = np.eye(4)[lab]
    assert calibrate.fit_temperature(z, onehot) == pytest.approx(got, rel=1e-9)
    # multi-label with NaN cells and weights, as site recalibration calls it
    zl = rng.normal(0, 3, (600, 2))
    yl = (rng.random((600, 2)) < 1 / (1 + np.exp(-zl / 2.0))).astype(float)
    yl[:50, 1] = np.nan
    w = np.where(np.isfinite(yl), rng.uniform(0.5, 2, yl.shape), 0.0)

    def nll_ml(t):
        k = np.isfinite(yl)
        s = zl[k] / t
        return np.sum(w[k] * (np.logaddexp(0, s) - yl[k] * s)) / np.sum(w[k])

    got = calibrate.fit_temperature(zl, yl, task="multilabel", weights=w)
    best, step = _grid_t(nll_ml)
    assert abs(np.log(got) - np.log(best)) <= np.log(step)
    assert not hasattr(calibrate, "_golden") and "golden" not in (
        calibrate.fit_temperature.__doc__ or "")


# ----------------------------------------------------------------------------- shift cut
def test_nothing_positive_cut_stays_above_a_float32_one():
    """Before the fix the "nothing positive" cut was clamped to 1.0, and a probability stored
    as float32 that rounds to exactly 1.0 (logit >= ~17) met it: called positive."""
    rng = np.random.default_rng(0)
    z = np.r_[rng.normal(-2, 1, 20), rng.normal(2, 1, 19), 30.0][:, None]
    y = np.r_[np.zeros(20), np.ones(20)][:, None]
    sample = _ml(z, y)
    assert sample.probs().max() == 1.0                        # float32 rounds sigmoid(30) to 1
    rec = SiteRecalibrator("threshold").fit(sample, [0.5],
                                            target=[{"sensitivity": 0.0, "specificity": 1.0}])
    assert rec.thresholds_[0] > 1.0
    assert not rec.decide(sample).any()
    assert not rec.decide(_ml([[40.0], [100.0]], [[1.0], [1.0]])).any()


# ----------------------------------------------------------------------------- dropped replicates
def test_bootstrap_cis_count_the_replicates_they_drop():
    rng = np.random.default_rng(0)
    n = 40
    z = rng.normal(0, 1, (n, 2))
    y = np.zeros((n, 2), np.float32)
    y[:20, 0] = 1                               # balanced class
    y[0, 1] = 1                                 # one positive: most resamples miss it or not
    z[0, 1] = 3.0
    a, b = _ml(z, y), _ml(z + rng.normal(0, 0.5, z.shape), y)
    r = ext.external_validation(None, a, b, n_boot=200)
    common, rare = r.internal["classes"]
    assert common["auroc_ci_dropped"] == 0
    # P(no positive drawn) = (39/40)^40 ~ 0.36 of 200 replicates
    assert 40 < rare["auroc_ci_dropped"] < 110
    assert r.internal["macro"]["auroc_ci_replicates_missing_a_class"] == rare["auroc_ci_dropped"]
    assert r.classes[1]["delta"]["auroc"]["dropped"] >= rare["auroc_ci_dropped"]
    ev = evaluate(a, n_boot=100)
    assert ev.macro["auroc_ci_dropped"] == 0 and 15 < ev.macro["ci_replicates_missing_a_class"]
    # per-image means (explanation scores) and correlations
    v = np.r_[1.0, np.full(9, np.nan)]
    v[1] = 2.0
    s = mean_with_ci(v, boot_weights(10, 300, 0), 0.95)
    assert s["dropped"] == int(((boot_weights(10, 300, 0)[:, :2]).sum(1) == 0).sum()) > 0
    c = correlate(np.r_[np.zeros(9), 1.0], np.arange(10.0), n_boot=300)
    assert 50 < c.pearson_ci_dropped < 150 and c.to_dict()["pearson_ci_dropped"] > 0
