"""Paired comparison of two Predictions: kernels equal the unit-weight metrics, invariants,
planted deltas are found, identical models give zero with a zero-width CI."""

from __future__ import annotations

import numpy as np
import pytest

from medscalpel.engine.compare import (PairedComparison, compare_predictions, weighted_ap,
                                       weighted_auroc)
from medscalpel.engine.metrics import auroc, average_precision
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError


def _multilabel(n=300, k=3, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.float32)
    logits = (2.0 * y - 1.0) + noise * rng.standard_normal((n, k))
    ids = tuple(f"img{i}" for i in range(n))
    return Predictions(logits, y, ids, tuple(f"c{j}" for j in range(k)), "multilabel",
                       model_id="dense")


def test_weighted_kernels_equal_unit_weight_metrics_with_ties():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.4
    s = np.round(rng.standard_normal(200), 1)  # many ties
    w = np.ones((1, 200))
    assert weighted_auroc(y, s, w)[0] == pytest.approx(auroc(y, s), abs=1e-12)
    assert weighted_ap(y, s, w)[0] == pytest.approx(average_precision(y, s), abs=1e-12)
    # integer weights == repeating rows
    counts = rng.integers(0, 3, 200)
    rep = np.repeat(np.arange(200), counts)
    assert weighted_auroc(y, s, counts[None].astype(float))[0] == \
        pytest.approx(auroc(y[rep], s[rep]), abs=1e-12)
    assert weighted_ap(y, s, counts[None].astype(float))[0] == \
        pytest.approx(average_precision(y[rep], s[rep]), abs=1e-12)


def test_identical_models_give_zero_deltas_and_zero_width_cis():
    a = _multilabel()
    c = compare_predictions(a, a, n_boot=100, seed=0)
    for cd in c.classes:
        assert cd.delta_auroc == 0.0 and cd.delta_auroc_ci == (0.0, 0.0)
        assert cd.delta_sens == 0.0 and cd.delta_spec == 0.0
    assert c.macro["delta_auroc"] == 0.0 and tuple(c.macro["delta_auroc_ci"]) == (0.0, 0.0)
    ok, reasons = c.meets_floor()
    assert ok and reasons == []


def test_planted_damage_to_one_class_is_found_and_named():
    a = _multilabel(n=400, noise=0.8)
    rng = np.random.default_rng(5)
    logits = a.logits.copy()
    logits[:, 1] += 3.0 * rng.standard_normal(a.n)  # class c1 much noisier
    b = Predictions(logits, a.labels, a.ids, a.class_names, a.task, model_id="pruned")
    c = compare_predictions(a, b, n_boot=200, seed=0)
    d = {cd.name: cd for cd in c.classes}
    assert d["c1"].delta_auroc < -0.1 and d["c1"].delta_auroc_ci[1] < 0
    assert d["c0"].delta_auroc == 0.0 and d["c2"].delta_auroc == 0.0
    lo, hi = c.macro["delta_auroc_ci"]
    assert lo <= c.macro["delta_auroc"] <= hi < 0
    ok, reasons = c.meets_floor(macro=-0.005, per_class=-0.01)
    assert not ok and any(r.startswith("c1: delta AUROC") for r in reasons)
    assert any("macro delta AUROC" in r for r in reasons)


def test_paired_ci_is_narrower_than_either_unpaired_ci():
    a = _multilabel(n=400, k=1, noise=1.5)
    rng = np.random.default_rng(3)
    b = Predictions(a.logits + 0.2 * rng.standard_normal(a.logits.shape), a.labels, a.ids,
                    a.class_names, a.task)
    c = compare_predictions(a, b, n_boot=300, seed=0)
    lo, hi = c.classes[0].delta_auroc_ci
    from medscalpel.engine.metrics import evaluate

    e = evaluate(a, n_boot=300, seed=0).classes[0].auroc_ci
    assert (hi - lo) < 0.5 * (e[1] - e[0])


def test_thresholds_drive_sensitivity_and_specificity():
    y = np.array([[1.], [1.], [0.], [0.]], np.float32)
    ids = ("a", "b", "c", "d")
    a = Predictions(np.array([[2.], [0.1], [-0.1], [-2.]]), y, ids, ("x",), "multilabel")
    b = Predictions(np.array([[2.], [-0.1], [0.1], [-2.]]), y, ids, ("x",), "multilabel")
    c = compare_predictions(a, b, n_boot=0)
    cd = c.classes[0]
    assert (cd.sens_ref, cd.sens_new, cd.spec_ref, cd.spec_new) == (1.0, 0.5, 1.0, 0.5)
    # at a threshold of 0.9 (logit 2.197) neither model calls any positive
    c9 = compare_predictions(a, b, n_boot=0, thresholds=[0.9])
    assert c9.classes[0].sens_ref == 0.0 and c9.threshold_source == "given"
    with pytest.raises(ConfigError, match="one probability per class"):
        compare_predictions(a, b, thresholds=[0.5, 0.5])


def test_multiclass_accuracy_and_alignment_by_id():
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 3, n)
    logits = np.eye(3)[y] * 2 + rng.standard_normal((n, 3))
    ids = tuple(f"i{i}" for i in range(n))
    a = Predictions(logits, y, ids, ("A", "B", "C"), "multiclass")
    # candidate in reversed order with one image missing: aligned by id
    rows = np.arange(n)[::-1][:-1]
    b = Predictions(logits[rows], y[rows], tuple(ids[i] for i in rows), ("A", "B", "C"),
                    "multiclass")
    c = compare_predictions(a, b, n_boot=50)
    assert c.n == n - 1 and c.n_unmatched == 1
    assert c.macro["delta_accuracy"] == 0.0 and c.threshold_source == "argmax"


def test_round_trip_and_errors(tmp_path):
    a = _multilabel(n=100)
    c = compare_predictions(a, a, n_boot=20)
    p = c.save(tmp_path)
    back = PairedComparison.load(p)
    assert back.to_dict() == c.to_dict()
    other = Predictions(a.logits, a.labels, a.ids, ("x", "y", "z"), "multilabel")
    with pytest.raises(DataError, match="class lists differ"):
        compare_predictions(a, other)
    moved = Predictions(a.logits, a.labels, tuple("z" + i for i in a.ids), a.class_names,
                        "multilabel")
    with pytest.raises(DataError, match="share no image id"):
        compare_predictions(a, moved)
