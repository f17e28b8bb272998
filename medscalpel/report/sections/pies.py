"""The "Pruning-identified exemplars" section: the PIE gallery, over-representation of
classes and finding counts among PIEs, and the test against the phantom's ground truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medscalpel.report import html as H
from medscalpel.report.html import Table, ci, num, pct, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section
from medscalpel.report.sections.common import yes_no


def _overrep_table(rel: str, key: str, rows: Any, title: str) -> Table | None:
    if not isinstance(rows, list) or not rows:
        return None
    t = Table(["group", "in PIEs", "in all", "share in PIEs", "share overall", "ratio",
               "ratio 95% CI", "Fisher p"], key=key, title=title)
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            continue
        p = lambda k: pointer(rel, key, i, k)  # noqa: E731
        ratio = r.get("ratio")
        t.add(text(r.get("name")), num(r.get("n_pie_with"), p("n_pie_with"), 0, "int"),
              num(r.get("n_with"), p("n_with"), 0, "int"),
              pct(r.get("share_pie"), p("share_pie")),
              pct(r.get("share_overall"), p("share_overall")),
              num(ratio, p("ratio"), 2, "ratio",
                  cls="bad" if H.is_number(ratio) and ratio >= 2 else ""),
              ci(r.get("ratio_ci"), p("ratio_ci"), 2),
              num(r.get("fisher_p"), p("fisher_p"), 2, "sci"))
    return t


@register_section
class PiesSection(ReportSection):
    """Pruning-identified exemplars (PIE gallery)."""

    key = "pies"
    title = "Pruning-identified exemplars (PIE gallery)"
    renders = ("pies", "audit/pies/pie_gallery.png")
    order = 100

    def render(self, run: RunFiles, sec: Section) -> None:
        base = "audit/pies"
        rel, d = self.doc(run, "pies", sec)
        pngs = run.pngs(base, ("pie_gallery.png", "audit_pie_gallery.png", "audit_pie_scores.png",
                              "audit_pie_overrep.png"))
        if not isinstance(d, dict) and not pngs:
            return
        sec.present = True
        for png in pngs:
            fig = self.figure(run, png, sec, "PIE gallery (most disagreeing images first)"
                             if png.endswith("pie_gallery.png") else Path(png).stem.replace("_",
                                                                                            " "))
            if fig:
                sec.figures.append(fig)
        if isinstance(d, dict):
            sec.fact("compression level", num(d.get("level"), pointer(rel, "level"), 2))
            sec.fact("method", text(d.get("method")))
            sec.fact("score", text(d.get("score")))
            sec.fact("images", num(d.get("n_images"), pointer(rel, "n_images"), 0, "int"))
            sec.fact("PIEs", num(d.get("n_pies"), pointer(rel, "n_pies"), 0, "int"))
            sec.fact("quantile", num(d.get("quantile"), pointer(rel, "quantile"), 2))
            sec.fact("decision flips", num(d.get("n_flips"), pointer(rel, "n_flips"), 0, "int"))
            sec.fact("flips among PIEs", num(d.get("n_flips_among_pies"),
                                             pointer(rel, "n_flips_among_pies"), 0, "int"))
            for key, title in (("class_overrepresentation", "Classes in PIEs vs overall"),
                               ("findings_overrepresentation",
                                "Number of findings in PIEs vs overall")):
                t = _overrep_table(rel, key, d.get(key), title)
                if t is not None:
                    sec.tables.append(t)
            pies = d.get("pies")
            if isinstance(pies, list) and pies:
                t = Table(["image", "score", "labels", "decision flip", "dense top",
                           "compressed top"],
                          key="pies", title=f"PIEs ({len(pies)}; first 15)")

                def top(v: Any) -> str:
                    if not isinstance(v, list):
                        return "-"
                    return ", ".join(f"{x[0]} {H.fmt_num(x[1], 2)}" for x in v
                                     if isinstance(x, list) and len(x) == 2)

                for i, r in enumerate(pies[:15]):
                    if isinstance(r, dict):
                        t.add(text(r.get("id")),
                              num(r.get("score"), pointer(rel, "pies", i, "score")),
                              text(", ".join(map(str, r.get("labels") or [])) or "no finding"),
                              yes_no(r.get("flip"), good_if=False), text(top(r.get("dense_top"))),
                              text(top(r.get("compressed_top"))))
                sec.tables.append(t)
        gts = sorted(g for g in run.path(base).rglob("*ground_truth*.json") if g.is_file()) \
            if run.path(base).is_dir() else []
        for g in gts[:1]:
            grel = g.relative_to(run.root).as_posix()
            gd = self.json(run, grel, sec)
            if not isinstance(gd, dict):
                continue
            t = Table(["test", "statistic", "value"], key="pie_ground_truth",
                      title="PIEs against the phantom's ground truth")
            for test in ("label_noise", "quality", "severity"):
                block = gd.get(test)
                if isinstance(block, dict):
                    for k, v in block.items():
                        if H.is_number(v) and not isinstance(v, bool):
                            style = "int" if isinstance(v, int) else (
                                "fixed" if abs(v) >= 1e-3 or v == 0 else "sci")
                            t.add(text(test.replace("_", " ")), text(k),
                                  num(v, pointer(grel, test, k), 3 if style == "fixed" else 2,
                                      style))
            for k, v in (gd.get("supports") or {}).items():
                t.add(text(k.replace("_", " ")), text("supports PruneCXR"), yes_no(v))
            if t.rows:
                sec.tables.append(t)
