"""The experiment report's "Deployment" section: the runtime x precision table of
``deploy/deploy.json`` (a typed :class:`~medscalpel.deploy.result.DeployResult`)
with latency ratios, parity, delta AUROC, go / no-go and the recommendation with its reason."""

from __future__ import annotations

from medscalpel.deploy.result import DeployResult, explanation_line, export_line
from medscalpel.report.html import Table, ci, num, pct, text
from medscalpel.report.page import RunFiles, Section, pointer
from medscalpel.report.sections.base import ReportSection, register_section

_STATUS_CLS = {"go": "good", "no-go": "bad", "undecided": "warn", "refused": "bad",
               "error": "bad", "unavailable": "muted"}
_OUTCOME_CLS = {"pass": "good", "fail": "bad", "undecided": "warn"}


@register_section
class DeploymentSection(ReportSection):
    """Deployment: CPU runtimes and precisions."""

    key = "deployment"
    title = "Deployment: CPU runtimes and precisions"
    renders = ("deploy",)
    order = 70

    def render(self, run: RunFiles, sec: Section) -> None:
        """Fill ``sec`` from the declared ``deploy`` artifact; absent file: section not present."""
        rel, d = self.doc(run, "deploy", sec)
        if not isinstance(d, dict):
            return
        res = DeployResult.from_dict(d)
        sec.present = True
        b0 = f"b{res.batches[0]}"
        cols = ["variant", "status"]
        for b in res.batches:
            cols += [f"batch {b} ms", f"batch {b} x torch fp32"]
        cols += [f"{b0} x torch: interval low", "high", "x own fp32", "parity (rel.)", "accuracy verdict",
                 "macro \u0394AUROC", "paired 95% CI", "worst class \u0394AUROC",
                 f"% of peak ({b0})", "why"]
        t = Table(cols, key="deploy", title=(
            f"Runtimes x precisions on {res.n_images} images of split '{res.split}' "
            f"({res.rounds} alternated rounds; {res.threads} thread(s)"
            + ("; MEASURED UNDER LOAD" if res.under_load else "") + ")"))
        for i, v in enumerate(res.variants):
            p = lambda *k: pointer(rel, "variants", i, *k)  # noqa: E731
            cells = [text(v.name), text(v.status, cls=_STATUS_CLS.get(v.status, ""))]
            for b in res.batches:
                key = f"b{b}"
                cells += [num(v.latency.get(key, {}).get("median_ms"),
                              p("latency", key, "median_ms"),
                              3),
                          num(v.speedup_vs_torch.get(key), p("speedup_vs_torch", key), 2, "ratio")]
            macro = (v.comparison or {}).get("macro", {})
            st = v.speed.get(b0, {}).get("vs_torch")
            verdicts = " / ".join(f"{k}: {d.get('outcome')}" for k, d in v.verdicts.items())
            worst = next((d.get("outcome") for d in v.verdicts.values()
                          if d.get("outcome") == "fail"), None) or next(
                (d.get("outcome") for d in v.verdicts.values()
                 if d.get("outcome") == "undecided"), "pass" if v.verdicts else None)
            cells += [num(st["low"], p("speed", b0, "vs_torch", "low"), 2, "ratio")
                      if st else text("-"),
                      num(st["high"], p("speed", b0, "vs_torch", "high"), 2, "ratio")
                      if st else text("-"),
                      num(v.speedup_vs_fp32.get(b0), p("speedup_vs_fp32", b0), 2, "ratio"),
                      num(v.parity_rel, p("parity_rel"), 2, "sci"),
                      text(verdicts or ("reference (the model itself)"
                                        if v.name == "torch:fp32" else "-"),
                           cls=_OUTCOME_CLS.get(worst, "")),
                      num(macro.get("delta_auroc"), p("comparison", "macro", "delta_auroc"), 4,
                          "signed"),
                      ci(macro.get("delta_auroc_ci"), p("comparison", "macro", "delta_auroc_ci")),
                      num(v.worst_class_delta_auroc, p("worst_class_delta_auroc"), 4, "signed"),
                      pct(v.peak_fraction.get(b0), p("peak_fraction", b0), 1),
                      text("; ".join(v.reasons))]
            t.add(*cells)
        sec.tables.append(t)
        chosen = res.chosen
        sec.fact("recommended", text(res.recommended or "none", cls="good" if chosen else "bad"))
        sec.fact("why", text(res.reason))
        if chosen is not None:
            i = [v.name for v in res.variants].index(chosen.name)
            sec.fact(f"speedup vs torch fp32 ({b0})",
                     num(chosen.speedup_vs_torch.get(b0),
                         pointer(rel, "variants", i, "speedup_vs_torch", b0), 2, "ratio"))
        sec.fact("floor", text(f"macro \u0394AUROC >= {res.floor['macro']:+g}, every class >= "
                               f"{res.floor['per_class']:+g}"))
        sec.fact("peak fp32 GEMM (GMAC/s)", num(res.peak.get("fp32_gmacs"),
                                                pointer(rel, "peak", "fp32_gmacs"), 1))
        sec.fact("served",
                 text(f"{res.serve.get('dir')}/ ({', '.join(res.serve.get('files', []))})"))
        sec.fact("explanation output", text(explanation_line(res.explanation)))
        sec.fact("exported by", text(export_line(res.serve.get("export"))))
        sec.fact("external set", text(
            f"{res.external.get('n_images')} images of {res.external.get('spec') or res.external.get('split')}"
            if res.external else "none: the floor was checked on the evaluation split only"))
        sec.fact("CPU", text(f"{res.machine.get('cpu', {}).get('model', 'not recorded')} "
                             f"({', '.join(res.machine.get('cpu', {}).get('features', []))}): "
                             "the speeds hold for this CPU only"))
        if res.under_load:
            sec.notes.append(f"Latencies measured under load (load average "
                             f"{res.loadavg.get('start')} -> {res.loadavg.get('end')}); compare "
                             "the ratios, not the ms.")
        sec.notes.extend(res.notes)
        sec.badge = "go" if chosen is not None else "no variant"
        sec.badge_cls = "good" if chosen is not None else "bad"
