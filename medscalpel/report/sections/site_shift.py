"""Experiment-report section: validation on a second site and k-shot recalibration there.

Reads the typed :class:`~medscalpel.repair.shift_flow.SiteShiftReport` declared as artifact
``site_shift`` in :mod:`medscalpel.layout`; every number cell points into its JSON.
"""

from __future__ import annotations

from typing import Any

from medscalpel.report.html import Table, ci, num, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section
from medscalpel.report.verdict_view import outcome_cell, verdict_line, verdict_table


@register_section
class SiteShiftSection(ReportSection):
    """External site: validation, shift check, k-shot recalibration."""

    key = "site_shift"
    title = "External site: validation, shift check, k-shot recalibration"
    renders = ("site_shift",)
    order = 50

    def render(self, run: RunFiles, sec: Section) -> None:
        rel, d = self.doc(run, "site_shift", sec)
        if d is None:
            return
        sec.present = True
        val, rec, shift = d["validation"], d["recalibration"], d["shift"]
        m = val["macro"]
        sec.intro = (f"The model trained on {d['internal_data']} validated on "
                     f"{d['external_data']} (an external site), a label-free shift check, and "
                     f"recalibration with k = {rec['k']} labelled external images per class, "
                     f"measured on the {rec['n_rest']} external images not used to fit.")
        sec.fact("macro AUROC internal", num(m["internal"]["auroc"],
                                             pointer(rel, "validation", "macro", "internal",
                                                     "auroc")))
        sec.fact("macro AUROC external", num(m["external"]["auroc"],
                                             pointer(rel, "validation", "macro", "external",
                                                     "auroc")))
        sec.fact("label-free shift check", text("shift found" if shift["shifted"] else
                                                "no shift found",
                                                cls="bad" if shift["shifted"] else "good"))
        sec.fact("external images above the internal 99th OOD percentile", num(
            d["ood"].get("share_external_above_99"), pointer(rel, "ood", "share_external_above_99"),
            3))
        rv = rec.get("restored_verdict") or {}
        if rv:
            sec.fact("recalibration restored?", outcome_cell(rv.get("outcome"), rec["verdict"]))
            sec.notes.append(f"Site recalibration, restored verdict: {verdict_line(rv)}")
        else:
            sec.fact("recalibration (older file: point estimates, no verdict)",
                     text(rec["verdict"], cls="muted"))
        mac = rec.get("macro") or {}
        if mac:
            sec.fact("macro sensitivity after - internal (point estimate)", num(
                mac["sensitivity_gap"], pointer(rel, "recalibration", "macro", "sensitivity_gap")))
            sec.fact("macro specificity after - internal (point estimate)", num(
                mac["specificity_gap"], pointer(rel, "recalibration", "macro", "specificity_gap")))
        sec.fact("thresholds", text(val.get("threshold_source")))
        t = Table(["class", "set", "AUROC", "95% CI", "ECE", "sensitivity", "specificity"],
                  key="site_validation",
                  title="Internal vs external site, at the stored thresholds")
        for i, c in enumerate(val["classes"]):
            for side in ("internal", "external"):
                s = c[side]
                p = lambda k: pointer(rel, "validation", "classes", i, side, k)  # noqa: E731
                t.add(text(c["name"]), text(side), num(s["auroc"], p("auroc")),
                      ci(s.get("auroc_ci"), p("auroc_ci")), num(s["ece"], p("ece")),
                      num(s["sensitivity"], p("sensitivity")),
                      num(s["specificity"], p("specificity")))
        sec.tables.append(t)
        best = rec.get("best_possible_gap") or {}
        rt = Table(["class", "internal sens / spec", "external before", "external after",
                    "restored? (within " + f"{rec['tolerance']:g}, TOST verdict)",
                    "best any threshold reaches (gap)"], key="site_recalibration",
                   title=f"{rec['method']} recalibration, k = {rec['k']} (measured on the rest)")
        for j, (a, b, c) in enumerate(zip(rec["internal"], rec["before"], rec["after"])):
            if c["name"] not in rec["restored"]:
                continue
            g = best.get(c["name"])
            rt.add(text(c["name"]), _pair(a), _pair(b), _pair(c),
                   _restored_cell(rec, c["name"]),
                   num(g, pointer(rel, "recalibration", "best_possible_gap", c["name"]), 3)
                   if g is not None else text("n/a"))
        if rt.rows:
            sec.tables.append(rt)
        vt = verdict_table(rel, rv, ("recalibration", "restored_verdict"), "site_restored_verdict",
                           "Restored? Two one-sided tests per rate (after - internal within the "
                           "tolerance), Holm over all of them")
        if vt is not None:
            sec.tables.append(vt)
        if d.get("router"):
            sec.tables.append(_router_table(rel, d["router"]))
        sec.notes.extend(str(n) for n in d.get("notes") or [])


def _router_table(rel: str, router: list[dict[str, Any]]) -> Table:
    tt = Table(["class", "issues on the k-shot sample", "treatment", "status", "cost",
                "held-out gain (point estimate)", "helped? verdict", "chosen"],
               key="site_router",
               title="Treatment router on the new site (fitted on the k-shot sample, "
                     "judged on the rest)")
    for j, r in enumerate(router):
        tt.add(text(r["class"]), text(r["issues"]), text(r["treatment"]), text(r["status"]),
               num(r.get("cost"), pointer(rel, "router", j, "cost"), 2), text(r["gain"]),
               text(r.get("evidence") or "-"), text(r["chosen"] or "-"))
    return tt


def _restored_cell(rec: dict[str, Any], name: str):
    """The class's verdict outcome; an older file's point-estimate flag is labelled so."""
    out = (rec.get("outcomes") or {}).get(name)
    if out is not None:
        return outcome_cell(out)
    flag = rec["restored"][name]
    return text(f"{'yes' if flag else 'no'} (point estimate, no verdict)", cls="muted")


def _pair(r: dict[str, Any]):
    return text(f"{r['sensitivity']:.3f} / {r['specificity']:.3f}")
