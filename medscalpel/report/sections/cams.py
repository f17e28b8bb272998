"""The "Class activation maps" section: the CAM figures and the lung-zone mapping of their
zone reports.
"""

from __future__ import annotations

from pathlib import Path

from medscalpel.report import html as H
from medscalpel.report.html import Table, num, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section


@register_section
class CamsSection(ReportSection):
    """Class activation maps."""

    key = "cams"
    title = "Class activation maps"
    renders = ("explain/cams/*.png",)
    order = 110

    def render(self, run: RunFiles, sec: Section) -> None:
        base = "explain/cams"
        pngs = run.pngs(base)
        jsons = sorted(p.name for p in run.path(base).glob("*.json")) \
            if run.path(base).is_dir() else []
        if not pngs and not jsons:
            return
        sec.present = True
        for png in pngs:
            fig = self.figure(run, png, sec, Path(png).stem.replace("_", " "))
            if fig:
                sec.figures.append(fig)
        for name in jsons:
            rel = f"{base}/{name}"
            d = self.json(run, rel, sec)
            imgs = d.get("images") if isinstance(d, dict) else None
            if not isinstance(imgs, list) or not any(isinstance(r, dict) and "location" in r
                                                     for r in imgs):
                continue
            t = Table(["image", "class", "location", "zones from"], key="zones",
                      title=f"Lung-zone mapping ({name})")
            for r in imgs[:30]:
                if isinstance(r, dict):
                    t.add(text(r.get("id")), text(r.get("class")), text(r.get("location")),
                          text(r.get("zones_from")))
            sec.tables.append(t)
            n_fb = d.get("n_atlas_fallback")
            if H.is_number(n_fb):
                sec.fact(f"atlas fallbacks ({name})",
                         num(n_fb, pointer(rel, "n_atlas_fallback"), 0, "int"))
