"""The "Repair" section: the surgery (goal ladder, plan, AUROC before and after) and the
treatment router's triage log (verdicts, effect on the untouched report part, learned costs).
"""

from __future__ import annotations

from typing import Any

from medscalpel.report import html as H
from medscalpel.report.html import Table, num, text
from medscalpel.report.page import Link, RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section
from medscalpel.report.sections.common import get, yes_no
from medscalpel.report.verdict_view import outcome_cell


@register_section
class RepairSection(ReportSection):
    """Repair: surgery and triage log."""

    key = "repair"
    title = "Repair: surgery and triage log"
    renders = ("surgery", "triage")
    order = 130

    def render(self, run: RunFiles, sec: Section) -> None:
        s_rel, s = self.doc(run, "surgery", sec)
        t_rel, tr = self.doc(run, "triage", sec)
        if not isinstance(s, dict) and not isinstance(tr, dict):
            return
        sec.present = True
        if isinstance(s, dict):
            self._surgery(sec, s_rel, s)
        if isinstance(tr, dict):
            self._triage(sec, t_rel, tr)
            self._triage_effects(run, sec, t_rel, tr)

    def _surgery(self, sec: Section, s_rel: str, s: dict[str, Any]) -> None:
        plan = s.get("plan") or {}
        ladder = s.get("ladder") if isinstance(s.get("ladder"), dict) else None
        sec.fact("surgery: class", text(plan.get("class") or get(s, "settings", "class")))
        if ladder is not None:
            st = ladder.get("status")
            sec.fact("surgery: outcome", text(
                {"full": "goal met (strictest goal)", "partial": "PARTIAL: only a relaxed "
                 "fallback goal was met", "failed": "failed: no goal met"}.get(st, st),
                cls="good" if st == "full" else "bad"))
        else:
            sec.fact("surgery: success", yes_no(s.get("success")))
        goal = s.get("goal")
        if goal:
            sec.fact("surgery: goal", text(
                "every target below threshold" if goal == "below" else
                f"{goal} probability drop >= {s.get('delta_prob')}"))
        still = s.get("false_positives_still_above_threshold")
        if isinstance(still, dict):
            sec.fact("false positives still above threshold", text(
                still.get("text"), cls="bad" if still.get("k") else "good"))
        sec.fact("weights changed", num(s.get("n_weights_changed"),
                                        pointer(s_rel, "n_weights_changed"), 0, "int"))
        sec.fact("target images", num(get(s, "targets", "n"), pointer(s_rel, "targets", "n"), 0,
                                      "int"))
        sec.fact("mean \u0394 probability", num(get(s, "targets", "delta_prob_mean"),
                                                pointer(s_rel, "targets", "delta_prob_mean"), 3,
                                                "signed"))
        sec.fact("true positives lost", num(get(s, "true_positives", "lost"),
                                            pointer(s_rel, "true_positives", "lost"), 0, "int"))
        sec.fact("other classes' logits identical", yes_no(s.get("other_logits_identical")))
        sec.fact("seconds", num(s.get("seconds"), pointer(s_rel, "seconds"), 3))
        if s.get("message"):
            sec.notes.append(f"Surgery: {s['message']}")
        if ladder is not None and ladder.get("attempts"):
            lt = Table(["goal", "met", "false positives still above threshold", "weights",
                        "TPs lost", "kept"], key="surgery_ladder",
                       title="Surgery goals tried, strictest first")
            for i, a in enumerate(ladder["attempts"]):
                if not isinstance(a, dict):
                    continue
                fp = a.get("false_positives_still_above_threshold") or {}
                lt.add(text(a.get("goal_text")), yes_no(a.get("success")),
                       text(fp.get("text") if isinstance(fp, dict) else None),
                       num(a.get("n_weights_changed"),
                           pointer(s_rel, "ladder", "attempts", i, "n_weights_changed"), 0, "int"),
                       num(a.get("true_positives_lost"),
                           pointer(s_rel, "ladder", "attempts", i, "true_positives_lost"), 0,
                           "int"),
                       text("yes" if ladder.get("kept") == i else ""))
            sec.tables.append(lt)
        chans = plan.get("channels")
        if isinstance(chans, list) and chans:
            t = Table(["channel", "old weight", "score"], key="surgery_plan",
                      title=f"Surgery plan: weights zeroed in the '{plan.get('class', '?')}' row")
            for i, c in enumerate(chans):
                t.add(text(c), num(get(plan, "old_weights", i),
                                   pointer(s_rel, "plan", "old_weights", i), 4, "signed"),
                      num(get(plan, "scores", i), pointer(s_rel, "plan", "scores", i), 4))
            sec.tables.append(t)
        before, after = s.get("auroc_before") or {}, s.get("auroc_after") or {}
        if isinstance(before, dict) and before:
            t = Table(["class", "AUROC before", "AUROC after", "\u0394"], key="surgery_auroc",
                      title="AUROC before and after surgery (held-out)")
            for k, v in before.items():
                a = after.get(k) if isinstance(after, dict) else None
                dlt = a - v if H.is_number(a) and H.is_number(v) else None
                t.add(text(k), num(v, pointer(s_rel, "auroc_before", k), 4),
                      num(a, pointer(s_rel, "auroc_after", k), 4),
                      num(dlt, "", 4, "signed", cls="muted" if not dlt else ""))
            sec.tables.append(t)

    def _triage(self, sec: Section, t_rel: str, tr: dict[str, Any]) -> None:
        sec.fact("triage seconds", num(tr.get("seconds"), pointer(t_rel, "seconds"), 2))
        classes = [c for c in (tr.get("classes") or []) if isinstance(c, dict)]
        with_issue = [c for c in classes if c.get("issues")]
        sec.fact("classes with issues", text(f"{len(with_issue)} of {len(classes)}"))
        n_sel, n_rep = get(tr, "settings", "n_selection"), get(tr, "settings", "n_report")
        if H.is_number(n_rep):
            sec.fact("triage: judged on / reported on", text(
                f"{n_sel} selection images / {n_rep} untouched report images"))
        t = Table(["class", "issues", "treatment", "status", "cost", "seconds",
                   "gain (selection part, point estimate)",
                   "helped? verdict (gain and interval at its Holm level)", "chosen"],
                  key="triage",
                  title="Treatment decisions (triage log; 'helped' is a paired verdict on the "
                        "selection part: pass / fail / undecided)")
        for i, c in enumerate(tr.get("classes") or []):
            if not isinstance(c, dict):
                continue
            issues = ", ".join(str(x.get("kind")) for x in c.get("issues") or []
                               if isinstance(x, dict)) or "-"
            atts = c.get("attempts") or []
            if not atts:
                t.add(text(c.get("class")), text(issues), text("none"),
                      text("no issue", cls="muted"), text(""), text(""), text(""), text(""),
                      text(""))
            for a_i, a in enumerate(atts):
                if not isinstance(a, dict):
                    continue
                p = lambda k: pointer(t_rel, "classes", i, "attempts", a_i, k)  # noqa: E731
                gain = a.get("gain") or {}
                g = "; ".join(f"{k} {H.fmt_num(v, 3, 'signed')}" for k, v in gain.items()
                              if H.is_number(v)) or "-"
                st = a.get("status")
                t.add(text(c.get("class")), text(issues), text(a.get("treatment")),
                      text(st, cls="good" if st == "helped" else ("bad" if st == "failed" else "")),
                      num(a.get("cost"), p("cost"), 2), num(a.get("seconds"), p("seconds"), 3),
                      text(g), outcome_cell(a.get("outcome"),
                                            str(a.get("evidence") or "").split(": ", 1)[-1])
                      if a.get("outcome") else text("no verdict (older log)" if st in
                                                    ("helped", "no gain") else None,
                                                    cls="muted"),
                      text("yes" if a.get("treatment") in (c.get("chosen") or []) else "",
                           cls="good"))
        sec.tables.append(t)

    def _triage_effects(self, run: RunFiles, sec: Section, t_rel: str,
                        tr: dict[str, Any]) -> None:
        rt = Table(["class", "chosen", "metric", "before", "after", "\u0394"], key="triage_report",
                   title="Effect of the chosen treatments on the untouched report part")
        for i, c in enumerate(tr.get("classes") or []):
            if not isinstance(c, dict) or (c.get("chosen") or ["none"]) == ["none"]:
                continue
            for m, g in (c.get("report_gain") or {}).items():
                if m not in ("auroc", "recall", "precision", "specificity", "f1", "ece",
                             "youden"):
                    continue
                rt.add(text(c.get("class")), text(", ".join(c.get("chosen") or [])), text(m),
                       num(get(c, "report_before", m),
                           pointer(t_rel, "classes", i, "report_before", m), 3),
                       num(get(c, "report_after", m),
                           pointer(t_rel, "classes", i, "report_after", m), 3),
                       num(g, pointer(t_rel, "classes", i, "report_gain", m), 3, "signed"))
        if rt.rows:
            sec.tables.append(rt)
        cur = get(tr, "costs_after", "current")
        if isinstance(cur, dict) and cur:
            ct = Table(["treatment", "initial cost", "learned cost", "runs"], key="costs",
                       title="Cost matrix (learned from measured run times)")
            for k, v in cur.items():
                ct.add(text(k), num(get(tr, "costs_after", "initial", k),
                                    pointer(t_rel, "costs_after", "initial", k), 2),
                       num(v, pointer(t_rel, "costs_after", "current", k), 2),
                       num(get(tr, "costs_after", "runs", k),
                           pointer(t_rel, "costs_after", "runs", k), 0, "int")
                       if H.is_number(get(tr, "costs_after", "runs", k)) else num(0, "", 0, "int"))
            sec.tables.append(ct)
        if run.exists("repair/triage/decision_log.md"):
            sec.links.append(Link(run.href("repair/triage/decision_log.md"), "decision_log.md",
                                  "the same log as a Markdown table"))
