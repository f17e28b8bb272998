"""Co-occurrence evidence of mutual exclusivity: hand-computed values, the rule, unknown labels,
the real NIH label table (no pair exclusive) and its 1,000-image sample (too few images)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import fisher_exact

from medscalpel.data.cooccurrence import (CooccurrenceEvidence, ExclusionRule,
                                          cooccurrence_evidence, pair_evidence, poisson_ci)
from medscalpel.errors import ConfigError, DataError

# a, b over 8 images: both 1, a only 2, b only 1, neither 4
TINY = np.array([[1, 1], [1, 0], [1, 0], [0, 1], [0, 0], [0, 0], [0, 0], [0, 0]], float)


def test_hand_computed_tiny_table():
    ev = cooccurrence_evidence(TINY, ["a", "b"], rule=ExclusionRule(min_images=1))
    p = ev.pair("b", "a")
    assert (p.n, p.count_a, p.count_b, p.observed) == (8, 3, 2, 1)
    assert p.expected == pytest.approx(3 * 2 / 8)          # 0.75
    assert p.lift == pytest.approx(1 / 0.75)                # 1.333
    assert p.jaccard == pytest.approx(1 / 4)
    # P(X <= 1) for X ~ Hypergeom(8, 3, 2) = 1 - C(3,2)/C(8,2) = 1 - 3/28
    assert p.p_value == pytest.approx(25 / 28)
    assert p.p_value == pytest.approx(fisher_exact([[1, 2], [1, 4]], alternative="less")[1])
    lo, hi = poisson_ci(1)
    assert (lo, hi) == pytest.approx((0.025318, 5.571643), abs=1e-5)  # Garwood, 95%
    assert p.lift_ci == pytest.approx((lo / 0.75, hi / 0.75))
    assert not p.exclusive and p.verdict == "insufficient"
    assert any("too few expected co-occurrences (0.8 < 10)" in r for r in p.reasons)
    assert poisson_ci(0) == pytest.approx((0.0, 3.688879), abs=1e-5)


def test_unknown_labels_leave_the_pair():
    y = np.array([[1, np.nan, 1], [1, 1, 0], [0, 1, 1], [np.nan, 0, 1]], float)
    ev = cooccurrence_evidence(y, ["a", "b", "c"], rule=ExclusionRule(min_images=1))
    ab = ev.pair("a", "b")  # rows 1, 2 only
    assert (ab.n, ab.count_a, ab.count_b, ab.observed) == (2, 1, 2, 1)
    ac = ev.pair("a", "c")  # rows 0, 1, 2
    assert (ac.n, ac.count_a, ac.count_b, ac.observed) == (3, 2, 2, 1)
    assert ac.expected == pytest.approx(4 / 3)
    bc = ev.pair("b", "c")  # rows 1, 2, 3
    assert (bc.n, bc.count_a, bc.count_b, bc.observed) == (3, 2, 2, 1)


def planted(n: int = 6000, seed: int = 0) -> np.ndarray:
    """a and b (30% each) never together; c independent (20%); d rare (1%) and never with c."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    y = np.zeros((n, 4))
    y[:, 0] = u < 0.3
    y[:, 1] = (u >= 0.3) & (u < 0.6)
    y[:, 2] = rng.random(n) < 0.2
    y[:, 3] = (rng.random(n) < 0.01) & (y[:, 2] == 0)
    return y


def test_planted_exclusive_pair_and_the_rule():
    y = planted()
    ev = cooccurrence_evidence(y, list("abcd"))
    assert ev.enough_images and ev.warnings == ()
    assert [(p.a, p.b) for p in ev.exclusive_pairs()] == [("a", "b")]
    ab = ev.pair("a", "b")
    assert ab.observed == 0 and ab.lift == 0.0 and ab.verdict == "exclusive" and ab.reasons == ()
    assert ab.lift_ci[1] == pytest.approx(3.688879 / ab.expected, rel=1e-5)
    assert ab.lift_ci[1] < 0.1
    assert ab.p_value < 1e-50
    # c and d never co-occur either, but only ~12 co-occurrences were expected: the upper
    # bound 3.69 / 12 > 0.1, so the data cannot tell: not exclusive
    cd = ev.pair("c", "d")
    assert cd.observed == 0 and 10 <= cd.expected < 36.9
    assert not cd.exclusive and cd.verdict == "not_exclusive"
    assert cd.reasons[0].startswith("upper CI bound of the lift")
    ac = ev.pair("a", "c")
    assert not ac.exclusive and 0.8 < ac.lift < 1.2 and ac.lift_ci[0] < 1 < ac.lift_ci[1]
    # stricter or looser rules, on the same counts
    assert ev.with_rule(ExclusionRule(max_lift_upper=0.005)).exclusive_pairs() == []  # 3.69/547
    loose = ev.with_rule(ExclusionRule(max_lift_upper=0.5))
    assert {(p.a, p.b) for p in loose.exclusive_pairs()} == {("a", "b"), ("c", "d")}
    assert loose.pair("a", "b").lift_ci == ab.lift_ci and loose.pair("a", "b").exclusive
    m = ev.matrix("exclusive", ["b", "a", "c", "d"])
    assert m[0, 1] and m[1, 0] and m.sum() == 2
    # the same labels, too few of them: nothing is excluded and a warning says why
    few = cooccurrence_evidence(y[:1200], list("abcd"))
    assert few.exclusive_pairs() == [] and not few.enough_images
    assert "only 1200 images" in few.warnings[0]
    assert few.pair("a", "b").verdict == "insufficient"


def test_roundtrip_and_errors(tmp_path):
    ev = cooccurrence_evidence(planted(), list("abcd"), source="synthetic (train)")
    back = CooccurrenceEvidence.load(ev.save(tmp_path / "ev.json"))
    assert back.to_dict() == ev.to_dict()
    assert back.pair("a", "b") == ev.pair("a", "b")
    assert ExclusionRule.from_dict(ExclusionRule(min_expected=5).to_dict()) == \
        ExclusionRule(min_expected=5)
    with pytest.raises(ConfigError, match="'max_lift_upper' parameter of ExclusionRule"):
        ExclusionRule(max_lift_upper=0)
    with pytest.raises(ConfigError, match="'min_images' parameter of ExclusionRule"):
        ExclusionRule(min_images=0.5)
    with pytest.raises(DataError, match="must be 0/1"):
        cooccurrence_evidence(TINY * 2, ["a", "b"])
    with pytest.raises(DataError, match="do not match the 3 class names"):
        cooccurrence_evidence(TINY, ["a", "b", "c"])
    with pytest.raises(DataError, match="inconsistent counts"):
        pair_evidence("a", "b", 10, 3, 2, 5)
    with pytest.raises(DataError, match="No co-occurrence evidence for the pair"):
        ev.pair("a", "z")
    with pytest.raises(DataError, match="newer than this medscalpel"):
        CooccurrenceEvidence.from_dict(dict(ev.to_dict(), schema_version=99))
    # a class without positives: no expectation, no exclusion
    z = cooccurrence_evidence(np.c_[TINY, np.zeros(8)], ["a", "b", "c"],
                              rule=ExclusionRule(min_images=1))
    ac = z.pair("a", "c")
    assert ac.expected == 0 and math.isnan(ac.lift) and ac.verdict == "insufficient"


def test_multiclass_labels_are_exclusive_with_enough_data():
    y = np.random.default_rng(0).integers(0, 3, 9000)
    ev = cooccurrence_evidence(y, ["x", "y", "z"])
    assert len(ev.exclusive_pairs()) == 3  # one label per image: exclusive by construction


# ----------------------------------------------------------------------------- real NIH labels
def _nih(root, name: str):
    from medscalpel.data.spec import open_dataset

    if not (root / name).is_file():
        pytest.skip(f"real data not available: {root / name} does not exist")
    return open_dataset(f"nih:{root}?labels_only=true", split="all")


def test_full_nih_table_has_no_exclusive_pair(shared_data):
    ds = _nih(shared_data / "nih14-labels", "Data_Entry_2017_v2020.csv.gz")
    ev = cooccurrence_evidence(ds.labels, ds.class_names)
    assert ev.n == 112120 and ev.enough_images
    assert ev.exclusive_pairs() == []
    low = [p for p in ev.pairs if p.jaccard < 0.01]
    assert len(low) == 25 and all(p.observed >= 3 for p in low)  # every pair co-occurs
    eh = ev.pair("Effusion", "Hernia")
    assert (eh.observed, round(eh.expected, 1)) == (21, 27.0)
    assert eh.lift_ci[0] < 1 < eh.lift_ci[1]  # compatible with independence
    nh = ev.pair("Nodule", "Hernia")
    assert (nh.observed, round(nh.expected, 1)) == (10, 12.8)
    pe = ev.pair("Pneumonia", "Emphysema")
    assert (pe.observed, round(pe.expected)) == (23, 32)
    # the lowest lift of all 91 pairs is still far above the rule's 0.1
    assert min(p.lift_ci[1] for p in ev.pairs if np.isfinite(p.lift_ci[1])) > 0.4


def test_nih_sample_is_too_small_to_exclude(shared_data):
    ds = _nih(shared_data / "nih14-sample64", "Data_Entry_2017.csv")
    ev = cooccurrence_evidence(ds.labels, ds.class_names)
    assert ev.n == 1000 and not ev.enough_images
    assert ev.exclusive_pairs() == []
    assert "only 1000 images" in ev.warnings[0]
    never = [p for p in ev.pairs if p.observed == 0]
    assert len(never) == 26  # the count: never together, by sampling alone
    assert ev.pair("Pneumonia", "Mass").observed == 0
    assert all(p.verdict == "insufficient" for p in never)
