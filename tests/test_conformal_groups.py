"""Patient-level certification (``calibrate_guarantee(..., groups=patient_ids)``): one image
per patient, checked against brute force and against a planted population of patients whose
images are strongly correlated, where the image-level certificate loses its confidence and
the patient-level one keeps it (the population recall is known in closed form)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from medscalpel.engine.predictions import Predictions
from medscalpel.repair.conformal import (GuaranteeResult, calibrate_guarantee, one_per_group,
                                         recall_order_statistic)
from medscalpel.repair.conformal.spec import _just_below


def _preds(z, y, names=("a",)):
    z, y = np.asarray(z, np.float32), np.asarray(y, np.float32)
    if z.ndim == 1:
        z, y = z[:, None], y[:, None]
    return Predictions(z, y, ids=tuple(map(str, range(len(z)))), class_names=names,
                       task="multilabel")


def _patients(rng, n_pat, m, sd_patient=1.0, sd_image=0.3, mu=2.0, prev=0.5):
    """``m`` images a patient, labels per patient, score = mu y + patient effect + noise."""
    y_p = rng.random(n_pat) < prev
    b = rng.normal(0, sd_patient, n_pat)
    y = np.repeat(y_p, m).astype(np.float32)
    z = mu * y + np.repeat(b, m) + rng.normal(0, sd_image, n_pat * m)
    return z, y, [f"p{i}" for i in np.repeat(np.arange(n_pat), m)]


def test_one_per_group_picks_one_row_per_group_at_random():
    groups = ["a", "a", None, "b", "b", "b", None]
    rows = np.arange(7)
    picks = {tuple(one_per_group(rows, groups, s)) for s in range(40)}
    for p in picks:
        assert len(p) == 4 and list(p) == sorted(p)
        assert sorted(groups[i] or f"none{i}" for i in p) == ["a", "b", "none2", "none6"]
    assert len(picks) == 6  # 2 x 3 choices, all reached
    assert one_per_group(np.array([3, 4]), groups, 0).size == 1  # a subset of the rows
    assert np.array_equal(one_per_group(rows, groups, 5), one_per_group(rows, groups, 5))


def test_distinct_patients_give_the_image_level_certificate():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(np.float32)
    z = 2 * y + rng.normal(size=400)
    p = _preds(z, y)
    for spec in ("recall>=0.9", "E[recall]>=0.9", "precision>=0.6"):
        a = calibrate_guarantee(p, spec, 0.1)
        b = calibrate_guarantee(p, spec, 0.1, groups=[f"q{i}" for i in range(400)])
        assert a.classes[0].threshold_logit == b.classes[0].threshold_logit, spec
        assert b.classes[0].guarantee.endswith(", counted by patient")
        assert "ONE image per patient" in b.notes[0]
    fa, fb = (calibrate_guarantee(_preds(np.c_[z, -z], np.c_[y, 1 - y], ("a", "b")),
                                  "fnr<=0.1", groups=g) for g in (None, list(map(str, range(400)))))
    assert fa.classes[0].threshold_logit == fb.classes[0].threshold_logit


def test_patient_level_threshold_equals_brute_force():
    """Every image of a patient has the same score, so whichever image is drawn the threshold
    must be the k-th smallest of the positive PATIENTS' scores (k of the binomial rule for the
    number of positive patients), computed here by hand."""
    rng = np.random.default_rng(1)
    z, y, pids = _patients(rng, 300, 4, sd_image=0.0)
    g = calibrate_guarantee(_preds(z, y), "recall>=0.9", 0.1, groups=pids)
    per_patient = {}
    for s, lab, p in zip(z, y, pids):
        if lab > 0.5:
            per_patient[p] = float(np.float32(s))
    scores = np.sort(list(per_patient.values()))
    k = recall_order_statistic(scores.size, 0.9, 0.1)
    c = g.classes[0]
    assert c.n_positives == scores.size == c.n_patients_positive
    assert c.calibration["positive_images"] == 4 * scores.size
    assert c.threshold_logit == _just_below(scores[k - 1])
    image_level = calibrate_guarantee(_preds(z, y), "recall>=0.9", 0.1, patient_ids=pids)
    assert image_level.classes[0].threshold_logit > c.threshold_logit  # images: overconfident
    back = GuaranteeResult.from_dict(g.to_dict())
    assert back.to_dict() == g.to_dict()


def test_too_few_positive_patients_is_not_certified():
    rng = np.random.default_rng(2)
    z, y, pids = _patients(rng, 30, 8, prev=0.5)  # ~15 positive patients, ~120 images
    img = calibrate_guarantee(_preds(z, y), "recall>=0.9", 0.1)
    pat = calibrate_guarantee(_preds(z, y), "recall>=0.9", 0.1, groups=pids)
    assert img.classes[0].certified
    assert not pat.classes[0].certified
    assert "too few positive patients (one image each)" in pat.classes[0].reason


def test_correlated_images_break_the_image_level_confidence_not_the_patient_level_one():
    """Six images a patient, scores sharing a patient effect (intraclass correlation ~0.9):
    over 300 calibration draws the POPULATION recall (closed form) at the image-level
    threshold reaches 0.90 far less often than the promised 90%; one image per patient keeps
    it."""
    mu, sd = 2.0, np.sqrt(1.0 + 0.3 ** 2)
    met = {"images": 0, "patients": 0}
    draws = 300
    for s in range(draws):
        rng = np.random.default_rng(100 + s)
        z, y, pids = _patients(rng, 80, 6, mu=mu)
        p = _preds(z, y)
        for key, kw in (("images", {}), ("patients", {"groups": pids, "seed": s})):
            c = calibrate_guarantee(p, "recall>=0.9", 0.1, **kw).classes[0]
            assert c.certified
            met[key] += norm.sf((c.threshold_logit - mu) / sd) >= 0.9
    assert met["images"] / draws < 0.8
    assert met["patients"] / draws >= 0.86  # 1 - alpha = 0.90 up to Monte-Carlo error
    with pytest.raises(Exception, match="ids for"):
        calibrate_guarantee(_preds(z, y), "recall>=0.9", 0.1, groups=pids[:-1])
