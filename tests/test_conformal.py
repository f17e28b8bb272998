"""Conformal guarantees for thresholds, checked against brute-force simulation.

Scores of positives are N(mu, 1) (negatives N(0, 1)), so the POPULATION recall of any threshold
is known exactly (``1 - Phi(t - mu)``): each simulated calibration draw is judged by the true
recall of the threshold it produced, not by another noisy sample.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError, MedScalpelError
from medscalpel.repair.conformal import (ClassGuarantee, GuaranteeResult, GuaranteeSpecError,
                                         Recertification, calibrate_guarantee, clopper_pearson,
                                         min_positives, parse_guarantee, patient_split,
                                         recall_order_statistic, recertify)

MU = 2.0


def _preds(z, y, names=None, split="cal", model_id="m"):
    z = np.asarray(z, np.float32).reshape(len(z), -1)
    y = np.asarray(y, np.float32).reshape(z.shape)
    names = names or tuple(f"c{j}" for j in range(z.shape[1]))
    return Predictions(z, y, ids=tuple(f"{split}{i}" for i in range(len(z))),
                       class_names=tuple(names), task="multilabel", split=split,
                       model_id=model_id)


def _draw(rng, n_pos, n_neg=0, k=1):
    z = np.r_[rng.normal(MU, 1.0, (n_pos, k)), rng.normal(0.0, 1.0, (n_neg, k))]
    y = np.r_[np.ones((n_pos, k)), np.zeros((n_neg, k))]
    return z, y


def _true_recall(t):
    return 1.0 - norm.cdf(t - MU)


def _sim_tolerance(p, n):
    """Three binomial standard errors of a simulated share."""
    return 3.0 * math.sqrt(p * (1 - p) / n)


# ----------------------------------------------------------------------------- spec, min-n
def test_parse_guarantee_forms_and_one_line_errors():
    assert parse_guarantee("recall>=0.90") == parse_guarantee(" recall >= 0.9 ")
    assert parse_guarantee("E[recall]>=0.9").kind == "recall_mean"
    assert parse_guarantee("precision>=0.8").text == "precision>=0.8"
    assert parse_guarantee("fnr<=0.1").high_probability is False
    for bad, msg in (("recall>0.9", "Cannot read the guarantee 'recall>0.9'"),
                     ("recall<=0.9", "recall takes '>='"), ("fnr>=0.1", "fnr takes '<='"),
                     ("recall>=1.5", "strictly between 0 and 1"), ("auc>=0.9", "write one of")):
        with pytest.raises(GuaranteeSpecError, match=msg.replace("[", r"\[")) as ex:
            parse_guarantee(bad)
        assert isinstance(ex.value, MedScalpelError) and "\n" not in str(ex.value)


def test_min_positives_rule_matches_brute_force():
    for target in (0.8, 0.9, 0.95):
        for alpha in (0.05, 0.1, 0.2):
            n_min = min_positives("recall", target, alpha)
            assert target ** n_min <= alpha < target ** (n_min - 1)
            # the order-statistic rule certifies first at exactly n_min positives
            assert recall_order_statistic(n_min, target, alpha) == 1
            assert recall_order_statistic(n_min - 1, target, alpha) == 0
        n_crc = min_positives("recall_mean", target)
        assert recall_order_statistic(n_crc, target, None) == 1
        assert recall_order_statistic(n_crc - 1, target, None) == 0
    assert min_positives("recall", 0.9, 0.1) == 22
    assert min_positives("recall_mean", 0.9) == 9
    assert min_positives("fnr", 0.1) == 9


def test_order_statistic_is_the_clopper_pearson_rule():
    """k is the largest with P(Bin(n, 1-T) <= k-1) <= alpha, i.e. the one-sided CP upper bound
    on the miss rate with k-1 misses is <= 1-T (brute force over every k)."""
    from scipy.stats import beta

    for n in (22, 40, 137, 500):
        k = recall_order_statistic(n, 0.9, 0.1)
        ucb = [beta.ppf(0.9, m + 1, n - m) for m in range(n)]  # CP upper bound, m misses
        brute = max(m + 1 for m in range(n) if ucb[m] <= 0.1 + 1e-12)
        assert k == brute
        assert binom.cdf(k - 1, n, 0.1) <= 0.1 < binom.cdf(k, n, 0.1)


def test_thresholds_are_monotone_in_target_and_alpha():
    rng = np.random.default_rng(3)
    z, y = _draw(rng, 300, 300)
    p = _preds(z, y)
    thr = {}
    for t in (0.8, 0.85, 0.9, 0.95):
        for a in (0.05, 0.1, 0.2):
            thr[t, a] = calibrate_guarantee(p, f"recall>={t}", a).classes[0].threshold_logit
        thr[t, None] = calibrate_guarantee(p, f"E[recall]>={t}").classes[0].threshold_logit
    for a in (0.05, 0.1, 0.2, None):
        seq = [thr[t, a] for t in (0.8, 0.85, 0.9, 0.95)]
        assert all(x >= y for x, y in zip(seq, seq[1:]))  # higher target -> lower threshold
    for t in (0.8, 0.85, 0.9, 0.95):
        seq = [thr[t, a] for a in (0.05, 0.1, 0.2)]
        assert all(x <= y for x, y in zip(seq, seq[1:]))  # more confidence -> lower
        assert thr[t, 0.1] <= thr[t, None]  # the high-probability rule is the stricter one


# ----------------------------------------------------------------------------- brute force
def test_recall_high_probability_holds_over_many_draws():
    """P(true recall >= T) >= 1 - alpha over 2000 calibration draws of 60 positives."""
    rng = np.random.default_rng(0)
    n_draws, target, alpha = 2000, 0.9, 0.1
    ok, certified = 0, 0
    for _ in range(n_draws):
        z, y = _draw(rng, 60, 40)
        c = calibrate_guarantee(_preds(z, y), "recall>=0.9", alpha).classes[0]
        certified += c.certified
        ok += _true_recall(c.threshold_logit) >= target
        # the calibration data never shows more misses than the certificate allows
        assert c.calibration["misses"] <= c.calibration["order_statistic"] - 1
    assert certified == n_draws
    coverage = ok / n_draws
    assert coverage >= 1 - alpha - _sim_tolerance(1 - alpha, n_draws)
    # ... and is not trivially conservative: the exact coverage of the k-th order statistic
    k = recall_order_statistic(60, target, alpha)
    exact = 1 - binom.cdf(k - 1, 60, 1 - target)
    assert abs(coverage - exact) <= _sim_tolerance(exact, n_draws)


def test_recall_with_ties_keeps_its_guarantee():
    """Scores rounded to one decimal (many ties): still >= 1 - alpha."""
    rng = np.random.default_rng(1)
    grid = np.arange(-6, 10, 0.1)
    true = {round(t, 6): 1 - norm.cdf(t - 0.05 - MU) for t in grid}  # P(round(S) >= t)
    ok = 0
    for _ in range(1500):
        z, y = _draw(rng, 40, 0)
        z = np.round(z, 1)
        c = calibrate_guarantee(_preds(z, y), "recall>=0.9", 0.1).classes[0]
        cut = np.round(np.ceil(c.threshold_logit * 10 - 1e-9) / 10, 6)  # first score >= thr
        ok += true[min(true, key=lambda v: abs(v - cut))] >= 0.9
    assert ok / 1500 >= 0.9 - _sim_tolerance(0.9, 1500)


def test_crc_recall_holds_in_expectation_and_matches_k_over_n_plus_1():
    rng = np.random.default_rng(2)
    n, target = 30, 0.9
    miss = []
    for _ in range(3000):
        z, y = _draw(rng, n, 20)
        c = calibrate_guarantee(_preds(z, y), "E[recall]>=0.9").classes[0]
        assert c.alpha is None and c.guarantee == "recall >= 0.90 in expectation"
        miss.append(1 - _true_recall(c.threshold_logit))
    k = recall_order_statistic(n, target, None)
    se = np.std(miss) / math.sqrt(len(miss))
    assert abs(np.mean(miss) - k / (n + 1)) <= 3 * se  # exact for continuous scores
    assert k / (n + 1) <= 1 - target
    assert np.mean(miss) <= 1 - target + 3 * se


def test_precision_high_probability_over_many_draws():
    """Known precision curve: positives N(2,1) with prevalence 0.3, negatives N(0,1)."""
    rng = np.random.default_rng(4)
    pi, target, alpha = 0.3, 0.8, 0.1

    def true_precision(t):
        a = pi * (1 - norm.cdf(t - MU))
        return a / (a + (1 - pi) * (1 - norm.cdf(t)))

    ok, cert = 0, 0
    for _ in range(600):
        y = rng.random(400) < pi
        z = np.where(y, rng.normal(MU, 1, 400), rng.normal(0, 1, 400))
        c = calibrate_guarantee(_preds(z, y), f"precision>={target}", alpha).classes[0]
        if c.certified:
            cert += 1
            ok += true_precision(c.threshold_logit) >= target
    assert cert >= 500  # the model supports precision 0.8 at a high threshold
    assert ok / cert >= 1 - alpha - _sim_tolerance(1 - alpha, cert)


def test_set_fnr_crc_holds_in_expectation():
    rng = np.random.default_rng(5)
    k, n, a = 4, 200, 0.1
    prev = np.array([0.3, 0.2, 0.1, 0.05])
    fnp = []
    for _ in range(300):
        y = rng.random((n, k)) < prev
        z = np.where(y, rng.normal(MU, 1, (n, k)), rng.normal(0, 1, (n, k)))
        c = calibrate_guarantee(_preds(z, y), f"fnr<={a}").classes[0]
        assert c.certified and c.name == "all classes"
        # the expected FNP of a new image with >= 1 finding, by simulation on fresh images
        yt = rng.random((4000, k)) < prev
        yt = yt[yt.any(1)]
        zt = np.where(yt, rng.normal(MU, 1, yt.shape), rng.normal(0, 1, yt.shape))
        fnp.append(np.mean((yt & (zt < c.threshold_logit)).sum(1) / yt.sum(1)))
    assert np.mean(fnp) <= a + 3 * np.std(fnp) / math.sqrt(len(fnp))
    assert np.mean(fnp) > a / 2  # not trivially conservative


# ----------------------------------------------------------------------------- results
def test_too_few_positives_is_not_certified_with_reason():
    rng = np.random.default_rng(6)
    z = np.c_[np.r_[rng.normal(MU, 1, 21), rng.normal(0, 1, 100)],
              np.r_[rng.normal(MU, 1, 22), rng.normal(0, 1, 99)]]
    y = np.c_[np.r_[np.ones(21), np.zeros(100)], np.r_[np.ones(22), np.zeros(99)]]
    r = calibrate_guarantee(_preds(z, y, ("rare", "enough")), "recall>=0.9", 0.1)
    rare, ok = r.classes
    assert not rare.certified and rare.threshold_logit is None
    assert rare.reason == ("too few positives: 21 < 22 needed for recall >= 0.90 with 90% "
                           "confidence")
    assert ok.certified and ok.calibration["order_statistic"] == 1
    assert np.isnan(r.thresholds_prob()[0]) and 0 < r.thresholds_prob()[1] < 1
    # the threshold sits below the lowest positive: every calibration positive is found
    assert ok.calibration["recall"] == 1.0


def test_threshold_is_just_below_the_order_statistic_and_prob_is_its_sigmoid():
    z = np.array([3.0, 2.0, 1.0, 0.5, -1.0])
    y = np.array([1, 1, 1, 0, 0])
    p = _preds(np.tile(z, 9), np.tile(y, 9))
    c = calibrate_guarantee(p, "E[recall]>=0.7").classes[0]
    # 27 positives, k = floor(0.3 * 28) = 8: the 8th smallest positive score is 1.0 (the
    # first of the nine 1.0 ties); the threshold is the float32 just below it
    assert c.calibration["order_statistic"] == 8
    assert c.threshold_logit == float(np.nextafter(np.float32(1.0), np.float32(0)))
    assert c.threshold_prob == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert c.calibration["misses"] == 0  # ties at the cut are all flagged
    assert (p.logits[:, 0] >= c.threshold_logit).sum() == 27


def test_result_round_trips_and_patients_are_counted(tmp_path):
    rng = np.random.default_rng(7)
    z, y = _draw(rng, 50, 50, k=2)
    pids = [f"p{i // 2}" for i in range(100)]
    r = calibrate_guarantee(_preds(z, y), "recall>=0.9", 0.1, patient_ids=pids)
    assert r.n_patients == 50 and r.classes[0].n_patients_positive == 25
    assert any("100 images from 50 patients" in n for n in r.notes)
    r.save(tmp_path)
    back = GuaranteeResult.load(tmp_path)
    assert back == r
    assert json.loads((tmp_path / "guarantee.json").read_text())["classes"][0]["guarantee"] \
        == "recall >= 0.90 with 90% confidence"
    assert ClassGuarantee.from_dict(r.classes[1].to_dict()) == r.classes[1]
    with pytest.raises(DataError, match="Not a guarantee result"):
        GuaranteeResult.from_dict({"schema_version": 99})
    with pytest.raises(DataError, match="3 ids for 100 predictions"):
        calibrate_guarantee(_preds(z, y), "recall>=0.9", patient_ids=["a", "b", "c"])
    with pytest.raises(ConfigError, match="'alpha' parameter of calibrate_guarantee"):
        calibrate_guarantee(_preds(z, y), "recall>=0.9", alpha=1.5)
    mc = Predictions(np.zeros((2, 2), np.float32), np.array([0, 1]), ("a", "b"), ("x", "y"),
                     "multiclass")
    with pytest.raises(ConfigError, match="binary_view"):
        calibrate_guarantee(mc, "recall>=0.9")


def test_patient_split_keeps_patients_apart():
    pids = [f"p{i % 37}" for i in range(200)]
    sp = patient_split(200, pids, 0.3, seed=1)
    a, b = {pids[i] for i in sp.calibration}, {pids[i] for i in sp.held_out}
    assert not a & b and len(a) + len(b) == 37 and sp.unit == "patient"
    assert sorted(np.r_[sp.calibration, sp.held_out]) == list(range(200))
    assert sp.n_patients == (len(a), len(b))
    assert patient_split(10, None, 0.5).unit == "image"


# ----------------------------------------------------------------------------- recertify
def test_recertify_pass_fail_undecided():
    rng = np.random.default_rng(8)
    z, y = _draw(rng, 400, 400)
    r = calibrate_guarantee(_preds(z, y), "recall>=0.9", 0.1)
    thr = r.classes[0].threshold_logit
    # the same model on a big fresh sample: its true recall is above 0.9 -> pass
    z2, y2 = _draw(rng, 5000, 100)
    ok = recertify(r, _preds(z2, y2, split="new"))
    assert ok.outcome == "pass" and ok.rows[0]["n"] == 5000
    lo, hi = ok.rows[0]["ci"]
    assert lo >= 0.9 and lo <= ok.rows[0]["observed"] <= hi
    tail = ok.rows[0]["level_adj"]  # one-sided Holm level of the row (1 row: alpha / 2)
    assert tail == pytest.approx(0.05)
    assert (lo, hi) == pytest.approx(clopper_pearson(ok.rows[0]["successes"], 5000, 1 - 2 * tail))
    # a "compressed" model whose positives lost 0.8 logit: recall at thr falls well below
    bad = recertify(r, _preds(z2 - 0.8 * y2, y2, split="new", model_id="int8"))
    assert bad.outcome == "fail" and bad.rows[0]["ci"][1] < 0.9
    assert bad.model_id == "int8" and bad.certified_model_id == "m"
    # only 30 positives: the interval straddles the level
    few = recertify(r, _preds(z2[:30], y2[:30], split="new"))
    assert few.outcome == "undecided"
    assert Recertification.from_dict(bad.to_dict()) == bad
    assert _true_recall(thr) >= 0.9  # the stored threshold itself was fine
    with pytest.raises(DataError, match="not the certified ones"):
        recertify(r, _preds(z2, y2, names=("other",)))


def test_recertify_holm_and_uncertified_rows():
    rng = np.random.default_rng(9)
    z = np.c_[np.r_[rng.normal(MU, 1, 300), rng.normal(0, 1, 300)],
              np.r_[rng.normal(MU, 1, 10), rng.normal(0, 1, 590)]]
    y = np.c_[np.r_[np.ones(300), np.zeros(300)], np.r_[np.ones(10), np.zeros(590)]]
    r = calibrate_guarantee(_preds(z, y), "recall>=0.9", 0.1)
    out = recertify(r, _preds(z, y, split="new"), alpha=0.1)
    assert out.correction.startswith("holm over 1 certified row(s)")
    assert out.confidence == pytest.approx(0.9)
    assert out.rows[1]["outcome"] == "unscorable" and out.rows[1]["reason"].startswith(
        "not tested: not certified: too few positives")
    assert out.verdict.accepted_unscorable == ("c1",)


# ----------------------------------------------------------------------------- CLI
def test_cli_guarantee(tmp_path, capsys):
    from medscalpel.cli.main import run

    rng = np.random.default_rng(10)
    z, y = _draw(rng, 300, 500, k=2)
    z[:, 1] = np.r_[rng.normal(MU, 1, 300), rng.normal(0, 1, 500)]
    y[:, 1] = np.r_[np.ones(15), np.zeros(285), np.zeros(500)]  # 15 positives: too few
    _preds(z, y, ("a", "b")).save(tmp_path / "fit.npz")
    (tmp_path / "pat.csv").write_text("id,patient\n" + "".join(
        f"cal{i},p{i // 2}\n" for i in range(800)))
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", str(tmp_path / "fit.npz"), "--guarantee", "recall>=0.90",
             "--alpha", "0.1", "--patients", str(tmp_path / "pat.csv"), "--holdout", "0.4",
             "--out", str(tmp_path / "g")])
    out = capsys.readouterr()
    assert ex.value.code == 0, out.err
    assert "recall>=0.9: certified on" in out.out and "split by patient" in out.out
    assert "NO" in out.out and "re-check on" in out.out  # b is not certified
    from medscalpel.layout import read_artifact

    g = read_artifact(tmp_path / "g", "guarantee")
    assert isinstance(g, GuaranteeResult) and g.classes[0].certified
    assert not g.classes[1].certified and "too few positives" in g.classes[1].reason
    assert g.n_patients is not None and g.n_patients < 400
    chk = read_artifact(tmp_path / "g", "guarantee_check")
    assert isinstance(chk, Recertification) and chk.outcome in ("pass", "undecided")
    assert g.n_images + chk.n_images == 800
    # two images a patient: the image-level certificate says so and points to --per-patient
    assert "further images of a patient already counted" in " ".join(out.out.split())
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", str(tmp_path / "fit.npz"), "--guarantee", "recall>=0.90",
             "--patients", str(tmp_path / "pat.csv"), "--per-patient", "--out",
             str(tmp_path / "pp")])
    out = capsys.readouterr()
    assert ex.value.code == 0, out.err
    assert "further images of a patient" not in out.out
    pp = read_artifact(tmp_path / "pp", "guarantee")
    full = calibrate_guarantee(_preds(z, y, ("a", "b")), "recall>=0.90", 0.1)
    # certified on one image per patient: half the positives of class a (2 images a patient)
    assert pp.classes[0].n_positives < full.classes[0].n_positives
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", str(tmp_path / "fit.npz"), "--guarantee", "recall>=0.90",
             "--per-patient", "--out", str(tmp_path / "nop")])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "--per-patient needs --patients" in err
    assert not (tmp_path / "nop").exists()
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", str(tmp_path / "fit.npz"), "--guarantee", "recall>0.9",
             "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "error:" in err and "Cannot read the guarantee" in err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", str(tmp_path / "fit.npz"), "--guarantee", "fnr<=0.1",
             "--eval", str(tmp_path / "fit.npz"), "--out", str(tmp_path / "f")])
    assert ex.value.code == 0, capsys.readouterr().err
    f = read_artifact(tmp_path / "f", "guarantee")
    assert f.kind == "fnr" and f.shared and np.unique(f.thresholds_logit()).size == 1
