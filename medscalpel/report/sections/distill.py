"""The "Knowledge distillation" section: teacher and students on the same test split and the
student's acceptance verdict with its evidence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medscalpel.report import html as H
from medscalpel.report.html import Table, ci, num, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section
from medscalpel.report.sections.common import get
from medscalpel.report.verdict_view import outcome_cell, verdict_line, verdict_table


def _distill_acceptance(rel: str, tg: dict[str, Any], sec: Section) -> None:
    """The student's acceptance: one outcome and the evidence of each check (a verdict, never
    a point estimate; an older file without verdicts is labelled as such)."""
    if "outcome" not in tg:
        if "all_met" in tg:
            sec.fact("targets (older file: point estimates only, no verdict)",
                     text("point estimates within targets" if tg.get("all_met") is True else
                          "point estimates not within targets", cls="muted"))
        return
    sec.fact("student acceptance", outcome_cell(tg.get("outcome"), str(tg.get("reason") or "")))
    par = tg.get("param_ratio") if isinstance(tg.get("param_ratio"), dict) else {}
    sec.fact("parameters", outcome_cell(par.get("outcome"), str(par.get("reason") or "")))
    sp = tg.get("speed") if isinstance(tg.get("speed"), dict) else {}
    sec.fact("speed (per-round ratios)", outcome_cell(sp.get("outcome"),
                                                     str(sp.get("reason") or "")))
    if isinstance(sp.get("ratios"), list) and sp["ratios"]:
        sec.fact("speedup per round", text(", ".join(H.fmt_num(r, 2) for r in sp["ratios"])))
    au = tg.get("auroc") if isinstance(tg.get("auroc"), dict) else None
    if au is not None:
        sec.fact("AUROC non-inferiority", outcome_cell(au.get("outcome")))
        sec.notes.append(f"Distilled student, AUROC verdict: {verdict_line(au)}")
        vt = verdict_table(rel, au, ("targets", "auroc"), "distill_auroc_verdict",
                           "Distilled student vs teacher: AUROC non-inferiority per class and "
                           "macro (paired, same test images)")
        if vt is not None:
            sec.tables.append(vt)


@register_section
class DistillSection(ReportSection):
    """Knowledge distillation."""

    key = "distill"
    title = "Knowledge distillation"
    renders = ("distill",)
    order = 140

    def render(self, run: RunFiles, sec: Section) -> None:
        rel, d = self.doc(run, "distill", sec)
        if not isinstance(d, dict):
            return
        sec.present = True
        t = Table(["model", "architecture", "parameters", "params ratio", "MACs", "latency (ms)",
                   "speedup", "macro AUROC", "95% CI", "macro AP"], key="distill",
                  title="Teacher and students (same test split)")
        teacher = d.get("teacher") if isinstance(d.get("teacher"), dict) else None

        def add(name: str, m: dict[str, Any], *path: Any) -> None:
            p = lambda *k: pointer(rel, *path, *k)  # noqa: E731
            t.add(text(name), text(m.get("arch")), num(m.get("parameters"), p("parameters"), 0,
                                                       "int"),
                  num(m.get("param_ratio", 1.0 if name == "teacher" else None), p("param_ratio"))
                  if "param_ratio" in m else (num(1.0) if name == "teacher" else text(None)),
                  num(m.get("macs"), p("macs"), 0, "int"),
                  num(m.get("latency_ms"), p("latency_ms"), 2),
                  num(m.get("speedup"), p("speedup"), 2, "ratio") if "speedup" in m
                  else (num(1.0, "", 2, "ratio") if name == "teacher" else text(None)),
                  num(get(m, "metrics", "auroc"), p("metrics", "auroc"), 4),
                  ci(get(m, "metrics", "auroc_ci"), p("metrics", "auroc_ci")),
                  num(get(m, "metrics", "ap"), p("metrics", "ap"), 4))

        if teacher:
            add("teacher", teacher, "teacher")
        students = d.get("students") if isinstance(d.get("students"), dict) else {}
        for name, m in students.items():
            if isinstance(m, dict):
                add(f"student ({name})", m, "students", name)
        sec.tables.append(t)
        tg = d.get("targets") if isinstance(d.get("targets"), dict) else {}
        for key, label in (("max_param_ratio", "target params ratio \u2264"),
                           ("min_speedup", "target speedup \u2265"),
                           ("max_auroc_drop", "target AUROC drop \u2264")):
            if H.is_number(tg.get(key)):
                sec.fact(label, num(tg[key], pointer(rel, "targets", key), 2))
        _distill_acceptance(rel, tg, sec)
        dist = get(d, "students", "distilled")
        if isinstance(dist, dict) and H.is_number(dist.get("auroc_drop")):
            sec.fact("AUROC drop (distilled, point estimate)", num(dist["auroc_drop"],
                                                   pointer(rel, "students", "distilled",
                                                           "auroc_drop"),
                                                   4, "signed"))
        sal = d.get("saliency")
        if isinstance(sal, dict) and sal:
            st = Table(["student", "measure", "value"], key="saliency",
                       title="Teacher-student saliency agreement")
            for name, block in sal.items():
                if isinstance(block, dict):
                    for k, v in block.items():
                        if H.is_number(v) and not isinstance(v, bool):
                            st.add(text(name), text(k), num(v, pointer(rel, "saliency", name, k)))
                        elif isinstance(v, str):
                            st.add(text(name), text(k), text(v))
            if st.rows:
                sec.tables.append(st)
        for png in run.pngs("distill"):
            fig = self.figure(run, png, sec, Path(png).stem.replace("_", " "))
            if fig:
                sec.figures.append(fig)
