"""Clinical reports: thresholds, mutual-exclusivity exclusion on constructed cases, channel
evidence, zone mapping, the decision-support statement, escaping, batch output, CLI."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from medscalpel.data.stats import label_statistics
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import ConfigError, DataError
from medscalpel.models.checkpoint import make_card
from medscalpel.models.zoo import create_model
from medscalpel.report.clinical import clinical_report, exclusivity_filter, logit_margin
from medscalpel.report.html import DECISION_SUPPORT, escape

EVIL = "<script>alert(1)</script>"
NAMES = ["Effusion", EVIL, "Pneumothorax"]


def _jaccard(j01: float) -> np.ndarray:
    return np.array([[1.0, j01, 0.2], [j01, 1.0, 0.3], [0.2, 0.3, 1.0]])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("densenet_tiny", num_classes=3, img_size=32)
    m.card = make_card(m, NAMES, "multilabel", Preprocess(size=32), thresholds=(0.6, 0.5, 0.5))
    with torch.no_grad():  # probabilities set by the bias: ~0.95, ~0.88, ~0.02
        m.classifier.weight.mul_(0.2)
        m.classifier.bias.copy_(torch.tensor([3.0, 2.0, -4.0]))
    m.eval()
    return m


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 32, 32, generator=g)


# ----------------------------------------------------------------------------- exclusivity
def test_exclusivity_below_level_excludes_weaker_with_reason():
    kept, excl = exclusivity_filter([0, 1], [1.0, 2.5], _jaccard(0.004), 0.01, NAMES)
    assert kept == [1]
    assert len(excl) == 1 and excl[0]["index"] == 0 and excl[0]["excluded_by"] == 1
    assert excl[0]["jaccard"] == 0.004
    assert "Jaccard 0.0040 < 0.01" in excl[0]["reason"]
    assert "almost never co-occur" in excl[0]["reason"]
    _, excl0 = exclusivity_filter([0, 1], [1.0, 2.5], _jaccard(0.0), 0.01, NAMES)
    assert "never co-occur" in excl0[0]["reason"] and "almost" not in excl0[0]["reason"]


def test_exclusivity_above_level_keeps_both():
    kept, excl = exclusivity_filter([0, 1], [2.0, 1.0], _jaccard(0.2), 0.01, NAMES)
    assert kept == [0, 1] and excl == []
    # exactly at the level is not below it
    kept, excl = exclusivity_filter([0, 1], [2.0, 1.0], _jaccard(0.01), 0.01, NAMES)
    assert kept == [0, 1] and excl == []
    # undefined Jaccard (no positives of either class) is no evidence of exclusivity
    kept, excl = exclusivity_filter([0, 1], [2.0, 1.0], _jaccard(float("nan")), 0.01, NAMES)
    assert kept == [0, 1]
    kept, excl = exclusivity_filter([0, 1], [2.0, 1.0], None, 0.01, NAMES)
    assert kept == [0, 1]


def test_exclusivity_greedy_chain():
    # 0 excludes 1; 2 conflicts only with the excluded 1, so 2 stays
    J = np.array([[1, 0.0, 0.5], [0.0, 1, 0.0], [0.5, 0.0, 1]], float)
    kept, excl = exclusivity_filter([2, 1, 0], [0.5, 1.0, 3.0], J, 0.01)
    assert kept == [0, 2] and [e["index"] for e in excl] == [1]
    with pytest.raises(ConfigError, match="strengths"):
        exclusivity_filter([0, 1], [1.0], J)
    with pytest.raises(DataError, match="square"):
        exclusivity_filter([0, 5], [1.0, 2.0], J)


# ----------------------------------------------------------------------------- reports
def test_report_findings_exclusion_and_statement(model, images, tmp_path):
    before = copy.deepcopy(model.state_dict())
    reps = clinical_report(model, images, tmp_path, label_stats=_jaccard(0.005),
                           image_ids=["p1", 'a&"<>b'], progress=False)
    assert [r.image_id for r in reps] == ["p1", 'a&"<>b']
    with torch.no_grad():
        probs = torch.sigmoid(model(images)).double().numpy()
    thr = [0.6, 0.5, 0.5]
    for i, r in enumerate(reps):
        above = [k for k in range(3) if probs[i, k] >= thr[k]]
        assert above == [0, 1]  # constructed: classes 0 and 1 above, class 2 below
        margins = [logit_margin(math.log(probs[i, k] / (1 - probs[i, k])), thr[k]) for k in above]
        strong, weak = (0, 1) if margins[0] > margins[1] else (1, 0)
        assert [f.class_index for f in r.findings] == [strong]
        assert [e.class_index for e in r.excluded] == [weak]
        e = r.excluded[0]
        assert e.jaccard == 0.005 and e.excluded_by == NAMES[strong]
        assert "Jaccard 0.0050 < 0.01" in e.reason
        f = r.findings[0]
        assert f.probability == pytest.approx(probs[i, strong], abs=1e-6)
        assert f.threshold == thr[strong]
        st = {p["class"]: p["status"] for p in r.probabilities}
        assert st == {NAMES[strong]: "reported", NAMES[weak]: "excluded",
                      "Pneumothorax": "below threshold"}
        d = json.loads((tmp_path / r.json_path).read_text())
        assert d["disclaimer"] == DECISION_SUPPORT
        assert d["findings"][0]["class"] == NAMES[strong]
        assert d["excluded"][0]["jaccard"] == 0.005
        html = (tmp_path / r.html_path).read_text()
        assert str(escape(DECISION_SUPPORT)) in html
        assert "data:image/png;base64," in html  # the overlay is embedded
        assert EVIL not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<script" not in html.lower()
    assert reps[1].html_path == "a_b.html"
    idx = (tmp_path / "index.html").read_text()
    assert 'href="p1.html"' in idx and 'href="a_b.html"' in idx
    assert 'a&"<>b' not in idx and ("a&amp;&#34;&lt;&gt;b" in idx or "a&amp;&quot;&lt;&gt;b" in idx)
    # the caller's model is unchanged
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_report_keeps_both_when_they_co_occur(model, images):
    reps = clinical_report(model, images[:1], label_stats=_jaccard(0.2), progress=False)
    r = reps[0]
    assert sorted(f.class_index for f in r.findings) == [0, 1] and r.excluded == []
    ms = [f.margin for f in r.findings]
    assert ms == sorted(ms, reverse=True)  # strongest first
    assert "mutual exclusivity not checked" not in " ".join(r.warnings)
    r0 = clinical_report(model, images[:1], label_stats=None, progress=False)[0]
    assert len(r0.findings) == 2 and "mutual exclusivity not checked" in " ".join(r0.warnings)


def test_channel_evidence_and_zones(model, images):
    from medscalpel.explain.cams import compute_cam
    from medscalpel.explain.regions import describe_location, zones_from_masks

    lung = np.zeros((32, 32), bool)
    lung[4:28, 3:14] = True
    lung[4:28, 18:29] = True
    zones = [zones_from_masks(lung)] * 2
    r = clinical_report(model, images, label_stats=_jaccard(0.2), zones=zones, top_channels=4,
                        progress=False)[1]
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


def test_image_files_and_label_stats_order(model, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    p = tmp_path / 'cxr&"<>.png'
    Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(p)
    # statistics in another class order, classes 0 and 1 never together
    y = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]], float)  # Pneumo, EVIL, Effusion
    stats = label_statistics(y, ["Pneumothorax", EVIL, "Effusion"])
    assert stats.jaccard_of("Effusion", EVIL) == 0.0
    out = tmp_path / "out"
    r = clinical_report(model, [p], out, label_stats=stats, progress=False)[0]
    assert r.image_id == 'cxr&"<>.png' and r.source == str(p)
    assert len(r.findings) == 1 and len(r.excluded) == 1
    assert r.excluded[0].jaccard == 0.0
    assert (out / "cxr.html").is_file() and (out / "cxr.json").is_file()
    html = (out / "cxr.html").read_text()
    assert 'cxr&"<>.png' not in html
    bad = label_statistics(y, ["A", "B", "C"])
    with pytest.raises(DataError, match="lack the model's class"):
        clinical_report(model, [p], label_stats=bad, progress=False)
    with pytest.raises(DataError, match="square"):
        clinical_report(model, [p], label_stats=np.eye(2), progress=False)


def test_parameter_checks(model, images):
    with pytest.raises(ConfigError, match="jaccard_exclusion"):
        clinical_report(model, images, jaccard_exclusion=1.5, progress=False)
    with pytest.raises(ConfigError, match="rank_by"):
        clinical_report(model, images, rank_by="size", progress=False)
    with pytest.raises(DataError, match="image_ids"):
        clinical_report(model, images, image_ids=["a"], progress=False)
    with pytest.raises(DataError, match="Image file not found"):
        clinical_report(model, ["/nonexistent/x.png"], progress=False)


def test_cli_clinical(model, tmp_path):
    import typer
    from PIL import Image
    from typer.testing import CliRunner

    from medscalpel.cli.report_cmd import clinical
    from medscalpel.models.checkpoint import save_model

    mdir = save_model(model, tmp_path / "model")
    stats = label_statistics(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], float), NAMES)
    stats.save(tmp_path / "stats.json")
    img = tmp_path / "one.png"
    Image.fromarray(np.full((40, 40), 120, np.uint8)).save(img)
    app = typer.Typer()
    app.command()(clinical)
    app.command("noop")(lambda: None)
    out = tmp_path / "rep"
    res = CliRunner().invoke(app, ["clinical", str(img), "--model", str(mdir), "--stats",
                                   str(tmp_path / "stats.json"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "index.html").is_file() and (out / "one.html").is_file()
    assert (out / "manifest.json").is_file()
    d = json.loads((out / "clinical.json").read_text())
    assert d["reports"][0]["excluded"][0]["jaccard"] == 0.0
