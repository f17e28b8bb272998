"""Re-certifying a conformal guarantee after compression, deployment or at a new site.

The one-sample verdict (exact binomial tests, Holm) is checked against brute force; planted
guarantees that hold, that are broken (recall destroyed) and that cannot be decided (too few
positives: the minimum k is stated); ``compress deploy`` re-certifies the card's guarantee per
variant (internal and external); ``repair calibrate --recertify`` writes guarantee_check.json.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from medscalpel.deploy.flow import DeployResult, deploy
from medscalpel.data import ArrayDataset, Preprocess
from medscalpel.engine.decision import Verdict
from medscalpel.engine.predict import predict
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, VerificationError
from medscalpel.models.checkpoint import make_card, save_model
from medscalpel.models.zoo import create_model
from medscalpel.repair.calibrate import guarantee_operating_point
from medscalpel.repair.card_guarantee import guarantee_of_card
from medscalpel.repair.conformal import (Recertification, calibrate_guarantee,
                                         recertification_plan, recertify)
from medscalpel.repair.one_sample import (RateUnit, decide_one_sample, min_trials_to_pass,
                                          trials_for_power)

MU = 2.0


def _preds(z, y, names=("x",), split="new", model_id="m"):
    z = np.asarray(z, np.float32).reshape(len(z), -1)
    y = np.asarray(y, np.float32).reshape(z.shape)
    return Predictions(z, y, ids=tuple(f"{split}{i}" for i in range(len(z))),
                       class_names=tuple(names), task="multilabel", split=split,
                       model_id=model_id)


def _draw(rng, n_pos, n_neg):
    return (np.r_[rng.normal(MU, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)],
            np.r_[np.ones(n_pos), np.zeros(n_neg)])


@pytest.fixture(scope="module")
def certified():
    rng = np.random.default_rng(0)
    z, y = _draw(rng, 400, 400)
    return calibrate_guarantee(_preds(z, y, split="cal"), "recall>=0.9", 0.1)


# ----------------------------------------------------------------------------- primitive
def test_exact_one_sample_matches_brute_force_and_holm():
    units = [RateUnit("a", 0.9, 190, 200, n_images=400, n_pos=200, n_neg=200),
             RateUnit("b", 0.9, 150, 200, n_images=400, n_pos=200, n_neg=200),
             RateUnit("c", 0.9, 182, 200, n_images=400, n_pos=200, n_neg=200)]
    v = decide_one_sample(units, level=0.9)
    assert isinstance(v, Verdict) and v.correction == "holm" and v.n_tests == 3
    assert v.alpha == pytest.approx(0.05)
    # brute force: P(Binomial(200, 0.9) >= x) and <= x by summing the pmf
    pmf = binom.pmf(np.arange(201), 200, 0.9)
    for u, want in zip(units, ("pass", "fail", "undecided")):
        got = v.unit(u.name)
        assert got.outcome == want, got.reason
        assert got.p_pass == pytest.approx(pmf[u.successes:].sum(), rel=1e-9)
        assert got.p_fail == pytest.approx(pmf[:u.successes + 1].sum(), rel=1e-9)
        assert got.estimate == pytest.approx(u.successes / 200 - 0.9)
        assert got.ci_low <= got.estimate <= got.ci_high
    # the pass family: 'a' is the only rejection, at the first Holm step alpha / 3
    assert v.unit("a").level_adj == pytest.approx(0.05 / 3)
    assert v.unit("a").ci_low > 0 and v.unit("b").ci_high < 0
    assert v.outcome == "fail" and "b" in v.reason
    assert Verdict.from_dict(v.to_dict()).outcome == "fail"


def test_minimum_k_and_power_match_brute_force():
    # a pass with none missed needs 0.9**k < tail
    for tail in (0.05, 0.05 / 14, 0.01):
        k = min_trials_to_pass(0.9, tail)
        assert 0.9 ** k < tail <= 0.9 ** (k - 1)
    # power: the smallest n where the exact test at 0.05 passes with >= 80% chance at rate 0.97
    n = trials_for_power(0.9, 0.97, 0.05)

    def power(m):
        xs = np.arange(m + 1)
        crit = xs[binom.sf(xs - 1, m, 0.9) < 0.05].min()
        return binom.sf(crit - 1, m, 0.97)

    assert power(n) >= 0.8 and all(power(m) < 0.8 for m in range(max(n - 40, 1), n))
    assert trials_for_power(0.9, 0.85, 0.05) is not None  # a fail, decided with power
    assert trials_for_power(0.9, 0.9, 0.05) is None


# ----------------------------------------------------------------------------- recertify
def test_guarantee_that_holds_passes(certified):
    rng = np.random.default_rng(1)
    z, y = _draw(rng, 3000, 300)
    # a planted "compressed" model that scores positives a little higher: recall >= 0.9 holds
    rc = recertify(certified, _preds(z + 0.3 * y, y, model_id="int8"))
    assert rc.outcome == "pass" and rc.verdict.outcome == "pass"
    row = rc.rows[0]
    assert row["n"] == 3000 and row["ci"][0] > 0.9 and row["successes"] / 3000 == row["observed"]
    assert rc.model_id == "int8" and rc.certified_model_id == "m"
    back = Recertification.from_dict(rc.to_dict())
    assert back.to_dict() == rc.to_dict()


def test_destroyed_recall_fails_with_the_reason(certified):
    rng = np.random.default_rng(2)
    z, y = _draw(rng, 300, 300)
    rc = recertify(certified, _preds(z - 1.5 * y, y, model_id="pruned"))
    assert rc.outcome == "fail"
    u = rc.verdict.unit("x")
    assert u.outcome == "fail" and u.ci_high < 0 and "shown broken" in u.reason
    assert rc.rows[0]["observed"] < 0.7 and rc.rows[0]["ci"][1] < 0.9


def test_too_few_positives_is_undecided_and_states_minimum_k(certified):
    # 15 positives, every one caught: still cannot pass (0.9**15 > 0.05)
    z = np.r_[np.full(15, 50.0), np.zeros(60)]
    y = np.r_[np.ones(15), np.zeros(60)]
    rc = recertify(certified, _preds(z, y))
    assert rc.rows[0]["observed"] == 1.0 and rc.outcome == "undecided"
    k = min_trials_to_pass(0.9, 0.05)
    assert k == 29 and rc.rows[0]["k_pass"] == k
    assert f"a pass needs at least {k} positives" in rc.verdict.unit("x").reason
    plan = rc.min_k
    assert plan["rows"]["x"]["k_pass"] == k
    # images per class at the new data's prevalence 15/75: ceil(29 / 0.2)
    assert plan["rows"]["x"]["images_pass"] == math.ceil(k / 0.2) == plan["k_images"]
    assert f"at least {k} positives" in plan["statement"]
    # with 29 positives all caught the same check passes
    z29, y29 = np.r_[np.full(29, 50.0), np.zeros(60)], np.r_[np.ones(29), np.zeros(60)]
    assert recertify(certified, _preds(z29, y29)).outcome == "pass"


def test_plan_before_any_new_data(certified):
    rng = np.random.default_rng(3)
    z, y = _draw(rng, 400, 400)
    two = calibrate_guarantee(_preds(np.c_[z, z], np.c_[y, y], names=("a", "b"), split="cal"),
                              "recall>=0.9", 0.1)
    p1, p2 = recertification_plan(certified), recertification_plan(two)
    assert p1["rows"]["x"]["k_pass"] == 29
    assert p2["rows"]["a"]["k_pass"] == min_trials_to_pass(0.9, 0.05 / 2) == 36
    assert p1["rows"]["x"]["share"] == pytest.approx(0.5) and p1["k_images"] == 58
    likely = p1["rows"]["x"]["k_likely"]
    cal_recall = certified.classes[0].calibration["rate"]
    assert likely == trials_for_power(0.9, cal_recall, 0.05) and likely > 29


# ----------------------------------------------------------------------------- deploy
def _ds(split, n, seed, every=2):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % every == 0).astype(np.float32)[:, None]
    x = rng.random((n, 16, 16)).astype(np.float32) * 0.3
    x[labels[:, 0] == 1, 4:12, 4:12] += 0.7
    return ArrayDataset(x, labels, ["x"], "multilabel", preprocess=Preprocess(size=16),
                        split=split)


def _model_with_guarantee(shift: float):
    """A tiny model whose card carries recall >= 0.9 certified on its own logits of a
    calibration set with the positives' logits moved by ``shift`` (planted: -50 makes the
    certified threshold hold with room to spare, +50 makes it unreachable)."""
    torch.manual_seed(0)
    m = create_model("vgg_tiny", num_classes=1, img_size=16)
    m.card = make_card(m, ["x"], "multilabel", Preprocess(size=16))
    cal = predict(m.eval(), _ds("val", 120, 5), device="cpu", progress=False)
    z = cal.logits + shift * cal.labels
    g = calibrate_guarantee(_preds(z, cal.labels, split="val", model_id="vgg_tiny"),
                            "recall>=0.9", 0.1)
    op = guarantee_operating_point(g, ["x"], "multilabel")
    m.card = m.card.with_operating_point(op)
    return m, g


_FAST = dict(variants=["torch:fp32", "onnxruntime:fp32"], batches=(4,), rounds=1, repeats=1,
             warmup=0, n_boot=0, progress=False, explain=False, n_images=80)


def test_deploy_recertifies_every_variant(tmp_path):
    m, g = _model_with_guarantee(-50.0)
    assert guarantee_of_card(m.card)[0].classes[0].threshold_logit == \
        g.classes[0].threshold_logit
    r = deploy(m, _ds("test", 80, 6), tmp_path / "d", external_data=_ds("site2", 80, 7),
               **_FAST)
    back = DeployResult.load(tmp_path / "d")
    assert back.guarantee["status"] == "re-certified" and back.guarantee["spec"] == g.spec
    for v in back.variants:
        assert v.status == "go", v.reasons
        assert set(v.recertification) == {"internal", "external"}
        for where in ("internal", "external"):
            rc = Recertification.from_dict(v.recertification[where])
            assert rc.outcome == "pass" and rc.rows[0]["n"] == 40 and rc.model_id == v.name
    md = (tmp_path / "d" / "deploy.md").read_text()
    assert "**Guarantee:** recall>=0.9" in md and "onnxruntime:fp32 (external, 80 images): PASS" \
        in md
    assert r.recommended in ("torch:fp32", "onnxruntime:fp32")


def test_deploy_guarantee_that_fails_is_no_go(tmp_path):
    m, _ = _model_with_guarantee(50.0)
    with pytest.raises(VerificationError, match="guarantee FAILS for torch:fp32, "
                                                "onnxruntime:fp32"):
        deploy(m, _ds("test", 80, 6), tmp_path / "d", **_FAST)
    assert not (tmp_path / "d").exists()
    plain = create_model("vgg_tiny", num_classes=1, img_size=16)
    plain.card = make_card(plain, ["x"], "multilabel", Preprocess(size=16))
    with pytest.raises(ConfigError, match="carries no guarantee"):
        deploy(plain, _ds("test", 80, 6), tmp_path / "e", require_guarantee=True, **_FAST)


def test_deploy_undecided_guarantee_is_reported_and_blocks_only_when_required(tmp_path):
    m, _ = _model_with_guarantee(-50.0)
    few = _ds("test", 80, 6, every=4)  # 20 positives, all caught: a pass needs 29
    r = deploy(m, few, tmp_path / "d", accept_unscorable=True, **_FAST)
    for v in r.variants:
        rc = v.recertification["internal"]
        assert v.status == "go" and rc["outcome"] == "undecided"
        assert rc["rows"][0]["observed"] == 1.0 and rc["rows"][0]["k_pass"] == 29
    assert "(internal, 80 images): UNDECIDED" in (tmp_path / "d" / "deploy.md").read_text()
    with pytest.raises(VerificationError, match="could not be re-certified .undecided. for "
                                                "torch:fp32, onnxruntime:fp32"):
        deploy(m, few, tmp_path / "e", accept_unscorable=True, require_guarantee=True, **_FAST)


# ----------------------------------------------------------------------------- CLI
def test_cli_recertify_writes_guarantee_check(tmp_path, capsys):
    from medscalpel.cli.main import run
    from medscalpel.layout import read_artifact

    m, g = _model_with_guarantee(-50.0)
    save_model(m, tmp_path / "model")
    new = predict(m, _ds("site2", 80, 7), device="cpu", progress=False)
    new.save(tmp_path / "site2.npz")
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", "--recertify", str(tmp_path / "model"), "--eval",
             str(tmp_path / "site2.npz"), "--out", str(tmp_path / "chk")])
    out = capsys.readouterr()
    assert ex.value.code == 0, out.err
    assert "PASS" in out.out and "minimum k: re-certifying recall>=0.9" in out.out
    chk = read_artifact(tmp_path / "chk", "guarantee_check")
    assert isinstance(chk, Recertification) and chk.outcome == "pass"
    assert chk.rows[0]["n"] == 40 and chk.spec == g.spec
    # the broken guarantee: exit 0 (a verdict, not an error), outcome FAIL on file
    bad, _ = _model_with_guarantee(50.0)
    save_model(bad, tmp_path / "bad")
    with pytest.raises(SystemExit) as ex:
        run(["repair", "calibrate", "--recertify", str(tmp_path / "bad"), "--eval",
             str(tmp_path / "site2.npz"), "--out", str(tmp_path / "chk2")])
    assert ex.value.code == 0 and "FAIL" in capsys.readouterr().out
    assert read_artifact(tmp_path / "chk2", "guarantee_check").outcome == "fail"
    # user errors: one line, exit 2
    for args, msg in ((["--out", str(tmp_path / "x")], "needs --eval"),
                      ([str(tmp_path / "site2.npz"), "--eval", str(tmp_path / "site2.npz"),
                        "--out", str(tmp_path / "y")], "drop FIT")):
        with pytest.raises(SystemExit) as ex:
            run(["repair", "calibrate", "--recertify", str(tmp_path / "model"), *args])
        err = capsys.readouterr().err
        assert ex.value.code == 2 and "error:" in err and msg in err
