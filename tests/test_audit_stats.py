"""Audit statistics agree with scipy on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from medscalpel.audit.stats import (correlate, fisher_2x2, mann_whitney, mantel, rowwise_spearman,
                                    share_ratio)
from medscalpel.errors import ConfigError, DataError


def test_correlate_matches_scipy_and_ci_brackets_estimate():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = 0.6 * x + rng.normal(size=40)
    c = correlate(x, y, n_boot=1000, seed=3)
    pr, sr = sps.pearsonr(x, y), sps.spearmanr(x, y)
    assert c.n == 40
    assert c.pearson_r == pytest.approx(pr.statistic, abs=1e-12)
    assert c.pearson_p == pytest.approx(pr.pvalue, rel=1e-9)
    assert c.spearman_rho == pytest.approx(sr.statistic, abs=1e-12)
    assert c.spearman_p == pytest.approx(sr.pvalue, rel=1e-9)
    assert c.pearson_ci[0] < c.pearson_r < c.pearson_ci[1]
    assert c.spearman_ci[0] < c.spearman_rho < c.spearman_ci[1]
    lr = sps.linregress(x, y)
    assert (c.slope, c.intercept) == pytest.approx((lr.slope, lr.intercept))
    # the same seed gives the same interval; JSON round trip keeps the numbers
    again = correlate(x, y, n_boot=1000, seed=3)
    assert again.pearson_ci == c.pearson_ci
    assert type(c).from_dict(c.to_dict()).spearman_ci == pytest.approx(c.spearman_ci)


def test_correlate_known_values_and_nan_handling():
    c = correlate([1, 2, 3, 4, 5, np.nan], [2, 4, 5, 4, 5, 1.0], n_boot=0)
    assert c.n == 5
    assert c.pearson_r == pytest.approx(0.7745966692, abs=1e-9)
    assert np.isnan(c.pearson_ci[0])
    const = correlate([1, 2, 3, 4], [1, 1, 1, 1], y_name="flat", n_boot=10)
    assert np.isnan(const.pearson_r) and "flat is constant" in const.reason
    few = correlate([1, 2], [3, 4])
    assert "fewer than 3" in few.reason
    with pytest.raises(DataError, match="has 3 values but y has 2"):
        correlate([1, 2, 3], [1, 2])
    with pytest.raises(ConfigError, match="'n_boot' parameter of correlate"):
        correlate([1, 2, 3], [1, 2, 3], n_boot=-1)


def test_rowwise_spearman_matches_scipy():
    rng = np.random.default_rng(2)
    a = rng.random((25, 7))
    b = a + 0.3 * rng.random((25, 7))
    b[3] = b[3][::-1]
    a[5, :3] = a[5, 3]  # ties
    rho = rowwise_spearman(a, b)
    for i in range(25):
        assert rho[i] == pytest.approx(sps.spearmanr(a[i], b[i]).statistic, abs=1e-12)
    flat = rowwise_spearman(np.ones((1, 4)), np.arange(4.0)[None])
    assert np.isnan(flat[0])
    with pytest.raises(DataError, match="same"):
        rowwise_spearman(a, b[:, :3])


def test_mann_whitney_matches_scipy_with_rank_biserial():
    a = np.array([0.1, 0.2, 0.3, 0.35, np.nan])
    b = np.array([0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
    res = mann_whitney(a, b, a_name="pie", b_name="rest")
    ref = sps.mannwhitneyu(a[:4], b)
    assert res["U"] == ref.statistic and res["p"] == pytest.approx(ref.pvalue)
    # P(a > b) - P(a < b) over 24 pairs: 0.35 > 0.3 once, one tie (0.3, 0.3), 22 below
    assert res["rank_biserial"] == pytest.approx((1 - 22) / 24)
    assert res["n_pie"] == 4 and res["median_rest"] == pytest.approx(0.65)
    empty = mann_whitney([], [1.0, 2.0])
    assert np.isnan(empty["p"]) and "empty group" in empty["reason"]


def test_fisher_matches_scipy():
    t = np.array([[12, 5], [30, 60]])
    res = fisher_2x2(t)
    ref = sps.fisher_exact(t)
    orr = sps.contingency.odds_ratio(t)
    ci = orr.confidence_interval()
    assert res["p"] == pytest.approx(ref.pvalue)
    assert res["sample_odds_ratio"] == pytest.approx(12 * 60 / (5 * 30))
    assert res["odds_ratio"] == pytest.approx(orr.statistic)
    assert res["odds_ratio_ci"] == pytest.approx([ci.low, ci.high])
    with pytest.raises(DataError, match="2x2"):
        fisher_2x2([[1, 2, 3]])


def test_share_ratio_values_and_ci():
    subset = np.zeros(200, bool)
    subset[:20] = True
    has = np.zeros((200, 2), bool)
    has[:10, 0] = True          # 10 of 20 subset items, 10 of 200 overall -> ratio 10
    has[::2, 1] = True          # evenly spread -> ratio 1
    r = share_ratio(subset, has, n_boot=500, seed=0)
    assert r["share_subset"].tolist() == [0.5, 0.5]
    assert r["ratio"] == pytest.approx([10.0, 1.0])
    assert r["ratio_vs_rest"][1] == pytest.approx(1.0)
    assert r["ratio_lo"][0] > 1.0 and r["ratio_lo"][1] < 1.0 < r["ratio_hi"][1]
    assert r["fisher_p"][0] < 1e-6 and r["fisher_p"][1] == pytest.approx(1.0)
    with pytest.raises(DataError, match="proper, non-empty subset"):
        share_ratio(np.zeros(5, bool), np.ones((5, 1), bool))


def test_mantel_detects_related_matrices():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(9, 2))
    d1 = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    d2 = d1 * 2 + 0.01 * rng.random((9, 9))
    d2 = (d2 + d2.T) / 2
    res = mantel(d1, d2, n_perm=199, seed=0)
    assert res["statistic"] > 0.99 and res["p"] <= 0.02
    unrelated = rng.random((9, 9))
    unrelated = unrelated + unrelated.T
    assert mantel(d1, unrelated, n_perm=199)["p"] > 0.02
