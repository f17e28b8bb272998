"""Carrying a conformal guarantee to a new site without labels, under pure label shift.

Planted sites with a KNOWN prevalence change (scores ``mu * y + N(0, 1)``: the population
recall and precision at any threshold are known in closed form): recall certificates carry
over unchanged, precision is re-certified at the new prevalence and holds there (the old
threshold does not), a covariate shift is caught and sends the user to ``k`` labelled images.
The estimators are checked against brute force (likelihood maximum, the BBSE formula, the
mixture distance on a dense grid).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.stats import norm

from medscalpel.engine.predictions import Predictions
from medscalpel.repair.conformal import DEFAULT_GRID, calibrate_guarantee
from medscalpel.repair.label_shift import (LabelShiftTransfer, _mixture_distance,
                                           _precision_at_prior, bbse_prior, estimate_prior_em,
                                           label_shift_check, transfer_guarantee)
from medscalpel.repair.shift import ShiftCheck

MU = 2.5


def _site(rng, n, prev, split, k=1, pos_shift=0.0):
    y = (rng.random((n, k)) < prev).astype(np.float32)
    z = (MU + pos_shift) * y + rng.normal(size=(n, k))
    return Predictions(z.astype(np.float32), y, ids=tuple(f"{split}{i}" for i in range(n)),
                       class_names=tuple(f"c{j}" for j in range(k)), task="multilabel",
                       split=split)


def _precision(t, prev):
    tp, fp = prev * norm.sf(t - MU), (1 - prev) * norm.sf(t)
    return tp / (tp + fp)


# ----------------------------------------------------------------------------- estimators
def test_em_prior_is_the_likelihood_maximum():
    rng = np.random.default_rng(0)
    p = rng.beta(0.6, 0.9, 500)
    prior = 0.4
    got = estimate_prior_em(p, prior)
    grid = np.linspace(1e-4, 1 - 1e-4, 20001)
    ll = np.log(np.outer(grid / prior, p) + np.outer((1 - grid) / (1 - prior), 1 - p)).sum(1)
    assert got == pytest.approx(grid[np.argmax(ll)], abs=1e-4)
    assert estimate_prior_em(np.full(10, 0.5), 0.5) == pytest.approx(0.5)


def test_bbse_bounds_match_the_formula_and_cover_the_true_prior():
    rng = np.random.default_rng(1)
    cal, new = _site(rng, 800, 0.3, "cal"), _site(rng, 1500, 0.7, "new")
    y, z, zn = cal.labels[:, 0] > 0.5, cal.logits[:, 0], new.logits[:, 0]
    b = bbse_prior(z, y, zn, 0.1)
    for c in b["cuts"]:
        r, f, q = ((v >= c["cut_logit"]).mean() for v in (z[y], z[~y], zn))
        if r <= f:  # the rule does not separate the classes here: no estimate
            assert c["point"] is None and c["lower"] == 0.0
            continue
        assert c["point"] == pytest.approx(min(max((q - f) / (r - f), 0), 1))
        assert c["lower"] <= c["point"] <= c["upper"]
    assert b["lower"] == max(c["lower"] for c in b["cuts"]) <= b["point"]
    assert b["upper"] == min(c["upper"] for c in b["cuts"])
    covered = 0
    for s in range(200):
        rs = np.random.default_rng(100 + s)
        c, n = _site(rs, 300, 0.3, "c"), _site(rs, 600, 0.7, "n")
        bb = bbse_prior(c.logits[:, 0], c.labels[:, 0] > 0.5, n.logits[:, 0], 0.1)
        covered += bb["lower"] <= 0.7 <= bb["upper"]
    assert covered / 200 >= 0.9


def test_mixture_distance_is_the_dense_grid_minimum():
    rng = np.random.default_rng(2)
    s1, s0 = rng.normal(MU, 1, 300), rng.normal(0, 1, 500)
    u = np.r_[rng.normal(MU, 1, 420), rng.normal(0, 1, 180)]
    d, pi = _mixture_distance(s1, s0, u)
    pts = np.sort(np.r_[s1, s0, u])
    ecdf = [np.mean(v[:, None] <= pts[None, :], axis=0) for v in (s1, s0, u)]
    grid = np.linspace(0, 1, 10001)
    dist = np.abs(ecdf[2][None] - grid[:, None] * ecdf[0][None]
                  - (1 - grid[:, None]) * ecdf[1][None]).max(1)
    assert d == pytest.approx(dist.min(), abs=1e-4)
    assert abs(pi - 0.7) < 0.08


def test_check_keeps_its_level_under_pure_label_shift_and_rejects_a_covariate_shift():
    rejected = 0
    for s in range(30):
        rng = np.random.default_rng(200 + s)
        s1, s0 = rng.normal(MU, 1, 200), rng.normal(0, 1, 300)
        u = np.where(rng.random(600) < 0.65, rng.normal(MU, 1, 600), rng.normal(0, 1, 600))
        rejected += label_shift_check(s1, s0, u, n_boot=39, seed=s)["p_value"] <= 0.1
    assert rejected / 30 <= 0.25  # nominal 0.1; 30 draws
    rng = np.random.default_rng(9)
    s1, s0 = rng.normal(MU, 1, 200), rng.normal(0, 1, 300)
    # positives now score in a narrow band between the classes: no mixture of the two
    u = np.where(rng.random(600) < 0.5, rng.normal(MU / 2, 0.5, 600), rng.normal(0, 1, 600))
    assert label_shift_check(s1, s0, u, n_boot=99)["p_value"] <= 0.01


# ----------------------------------------------------------------------------- transfer
def test_recall_carries_over_unchanged_under_a_known_prior_change(tmp_path):
    rng = np.random.default_rng(3)
    cal, new = _site(rng, 1500, 0.3, "cal"), _site(rng, 3000, 0.75, "siteB")
    g = calibrate_guarantee(cal, "recall>=0.9", 0.1)
    t = transfer_guarantee(g, cal, new, n_boot=99)
    row = t.rows[0]
    assert t.transferable and t.outcome == "transferred" and not t.covariate_shift
    assert row["status"] == "carried over unchanged" and not row["check_rejected"]
    assert abs(row["prior_em"] - 0.75) < 0.03 and row["prior_calibration"] < 0.35
    lo, hi = row["prior_bbse_interval"]
    assert lo <= 0.75 <= hi
    assert t.guarantee.classes[0].threshold_logit == g.classes[0].threshold_logit
    # the population recall at the transferred threshold is the calibration one: unchanged
    thr = t.guarantee.classes[0].threshold_logit
    assert norm.sf(thr - MU) >= 0.9
    back = LabelShiftTransfer.from_dict(t.to_dict())
    assert back.to_dict() == t.to_dict() and "without labels" in back.summary()


def test_precision_is_reweighted_and_holds_at_the_new_prevalence():
    """Prevalence 0.5 -> 0.2: precision falls at a fixed threshold. Over many calibration /
    new-site draws the re-certified threshold keeps precision >= 0.7 at the NEW prevalence in
    >= 1 - alpha of the draws; the calibration-site threshold mostly does not."""
    target, alpha, new_prev = 0.7, 0.1, 0.2
    held = old_held = certified = 0
    draws = 60
    for s in range(draws):
        rng = np.random.default_rng(1000 + s)
        cal, new = _site(rng, 1500, 0.5, "cal"), _site(rng, 2000, new_prev, "new")
        y, z = cal.labels[:, 0] > 0.5, cal.logits[:, 0].astype(float)
        pi_lo = bbse_prior(z, y, new.logits[:, 0], alpha)["lower"]
        thr, _ = _precision_at_prior(y, z, target, alpha, pi_lo, DEFAULT_GRID)
        old = calibrate_guarantee(cal, f"precision>={target}", alpha).classes[0]
        old_held += old.certified and _precision(old.threshold_logit, new_prev) >= target
        if thr is None:
            continue
        certified += 1
        held += _precision(thr, new_prev) >= target
    assert certified >= 0.8 * draws
    # the guarantee: P(certified and precision < target) <= alpha
    assert (certified - held) / draws <= alpha
    assert old_held / draws < 0.5  # without re-weighting the old threshold fails here


def test_precision_row_of_a_transfer_states_the_new_threshold():
    rng = np.random.default_rng(4)
    cal, new = _site(rng, 1200, 0.5, "cal"), _site(rng, 2500, 0.2, "new")
    g = calibrate_guarantee(cal, "precision>=0.7", 0.1)
    t = transfer_guarantee(g, cal, new, n_boot=59)
    row = t.rows[0]
    assert t.transferable and row["status"] == "re-certified at the new prevalence"
    assert row["new_threshold_logit"] > g.classes[0].threshold_logit  # rarer: stricter
    c = t.guarantee.classes[0]
    assert c.certified and "new site's prevalence" in c.guarantee
    assert _precision(c.threshold_logit, 0.2) >= 0.7


def test_precision_is_recertified_over_the_certification_grid():
    """A precision guarantee certified over a custom grid (points off the default's 0.05
    lattice) is re-certified over THAT grid, also after a JSON round trip (a model card); a
    result without a recorded grid falls back to the default with a note."""
    rng = np.random.default_rng(4)
    cal, new = _site(rng, 1500, 0.5, "cal"), _site(rng, 2500, 0.2, "new")
    grid = np.round(np.arange(4.013, -4.0, -0.25), 3)
    g = calibrate_guarantee(cal, "precision>=0.7", 0.1, grid=grid)
    assert g.grid == tuple(grid) and g.classes[0].threshold_logit in grid
    back = type(g).from_dict(g.to_dict())
    assert back.grid == g.grid
    t = transfer_guarantee(back, cal, new, n_boot=39)
    thr = t.rows[0]["new_threshold_logit"]
    assert t.transferable and thr is not None and thr > g.classes[0].threshold_logit
    assert np.any(np.isclose(grid, thr, rtol=0, atol=1e-12))  # a point of the original grid
    assert not np.any(np.isclose(DEFAULT_GRID, thr, rtol=0, atol=1e-9))
    assert t.guarantee.grid == g.grid
    assert any("the certification's grid: 33 logit thresholds" in n for n in t.notes)
    # the same search as re-certifying by hand over the original grid
    y, z = cal.labels[:, 0] > 0.5, cal.logits[:, 0].astype(float)
    lo = bbse_prior(z, y, new.logits[:, 0], 0.1)["lower"]
    assert thr == _precision_at_prior(y, z, 0.7, 0.1, lo, grid)[0]
    old = dataclasses.replace(back, grid=())  # stored before the grid was recorded
    t_old = transfer_guarantee(old, cal, new, n_boot=39)
    assert any("the default grid" in n for n in t_old.notes)
    assert np.any(np.isclose(DEFAULT_GRID, t_old.rows[0]["new_threshold_logit"], atol=1e-9))
    assert calibrate_guarantee(cal, "recall>=0.9", 0.1).grid == ()
    with pytest.raises(Exception, match="DECREASING"):
        transfer_guarantee(g, cal, new, n_boot=39, grid=grid[::-1])


def test_covariate_shift_is_not_transferable_and_states_k():
    rng = np.random.default_rng(5)
    cal = _site(rng, 1500, 0.3, "cal")
    new = _site(rng, 3000, 0.3, "siteC", pos_shift=-1.5)  # positives score lower: recall drops
    g = calibrate_guarantee(cal, "recall>=0.9", 0.1)
    t = transfer_guarantee(g, cal, new, n_boot=99)
    assert not t.transferable and t.guarantee is None and t.outcome == "not transferable"
    assert t.rows[0]["check_rejected"] and t.rows[0]["status"] == "not transferable"
    assert "c0" in t.covariate_shift[0]
    assert t.min_k["rows"]["c0"]["k_pass"] == 29 and t.min_k["k_images"]
    assert "NOT transferable" in t.summary() and "positives per row" in t.summary()


def test_feature_shift_from_shift_check_blocks_the_transfer():
    rng = np.random.default_rng(6)
    cal, new = _site(rng, 1000, 0.3, "cal"), _site(rng, 2000, 0.5, "new")
    g = calibrate_guarantee(cal, "recall>=0.9", 0.1)
    sc = ShiftCheck(classes=(), feature={"share_external_above_p95": 0.4}, shifted=True,
                    reasons=("feature",), alpha=0.01)
    t = transfer_guarantee(g, cal, new, n_boot=39, shift=sc)
    assert not t.transferable and "feature space" in t.covariate_shift[-1]


def test_set_fnr_is_not_transferred_and_inputs_are_checked():
    rng = np.random.default_rng(7)
    cal, new = _site(rng, 800, 0.4, "cal", k=3), _site(rng, 800, 0.6, "new", k=3)
    g = calibrate_guarantee(cal, "fnr<=0.1")
    t = transfer_guarantee(g, cal, new, n_boot=39)
    assert not t.transferable and t.rows[0]["status"] == "not transferable"
    assert "label combinations" in t.rows[0]["reason"]
    with pytest.raises(Exception, match="n_boot"):
        transfer_guarantee(g, cal, new, n_boot=5)
    two = _site(rng, 50, 0.5, "x", k=2)
    with pytest.raises(Exception, match="not the certified ones"):
        transfer_guarantee(g, cal, two)
    assert math.isfinite(t.rows[0]["threshold_logit"])


# ----------------------------------------------------------------------------- CLI
def _ds(split, n, seed, every):
    from medscalpel.data import ArrayDataset, Preprocess

    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % every == 0).astype(np.float32)[:, None]
    x = rng.random((n, 16, 16)).astype(np.float32) * 0.3
    x[labels[:, 0] == 1, 4:12, 4:12] += 0.7
    return ArrayDataset(x, labels, ["x"], "multilabel", preprocess=Preprocess(size=16),
                        split=split)


def test_cli_transfer_writes_the_transfer(tmp_path, capsys):
    import torch

    from medscalpel.cli.main import run
    from medscalpel.data import Preprocess
    from medscalpel.engine.predict import predict
    from medscalpel.layout import read_artifact
    from medscalpel.models.checkpoint import make_card, save_model
    from medscalpel.models.zoo import create_model
    from medscalpel.repair.calibrate import guarantee_operating_point

    torch.manual_seed(0)
    m = create_model("vgg_tiny", num_classes=1, img_size=16)
    m.card = make_card(m, ["x"], "multilabel", Preprocess(size=16))
    cal = predict(m.eval(), _ds("val", 160, 5, 2), device="cpu", progress=False)
    g = calibrate_guarantee(cal, "recall>=0.9", 0.1)
    assert g.classes[0].certified
    m.card = m.card.with_operating_point(guarantee_operating_point(g, ["x"], "multilabel"))
    save_model(m, tmp_path / "model")
    cal.save(tmp_path / "cal.npz")
    new = predict(m, _ds("site2", 200, 7, 4), device="cpu", progress=False)  # 50% -> 25%
    new.save(tmp_path / "site2.npz")
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", str(tmp_path / "cal.npz"), "--recertify",
             str(tmp_path / "model"), "--transfer-to", str(tmp_path / "site2.npz"), "--out",
             str(tmp_path / "tr")])
    out = capsys.readouterr()
    assert ex.value.code == 0, out.err
    t = read_artifact(tmp_path / "tr", "label_shift_transfer")
    assert isinstance(t, LabelShiftTransfer) and t.spec == g.spec and t.n_new_images == 200
    assert t.outcome.upper() in out.out and "assumption: pure label shift" in out.out
    assert t.rows[0]["prior_calibration"] == pytest.approx(0.5)
    # the carried guarantee is the operating point of OUT/calibrate/model (and so of deploy's serve.json)
    assert t.transferable and "model deciding by it" in out.out
    from types import SimpleNamespace

    from medscalpel.deploy.serve import serve_metadata
    from medscalpel.models.checkpoint import load_model
    from medscalpel.repair.card_guarantee import guarantee_of_card

    moved = load_model(tmp_path / "tr" / "calibrate" / "model")
    op = moved.card.decision_point()
    assert op.guarantee == t.guarantee.to_dict() and op.guarantee["split"] == "site2"
    assert op.fitted_on["transfer"]["outcome"] == "transferred"
    assert op.fitted_on["transfer"]["rows"] == {"x": "carried over unchanged"}
    assert "labels not used" in op.fitted_on["source"]
    back, pos, _ = guarantee_of_card(moved.card)
    assert pos is None and back.to_dict() == t.guarantee.to_dict()
    assert moved.card.effective_thresholds()[0] == pytest.approx(g.classes[0].threshold_prob)
    # the same weights (model_id is not compared: save_model's hash covers the safetensors
    # header, whose metadata order is not fixed, so equal weights can hash differently)
    so, sm = load_model(tmp_path / "model").state_dict(), moved.state_dict()
    assert so.keys() == sm.keys() and all(torch.equal(so[k], sm[k]) for k in so)
    served = serve_metadata(moved, (1, 16, 16), SimpleNamespace(
        runtime="torch", precision="fp32", name="torch:fp32", info={}), ["model.pt"])
    assert served["operating_point"]["guarantee"]["split"] == "site2"
    # a guarantee that does not transfer (the set FNR) writes no model
    gf = calibrate_guarantee(cal, "fnr<=0.2")
    m.card = m.card.with_operating_point(guarantee_operating_point(gf, ["x"], "multilabel"))
    save_model(m, tmp_path / "model_fnr")
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", str(tmp_path / "cal.npz"), "--recertify",
             str(tmp_path / "model_fnr"), "--transfer-to", str(tmp_path / "site2.npz"),
             "--out", str(tmp_path / "tr_fnr")])
    out = capsys.readouterr()
    assert ex.value.code == 0, out.err
    assert "NOT TRANSFERABLE" in out.out and "no model written" in out.out
    assert not (tmp_path / "tr_fnr" / "calibrate" / "model").exists()
    for args, msg in (([], "needs FIT"),
                      ([str(tmp_path / "cal.npz"), "--eval", str(tmp_path / "cal.npz")],
                       "drop --eval")):
        with pytest.raises(SystemExit) as ex:
            run(["repair", "calibrate", "--recertify", str(tmp_path / "model"),
                 "--transfer-to", str(tmp_path / "site2.npz"), "--out", str(tmp_path / "e"),
                 *args])
        err = capsys.readouterr().err
        assert ex.value.code == 2 and "error:" in err and msg in err
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", str(tmp_path / "cal.npz"), "--transfer-to",
             str(tmp_path / "site2.npz"), "--out", str(tmp_path / "f")])
    assert ex.value.code == 2 and "needs --recertify" in capsys.readouterr().err
