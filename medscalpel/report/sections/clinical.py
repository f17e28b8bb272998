"""The "Example clinical reports" section: the first few per-image clinical reports of the
run (the number is the report option ``clinical_examples``) and links to all of them.
"""

from __future__ import annotations

from pathlib import Path

from medscalpel.layout import artifact
from medscalpel.report import html as H
from medscalpel.report.html import Table, num, text
from medscalpel.report.page import Link, RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section

#: the index of the clinical reports (declared in medscalpel/layout.py): its folder holds them
_INDEX = artifact("clinical_index")


@register_section
class ClinicalSection(ReportSection):
    """Example clinical reports."""

    key = "clinical"
    title = "Example clinical reports"
    renders = ("reports/clinical/*.json",)
    order = 150

    def render(self, run: RunFiles, sec: Section) -> None:
        max_examples = self.options.clinical_examples
        base = _INDEX.path.rsplit("/", 1)[0]
        d = run.path(base)
        if not d.is_dir():
            return
        reports = []
        for p in sorted(d.glob("*.json")):
            if p.name == _INDEX.filename:
                continue
            rel = f"{base}/{p.name}"
            doc = self.json(run, rel, sec)
            if isinstance(doc, dict) and doc.get("kind") == "clinical_report":
                reports.append((rel, doc))
        if not reports and not (d / "index.html").is_file():
            return
        sec.present = True
        sec.fact("reports", text(str(len(reports))))
        disclaimer = next((doc.get("disclaimer") for _, doc in reports if doc.get("disclaimer")),
                          H.DECISION_SUPPORT)
        sec.intro = disclaimer
        t = Table(["image", "finding", "probability", "threshold", "location",
                   "conflicts / hidden"], key="clinical",
                  title=f"Example reports (first {min(max_examples, len(reports))})")
        if any((doc.get("operating") or {}).get("notice") for _, doc in reports):
            sec.fact("thresholds", text("not calibrated (default 0.5)", cls="bad"))
        for rel, doc in reports[:max_examples]:
            fs = doc.get("findings") or []
            excl = "; ".join(f"hidden: {e.get('class')} (vs {e.get('excluded_by')}, lift "
                             f"{H.fmt_num(e.get('lift'), 3)})" for e in doc.get("excluded") or []
                             if isinstance(e, dict))
            if not fs:
                t.add(text(doc.get("id")), text("none above threshold", cls="muted"), text(""),
                      text(""), text(""), text(excl or "-"))
            for j, f in enumerate(fs):
                if isinstance(f, dict):
                    p = lambda k: pointer(rel, "findings", j, k)  # noqa: E731
                    flags = ", ".join("conflict: " + str(c.get("with")) for c in
                                      f.get("conflicts") or [] if isinstance(c, dict))
                    t.add(text(doc.get("id")), text(f.get("class")),
                          num(f.get("probability"), p("probability")),
                          num(f.get("threshold"), p("threshold")), text(f.get("location")),
                          text("; ".join(x for x in (flags, excl) if x) or "-"))
            html_name = doc.get("html") or f"{Path(rel).stem}.html"
            if run.exists(f"{base}/{html_name}"):
                sec.links.append(Link(run.href(f"{base}/{html_name}"), str(doc.get("id")),
                                      f"{len(fs)} finding(s)"))
        sec.tables.append(t)
        sec.links_title = "Full reports (files in the run directory)"
        if (d / "index.html").is_file():
            sec.links.insert(0, Link(run.href(f"{base}/index.html"),
                                     "index of all clinical reports"))
