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
    assert names == ["phantom", "stats", "baseline", "calibrate", "compress", "sweep", "audit",
                     "explain", "repair", "distill", "reports"]
    assert all(s.status == "ok" for s in res.stages) and len(lines) == len(names)
    demo = json.loads((out / "demo.json").read_text())
    assert demo["profile"] == "micro" and len(demo["stages"]) == len(names)
    for rel in ["data/stats/stats.json", "baseline/metrics.json", "baseline/model/model.json",
                "calibrate/calibration.json", "compress/compress.json", "sweep/sweep.json",
                "audit/forgettability/forgettability.json", "audit/pies/pies.json",
                "explain/polarity/polarity.json", "repair/triage/decision_log.json",
                "distill/distill.json", "reports/experiment.html"]:
        assert (out / rel).is_file(), rel
    comp = json.loads((out / "compress" / "compress.json").read_text())
    methods = [r["method"] for r in comp["rows"]]
    assert "lossless" in methods and "structured-l1" in methods
    card = json.loads((out / "calibrate" / "model" / "model.json").read_text())
    assert card["thresholds"] is not None and len(card["thresholds"]) == 14


def test_demo_unknown_profile(tmp_path):
    with pytest.raises(ConfigError, match="Unknown demo profile 'huge'. Valid names: micro"):
        run_demo(tmp_path / "x", "huge")
    assert set(PROFILES) == {"micro", "quick", "full"}
