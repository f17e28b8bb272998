"""The main job at its micro profile: every stage runs and writes the files the experiment
report reads."""

import json

import pytest

from medscalpel.errors import ConfigError
from medscalpel.pipeline.demo import PROFILES, run_demo


def test_demo_micro(tmp_path):
    out = tmp_path / "demo"
    lines = []
    res = run_demo(out, "micro", seed=0, progress=False, log=lines.append)
    names = [s.name for s in res.stages]
    assert names == ["phantom", "stats", "baseline", "calibrate", "shift", "compress", "deploy",
                     "sweep", "audit", "changes", "explain", "repair", "distill", "reports"]
    # a stage may say it skipped (and why); in the micro profile every stage runs
    assert all(s.status == "ok" for s in res.stages) and len(lines) == len(names)
    demo = json.loads((out / "demo.json").read_text())
    assert demo["profile"] == "micro" and len(demo["stages"]) == len(names)
    for rel in ["data/stats/stats.json", "baseline/metrics.json", "baseline/model/model.json",
                "calibrate/calibration.json", "compress/compress.json", "sweep/index.json",
                "audit/forgettability/forgettability.json", "audit/pies/pies.json",
                "explain/polarity/polarity.json", "repair/triage/decision_log.json",
                "distill/distill.json", "reports/experiment.html"]:
        assert (out / rel).is_file(), rel
    comp = json.loads((out / "compress" / "compress.json").read_text())
    methods = [r["method"] for r in comp["rows"]]
    assert "lossless" in methods and "structured-l1" in methods
    card = json.loads((out / "calibrate" / "model" / "model.json").read_text())
    assert card["thresholds"] is not None and len(card["thresholds"]) == 14
    _served_cams_labelled(out)
    _artifacts_read_back(out, names)
    _same_declared_artifacts_as_before_the_stage_registry(out)
    _report_reads_every_section_cleanly(out)


#: the declared artifacts of a micro demo run at a4c875b + the run-directory fix, before the
#: demo became a list of registered stages (issue S: "behaviour unchanged")
BEFORE_STAGES = {
    "baseline_card", "baseline_metrics", "baseline_train", "calibrated_card", "calibration",
    "cams", "changes", "clinical_index", "compress", "demo", "deploy", "distill",
    "experiment_report", "export", "features:shifted", "features:test", "features:val",
    "forgettability", "label_stats", "manifest", "phantom_data", "phantom_preview", "pies",
    "polarity", "predictions:shifted", "predictions:test", "predictions:val", "site_shift",
    "surgery", "sweep_index", "triage"}


def _same_declared_artifacts_as_before_the_stage_registry(out):
    from medscalpel.layout import ARTIFACTS

    present = set()
    for key, a in ARTIFACTS.items():
        if "{" in a.path:
            present |= {f"{key}:{s}" for s in ("val", "test", "shifted")
                        if a.exists(out, split=s)}
        elif a.exists(out):
            present.add(key)
    # the demo runs outside a RunDir here: no manifest; everything else as before, plus the
    # explain stage's explain/polarity/stages.json, which it wrote then too, now declared
    # ('polarity_stages', the path 'explain polarity --compare-with' writes as well)
    assert (out / "explain" / "polarity" / "stages.json").is_file()
    before = BEFORE_STAGES | {"polarity_stages"}
    assert present | {"manifest"} == before, sorted(present ^ before)


def _served_cams_labelled(out):
    """The explain stage also explains the artifact deploy serves (issue T), labelled with its
    runtime and precision, and the report shows that figure under that label."""
    cams = json.loads((out / "explain" / "cams" / "cams.json").read_text())
    deploy = json.loads((out / "deploy" / "deploy.json").read_text())
    served = cams["served"]
    art = served["artifact"]
    if deploy["recommended"].startswith("torch"):
        assert served["status"] == "served" and art is None
        return
    assert art["runtime"] + ":" + art["precision"] == deploy["recommended"] and art["sha256"]
    if deploy["explanation"]["status"] == "served":
        assert served["status"] == "served" and deploy["recommended"] in served["label"]
        assert (out / "explain" / "cams" / served["figure"]).is_file()
        assert len(served["spearman_vs_dense_gradcam"]) == len(cams["images"])
        html = (out / "reports" / "experiment.html").read_text()
        assert served["label"] in html and "CAMs of the served artifact" in html
    else:
        assert served["status"] == "not available" and served["reason"]


def _artifacts_read_back(out, stages):
    """Every declared artifact the demo's stages write exists and reads back through its
    declared type or keys: a renamed key or a changed result type fails here."""
    from medscalpel.layout import ARTIFACTS, read_artifact

    checked = []
    for key, a in ARTIFACTS.items():
        if a.stage not in stages or "{" in a.path:
            continue
        assert a.exists(out), f"{key}: {a.path} was not written by the '{a.stage}' stage"
        if a.is_json:
            obj = read_artifact(out, key)
            assert obj is not None
            checked.append(key)
    for split in ("val", "test", "shifted"):
        assert ARTIFACTS["predictions"].exists(out, split=split)
    assert {"compress", "surgery", "triage", "baseline_metrics", "label_stats"} <= set(checked)


def _report_reads_every_section_cleanly(out):
    """The experiment report built from the real writers: every section present, none with a
    note about an unreadable file or an incomplete rendering."""
    from medscalpel.report.experiment import experiment_report

    from test_report_experiment import check_cells_against_json, parse

    rep = experiment_report(out, out / "reports" / "check.html")
    bad = {s.key: s.notes for s in rep.sections
           if s.badge in ("unreadable file", "incomplete")}
    assert not bad, bad
    missing = [s.key for s in rep.sections if not s.present]
    assert missing == [], missing
    # every number on the page equals the JSON value it points to
    cells = parse((out / "reports" / "check.html").read_text(encoding="utf-8")).cells
    assert check_cells_against_json(out, cells) > 200


def test_demo_unknown_profile(tmp_path):
    with pytest.raises(ConfigError, match="Unknown demo profile 'huge'. Valid names: micro"):
        run_demo(tmp_path / "x", "huge")
    assert set(PROFILES) == {"micro", "quick", "full"}


def test_interrupted_demo_resumes_after_its_last_finished_stage(tmp_path, monkeypatch):
    """Ctrl-C during the 'sweep' stage of a resumable run: the rerun of the same command adopts
    the run's .partial folder, skips the finished stages and completes; another profile is
    refused instead of mixed."""
    import medscalpel.pipeline.demo as D
    from medscalpel.errors import RunError
    from medscalpel.runs import RunDir

    out = tmp_path / "demo"
    real = D.run_stage

    def interrupt_at_sweep(name, ctx, settings):
        if name == "sweep":
            raise KeyboardInterrupt
        return real(name, ctx, settings)

    quick = dict(n_images=240, epochs=1, sweep_ratios=(0.0, 0.5), changes_images=40,
                 changes_faithfulness=4, distill_epochs=1)
    config = {**D.PROFILES["micro"].to_dict(), **quick}
    monkeypatch.setattr(D, "run_stage", interrupt_at_sweep)
    with pytest.raises(KeyboardInterrupt):
        with RunDir(out, command="demo", config=config, resumable=True) as run:
            run_demo(run.path, "micro", progress=False, **quick)
    (partial,) = tmp_path.glob(".demo.*.partial")
    done = [s["name"] for s in json.loads((partial / "demo.json").read_text())["stages"]]
    assert done == ["phantom", "stats", "baseline", "calibrate", "shift", "compress", "deploy"]
    monkeypatch.setattr(D, "run_stage", real)
    lines = []
    with RunDir(out, command="demo", config=config, resumable=True) as run:
        assert run.adopted == partial
        res = run_demo(run.path, "micro", progress=False, log=lines.append, **quick)
    assert sum("done before" in ln for ln in lines) == 7 and len(res.stages) == 14
    assert (out / "reports" / "experiment.html").is_file() and not list(tmp_path.glob(".demo.*"))
    with pytest.raises(RunError, match="other settings"):
        run_demo(out, "micro", progress=False, epochs=2)
