"""Report sections as registered classes (issue S): the registry is the page, every section
declares what it reads and lives in report/sections/KEY.py, the base turns unreadable files and
unexpected shapes into notes, and report/ has no import circle."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from medscalpel.errors import ConfigError
from medscalpel.layout import ARTIFACTS
from medscalpel.report.page import ReportOptions, RunFiles, Section
from medscalpel.report.sections import SECTIONS, ReportSection, page_sections, register_section
from medscalpel.report.sections.clinical import ClinicalSection

REPO = Path(__file__).resolve().parents[1]
PAGE = ["overview", "dataset", "baseline", "calibration", "site_shift", "compression",
        "deployment", "forgettability", "changes", "pies", "cams", "polarity", "repair",
        "distill", "clinical"]


def test_registry_is_the_page_and_one_naming_scheme():
    classes = page_sections()
    assert [c.key for c in classes] == PAGE and len(SECTIONS) == len(PAGE)
    for c in classes:
        assert c.__module__ == f"medscalpel.report.sections.{c.key}", c
        assert SECTIONS.get(c.key) is c and SECTIONS.describe()[c.key] == c.title
        assert c.renders and all(k in ARTIFACTS or "/" in k for k in c.renders)
        assert all(k in ARTIFACTS for k in c.also_reads)
    orders = [c.order for c in classes]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)
    # no module of the old naming schemes is left
    folder = REPO / "medscalpel" / "report"
    assert not [p.name for p in folder.glob("*section*.py")]


def test_register_section_refuses_bad_declarations():
    class NoTitle(ReportSection):
        key = "_t1"
        renders = ("demo",)
        order = 999

    class Unknown(ReportSection):
        key, title, order = "_t2", "t", 998
        renders = ("no_such_artifact",)

    class SamePlace(ReportSection):
        key, title, order = "_t3", "t", 10  # overview's place
        renders = ("demo",)

    with pytest.raises(ConfigError, match="needs a key and a title"):
        register_section(NoTitle)
    with pytest.raises(ConfigError, match=r"unknown artifacts \['no_such_artifact'\]"):
        register_section(Unknown)
    with pytest.raises(ConfigError, match="order 10, already taken by 'overview'"):
        register_section(SamePlace)
    with pytest.raises(ConfigError, match="registered twice"):
        register_section(SECTIONS.get("overview"))
    assert [c.key for c in page_sections()] == PAGE


class _Probe(ReportSection):
    """Not registered: a section that reads what it is told to."""

    key, title, order = "probe", "Probe", 0
    renders = ("demo",)

    def __init__(self, reads: str, fail: Exception | None = None):
        super().__init__()
        self.reads, self.fail = reads, fail

    def render(self, run: RunFiles, sec: Section) -> None:
        rel, d = self.doc(run, self.reads, sec)
        if d is None:
            return
        sec.present = True
        sec.fact("profile", d["profile"])
        if self.fail is not None:
            raise self.fail


def _run(tmp_path: Path, demo: str | None) -> RunFiles:
    root = tmp_path / "run"
    root.mkdir(parents=True)
    if demo is not None:
        (root / "demo.json").write_text(demo, encoding="utf-8")
    return RunFiles(root, root / "report.html")


def test_base_reads_declared_artifacts_and_labels_bad_files(tmp_path):
    good = json.dumps({"profile": "micro", "settings": {}, "seconds": 1.0, "stages": []})
    sec = _Probe("demo").build(_run(tmp_path / "a", good))
    assert sec.present and sec.sources == ["demo.json"] and sec.expected == ["demo.json"]
    assert dict(sec.facts)["profile"].text == "micro" and not sec.badge
    # absent: not present, nothing noted
    sec = _Probe("demo").build(_run(tmp_path / "b", None))
    assert not sec.present and not sec.notes and not sec.sources
    # not JSON / missing a declared key: 'unreadable file', the page still renders
    for i, bad in enumerate(["{broken", json.dumps({"profile": "micro"})]):
        sec = _Probe("demo").build(_run(tmp_path / f"c{i}", bad))
        assert sec.present and sec.badge == "unreadable file" and sec.badge_cls == "bad"
        assert "could not be read as its declared artifact 'demo'" in sec.notes[0]
    # an unexpected shape inside render: 'incomplete', with the error named
    sec = _Probe("demo", KeyError("rows")).build(_run(tmp_path / "d", good))
    assert sec.badge == "incomplete" and "KeyError: 'rows'" in sec.notes[0]
    # reading an artifact the section did not declare is a programming error, never a page
    with pytest.raises(ConfigError, match="reads artifact 'manifest' without declaring it"):
        _Probe("manifest").build(_run(tmp_path / "e", good))


def test_options_reach_the_clinical_section(tmp_path):
    base = tmp_path / "run" / "reports" / "clinical"
    base.mkdir(parents=True)
    for i in range(3):
        (base / f"img{i}.json").write_text(json.dumps(
            {"kind": "clinical_report", "id": f"img{i}", "findings": []}), encoding="utf-8")
    run = RunFiles(tmp_path / "run", tmp_path / "run" / "report.html")
    for n in (0, 2, 5):
        sec = ClinicalSection(ReportOptions(clinical_examples=n)).build(run)
        assert sec.present and len(sec.tables[0].rows) == min(n, 3)
        assert sec.tables[0].title == f"Example reports (first {min(n, 3)})"
    with pytest.raises(ConfigError, match="clinical_examples"):
        ReportOptions(clinical_examples=-1)


def _module_imports(path: Path, package: str) -> set[str]:
    """Module-level imports of ``path`` that point into ``package``."""
    out = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(package))
    return out


def test_report_package_has_no_import_circle():
    root = REPO / "medscalpel" / "report"
    mods = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    graph = {m: {d for d in _module_imports(p, "medscalpel.report") if d in mods and d != m}
             for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, f"import circle: {' -> '.join([*path, m, d])}"
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [])
    assert "medscalpel.report.sections" in graph["medscalpel.report.experiment"]
    assert not any(d.startswith("medscalpel.report.experiment") for m, ds in graph.items()
                   for d in ds if m != "medscalpel.report.experiment")
