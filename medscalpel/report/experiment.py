"""The experiment report: one self-contained HTML page from a demo run directory.

The page opens with a headline (:mod:`medscalpel.report.headline`: what was compressed, how
much faster, what it cost internally and externally, what it forgot, what is undecided or not
measured), then one section per registered section class, in page order
(:mod:`medscalpel.report.sections`: one module per section, each declaring the artifacts it
renders; the types they fill, :class:`~medscalpel.report.page.Section` and
:class:`~medscalpel.report.page.RunFiles`, live in :mod:`medscalpel.report.page`). This module
only drives them. A folder holding no artifact any section renders is refused
(:class:`DataError`, nothing written).

Every file is optional. A section whose files are absent says "not run in this profile"; a
file that cannot be read or has an unexpected shape shows a note instead of breaking the page
(the section base does this). Numbers are formatted from the JSON values by
:mod:`medscalpel.report.html`, and every number cell names its source
(``data-src="baseline/metrics.json#/classes/0/auroc"``), so a test can check that the page says
what the files say. Figures that exist as PNG are embedded as they are; the Pareto plot, the
per-class AUROC forest plot (and the forgettability curves when the audit wrote none) are drawn
from the JSON.

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
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medscalpel import __version__
from medscalpel.data.dicom import identifiers_kept
from medscalpel.errors import DataError
from medscalpel.layout import ARTIFACTS, artifact
from medscalpel.report import html as H
from medscalpel.report.headline import build_headline
from medscalpel.report.page import Link, ReportOptions, RunFiles, Section, pointer, resolve_pointer
from medscalpel.report.sections import page_sections
from medscalpel.runs import final_path

SCHEMA = 1
DEFAULT_NAME = artifact("experiment_page").filename


# ----------------------------------------------------------------------------- the page
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

    found = []
    for i, man in enumerate(sorted(root.rglob(artifact("manifest").filename))):
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
    options = ReportOptions(clinical_examples=clinical_examples)
    root = Path(run_dir)
    if not root.is_dir():
        raise DataError(f"Run directory not found: {root}. Pass the --out directory of "
                        "'medscalpel demo' (or of a run with the same layout).")
    out = Path(out_html) if out_html is not None else root / DEFAULT_NAME
    run = RunFiles(root, out)
    sections = [cls(options).build(run) for cls in page_sections()]
    if not any(s.present for s in sections):
        raise DataError(_no_artifacts_message(root))
    headline = build_headline(run)
    demo = {}
    demo_path = artifact("demo").path_in(root)
    if demo_path.is_file():
        try:
            demo = json.loads(demo_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            demo = {}
    profile = str(demo.get("profile", "unknown")) if isinstance(demo, dict) else "unknown"
    created = time.strftime("%Y-%m-%d %H:%M:%S")
    kept = identifiers_kept_in(root)
    html = H.render("experiment.html.j2", title=title, run_dir=str(final_path(root)),
                    profile=profile, headline=headline, identifiers_kept=kept,
                    created=created, sections=sections, version=__version__)
    H.write_html(out, html)
    return ExperimentReport(str(root), str(out), sections, profile, created, headline)


__all__ = ["DEFAULT_NAME", "ExperimentReport", "Link", "RunFiles", "Section", "experiment_report",
           "identifiers_kept_in", "pointer", "resolve_pointer"]
