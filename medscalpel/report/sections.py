"""Section builders of the experiment report (one function per section).

Each builder reads its files through :class:`~medscalpel.report.experiment.RunFiles`, fills a
:class:`~medscalpel.report.experiment.Section` (facts, tables, figures, notes) and sets
``present`` when its files exist. Every number cell carries the JSON pointer of its value
(:func:`~medscalpel.report.experiment.pointer`). Builders tolerate missing keys (a cell shows
``-``); an unexpected file shape raises inside the builder and is turned into a note by
:func:`~medscalpel.report.experiment.experiment_report`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medscalpel.errors import DataError
from medscalpel.layout import ARTIFACTS
from medscalpel.report import html as H
from medscalpel.report.experiment import Link, RunFiles, Section, pointer
from medscalpel.report.html import Cell, Figure, Table, ci, num, pct, text
from medscalpel.report.changes_section import render_changes
from medscalpel.report.deploy_section import render_deployment
from medscalpel.report.section_shift import render_site_shift
from medscalpel.report.verdict_view import outcome_cell, verdict_line, verdict_table


def _drawn(sec: Section, draw: Callable[[], bytes], caption: str, source: str) -> None:
    try:
        sec.figures.append(Figure(H.png_data_uri(draw()), caption, source))
    except (DataError, ValueError, TypeError, KeyError, IndexError) as exc:
        sec.notes.append(f"{caption}: not drawn ({exc}).")


def _get(d: Any, *keys: Any, default: Any = None) -> Any:
    cur = d
    for k in keys:
        if isinstance(cur, dict) and k in cur:
            cur = cur[k]
        elif isinstance(cur, list) and isinstance(k, int) and -len(cur) <= k < len(cur):
            cur = cur[k]
        else:
            return default
    return cur


def _yes_no(v: Any, good_if: bool = True) -> Cell:
    if not isinstance(v, bool):
        return text(None)
    return text("yes" if v else "no", cls="good" if v == good_if else "bad")


def _short_list(v: Any, n: int = 12) -> str:
    if not isinstance(v, list):
        return "-" if v is None else str(v)
    items = [H.fmt_num(x, 2) if H.is_number(x) and isinstance(x, float) else str(x)
             for x in v[:n]]
    return ", ".join(items) + (f", ... ({len(v)} in all)" if len(v) > n else "")


# ----------------------------------------------------------------------------- sections
def _overview(run: RunFiles, sec: Section) -> None:
    rel, d = run.doc("demo", sec)
    man = run.doc("manifest", sec)[1]
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
            t.add(text(s.get("name")), num(s.get("seconds"), pointer(rel, "stages", i, "seconds"), 1),
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
                t.add(text(k), num(v, pointer(rel, "phantom", k), 0 if isinstance(v, int) else 3,
                                   "int" if isinstance(v, int) else "fixed"))
            else:
                t.add(text(k), text(v))
        sec.tables.append(t)
    settings = d.get("settings")
    if isinstance(settings, dict) and settings:
        t = Table(["setting", "value"], key="settings", title="Profile settings")
        for k, v in settings.items():
            t.add(text(k), text(_short_list(v) if isinstance(v, list) else v))
        sec.tables.append(t)
    if isinstance(man, dict):
        vers = man.get("versions") or {}
        sec.fact("medscalpel", text(vers.get("medscalpel")))
        sec.fact("torch", text(vers.get("torch")))
        sec.fact("git commit", text((man.get("git_commit") or "")[:12] or None))


def _dataset(run: RunFiles, sec: Section) -> None:
    rel, d = run.doc("label_stats", sec)
    if isinstance(d, dict):
        _label_stats(run, sec, rel, d)
    # the contact sheet of the images sits here, below the headline and the statistics
    preview = run.figure(ARTIFACTS["phantom_preview"].path, sec, "phantom images (contact sheet)")
    if preview:
        sec.present = True
        sec.figures.append(preview)


def _label_stats(run: RunFiles, sec: Section, rel: str, d: dict[str, Any]) -> None:
    sec.present = True
    names = d.get("class_names") or []
    sec.fact("images", num(d.get("n"), pointer(rel, "n"), 0, "int"))
    sec.fact("classes", text(str(len(names))))
    sec.fact("images with 3+ findings", num(d.get("n_ge3"), pointer(rel, "n_ge3"), 0, "int"))
    sec.fact("task", text(d.get("task")))
    sec.fact("split", text(d.get("split")))
    sec.fact("dataset", text(d.get("spec")))
    t = Table(["class", "positives", "known labels", "prevalence"], key="prevalence",
              title="Prevalence")
    for i, n in enumerate(names):
        t.add(text(n), num(_get(d, "counts", i), pointer(rel, "counts", i), 0, "int"),
              num(_get(d, "known", i), pointer(rel, "known", i), 0, "int"),
              num(_get(d, "prevalence", i), pointer(rel, "prevalence", i), 4))
    sec.tables.append(t)
    hist = d.get("findings_histogram")
    if isinstance(hist, list) and hist:
        t = Table(["findings per image", "images"], key="findings_histogram",
                  title="Findings per image")
        for m, v in enumerate(hist):
            t.add(text(str(m)), num(v, pointer(rel, "findings_histogram", m), 0, "int"))
        sec.tables.append(t)
    never = d.get("never_cooccur")
    if isinstance(never, list) and never:
        t = Table(["class A", "class B"], key="never_cooccur",
                  title=f"Pairs that never co-occur ({len(never)})")
        for p in never[:40]:
            if isinstance(p, (list, tuple)) and len(p) == 2:
                t.add(text(p[0]), text(p[1]))
        if len(never) > 40:
            t.caption = f"first 40 of {len(never)}"
        sec.tables.append(t)
    for png, cap in (("jaccard.png", "Jaccard index of label pairs"),
                     ("cooccurrence.png", "co-occurrence counts")):
        fig = run.figure(f"data/stats/{png}", sec, cap)
        if fig:
            sec.figures.append(fig)


def _baseline(run: RunFiles, sec: Section) -> None:
    rel, d = run.doc("baseline_metrics", sec)
    card_rel, card = run.doc("baseline_card", sec)
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
    t.add(text("macro", cls="good"), text(""), num(mac.get("auroc"), pointer(rel, "macro", "auroc")),
          ci(mac.get("auroc_ci"), pointer(rel, "macro", "auroc_ci")),
          num(mac.get("ap"), pointer(rel, "macro", "ap")),
          ci(mac.get("ap_ci"), pointer(rel, "macro", "ap_ci")), text(""),
          num(mac.get("sensitivity"), pointer(rel, "macro", "sensitivity")),
          num(mac.get("specificity"), pointer(rel, "macro", "specificity")),
          num(mac.get("f1"), pointer(rel, "macro", "f1")), text(""))
    sec.tables.append(t)
    from medscalpel.report.figures import metrics_figure

    sec.grid = False
    _drawn(sec, lambda: metrics_figure(d), "per-class AUROC with 95% bootstrap CIs "
           "(dashed: macro)", rel)


def _calibration(run: RunFiles, sec: Section) -> None:
    rel, d = run.doc("calibration", sec)
    if not isinstance(d, dict):
        return
    sec.present = True
    cal = d.get("calibrator") or {}
    ev = d.get("evaluation") or {}
    sec.fact("method", text(_get(cal, "params", "method")))
    sec.fact("fitted on", text(d.get("fit_split")))
    sec.fact("evaluated on", text(ev.get("split")))
    m = ev.get("macro") or {}
    for key, label in (("f1", "macro F1"), ("recall", "macro recall")):
        sec.fact(f"{label} at 0.5", num(_get(m, "default", key), pointer(rel, "evaluation", "macro",
                                                                        "default", key)))
        sec.fact(f"{label} calibrated", num(_get(m, "calibrated", key),
                                            pointer(rel, "evaluation", "macro", "calibrated", key)))
        if H.is_number(_get(m, "ratio", key)):
            sec.fact(f"{label} ratio", num(_get(m, "ratio", key),
                                           pointer(rel, "evaluation", "macro", "ratio", key), 2,
                                           "ratio"))
    rows = ev.get("classes")
    if isinstance(rows, list) and rows:
        t = Table(["class", "threshold", "F1 @0.5", "F1", "recall @0.5", "recall",
                   "precision @0.5", "precision"], key="calibration",
                  title="Calibrated thresholds (held-out evaluation)")
        for i, r in enumerate(rows):
            p = lambda *k: pointer(rel, "evaluation", "classes", i, *k)  # noqa: E731
            t.add(text(r.get("class")), num(r.get("threshold"), p("threshold")),
                  num(_get(r, "default", "f1"), p("default", "f1")),
                  num(_get(r, "calibrated", "f1"), p("calibrated", "f1")),
                  num(_get(r, "default", "recall"), p("default", "recall")),
                  num(_get(r, "calibrated", "recall"), p("calibrated", "recall")),
                  num(_get(r, "default", "precision"), p("default", "precision")),
                  num(_get(r, "calibrated", "precision"), p("calibrated", "precision")))
        sec.tables.append(t)
    elif isinstance(cal.get("thresholds"), list):
        t = Table(["class", "threshold"], key="calibration", title="Calibrated thresholds")
        for i, thr in enumerate(cal["thresholds"]):
            t.add(text(_get(cal, "class_names", i)),
                  num(thr, pointer(rel, "calibrator", "thresholds", i)))
        sec.tables.append(t)


def _compression(run: RunFiles, sec: Section) -> None:
    rel, d = run.doc("compress", sec)
    if not isinstance(d, dict):
        return
    sec.present = True
    rows = [r for r in (d.get("rows") or []) if isinstance(r, dict)]
    dense = d.get("dense") if isinstance(d.get("dense"), dict) else None
    cols = ["method", "parameters", "params ratio", "MACs", "latency (ms)", "speedup",
            "macro AUROC", "95% CI", "\u0394 macro AUROC", "paired 95% CI", "max |\u0394 logit|"]
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
        sec.notes.append(f"Latency ratios of {', '.join(map(str, noisy))} varied by more than "
                         "20% between alternated rounds (machine load): treat those speedups as "
                         "noisy and measure again on an idle machine.")
    sec.fact("compressed models", text(str(len(rows))))
    sec.tables.append(t)
    from medscalpel.report.figures import pareto_figure

    sec.grid = False
    _drawn(sec, lambda: pareto_figure(rows, dense), "macro AUROC (95% CI) against the parameters "
           "ratio and the latency ratio; dashed: Pareto front", rel)
    ex_rel, ex = run.doc("export", sec)
    if isinstance(ex, dict):
        et = Table(["key", "value"], key="export", title="ONNX export")
        for k, v in ex.items():
            if isinstance(v, bool):
                et.add(text(k), _yes_no(v))
            elif H.is_number(v):
                et.add(text(k), num(v, pointer(ex_rel, k), 4 if abs(v) >= 1e-3 or v == 0 else 2,
                                    "fixed" if abs(v) >= 1e-3 or v == 0 else "sci"))
            elif isinstance(v, str) and len(v) < 120:
                et.add(text(k), text(v))
        if et.rows:
            sec.tables.append(et)


def _forgettability(run: RunFiles, sec: Section) -> None:
    base = "audit/forgettability"
    rel, d = run.doc("forgettability", sec)
    pngs = run.pngs(base, ("audit_curves.png", "audit_curves_overview.png",
                           "audit_scatter.png", "audit_fcd_heatmap.png", "audit_fcd_scatter.png"))
    if not isinstance(d, dict) and not pngs:
        return
    sec.present = True
    if isinstance(d, dict):
        sec.fact("method", text(d.get("method")))
        sec.fact(d.get("level_name") or "levels", text(_short_list(d.get("levels"))))
        sec.fact("seeds", text(str(len(d.get("seeds") or []))))
        sec.fact("drop threshold", num(d.get("drop_threshold"), pointer(rel, "drop_threshold"), 2))
        sec.fact("images", num(d.get("n_images"), pointer(rel, "n_images"), 0, "int"))
        order = d.get("forgotten_first_to_last")
        if isinstance(order, list):
            sec.fact("forgotten first", text(", ".join(str(o) for o in order[:3])))
        t = Table(["class", "prevalence", "positives (eval)", "AP (dense)", "first drop at",
                   "relative \u0394AP at max", "\u0394AP at max"], key="forgettability",
                  title="Forgettability per class")
        for i, r in enumerate(d.get("table") or []):
            if not isinstance(r, dict):
                continue
            p = lambda k: pointer(rel, "table", i, k)  # noqa: E731
            fd = r.get("first_drop")
            t.add(text(r.get("class")), num(r.get("prevalence"), p("prevalence"), 4),
                  num(r.get("n_pos_eval"), p("n_pos_eval"), 0, "int"),
                  num(r.get("ap_ref_median"), p("ap_ref_median")),
                  num(fd, p("first_drop"), 2) if H.is_number(fd) else text("never", cls="good"),
                  num(r.get("delta_at_max"), p("delta_at_max"), 3, "signed"),
                  num(r.get("abs_delta_ap_at_max"), p("abs_delta_ap_at_max"), 3, "signed"))
        sec.tables.append(t)
        corr = d.get("correlations")
        if isinstance(corr, dict) and corr:
            ct = Table(["relation", "n", "Spearman \u03c1", "95% CI", "p", "Pearson r"],
                       key="correlations", title="Forgettability vs prevalence")
            for k, c in corr.items():
                if not isinstance(c, dict):
                    continue
                p = lambda f: pointer(rel, "correlations", k, f)  # noqa: E731
                ct.add(text(k.replace("_", " ")), num(c.get("n"), p("n"), 0, "int"),
                       num(c.get("spearman_rho"), p("spearman_rho")),
                       ci(c.get("spearman_ci"), p("spearman_ci")),
                       num(c.get("spearman_p"), p("spearman_p"), 2, "sci"),
                       num(c.get("pearson_r"), p("pearson_r")))
            sec.tables.append(ct)
    for png in pngs:
        fig = run.figure(png, sec, Path(png).stem.replace("_", " "))
        if fig:
            sec.figures.append(fig)
    if not pngs and isinstance(d, dict):
        from medscalpel.report.figures import forgettability_figure

        _drawn(sec, lambda: forgettability_figure(d), "median relative change in AP per class",
               rel)


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


def _pies(run: RunFiles, sec: Section) -> None:
    base = "audit/pies"
    rel, d = run.doc("pies", sec)
    pngs = run.pngs(base, ("pie_gallery.png", "audit_pie_gallery.png", "audit_pie_scores.png",
                          "audit_pie_overrep.png"))
    if not isinstance(d, dict) and not pngs:
        return
    sec.present = True
    for png in pngs:
        fig = run.figure(png, sec, "PIE gallery (most disagreeing images first)"
                         if png.endswith("pie_gallery.png") else Path(png).stem.replace("_", " "))
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
                           ("findings_overrepresentation", "Number of findings in PIEs vs overall")):
            t = _overrep_table(rel, key, d.get(key), title)
            if t is not None:
                sec.tables.append(t)
        pies = d.get("pies")
        if isinstance(pies, list) and pies:
            t = Table(["image", "score", "labels", "decision flip", "dense top", "compressed top"],
                      key="pies", title=f"PIEs ({len(pies)}; first 15)")

            def top(v: Any) -> str:
                if not isinstance(v, list):
                    return "-"
                return ", ".join(f"{x[0]} {H.fmt_num(x[1], 2)}" for x in v
                                 if isinstance(x, list) and len(x) == 2)

            for i, r in enumerate(pies[:15]):
                if isinstance(r, dict):
                    t.add(text(r.get("id")), num(r.get("score"), pointer(rel, "pies", i, "score")),
                          text(", ".join(map(str, r.get("labels") or [])) or "no finding"),
                          _yes_no(r.get("flip"), good_if=False), text(top(r.get("dense_top"))),
                          text(top(r.get("compressed_top"))))
            sec.tables.append(t)
    gts = sorted(g for g in run.path(base).rglob("*ground_truth*.json") if g.is_file()) \
        if run.path(base).is_dir() else []
    for g in gts[:1]:
        grel = g.relative_to(run.root).as_posix()
        gd = run.json(grel, sec)
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
                              num(v, pointer(grel, test, k), 3 if style == "fixed" else 2, style))
        for k, v in (gd.get("supports") or {}).items():
            t.add(text(k.replace("_", " ")), text("supports PruneCXR"), _yes_no(v))
        if t.rows:
            sec.tables.append(t)


def _cams(run: RunFiles, sec: Section) -> None:
    base = "explain/cams"
    pngs = run.pngs(base)
    jsons = sorted(p.name for p in run.path(base).glob("*.json")) \
        if run.path(base).is_dir() else []
    if not pngs and not jsons:
        return
    sec.present = True
    for png in pngs:
        fig = run.figure(png, sec, Path(png).stem.replace("_", " "))
        if fig:
            sec.figures.append(fig)
    for name in jsons:
        rel = f"{base}/{name}"
        d = run.json(rel, sec)
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
            sec.fact(f"atlas fallbacks ({name})", num(n_fb, pointer(rel, "n_atlas_fallback"), 0,
                                                       "int"))


def _polarity_result(rel: str, d: dict[str, Any], prefix: tuple[Any, ...], sec: Section,
                     label: str = "") -> None:
    p = lambda *k: pointer(rel, *prefix, *k)  # noqa: E731
    rule = d.get("rule")
    if isinstance(rule, dict):
        params = ", ".join(f"{k}={v}" for k, v in rule.items() if k != "name")
        sec.fact(f"strong-weight rule{label}",
                 text(f"{rule.get('name', '?')} ({params})" if params else rule.get("name")))
    sec.fact(f"Jaccard bounds{label}", text(_short_list(d.get("bounds"))))
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
        t.add(text(c), num(_get(counts, "channels", c), p("counts", "channels", c), 0, "int"),
              num(_get(counts, "triples", c), p("counts", "triples", c), 0, "int"),
              *[num(_get(nulls, k, "mean_counts", c), p("nulls", k, "mean_counts", c), 1)
                for k in null_keys],
              pct(_get(d, "all_class_pairs", c), p("all_class_pairs", c)))
    sec.tables.append(t)
    if nulls:
        nt = Table(["null model", "exclusive share observed", "exclusive share null",
                    "enrichment", "p"], key="polarity_nulls", title=f"Against the null models{label}")
        for k, s in nulls.items():
            if isinstance(s, dict):
                nt.add(text(k), pct(s.get("exclusive_fraction_observed"),
                                    p("nulls", k, "exclusive_fraction_observed")),
                       pct(s.get("exclusive_fraction_null"), p("nulls", k, "exclusive_fraction_null")),
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
                       text(r.get("category"), cls="bad" if r.get("category") == "conflict" else ""))
        sec.tables.append(ct)


def _polarity(run: RunFiles, sec: Section) -> None:
    base = "explain/polarity"
    rel, d = run.doc("polarity", sec)
    pngs = run.pngs(base)
    if not isinstance(d, dict) and not pngs:
        return
    sec.present = True
    if isinstance(d, dict) and isinstance(d.get("stages"), dict):
        recs = d.get("table_channels")
        if isinstance(recs, list) and recs:
            cols = [c for c in recs[0].keys()]
            t = Table(cols, key="polarity_stages", title="Polarized channels per compression stage")
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
        fig = run.figure(png, sec, Path(png).stem.replace("_", " "))
        if fig:
            sec.figures.append(fig)


def _repair(run: RunFiles, sec: Section) -> None:
    s_rel, s = run.doc("surgery", sec)
    t_rel, tr = run.doc("triage", sec)
    if not isinstance(s, dict) and not isinstance(tr, dict):
        return
    sec.present = True
    if isinstance(s, dict):
        plan = s.get("plan") or {}
        ladder = s.get("ladder") if isinstance(s.get("ladder"), dict) else None
        sec.fact("surgery: class", text(plan.get("class") or _get(s, "settings", "class")))
        if ladder is not None:
            st = ladder.get("status")
            sec.fact("surgery: outcome", text(
                {"full": "goal met (strictest goal)", "partial": "PARTIAL: only a relaxed "
                 "fallback goal was met", "failed": "failed: no goal met"}.get(st, st),
                cls="good" if st == "full" else "bad"))
        else:
            sec.fact("surgery: success", _yes_no(s.get("success")))
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
        sec.fact("target images", num(_get(s, "targets", "n"), pointer(s_rel, "targets", "n"), 0,
                                      "int"))
        sec.fact("mean \u0394 probability", num(_get(s, "targets", "delta_prob_mean"),
                                                pointer(s_rel, "targets", "delta_prob_mean"), 3,
                                                "signed"))
        sec.fact("true positives lost", num(_get(s, "true_positives", "lost"),
                                            pointer(s_rel, "true_positives", "lost"), 0, "int"))
        sec.fact("other classes' logits identical", _yes_no(s.get("other_logits_identical")))
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
                lt.add(text(a.get("goal_text")), _yes_no(a.get("success")),
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
                t.add(text(c), num(_get(plan, "old_weights", i),
                                   pointer(s_rel, "plan", "old_weights", i), 4, "signed"),
                      num(_get(plan, "scores", i), pointer(s_rel, "plan", "scores", i), 4))
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
    if isinstance(tr, dict):
        sec.fact("triage seconds", num(tr.get("seconds"), pointer(t_rel, "seconds"), 2))
        classes = [c for c in (tr.get("classes") or []) if isinstance(c, dict)]
        with_issue = [c for c in classes if c.get("issues")]
        sec.fact("classes with issues", text(f"{len(with_issue)} of {len(classes)}"))
        n_sel, n_rep = _get(tr, "settings", "n_selection"), _get(tr, "settings", "n_report")
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
                       num(_get(c, "report_before", m),
                           pointer(t_rel, "classes", i, "report_before", m), 3),
                       num(_get(c, "report_after", m),
                           pointer(t_rel, "classes", i, "report_after", m), 3),
                       num(g, pointer(t_rel, "classes", i, "report_gain", m), 3, "signed"))
        if rt.rows:
            sec.tables.append(rt)
        cur = _get(tr, "costs_after", "current")
        if isinstance(cur, dict) and cur:
            ct = Table(["treatment", "initial cost", "learned cost", "runs"], key="costs",
                       title="Cost matrix (learned from measured run times)")
            for k, v in cur.items():
                ct.add(text(k), num(_get(tr, "costs_after", "initial", k),
                                    pointer(t_rel, "costs_after", "initial", k), 2),
                       num(v, pointer(t_rel, "costs_after", "current", k), 2),
                       num(_get(tr, "costs_after", "runs", k),
                           pointer(t_rel, "costs_after", "runs", k), 0, "int")
                       if H.is_number(_get(tr, "costs_after", "runs", k)) else num(0, "", 0, "int"))
            sec.tables.append(ct)
        if run.exists("repair/triage/decision_log.md"):
            sec.links.append(Link(run.href("repair/triage/decision_log.md"), "decision_log.md",
                                  "the same log as a Markdown table"))


def _distill_acceptance(rel: str, tg: dict[str, Any], sec: Section) -> None:
    """The student's acceptance: one outcome and the evidence of each check (a verdict, never
    a point estimate; an older file without verdicts is labelled as such)."""
    if "outcome" not in tg:
        if "all_met" in tg:
            sec.fact("targets (older file: point estimates only, no verdict)",
                     text("point estimates within targets" if tg.get("all_met") is True else
                          "point estimates not within targets", cls="muted"))
        return
    sec.fact("student acceptance", outcome_cell(tg.get("outcome"), str(tg.get("reason") or "")))
    par = tg.get("param_ratio") if isinstance(tg.get("param_ratio"), dict) else {}
    sec.fact("parameters", outcome_cell(par.get("outcome"), str(par.get("reason") or "")))
    sp = tg.get("speed") if isinstance(tg.get("speed"), dict) else {}
    sec.fact("speed (per-round ratios)", outcome_cell(sp.get("outcome"),
                                                     str(sp.get("reason") or "")))
    if isinstance(sp.get("ratios"), list) and sp["ratios"]:
        sec.fact("speedup per round", text(", ".join(H.fmt_num(r, 2) for r in sp["ratios"])))
    au = tg.get("auroc") if isinstance(tg.get("auroc"), dict) else None
    if au is not None:
        sec.fact("AUROC non-inferiority", outcome_cell(au.get("outcome")))
        sec.notes.append(f"Distilled student, AUROC verdict: {verdict_line(au)}")
        vt = verdict_table(rel, au, ("targets", "auroc"), "distill_auroc_verdict",
                           "Distilled student vs teacher: AUROC non-inferiority per class and "
                           "macro (paired, same test images)")
        if vt is not None:
            sec.tables.append(vt)


def _distill(run: RunFiles, sec: Section) -> None:
    rel, d = run.doc("distill", sec)
    if not isinstance(d, dict):
        return
    sec.present = True
    t = Table(["model", "architecture", "parameters", "params ratio", "MACs", "latency (ms)",
               "speedup", "macro AUROC", "95% CI", "macro AP"], key="distill",
              title="Teacher and students (same test split)")
    teacher = d.get("teacher") if isinstance(d.get("teacher"), dict) else None

    def add(name: str, m: dict[str, Any], *path: Any) -> None:
        p = lambda *k: pointer(rel, *path, *k)  # noqa: E731
        t.add(text(name), text(m.get("arch")), num(m.get("parameters"), p("parameters"), 0, "int"),
              num(m.get("param_ratio", 1.0 if name == "teacher" else None), p("param_ratio"))
              if "param_ratio" in m else (num(1.0) if name == "teacher" else text(None)),
              num(m.get("macs"), p("macs"), 0, "int"),
              num(m.get("latency_ms"), p("latency_ms"), 2),
              num(m.get("speedup"), p("speedup"), 2, "ratio") if "speedup" in m
              else (num(1.0, "", 2, "ratio") if name == "teacher" else text(None)),
              num(_get(m, "metrics", "auroc"), p("metrics", "auroc"), 4),
              ci(_get(m, "metrics", "auroc_ci"), p("metrics", "auroc_ci")),
              num(_get(m, "metrics", "ap"), p("metrics", "ap"), 4))

    if teacher:
        add("teacher", teacher, "teacher")
    students = d.get("students") if isinstance(d.get("students"), dict) else {}
    for name, m in students.items():
        if isinstance(m, dict):
            add(f"student ({name})", m, "students", name)
    sec.tables.append(t)
    tg = d.get("targets") if isinstance(d.get("targets"), dict) else {}
    for key, label in (("max_param_ratio", "target params ratio \u2264"),
                       ("min_speedup", "target speedup \u2265"),
                       ("max_auroc_drop", "target AUROC drop \u2264")):
        if H.is_number(tg.get(key)):
            sec.fact(label, num(tg[key], pointer(rel, "targets", key), 2))
    _distill_acceptance(rel, tg, sec)
    dist = _get(d, "students", "distilled")
    if isinstance(dist, dict) and H.is_number(dist.get("auroc_drop")):
        sec.fact("AUROC drop (distilled, point estimate)", num(dist["auroc_drop"],
                                               pointer(rel, "students", "distilled", "auroc_drop"),
                                               4, "signed"))
    sal = d.get("saliency")
    if isinstance(sal, dict) and sal:
        st = Table(["student", "measure", "value"], key="saliency",
                   title="Teacher-student saliency agreement")
        for name, block in sal.items():
            if isinstance(block, dict):
                for k, v in block.items():
                    if H.is_number(v) and not isinstance(v, bool):
                        st.add(text(name), text(k), num(v, pointer(rel, "saliency", name, k)))
                    elif isinstance(v, str):
                        st.add(text(name), text(k), text(v))
        if st.rows:
            sec.tables.append(st)
    for png in run.pngs("distill"):
        fig = run.figure(png, sec, Path(png).stem.replace("_", " "))
        if fig:
            sec.figures.append(fig)


def _clinical(run: RunFiles, sec: Section, max_examples: int) -> None:
    base = "reports/clinical"
    d = run.path(base)
    if not d.is_dir():
        return
    reports = []
    for p in sorted(d.glob("*.json")):
        if p.name == "index.json":
            continue
        rel = f"{base}/{p.name}"
        doc = run.json(rel, sec)
        if isinstance(doc, dict) and doc.get("kind") == "clinical_report":
            reports.append((rel, doc))
    if not reports and not (d / "index.html").is_file():
        return
    sec.present = True
    sec.fact("reports", text(str(len(reports))))
    disclaimer = next((doc.get("disclaimer") for _, doc in reports if doc.get("disclaimer")),
                      H.DECISION_SUPPORT)
    sec.intro = disclaimer
    t = Table(["image", "finding", "probability", "threshold", "location",
               "conflicts / hidden"], key="clinical",
              title=f"Example reports (first {min(max_examples, len(reports))})")
    if any((doc.get("operating") or {}).get("notice") for _, doc in reports):
        sec.fact("thresholds", text("not calibrated (default 0.5)", cls="bad"))
    for rel, doc in reports[:max_examples]:
        fs = doc.get("findings") or []
        excl = "; ".join(f"hidden: {e.get('class')} (vs {e.get('excluded_by')}, lift "
                         f"{H.fmt_num(e.get('lift'), 3)})" for e in doc.get("excluded") or []
                         if isinstance(e, dict))
        if not fs:
            t.add(text(doc.get("id")), text("none above threshold", cls="muted"), text(""),
                  text(""), text(""), text(excl or "-"))
        for j, f in enumerate(fs):
            if isinstance(f, dict):
                p = lambda k: pointer(rel, "findings", j, k)  # noqa: E731
                flags = ", ".join("conflict: " + str(c.get("with")) for c in
                                  f.get("conflicts") or [] if isinstance(c, dict))
                t.add(text(doc.get("id")), text(f.get("class")),
                      num(f.get("probability"), p("probability")),
                      num(f.get("threshold"), p("threshold")), text(f.get("location")),
                      text("; ".join(x for x in (flags, excl) if x) or "-"))
        html_name = doc.get("html") or f"{Path(rel).stem}.html"
        if run.exists(f"{base}/{html_name}"):
            sec.links.append(Link(run.href(f"{base}/{html_name}"), str(doc.get("id")),
                                  f"{len(fs)} finding(s)"))
    sec.tables.append(t)
    sec.links_title = "Full reports (files in the run directory)"
    if (d / "index.html").is_file():
        sec.links.insert(0, Link(run.href(f"{base}/index.html"), "index of all clinical reports"))


#: (key, title, expected files, builder)
SECTIONS: list[tuple[str, str, list[str], Callable[..., None]]] = [
    ("overview", "Run overview", ["demo"], _overview),
    ("dataset", "Dataset statistics", ["label_stats", "data/stats/jaccard.png"],
     _dataset),
    ("baseline", "Baseline per-class metrics", ["baseline_metrics"], _baseline),
    ("calibration", "Threshold calibration", ["calibration"], _calibration),
    ("site_shift", "External site: validation, shift check, k-shot recalibration",
     ["site_shift"], render_site_shift),
    ("compression", "Compression and Pareto plot", ["compress"], _compression),
    ("deployment", "Deployment: CPU runtimes and precisions", ["deploy"], render_deployment),
    ("forgettability", "Forgettability curves", ["forgettability"],
     _forgettability),
    ("changes", "What compression changed", ["changes"], render_changes),
    ("pies", "Pruning-identified exemplars (PIE gallery)",
     ["pies", "audit/pies/pie_gallery.png"], _pies),
    ("cams", "Class activation maps", ["explain/cams/*.png"], _cams),
    ("polarity", "Polarized classifier channels", ["polarity"], _polarity),
    ("repair", "Repair: surgery and triage log",
     ["surgery", "triage"], _repair),
    ("distill", "Knowledge distillation", ["distill"], _distill),
    ("clinical", "Example clinical reports", ["reports/clinical/*.json"], _clinical),
]


