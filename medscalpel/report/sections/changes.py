"""The "What compression changed" section of the experiment report.

Reads the typed :class:`~medscalpel.audit.changes.ChangesAudit` from
``audit/changes/changes.json`` in the run directory (written by ``medscalpel audit changes`` or
the demo) and shows, per compressed model: the headline per measure, calibration per class (ECE
of both models, the paired delta with its CI, sensitivity / specificity change at the dense
model's thresholds, the re-calibration verdict), the subgroup contrasts, robustness per
corruption and explanation similarity / faithfulness, with the figures written beside the JSON.
Every number cell carries its JSON pointer.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from medscalpel.audit.changes import ChangesAudit
from medscalpel.errors import DataError
from medscalpel.layout import ARTIFACTS
from medscalpel.report.html import Table, ci, num, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section

REL = ARTIFACTS["changes"].path                  # audit/changes/changes.json
REL_DIR = str(PurePosixPath(REL).parent)


@register_section
class ChangesSection(ReportSection):
    """What compression changed."""

    key = "changes"
    title = "What compression changed"
    renders = ("changes",)
    order = 90

    def render(self, run: RunFiles, sec: Section) -> None:
        """Fill ``sec`` from ``audit/changes/changes.json``; leaves it absent when the file is not
        there."""
        d = self.json(run, REL, sec)
        if d is None:
            return
        sec.present = True
        try:
            audit = ChangesAudit.from_dict(d)
        except (KeyError, TypeError, ValueError, DataError) as exc:
            self.unreadable(sec, f"{REL} is not a changes audit this version can read: {exc}")
            return
        sec.intro = (f"What compression changed beyond accuracy, on {audit.n} images of "
                     f"{audit.data.get('spec', '?')} / {audit.data.get('split', '?')} "
                     f"({audit.n_boot} paired bootstrap replicates per CI).")
        sec.fact("images audited", num(audit.n, pointer(REL, "n"), 0, "int"))
        sec.fact("measures", ", ".join(audit.measures))
        any_flag = False
        for i, p in enumerate(audit.pairs):
            base = ("pairs", i)
            for line in p.headline():
                sec.fact(f"{p.name}: {line.split(':', 1)[0]}", line.split(":", 1)[1].strip())
            if p.calibration is not None:
                any_flag |= p.calibration.recommend_recalibration
                sec.tables.append(_calibration(p, base))
            if p.subgroups is not None:
                any_flag |= bool(p.subgroups.flagged())
                sec.tables.append(_subgroups(p, base))
                sec.notes.append(f"{p.name}: {p.subgroups.note}")
                sec.notes += [f"{p.name}: skipped {s}" for s in p.subgroups.skipped]
            if p.robustness is not None:
                any_flag |= bool(p.robustness.less_robust())
                sec.tables.append(_robustness(p, base))
            if p.explanation is not None:
                sec.tables.append(_explanation(p, base))
            for key, rel in sorted(p.figures.items()):
                fig = self.figure(run, f"{REL_DIR}/{rel}", sec, f"{p.name}: {key}")
                if fig:
                    sec.figures.append(fig)
        sec.badge, sec.badge_cls = (("changes found", "bad") if any_flag
                                    else ("no significant change", "good"))


def _calibration(p: Any, base: tuple[Any, ...]) -> Table:
    t = Table(["class", "ECE dense", "ECE compressed", "ΔECE", "ΔECE 95% CI", "ΔSens @thr",
               "ΔSens CI", "ΔSpec @thr", "ΔSpec CI", "recalibrate"], key="changes_calibration",
              title=f"{p.name}: calibration (thresholds: {p.calibration.threshold_source})")
    for j, c in enumerate(p.calibration.classes):
        src = lambda k: pointer(REL, *base, "calibration", "classes", j, k)  # noqa: E731
        t.add(text(c.name), num(c.ece_ref, src("ece_ref")), num(c.ece_new, src("ece_new")),
              num(c.delta_ece, src("delta_ece")), ci(c.delta_ece_ci, src("delta_ece_ci")),
              num(c.delta_sens, src("delta_sens")), ci(c.delta_sens_ci, src("delta_sens_ci")),
              num(c.delta_spec, src("delta_spec")), ci(c.delta_spec_ci, src("delta_spec_ci")),
              text("yes" if c.recalibrate else "no", cls="bad" if c.recalibrate else "good"))
    return t


def _subgroups(p: Any, base: tuple[Any, ...]) -> Table:
    t = Table(["subgroup", "n", "ΔAUROC", "ΔAUROC 95% CI", "vs whole", "vs whole CI",
               "p (Holm)", "flag"], key="changes_subgroups",
              title=f"{p.name}: subgroups, macro ΔAUROC (whole: "
                    f"{p.subgroups.overall.get('delta_auroc', float('nan')):+.3f})")
    for j, r in enumerate(p.subgroups.rows):
        if r.cls != "macro":
            continue
        src = lambda k: pointer(REL, *base, "subgroups", "rows", j, k)  # noqa: E731
        t.add(text(f"{r.attribute}={r.level}"), num(r.n, src("n"), 0, "int"),
              num(r.delta_auroc, src("delta_auroc")), ci(r.delta_auroc_ci, src("delta_auroc_ci")),
              num(r.contrast, src("contrast")), ci(r.contrast_ci, src("contrast_ci")),
              num(r.contrast_p_holm, src("contrast_p_holm")),
              text("loses more" if r.flagged else "-", cls="bad" if r.flagged else ""))
    return t


def _robustness(p: Any, base: tuple[Any, ...]) -> Table:
    t = Table(["corruption", "severity", "AUROC dense", "AUROC compressed", "relative",
               "relative 95% CI", "less robust"], key="changes_robustness",
              title=f"{p.name}: robustness (macro; relative = drop compressed - drop dense)")
    for j, c in enumerate(p.robustness.cells):
        if c.cls != "macro":
            continue
        src = lambda k: pointer(REL, *base, "robustness", "cells", j, k)  # noqa: E731
        t.add(text(c.corruption), text(c.severity), num(c.auroc_ref, src("auroc_ref")),
              num(c.auroc_new, src("auroc_new")), num(c.relative, src("relative")),
              ci(c.relative_ci, src("relative_ci")),
              text("yes" if c.less_robust else "no", cls="bad" if c.less_robust else ""))
    return t


def _explanation(p: Any, base: tuple[Any, ...]) -> Table:
    e = p.explanation
    cols = ["class", "images scored", "Spearman", "Spearman CI", "top-k IoU",
            "pointing agreement"]
    if e.has_masks:
        cols += ["in-mask energy dense", "in-mask energy compressed", "Δ tube energy"]
    note = e.meta.get("cam_note")
    t = Table(cols, key="changes_explanation",
              title=f"{p.name}: Grad-CAM dense vs compressed ({e.n_similarity} images; empty "
                    "maps not scored)" + (f"; {note}" if note else ""))
    for name, c in e.classes.items():
        src = lambda *k: pointer(REL, *base, "explanation", "classes", name, *k)  # noqa: E731
        cells = [text(f'{c["spearman"]["n"]}/{e.n_similarity}'),
                 num(c["spearman"]["mean"], src("spearman", "mean")),
                 ci(c["spearman"]["ci"], src("spearman", "ci")),
                 num(c["iou"]["mean"], src("iou", "mean")),
                 num(c["pointing"]["mean"], src("pointing", "mean"))]
        if e.has_masks:
            cells += [num(c["mask_energy"]["ref"]["mean"], src("mask_energy", "ref", "mean")),
                      num(c["mask_energy"]["new"]["mean"], src("mask_energy", "new", "mean")),
                      num(c["tube_energy"]["delta"]["mean"], src("tube_energy", "delta", "mean"))]
        t.add(*cells)
    return t
