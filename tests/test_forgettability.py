"""Forgettability curves, FCD and sweep reading on synthetic sweeps with planted effects."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from scipy.spatial.distance import euclidean
from sklearn.metrics import average_precision_score, jaccard_score, roc_auc_score

from medscalpel.audit.fcd import cooccurrence_iou, fcd_matrices
from medscalpel.audit.forgettability import audit_forgettability, relative_change
from medscalpel.audit.sweepio import Sweep, as_sweep, load_sweep, sweep_methods
from medscalpel.cells import run_cells
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError

LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.95)
PREV = np.array([0.45, 0.3, 0.15, 0.08, 0.05])
# level at which each class's signal is gone: the rarest collapses first
COLLAPSE = np.array([1.2, 1.0, 0.8, 0.55, 0.3])


def make_cells(n=500, seeds=3, levels=LEVELS, collapse=COLLAPSE, seed=0, task="multilabel"):
    rng = np.random.default_rng(seed)
    k = len(PREV)
    names = tuple(f"c{i}" for i in range(k))
    ids = [f"img{i}" for i in range(n)]
    if task == "multilabel":
        y = (rng.random((n, k)) < PREV).astype(np.float32)
        signal = 2 * y - 1
    else:
        y = rng.choice(k, size=n, p=PREV / PREV.sum())
        signal = np.eye(k)[y] * 2 - 1
    cells = {}
    for s in range(seeds):
        base = rng.normal(size=(n, k))
        for lv in levels:
            strength = 3.0 * np.clip(1 - lv / collapse, 0, 1)
            z = strength * signal + base + 0.2 * rng.normal(size=(n, k))
            cells[(f"s{s}", lv)] = Predictions(z.astype(np.float32), y, ids=ids,
                                               class_names=names, task=task)
    return cells, y


def test_class_collapsing_first_comes_out_first():
    cells, _ = make_cells()
    res = audit_forgettability(cells, n_boot=200, n_perm=99)
    assert res.order()[0] == "c4"
    assert res.order() == ["c4", "c3", "c2", "c1", "c0"]
    # first 20% drop ordered as planted; c4 (gone at 0.3) drops by 0.2 already
    assert res.first_drop[4] == pytest.approx(0.2)
    assert np.all(np.diff(res.first_drop) <= 0)
    assert res.delta_at_max[4] < res.delta_at_max[0] < 0
    # rare classes forgotten earlier -> positive correlation with log prevalence
    c = res.correlations["first_drop_vs_log_prevalence"]
    assert c.pearson_r > 0.8 and c.n == 5
    assert res.correlations["delta_at_max_vs_log_prevalence"].spearman_rho == pytest.approx(1.0)
    assert res.prevalence_source == "evaluated split"
    assert res.median_rel_ap.shape == (len(LEVELS), 5)
    assert np.all(res.q25_rel_ap <= res.median_rel_ap + 1e-12)
    assert np.all(res.median_rel_ap <= res.q75_rel_ap + 1e-12)


def test_metrics_and_relative_change_match_sklearn():
    cells, y = make_cells(seeds=2)
    res = audit_forgettability(cells, n_boot=0, n_perm=10)
    p = cells[("s1", 0.6)].probs()
    li = list(LEVELS).index(0.6)
    for c in range(5):
        assert res.ap[1, li, c] == pytest.approx(average_precision_score(y[:, c], p[:, c]))
        assert res.auroc[1, li, c] == pytest.approx(roc_auc_score(y[:, c], p[:, c]))
    ap0 = res.ap[1, 0, 2]
    assert res.rel_ap[1, li, 2] == pytest.approx((res.ap[1, li, 2] - ap0) / ap0)
    assert np.all(res.rel_ap[:, 0, :] == 0)
    assert res.median_rel_ap[li, 2] == pytest.approx(np.median(res.rel_ap[:, li, 2]))
    assert res.abs_delta_ap_at_max[0] == pytest.approx(
        np.median(res.ap[:, -1, 0] - res.ap[:, 0, 0]))
    # a reference AP of 0 cannot give a relative change
    assert np.isnan(relative_change(np.zeros((1, 2, 1)))[0, 1, 0])


def test_train_labels_set_the_prevalence_source():
    cells, _ = make_cells(seeds=1)
    train = np.zeros((100, 5), np.float32)
    train[:50, 0] = 1
    train[:10, 4] = 1
    train[:20, 1] = 1
    train[:20, 2] = 1
    train[:20, 3] = 1
    train[0, 3] = np.nan  # unknown label: left out of the denominator
    res = audit_forgettability(cells, train_labels=train, n_boot=0, n_perm=10)
    assert res.prevalence_source == "train"
    assert res.prevalence[0] == pytest.approx(0.5)
    assert res.prevalence[3] == pytest.approx(19 / 99)
    with pytest.raises(DataError, match=r"expected \[N, 5\]"):
        audit_forgettability(cells, train_labels=train[:, :3], n_boot=0)


def test_fcd_symmetric_zero_diagonal_and_euclidean_like_scipy():
    curves = np.array([[0, -0.1, -0.5], [0, -0.2, -0.9], [0.0, 0.0, -0.1]])
    e, m = fcd_matrices(curves)
    assert np.allclose(e, e.T) and np.allclose(m, m.T)
    assert np.all(np.diag(e) == 0) and np.all(np.diag(m) == 0)
    assert e[0, 1] == pytest.approx(euclidean(curves[0], curves[1]))
    assert m[0, 2] == pytest.approx(np.mean((curves[0] - curves[2]) ** 2))
    cells, _ = make_cells(seeds=2)
    res = audit_forgettability(cells, n_boot=100, n_perm=99)
    f = res.fcd
    assert np.allclose(f.euclidean, f.euclidean.T) and np.all(np.diag(f.euclidean) == 0)
    assert f.mse == pytest.approx(f.euclidean ** 2 / (len(LEVELS) - 1))
    # classes with more distant prevalences have more distinct curves (planted)
    assert f.correlations["fcd_euclidean_vs_abs_delta_log_prevalence"].pearson_r > 0.5
    assert len(f.pairs()) == 10


def test_cooccurrence_iou_is_jaccard():
    rng = np.random.default_rng(3)
    y = (rng.random((80, 4)) < 0.4).astype(np.float32)
    iou = cooccurrence_iou(y)
    assert iou[0, 1] == pytest.approx(jaccard_score(y[:, 0], y[:, 1]))
    assert np.allclose(iou, iou.T) and np.all(np.diag(iou) == 1)
    y2 = y.copy()
    y2[:10, 0] = np.nan
    known = np.arange(80) >= 10
    assert cooccurrence_iou(y2)[0, 2] == pytest.approx(jaccard_score(y[known, 0], y[known, 2]))


def test_multiclass_and_generic_levels():
    # e.g. a teacher (step 0) and two students: any ordered compression level works
    cells, _ = make_cells(seeds=2, levels=(0, 1, 2), collapse=np.array([9, 9, 9, 3, 1.5]),
                          task="multiclass")
    res = audit_forgettability(cells, n_boot=0, n_perm=10)
    assert res.task == "multiclass" and res.levels.tolist() == [0, 1, 2]
    assert res.order()[0] == "c4"
    # exclusive classes never co-occur
    assert np.nanmax(res.fcd.iou[np.triu_indices(5, 1)]) == 0


def test_save_writes_json_and_figures(tmp_path):
    cells, _ = make_cells(seeds=3)
    res = audit_forgettability(cells, out=tmp_path, n_boot=100, n_perm=20)
    d = json.loads((tmp_path / "forgettability.json").read_text())
    assert d["forgotten_first_to_last"][0] == "c4"
    assert d["first_drop"] == pytest.approx(res.first_drop.tolist())
    assert d["correlations"]["first_drop_vs_log_prevalence"]["pearson_r"] == pytest.approx(
        res.correlations["first_drop_vs_log_prevalence"].pearson_r)
    assert set(d["fcd"]["correlations"]) >= {"fcd_euclidean_vs_iou", "fcd_mse_vs_iou"}
    for name in ("audit_curves.png", "audit_curves_overview.png", "audit_scatter.png",
                 "audit_fcd_heatmap.png", "audit_fcd_scatter.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _preset_cell(preds: dict, cell: dict) -> dict:
    """A prune cell function returning stored Predictions (the sweep's cell result keys)."""
    p = preds[(cell["model_id"], cell["method"], cell["ratio"])]
    return {"model_id": cell["model_id"], "sparsity": cell["ratio"] + 0.001, "n": p.n,
            "macro_auroc": None, "macro_ap": None, "artifacts": {"predictions.npz": p}}


def _write_sweep(root, cells: dict, methods=("l1", "random"), command="compress sweep"):
    """Write a sweep directory with the real engine (run_cells): one prune cell per
    (model, method, level); ``random`` cells carry seed 3."""
    preds, grid = {}, []
    for (s, lv), p in cells.items():
        for m in methods:
            preds[(f"model{s}", m, lv)] = p
            grid.append({"kind": "prune", "model_id": f"model{s}", "method": m,
                         "seed": 3 if m == "random" else None, "ratio": lv})
    return run_cells(grid, functools.partial(_preset_cell, preds), root, command=command,
                     identity={"test": "forgettability"}, progress=False)


def test_load_sweep_directory_layout(tmp_path):
    cells, _ = make_cells(seeds=2, levels=(0.0, 0.5, 0.9))
    idx = _write_sweep(tmp_path, cells)
    assert sweep_methods(tmp_path) == ["l1", "random"]
    with pytest.raises(ConfigError, match="several methods"):
        load_sweep(tmp_path)
    with pytest.raises(ConfigError, match="available methods: l1, random"):
        load_sweep(tmp_path, method="taylor")
    sw = load_sweep(tmp_path, method="random")
    assert sw.seeds == ("models0-s3", "models1-s3")
    assert sw.levels.tolist() == [0.0, 0.5, 0.9]
    assert sw.info["achieved_sparsity"]["models0-s3@0.9"] == pytest.approx(0.901)
    res = audit_forgettability(tmp_path / "cells", method="l1", n_boot=0, n_perm=10)
    ref = audit_forgettability(cells, n_boot=0, n_perm=10)
    assert np.allclose(res.ap, ref.ap, equal_nan=True)
    # the index is what is read: a cell that is not in it is not part of the sweep
    index = json.loads((tmp_path / "index.json").read_text())
    index["cells"] = [c for c in index["cells"] if c["cell"]["model_id"] == "models0"
                      and c["cell"]["ratio"] in (0.0, 0.9)]
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert load_sweep(tmp_path, method="l1").levels.tolist() == [0.0, 0.9]
    assert len(idx.cells) == 12


def test_audit_reads_a_pruning_grid_and_refuses_old_layouts(tmp_path):
    cells, _ = make_cells(seeds=2, levels=(0.0, 0.5, 0.9))
    _write_sweep(tmp_path / "grid", cells, methods=("l1",), command="scale prune")
    got = audit_forgettability(tmp_path / "grid", n_boot=0, n_perm=10)
    ref = audit_forgettability(cells, n_boot=0, n_perm=10)
    assert np.allclose(got.ap, ref.ap, equal_nan=True) and got.levels.tolist() == [0.0, 0.5, 0.9]
    # a directory of the older engines (sweep.json / grid.json, path layout) names the fix
    old = tmp_path / "old"
    (old / "cells" / "m" / "l1" / "r0.50").mkdir(parents=True)
    (old / "sweep.json").write_text(json.dumps({"cells": []}))
    with pytest.raises(DataError, match=r"older medscalpel \(sweep.json.*Re-run the sweep"):
        load_sweep(old)
    with pytest.raises(DataError, match="no index.json: it is not a sweep"):
        load_sweep(tmp_path)


def test_sweep_error_paths(tmp_path):
    with pytest.raises(DataError, match="empty"):
        as_sweep({})
    (tmp_path / "cells").mkdir()
    with pytest.raises(DataError, match="has no index.json: it is not a sweep / grid directory"):
        audit_forgettability(tmp_path)
    run_cells([{"kind": "triage", "budget": 1}], len, tmp_path / "g", progress=False)
    with pytest.raises(DataError, match="is empty: its index lists no finished pruning cell"):
        audit_forgettability(tmp_path / "g")
    with pytest.raises(DataError, match="does not exist"):
        load_sweep(tmp_path / "nope")
    cells, _ = make_cells(seeds=1, levels=(0.0, 0.5))
    with pytest.raises(DataError, match="at least one compressed level"):
        audit_forgettability({k: v for k, v in cells.items() if k[1] == 0.0})
    sw = as_sweep(cells)
    with pytest.raises(ConfigError, match=r"Level 0.7 is not in the sweep .*levels: 0, 0.5"):
        sw.level(0.7)
    p = cells[("s0", 0.5)]
    other = Predictions(p.logits[:, :3], p.labels[:, :3], p.ids, ("a", "b", "c"), "multilabel")
    with pytest.raises(DataError, match="all cells must share classes"):
        Sweep({("s0", 0.0): cells[("s0", 0.0)], ("s0", 0.5): other})
    with pytest.raises(DataError, match="no cell at the reference level"):
        Sweep({("s0", 0.0): p, ("s0", 0.5): p, ("s1", 0.5): p})
    flipped = Predictions(p.logits, 1 - p.labels, p.ids, p.class_names, "multilabel")
    with pytest.raises(DataError, match="different labels"):
        Sweep({("s0", 0.0): p, ("s0", 0.5): flipped})
