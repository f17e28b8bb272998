"""The "Dataset statistics" section: the label statistics of the training split
(prevalence, findings per image, pairs that never co-occur, their figures) and the phantom's
contact sheet.
"""

from __future__ import annotations

from typing import Any

from medscalpel.layout import ARTIFACTS
from medscalpel.report.html import Table, num, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section
from medscalpel.report.sections.common import get


@register_section
class DatasetSection(ReportSection):
    """Dataset statistics."""

    key = "dataset"
    title = "Dataset statistics"
    renders = ("label_stats", "data/stats/jaccard.png")
    also_reads = ("phantom_preview",)
    order = 20

    def render(self, run: RunFiles, sec: Section) -> None:
        rel, d = self.doc(run, "label_stats", sec)
        if isinstance(d, dict):
            self._label_stats(run, sec, rel, d)
        # the contact sheet of the images sits here, below the headline and the statistics
        preview = self.figure(run, ARTIFACTS["phantom_preview"].path, sec,
                              "phantom images (contact sheet)")
        if preview:
            sec.present = True
            sec.figures.append(preview)

    def _label_stats(self, run: RunFiles, sec: Section, rel: str, d: dict[str, Any]) -> None:
        sec.present = True
        names = d.get("class_names") or []
        sec.fact("images", num(d.get("n"), pointer(rel, "n"), 0, "int"))
        sec.fact("classes", text(str(len(names))))
        sec.fact("images with 3+ findings", num(d.get("n_ge3"), pointer(rel, "n_ge3"), 0, "int"))
        sec.fact("task", text(d.get("task")))
        sec.fact("split", text(d.get("split")))
        sec.fact("dataset", text(d.get("spec")))
        t = Table(["class", "positives", "known labels", "prevalence"], key="prevalence",
                  title="Prevalence")
        for i, n in enumerate(names):
            t.add(text(n), num(get(d, "counts", i), pointer(rel, "counts", i), 0, "int"),
                  num(get(d, "known", i), pointer(rel, "known", i), 0, "int"),
                  num(get(d, "prevalence", i), pointer(rel, "prevalence", i), 4))
        sec.tables.append(t)
        hist = d.get("findings_histogram")
        if isinstance(hist, list) and hist:
            t = Table(["findings per image", "images"], key="findings_histogram",
                      title="Findings per image")
            for m, v in enumerate(hist):
                t.add(text(str(m)), num(v, pointer(rel, "findings_histogram", m), 0, "int"))
            sec.tables.append(t)
        never = d.get("never_cooccur")
        if isinstance(never, list) and never:
            t = Table(["class A", "class B"], key="never_cooccur",
                      title=f"Pairs that never co-occur ({len(never)})")
            for p in never[:40]:
                if isinstance(p, (list, tuple)) and len(p) == 2:
                    t.add(text(p[0]), text(p[1]))
            if len(never) > 40:
                t.caption = f"first 40 of {len(never)}"
            sec.tables.append(t)
        for png, cap in (("jaccard.png", "Jaccard index of label pairs"),
                         ("cooccurrence.png", "co-occurrence counts")):
            fig = self.figure(run, f"data/stats/{png}", sec, cap)
            if fig:
                sec.figures.append(fig)
