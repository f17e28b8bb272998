"""Stages as registered units (issue S): declared reads / writes are real artifacts, the
contract is checked around every run, settings come typed from a profile."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import medscalpel.pipeline.stages  # noqa: F401
from medscalpel.errors import ConfigError, RunError
from medscalpel.layout import ARTIFACTS, write_artifact
from medscalpel.pipeline.demo import DEMO_STAGES, PROFILES
from medscalpel.pipeline.stage import (STAGES, Stage, StageContext, missing_artifacts,
                                       register_stage, run_stage, settings_from)


def test_every_demo_stage_is_registered_with_declared_artifacts():
    assert set(DEMO_STAGES) <= set(STAGES.names())
    written: set[str] = set()
    for name in DEMO_STAGES:
        cls = STAGES.get(name)
        assert cls.name == name and cls.writes, name
        for ref in (*cls.reads, *cls.writes):
            assert ref.split(":")[0] in ARTIFACTS, (name, ref)
        # a stage reads only what an earlier stage of the demo wrote
        for ref in (*cls.reads, *cls.may_read):
            assert ref.split(":")[0] in written, (name, ref)
        written |= {ref.split(":")[0] for ref in cls.writes}
    # every artifact whose declared writer is a demo stage is written by that stage
    for key, a in ARTIFACTS.items():
        if a.stage in DEMO_STAGES:
            cls = STAGES.get(a.stage)
            assert key in {r.split(":")[0] for r in (*cls.writes, *cls.may_write)}, key


def test_settings_come_typed_from_every_profile():
    for profile in PROFILES.values():
        for name in DEMO_STAGES:
            s = settings_from(STAGES.get(name).Settings, profile)
            assert isinstance(s, STAGES.get(name).Settings)
    s = settings_from(STAGES.get("baseline").Settings, PROFILES["micro"], epochs=9)
    assert (s.arch, s.size, s.epochs) == ("densenet_tiny", 32, 9)
    with pytest.raises(ConfigError, match="takes BaselineSettings"):
        run_stage("baseline", StageContext("/nonexistent"), object())


@dataclass(frozen=True)
class _NoSettings:
    pass


def test_contract_is_checked_around_a_stage(tmp_path):
    ctx = StageContext(tmp_path)
    with pytest.raises(RunError, match=r"Stage 'audit' needs sweep/index.json, "
                                       r"data/phantom/labels.csv"):
        run_stage("audit", ctx, STAGES.get("audit").Settings())
    # a stage that reads the dataset from a command's --data or the run's phantom: neither
    with pytest.raises(RunError, match=r"No dataset in this run.*--data"):
        run_stage("stats", ctx, STAGES.get("stats").Settings())

    @register_stage
    class Forgetful(Stage):
        name = "_test_forgetful"
        writes = ("triage",)
        Settings = _NoSettings

        def run(self, ctx, s):
            return {}

    @register_stage
    class Honest(Stage):
        name = "_test_honest"
        writes = ("triage",)
        Settings = _NoSettings

        def run(self, ctx, s):
            write_artifact(ctx.out, "triage", {"classes": [], "settings": {}})
            return {"n": 1}

    @register_stage
    class Skips(Stage):
        name = "_test_skips"
        writes = ("surgery",)
        Settings = _NoSettings

        def run(self, ctx, s):
            return {"status": "skipped", "reason": "nothing to repair"}

    try:
        with pytest.raises(RunError, match="declares repair/triage/decision_log.json but did "
                                           "not write it"):
            run_stage("_test_forgetful", ctx, _NoSettings())
        rec = run_stage("_test_honest", ctx, _NoSettings())
        assert rec.status == "ok" and rec.summary == {"n": 1}
        assert missing_artifacts(tmp_path, ("triage", "surgery")) == \
            ["repair/surgery/surgery.json"]
        assert run_stage("_test_skips", ctx, _NoSettings()).status == "skipped"
    finally:
        for n in ("_test_forgetful", "_test_honest", "_test_skips"):
            STAGES._items.pop(n, None)
            STAGES._help.pop(n, None)
    with pytest.raises(ConfigError, match="unknown artifact 'nope'"):
        @register_stage
        class Bad(Stage):
            name = "_test_bad"
            writes = ("nope",)
            Settings = _NoSettings
    assert "_test_bad" not in STAGES


def test_architecture_page_tables_are_generated_from_the_registries():
    from pathlib import Path

    from medscalpel.pipeline.catalog import TABLES, blocks, render

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text(
        encoding="utf-8")
    assert set(blocks(doc)) == set(TABLES)
    assert render(doc) == doc, ("docs/architecture.md is stale: run "
                                "'.venv/bin/python scripts/architecture_tables.py'")
