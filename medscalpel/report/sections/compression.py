"""The "Compression and Pareto plot" section: every compressed model against the dense one
(paired deltas on the same images), the Pareto plot drawn from the JSON, the ONNX export.
"""

from __future__ import annotations

from typing import Any

from medscalpel.report import html as H
from medscalpel.report.figures import pareto_figure
from medscalpel.report.html import Table, ci, num, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section
from medscalpel.report.sections.common import drawn, yes_no


@register_section
class CompressionSection(ReportSection):
    """Compression and Pareto plot."""

    key = "compression"
    title = "Compression and Pareto plot"
    renders = ("compress",)
    also_reads = ("export",)
    order = 60

    def render(self, run: RunFiles, sec: Section) -> None:
        rel, d = self.doc(run, "compress", sec)
        if not isinstance(d, dict):
            return
        sec.present = True
        rows = [r for r in (d.get("rows") or []) if isinstance(r, dict)]
        dense = d.get("dense") if isinstance(d.get("dense"), dict) else None
        cols = ["method", "parameters", "params ratio", "MACs", "latency (ms)", "speedup",
                "macro AUROC", "95% CI", "\u0394 macro AUROC", "paired 95% CI",
                "max |\u0394 logit|"]
        ev = d.get("evaluated_on") or {}
        t = Table(cols, key="compress", title=f"Compressed models (split '{ev.get('split', '?')}', "
                  f"{ev.get('n', '?')} images; \u0394 with a paired bootstrap on the same images)")

        def add(r: dict[str, Any], *path: Any) -> None:
            p = lambda k: pointer(rel, *path, k)  # noqa: E731
            if r.get("refused"):
                t.add(text(r.get("method")), text(f"refused: {r['refused']}", cls="bad"),
                      *[text("") for _ in cols[2:]])
                return
            t.add(text(r.get("method")), num(r.get("params"), p("params"), 0, "int"),
                  num(r.get("params_ratio"), p("params_ratio")),
                  num(r.get("macs"), p("macs"), 0, "int"),
                  num(r.get("latency_ms"), p("latency_ms"), 2),
                  num(r.get("speedup"), p("speedup"), 2, "ratio"),
                  num(r.get("macro_auroc"), p("macro_auroc"), 4),
                  ci(r.get("macro_auroc_ci"), p("macro_auroc_ci")),
                  num(r.get("delta_macro_auroc"), p("delta_macro_auroc"), 4, "signed"),
                  ci(r.get("delta_macro_auroc_ci"), p("delta_macro_auroc_ci")),
                  num(r.get("max_abs_delta_logit"), p("max_abs_delta_logit"), 2, "sci"))

        if dense is not None:
            add({**dense, "method": dense.get("method") or "dense"}, "dense")
            sec.fact("dense macro AUROC", num(dense.get("macro_auroc"),
                                              pointer(rel, "dense", "macro_auroc"), 4))
            sec.fact("dense latency (ms)", num(dense.get("latency_ms"),
                                               pointer(rel, "dense", "latency_ms"), 2))
        for i, r in enumerate(d.get("rows") or []):
            if isinstance(r, dict):
                add(r, "rows", i)
        noisy = [r.get("method") for r in rows if r.get("latency_noisy")]
        if noisy:
            sec.notes.append(f"Latency ratios of {', '.join(map(str, noisy))} varied by more "
                             "than 20% between alternated rounds (machine load): treat those "
                             "speedups as noisy and measure again on an idle machine.")
        sec.fact("compressed models", text(str(len(rows))))
        sec.tables.append(t)
        sec.grid = False
        drawn(sec, lambda: pareto_figure(rows, dense),
              "macro AUROC (95% CI) against the parameters "
               "ratio and the latency ratio; dashed: Pareto front", rel)
        ex_rel, ex = self.doc(run, "export", sec)
        if isinstance(ex, dict):
            et = Table(["key", "value"], key="export", title="ONNX export")
            for k, v in ex.items():
                if isinstance(v, bool):
                    et.add(text(k), yes_no(v))
                elif H.is_number(v):
                    et.add(text(k), num(v, pointer(ex_rel, k), 4 if abs(v) >= 1e-3 or v == 0 else 2,
                                        "fixed" if abs(v) >= 1e-3 or v == 0 else "sci"))
                elif isinstance(v, str) and len(v) < 120:
                    et.add(text(k), text(v))
            if et.rows:
                sec.tables.append(et)
