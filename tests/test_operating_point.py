"""One operating point object (issue Q, deliverable 5): the OperatingPoint round trip and its
decisions / margins by hand; a two-class model's cut written by 'repair calibrate --model' and
decided by in the clinical report; a multi-class temperature stored; old cards; serve.json;
calibration.json accepted by 'report clinical'; k-shot draws by patient."""

from __future__ import annotations

import json
import math
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medscalpel.cli.main import run
from medscalpel.deploy.serve import serve_metadata
from medscalpel.data.transforms import Preprocess
from medscalpel.engine.findings import findings_table
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ModelError
from medscalpel.models.checkpoint import CARD, ModelCard, load_model, make_card, save_model
from medscalpel.models.operating_point import STORED_METHOD, OperatingPoint, log_odds
from medscalpel.models.zoo import create_model
from medscalpel.report.clinical import clinical_report
from medscalpel.repair.shift import k_shot_draws, recalibrate_site, recalibrated_model

NAMES2 = ("NORMAL", "PNEUMONIA")


def _lo(p: float) -> float:
    return math.log(p / (1 - p))


def _cli(argv, capsys, monkeypatch, cwd: Path) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return ex.value.code, out, err


def _binary_preds(split: str, seed: int) -> Predictions:
    """p(PNEUMONIA) of positives in [0.95, 0.99], of negatives in [0.55, 0.85]: the Youden cut
    is the midpoint of 0.95 and 0.85 = 0.90, far above the argmax's 0.5."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0.95, 0.99, 30)
    neg = rng.uniform(0.55, 0.85, 30)
    pos[0], neg[0] = 0.95, 0.85
    p = np.r_[pos, neg]
    logits = np.stack([np.zeros_like(p), np.log(p / (1 - p))], 1).astype(np.float32)
    labels = np.r_[np.ones(30, np.int64), np.zeros(30, np.int64)]
    return Predictions(logits, labels, tuple(f"{split}{i}" for i in range(60)), NAMES2,
                       "multiclass", split=split)


def _tiny(num_classes: int, names, task: str, directory: Path) -> Path:
    torch.manual_seed(0)
    m = create_model("resnet_tiny", num_classes, 1, 32)
    return save_model(m, directory, make_card(m, list(names), task, Preprocess(size=32)))


def _set_output(model, bias) -> None:
    """Constant logits ``bias`` for every image (zero weights): hand-computable probabilities."""
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias, dtype=torch.float32))


# ----------------------------------------------------------------------------- the object
def test_round_trip_decisions_and_margins_by_hand():
    ml = OperatingPoint("multilabel", ("a", "b"), thresholds=(0.2, 0.7), method="youden",
                        fitted_on={"split": "val", "n_images": 10}, fallback=("b",))
    bi = OperatingPoint("binary", NAMES2, positive=1, cut=0.9974, method="site k-shot threshold")
    mc = OperatingPoint("multiclass", ("x", "y", "z"), temperature=2.0, method="temperature")
    for op in (ml, bi, mc, OperatingPoint.default("multiclass", NAMES2)):
        back = OperatingPoint.from_dict(json.loads(json.dumps(op.to_dict())))
        assert back == op
    p = np.array([[0.2, 0.69], [0.1, 0.71]])
    assert ml.decide(p).tolist() == [[True, False], [False, True]]
    np.testing.assert_allclose(ml.margin(p)[0], [0.0, _lo(0.69) - _lo(0.7)], atol=1e-12)
    # binary: p = 0.601 is NOT positive at the cut 0.9974; the margin is the log-odds difference
    pb = np.array([[0.399, 0.601], [0.0027, 0.9973], [0.001, 0.999]])
    assert bi.decide(pb).tolist() == [[True, False], [True, False], [False, True]]
    m = bi.margin(pb)
    assert m[0, 1] == pytest.approx(_lo(0.601) - _lo(0.9974), abs=1e-9)
    assert m[0, 1] == pytest.approx(0.4096 - 5.9496, abs=1e-3) and (m[:, 0] == -m[:, 1]).all()
    assert bi.class_thresholds() == (pytest.approx(1 - 0.9974), 0.9974)
    # multi-class: softmax of logits / T, argmax, margin = log-ratio to the runner-up
    z = np.array([[2.0, 0.0, -2.0]])
    pm = mc.probabilities(z)
    e = np.exp(z / 2.0)
    np.testing.assert_allclose(pm, e / e.sum(), atol=1e-12)
    assert mc.decide(pm).tolist() == [[True, False, False]]
    assert mc.margin(pm)[0, 0] == pytest.approx(1.0)  # 1 - 0
    assert mc.margin(pm)[0, 2] == pytest.approx(-2.0)  # -1 - 1
    assert float(log_odds(1.0000001)) == math.inf  # a "nothing positive" cut above 1
    assert bi.label(0).startswith("when p(PNEUMONIA) < 0.9974") and bi.label(1).startswith("0.9974 (site k-shot threshold")
    assert OperatingPoint.default("multilabel", ("a",)).label(0) == "0.5 (not calibrated)"
    with pytest.raises(ModelError, match="2 thresholds for 3 classes"):
        OperatingPoint("multilabel", ("a", "b", "c"), thresholds=(0.5, 0.5))
    with pytest.raises(ModelError, match="binary operating point needs"):
        OperatingPoint("binary", NAMES2, positive=2, cut=0.5)


def test_old_card_loads_and_thresholds_never_disagree(tmp_path):
    d = _tiny(3, ("a", "b", "c"), "multilabel", tmp_path / "m")
    card = json.loads((d / CARD).read_text())
    card.pop("operating_point")  # a card written before operating points
    card["thresholds"] = [0.3, 0.4, 0.6]
    card["lineage"] = [{"method": "threshold_calibration", "parent": "x", "fit_split": "val",
                        "method_params": {"method": "f1"}, "fallback": ["c"]}]
    (d / CARD).write_text(json.dumps(card))
    m = load_model(d)
    assert m.card.operating_point is None and m.card.thresholds == (0.3, 0.4, 0.6)
    op = m.card.decision_point()
    assert op.thresholds == (0.3, 0.4, 0.6) and op.method == "f1"
    assert op.fitted_on["split"] == "val" and op.fallback == ("c",)
    # the operating point sets the thresholds; thresholds changed without it re-derive it
    new = m.card.with_operating_point(replace(op, method="youden"))
    assert new.thresholds == (0.3, 0.4, 0.6) and new.operating_point.method == "youden"
    back = ModelCard.from_dict(json.loads(json.dumps(new.to_dict())))
    assert back.operating_point == new.operating_point
    moved = replace(new, thresholds=(0.1, 0.4, 0.6))
    assert moved.operating_point.thresholds == (0.1, 0.4, 0.6)
    assert "changed after its operating point" in moved.operating_point.notes[0]
    no_thr = replace(new, thresholds=None)
    assert no_thr.thresholds == (0.3, 0.4, 0.6)  # derived from the operating point
    assert ModelCard.from_dict({**card, "thresholds": None}).decision_point().method == "default"


# ----------------------------------------------------------------------------- binary end to end
def test_binary_calibrate_model_then_clinical_decides_by_the_cut(tmp_path, capsys, monkeypatch):
    from PIL import Image

    _tiny(2, NAMES2, "multiclass", tmp_path / "model")
    _binary_preds("val", 0).save(tmp_path / "val.npz")
    _binary_preds("test", 1).save(tmp_path / "test.npz")
    code, out, err = _cli(["repair", "calibrate", "val.npz", "--eval", "test.npz", "--model",
                           "model", "--out", "cal"], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    m = load_model(tmp_path / "cal" / "calibrate" / "model")
    op = m.card.operating_point
    assert op.task == "binary" and op.class_names[op.positive] == "PNEUMONIA"
    assert op.cut == pytest.approx(0.90, abs=1e-6) and op.method == "youden"
    assert op.fitted_on["split"] == "val" and op.fitted_on["n_images"] == 60
    assert op.fitted_on["positives"] == {"PNEUMONIA": 30, "NORMAL": 30}
    assert op.fitted_on["source"].startswith("sha256:")
    assert m.card.thresholds == (pytest.approx(0.10), pytest.approx(0.90))
    row = op.measured_row(1)  # test split: positives >= 0.95, negatives <= 0.85: perfect
    assert op.measured_on["split"] == "test" and row["sensitivity"] == 1.0
    assert row["n_pos"] == 30 and row["sensitivity_ci"][0] == pytest.approx(0.025 ** (1 / 30))
    assert "Clopper-Pearson 95% CIs" in " ".join(out.split())
    # the clinical report: p = 0.70 (above the argmax's 0.5, below the cut) is NOT a finding
    _set_output(m, [0.0, _lo(0.70)])
    x = torch.zeros(1, 1, 32, 32)
    r = clinical_report(m, x, progress=False)[0]
    assert r.findings == [] and r.decision == "NORMAL"
    assert r.summary() == "no finding above its threshold (decision: NORMAL)"
    assert r.operating["calibrated"] and r.operating["notice"] is None
    assert r.operating["margin_definition"] == "log-odds(p) - log-odds(cut)"
    # p = 0.97 is: its margin is log-odds(0.97) - log-odds(0.90), by hand
    _set_output(m, [0.0, _lo(0.97)])
    r = clinical_report(m, x, progress=False)[0]
    (f,) = r.findings
    assert f.name == "PNEUMONIA" and f.threshold == pytest.approx(0.90)
    assert f.probability == pytest.approx(0.97, abs=1e-6)
    assert f.margin == pytest.approx(_lo(0.97) - _lo(0.90), abs=1e-5)
    assert f.operating_point.description == "calibrated on split 'val' (youden)"
    assert f.operating_point.sensitivity == 1.0 and f.operating_point.split == "test"
    neg = next(p for p in r.probabilities if p["class"] == "NORMAL")
    assert neg["threshold"] is None and "p(PNEUMONIA) < 0.9" in neg["threshold_description"]
    # negative channel contributions are not shown as shares
    for c in f.channels:
        assert c["share"] is None or (c["mean_contribution"] > 0 and f.logit_minus_bias > 0)
    # report clinical accepts the calibration.json written for this model; a .npz is one error
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "cxr.png")
    from medscalpel.models.checkpoint import save_model as save

    save(m, tmp_path / "cal_model_set")
    code, out, err = _cli(["report", "clinical", "cxr.png", "--model", "cal_model_set",
                           "--calibration", "cal/calibrate/calibration.json", "--out", "rep"], capsys,
                          monkeypatch, tmp_path)
    assert code == 0, err
    rep = json.loads(next((tmp_path / "rep").glob("cxr*.json")).read_text())
    assert rep["findings"][0]["operating_point"]["sensitivity"] == 1.0
    code, out, err = _cli(["report", "clinical", "cxr.png", "--model", "cal_model_set",
                           "--calibration", "val.npz", "--out", "rep2"], capsys, monkeypatch,
                          tmp_path)
    assert code == 2 and err.strip().startswith("error:") and "not a JSON file" in err
    assert len(err.strip().splitlines()) == 1


def test_uncalibrated_binary_says_so(tmp_path):
    m = load_model(_tiny(2, NAMES2, "multiclass", tmp_path / "m"))
    _set_output(m, [0.0, _lo(0.601)])
    r = clinical_report(m, torch.zeros(1, 1, 32, 32), progress=False)[0]
    (f,) = r.findings  # the default cut 0.5 = the argmax
    assert f.operating_point.description == "0.5 (not calibrated)" and not r.operating["calibrated"]
    assert f.margin == pytest.approx(_lo(0.601), abs=1e-5)  # +0.41, not the raw logit


# ----------------------------------------------------------------------------- multi-class, serve
def test_multiclass_temperature_stored_and_served(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    z = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[y]
    z = (z * 4.0).astype(np.float32)  # overconfident: T > 1
    names = ("a", "b", "c")
    for split, sl in (("val", slice(0, 150)), ("test", slice(150, 300))):
        Predictions(z[sl], y[sl], tuple(f"{split}{i}" for i in range(150)), names, "multiclass",
                    split=split).save(tmp_path / f"{split}.npz")
    _tiny(3, names, "multiclass", tmp_path / "model")
    code, out, err = _cli(["repair", "calibrate", "val.npz", "--eval", "test.npz", "--model",
                           "model", "--out", "cal"], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    cal = json.loads((tmp_path / "cal" / "calibrate" / "calibration.json").read_text())
    m = load_model(tmp_path / "cal" / "calibrate" / "model")
    op = m.card.operating_point
    assert op.task == "multiclass" and op.method == "temperature"
    assert op.temperature == pytest.approx(cal["temperature"]) and op.temperature > 1.5
    assert cal["operating_point"]["temperature"] == op.temperature
    preds = Predictions.load(tmp_path / "test.npz")
    t = findings_table(preds, operating_point=op)
    e = np.exp(z[150].astype(np.float64) / op.temperature)
    assert t.rows[0]["a"] == pytest.approx(float(e[0] / e.sum()), abs=1e-9)
    # serve.json carries the operating point
    variant = types.SimpleNamespace(runtime="torch", precision="fp32", name="torch:fp32",
                                    info={})
    meta = serve_metadata(m, (1, 32, 32), variant, ["model.safetensors"])
    assert meta["operating_point"]["temperature"] == op.temperature
    assert meta["operating_point"]["method"] == "temperature"


# ----------------------------------------------------------------------------- k-shot by patient
def _patient_preds(seed: int = 0) -> tuple[Predictions, list[str]]:
    rng = np.random.default_rng(seed)
    n_pat = 150
    pats = np.repeat(np.arange(n_pat), rng.integers(1, 6, n_pat))
    y = (rng.random(n_pat) < 0.4)[pats].astype(np.float32)[:, None]
    z = (2 * y - 1) + rng.normal(size=y.shape)
    ids = tuple(f"img{i}" for i in range(len(pats)))
    return (Predictions(z.astype(np.float32), y, ids, ("Effusion",), "multilabel", split="ext"),
            [f"p{p}" for p in pats])


def test_k_shot_draws_by_patient_keep_patients_out_of_the_rest():
    ext, pids = _patient_preds()
    internal, _ = _patient_preds(1)
    rows, _ = k_shot_draws(ext, k=20, seed=0, patient_ids=pids)
    drawn = {pids[r] for r in rows}
    assert len(rows) == 40 and len(drawn) == 40  # k distinct patients per side
    res, rec = recalibrate_site(None, internal, ext, k=20, n_boot=0,
                                patient_ids=dict(zip(ext.ids, pids)))
    fit_pat = {pids[ext.ids.index(i)] for i in res.fit_ids}
    rest = [i for i, p in zip(ext.ids, pids) if i not in set(res.fit_ids) and p not in fit_pat]
    assert res.split_unit == "patient" and res.n_fit_patients == len(fit_pat)
    assert res.n_rest == len(rest) and res.n_fit + res.n_rest + res.n_excluded_same_patient \
        == ext.n
    assert res.after[0]["n_pos"] + res.after[0]["n_neg"] == len(rest)
    # drawn by image (no patients), the rest shares patients with the fitted images
    res_img, _ = recalibrate_site(None, internal, ext, k=20, n_boot=0)
    fit_img = {pids[ext.ids.index(i)] for i in res_img.fit_ids}
    shared = [i for i, p in zip(ext.ids, pids) if i not in set(res_img.fit_ids) and p in fit_img]
    assert res_img.split_unit == "image" and len(shared) > 0
    # the site's operating point goes into the recalibrated model's card
    torch.manual_seed(0)
    m = create_model("resnet_tiny", 1, 1, 32)
    m.card = make_card(m, ["Effusion"], "multilabel", Preprocess(size=32))
    rm = recalibrated_model(m, rec, site="ext-site", result=res, split="ext")
    op = rm.card.operating_point
    assert op.method == "site k-shot threshold" and op.thresholds == tuple(rec.thresholds_)
    assert op.fitted_on["n_patients"] == res.n_fit_patients and op.fitted_on["site"] == "ext-site"
    assert op.measured_on["n_images"] == res.n_rest
    assert rm.card.thresholds == op.thresholds and op.method != STORED_METHOD
