"""The experiment report: one self-contained HTML page from a demo run directory.

The page opens with a headline (:mod:`medscalpel.report.headline`: what was compressed, how
much faster, what it cost internally and externally, what it forgot, what is undecided or not
measured), then one section per stage. A folder holding no artifact any section renders is
refused (:class:`DataError`, nothing written).

Each section reads its own JSON / PNG files from the run directory (layout below; every file is
optional). A section whose files are absent says "not run in this profile"; a file that cannot
be read or has an unexpected shape shows a note instead of breaking the page. Numbers are
formatted from the JSON values by :mod:`medscalpel.report.html`, and every number cell names
its source (``data-src="baseline/metrics.json#/classes/0/auroc"``), so a test can check that the
page says what the files say. Figures that exist as PNG are embedded as they are; the Pareto
plot, the per-class AUROC forest plot (and the forgettability curves when the audit wrote none)
are drawn here from the JSON.

Run-directory layout::

    demo.json                           profile, stages (name, seconds, status), phantom
    data/stats/stats.json, *.png        label statistics of the training split
    baseline/metrics.json               EvalResult.to_dict() of the test split
    baseline/model/model.json           the model card
    calibrate/calibration.json          CalibrationResult.to_dict()
    compress/compress.json              {"dense": {...}, "rows": [{...}, ...]}
    audit/forgettability/forgettability.json + *.png
    audit/pies/pies.json + pie_gallery.png (+ other PNGs, pie_ground_truth.json)
    explain/cams/*.png (+ *.json zone reports), explain/polarity/polarity.json + *.png
    repair/surgery/surgery.json, repair/triage/decision_log.json (+ .md)
    distill/distill.json
    reports/clinical/index.json + per-image *.html / *.json

Example:
    >>> rep = experiment_report("runs/demo")  # doctest: +SKIP
    >>> [s.key for s in rep.sections if not s.present]  # doctest: +SKIP
    ['distill']
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medscalpel.errors import DataError
from medscalpel.layout import ARTIFACTS, artifact, read_artifact
from medscalpel.report import html as H
from medscalpel.report.html import Cell, Figure, Table, text

logger = logging.getLogger(__name__)

SCHEMA = 1
DEFAULT_NAME = "report.html"


# ----------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Link:
    href: str
    text: str
    note: str = ""


@dataclass
class Section:
    """One section of the page (what the template renders)."""

    key: str
    title: str
    expected: list[str] = field(default_factory=list)
    present: bool = False
    sources: list[str] = field(default_factory=list)
    intro: str = ""
    facts: list[tuple[str, Cell]] = field(default_factory=list)
    tables_before: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    links_title: str = "Files"
    notes: list[str] = field(default_factory=list)
    badge: str = ""
    badge_cls: str = ""
    grid: bool = True

    def fact(self, label: str, cell: Cell | Any) -> None:
        self.facts.append((label, cell if isinstance(cell, Cell) else text(cell)))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "present": self.present,
                "sources": list(self.sources), "expected": list(self.expected),
                "n_tables": len(self.tables) + len(self.tables_before),
                "n_figures": len(self.figures), "notes": list(self.notes)}


@dataclass
class ExperimentReport:
    """The written page and what each section found."""

    run_dir: str
    html_path: str | None
    sections: list[Section]
    profile: str
    created: str
    headline: Any = None

    def section(self, key: str) -> Section:
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(f"No section {key!r}; sections: {[s.key for s in self.sections]}.")

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "kind": "experiment_report", "run_dir": self.run_dir,
                "html": self.html_path, "profile": self.profile, "created": self.created,
                "sections": [s.to_dict() for s in self.sections],
                "present": [s.key for s in self.sections if s.present],
                "not_run": [s.key for s in self.sections if not s.present],
                "headline": self.headline.to_dict() if self.headline is not None else None}


# ----------------------------------------------------------------------------- reading
def pointer(rel: str, *keys: Any) -> str:
    """``rel#/k1/k2`` (RFC 6901: ``~`` -> ``~0``, ``/`` -> ``~1``)."""
    toks = [str(k).replace("~", "~0").replace("/", "~1") for k in keys]
    return f"{rel}#/" + "/".join(toks)


def resolve_pointer(doc: Any, ptr: str) -> Any:
    """The value at a JSON pointer (the part after ``#``)."""
    ptr = ptr.split("#", 1)[-1]
    cur = doc
    for tok in [t for t in ptr.split("/")[1:]] if ptr else []:
        tok = tok.replace("~1", "/").replace("~0", "~")
        cur = cur[int(tok)] if isinstance(cur, list) else cur[tok]
    return cur


class RunFiles:
    """Reads files of a run directory, remembering which ones each section used."""

    def __init__(self, root: Path, out_html: Path):
        self.root = root
        self.out_dir = out_html.parent

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def json(self, rel: str, sec: Section) -> Any:
        p = self.path(rel)
        if not p.is_file():
            return None
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            sec.notes.append(f"{rel} could not be read: {exc}")
            sec.present = True
            sec.badge, sec.badge_cls = "unreadable file", "bad"
            return None
        sec.sources.append(rel)
        return doc

    def artifact(self, key: str, sec: Section, **fmt: Any) -> Any:
        """A declared artifact (:mod:`medscalpel.layout`): its typed object or checked dict;
        ``None`` when absent. A file that does not match its declaration becomes a note and an
        'unreadable file' badge on the page (and fails the report test)."""
        rel = artifact(key).locate(self.root, **fmt)
        if rel is None:
            return None
        try:
            obj = read_artifact(self.root, key, **fmt)
        except (DataError, OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError,
                TypeError, ValueError) as exc:
            sec.notes.append(f"{rel} could not be read as its declared artifact '{key}': "
                             f"{type(exc).__name__}: {exc}")
            sec.present = True
            sec.badge, sec.badge_cls = "unreadable file", "bad"
            return None
        sec.sources.append(rel)
        return obj

    def doc(self, key: str, sec: Section, **fmt: Any) -> tuple[str, dict[str, Any] | None]:
        """``(relative path, JSON dict)`` of a declared artifact, validated by its type or its
        declared keys first; the dict is what number cells point into."""
        obj = self.artifact(key, sec, **fmt)
        d = obj.to_dict() if hasattr(obj, "to_dict") else obj
        rel = artifact(key).locate(self.root, **fmt) or artifact(key).relpath(**fmt)
        return rel, d if isinstance(d, dict) else None

    def figure(self, rel: str, sec: Section, caption: str = "") -> Figure | None:
        p = self.path(rel)
        if not p.is_file():
            return None
        try:
            uri = H.png_data_uri(p)
        except DataError as exc:
            sec.notes.append(str(exc))
            return None
        sec.sources.append(rel)
        return Figure(uri, caption, rel)

    def pngs(self, rel_dir: str, first: tuple[str, ...] = ()) -> list[str]:
        d = self.path(rel_dir)
        if not d.is_dir():
            return []
        names = sorted(p.name for p in d.glob("*.png") if p.is_file())
        ordered = [n for n in first if n in names] + [n for n in names if n not in first]
        return [f"{rel_dir}/{n}" for n in ordered]

    def href(self, rel: str) -> str:
        return Path(os.path.relpath(self.path(rel), self.out_dir)).as_posix()


def expected_files(expected: list[str]) -> list[str]:
    """A section's expected inputs: artifact keys of :data:`medscalpel.layout.ARTIFACTS`
    (their declared paths) or literal glob patterns."""
    return [ARTIFACTS[e].path if e in ARTIFACTS else e for e in expected]


def _no_artifacts_message(root: Path) -> str:
    """Why a folder gets no report: it holds no artifact any section renders."""
    looked = ", ".join(ARTIFACTS[k].path for k in ("demo", "baseline_metrics", "compress",
                                                   "deploy", "changes", "site_shift"))
    msg = (f"No medscalpel artifacts in {root}: none of the files the experiment report renders "
           f"is there (looked for {looked}, ... as declared in medscalpel/layout.py). ")
    man = root / ARTIFACTS["manifest"].path
    command = None
    if man.is_file():
        try:
            command = json.loads(man.read_text(encoding="utf-8")).get("command")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            command = None
    if command:
        return msg + (f"It is the run directory of '{command}', whose results the report does "
                      f"not render: 'medscalpel show {root}' prints them.")
    return msg + ("Pass the --out directory of 'medscalpel demo' or of a single command "
                  "(train, evaluate, compress deploy, audit changes, ...).")


def identifiers_kept_in(root: Path, limit: int = 500) -> list[str]:
    """The runs under ``root`` whose manifest shows the user opted in to identifiers (a
    ``dicom:`` spec with ``keep_identifiers=true`` or ``--keep-identifiers``): the report marks
    them at its top."""
    from medscalpel.data.dicom import identifiers_kept

    found = []
    for i, man in enumerate(sorted(root.rglob("manifest.json"))):
        if i >= limit:
            break
        try:
            doc = json.loads(man.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        cfg = doc.get("config") if isinstance(doc, dict) else None
        values = list(cfg.values()) if isinstance(cfg, dict) else []
        values += list((doc.get("data") or {}).values()) if isinstance(doc.get("data"), dict) else []
        if (isinstance(cfg, dict) and cfg.get("keep_identifiers") is True) or any(
                isinstance(v, str) and identifiers_kept(v) for v in values):
            found.append(str(man.parent.relative_to(root)) or ".")
    return found


def experiment_report(run_dir: str | os.PathLike, out_html: str | os.PathLike | None = None,
                      clinical_examples: int = 5,
                      title: str = "medscalpel experiment report") -> ExperimentReport:
    """Write the experiment report of a run directory as one self-contained HTML page.

    Args:
        run_dir: a demo run directory (layout in the module docstring; every file optional).
        out_html: the page to write (default ``RUN_DIR/report.html``).
        clinical_examples: clinical reports summarised in the page.
        title: the page title.

    Returns:
        An :class:`ExperimentReport` (which sections were found, from which files).

    Raises:
        DataError: ``run_dir`` is not a directory, or holds no artifact any section renders
            (nothing is written then).
    """
    from medscalpel import __version__
    from medscalpel.validation import check_range

    check_range(clinical_examples, "clinical_examples", "experiment_report", 0, integer=True)
    root = Path(run_dir)
    if not root.is_dir():
        raise DataError(f"Run directory not found: {root}. Pass the --out directory of "
                        "'medscalpel demo' (or of a run with the same layout).")
    out = Path(out_html) if out_html is not None else root / DEFAULT_NAME
    run = RunFiles(root, out)
    sections = []
    from medscalpel.report.sections import SECTIONS

    for key, sec_title, expected, build in SECTIONS:
        sec = Section(key, sec_title, expected=expected_files(expected))
        try:
            if key == "clinical":
                build(run, sec, clinical_examples)
            else:
                build(run, sec)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            logger.warning("section %s: %s", key, exc)
            sec.present = True
            sec.notes.append(f"This section could not be rendered completely from its files "
                             f"({type(exc).__name__}: {exc}); check that they were written by "
                             "this medscalpel version.")
            sec.badge, sec.badge_cls = "incomplete", "bad"
        sections.append(sec)
    if not any(s.present for s in sections):
        raise DataError(_no_artifacts_message(root))
    from medscalpel.report.headline import build_headline  # it reads through RunFiles

    headline = build_headline(run)
    demo = {}
    if (root / "demo.json").is_file():
        try:
            demo = json.loads((root / "demo.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            demo = {}
    profile = str(demo.get("profile", "unknown")) if isinstance(demo, dict) else "unknown"
    created = time.strftime("%Y-%m-%d %H:%M:%S")
    from medscalpel.runs import final_path

    kept = identifiers_kept_in(root)
    html = H.render("experiment.html.j2", title=title, run_dir=str(final_path(root)),
                    profile=profile, headline=headline, identifiers_kept=kept,
                    created=created, sections=sections, version=__version__)
    H.write_html(out, html)
    return ExperimentReport(str(root), str(out), sections, profile, created, headline)
