"""Clinical reports: evidence-based conflict flags (never hidden by default), the hide option,
operating points, resolution honesty, channel evidence, zone mapping, the decision-support
statement, escaping, batch output, CLI."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from medscalpel.data.cooccurrence import ExclusionRule, cooccurrence_evidence
from medscalpel.data.stats import label_statistics
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import ConfigError, DataError
from medscalpel.models.checkpoint import make_card
from medscalpel.models.zoo import create_model
from medscalpel.report.clinical import (COARSE, NOT_CALIBRATED, ClinicalReport, clinical_report,
                                        exclusion_plan, logit_margin, operating_points)
from medscalpel.report.html import DECISION_SUPPORT, escape

EVIL = "<script>alert(1)</script>"
NAMES = ["Effusion", EVIL, "Pneumothorax"]
THR = [0.6, 0.5, 0.5]


def planted_labels(n: int = 6000, seed: int = 0) -> np.ndarray:
    """Classes 0 and 1 (30% each) never together: expected 0.09 n co-occurrences, observed 0;
    class 2 (20%) independent of both."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    y = np.zeros((n, 3))
    y[:, 0] = u < 0.3
    y[:, 1] = (u >= 0.3) & (u < 0.6)
    y[:, 2] = rng.random(n) < 0.2
    return y


@pytest.fixture(scope="module")
def planted():
    return label_statistics(planted_labels(), NAMES, spec="synthetic", split="train")


@pytest.fixture(scope="module")
def independent():
    rng = np.random.default_rng(1)
    return label_statistics((rng.random((6000, 3)) < 0.3).astype(float), NAMES)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("densenet_tiny", num_classes=3, img_size=32)
    m.card = make_card(m, NAMES, "multilabel", Preprocess(size=32), thresholds=tuple(THR))
    with torch.no_grad():  # probabilities set by the bias: ~0.95, ~0.88, ~0.02
        m.classifier.weight.mul_(0.2)
        m.classifier.bias.copy_(torch.tensor([3.0, 2.0, -4.0]))
    m.eval()
    return m


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 32, 32, generator=g)


def _probs(model, x) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model(x)).double().numpy()


# ----------------------------------------------------------------------------- plan
def test_exclusion_plan_flags_both_and_hides_only_on_request(planted, independent):
    ev = planted.cooccurrence_evidence()
    pe = ev.pair(NAMES[0], NAMES[1])
    assert pe.exclusive and pe.observed == 0
    listed, hidden, flags = exclusion_plan([0, 1, 2], [1.0, 2.5, 0.3], ev, NAMES)
    assert listed == [1, 0, 2] and hidden == []
    assert [c.other for c in flags[0]] == [EVIL] and [c.other for c in flags[1]] == ["Effusion"]
    assert flags[2] == []
    c = flags[0][0]
    assert c.evidence["observed"] == 0 and c.evidence["expected"] == pytest.approx(pe.expected)
    assert c.evidence["lift_ci"][1] * pe.expected == pytest.approx(3.6889, abs=1e-3)
    assert "Both are reported" in c.message and f"n = {pe.n}" in c.message
    assert not c.hidden_other
    listed, hidden, flags = exclusion_plan([0, 1, 2], [1.0, 2.5, 0.3], ev, NAMES, mode="hide")
    assert listed == [1, 2] and [h["index"] for h in hidden] == [0]
    assert hidden[0]["excluded_by"] == 1 and hidden[0]["evidence"]["observed"] == 0
    assert "hidden (hide option)" in hidden[0]["reason"]
    assert flags[1][0].hidden_other and "was hidden (hide option)" in flags[1][0].message
    # independent labels: no conflict at all; no evidence: nothing either
    iev = independent.cooccurrence_evidence()
    assert exclusion_plan([0, 1], [1.0, 2.0], iev, NAMES, "hide")[:2] == ([1, 0], [])
    assert exclusion_plan([0, 1], [1.0, 2.0], None, NAMES, "hide")[:2] == ([1, 0], [])
    with pytest.raises(ConfigError, match="'conflicts' parameter of exclusion_plan"):
        exclusion_plan([0], [1.0], ev, NAMES, mode="drop")
    with pytest.raises(DataError, match="distinct"):
        exclusion_plan([0, 0], [1.0, 2.0], ev, NAMES)


# ----------------------------------------------------------------------------- reports
def _above(model, x):
    p = _probs(model, x)
    return [[k for k in range(3) if p[i, k] >= THR[k]] for i in range(len(x))]


def test_default_flags_every_finding_above_threshold(model, images, planted, tmp_path):
    before = copy.deepcopy(model.state_dict())
    reps = clinical_report(model, images, tmp_path, label_stats=planted,
                           image_ids=["p1", 'a&"<>b'], progress=False)
    above = _above(model, images)
    for i, r in enumerate(reps):
        assert above[i] == [0, 1]  # constructed: classes 0 and 1 above, class 2 below
        assert sorted(f.class_index for f in r.findings) == above[i]  # nothing missing
        assert r.excluded == []
        assert all(f.flagged for f in r.findings)
        f0 = next(f for f in r.findings if f.class_index == 0)
        assert f0.conflicts[0].other == EVIL and f0.conflicts[0].evidence["n"] == 6000
        st = {p["class"]: p["status"] for p in r.probabilities}
        assert st == {"Effusion": "reported, flagged", EVIL: "reported, flagged",
                      "Pneumothorax": "below threshold"}
        ms = [f.margin for f in r.findings]
        assert ms == sorted(ms, reverse=True)  # strongest first
        d = json.loads((tmp_path / r.json_path).read_text())
        assert d["disclaimer"] == DECISION_SUPPORT
        assert d["exclusion"]["mode"] == "flag" and d["exclusion"]["n_exclusive_pairs"] == 1
        assert {f["class"] for f in d["findings"]} == {"Effusion", EVIL}
        assert all(f["flagged"] and f["conflicts"][0]["evidence"]["lift"] == 0.0
                   for f in d["findings"])
        html = (tmp_path / r.html_path).read_text()
        assert str(escape(DECISION_SUPPORT)) in html
        assert 'data-table="conflicts"' in html and 'id="hide-notice"' not in html
        assert "data:image/png;base64," in html  # the overlay is embedded
        assert EVIL not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<script" not in html.lower()
        findings_table = html.split('data-table="findings"')[1].split("</table>")[0]
        assert "Effusion" in findings_table and "&lt;script&gt;" in findings_table
    assert reps[1].html_path == "a_b.html"
    idx = (tmp_path / "index.html").read_text()
    assert 'href="p1.html"' in idx and 'href="a_b.html"' in idx and "[conflict:" in idx
    assert 'a&"<>b' not in idx and ("a&amp;&#34;&lt;&gt;b" in idx or "a&amp;&quot;&lt;&gt;b" in idx)
    # JSON round trip
    back = ClinicalReport.from_dict(reps[0].to_dict())
    assert back.to_dict() == reps[0].to_dict()
    # the caller's model is unchanged
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_hide_option_marks_what_it_hid(model, images, planted, tmp_path):
    reps = clinical_report(model, images, tmp_path, label_stats=planted, conflicts="hide",
                           progress=False)
    p = _probs(model, images)
    for i, r in enumerate(reps):
        margins = [logit_margin(math.log(p[i, k] / (1 - p[i, k])), THR[k]) for k in (0, 1)]
        strong, weak = (0, 1) if margins[0] > margins[1] else (1, 0)
        assert [f.class_index for f in r.findings] == [strong]
        assert [e.class_index for e in r.excluded] == [weak]
        # every above-threshold finding is either listed or listed as hidden
        assert sorted([f.class_index for f in r.findings] + [e.class_index for e in r.excluded]) \
            == _above(model, images)[i]
        e = r.excluded[0]
        assert e.excluded_by == NAMES[strong] and e.evidence["observed"] == 0
        assert r.findings[0].conflicts[0].hidden_other
        d = json.loads((tmp_path / r.json_path).read_text())
        assert d["exclusion"]["mode"] == "hide" and d["excluded"][0]["hidden"] is True
        assert d["excluded"][0]["lift"] == 0.0
        html = (tmp_path / r.html_path).read_text()
        assert 'id="hide-notice"' in html and "Hidden findings (hide option)" in html
        assert html.index('id="hide-notice"') < html.index('id="findings"')
        assert {q["class"]: q["status"] for q in r.probabilities}[NAMES[weak]] == \
            "hidden (hide option)"
    assert 'id="hide-notice"' in (tmp_path / "index.html").read_text()


def test_too_few_images_warns_and_excludes_nothing(model, images):
    y = planted_labels(600)  # expected co-occurrences 54 but only 600 images
    stats = label_statistics(y, NAMES)
    r = clinical_report(model, images[:1], label_stats=stats, conflicts="hide",
                        progress=False)[0]
    assert len(r.findings) == 2 and r.excluded == []
    assert not any(f.flagged for f in r.findings)
    assert r.exclusion["enough_images"] is False
    assert any("only 600 images" in w and "nothing is excluded" in w for w in r.warnings)
    assert "only 600 images" in r.html()
    # a looser rule on the same statistics does exclude (the rule is what decides)
    r2 = clinical_report(model, images[:1], label_stats=stats, conflicts="hide",
                         exclusion_rule=ExclusionRule(min_images=500), progress=False)[0]
    assert len(r2.excluded) == 1


def test_no_stats_and_independent_labels(model, images, independent):
    r = clinical_report(model, images[:1], label_stats=independent, progress=False)[0]
    assert sorted(f.class_index for f in r.findings) == [0, 1] and r.excluded == []
    assert not any(f.flagged for f in r.findings)
    assert "mutual exclusivity not checked" not in " ".join(r.warnings)
    r0 = clinical_report(model, images[:1], label_stats=None, progress=False)[0]
    assert len(r0.findings) == 2 and "mutual exclusivity not checked" in " ".join(r0.warnings)
    assert r0.exclusion["checked"] is False


def test_label_stats_inputs_and_errors(model, planted, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    p = tmp_path / 'cxr&"<>.png'
    Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(p)
    # statistics in another class order (same label set), as a stats.json path
    order = [2, 1, 0]
    other = label_statistics(planted_labels()[:, order], [NAMES[i] for i in order])
    other.save(tmp_path / "stats.json")
    out = tmp_path / "out"
    r = clinical_report(model, [p], out, label_stats=tmp_path / "stats.json", progress=False)[0]
    assert r.image_id == 'cxr&"<>.png' and r.source == str(p)
    assert r.exclusion["n_exclusive_pairs"] == 1
    assert {f.name for f in r.findings if f.flagged} == {"Effusion", EVIL}
    assert (out / "cxr.html").is_file() and (out / "cxr.json").is_file()
    assert 'cxr&"<>.png' not in (out / "cxr.html").read_text()
    # a CooccurrenceEvidence (and its dict) works as well
    ev = cooccurrence_evidence(planted_labels(), NAMES)
    for given in (ev, ev.to_dict()):
        r = clinical_report(model, [p], label_stats=given, progress=False)[0]
        assert sum(f.flagged for f in r.findings) == 2
    # old stats (schema 1, no per-pair counts, nothing unknown) are still read
    old = planted.to_dict()
    for key in ("pair_known", "pos_known", "evidence"):
        old.pop(key)
    old["schema_version"] = 1
    r = clinical_report(model, [p], label_stats=old, progress=False)[0]
    assert sum(f.flagged for f in r.findings) == 2
    bad = label_statistics(planted_labels(), ["A", "B", "C"])
    with pytest.raises(DataError, match=r"another label set than the model's: missing "
                                        r"\['Effusion'"):
        clinical_report(model, [p], label_stats=bad, progress=False)
    more = label_statistics(np.zeros((5, 4)), NAMES + ["Hernia"])
    with pytest.raises(DataError, match=r"another label set.*extra \['Hernia'\]"):
        clinical_report(model, [p], label_stats=more, progress=False)
    with pytest.raises(DataError, match="Jaccard index only says that one finding is rare"):
        clinical_report(model, [p], label_stats=np.eye(3), progress=False)


def test_operating_points_and_notice(model, images, tmp_path):
    from medscalpel.engine.predictions import Predictions
    from medscalpel.repair.calibrate import calibrate_thresholds, calibrated_card

    # uncalibrated: the notice is at the TOP of the page, in the JSON and per class
    m0 = copy.deepcopy(model)
    m0.card = replace(model.card, thresholds=None)
    r = clinical_report(m0, images[:1], tmp_path / "u", progress=False)[0]
    assert r.operating["calibrated"] is False and r.operating["notice"] == NOT_CALIBRATED
    assert all(f.operating_point.origin == "default" for f in r.findings)
    assert all(f.threshold == 0.5 for f in r.findings)
    html = (tmp_path / "u" / r.html_path).read_text()
    assert html.index('id="operating-notice"') < html.index('id="disclaimer"') \
        < html.index('id="findings"')
    d = json.loads((tmp_path / "u" / r.json_path).read_text())
    assert d["operating"]["notice"] == NOT_CALIBRATED
    assert {p["threshold_origin"] for p in d["probabilities"]} == {"default"}
    # calibrated on 'val', evaluated on 'test': sensitivity/specificity from the evaluation
    rng = np.random.default_rng(0)
    y = (rng.random((300, 3)) < 0.3).astype(np.float32)
    logits = (y * 2 - 1) * 1.2 + rng.normal(size=y.shape)
    fit = Predictions(logits[:150], y[:150], ids=tuple(f"v{i}" for i in range(150)),
                      class_names=tuple(NAMES), task="multilabel", split="val")
    ev = Predictions(logits[150:], y[150:], ids=tuple(f"t{i}" for i in range(150)),
                     class_names=tuple(NAMES), task="multilabel", split="test")
    cal = calibrate_thresholds(fit, ev)
    m1 = copy.deepcopy(model)
    m1.card = calibrated_card(model.card, cal.calibrator, fit_split="val")
    r = clinical_report(m1, images[:1], calibration=cal.to_dict(), progress=False)[0]
    assert r.operating["calibrated"] is True and r.operating["notice"] is None
    probs = 1 / (1 + np.exp(-logits[150:].astype(np.float64)))
    for f in r.findings:
        op = f.operating_point
        k = f.class_index
        t = cal.thresholds[k]
        pos = y[150:, k] > 0.5
        dec = probs[:, k] >= t
        assert op.origin == "calibrated" and op.description == "calibrated on split 'val' (youden)"
        assert op.split == "test" and op.n_pos == int(pos.sum())
        assert op.sensitivity == pytest.approx((dec & pos).sum() / pos.sum())
        assert op.specificity == pytest.approx((~dec & ~pos).sum() / (~pos).sum())
    assert "on split" in r.html() and "(youden)" in r.html()
    # a calibration of other classes is refused; thresholds that do not match are not shown
    other = cal.to_dict()
    other["calibrator"] = dict(other["calibrator"], class_names=["A", "B", "C"])
    with pytest.raises(DataError, match="calibration is of other classes"):
        clinical_report(m1, images[:1], calibration=other, progress=False)
    # thresholds (0.6, 0.5, 0.5), no lineage: 0.6 matches neither the calibrated nor the 0.5
    # baseline thresholds of that calibration (not shown); 0.5 is measured at the baseline
    ops, summary = operating_points(model.card, NAMES, THR, cal.to_dict())
    assert [o.measured for o in ops] == [False, True, True]
    assert ops[0].description == "calibrated (split not recorded)"
    assert "threshold for Effusion differs from the model's" in summary["notes"][0]
    base = cal.evaluation.default[1]
    assert ops[1].sensitivity == base["recall"] and ops[1].specificity == base["specificity"]


def test_resolution_honesty_and_channel_evidence(model, images, independent):
    from medscalpel.explain.cams import compute_cam
    from medscalpel.explain.regions import describe_location, zones_from_masks

    lung = np.zeros((32, 32), bool)
    lung[4:28, 3:14] = True
    lung[4:28, 18:29] = True
    zones = [zones_from_masks(lung)] * 2
    # densenet_tiny at 32 px has a 1x1 CAM map: no zone words, overlay still shown
    r = clinical_report(model, images, label_stats=independent, zones=zones, top_channels=4,
                        progress=False)[1]
    assert r.resolution == {"input_size": [32, 32], "cam_size": [1, 1], "min_cam_size": 7,
                            "localisable": False, "note": r.resolution["note"]}
    assert all(f.location == f"{COARSE} (CAM map 1x1)" and f.zone_fractions == {}
               and not f.localised for f in r.findings)
    assert r.overlay_png is not None
    html = r.html()
    assert "CAM map 1x1" in html and "input 32x32 px" in html and COARSE in html
    # with the minimum lowered to 1 the zone words come back (and match describe_location)
    r = clinical_report(model, images, label_stats=independent, zones=zones, top_channels=4,
                        min_cam_size=1, progress=False)[1]
    x = images[1:2]
    with torch.no_grad():
        f = model.features(x)[0].double().numpy()
    w = model.classifier.weight.detach().double().numpy()
    for fd in r.findings:
        k = fd.class_index
        contrib = w[k] * f
        rows = fd.channels
        assert len(rows) == 4
        assert [c["channel"] for c in rows] == list(np.argsort(-contrib, kind="stable")[:4])
        for c in rows:
            assert c["mean_contribution"] == pytest.approx(contrib[c["channel"]], rel=1e-5,
                                                           abs=1e-7)
            others = {p["class"] for p in c["pushes"] + c["pulls"]}
            assert NAMES[k] not in others and others <= set(NAMES)
        assert fd.logit_minus_bias == pytest.approx(contrib.sum(), rel=1e-5, abs=1e-6)
        cam = compute_cam(model, x, k, progress=False).maps[0]
        assert fd.location == describe_location(cam, zones[1].resized(cam.shape))
        assert r.zones_source == "ground_truth"


def test_vgg_map_is_fine_enough():
    torch.manual_seed(0)
    m = create_model("vgg_tiny", num_classes=3, img_size=64)
    m.card = make_card(m, NAMES, "multilabel", Preprocess(size=64))
    with torch.no_grad():
        m.classifier.bias.fill_(3.0)
    r = clinical_report(m, torch.randn(1, 1, 64, 64), progress=False)[0]
    assert r.resolution["cam_size"] == [8, 8] and r.resolution["localisable"] is True
    assert len(r.findings) == 3 and all(COARSE not in f.location for f in r.findings)


def test_parameter_checks(model, images):
    with pytest.warns(DeprecationWarning, match="'jaccard_exclusion' is deprecated and ignored"):
        r = clinical_report(model, images[:1], jaccard_exclusion=0.01, progress=False)[0]
    assert len(r.findings) == 2
    with pytest.raises(ConfigError, match="'conflicts' parameter of clinical_report"):
        clinical_report(model, images, conflicts="drop", progress=False)
    with pytest.raises(ConfigError, match="rank_by"):
        clinical_report(model, images, rank_by="size", progress=False)
    with pytest.raises(ConfigError, match="'min_cam_size' parameter"):
        clinical_report(model, images, min_cam_size=0, progress=False)
    with pytest.raises(DataError, match="image_ids"):
        clinical_report(model, images, image_ids=["a"], progress=False)
    with pytest.raises(DataError, match="Image file not found"):
        clinical_report(model, ["/nonexistent/x.png"], progress=False)


def test_cli_clinical(model, tmp_path, planted):
    import typer
    from PIL import Image
    from typer.testing import CliRunner

    from medscalpel.cli.report_cmd import clinical
    from medscalpel.models.checkpoint import save_model

    m = copy.deepcopy(model)
    m.card = replace(model.card, thresholds=None)
    mdir = save_model(m, tmp_path / "model")
    planted.save(tmp_path / "stats.json")
    img = tmp_path / "one.png"
    Image.fromarray(np.full((40, 40), 120, np.uint8)).save(img)
    app = typer.Typer()
    app.command()(clinical)
    app.command("noop")(lambda: None)
    out = tmp_path / "rep"
    args = ["clinical", str(img), "--model", str(mdir), "--stats", str(tmp_path / "stats.json")]
    res = CliRunner().invoke(app, args + ["--out", str(out), "--hide-exclusive"])
    assert res.exit_code == 0, res.output
    assert "WARNING:" in res.output and "No calibrated thresholds" in res.output
    assert "HIDDEN by --hide-exclusive" in res.output
    assert (out / "index.html").is_file() and (out / "one.html").is_file()
    assert (out / "manifest.json").is_file()
    d = json.loads((out / "clinical.json").read_text())
    assert d["reports"][0]["exclusion"]["mode"] == "hide"
    assert d["reports"][0]["excluded"][0]["evidence"]["observed"] == 0
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "r2")])
    assert res.exit_code == 0 and "HIDDEN" not in res.output and "[conflict:" in res.output
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "r3"),
                                          "--jaccard-exclusion", "0.01"])
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError)
    assert "--jaccard-exclusion (report clinical) was removed" in str(res.exception)
    assert not (tmp_path / "r3").exists()
