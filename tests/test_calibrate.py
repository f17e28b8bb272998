"""Threshold calibration: exact optima against brute force, estimator contract, model card."""

from __future__ import annotations


import numpy as np
import pytest

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.repair.calibrate import (ThresholdCalibrator, best_cut, calibrate_thresholds,
                                         calibrated_card, evaluate_thresholds,
                                         save_with_thresholds)


def _brute(y, s, fn):
    """Best objective over every threshold in a fine grid around all scores."""
    cands = np.unique(np.r_[s, s + 1e-9, s - 1e-9, 2.0, -1.0])
    best = -np.inf
    for t in cands:
        d = s >= t
        tp, fp = np.sum(y & d), np.sum(~y & d)
        fn_, tn = np.sum(y & ~d), np.sum(~y & ~d)
        best = max(best, fn(tp, fp, fn_, tn))
    return best


def youden(tp, fp, fn, tn):
    return tp / (tp + fn) - fp / (fp + tn)


def f1(tp, fp, fn, tn):
    return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("seed", range(25))
def test_youden_and_f1_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 14))
    y = rng.random(n) < 0.4
    y[0], y[1] = True, False
    s = np.round(rng.random(n), 1)  # ties on purpose
    for method, fn in (("youden", youden), ("f1", f1)):
        thr, value = best_cut(y, s, method)
        d = s >= thr
        tp, fp = np.sum(y & d), np.sum(~y & d)
        got = fn(tp, fp, np.sum(y & ~d), np.sum(~y & ~d))
        assert got == pytest.approx(value)
        assert got == pytest.approx(_brute(y, s, fn))


def test_sensitivity_target_is_highest_threshold_reaching_it():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    y = np.array([1, 0, 1, 1, 0, 1, 0], bool)
    thr, sens = best_cut(y, s, "sensitivity", target_sensitivity=0.75)
    assert sens == 0.75 and 0.6 > thr > 0.5
    # brute force over all cut points: highest with sensitivity >= 0.75
    ok = [t for t in s if np.mean((s >= t)[y]) >= 0.75]
    assert max(ok) == 0.6


def test_estimator_contract_and_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    labels = (rng.random((80, 3)) < 0.3).astype(np.float32)
    labels[:3, 2] = np.nan
    probs = np.clip(labels * 0.4 + rng.random((80, 3)) * 0.6, 0, 1)
    probs = np.nan_to_num(probs, nan=0.5)
    cal = ThresholdCalibrator("f1")
    assert not hasattr(cal, "thresholds_")
    assert cal.fit(probs, labels) is cal
    assert cal.thresholds_.shape == (3,)
    dec = cal.transform(probs)
    assert dec.dtype == bool and dec.shape == (80, 3)
    cal.save(tmp_path / "c.json")
    back = ThresholdCalibrator.load(tmp_path / "c.json")
    np.testing.assert_array_equal(back.thresholds_, cal.thresholds_)


def test_fallback_when_class_has_no_positive():
    probs = np.array([[0.2, 0.9], [0.7, 0.1], [0.4, 0.3]])
    labels = np.array([[0, 1], [0, 0], [0, 1]], np.float32)
    cal = ThresholdCalibrator("youden", default=0.5).fit(probs, labels)
    assert cal.thresholds_[0] == 0.5 and cal.fallback_ == ["class0"]


def _preds(logits, labels, names=("a", "b"), split="val"):
    return Predictions(np.asarray(logits, np.float32), np.asarray(labels, np.float32),
                       ids=tuple(f"{split}{i}" for i in range(len(labels))), class_names=names,
                       task="multilabel", split=split)


def test_evaluate_thresholds_against_default():
    # class a: all positives at logit -1 (prob .27): 0.5 misses them all, calibrated finds them
    logits = [[-1, 2], [-1, 2], [-3, -2], [-3, 2]]
    labels = [[1, 1], [1, 1], [0, 0], [0, 0]]
    p = _preds(logits, labels)
    r = calibrate_thresholds(p, p, "youden")
    ev = r.evaluation
    assert ev.default[0]["recall"] == 0.0 and ev.calibrated[0]["recall"] == 1.0
    assert ev.calibrated[0]["f1"] == 1.0
    assert ev.macro["calibrated"]["f1"] > ev.macro["default"]["f1"]
    assert ev.table()[-1]["class"] == "macro"


def test_errors():
    with pytest.raises(ConfigError, match="'method' parameter of ThresholdCalibrator"):
        ThresholdCalibrator("auc").fit(np.array([[0.1]]), np.array([[1.0]]))
    with pytest.raises(DataError, match="probabilities in \\[0, 1\\]"):
        ThresholdCalibrator().fit(np.array([[3.0], [0.2]]), np.array([[1.0], [0.0]]))
    with pytest.raises(DataError, match="labels are required"):
        ThresholdCalibrator().fit(np.array([[0.3]]))
    with pytest.raises(ConfigError, match="not fitted"):
        ThresholdCalibrator().transform(np.array([[0.3]]))
    p = _preds([[0, 1]], [[1, 0]])
    with pytest.raises(ConfigError, match="3 thresholds / 2 baseline values given for 2"):
        evaluate_thresholds(p, [0.1, 0.2, 0.3])
    mc = Predictions(np.zeros((2, 2), np.float32), np.array([0, 1]), ("x", "y"), ("a", "b"),
                     "multiclass")
    with pytest.raises(ConfigError, match="multi-label"):
        ThresholdCalibrator().fit(mc)


def test_thresholds_written_to_model_json(tmp_path):
    import torch

    from medscalpel.data.transforms import Preprocess
    from medscalpel.models.checkpoint import load_model, make_card
    from medscalpel.models.zoo import create_model

    model = create_model("vgg_tiny", 2, img_size=32)
    model.card = make_card(model, ["a", "b"], "multilabel", Preprocess(size=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = _preds([[-1, 2], [-1, 2], [-3, -2], [-3, 2]], [[1, 1], [1, 1], [0, 0], [0, 0]])
    cal = ThresholdCalibrator("youden").fit(p)
    save_with_thresholds(model, tmp_path / "m", cal, fit_split="val")
    loaded = load_model(tmp_path / "m")
    assert loaded.card.thresholds == pytest.approx(tuple(cal.thresholds_))
    assert loaded.card.lineage[-1]["method"] == "threshold_calibration"
    assert model.card.thresholds is None  # caller's model untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    bad = ThresholdCalibrator().fit(np.array([[0.2], [0.8]]), np.array([[0.], [1.]]))
    with pytest.raises(Exception, match="2 classes but 1 thresholds"):
        calibrated_card(model.card, bad)


# ----------------------------------------------------------------------------- multi-class
def _mc(logits, labels, names, split="val"):
    from medscalpel.engine.predictions import Predictions

    n = len(labels)
    return Predictions(np.asarray(logits, np.float32), np.asarray(labels, np.int64),
                       tuple(f"{split}{i}" for i in range(n)), tuple(names), "multiclass",
                       split=split)


def _sampled(n, k, seed, scale):
    """Labels drawn from softmax(z): the true temperature of ``scale * z`` is ``scale``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 2.0
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return scale * z, y


def test_temperature_recovers_the_true_scale():
    from medscalpel.repair.calibrate import TemperatureResult, calibrate_temperature

    zf, yf = _sampled(4000, 4, 0, 3.0)
    ze, ye = _sampled(2000, 4, 1, 3.0)
    res = calibrate_temperature(_mc(zf, yf, "abcd"), _mc(ze, ye, "abcd", "test"))
    assert res.temperature == pytest.approx(3.0, rel=0.08)
    assert res.after["nll"] < res.before["nll"] and res.after["ece"] < res.before["ece"]
    assert res.after["accuracy"] == res.before["accuracy"]  # argmax unchanged by T > 0
    assert res.held_out and res.n_eval == 2000
    assert TemperatureResult.from_dict(res.to_dict()) == res
    with pytest.raises(ConfigError, match="temperature scaling is for multi-class"):
        calibrate_temperature(_preds([[0.0, 1.0]], [[1.0, 0.0]]))


def test_binary_view_is_the_softmax_of_the_positive_class():
    from medscalpel.repair.calibrate import binary_view

    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 2))
    y = rng.integers(0, 2, 50)
    mc = _mc(z, y, ("NORMAL", "PNEUMONIA"))
    b = binary_view(mc)
    soft = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert b.class_names == ("PNEUMONIA",)
    np.testing.assert_allclose(b.probs()[:, 0], soft[:, 1], atol=1e-6)
    np.testing.assert_array_equal(b.labels[:, 0], (y == 1).astype(np.float32))
    bn = binary_view(mc, "NORMAL")
    np.testing.assert_allclose(bn.probs()[:, 0], soft[:, 0], atol=1e-6)
    with pytest.raises(ConfigError, match="Unknown positive class 'X'"):
        binary_view(mc, "X")


def test_cli_calibrate_binary_and_multiclass(tmp_path, capsys):
    import json

    from medscalpel.cli.main import run

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    z = np.c_[np.zeros(200), 1.5 * (2 * y - 1) + rng.normal(size=200) - 1.0]
    _mc(z[:100], y[:100], ("NORMAL", "PNEUMONIA")).save(tmp_path / "fit.npz")
    _mc(z[100:], y[100:], ("NORMAL", "PNEUMONIA"), "test").save(tmp_path / "ev.npz")
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", str(tmp_path / "fit.npz"), "--eval", str(tmp_path / "ev.npz"),
             "--out", str(tmp_path / "cal2")])
    assert ex.value.code == 0, capsys.readouterr().err
    assert "positive class PNEUMONIA (vs NORMAL)" in capsys.readouterr().out
    d = json.loads((tmp_path / "cal2" / "calibrate" / "calibration.json").read_text())
    assert d["binary"] == {"positive": "PNEUMONIA", "negative": "NORMAL"}
    thr = d["calibrator"]["thresholds"][0]
    assert 0.0 < thr < 1.0
    zf, yf = _sampled(600, 3, 2, 2.0)
    _mc(zf, yf, "abc").save(tmp_path / "mc.npz")
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", str(tmp_path / "mc.npz"), "--out", str(tmp_path / "cal3")])
    assert ex.value.code == 0
    assert "NOT held out" in capsys.readouterr().out
    d = json.loads((tmp_path / "cal3" / "calibrate" / "calibration.json").read_text())
    assert d["method"] == "temperature" and d["temperature"] > 1.0
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", str(tmp_path / "mc.npz"), "--model", str(tmp_path),
             "--out", str(tmp_path / "cal4")])
    # --model writes the temperature operating point into the model's card now (issue Q;
    # tests/test_operating_point.py); a folder without a model is one clean error
    assert ex.value.code == 2 and "No weights" in capsys.readouterr().err
