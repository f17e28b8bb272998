"""PIEs on synthetic sweeps with planted disagreements, and the ground-truth tests."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from medscalpel.audit.pies import (agreement_scores, find_pies, pie_gallery,
                                   pie_ground_truth_tests)
from medscalpel.data.base import ArrayDataset
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError

N, K = 400, 6
PLANTED = np.arange(0, 400, 20)  # 20 images = 5%


def multilabel_cells(seeds=3, levels=(0.0, 0.5, 0.9), planted=PLANTED, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((N, K)) < [0.4, 0.3, 0.2, 0.1, 0.05, 0.03]).astype(np.float32)
    ids = [f"im{i:03d}" for i in range(N)]
    names = tuple(f"f{i}" for i in range(K))
    cells = {}
    for s in range(seeds):
        z0 = 2.5 * (2 * y - 1) + rng.normal(size=(N, K))
        for lv in levels:
            z = z0 + 0.15 * lv * rng.normal(size=(N, K))
            if lv >= 0.9:
                z[planted] = -z[planted]  # the pruned model ranks these classes backwards
            cells[(f"s{s}", lv)] = Predictions(z.astype(np.float32), y, ids, names, "multilabel")
    return cells, y


def test_planted_pies_are_found_and_seeds_averaged():
    cells, _ = multilabel_cells()
    res = find_pies(cells, ratio=0.9, quantile=0.05, n_boot=200)
    assert res.score_name == "spearman" and not res.higher_is_worse
    assert set(res.pie_ids) == {f"im{i:03d}" for i in PLANTED}
    assert res.seeds == ("s0", "s1", "s2")
    dense = np.mean([cells[(s, 0.0)].probs() for s in ("s0", "s1", "s2")], 0)
    comp = np.mean([cells[(s, 0.9)].probs() for s in ("s0", "s1", "s2")], 0)
    assert res.scores[7] == pytest.approx(sps.spearmanr(dense[7], comp[7]).statistic, abs=1e-6)
    assert res.threshold == pytest.approx(res.scores[res.is_pie].max())
    # at 0.5 nothing was planted: the planted images are not singled out
    mild = find_pies(cells, ratio=0.5, n_boot=0)
    assert len(set(mild.pie_ids) & set(res.pie_ids)) < 5


def test_overrepresentation_of_planted_class_and_findings(tmp_path):
    rng = np.random.default_rng(5)
    y = (rng.random((N, K)) < 0.1).astype(np.float32)
    y[:, 5] = 0
    y[PLANTED, 5] = 1           # class f5 only on the planted images
    y[PLANTED, :3] = 1          # planted images carry >= 3 findings
    names = tuple(f"f{i}" for i in range(K))
    ids = [f"im{i:03d}" for i in range(N)]
    z = 2 * (2 * y - 1) + rng.normal(size=(N, K))
    zc = z.copy()
    zc[PLANTED] = -zc[PLANTED]
    cells = {0.0: Predictions(z, y, ids, names, "multilabel"),
             0.9: Predictions(zc, y, ids, names, "multilabel")}
    res = find_pies(cells, n_boot=300, out=tmp_path)
    f5 = res.class_overrep[5]
    assert f5["share_pie"] == 1.0 and f5["share_overall"] == pytest.approx(20 / N)
    assert f5["ratio"] == pytest.approx(N / 20)
    assert f5["ratio_ci"][0] > 1 and f5["fisher_p"] < 1e-10
    ge3 = res.findings_overrep[3]
    assert ge3["name"] == ">=3 findings" and ge3["n_pie_with"] == 20
    n_ge3 = int(((y > 0.5).sum(1) >= 3).sum())
    assert ge3["ratio"] == pytest.approx(1.0 / (n_ge3 / N))
    d = json.loads((tmp_path / "pies.json").read_text())
    assert d["n_pies"] == 20 and len(d["pies"]) == 20
    assert d["class_overrepresentation"][5]["ratio"] == pytest.approx(f5["ratio"])
    assert (tmp_path / "audit_pie_overrep.png").stat().st_size > 1000
    assert len(pd.read_csv(tmp_path / "pies.csv")) == N


def test_multiclass_disagreement_score():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=N)
    ids = [f"im{i:03d}" for i in range(N)]
    z = 3 * np.eye(3)[y] + rng.normal(scale=0.3, size=(N, 3))
    zc = z + rng.normal(scale=0.05, size=(N, 3))
    zc[PLANTED] = np.roll(z[PLANTED], 1, axis=1)  # the compressed model picks another class
    cells = {0.0: Predictions(z, y, ids, ("a", "b", "c"), "multiclass"),
             1.0: Predictions(zc, y, ids, ("a", "b", "c"), "multiclass")}
    res = find_pies(cells, ratio=1.0, n_boot=100)
    assert res.score_name == "tvd" and res.higher_is_worse
    assert set(res.pie_ids) == {f"im{i:03d}" for i in PLANTED}
    assert res.flips[PLANTED].all() and res.extra["flip_rate_pie"] == 1.0
    assert res.findings_overrep == []
    tc = find_pies(cells, ratio=1.0, score="true_class", n_boot=0)
    assert set(tc.pie_ids) == set(res.pie_ids)
    # binary: TVD equals |delta p| of either class
    p = rng.random((10, 1))
    q = rng.random((10, 1))
    tvd, _ = agreement_scores(np.hstack([p, 1 - p]), np.hstack([q, 1 - q]), "tvd")
    assert tvd == pytest.approx(np.abs(p - q).ravel())
    with pytest.raises(ConfigError, match="at least 3 classes"):
        agreement_scores(np.hstack([p, 1 - p]), np.hstack([q, 1 - q]), "spearman")
    with pytest.raises(ConfigError, match="needs multi-class labels"):
        agreement_scores(p, q, "true_class")


def test_constant_vectors_score_zero():
    scores, n_undef = agreement_scores(np.array([[0.1, 0.5, 0.9], [0.2, 0.3, 0.4]]),
                                       np.array([[0.5, 0.5, 0.5], [0.2, 0.3, 0.4]]))
    assert n_undef == 1 and scores.tolist() == pytest.approx([0.0, 1.0])


def test_error_paths():
    cells, _ = multilabel_cells(seeds=1)
    with pytest.raises(ConfigError, match=r"Level 0.8 is not in the sweep .*levels: 0, 0.5, 0.9"):
        find_pies(cells, ratio=0.8)
    with pytest.raises(ConfigError, match="reference level; choose a compressed level: 0.5, 0.9"):
        find_pies(cells, ratio=0.0)
    with pytest.raises(ConfigError, match="'quantile' parameter of find_pies"):
        find_pies(cells, quantile=0.0)
    with pytest.raises(ConfigError, match="'score' parameter of find_pies"):
        find_pies(cells, score="kendall")
    with pytest.raises(DataError, match="empty"):
        find_pies({})


def _ground_truth(res, noisy, low_quality, low_severity, seed=0):
    rng = np.random.default_rng(seed)
    ids = list(res.ids)
    noise = rng.random(N) < 0.05
    noise[noisy] = True
    quality = rng.uniform(0.5, 1.0, N)
    quality[low_quality] = rng.uniform(0.0, 0.5, len(low_quality))
    severity = rng.uniform(0.3, 1.0, N)
    severity[low_severity] = rng.uniform(0.0, 0.3, len(low_severity))
    severity[::7] = np.nan  # images without findings
    return pd.DataFrame({"id": ids, "label_noise": noise, "quality": quality,
                         "severity": severity})


def test_pie_ground_truth_tests_detect_planted_properties(tmp_path):
    cells, _ = multilabel_cells(seeds=1)
    res = find_pies(cells, n_boot=0)
    gt = _ground_truth(res, PLANTED[:15], PLANTED, PLANTED)
    out = pie_ground_truth_tests(res, gt.sample(frac=1.0, random_state=0))  # row order ignored
    assert out.supports == {"label_noise_enriched": True, "lower_quality": True,
                            "lower_severity": True}
    pie = res.is_pie
    table = [[int((pie & gt.label_noise).sum()), int((pie & ~gt.label_noise).sum())],
             [int((~pie & gt.label_noise).sum()), int((~pie & ~gt.label_noise).sum())]]
    assert out.label_noise["table"] == table
    assert out.label_noise["p"] == pytest.approx(sps.fisher_exact(table).pvalue)
    q = gt.quality.to_numpy()
    mw = sps.mannwhitneyu(q[pie], q[~pie])
    assert out.quality["p"] == pytest.approx(mw.pvalue)
    assert out.quality["rank_biserial"] == pytest.approx(-1.0)
    assert out.severity["n_pie"] == int(np.isfinite(gt.severity[pie]).sum())
    out.save(tmp_path)
    assert json.loads((tmp_path / "pie_ground_truth.json").read_text())["supports"][
        "lower_quality"] is True
    # no planted property -> no support claimed
    null = pie_ground_truth_tests(res, _ground_truth(res, [], [], [], seed=4))
    assert not any(null.supports.values())


def test_pie_ground_truth_input_errors():
    cells, _ = multilabel_cells(seeds=1)
    res = find_pies(cells, n_boot=0)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['severity'\]"):
        pie_ground_truth_tests(res, pd.DataFrame({"id": ["a"], "label_noise": [True],
                                                  "quality": [1.0]}))
    with pytest.raises(DataError, match="no image id of the PIE result"):
        pie_ground_truth_tests(res, pd.DataFrame({"id": ["zz"], "label_noise": [True],
                                                  "quality": [1.0], "severity": [0.5]}))


def test_pie_gallery(tmp_path):
    cells, y = multilabel_cells(seeds=1)
    res = find_pies(cells, n_boot=0)
    images = np.random.default_rng(0).random((N, 16, 16)).astype(np.float32)
    ds = ArrayDataset(images, y, [f"f{i}" for i in range(K)], "multilabel",
                      ids=[f"im{i:03d}" for i in range(N)])
    path = pie_gallery(ds, res, tmp_path / "gallery.png", max_images=6)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = res.image_rows(res.pie_ids[:2])
    assert rows[0]["score"] <= rows[1]["score"] and len(rows[0]["dense_top"]) == 3
    other = ArrayDataset(images[:5], y[:5], [f"f{i}" for i in range(K)], "multilabel",
                         ids=[f"x{i}" for i in range(5)])
    with pytest.raises(DataError, match="PIE ids are not in the dataset"):
        pie_gallery(other, res, tmp_path / "g2.png")
