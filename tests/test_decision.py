"""The decision primitive: hand-computable pass / fail / undecided, Holm against brute-force
closed testing, unscorable units named (undecided unless accepted), NaN replicates counted,
paired DeLong against a brute-force DeLong, and PairedComparison.verdict / meets_floor."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from medscalpel.engine.compare import PairedComparison, compare_predictions
from medscalpel.engine.decision import (UnitInput, Verdict, decide, delong_covariance, holm,
                                        more_images, paired_delong)
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.runs import dumps_json, read_json, write_json


def _unit(name, reps, est=None, n=100, n_pos=50, n_neg=50):
    reps = np.asarray(reps, float)
    return UnitInput(name, float(np.nanmean(reps)) if est is None else est, n, n_pos, n_neg,
                     replicates=reps)


# ----------------------------------------------------------------------------- hand cases
def test_bootstrap_pass_undecided_fail_by_hand():
    # one unit: one-sided alpha 0.025; 2 of 100 replicates below -0.01 -> share 0.02 < 0.025
    two_low = np.r_[np.full(98, 0.0), [-0.02, -0.02]]
    v = decide([_unit("a", two_low, est=0.0)], margin=0.01)
    u = v.unit("a")
    assert v.outcome == u.outcome == "pass" and v.n_tests == 1
    assert u.p_pass == pytest.approx(0.02) and u.level_adj == pytest.approx(0.025)
    assert (u.ci_low, u.ci_high) == (0.0, 0.0)    # 2.5% quantile of 98 zeros and two -0.02
    # three below -> share 0.03 >= 0.025: not shown; the lower bound is -0.02
    three_low = np.r_[np.full(97, 0.0), [-0.02] * 3]
    u = decide([_unit("a", three_low, est=0.0)], margin=0.01).unit("a")
    assert u.outcome == "undecided" and u.ci_low == -0.02 and u.ci_high == 0.0
    # harm certain: 2 of 100 replicates at or above -0.01
    harm = np.r_[np.full(98, -0.03), [-0.01, 0.0]]
    v = decide([_unit("a", harm, est=-0.03)], margin=0.01)
    assert v.outcome == "fail" and v.unit("a").p_fail == pytest.approx(0.02)
    assert v.unit("a").ci_high == -0.03 and "loss beyond the margin shown" in v.reason
    # point estimate below -m, interval straddling -m: undecided, said to lean to a loss
    lean = np.r_[np.full(50, -0.03), np.full(50, 0.0)]
    u = decide([_unit("a", lean, est=-0.015)], margin=0.01).unit("a")
    assert u.outcome == "undecided" and "likely but not shown" in u.reason


def test_normal_approximation_by_hand_and_more_images():
    z = 1.959963984540054
    v = decide([UnitInput("a", 0.0, 100, se=0.004)], margin=0.01)
    assert v.outcome == "pass" and v.unit("a").ci_low == pytest.approx(-z * 0.004)
    u = decide([UnitInput("a", 0.0, 100, se=0.006)], margin=0.01).unit("a")
    assert u.outcome == "undecided" and u.ci_low == pytest.approx(-z * 0.006)
    # n * ((z_0.025 + z_0.8) * se / (est + m))^2 = 100 * (2.80158 * 0.6)^2 = 282.56 -> 183 more
    assert u.more_images == 183 == more_images(100, 0.0, 0.006, 0.01, 0.025)
    assert "183 more images" in u.reason and "estimate" in u.reason
    f = decide([UnitInput("a", -0.03, 100, se=0.005)], margin=0.01)
    assert f.outcome == "fail" and f.unit("a").ci_high == pytest.approx(-0.03 + z * 0.005)
    assert more_images(100, -0.01, 0.006, 0.01, 0.025) is None   # on the margin: no estimate
    # a bit-identical copy: zero-width interval passes at any margin >= 0
    assert decide([_unit("a", np.zeros(200))], margin=0.0).outcome == "pass"


# ----------------------------------------------------------------------------- Holm
def _closed_testing(p, alpha):
    """Brute force: reject H_i iff every intersection containing i is rejected by Bonferroni
    (min p in S < alpha / |S|) - the closed testing procedure that Holm shortcuts."""
    k = len(p)
    out = []
    for i in range(k):
        ok = True
        for r in range(1, k + 1):
            for s in itertools.combinations(range(k), r):
                if i in s and not min(p[j] for j in s) < alpha / len(s):
                    ok = False
        out.append(ok)
    return np.array(out)


def test_holm_equals_brute_force_closed_testing():
    rng = np.random.default_rng(0)
    for trial in range(60):
        k = int(rng.integers(1, 7))
        p = rng.choice([0.001, 0.004, 0.008, 0.01, 0.0125, 0.02, 0.03, 0.2], size=k)
        rejected, levels = holm(p, 0.05)
        assert np.array_equal(rejected, _closed_testing(list(p), 0.05)), p
        # a rejected hypothesis is below its level; one not rejected is at or above it
        assert np.all(p[rejected] < levels[rejected]) and np.all(p[~rejected] >= levels[~rejected])
    rej, lv = holm([0.01, float("nan"), 0.02], 0.05)      # NaN: not tested, not counted
    assert rej.tolist() == [True, False, True] and math.isnan(lv[1])
    assert lv[0] == pytest.approx(0.025) and lv[2] == pytest.approx(0.05)


def test_holm_in_decide_and_its_cost():
    # two units each with 2 of 100 replicates below -m: alone each passes (0.02 < 0.025);
    # Holm tests the first at 0.0125 and stops, so both stay undecided
    r = np.r_[np.full(98, 0.0), [-0.02, -0.02]]
    units = [_unit("a", r, est=0.0), _unit("b", r, est=0.0)]
    v = decide(units, margin=0.01)
    assert v.outcome == "undecided" and v.n_tests == 2 and v.correction == "holm"
    assert [u.level_adj for u in v.units] == pytest.approx([0.0125, 0.0125])
    assert all(u.ci_low < -0.01 for u in v.units)    # the interval agrees with the outcome
    none = decide(units, margin=0.01, correction="none")
    assert none.outcome == "pass" and "none over 2" in none.summary()


# ----------------------------------------------------------------------------- evidence rules
def test_unscorable_unit_is_named_and_undecided_unless_accepted():
    ok = _unit("ok", np.zeros(200))
    rare = _unit("rare", np.zeros(200), n_pos=3, n_neg=197)
    v = decide([ok, rare], margin=0.01)
    assert v.outcome == "undecided" and v.unscorable == ("rare",)
    assert v.unit("rare").outcome == "unscorable" and "3 positive image(s) < 10" in \
        v.unit("rare").reason
    assert "rare" in v.summary() and "\n" not in v.summary() and v.n_tests == 1
    acc = decide([ok, rare], margin=0.01, accepted_unscorable=["rare"])
    assert acc.outcome == "pass" and acc.accepted_unscorable == ("rare",)
    assert "accepted unchecked: rare" in acc.summary()
    assert decide([ok, rare], margin=0.01, min_pos=3).outcome == "pass"   # configurable
    with pytest.raises(ConfigError, match="accepted_unscorable"):
        decide([ok, rare], margin=0.01, accepted_unscorable=["nope"])
    # a fail is a fail even with unscorable units around
    bad = _unit("bad", np.full(200, -0.05))
    assert decide([bad, rare], margin=0.01).outcome == "fail"
    nan = UnitInput("nan", float("nan"), 100, 20, 80, replicates=np.full(50, np.nan))
    assert "delta undefined" in decide([ok, nan], margin=0.01).unit("nan").reason
    with pytest.raises(ConfigError, match="exactly one of"):
        decide([UnitInput("x", 0.0, 10)], margin=0.01)
    with pytest.raises(ConfigError, match="'margin' parameter of decide"):
        decide([ok], margin=-0.01)


def test_nan_replicates_are_counted_against_the_decision():
    r = np.zeros(1000)
    r[:20] = np.nan                   # 2.0% undefined: still < 2.5% -> pass, counted
    u = decide([_unit("a", r, est=0.0)], margin=0.01).unit("a")
    assert u.outcome == "pass" and u.n_nan_replicates == 20 and u.n_replicates == 1000
    assert u.p_pass == pytest.approx(0.02) and "20 of 1000 bootstrap replicates" in u.reason
    r[:30] = np.nan                   # 3.0% undefined: they cannot be dropped -> undecided
    u = decide([_unit("a", r, est=0.0)], margin=0.01).unit("a")
    assert u.outcome == "undecided" and u.n_nan_replicates == 30 and math.isnan(u.ci_low)


def test_verdict_round_trip(tmp_path):
    v = decide([_unit("a", np.linspace(-0.005, 0.01, 300)),
                _unit("b", np.zeros(300), n_pos=2)], margin=0.01)
    back = Verdict.from_dict(read_json(write_json(tmp_path / "v.json", v.to_dict())))
    assert dumps_json(back.to_dict()) == dumps_json(v.to_dict())
    assert back.units[1].outcome == "unscorable" and back.unscorable == ("b",)


# ----------------------------------------------------------------------------- DeLong
def _delong_brute(y, s1, s2):
    """DeLong et al. (1988) with explicit loops: structural components and the variance of
    AUROC(s2) - AUROC(s1)."""
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    psi = lambda a, b: 1.0 if a > b else (0.5 if a == b else 0.0)  # noqa: E731
    comps = []
    for s in (s1, s2):
        v10 = np.array([np.mean([psi(s[i], s[j]) for j in neg]) for i in pos])
        v01 = np.array([np.mean([psi(s[i], s[j]) for i in pos]) for j in neg])
        comps.append((v10, v01))
    s10 = np.cov(np.stack([comps[0][0], comps[1][0]]))
    s01 = np.cov(np.stack([comps[0][1], comps[1][1]]))
    c = np.array([-1.0, 1.0])
    var = c @ s10 @ c / len(pos) + c @ s01 @ c / len(neg)
    return comps[1][0].mean() - comps[0][0].mean(), math.sqrt(var)


def test_paired_delong_equals_brute_force_with_ties():
    rng = np.random.default_rng(3)
    for n in (9, 24, 40):
        y = rng.random(n) < 0.4
        y[:2], y[2:4] = True, False
        s1 = np.round(rng.standard_normal(n) + y, 1)           # ties
        s2 = np.round(s1 + 0.7 * rng.standard_normal(n), 1)
        d, se = paired_delong(y, s1, s2)
        bd, bse = _delong_brute(y, s1, s2)
        assert d == pytest.approx(bd, abs=1e-12) and se == pytest.approx(bse, rel=1e-10)
    # the covariance matrix: its diagonal is the per-class DeLong variance
    t = (rng.random((30, 2)) < 0.5).astype(float)
    t[:2], t[2:4] = 1, 0
    t[5, 1] = np.nan                                            # unknown label: left out
    a, b = rng.standard_normal((30, 2)) + t, rng.standard_normal((30, 2)) + t
    delta, cov = delong_covariance(t, a, b)
    keep = np.isfinite(t[:, 1])
    bd, bse = _delong_brute(t[keep, 1] > 0.5, a[keep, 1], b[keep, 1])
    assert delta[1] == pytest.approx(bd) and math.sqrt(cov[1, 1]) == pytest.approx(bse)
    assert cov[0, 1] == pytest.approx(cov[1, 0])


def test_delong_se_agrees_with_the_paired_bootstrap():
    rng = np.random.default_rng(1)
    n = 600
    y = (rng.random((n, 2)) < 0.3).astype(np.float32)
    ref = 1.5 * y + rng.standard_normal((n, 2))
    new = ref + 0.6 * rng.standard_normal((n, 2))
    ids = tuple(str(i) for i in range(n))
    a = Predictions(ref, y, ids, ("p", "q"), "multilabel")
    b = Predictions(new, y, ids, ("p", "q"), "multilabel")
    c = compare_predictions(a, b, n_boot=400, seed=0)
    vb, vd = c.verdict(0.01), c.verdict(0.01, method="delong")
    for name in ("p", "q", "macro"):
        assert vd.unit(name).se == pytest.approx(vb.unit(name).se, rel=0.2)
        assert vd.unit(name).estimate == pytest.approx(vb.unit(name).estimate, abs=1e-12)


# ----------------------------------------------------------------------------- compare wiring
def _preds(n=300, k=3, seed=0, rare_pos=None):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.float32)
    if rare_pos is not None:
        y[:, -1] = 0
        y[:rare_pos, -1] = 1
    logits = (2.0 * y - 1.0) + rng.standard_normal((n, k))
    ids = tuple(f"i{i}" for i in range(n))
    return Predictions(logits, y, ids, tuple(f"c{j}" for j in range(k)), "multilabel")


def test_comparison_verdict_identical_and_planted_damage(tmp_path):
    a = _preds()
    same = compare_predictions(a, a, n_boot=200, seed=0).verdict(0.01)
    assert same.outcome == "pass" and [u.name for u in same.units] == ["c0", "c1", "c2",
                                                                        "macro"]
    assert same.n_tests == 4 and all(u.ci_low == 0.0 for u in same.units)
    logits = a.logits.copy()
    logits[:, 1] += 3.0 * np.random.default_rng(5).standard_normal(a.n)
    hurt = Predictions(logits, a.labels, a.ids, a.class_names, a.task)
    c = compare_predictions(a, hurt, n_boot=300, seed=0)
    v = c.verdict(0.01)
    assert v.outcome == "fail" and v.unit("c1").outcome == "fail" and "c1" in v.reason
    assert v.unit("c0").outcome == "pass"
    # after save / load the replicates are gone: bootstrap refuses, DeLong (stored) decides
    back = PairedComparison.load(c.save(tmp_path))
    with pytest.raises(DataError, match="no bootstrap replicates"):
        back.verdict(0.01)
    # AUROC-only bootstrap: the same AUROC replicates (same resamples), no AP interval
    fast = compare_predictions(a, hurt, n_boot=300, seed=0, boot_metrics=("auroc",))
    assert np.array_equal(fast.replicates["auroc"], c.replicates["auroc"])
    assert fast.verdict(0.01).to_dict() == v.to_dict()
    assert fast.classes[1].delta_ap == c.classes[1].delta_ap
    assert math.isnan(fast.classes[1].delta_ap_ci[0]) and fast.meta["boot_metrics"] == ["auroc"]
    with pytest.raises(DataError, match="no bootstrap replicates of 'ap'"):
        fast.verdict(0.01, metric="ap")
    assert back.verdict(0.01, method="delong").unit("c1").outcome == "fail"
    with pytest.raises(ConfigError, match="DeLong is for AUROC"):
        back.verdict(0.01, metric="ap", method="delong")


def test_rare_class_is_not_silently_skipped():
    a = _preds(n=120, rare_pos=3)
    logits = a.logits.copy()
    logits[:, 2] = -logits[:, 2]                       # the rare class is destroyed
    b = Predictions(logits, a.labels, a.ids, a.class_names, a.task)
    c = compare_predictions(a, b, n_boot=200, seed=0)
    v = c.verdict(0.01)
    assert v.unit("c2").outcome == "unscorable" and v.unscorable == ("c2",)
    assert v.outcome == "undecided" and "c2 (3 positive image(s) < 10)" in v.summary()
    assert "over 2 of 3 classes" in v.unit("macro").note
    # resamples without any of the 3 positives: counted in the comparison and in the verdict
    cd = c.classes[2]
    assert cd.n_nan_replicates > 0
    low = c.verdict(0.01, min_pos=1)
    assert low.unit("c2").n_nan_replicates == cd.n_nan_replicates
    assert c.macro["n_replicates_with_undefined_class"] == cd.n_nan_replicates
    # meets_floor: a class without positives is named and the floor is not "met"
    z = _preds(n=120, rare_pos=0)
    ok, reasons = compare_predictions(z, z, n_boot=0).meets_floor()
    assert ok is None and any(r.startswith("c2: not checked") for r in reasons)
    ok, reasons = compare_predictions(a, a, n_boot=0).meets_floor()
    assert ok is True and reasons == []
