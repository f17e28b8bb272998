"""Polarized channels vs label Jaccard: hand-built weights and labels with known counts."""

from __future__ import annotations

import numpy as np
import pytest

from medscalpel.explain.polarity import (EVIDENCE_CATEGORIES, AbsoluteRule, QuantileRule, TopKRule,
                                       ZScoreRule, classify_jaccard, compare_stages,
                                       jaccard_matrix, make_rule, polarity_analysis)
from medscalpel.data.cooccurrence import ExclusionRule
from medscalpel.errors import ConfigError, DataError

NAMES = ["A", "B", "C", "D"]


def hand_labels() -> np.ndarray:
    """|A| = |B| = |D| = 10, |C| = 20; J(A,C) = 1/29, J(B,C) = 4/26, J(C,D) = 10/20, the other
    pairs never co-occur."""
    rows = ([[1, 0, 1, 0]] * 1 + [[1, 0, 0, 0]] * 9 + [[0, 0, 1, 0]] * 5 + [[0, 1, 1, 0]] * 4
            + [[0, 1, 0, 0]] * 6 + [[0, 0, 1, 1]] * 10 + [[0, 0, 0, 0]] * 5)
    return np.array(rows, float)


def hand_weights() -> np.ndarray:
    W = np.full((4, 6), 0.1)
    W[[0, 1], 0] = [2, -2]          # A+ B-   perfect
    W[[0, 2], 1] = [2, -2]          # A+ C-   legitimate
    W[[1, 2], 2] = [2, -2]          # B+ C-   mixed
    W[[2, 3], 3] = [2, -2]          # C+ D-   conflict
    W[[0, 1, 3], 4] = [2, -2, -3]   # A+ B- D-: two perfect triples; strongest pair A/D
    W[[0, 1], 5] = [2, 2]           # positive only: not polarized
    return W


def test_jaccard_matrix_hand_values():
    J = jaccard_matrix(hand_labels())
    assert J[0, 2] == pytest.approx(1 / 29) and J[2, 0] == pytest.approx(1 / 29)
    assert J[1, 2] == pytest.approx(4 / 26)
    assert J[2, 3] == pytest.approx(0.5)
    assert J[0, 1] == 0 and J[0, 3] == 0 and J[1, 3] == 0
    np.testing.assert_allclose(np.diag(J), 1.0)
    # NaN = unknown: that row is left out of pairs involving the column
    y = np.array([[1, 1], [1, np.nan], [0, 1]], float)
    assert jaccard_matrix(y)[0, 1] == pytest.approx(1 / 2)
    # one class never positive: J = 0; neither ever positive: undefined (NaN)
    assert jaccard_matrix(np.array([[1, 0], [0, 0]], float))[0, 1] == 0
    assert np.isnan(jaccard_matrix(np.zeros((3, 2)))[0, 1])


def test_classify_jaccard_bounds():
    cats = classify_jaccard([0.0, 1e-9, 0.0999, 0.1, 0.2999, 0.3, 1.0, np.nan])
    assert cats.tolist() == ["perfect", "legitimate", "legitimate", "mixed", "mixed", "conflict",
                             "conflict", "undefined"]


def test_hand_built_counts():
    res = polarity_analysis(hand_weights(), hand_labels(), NAMES, rule=AbsoluteRule(1.0),
                            n_null=0)
    assert res.counts("triples") == {"perfect": 3, "legitimate": 1, "mixed": 1, "conflict": 1,
                                     "undefined": 0}
    assert res.counts("channels") == {"perfect": 2, "legitimate": 1, "mixed": 1, "conflict": 1,
                                      "undefined": 0}
    trip = {tuple(t) for t in res.triples.tolist()}
    assert trip == {(0, 0, 1), (1, 0, 2), (2, 1, 2), (3, 2, 3), (4, 0, 1), (4, 0, 3)}
    rows = {r["channel"]: r for r in res.rows("channels")}
    assert rows[4]["positive"] == "A" and rows[4]["negative"] == "D" and rows[4]["w_neg"] == -3
    assert rows[3]["category"] == "conflict" and rows[3]["jaccard"] == pytest.approx(0.5)
    assert 5 not in rows
    d = res.to_dict()
    assert d["n_polarized_channels"] == 5 and d["n_triples"] == 6
    assert d["all_class_pairs"] == pytest.approx({"perfect": 0.5, "legitimate": 1 / 6,
                                                  "mixed": 1 / 6, "conflict": 1 / 6})
    # the seed's top-n channel table: channel 4 has min(w+, |w-|) = 2, like all others; keep 2
    top = polarity_analysis(hand_weights(), hand_labels(), NAMES, rule=AbsoluteRule(1.0),
                            n_null=0, max_channels=2)
    assert len(top.channel_pairs) == 2


def test_null_models_expected_counts_and_p_values():
    res = polarity_analysis(hand_weights(), hand_labels(), NAMES, rule=AbsoluteRule(1.0),
                            n_null=2000, seed=3)
    pairs = res.nulls[("pairs", "triples")]
    # random ordered pairs of distinct classes: 6/12 perfect, 2/12 each other category
    assert pairs.mean_counts["perfect"] == pytest.approx(3.0, abs=0.1)
    assert pairs.mean_counts["conflict"] == pytest.approx(1.0, abs=0.1)
    assert pairs.exclusive_fraction_null == pytest.approx(2 / 3, abs=0.02)
    assert pairs.exclusive_fraction_observed == pytest.approx(4 / 6)
    assert pairs.enrichment == pytest.approx(1.0, abs=0.05)
    assert 0.3 < pairs.p_value <= 1.0
    # with an absolute rule, shuffling a channel's weights across classes keeps its polarity
    cols = res.nulls[("columns", "channels")]
    assert cols.mean_total == pytest.approx(5.0)
    rows = res.nulls[("rows", "triples")]
    assert rows.n_null == 2000 and np.isfinite(rows.exclusive_fraction_null)
    table = res.table("triples")
    assert list(table.columns) == ["observed", "null_columns", "null_pairs", "null_rows"]
    assert table.loc["perfect", "observed"] == 3
    # determinism
    again = polarity_analysis(hand_weights(), hand_labels(), NAMES, rule=AbsoluteRule(1.0),
                              n_null=2000, seed=3)
    assert again.nulls[("rows", "triples")] == rows


def test_enriched_exclusivity_is_significant():
    # 40 channels, every one polarized between A and B (J = 0): chance would give 2/3 exclusive
    W = np.zeros((4, 40))
    W[0], W[1] = 1.0, -1.0
    W[2:] = np.random.default_rng(0).normal(scale=0.01, size=(2, 40))
    res = polarity_analysis(W, hand_labels(), NAMES, rule=AbsoluteRule(0.5), n_null=200,
                            null_models=["pairs"])
    s = res.nulls[("pairs", "channels")]
    assert res.counts("channels")["perfect"] == 40
    assert s.p_value == pytest.approx(1 / 201)
    assert s.p_value_perfect == pytest.approx(1 / 201)
    assert s.enrichment == pytest.approx(1.5, abs=0.05)


def test_rules():
    W = np.array([[1.0, -2.0, 3.0, -4.0, 0.5], [0.1, 0.2, -0.3, 0.4, -5.0]])
    pos, neg = QuantileRule(q=0.5).masks(W)
    # row 0: |w| median 2 -> strong 2, 3, 4 ; row 1: median 0.3 -> 0.3, 0.4, 5
    assert pos[0].tolist() == [False, False, True, False, False]
    assert neg[0].tolist() == [False, True, False, True, False]
    assert neg[1].tolist() == [False, False, True, False, True]
    assert TopKRule(k=1).strong(W).sum(1).tolist() == [1, 1]
    assert ZScoreRule(z=1.5).strong(W)[1].tolist() == [False, False, False, False, True]
    assert make_rule({"name": "quantile", "q": 0.8}) == QuantileRule(0.8)
    assert isinstance(make_rule("topk"), TopKRule)


def test_compare_stages():
    rng = np.random.default_rng(1)
    W0 = rng.normal(size=(4, 64))
    out = compare_stages({"dense": W0, "lossless": W0.copy(), "pruned": W0[:, :32]},
                         hand_labels(), NAMES, n_null=20, rule=QuantileRule(0.8))
    t = out.table("channels")
    assert list(t.index) == ["dense", "lossless", "pruned"]
    assert t.loc["dense"].equals(t.loc["lossless"])
    assert t.loc["pruned", "num_channels"] == 32
    d = out.to_dict()
    assert set(d["stages"]) == {"dense", "lossless", "pruned"}


def test_polarity_errors(tmp_path):
    W, Y = hand_weights(), hand_labels()
    with pytest.raises(DataError, match="weight has 4 class rows but the labels have 3"):
        polarity_analysis(W, Y[:, :3])
    with pytest.raises(DataError, match=r"must be 0/1.*row 0, column 1 holds 2"):
        polarity_analysis(W, np.array([[0, 2, 0, 0]], float))
    with pytest.raises(ConfigError, match="'bounds' parameter"):
        polarity_analysis(W, Y, bounds=(0.3, 0.1))
    with pytest.raises(ConfigError, match="'null_models' parameter.*'shuffle'"):
        polarity_analysis(W, Y, null_models=["shuffle"])
    with pytest.raises(ConfigError, match="Unknown polarity rule 'median'"):
        polarity_analysis(W, Y, rule="median")
    with pytest.raises(ConfigError, match="'q' parameter of QuantileRule"):
        QuantileRule(q=1.5)
    with pytest.raises(DataError, match=r"\[K, C\]"):
        polarity_analysis(W[0], Y)
    with pytest.raises(ConfigError, match="at least one stage"):
        compare_stages({}, Y)


def test_polarity_figure(tmp_path):
    from medscalpel.explain.figures import polarity_table_figure

    res = polarity_analysis(hand_weights(), hand_labels(), NAMES, rule=AbsoluteRule(1.0),
                            n_null=50)
    p = polarity_table_figure(res, tmp_path / "polarity.png")
    assert p.stat().st_size > 5000


def big_labels(n: int = 6000) -> np.ndarray:
    """A and B (30% each) never together; C and D independent (20% each, and of A, B)."""
    rng = np.random.default_rng(0)
    u = rng.random(n)
    y = np.zeros((n, 4))
    y[:, 0] = u < 0.3
    y[:, 1] = (u >= 0.3) & (u < 0.6)
    y[:, 2:] = rng.random((n, 2)) < 0.2
    return y


def test_evidence_categories_next_to_jaccard():
    res = polarity_analysis(hand_weights(), big_labels(), NAMES, rule=AbsoluteRule(1.0),
                            n_null=0)
    # triples: (0, A, B), (1, A, C), (2, B, C), (3, C, D), (4, A, B), (4, A, D)
    assert res.counts_evidence("triples") == {"exclusive": 2, "not_exclusive": 4,
                                              "insufficient": 0}
    rows = {r["channel"]: r for r in res.rows("channels")}
    assert rows[0]["category_evidence"] == "exclusive" and rows[0]["observed"] == 0
    assert rows[0]["lift_ci"][1] < 0.1 and rows[0]["category"] == "perfect"
    # C-D: Jaccard ~0.11 ('mixed' by the seed's bounds) but independent by the evidence
    assert rows[3]["category_evidence"] == "not_exclusive"
    assert 0.8 < rows[3]["lift"] < 1.2
    d = res.to_dict()
    assert d["counts_evidence"]["channels"]["exclusive"] == 1  # channel 0 (channel 4: A/D)
    assert d["all_class_pairs_evidence"] == pytest.approx({"exclusive": 1 / 6,
                                                           "not_exclusive": 5 / 6,
                                                           "insufficient": 0.0})
    assert d["exclusive_pairs"] == [["A", "B"]] and d["evidence_n_images"] == 6000
    assert "seed paper only" in d["category_schemes"]["counts"]
    assert set(d["counts_evidence"]["triples"]) == set(EVIDENCE_CATEGORIES)


def test_small_label_sets_are_insufficient_not_exclusive():
    # hand_labels: 40 images. A and B never co-occur (Jaccard 0, 'perfect' for the seed), but
    # 40 images cannot show exclusivity
    res = polarity_analysis(hand_weights(), hand_labels(), NAMES, rule=AbsoluteRule(1.0),
                            n_null=0)
    assert res.counts("channels")["perfect"] == 2
    assert res.counts_evidence("channels") == {"exclusive": 0, "not_exclusive": 0,
                                               "insufficient": 5}
    d = res.to_dict()
    assert "only 40 images" in d["evidence_warnings"][0] and d["exclusive_pairs"] == []
    # the rule is a parameter: even with min_images lowered, the expected co-occurrences of
    # A and B (10 * 10 / 40 = 2.5) are too few to tell
    loose = polarity_analysis(hand_weights(), hand_labels(), NAMES, rule=AbsoluteRule(1.0),
                              n_null=0, exclusion_rule=ExclusionRule(min_images=10))
    assert loose.rows("channels")[0]["category_evidence"] == "insufficient"
    assert loose.rows("channels")[0]["expected"] == pytest.approx(100 / 40)
    t = compare_stages({"dense": hand_weights()}, big_labels(), NAMES, n_null=0,
                       rule=AbsoluteRule(1.0)).table("channels")
    assert t.loc["dense", "evidence_exclusive"] == 1
