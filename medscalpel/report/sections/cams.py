"""The "Class activation maps" section: the CAM figures and the lung-zone mapping of their
zone reports.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from medscalpel.layout import artifact
from medscalpel.report import html as H
from medscalpel.report.html import Table, num, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section

#: the CAM stage's artifact (declared in medscalpel/layout.py): its folder holds the figures
_CAMS = artifact("cams")


@register_section
class CamsSection(ReportSection):
    """Class activation maps."""

    key = "cams"
    title = "Class activation maps"
    renders = ("explain/cams/*.png",)
    order = 110

    def render(self, run: RunFiles, sec: Section) -> None:
        base = _CAMS.path.rsplit("/", 1)[0]
        pngs = run.pngs(base)
        jsons = sorted(p.name for p in run.path(base).glob("*.json")) \
            if run.path(base).is_dir() else []
        if not pngs and not jsons:
            return
        sec.present = True
        served = self._served(run, _CAMS.path, sec) if _CAMS.filename in jsons else {}
        for png in pngs:
            caption = Path(png).stem.replace("_", " ")
            if served.get("figure") and Path(png).name == served["figure"]:
                caption = served.get("label") or caption  # runtime and precision named
            fig = self.figure(run, png, sec, caption)
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

    def _served(self, run: RunFiles, rel: str, sec: Section) -> dict:
        """Facts on the CAMs of the served artifact (issue T): which artifact (runtime,
        precision, file hash), or why it has none; their rank agreement with the dense
        Grad-CAM."""
        d = self.json(run, rel, sec)
        served = d.get("served") if isinstance(d, dict) else None
        if not isinstance(served, dict):
            return {}
        art = served.get("artifact") or {}
        where = (f"{art.get('runtime')}:{art.get('precision')} {art.get('file')} (sha256 "
                 f"{str(art.get('sha256'))[:12]}...)" if art else "the served torch model")
        if served.get("status") != "served":
            sec.fact("CAMs of the served artifact",
                     text(f"none: {served.get('reason')} ({where})"))
            return served
        sec.fact("CAMs of the served artifact", text(f"{served.get('label')}: {where}"))
        rho = [r for r in served.get("spearman_vs_dense_gradcam") or [] if H.is_number(r)]
        if rho:
            sec.fact("served CAM vs dense Grad-CAM (Spearman, median)",
                     num(float(statistics.median(rho)),
                         pointer(rel, "served", "spearman_vs_dense_gradcam"), 3))
        if served.get("note"):
            sec.notes.append(served["note"])
        return served
