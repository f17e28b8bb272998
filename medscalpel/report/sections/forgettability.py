"""The "Forgettability curves" section: which classes a sweep forgets first, their relation
to prevalence, and the audit's figures (drawn from the JSON when it wrote none).
"""

from __future__ import annotations

from pathlib import Path

from medscalpel.report import html as H
from medscalpel.report.figures import forgettability_figure
from medscalpel.report.html import Table, ci, num, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section
from medscalpel.report.sections.common import drawn, short_list


@register_section
class ForgettabilitySection(ReportSection):
    """Forgettability curves."""

    key = "forgettability"
    title = "Forgettability curves"
    renders = ("forgettability",)
    order = 80

    def render(self, run: RunFiles, sec: Section) -> None:
        base = "audit/forgettability"
        rel, d = self.doc(run, "forgettability", sec)
        pngs = run.pngs(base, ("audit_curves.png", "audit_curves_overview.png",
                               "audit_scatter.png", "audit_fcd_heatmap.png",
                               "audit_fcd_scatter.png"))
        if not isinstance(d, dict) and not pngs:
            return
        sec.present = True
        if isinstance(d, dict):
            sec.fact("method", text(d.get("method")))
            sec.fact(d.get("level_name") or "levels", text(short_list(d.get("levels"))))
            sec.fact("seeds", text(str(len(d.get("seeds") or []))))
            sec.fact("drop threshold", num(d.get("drop_threshold"), pointer(rel, "drop_threshold"),
                                           2))
            sec.fact("images", num(d.get("n_images"), pointer(rel, "n_images"), 0, "int"))
            order = d.get("forgotten_first_to_last")
            if isinstance(order, list):
                sec.fact("forgotten first", text(", ".join(str(o) for o in order[:3])))
            t = Table(["class", "prevalence", "positives (eval)", "AP (dense)", "first drop at",
                       "relative \u0394AP at max", "\u0394AP at max"], key="forgettability",
                      title="Forgettability per class")
            for i, r in enumerate(d.get("table") or []):
                if not isinstance(r, dict):
                    continue
                p = lambda k: pointer(rel, "table", i, k)  # noqa: E731
                fd = r.get("first_drop")
                t.add(text(r.get("class")), num(r.get("prevalence"), p("prevalence"), 4),
                      num(r.get("n_pos_eval"), p("n_pos_eval"), 0, "int"),
                      num(r.get("ap_ref_median"), p("ap_ref_median")),
                      num(fd, p("first_drop"), 2) if H.is_number(fd) else text("never", cls="good"),
                      num(r.get("delta_at_max"), p("delta_at_max"), 3, "signed"),
                      num(r.get("abs_delta_ap_at_max"), p("abs_delta_ap_at_max"), 3, "signed"))
            sec.tables.append(t)
            corr = d.get("correlations")
            if isinstance(corr, dict) and corr:
                ct = Table(["relation", "n", "Spearman \u03c1", "95% CI", "p", "Pearson r"],
                           key="correlations", title="Forgettability vs prevalence")
                for k, c in corr.items():
                    if not isinstance(c, dict):
                        continue
                    p = lambda f: pointer(rel, "correlations", k, f)  # noqa: E731
                    ct.add(text(k.replace("_", " ")), num(c.get("n"), p("n"), 0, "int"),
                           num(c.get("spearman_rho"), p("spearman_rho")),
                           ci(c.get("spearman_ci"), p("spearman_ci")),
                           num(c.get("spearman_p"), p("spearman_p"), 2, "sci"),
                           num(c.get("pearson_r"), p("pearson_r")))
                sec.tables.append(ct)
        for png in pngs:
            fig = self.figure(run, png, sec, Path(png).stem.replace("_", " "))
            if fig:
                sec.figures.append(fig)
        if not pngs and isinstance(d, dict):
            drawn(sec, lambda: forgettability_figure(d), "median relative change in AP per class",
                   rel)
