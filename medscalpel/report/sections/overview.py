"""The "Run overview" section: the demo's profile, stages (seconds, status), phantom and
profile settings, and the versions of the manifest.
"""

from __future__ import annotations

import json

from medscalpel.report import html as H
from medscalpel.report.html import Table, num, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section
from medscalpel.report.sections.common import short_list


@register_section
class OverviewSection(ReportSection):
    """Run overview."""

    key = "overview"
    title = "Run overview"
    renders = ("demo",)
    also_reads = ("manifest",)
    order = 10

    def render(self, run: RunFiles, sec: Section) -> None:
        rel, d = self.doc(run, "demo", sec)
        man = self.doc(run, "manifest", sec)[1]
        if not isinstance(d, dict):
            return
        sec.present = True
        sec.fact("profile", text(d.get("profile")))
        sec.fact("total seconds", num(d.get("seconds"), pointer(rel, "seconds"), 1))
        stages = [s for s in d.get("stages", []) if isinstance(s, dict)]
        sec.fact("stages", text(str(len(stages))))
        failed = [s for s in stages
                  if s.get("status") not in ("ok", "done", "complete", "completed", "skipped")]
        if stages:
            t = Table(["stage", "seconds", "status"], key="stages", title="Stages")
            for i, s in enumerate(d["stages"]):
                if not isinstance(s, dict):
                    continue
                st = s.get("status")
                t.add(text(s.get("name")),
                      num(s.get("seconds"), pointer(rel, "stages", i, "seconds"), 1),
                      text(st, cls="good" if st in ("ok", "done", "complete", "completed")
                           else ("muted" if st == "skipped" else "bad")))
            sec.tables.append(t)
            if failed:
                sec.badge, sec.badge_cls = f"{len(failed)} stage(s) not ok", "bad"
        ph = d.get("phantom")
        if isinstance(ph, dict) and ph:
            t = Table(["setting", "value"], key="phantom", title="Phantom data")
            for k, v in ph.items():
                if isinstance(v, (dict, list)):
                    t.add(text(k), text(json.dumps(v)[:200]))
                elif H.is_number(v) and not isinstance(v, bool):
                    t.add(text(k),
                          num(v, pointer(rel, "phantom", k), 0 if isinstance(v, int) else 3,
                                       "int" if isinstance(v, int) else "fixed"))
                else:
                    t.add(text(k), text(v))
            sec.tables.append(t)
        settings = d.get("settings")
        if isinstance(settings, dict) and settings:
            t = Table(["setting", "value"], key="settings", title="Profile settings")
            for k, v in settings.items():
                t.add(text(k), text(short_list(v) if isinstance(v, list) else v))
            sec.tables.append(t)
        if isinstance(man, dict):
            vers = man.get("versions") or {}
            sec.fact("medscalpel", text(vers.get("medscalpel")))
            sec.fact("torch", text(vers.get("torch")))
            sec.fact("git commit", text((man.get("git_commit") or "")[:12] or None))
