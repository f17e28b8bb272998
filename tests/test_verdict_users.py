"""The remaining verdicts go through the one decision primitive (issue Q): distillation's student
acceptance, the treatment router's "helped" and site recalibration's "restored" say pass / fail /
undecided with their evidence, on planted data: undecided where the evidence is thin, pass / fail
where it is clear; the report shows the verdict, never "met" on a point estimate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medscalpel.compress.distill_accept import acceptance, auroc_verdict, speed_verdict
from medscalpel.engine.decision import Verdict
from medscalpel.engine.predict import Features
from medscalpel.engine.predictions import Predictions
from medscalpel.report.experiment import experiment_report
from medscalpel.repair.restored import class_outcomes, restored_verdict
from medscalpel.repair.shift import SiteRecalibration, recalibrate_site
from medscalpel.repair.triage import TreatmentRouter
from medscalpel.runs import write_json


# ----------------------------------------------------------------------------- planted data
def scores(n, k=2, noise=1.0, seed=0, prev=0.3, loss=0.0, ids="i"):
    """Multi-label teacher logits ``2.5 y - 1.25 + noise``; the student's are the same plus
    ``loss`` x fresh noise (0: bit-identical)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < prev).astype(np.float32)
    z = 2.5 * y - 1.25 + noise * rng.normal(size=(n, k))
    zs = z + loss * rng.normal(size=(n, k))
    names = tuple(f"c{j}" for j in range(k))
    mk = lambda logits, mid: Predictions(logits.astype(np.float32), y,  # noqa: E731
                                         ids=tuple(f"{ids}{i}" for i in range(n)),
                                         class_names=names, task="multilabel", model_id=mid)
    return mk(z, "teacher"), mk(zs, "student")


def features(n, seed, prefix, bias_a=-12.0):
    """Class a: separable on channel 0, but its bias is far too low (recall 0 at 0.5: a
    threshold fixes it); class c healthy."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 4)).astype(np.float32)
    y = np.stack([(f[:, 0] > 0.5), (f[:, 2] > 0)], 1).astype(np.float32)
    w = np.zeros((2, 4), np.float32)
    w[0, 0], w[1, 2] = 4.0, 8.0
    return Features(f, w, np.array([bias_a, 0.0], np.float32), y,
                    tuple(f"{prefix}{i}" for i in range(n)), ("a", "c"), "multilabel", prefix)


# ----------------------------------------------------------------------------- distillation
def test_distill_auroc_acceptance_is_a_verdict():
    # bit-identical student on 2000 images: non-inferiority shown (pass)
    t, s = scores(2000, seed=1)
    v = auroc_verdict(t, s, n_boot=200, seed=0)
    assert isinstance(v, Verdict) and v.outcome == "pass"
    assert {u.name for u in v.units} == {"c0", "c1", "macro"}
    assert v.correction == "holm" and v.unit("c0").n_pos > 500
    # a student that lost a lot of signal, on 2000 images: loss beyond 0.01 shown (fail)
    t, s = scores(2000, seed=2, loss=2.0)
    v = auroc_verdict(t, s, n_boot=200, seed=0)
    assert v.outcome == "fail" and v.unit("macro").ci_high < -0.01
    # the same kind of student on 40 images: a point estimate would decide, the verdict does not
    t, s = scores(40, seed=3, loss=0.3, prev=0.4)
    v = auroc_verdict(t, s, n_boot=200, seed=0)
    assert v.outcome == "undecided"
    # a class with 3 positives is named unscorable, not skipped
    t, s = scores(300, seed=4, prev=0.01)
    v = auroc_verdict(t, s, n_boot=200, seed=0)
    assert v.outcome == "undecided" and set(v.unscorable) >= {"c0", "c1"}
    assert "positive image(s) < 10" in v.unit("c0").reason
    # DeLong when no bootstrap is asked for
    t, s = scores(2000, seed=1)
    assert "DeLong" in auroc_verdict(t, s, n_boot=0, seed=0).method


def test_distill_speed_and_overall_outcome():
    assert speed_verdict([10, 10, 10], [1, 1, 1], 5.0)["outcome"] == "pass"
    assert speed_verdict([10, 10, 10], [4, 4, 4], 5.0)["outcome"] == "fail"
    noisy = speed_verdict([10, 10, 10], [1, 1, 4], 5.0)   # ratios 10, 10, 2.5
    assert noisy["outcome"] == "undecided" and noisy["ratios"] == [10.0, 10.0, 2.5]
    assert speed_verdict([10], [1], 5.0)["outcome"] == "undecided"  # one round: no spread
    t, s = scores(2000, seed=1)
    ok = auroc_verdict(t, s, n_boot=200, seed=0)
    student = {"param_ratio": 0.05}
    acc = acceptance(student, [10, 10, 10], [1, 1, 1], ok)
    assert acc["outcome"] == "pass" and acc["auroc"]["outcome"] == "pass"
    assert Verdict.from_dict(json.loads(json.dumps(acc["auroc"]))).outcome == "pass"
    assert acceptance(student, [10, 10, 10], [1, 1, 4], ok)["outcome"] == "undecided"
    assert acceptance({"param_ratio": 0.5}, [10, 10, 10], [1, 1, 1], ok)["outcome"] == "fail"
    t, s = scores(40, seed=3, loss=0.3, prev=0.4)
    thin = acceptance(student, [10, 10, 10], [1, 1, 1], auroc_verdict(t, s, 200, 0))
    assert thin["outcome"] == "undecided" and "auroc undecided" in thin["reason"]
    assert not any(k.endswith("_met") and k != "param_ratio_met" for k in thin)


# ----------------------------------------------------------------------------- triage
def test_triage_helped_is_a_verdict():
    fit = features(300, 0, "fit")
    # 400 held-out images: the threshold clearly helps class a (pass -> helped, kept)
    res = TreatmentRouter(budget=5, n_boot=200).fit(fit).run(features(400, 1, "held"))
    a = next(c for c in res.classes if c.name == "a")
    att = a.attempts[0]
    assert att["treatment"] == "threshold" and att["status"] == "helped"
    assert att["outcome"] == "pass" and a.chosen[0] == "threshold"
    v = Verdict.from_dict(att["verdict"])
    imp = next(u for u in v.units if u.kind == "improvement")
    assert imp.ci_low >= 0 and imp.n_pos >= 10 and v.correction == "holm"
    assert "pass" in att["evidence"] and "youden gain" in att["evidence"]
    # 30 held-out images (15 to judge on, a handful of positives): undecided, not kept
    res = TreatmentRouter(budget=5, n_boot=200).fit(fit).run(features(30, 1, "small"))
    a = next(c for c in res.classes if c.name == "a")
    att = a.attempts[0]
    assert att["status"] == "undecided" and att["outcome"] == "undecided"
    assert "threshold" not in a.chosen
    v = Verdict.from_dict(att["verdict"])
    assert v.unscorable and "positive image(s) < 10" in v.units[0].reason


def test_triage_no_effect_is_a_fail():
    # class a's row is all zero: a constant score, no threshold can separate it -> no gain shown
    fit, held = features(300, 0, "fit"), features(400, 1, "held")
    for d in (fit, held):
        d.weight[0] = 0.0
    res = TreatmentRouter(budget=5, n_boot=200, treatments=["threshold"]).fit(fit).run(held)
    a = next(c for c in res.classes if c.name == "a")
    assert a.attempts[0]["status"] == "no gain" and a.attempts[0]["outcome"] == "fail"
    assert a.chosen == ["none"]


# ----------------------------------------------------------------------------- site recalibration
def _rows(sens, spec, n_pos, n_neg, name="c"):
    return [{"name": name, "sensitivity": sens, "specificity": spec, "n_pos": n_pos,
             "n_neg": n_neg}]


def test_restored_is_a_tost_verdict_with_holm():
    internal = _rows(0.80, 0.90, 3000, 7000)
    # within 0.05 on 3000 / 7000 images: shown restored
    v = restored_verdict(internal, _rows(0.79, 0.91, 3000, 7000), ["c"], 0.05)
    assert v.outcome == "pass" and len(v.units) == 4 and v.n_tests == 4
    # 0.2 off on many images: shown NOT restored
    v = restored_verdict(internal, _rows(0.60, 0.90, 3000, 7000), ["c"], 0.05)
    assert v.outcome == "fail" and class_outcomes(v, ["c"], 0.05) == {"c": "fail"}
    # the same point estimate as the pass, on 30 positives: undecided (the old flag said yes)
    v = restored_verdict(internal, _rows(0.79, 0.91, 30, 7000), ["c"], 0.05)
    assert v.outcome == "undecided" and class_outcomes(v, ["c"], 0.05) == {"c": "undecided"}
    assert any(u.more_images for u in v.units)
    # too few positives: unscorable, named
    v = restored_verdict(internal, _rows(0.8, 0.9, 5, 7000), ["c"], 0.05)
    assert v.outcome == "undecided" and v.unscorable
    # Holm: a second class makes each test stricter
    two = restored_verdict(internal + _rows(.8, .9, 3000, 7000, "d"),
                           _rows(0.79, 0.91, 3000, 7000) + _rows(.8, .9, 3000, 7000, "d"),
                           ["c", "d"], 0.05)
    assert two.n_tests == 8 and min(u.level_adj for u in two.units) == pytest.approx(0.025 / 8)


def _site(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < 0.3).astype(np.float32)
    z = 2.5 * y - 1.25 + rng.normal(0, 1, (n, 2)) + shift
    return Predictions(z.astype(np.float32), y, ids=tuple(f"s{seed}_{i}" for i in range(n)),
                       class_names=("c0", "c1"), task="multilabel")


def test_recalibrate_site_says_undecided_on_a_small_site_and_pass_on_a_large_one():
    internal = _site(4000, 1)
    small, _ = recalibrate_site(None, internal, _site(120, 2, shift=0.5), k=20,
                                thresholds=[0.5, 0.5], n_boot=0, seed=0)
    assert set(small.outcomes.values()) <= {"undecided", "fail"}
    assert "undecided" in small.outcomes.values()
    assert not any(small.restored.values())          # restored = shown, never a guess
    assert small.restored_verdict["outcome"] == "undecided"
    assert small.verdict.startswith("NOT restored (undecided)")
    large, _ = recalibrate_site(None, internal, _site(8000, 3, shift=0.5), k=20,
                                method="quantile", thresholds=[0.5, 0.5], n_boot=0, seed=0)
    assert large.outcomes == {"c0": "pass", "c1": "pass"} and all(large.restored.values())
    assert large.verdict.startswith("restored (pass)")
    back = SiteRecalibration.from_dict(json.loads(json.dumps(large.to_dict())))
    assert back.outcomes == large.outcomes and back.restored_verdict["n_tests"] == 8
    assert {r["restored"] for r in large.table()} == {"pass"}


# ----------------------------------------------------------------------------- report
def test_report_shows_outcomes_with_their_evidence(tmp_path):
    run = tmp_path / "run"
    t, s = scores(40, seed=3, loss=0.3, prev=0.4)
    acc = acceptance({"param_ratio": 0.05}, [10, 10, 10], [1, 1, 1], auroc_verdict(t, s, 200, 0))
    write_json(run / "distill" / "distill.json", {
        "teacher": {"arch": "densenet_tiny", "metrics": {"auroc": 0.8}},
        "students": {"distilled": {"arch": "resnet_tiny", "auroc_drop": 0.004,
                                   "metrics": {"auroc": 0.796}}}, "targets": acc,
        "config": {"soft_weight": 0.5}})
    res = TreatmentRouter(budget=5, n_boot=200).fit(features(300, 0, "fit")).run(
        features(30, 1, "small"))
    res.save(run / "repair" / "triage")
    rep = experiment_report(run)
    dist = rep.section("distill")
    facts = {k: c.text for k, c in dist.facts}
    assert facts["student acceptance"].startswith("undecided")
    assert facts["AUROC non-inferiority"] == "undecided"
    assert not any("met" in k.split() for k in facts)
    vt = next(t for t in dist.tables if t.key == "distill_auroc_verdict")
    assert {r[0].text for r in vt.rows} >= {"c0", "c1"}
    assert any(r[3].src.endswith("/ci_low") for r in vt.rows)  # interval bounds point into JSON
    tri = next(t for t in rep.section("repair").tables if t.key == "triage")
    cells = [c.text for r in tri.rows for c in r]
    assert any(c.startswith("undecided") for c in cells)


def test_weighted_metrics_with_unit_weights_equal_class_metrics():
    from medscalpel.repair.helped import class_arrays, weighted_class_metrics
    from medscalpel.repair.triage import class_metrics

    d = features(200, 5, "w", bias_a=-1.0)
    flags = np.random.default_rng(0).random(200) < 0.3
    for k in (0, 1):
        want = class_metrics(d.logits(), d.labels, d.task, k, 0.4, 10, flags)
        a = class_arrays(d.logits(), d.labels, d.task, k, 0.4, flags)
        got = weighted_class_metrics(a, np.ones((1, int(a["known"].sum()))), 10)
        for m, v in got.items():
            assert v[0] == pytest.approx(want[m], abs=1e-12), m
