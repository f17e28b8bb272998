"""Treatment router: diagnosis, escalation, held-out judging, cost learning and persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medscalpel.engine.predict import Features
from medscalpel.errors import ConfigError, DataError
from medscalpel.repair.treatments import TREATMENTS, RepairState, Treatment
from medscalpel.repair.triage import (CostMatrix, DiagnosisCriteria, TreatmentRouter,
                                      diagnose_class, ece_binary, seconds_to_units, triage)


def planted(n, seed, prefix):
    """a: separable but bias far too low (recall 0 at 0.5: a threshold fixes it);
    b: label = channel 2 > 0 but row b is all zero (constant score: a threshold cannot help,
       retraining row b can); c: healthy."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 6)).astype(np.float32)
    ya = (f[:, 0] > 0.5).astype(np.float32)
    yb = (f[:, 2] > 0).astype(np.float32)
    yc = (f[:, 4] > 0).astype(np.float32)
    w = np.zeros((3, 6), np.float32)
    w[0, 0] = 4.0
    w[2, 4] = 8.0
    b = np.array([-12.0, -3.0, 0.0], np.float32)
    return Features(f, w, b, np.stack([ya, yb, yc], 1), tuple(f"{prefix}{i}" for i in range(n)),
                    ("a", "b", "c"), "multilabel", prefix)


def test_diagnosis_finds_planted_issues():
    fit = planted(300, 0, "fit")
    router = TreatmentRouter().fit(fit)
    kinds = {c: {i["kind"] for i in v} for c, v in router.issues_.items()}
    assert "low_recall" in kinds["a"]
    assert {"low_recall", "low_auroc"} <= kinds["b"]
    assert kinds["c"] == set()


def test_escalation_and_cost_updates(tmp_path):
    fit, held = planted(300, 0, "fit"), planted(300, 1, "held")
    path = tmp_path / "costs.json"
    router = TreatmentRouter(budget=5, cost_path=path)
    res = router.fit(fit).run(held)
    by = {c.name: c for c in res.classes}
    # a: the cheapest treatment works and is chosen
    assert by["a"].attempts[0]["treatment"] == "threshold"
    assert by["a"].attempts[0]["status"] == "helped" and by["a"].chosen[0] == "threshold"
    assert by["a"].after["youden"] > by["a"].before["youden"] + 0.5
    # b: calibration fails, the router escalates to a retraining treatment that helps
    tried = [a["treatment"] for a in by["b"].attempts]
    assert tried[0] == "threshold" and by["b"].attempts[0]["status"] == "no gain"
    assert set(by["b"].chosen) & {"retrain_partial", "reoptimize"}
    assert by["b"].after["auroc"] > 0.9 > by["b"].before["auroc"]
    # c: nothing to do
    assert by["c"].chosen == ["none"] and by["c"].attempts == []
    # measured costs were folded in and persisted
    assert router.costs_.runs["threshold"] == 2
    assert router.costs_.cost("threshold") != 1.0
    assert path.is_file()
    again = TreatmentRouter(cost_path=path).fit(fit)
    assert again.costs_.runs["threshold"] == 2
    assert again.costs_.cost("threshold") == pytest.approx(router.costs_.cost("threshold"))
    # other rows of the final layer untouched by per-class treatments
    assert np.array_equal(res.state.weight[2], fit.weight[2])
    # the decision log
    out = res.save(tmp_path / "log")
    assert (out / "decision_log.json").is_file()
    md = (out / "decision_log.md").read_text()
    assert "| b |" in md and "threshold" in md


def test_budget_turns_treatments_into_proposals():
    fit, held = planted(200, 0, "fit"), planted(200, 1, "held")
    res = TreatmentRouter(budget=1.5).fit(fit).run(held)
    b = {c.name: c for c in res.classes}["b"]
    statuses = {a["treatment"]: a["status"] for a in b.attempts}
    assert statuses["retrain_partial"] == "proposed"
    assert statuses["full_retrain"] == "proposed"
    est = {a["treatment"]: a.get("estimated_seconds") for a in b.attempts}
    assert est["full_retrain"] > 3600
    assert "low_auroc" in b.remaining


def test_predictions_only_cannot_run_feature_treatments():
    fit, held = planted(200, 0, "fit"), planted(200, 1, "held")
    res = triage(fit.to_predictions(), held.to_predictions())
    b = {c.name: c for c in res.classes}["b"]
    st = {a["treatment"]: a["status"] for a in b.attempts}
    assert "surgery" not in st or st["surgery"] == "not applicable"
    assert st["retrain_partial"] == "not applicable"


def test_fp_cluster_diagnosis_and_surgery_treats_it():
    rng = np.random.default_rng(3)

    def make(n, prefix, seed):
        r = np.random.default_rng(seed)
        f = r.uniform(0, 0.2, (n, 8)).astype(np.float32)
        y = np.zeros((n, 1), np.float32)
        y[: n // 4] = 1
        f[: n // 4, 1:4] += 1.0
        fp = slice(n // 4, n // 4 + n // 8)
        f[fp, 0] += 3.0
        w = np.zeros((1, 8), np.float32)
        w[0, :4] = 1.0
        return Features(f, w, np.array([-1.5], np.float32), y,
                        tuple(f"{prefix}{i}" for i in range(n)), ("ptx",), "multilabel", prefix)

    fit, held = make(240, "f", 0), make(240, "h", 1)
    issues, _ = diagnose_class(fit.logits(), fit, 0, 0.5, DiagnosisCriteria(), fit.weight)
    cl = [i for i in issues if i["kind"] == "fp_cluster"]
    assert cl and cl[0]["channel"] == 0
    res = TreatmentRouter(treatments=["threshold", "surgery", "retrain_partial"]).fit(fit).run(
        held)
    att = {a["treatment"]: a for a in res.classes[0].attempts}
    assert att["surgery"]["status"] == "helped"
    assert res.classes[0].chosen[0] == "surgery"
    assert res.state.weight[0, 0] == 0 and rng is not None


def test_cost_matrix_units_and_round_trip(tmp_path):
    assert seconds_to_units(0) == 1.0
    assert seconds_to_units(3600) == pytest.approx(8.11, abs=0.01)
    cm = CostMatrix(alpha=0.5)
    cm.update("surgery", 1.0)
    cm.update("surgery", 3.0)
    assert cm.seconds_ema["surgery"] == 2.0 and cm.runs["surgery"] == 2
    expect = (2 * 2.0 + 2 * seconds_to_units(2.0)) / 4
    assert cm.cost("surgery") == pytest.approx(expect)
    cm.save(tmp_path / "c.json")
    assert CostMatrix.load(tmp_path / "c.json").cost("surgery") == pytest.approx(expect)
    assert ece_binary(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0


def test_custom_treatment_registers():
    @TREATMENTS.register("test_bias_shift")
    class BiasShift(Treatment):
        name = "test_bias_shift"
        initial_cost = 0.5
        treats = frozenset({"low_recall"})

        def apply(self, state: RepairState, k, fit, issues):
            from medscalpel.repair.treatments import Attempt

            new = state.copy()
            new.thresholds[k] = 1e-6
            return Attempt(new, {"shift": "threshold to ~0"})

    try:
        res = TreatmentRouter(costs={"test_bias_shift": 0.5}).fit(planted(100, 0, "f")).run(
            planted(100, 1, "h"))
        assert res.classes[0].attempts[0]["treatment"] == "test_bias_shift"
    finally:
        TREATMENTS._items.pop("test_bias_shift")
        TREATMENTS._help.pop("test_bias_shift")


def test_errors(tmp_path):
    fit = planted(100, 0, "f")
    with pytest.raises(ConfigError, match="not fitted"):
        TreatmentRouter().run(fit)
    with pytest.raises(DataError, match="in both the fit and the held-out split"):
        TreatmentRouter().fit(fit).run(fit)
    with pytest.raises(ConfigError, match="Unknown treatment 'laser'"):
        TreatmentRouter(treatments=["laser"]).fit(fit)
    with pytest.raises(ConfigError, match="unknown treatment\\(s\\) \\['laser'\\]"):
        TreatmentRouter(costs={"laser": 1}).fit(fit)
    with pytest.raises(ConfigError, match="'budget' parameter of TreatmentRouter"):
        TreatmentRouter(budget=-1).fit(fit)
    with pytest.raises(ConfigError, match="2 thresholds for 3 classes"):
        TreatmentRouter().fit(fit, thresholds=[0.5, 0.5])


def test_cli_commands_smoke(tmp_path):
    import torch
    import typer
    from typer.testing import CliRunner

    from medscalpel.cli import calibrate_cmd, repair_cmd
    from medscalpel.data.transforms import Preprocess
    from medscalpel.models.checkpoint import load_model, make_card, save_model
    from medscalpel.models.zoo import create_model

    fit, held = planted(200, 0, "fit"), planted(200, 1, "held")
    fit.save(tmp_path / "fit.npz")
    held.save(tmp_path / "held.npz")
    fit.to_predictions().save(tmp_path / "fitp.npz")
    held.to_predictions().save(tmp_path / "heldp.npz")
    model = create_model("vgg_tiny", 3, img_size=32)
    model.classifier = torch.nn.Linear(6, 3)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(fit.weight))
        model.classifier.bias.copy_(torch.from_numpy(fit.bias))
    save_model(model, tmp_path / "m", make_card(model, ["a", "b", "c"], "multilabel",
                                                 Preprocess(size=32)))
    app = typer.Typer()
    for fn in (calibrate_cmd.calibrate, repair_cmd.surgery, repair_cmd.retrain,
               repair_cmd.triage):
        app.command()(fn)
    r = CliRunner()
    res = r.invoke(app, ["calibrate", str(tmp_path / "fitp.npz"), "--eval",
                         str(tmp_path / "heldp.npz"), "--model", str(tmp_path / "m"),
                         "--out", str(tmp_path / "cal")])
    assert res.exit_code == 0, res.output
    assert load_model(tmp_path / "cal" / "calibrate" / "model").card.thresholds is not None
    res = r.invoke(app, ["triage", str(tmp_path / "fit.npz"), str(tmp_path / "held.npz"),
                         "--costs", str(tmp_path / "costs.json"), "--out", str(tmp_path / "tri"),
                         "--model", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tri" / "repair" / "triage" / "decision_log.md").is_file()
    assert (tmp_path / "costs.json").is_file()
    res = r.invoke(app, ["retrain", str(tmp_path / "fit.npz"), "--held-out",
                         str(tmp_path / "held.npz"), "--classes", "b", "--steps", "50",
                         "--out", str(tmp_path / "rt")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "rt" / "retrain.json").read_text())["method"] == \
        "classifier_finetune"
    # the 'retrain' stage with a model: the retrained copy in model/, recorded at its final path
    res = r.invoke(app, ["retrain", str(tmp_path / "fit.npz"), "--held-out",
                         str(tmp_path / "held.npz"), "--method", "reoptimize", "--model",
                         str(tmp_path / "m"), "--out", str(tmp_path / "rt2")])
    assert res.exit_code == 0, res.output
    rj = json.loads((tmp_path / "rt2" / "retrain.json").read_text())
    assert rj["method"] == "f_reoptimization" and rj["model_dir"] == str(tmp_path / "rt2" / "model")
    assert load_model(tmp_path / "rt2" / "model").card.class_names == \
        load_model(tmp_path / "m").card.class_names
    assert json.loads((tmp_path / "rt2" / "manifest.json").read_text())["command"] == \
        "repair retrain"
    neg = np.flatnonzero(fit.labels[:, 2] == 0)
    near = neg[np.argsort(-fit.features[neg, 4])[:10]]
    (tmp_path / "ids.txt").write_text("\n".join(fit.ids[i] for i in near))
    res = r.invoke(app, ["surgery", str(tmp_path / "m"), "--class", "c", "--features",
                         str(tmp_path / "fit.npz"), "--fp-ids", str(tmp_path / "ids.txt"),
                         "--delta-prob", "0.01", "--adjust-bias", "--tp-loss-budget", "200",
                         "--out", str(tmp_path / "sg")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "sg" / "repair" / "surgery" / "surgery.json").is_file()
    # the 'surgery' stage records where the corrected model is once the run finished
    sj = json.loads((tmp_path / "sg" / "repair" / "surgery" / "surgery.json").read_text())
    assert sj["model_dir"] == str(tmp_path / "sg" / "repair" / "surgery")
    assert json.loads((tmp_path / "sg" / "manifest.json").read_text())["command"] == \
        "repair surgery"
    assert load_model(tmp_path / "sg" / "repair" / "surgery").card.lineage[-1]["method"] == \
        "surgical_correction"


def test_choice_and_report_use_disjoint_parts_of_the_held_out_split():
    """'helped' is judged on the selection part; the reported numbers come from the untouched
    report part, recomputed here from the final state on exactly those images."""
    from medscalpel.repair.triage import class_metrics

    fit, held = planted(300, 0, "fit"), planted(300, 1, "held")
    router = TreatmentRouter(report_fraction=0.4, seed=3).fit(fit)
    res = router.run(held)
    st = res.settings
    assert (st["n_selection"], st["n_report"]) == (180, 120)
    sel, rep = router._split_held_out(held)
    assert set(sel).isdisjoint(rep) and len(set(sel) | set(rep)) == 300
    part = held.select(rep)
    a = next(c for c in res.classes if c.name == "a")
    assert a.chosen != ["none"]
    want = class_metrics(res.state.logits(part), part.labels, part.task, 0,
                         float(res.state.thresholds[0]), router.criteria_.ece_bins, None)
    assert a.report_after == pytest.approx(want, rel=1e-6)  # float32 vs float64 logits
    d = a.to_dict()
    assert d["report_gain"]["recall"] == pytest.approx(want["recall"] - d["report_before"]["recall"])
    with pytest.raises(ConfigError, match="report_fraction"):
        TreatmentRouter(report_fraction=1.0).fit(fit).run(held)


def test_platt_treatment_fixes_a_miscalibrated_class_and_keeps_every_decision():
    """c's row planted 4x too confident: labels drawn with P(y=1) = sigmoid(2 x), the row's logit
    is 8 x. Platt rescales the row (slope ~1/4) and maps the threshold, so ECE falls and no
    decision changes."""
    from medscalpel.repair.triage import class_metrics

    def data(n, seed, prefix):
        d = planted(n, seed, prefix)
        rng = np.random.default_rng(seed + 10)
        y = d.labels.copy()
        y[:, 2] = (rng.random(n) < 1 / (1 + np.exp(-2.0 * d.features[:, 4]))).astype(np.float32)
        return Features(d.features, d.weight, d.bias, y, d.ids, d.class_names, d.task, prefix)

    fit, held = data(600, 0, "fit"), data(600, 1, "held")
    state = RepairState(np.full(3, 0.4), fit.weight.astype(np.float64),
                        fit.bias.astype(np.float64))
    before = class_metrics(state.logits(held), held.labels, held.task, 2, 0.4)
    att = TREATMENTS.create("platt").apply(state, 2, fit, [{"kind": "miscalibrated"}])
    assert 0.15 < att.detail["scale"] < 0.4  # the row was 4x too confident
    after = class_metrics(att.state.logits(held), held.labels, held.task, 2,
                          float(att.state.thresholds[2]))
    assert after["ece"] < before["ece"] / 2
    for key in ("tp", "fp", "fn", "tn"):
        assert after[key] == before[key]
    assert np.array_equal(att.state.weight[:2], state.weight[:2])  # other rows untouched
    # the router picks it for the miscalibrated class
    res = TreatmentRouter(budget=5).fit(fit).run(held)
    c = next(x for x in res.classes if x.name == "c")
    assert "platt" in c.chosen
    # multi-class outputs: refused with the reason
    assert "multi-label" in TREATMENTS.create("platt").can_run(
        Features(fit.features, fit.weight, fit.bias, np.zeros(600, np.int64), fit.ids,
                 fit.class_names, "multiclass"), state)
