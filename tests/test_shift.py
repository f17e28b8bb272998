"""Repair under site shift: k-shot recalibration restores a planted shift and refuses too few
images, the label-free check and the OOD score, phantom site B (planted, deterministic), the
flow and the ``repair recalibrate-site`` CLI."""

from __future__ import annotations

import numpy as np
import pytest

from medscalpel.data import Preprocess, open_dataset
from medscalpel.data.phantom.sites import SITES, apply_site
from medscalpel.engine.predict import Features
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.repair.shift import (OODScorer, SiteRecalibration, SiteRecalibrator,
                                     k_shot_draws, operating_point, recalibrate_site,
                                     sample_k_shot, shift_check)


def planted(n, shift=0.0, scale=1.0, seed=0, k=2, prev=0.3):
    """Multi-label scores: logit = scale * (2.5 * y - 1.25 + noise) + shift."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < prev).astype(np.float32)
    z = scale * (2.5 * y - 1.25 + rng.normal(0, 1, (n, k))) + shift
    return Predictions(z.astype(np.float32), y, ids=tuple(f"s{seed}_{i}" for i in range(n)),
                       class_names=tuple(f"c{j}" for j in range(k)), task="multilabel")


def test_sample_k_shot_counts_and_refusal():
    p = planted(300, seed=1)
    rows = sample_k_shot(p, k=20, seed=0)
    t = p.targets()[rows]
    assert ((t > 0.5).sum(0) >= 20).all() and ((t < 0.5).sum(0) >= 20).all()
    assert len(rows) <= 80 and len(set(rows)) == len(rows)
    rows2, use = k_shot_draws(p, k=20, seed=0)
    assert np.array_equal(rows, rows2) and use.shape == (len(rows), 2)
    for j in range(2):  # each class: exactly its own k positives and k negatives
        tj = t[use[:, j], j]
        assert (tj > 0.5).sum() == 20 and (tj < 0.5).sum() == 20
    assert np.array_equal(rows, sample_k_shot(p, k=20, seed=0))
    assert not np.array_equal(rows, sample_k_shot(p, k=20, seed=1))
    few = planted(40, seed=2, prev=0.2)
    npos = int(few.targets()[:, 0].sum())
    with pytest.raises(DataError, match=rf"at least 20 positive and 20 negative images \(minimum "
                                        rf"20 per side.*c0 \({npos} pos"):
        sample_k_shot(few, k=20)
    mc = Predictions(np.zeros((9, 3), np.float32), np.array([0, 0, 0, 1, 1, 1, 2, 2, 2]),
                     ids=tuple("abcdefghi"), class_names=("x", "y", "z"), task="multiclass")
    assert len(sample_k_shot(mc, k=2)) == 6


def correlated(n, seed):
    """Two findings that co-occur (c1 mostly in c0-positive images); c0's score also rises with
    c1 (a sicker image), so c1's positives are NOT a random sample of c0's negatives."""
    rng = np.random.default_rng(seed)
    y0 = rng.random(n) < 0.25
    y1 = np.where(y0, rng.random(n) < 0.6, rng.random(n) < 0.08)
    z0 = 2.0 * y0 + 1.5 * y1 - 1.5 + rng.normal(0, 1, n)
    z1 = 2.0 * y1 + 0.5 * y0 - 1.5 + rng.normal(0, 1, n)
    return Predictions(np.stack([z0, z1], 1).astype(np.float32),
                       np.stack([y0, y1], 1).astype(np.float32),
                       ids=tuple(f"c{seed}_{i}" for i in range(n)), class_names=("c0", "c1"),
                       task="multilabel")


def test_k_shot_fit_is_unbiased_with_correlated_findings():
    """No shift at all (the site IS the internal set): over many k-shot draws the re-fitted
    threshold must restore the internal sensitivity on average. Reusing c1's positives as c0's
    negatives (the sicker images) would raise c0's cut and lose sensitivity every time."""
    p = correlated(4000, seed=11)
    gaps = []
    for seed in range(30):
        res, _ = recalibrate_site(None, p, p, k=20, method="threshold", thresholds=[0.5, 0.5],
                                  n_boot=0, seed=seed)
        gaps.append([a["sensitivity"] - i["sensitivity"]
                     for i, a in zip(res.internal, res.after)])
    assert np.all(np.abs(np.mean(gaps, 0)) < 0.04), np.mean(gaps, 0)


def test_threshold_recalibration_restores_a_planted_shift():
    internal = planted(2000, seed=3)
    external = planted(4000, shift=1.5, seed=4)  # every logit +1.5 at the new site
    thr = np.array([0.5, 0.5])
    res, rec = recalibrate_site(None, internal, external, k=60, method="threshold",
                                n_boot=200, seed=0)
    for i, b, a in zip(res.internal, res.before, res.after):
        assert b["specificity"] < i["specificity"] - 0.2  # the shift broke specificity
        # k=60 per side: the matched cut sits within ~1.5 binomial SE of the target
        assert abs(a["sensitivity"] - i["sensitivity"]) < 0.07
        assert abs(a["specificity"] - i["specificity"]) < 0.07
        assert a["sensitivity_ci"][0] < a["sensitivity"] < a["sensitivity_ci"][1]
    assert (rec.thresholds_ > 0.6).all() and rec.n_fit_ == res.n_fit
    assert res.k == 60 and res.n_fit + res.n_rest == 4000 and not set(res.fit_ids) & set(
        external.select(np.isin(external.ids, res.fit_ids, invert=True)).ids)
    # temperature / platt on an affine shift, evaluated the same way
    res_p, _ = recalibrate_site(None, internal, external, k=20, method="platt", n_boot=0)
    for i, a in zip(res_p.internal, res_p.after):
        assert abs(a["specificity"] - i["specificity"]) < 0.1
    assert SiteRecalibration.from_dict(res.to_dict()).to_dict() == res.to_dict()
    again = SiteRecalibrator.from_dict(rec.to_dict())
    assert np.array_equal(again.decide(external), rec.decide(external))
    # exactly reproduces a planted operating point on the fit data with k large
    op = operating_point(internal, thr)
    big = SiteRecalibrator("threshold").fit(external, thr, op)
    op_after = operating_point(external, big.thresholds_)
    for a, i in zip(op_after, op):
        assert abs(a["specificity"] - i["specificity"]) < 0.02


def test_logit_maps_go_onto_the_internal_scale_at_the_internal_prevalence():
    """A rare class (10%) and an offset shift (+1.5 logits): a map fitted on the class-balanced
    k-shot sample alone makes probabilities of a 50%-positive sample, not the scores the stored
    threshold was tuned on; reweighted to the internal prevalence and composed with the same map
    on the internal set, the offset is undone."""
    internal = planted(3000, seed=3, prev=0.1)
    external = planted(6000, shift=1.5, seed=4, prev=0.1)
    thr = [0.3, 0.3]
    res, rec = recalibrate_site(None, internal, external, k=20, method="offset",
                                thresholds=thr, n_boot=0, seed=0)
    # exact map is z - 1.5: the fitted offset is within ~0.5 of it on a 40-image sample
    assert np.allclose(rec.scale_, 1.0) and np.all(np.abs(rec.bias_ + 1.5) < 0.5)
    for i, b, a in zip(res.internal, res.before, res.after):
        assert b["specificity"] < i["specificity"] - 0.3
        assert abs(a["specificity"] - i["specificity"]) < 0.15
    assert rec.reference_["n"] == 3000 and rec.prevalence == pytest.approx(
        internal.targets().mean(0).tolist())
    assert any("internal score scale" in n for n in res.notes)
    # a large sample recovers the planted map with platt too (slope ~1, offset ~-1.5)
    big, rec_big = recalibrate_site(None, internal, external, k=300, method="platt",
                                    thresholds=thr, n_boot=0)
    assert np.all(np.abs(rec_big.scale_ - 1) < 0.2) and np.all(np.abs(rec_big.bias_ + 1.5) < 0.4)
    w = SiteRecalibrator.from_dict(rec.to_dict())
    assert np.array_equal(w.decide(external), rec.decide(external))


def test_recalibrator_checks():
    p = planted(100, seed=5)
    with pytest.raises(ConfigError, match="'method' parameter of SiteRecalibrator"):
        SiteRecalibrator("magic").fit(p, [0.5, 0.5])
    with pytest.raises(ConfigError, match="needs target="):
        SiteRecalibrator("threshold").fit(p, [0.5, 0.5])
    with pytest.raises(DataError, match="at least 50 of each"):
        SiteRecalibrator("youden", min_per_class=50).fit(p, [0.5, 0.5])
    with pytest.raises(ConfigError, match="not fitted"):
        SiteRecalibrator().transform(p)
    # calibrated logit of x ~ N(+-1.25, 1) is 2.5 x + log(prev / (1 - prev)); planted(scale=3)
    # is 3 / 2.5 = 1.2 times too confident -> T ~ 1.2
    t = SiteRecalibrator("temperature").fit(planted(4000, scale=3.0, seed=6), [0.5, 0.5])
    assert 1.1 < t.temperature_ < 1.35
    with pytest.raises(DataError, match="internal classes"):
        recalibrate_site(None, p, planted(100, k=3), k=5)


def feats(x, ids):
    return Features(features=x.astype(np.float32), weight=np.zeros((1, x.shape[1]), np.float32),
                    bias=np.zeros(1, np.float32), labels=np.zeros((len(x), 1), np.float32),
                    ids=tuple(ids), class_names=("c",), task="multilabel")


def test_ood_score_flags_planted_outliers_only():
    rng = np.random.default_rng(7)
    cov = np.diag(np.linspace(0.5, 2.0, 8))
    train = rng.multivariate_normal(np.zeros(8), cov, 2000)
    calib = rng.multivariate_normal(np.zeros(8), cov, 1000)
    scorer = OODScorer().fit(feats(train, [f"t{i}" for i in range(2000)]),
                             calibration=calib)
    inliers = rng.multivariate_normal(np.zeros(8), cov, 500)
    outliers = rng.multivariate_normal(np.zeros(8), cov, 20) + 6.0
    assert scorer.flags(outliers).all()
    assert scorer.flags(inliers).mean() < 0.03  # ~1% by construction
    assert 0.02 < scorer.flags(inliers, 95).mean() < 0.09
    # exact Mahalanobis against the fitted precision
    d = inliers[0] - scorer.mean_
    assert scorer.score(inliers[:1])[0] == pytest.approx(np.sqrt(d @ scorer.precision_ @ d))
    rep = scorer.image_report(feats(outliers[:2], ["o1", "o2"]))
    assert rep[0]["id"] == "o1" and rep[0]["ood_99"] and rep[0]["ood_score"] > scorer.threshold_99_
    with pytest.raises(ConfigError, match="'level' parameter"):
        scorer.flags(inliers, 90)


def test_shift_check_label_free():
    a, b = planted(500, seed=8), planted(500, seed=9)
    assert not shift_check(a, b).shifted
    c = planted(500, shift=1.0, seed=10)
    s = shift_check(a, c)
    assert s.shifted and s.classes[0]["delta_mean_prob"] > 0.1 and "c0" in s.reasons[0]
    rng = np.random.default_rng(0)
    fi = feats(rng.normal(0, 1, (400, 6)), [f"i{i}" for i in range(400)])
    fe = feats(rng.normal(0, 1, (400, 6)) + 2.0, [f"e{i}" for i in range(400)])
    s2 = shift_check(a.select(range(400)), b.select(range(400)), fi, fe)
    assert s2.feature["share_external_above_p95"] > 0.5 and s2.shifted
    assert s2.feature["distance_ratio"] > 1.5


def test_phantom_site_b_is_planted_and_deterministic():
    spec = "phantom?n=60&size=32&seed=0"
    a = open_dataset(spec, "test", Preprocess(size=32))
    b = open_dataset(spec + "&site=B", "test", Preprocess(size=32))
    b2 = open_dataset(spec + "&site=B", "all", Preprocess(size=32))
    assert b.spec.endswith("site=B") and a.ids == b.ids
    assert np.array_equal(a.labels, b.labels, equal_nan=True) and a.patient_ids == b.patient_ids
    xa = np.stack([a.load_raw(i) for i in range(len(a))])
    xb = np.stack([b.load_raw(i) for i in range(len(b))])
    pos = {i: k for k, i in enumerate(b2.ids)}
    xb_all = np.stack([b2.load_raw(pos[i]) for i in b.ids])
    assert np.array_equal(xb, xb_all)  # same pixels whichever split opened it
    assert np.array_equal(xb, apply_site(xa, "B", b.rows))
    prof = SITES["B"]
    m = max(2, round(32 * prof.marker))
    assert (xb[:, 1:1 + m, 31 - m:31] == 255).all()  # the burned-in marker
    assert not (xa[:, 1:1 + m, 31 - m:31] == 255).all()
    no_noise = apply_site(xa, type(prof)("x", fov=prof.fov, gamma=prof.gamma,
                                         contrast=prof.contrast, brightness=prof.brightness))
    resid = xb.astype(float) - no_noise
    resid[:, 1:1 + m, 31 - m:31] = np.nan
    sd = np.nanstd(resid[np.abs(no_noise.astype(float) - 128) < 90]) / 255
    assert 0.025 < sd < 0.05  # the planted detector noise (0.04, minus rounding/clipping)
    assert np.array_equal(apply_site(xa, "A"), xa)
    with pytest.raises(ConfigError, match="'site' parameter of the 'phantom' adapter"):
        open_dataset(spec + "&site=D", "test")


def test_phantom_site_c_changes_intensities_not_geometry():
    spec = "phantom?n=60&size=32&seed=0"
    a = open_dataset(spec, "test", Preprocess(size=32))
    c = open_dataset(spec + "&site=C", "test", Preprocess(size=32))
    xa = np.stack([a.load_raw(i) for i in range(len(a))]).astype(float)
    xc = np.stack([c.load_raw(i) for i in range(len(c))]).astype(float)
    prof = SITES["C"]
    assert prof.fov == 1.0 and prof.marker == 0.0 and not prof.identity
    # same geometry: the pixels stay strongly correlated image by image; brighter mid-tones
    r = [np.corrcoef(xa[i].ravel(), xc[i].ravel())[0, 1] for i in range(len(xa))]
    assert min(r) > 0.9 and xc.mean() > xa.mean()
    assert np.array_equal(xc, apply_site(xa.astype(np.uint8), "C", c.rows))


def test_site_shift_flow_and_cli(tmp_path):
    import torch
    from typer.testing import CliRunner

    from medscalpel.cli.main import app
    from medscalpel.models.checkpoint import make_card, save_model
    from medscalpel.models.zoo import create_model
    from medscalpel.repair.shift_flow import SiteShiftReport, run_site_shift

    torch.manual_seed(0)
    spec = "phantom?n=400&size=32&seed=0"
    names = open_dataset(spec, "all", Preprocess(size=32)).class_names
    m = create_model("resnet_tiny", num_classes=len(names), in_chans=1, img_size=32)
    m.card = make_card(m, names, "multilabel", Preprocess(size=32), training={"data": spec})
    with pytest.raises(DataError, match="No class of"):
        run_site_shift(m, spec, spec + "&site=B", k=20, n_boot=0)
    rep = run_site_shift(m, spec, spec + "&site=B", k=3, n_boot=20, out_dir=tmp_path / "ss",
                         train_split="val")
    assert rep.classes and rep.recalibration.k == 3 and rep.validation.external["n"] == \
        rep.validation.internal["n"]
    assert (tmp_path / "ss" / "reliability.png").is_file()
    assert SiteShiftReport.from_dict(rep.to_dict()).to_dict() == rep.to_dict()
    # the router ran on the site: one row per class (at least), saved beside the report
    assert rep.router and {r["class"] for r in rep.router} == set(names)
    assert (tmp_path / "ss" / "router").is_dir()
    assert any("treatment router on the new site" in n for n in rep.notes)
    model_dir = save_model(m, tmp_path / "model")
    runner = CliRunner()
    r = runner.invoke(app, ["predict", "--model", str(model_dir), "--data", spec,
                            "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["repair", "recalibrate-site", "--model", str(model_dir),
                            "--internal", str(tmp_path / "p"), "--external", spec + "&site=B",
                            "--external-split", "test", "--k", "3", "--classes",
                            ",".join(rep.classes), "--n-boot", "20", "--out", str(tmp_path / "rc")])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "fitted on" in out and ("restored" in out)
    res = SiteRecalibration.load(tmp_path / "rc" / "recalibration.json")
    assert res.k == 3 and set(res.restored) == set(rep.classes)
    r = runner.invoke(app, ["repair", "recalibrate-site", "--model", str(model_dir),
                            "--internal", str(tmp_path / "p"), "--external", spec + "&site=B",
                            "--external-split", "test", "--k", "50"])
    assert r.exit_code != 0 and "Too few labelled images" in str(r.exception)


def test_quantile_is_label_free_and_restores_a_monotone_shift():
    """A monotone score shift at the same prevalence: the label-free quantile cut restores the
    internal operating point without the k-shot noise, and the labels of the site are not read."""
    internal = planted(3000, seed=21)
    external = planted(6000, shift=1.5, scale=0.7, seed=22)  # squeezed and shifted scores
    res, rec = recalibrate_site(None, internal, external, k=20, method="quantile",
                                thresholds=[0.5, 0.5], n_boot=0, seed=0)
    for i, b, a in zip(res.internal, res.before, res.after):
        assert b["specificity"] < i["specificity"] - 0.2
        assert abs(a["sensitivity"] - i["sensitivity"]) < 0.04
        assert abs(a["specificity"] - i["specificity"]) < 0.04
    assert all(res.restored.values()) and any("LABEL-FREE" in n for n in res.notes)
    # the same cut whatever the site's labels say (they are never read)
    shuffled = Predictions(external.logits, external.labels[::-1].copy(), external.ids,
                           external.class_names, task="multilabel")
    rec2 = SiteRecalibrator("quantile").fit(external.select(range(100)), [0.5, 0.5],
                                            reference=internal, unlabeled=shuffled)
    assert np.allclose(rec2.thresholds_, rec.thresholds_)
    # best possible gap: a planted monotone shift keeps the ranking, so some cut restores it
    assert all(g < 0.03 for g in res.best_possible_gap.values())
    with pytest.raises(ConfigError, match="needs reference= .* and unlabeled="):
        SiteRecalibrator("quantile").fit(external.select(range(100)), [0.5, 0.5])
    mc = Predictions(np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32),
                     np.repeat([0, 1, 2], 20), ids=tuple(f"m{i}" for i in range(60)),
                     class_names=("x", "y", "z"), task="multiclass")
    with pytest.raises(ConfigError, match="decides by argmax"):
        SiteRecalibrator("quantile").fit(mc, [0.5] * 3, reference=mc, unlabeled=mc)


def test_verdict_separates_lost_ranking_from_k_shot_noise():
    """A site where class c0's scores carry no information: no threshold restores it, and the
    verdict says to retrain rather than to label more images."""
    internal = planted(3000, seed=31)
    external = planted(3000, seed=32)
    rng = np.random.default_rng(0)
    z = external.logits.copy()
    z[:, 0] = rng.normal(0, 1, len(z))  # ranking of c0 destroyed
    broken = Predictions(z, external.labels, external.ids, external.class_names,
                         task="multilabel")
    res, _ = recalibrate_site(None, internal, broken, k=20, method="threshold",
                              thresholds=[0.5, 0.5], n_boot=0, seed=0)
    assert res.best_possible_gap["c0"] > 0.2 and res.best_possible_gap["c1"] < 0.05
    assert not res.restored["c0"] and "for ['c0'] NO threshold on this site would" in res.verdict
    back = SiteRecalibration.from_dict(res.to_dict())
    assert back.best_possible_gap == res.best_possible_gap
    assert res.table()[0]["best possible gap"] == f"{res.best_possible_gap['c0']:.3f}"


def test_macro_gap_is_reported_next_to_the_per_class_verdict():
    internal = planted(3000, seed=41)
    external = planted(3000, shift=1.0, seed=42)
    res, _ = recalibrate_site(None, internal, external, k=20, method="threshold",
                              thresholds=[0.5, 0.5], n_boot=0, seed=0)
    want_se = np.mean([a["sensitivity"] - i["sensitivity"]
                       for i, a in zip(res.internal, res.after)])
    assert res.macro["sensitivity_gap"] == pytest.approx(want_se)
    assert res.macro["n_classes"] == 2
    assert res.macro["restored"] == (abs(res.macro["sensitivity_gap"]) <= 0.05 and
                                     abs(res.macro["specificity_gap"]) <= 0.05)
    if not all(res.restored.values()):
        assert "macro over these classes" in res.verdict
    assert SiteRecalibration.from_dict(res.to_dict()).macro == res.macro
