"""The "Baseline per-class metrics" section: the test-split metrics with bootstrap CIs, the
model card's facts and the per-class AUROC forest plot drawn from the JSON.
"""

from __future__ import annotations

from medscalpel.report.figures import metrics_figure
from medscalpel.report.html import Table, ci, num, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section
from medscalpel.report.sections.common import drawn


@register_section
class BaselineSection(ReportSection):
    """Baseline per-class metrics."""

    key = "baseline"
    title = "Baseline per-class metrics"
    #: the demo's baseline, else what a single command wrote (evaluate's metrics.json,
    #: train's model/)
    renders = ("baseline_metrics", "metrics")
    also_reads = ("baseline_card", "model")
    order = 30

    def render(self, run: RunFiles, sec: Section) -> None:
        mkey = "baseline_metrics" if run.locate("baseline_metrics") else "metrics"
        ckey = "baseline_card" if run.locate("baseline_card") else "model"
        rel, d = self.doc(run, mkey, sec)
        card_rel, card = self.doc(run, ckey, sec)
        if not isinstance(d, dict):
            return
        sec.present = True
        mac = d.get("macro") or {}
        sec.fact("split", text(d.get("split")))
        sec.fact("images", num(d.get("n"), pointer(rel, "n"), 0, "int"))
        sec.fact("macro AUROC", num(mac.get("auroc"), pointer(rel, "macro", "auroc")))
        sec.fact("macro AUROC 95% CI", ci(mac.get("auroc_ci"), pointer(rel, "macro", "auroc_ci")))
        sec.fact("macro AP", num(mac.get("ap"), pointer(rel, "macro", "ap")))
        sec.fact("macro AP 95% CI", ci(mac.get("ap_ci"), pointer(rel, "macro", "ap_ci")))
        sec.fact("bootstrap resamples", num(d.get("n_boot"), pointer(rel, "n_boot"), 0, "int"))
        if isinstance(card, dict):
            sec.fact("architecture", text(card.get("arch")))
            sec.fact("parameters", num(card.get("num_parameters"),
                                       pointer(card_rel, "num_parameters"), 0, "int"))
            sec.fact("model id", text(card.get("model_id")))
        t = Table(["class", "positives", "AUROC", "AUROC 95% CI", "AP", "AP 95% CI", "threshold",
                   "sensitivity", "specificity", "F1", "note"], key="per_class",
                  title="Per-class metrics (test split)")
        for i, c in enumerate(d.get("classes") or []):
            if not isinstance(c, dict):
                continue
            p = lambda k: pointer(rel, "classes", i, k)  # noqa: E731
            t.add(text(c.get("name")), num(c.get("n_pos"), p("n_pos"), 0, "int"),
                  num(c.get("auroc"), p("auroc")), ci(c.get("auroc_ci"), p("auroc_ci")),
                  num(c.get("ap"), p("ap")), ci(c.get("ap_ci"), p("ap_ci")),
                  num(c.get("threshold"), p("threshold")),
                  num(c.get("sensitivity"), p("sensitivity")),
                  num(c.get("specificity"), p("specificity")), num(c.get("f1"), p("f1")),
                  text(c.get("reason") or "", cls="muted"))
        t.add(text("macro", cls="good"), text(""),
              num(mac.get("auroc"), pointer(rel, "macro", "auroc")),
              ci(mac.get("auroc_ci"), pointer(rel, "macro", "auroc_ci")),
              num(mac.get("ap"), pointer(rel, "macro", "ap")),
              ci(mac.get("ap_ci"), pointer(rel, "macro", "ap_ci")), text(""),
              num(mac.get("sensitivity"), pointer(rel, "macro", "sensitivity")),
              num(mac.get("specificity"), pointer(rel, "macro", "specificity")),
              num(mac.get("f1"), pointer(rel, "macro", "f1")), text(""))
        sec.tables.append(t)
        sec.grid = False
        drawn(sec, lambda: metrics_figure(d), "per-class AUROC with 95% bootstrap CIs "
               "(dashed: macro)", rel)
