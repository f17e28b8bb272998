"""The experiment report's headline: the few lines a reader needs before any table.

What was compressed (model, methods), how much faster (with the interval the artifacts hold),
what it cost on the internal test split and on an external site, what it forgot, and which
verdicts are undecided or were not measured. Every number is a :class:`~medscalpel.report.html.
Cell` read from a declared artifact (:mod:`medscalpel.layout`) and carries the JSON pointer of
its value (the same ``data-src`` mechanism as the sections), and every line says what it was
measured on. An artifact that is absent makes its line say "not measured"; one that does not
read as its declaration makes it say "unreadable" (never a guess).

Example:
    >>> run = RunFiles(Path("runs/demo"), Path("runs/demo/report.html"))  # doctest: +SKIP
    >>> hl = build_headline(run)  # doctest: +SKIP
    >>> [i.key for i in hl.items]  # doctest: +SKIP
    ['compressed', 'faster', 'cost_internal', 'cost_external', 'forgot', 'open']
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from medscalpel.errors import DataError
from medscalpel.layout import artifact, read_artifact
from medscalpel.report import html as H
from medscalpel.report.page import RunFiles, pointer
from medscalpel.report.html import Cell, ci, num, pct

#: the artifacts the headline reads, in the order of its lines
INPUTS = ("calibrated_card", "baseline_card", "compress", "deploy", "distill", "site_shift",
          "forgettability", "pies", "changes", "guarantee_check")
#: stages whose absence the last line names as "not measured"
MEASURES = {"compress": "compression table", "deploy": "deployment benchmark",
            "site_shift": "external site", "forgettability": "forgettability",
            "pies": "pruning-identified exemplars", "changes": "what compression changed"}


@dataclass
class HeadlineItem:
    """One line of the headline: text and number cells, what it was measured on, a status
    (``""``, ``undecided``, ``not measured``, ``unreadable``) and the files it read."""

    key: str
    label: str
    parts: list[Cell] = field(default_factory=list)
    measured_on: list[Cell] = field(default_factory=list)
    status: str = ""
    sources: list[str] = field(default_factory=list)

    def t(self, s: str, cls: str = "") -> "HeadlineItem":
        self.parts.append(Cell(s, cls=cls))
        return self

    def c(self, cell: Cell) -> "HeadlineItem":
        self.parts.append(cell)
        return self

    def on(self, *cells: Cell | str) -> None:
        if self.measured_on:
            self.measured_on.append(Cell("; "))
        self.measured_on += [c if isinstance(c, Cell) else Cell(c) for c in cells]

    def sep(self, s: str = "; ") -> None:
        if self.parts:
            self.t(s)

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "text": self.text,
                "measured_on": "".join(c.text for c in self.measured_on),
                "status": self.status, "sources": list(self.sources)}


@dataclass
class Headline:
    items: list[HeadlineItem]

    def item(self, key: str) -> HeadlineItem:
        return next(i for i in self.items if i.key == key)

    def to_dict(self) -> dict[str, Any]:
        return {"items": [i.to_dict() for i in self.items]}


class _Docs:
    """The headline's artifacts: validated through their declaration, kept as the raw JSON the
    pointers refer to; absent -> ``None``; unreadable -> ``None`` and a reason."""

    def __init__(self, run: RunFiles):
        self.run = run
        self.rel: dict[str, str] = {}
        self.doc: dict[str, dict[str, Any] | None] = {}
        self.error: dict[str, str] = {}
        for key in INPUTS:
            rel = artifact(key).locate(run.root)
            self.doc[key] = None
            if rel is None:
                continue
            self.rel[key] = rel
            try:
                read_artifact(run.root, key)
                d = json.loads(run.path(rel).read_text(encoding="utf-8"))
            except (DataError, OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError,
                    TypeError, ValueError, AttributeError) as exc:
                self.error[key] = f"{rel} unreadable ({type(exc).__name__})"
                continue
            self.doc[key] = d if isinstance(d, dict) else None

    def __getitem__(self, key: str) -> dict[str, Any] | None:
        return self.doc[key]

    def p(self, key: str, *keys: Any) -> str:
        return pointer(self.rel[key], *keys)

    def used(self, item: HeadlineItem, *keys: str) -> None:
        for k in keys:
            if self.doc.get(k) is not None and self.rel[k] not in item.sources:
                item.sources.append(self.rel[k])


def _get(d: Any, *keys: Any) -> Any:
    for k in keys:
        if isinstance(d, dict) and k in d:
            d = d[k]
        elif isinstance(d, list) and isinstance(k, int) and 0 <= k < len(d):
            d = d[k]
        else:
            return None
    return d


def _rows(d: dict[str, Any] | None) -> list[tuple[int, dict[str, Any]]]:
    rows = d.get("rows") if isinstance(d, dict) else None
    return [(i, r) for i, r in enumerate(rows or []) if isinstance(r, dict)]


def _chosen(dep: dict[str, Any] | None) -> tuple[int, dict[str, Any]] | None:
    if not isinstance(dep, dict) or not dep.get("recommended"):
        return None
    for i, v in enumerate(dep.get("variants") or []):
        if isinstance(v, dict) and v.get("name") == dep["recommended"]:
            return i, v
    return None


def _ci_verdict(lo: Any, hi: Any) -> tuple[str, str]:
    """What a delta's CI says: a loss / gain when it excludes 0, else no difference shown."""
    if not (H.is_number(lo) and H.is_number(hi)):
        return "no interval", "muted"
    if lo == hi == 0:
        return "no change (identical on every resample)", "good"
    if hi < 0:
        return "a loss", "bad"
    if lo > 0:
        return "a gain", "good"
    return "no difference shown (interval holds 0)", "muted"


# ----------------------------------------------------------------------------- lines
def _compressed(d: _Docs) -> HeadlineItem:
    it = HeadlineItem("compressed", "What was compressed")
    ck = "calibrated_card" if d["calibrated_card"] is not None else "baseline_card"
    card = d[ck]
    if card is not None:
        it.t(f"{card.get('arch', '?')} (model {str(card.get('model_id') or '?')[:12]}, ")
        it.c(num(card.get("num_parameters"), d.p(ck, "num_parameters"), 0, "int"))
        it.t(" parameters)")
        d.used(it, ck)
    comp = d["compress"]
    if comp is not None:
        measured = [(i, r) for i, r in _rows(comp) if not r.get("refused")]
        refused = [r.get("method") for _, r in _rows(comp) if r.get("refused")]
        it.sep(" with ")
        for n, (i, r) in enumerate(measured):
            it.t(("" if n == 0 else ", ") + f"{r.get('method')} (")
            it.c(num(r.get("params_ratio"), d.p("compress", "rows", i, "params_ratio"), 2))
            it.t(" of the parameters)")
        if refused:
            it.t(f"; refused: {', '.join(map(str, refused))}", cls="bad")
        it.on(f"{artifact('compress').path} (params ratio = compressed / dense parameter "
              "count)")
        d.used(it, "compress")
    ch = _chosen(d["deploy"])
    if ch is not None:
        it.sep()
        it.t(f"served as {ch[1].get('name')}")
        it.on(f"{artifact('deploy').path} (recommended variant)")
        d.used(it, "deploy")
    dist = d["distill"]
    if dist is not None and isinstance(dist.get("students"), dict):
        it.sep()
        it.t("distilled into " + ", ".join(f"student '{k}' ({_get(v, 'arch') or '?'})"
                                            for k, v in dist["students"].items()))
        d.used(it, "distill")
    if not it.parts:
        it.status = "not measured"
        it.t("not measured: no model card, compression table, deployment or distillation "
             "in this run", cls="muted")
    return it


def _faster(d: _Docs) -> HeadlineItem:
    it = HeadlineItem("faster", "How much faster")
    comp = d["compress"]
    if comp is not None:
        rows = [(i, r) for i, r in _rows(comp) if not r.get("refused") and
                H.is_number(r.get("speedup"))]
        for n, (i, r) in enumerate(rows):
            p = lambda *k: d.p("compress", "rows", i, *k)  # noqa: E731
            it.t(("" if n == 0 else "; ") + f"{r.get('method')} ")
            it.c(num(r.get("speedup"), p("speedup"), 2, "ratio"))
            if H.is_number(r.get("latency_spread")):
                it.t(" (round-to-round spread ")
                it.c(pct(r["latency_spread"], p("latency_spread")))
                it.t(")")
            if r.get("latency_noisy"):
                it.t(" NOISY: undecided", cls="bad")
                it.status = "undecided"
        if rows:
            dense = comp.get("dense") if isinstance(comp.get("dense"), dict) else {}
            it.on(Cell("CPU latency alternated with the dense model ("),
                  num(dense.get("latency_ms"), d.p("compress", "dense", "latency_ms"), 2),
                  Cell(f" ms) in the compression run, {artifact('compress').path}; no "
                       "interval recorded there"))
            d.used(it, "compress")
    dep, ch = d["deploy"], _chosen(d["deploy"])
    if ch is not None:
        i, v = ch
        b0 = f"b{_get(dep, 'batches', 0)}"
        sr = _get(v, "speed", b0, "vs_torch")
        it.sep()
        it.t(f"served {v.get('name')} vs torch fp32 ")
        if isinstance(sr, dict) and H.is_number(sr.get("ratio")):
            p = lambda *k: d.p("deploy", "variants", i, "speed", b0, "vs_torch", *k)  # noqa: E731
            it.c(num(sr["ratio"], p("ratio"), 2, "ratio")).t(" [")
            it.c(num(sr.get("low"), p("low"), 2, "ratio")).t(", ")
            it.c(num(sr.get("high"), p("high"), 2, "ratio")).t("] (")
            it.c(pct(sr.get("confidence"), p("confidence"), 0))
            oc = sr.get("outcome", "?")
            it.t(" interval of the median per-round ratio: ")
            it.t(str(oc), cls="good" if oc == "faster" else ("muted" if oc == "undecided"
                                                              else "bad"))
            it.t(")")
            if oc == "undecided":
                it.status = "undecided"
        else:
            it.c(num(_get(v, "speedup_vs_torch", b0),
                     d.p("deploy", "variants", i, "speedup_vs_torch", b0), 2, "ratio"))
            it.t(" (no interval recorded)", cls="muted")
        cpu = _get(dep, "machine", "cpu", "model") or "CPU not recorded"
        it.on(f"batch {b0[1:]}, {dep.get('rounds')} alternated rounds x {dep.get('repeats')} "
              f"repeats, {dep.get('threads')} thread(s), {cpu}"
              + (", MEASURED UNDER LOAD" if dep.get("under_load") else "")
              + f" ({artifact('deploy').path})")
        d.used(it, "deploy")
    dist = d["distill"]
    if dist is not None and isinstance(dist.get("students"), dict):
        for name, s in dist["students"].items():
            if isinstance(s, dict) and H.is_number(s.get("speedup")):
                it.sep()
                it.t(f"distilled student {name} ")
                it.c(num(s["speedup"], d.p("distill", "students", name, "speedup"), 2, "ratio"))
        d.used(it, "distill")
    if not it.parts:
        it.status = "not measured"
        it.t("not measured: no latency in this run", cls="muted")
    return it


def _cost_internal(d: _Docs) -> HeadlineItem:
    it = HeadlineItem("cost_internal", "What it cost (internal data)")
    comp = d["compress"]
    if comp is not None:
        rows = [(i, r) for i, r in _rows(comp) if not r.get("refused") and
                H.is_number(r.get("delta_macro_auroc"))]
        for n, (i, r) in enumerate(rows):
            p = lambda k: d.p("compress", "rows", i, k)  # noqa: E731
            c = r.get("delta_macro_auroc_ci")
            it.t(("" if n == 0 else "; ") + f"{r.get('method')} \u0394 macro AUROC ")
            it.c(num(r["delta_macro_auroc"], p("delta_macro_auroc"), 4, "signed"))
            verdict, cls = _ci_verdict(*(c if isinstance(c, list) and len(c) == 2 else
                                         (None, None)))
            if verdict != "no interval":
                it.t(" ").c(ci(c, p("delta_macro_auroc_ci"), 4))
            it.t(f" ({verdict})", cls=cls)
        if rows:
            ev = comp.get("evaluated_on") or {}
            it.on(Cell(f"split '{ev.get('split', '?')}', "),
                  num(ev.get("n"), d.p("compress", "evaluated_on", "n"), 0, "int"),
                  Cell(" images, paired bootstrap (same images, compressed - dense)"))
            d.used(it, "compress")
    dep, ch = d["deploy"], _chosen(d["deploy"])
    if ch is not None and isinstance(ch[1].get("comparison"), dict):
        i, v = ch
        m = _get(v, "comparison", "macro") or {}
        p = lambda k: d.p("deploy", "variants", i, "comparison", "macro", k)  # noqa: E731
        it.sep()
        it.t(f"served {v.get('name')} \u0394 macro AUROC ")
        it.c(num(m.get("delta_auroc"), p("delta_auroc"), 4, "signed")).t(" ")
        it.c(ci(m.get("delta_auroc_ci"), p("delta_auroc_ci"), 4))
        it.t(f" (floor: status {v.get('status')})")
        it.on(Cell(f"deploy: split '{dep.get('split')}', "),
              num(dep.get("n_images"), d.p("deploy", "n_images"), 0, "int"),
              Cell(" images, paired"))
        d.used(it, "deploy")
    dist = d["distill"]
    drop = _get(dist, "students", "distilled", "auroc_drop")
    if H.is_number(drop):
        it.sep()
        it.t("distilled student: AUROC lower by ")
        it.c(num(drop, d.p("distill", "students", "distilled", "auroc_drop"), 4))
        it.t(" than the teacher (no interval recorded)", cls="muted")
        d.used(it, "distill")
    if not it.parts:
        it.status = "not measured"
        it.t("not measured: no paired accuracy comparison in this run", cls="muted")
    return it


def _cost_external(d: _Docs) -> HeadlineItem:
    it = HeadlineItem("cost_external", "External site")
    s = d["site_shift"]
    if s is None:
        it.status = "not measured"
        it.t(f"not measured: no external site in this run ({artifact('site_shift').path})",
             cls="muted")
        return it
    m = _get(s, "validation", "macro") or {}
    p = lambda *k: d.p("site_shift", "validation", "macro", *k)  # noqa: E731
    it.t("dense model macro AUROC internal ")
    it.c(num(_get(m, "internal", "auroc"), p("internal", "auroc")))
    it.t(" \u2192 external ")
    it.c(num(_get(m, "external", "auroc"), p("external", "auroc")))
    it.t(", \u0394 ")
    it.c(num(_get(m, "delta", "auroc", "value"), p("delta", "auroc", "value"), 3, "signed"))
    it.t(" ")
    it.c(ci(_get(m, "delta", "auroc", "ci"), p("delta", "auroc", "ci")))
    verdict, cls = _ci_verdict(*((_get(m, "delta", "auroc", "ci") or [None, None])[:2]))
    it.t(f" ({verdict})", cls=cls)
    rec = s.get("recalibration") or {}
    restored = rec.get("restored")
    if isinstance(restored, dict) and restored:
        ok = sum(bool(v) for v in restored.values())
        outcomes = rec.get("outcomes") or {}
        open_ = sum(1 for v in outcomes.values() if v == "undecided")
        it.t(f"; {rec.get('method', 'k-shot')} recalibration with k = ")
        it.c(num(rec.get("k"), d.p("site_shift", "recalibration", "k"), 0, "int"))
        it.t(f" labelled external images per class: restored (shown) in {ok} of "
             f"{len(restored)} classes" + (f", undecided in {open_}" if open_ else "")
             + ("" if outcomes else " (point-estimate flag of an older file)"),
             cls="good" if ok == len(restored) else "bad")
    if d["compress"] is not None:
        it.t("; the compressed models were not measured on the external site", cls="muted")
        it.status = "not measured"
    val = s.get("validation") or {}
    it.on(Cell(f"{s.get('internal_data')} test ("),
          num(_get(val, "internal", "n"), d.p("site_shift", "validation", "internal", "n"), 0,
              "int"),
          Cell(f" images) vs {s.get('external_data')} ("),
          num(_get(val, "external", "n"), d.p("site_shift", "validation", "external", "n"), 0,
              "int"),
          Cell(" images), unpaired bootstrap"))
    d.used(it, "site_shift")
    return it


def _forgot(d: _Docs) -> HeadlineItem:
    it = HeadlineItem("forgot", "What it forgot")
    f = d["forgettability"]
    if f is not None:
        table = [(i, r) for i, r in enumerate(f.get("table") or []) if isinstance(r, dict)]
        dropped = [(i, r) for i, r in table if H.is_number(r.get("first_drop"))]
        dropped.sort(key=lambda x: x[1]["first_drop"])
        levels = f.get("levels") or []
        lvl = f.get("level_name") or "level"
        it.t(f"{len(dropped)} of {len(table)} classes lost \u2265 ")
        it.c(pct(f.get("drop_threshold"), d.p("forgettability", "drop_threshold"), 0))
        it.t(f" of their AP (median relative change) by {lvl} ")
        it.c(num(levels[-1] if levels else None, d.p("forgettability", "levels",
                                                      len(levels) - 1), 2))
        for n, (i, r) in enumerate(dropped[:4]):
            it.t((": " if n == 0 else ", ") + f"{r.get('class')} at ")
            it.c(num(r["first_drop"], d.p("forgettability", "table", i, "first_drop"), 2))
        if len(dropped) > 4:
            it.t(f", ... ({len(dropped) - 4} more)")
        it.on(Cell(f"{f.get('method', '?')} compression levels, "),
              num(f.get("n_images"), d.p("forgettability", "n_images"), 0, "int"),
              Cell(f" images, {len(f.get('seeds') or [])} seed(s); class counts from the table "
                   f"of {artifact('forgettability').path}"))
        d.used(it, "forgettability")
    pies = d["pies"]
    if pies is not None:
        p = lambda k: d.p("pies", k)  # noqa: E731
        it.sep()
        it.c(num(pies.get("n_pies"), p("n_pies"), 0, "int")).t(" PIEs of ")
        it.c(num(pies.get("n_images"), p("n_images"), 0, "int")).t(" images, ")
        it.c(num(pies.get("n_flips"), p("n_flips"), 0, "int")).t(" decision flips (")
        it.c(num(pies.get("n_flips_among_pies"), p("n_flips_among_pies"), 0, "int"))
        it.t(" among the PIEs)")
        it.on(Cell(f"{pies.get('method', '?')} at level "), num(pies.get("level"), p("level"), 2),
              Cell(f", {artifact('pies').path}"))
        d.used(it, "pies")
    if not it.parts:
        it.status = "not measured"
        it.t("not measured: no forgettability or PIE audit in this run", cls="muted")
    return it


def _open(d: _Docs) -> HeadlineItem:
    """Undecided verdicts, then what was not measured (absent or unreadable artifacts)."""
    it = HeadlineItem("open", "Undecided or not measured")
    found: list[str] = []
    for _, r in _rows(d["compress"]):
        if r.get("refused"):
            continue
        if r.get("latency_noisy"):
            found.append(f"speed of {r.get('method')}: undecided (noisy timing)")
        c = r.get("delta_macro_auroc_ci")
        if isinstance(c, list) and len(c) == 2 and _ci_verdict(*c)[0].startswith("no diff"):
            found.append(f"accuracy change of {r.get('method')}: interval holds 0")
    dep = d["deploy"]
    if dep is not None:
        b0 = f"b{_get(dep, 'batches', 0)}"
        und = [v.get("name") for v in dep.get("variants") or [] if isinstance(v, dict)
               and _get(v, "speed", b0, "vs_torch", "outcome") == "undecided"]
        if und:
            found.append(f"speed vs torch fp32 undecided for {', '.join(map(str, und))}")
        if not dep.get("recommended"):
            found.append("deployment: no variant met the floor")
    g = d["guarantee_check"]
    if g is not None and g.get("outcome") in ("undecided", "fail"):
        found.append(f"threshold guarantee re-check: {g['outcome']}")
    s = d["site_shift"]
    restored = _get(s, "recalibration", "restored")
    if isinstance(restored, dict):
        outcomes = _get(s, "recalibration", "outcomes") or {}
        undecided = [k for k, v in outcomes.items() if v == "undecided"]
        no = [k for k, v in restored.items() if not v and k not in undecided]
        if undecided:
            found.append(f"external recalibration undecided for {', '.join(undecided)}")
        if no:
            found.append(f"external recalibration not restored for {', '.join(no)}")
    ch = d["changes"]
    for pair in (ch.get("pairs") or []) if ch is not None else []:
        if isinstance(pair, dict):
            for k, why in sorted((pair.get("skipped") or {}).items()):
                found.append(f"{pair.get('name')}: {k} not measured ({why})")
    found += [f"{MEASURES[k]}: not measured ({artifact(k).path} absent)" for k in MEASURES
              if k not in d.rel]
    found += [f"{k}: {why}" for k, why in d.error.items()]
    d.used(it, "compress", "deploy", "guarantee_check", "site_shift", "changes")
    if found:
        it.status = "undecided"
        it.t("; ".join(found))
    else:
        it.t("none: every verdict the headline reads is decided", cls="good")
    return it


def build_headline(run: RunFiles) -> Headline:
    """The headline of a run directory (see the module docstring)."""
    d = _Docs(run)
    items = [_compressed(d), _faster(d), _cost_internal(d), _cost_external(d), _forgot(d),
             _open(d)]
    for it in items:
        for key, why in d.error.items():
            if key in ("compress", "deploy") and it.key in ("compressed", "faster",
                                                            "cost_internal"):
                it.t(f" ({why})", cls="bad")
                it.status = it.status or "unreadable"
    return Headline(items)


__all__ = ["Headline", "HeadlineItem", "build_headline"]
