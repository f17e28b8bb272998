"""The "Threshold calibration" section: the calibrated thresholds and their held-out
evaluation against the default 0.5.
"""

from __future__ import annotations

from medscalpel.report import html as H
from medscalpel.report.html import Table, num, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section
from medscalpel.report.sections.common import get


@register_section
class CalibrationSection(ReportSection):
    """Threshold calibration."""

    key = "calibration"
    title = "Threshold calibration"
    renders = ("calibration",)
    order = 40

    def render(self, run: RunFiles, sec: Section) -> None:
        rel, d = self.doc(run, "calibration", sec)
        if not isinstance(d, dict):
            return
        sec.present = True
        cal = d.get("calibrator") or {}
        ev = d.get("evaluation") or {}
        sec.fact("method", text(get(cal, "params", "method")))
        sec.fact("fitted on", text(d.get("fit_split")))
        sec.fact("evaluated on", text(ev.get("split")))
        m = ev.get("macro") or {}
        for key, label in (("f1", "macro F1"), ("recall", "macro recall")):
            sec.fact(f"{label} at 0.5", num(get(m, "default", key), pointer(
                rel, "evaluation", "macro", "default", key)))
            sec.fact(f"{label} calibrated", num(get(m, "calibrated", key), pointer(
                rel, "evaluation", "macro", "calibrated", key)))
            if H.is_number(get(m, "ratio", key)):
                sec.fact(f"{label} ratio", num(get(m, "ratio", key),
                                               pointer(rel, "evaluation", "macro", "ratio", key), 2,
                                               "ratio"))
        rows = ev.get("classes")
        if isinstance(rows, list) and rows:
            t = Table(["class", "threshold", "F1 @0.5", "F1", "recall @0.5", "recall",
                       "precision @0.5", "precision"], key="calibration",
                      title="Calibrated thresholds (held-out evaluation)")
            for i, r in enumerate(rows):
                p = lambda *k: pointer(rel, "evaluation", "classes", i, *k)  # noqa: E731
                t.add(text(r.get("class")), num(r.get("threshold"), p("threshold")),
                      num(get(r, "default", "f1"), p("default", "f1")),
                      num(get(r, "calibrated", "f1"), p("calibrated", "f1")),
                      num(get(r, "default", "recall"), p("default", "recall")),
                      num(get(r, "calibrated", "recall"), p("calibrated", "recall")),
                      num(get(r, "default", "precision"), p("default", "precision")),
                      num(get(r, "calibrated", "precision"), p("calibrated", "precision")))
            sec.tables.append(t)
        elif isinstance(cal.get("thresholds"), list):
            t = Table(["class", "threshold"], key="calibration", title="Calibrated thresholds")
            for i, thr in enumerate(cal["thresholds"]):
                t.add(text(get(cal, "class_names", i)),
                      num(thr, pointer(rel, "calibrator", "thresholds", i)))
            sec.tables.append(t)
