"""The "Polarized classifier channels" section: channel counts per Jaccard category against
the null models, per compression stage when the file has stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medscalpel.report import html as H
from medscalpel.report.html import Table, num, pct, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section
from medscalpel.report.sections.common import get, short_list


def _polarity_result(rel: str, d: dict[str, Any], prefix: tuple[Any, ...], sec: Section,
                     label: str = "") -> None:
    p = lambda *k: pointer(rel, *prefix, *k)  # noqa: E731
    rule = d.get("rule")
    if isinstance(rule, dict):
        params = ", ".join(f"{k}={v}" for k, v in rule.items() if k != "name")
        sec.fact(f"strong-weight rule{label}",
                 text(f"{rule.get('name', '?')} ({params})" if params else rule.get("name")))
    sec.fact(f"Jaccard bounds{label}", text(short_list(d.get("bounds"))))
    sec.fact(f"channels{label}", num(d.get("num_channels"), p("num_channels"), 0, "int"))
    sec.fact(f"polarized channels{label}", num(d.get("n_polarized_channels"),
                                               p("n_polarized_channels"), 0, "int"))
    sec.fact(f"polarized triples{label}", num(d.get("n_triples"), p("n_triples"), 0, "int"))
    counts = d.get("counts") or {}
    nulls = d.get("nulls") if isinstance(d.get("nulls"), dict) else {}
    cats = ("perfect", "legitimate", "mixed", "conflict", "undefined")
    null_keys = [k for k in nulls if str(k).endswith("/channels")]
    t = Table(["category", "channels (observed)", "triples (observed)",
               *[f"expected, {k.split('/')[0]} null" for k in null_keys], "all class pairs"],
              key="polarity_counts", title=f"Polarized channels by Jaccard category{label}")
    for c in cats:
        t.add(text(c), num(get(counts, "channels", c), p("counts", "channels", c), 0, "int"),
              num(get(counts, "triples", c), p("counts", "triples", c), 0, "int"),
              *[num(get(nulls, k, "mean_counts", c), p("nulls", k, "mean_counts", c), 1)
                for k in null_keys],
              pct(get(d, "all_class_pairs", c), p("all_class_pairs", c)))
    sec.tables.append(t)
    if nulls:
        nt = Table(["null model", "exclusive share observed", "exclusive share null",
                    "enrichment", "p"], key="polarity_nulls",
                    title=f"Against the null models{label}")
        for k, s in nulls.items():
            if isinstance(s, dict):
                nt.add(text(k), pct(s.get("exclusive_fraction_observed"),
                                    p("nulls", k, "exclusive_fraction_observed")),
                       pct(s.get("exclusive_fraction_null"), p("nulls", k,
                                                               "exclusive_fraction_null")),
                       num(s.get("enrichment"), p("nulls", k, "enrichment"), 2, "ratio"),
                       num(s.get("p_value"), p("nulls", k, "p_value"), 3))
        sec.tables.append(nt)
    chans = d.get("channels")
    if isinstance(chans, list) and chans:
        ct = Table(["channel", "pushes (+W)", "pulls (\u2212W)", "w+", "w\u2212", "Jaccard",
                    "category"], key="polarity_channels",
                   title=f"Polarized channels{label} (first 25 of {len(chans)})")
        for i, r in enumerate(chans[:25]):
            if isinstance(r, dict):
                ct.add(text(r.get("channel")), text(r.get("positive")), text(r.get("negative")),
                       num(r.get("w_pos"), p("channels", i, "w_pos"), 3, "signed"),
                       num(r.get("w_neg"), p("channels", i, "w_neg"), 3, "signed"),
                       num(r.get("jaccard"), p("channels", i, "jaccard"), 3),
                       text(r.get("category"),
                            cls="bad" if r.get("category") == "conflict" else ""))
        sec.tables.append(ct)


@register_section
class PolaritySection(ReportSection):
    """Polarized classifier channels."""

    key = "polarity"
    title = "Polarized classifier channels"
    renders = ("polarity",)
    order = 120

    def render(self, run: RunFiles, sec: Section) -> None:
        base = "explain/polarity"
        rel, d = self.doc(run, "polarity", sec)
        pngs = run.pngs(base)
        if not isinstance(d, dict) and not pngs:
            return
        sec.present = True
        if isinstance(d, dict) and isinstance(d.get("stages"), dict):
            recs = d.get("table_channels")
            if isinstance(recs, list) and recs:
                cols = [c for c in recs[0].keys()]
                t = Table(cols, key="polarity_stages",
                          title="Polarized channels per compression stage")
                for i, r in enumerate(recs):
                    t.add(*[num(v, pointer(rel, "table_channels", i, c),
                                0 if isinstance(v, int) else 3, "int" if isinstance(v, int) else
                                "fixed") if H.is_number(v) and not isinstance(v, bool) else text(v)
                            for c, v in r.items()])
                sec.tables.append(t)
            stages = d["stages"]
            first = "dense" if "dense" in stages else next(iter(stages), None)
            if first is not None and isinstance(stages[first], dict):
                _polarity_result(rel, stages[first], ("stages", first), sec, f" ({first})")
        elif isinstance(d, dict):
            _polarity_result(rel, d, (), sec)
        for png in pngs:
            fig = self.figure(run, png, sec, Path(png).stem.replace("_", " "))
            if fig:
                sec.figures.append(fig)
