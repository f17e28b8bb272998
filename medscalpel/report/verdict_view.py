"""Render a stored :class:`~medscalpel.engine.decision.Verdict` dict in the experiment report.

A verdict is shown with its evidence: the outcome (pass / fail / undecided), per unit the
estimate, the interval at its Holm-adjusted level, the margin, n and positives / negatives, and
the reason; unscorable units are named. Every number cell points into the JSON it came from.
"""

from __future__ import annotations

from typing import Any

from medscalpel.report.page import pointer
from medscalpel.report.html import Cell, Table, num, text

#: CSS class of each outcome
OUTCOME_CLS = {"pass": "good", "fail": "bad", "undecided": "", "unscorable": "muted"}


def outcome_cell(outcome: Any, detail: str = "") -> Cell:
    """``pass`` / ``fail`` / ``undecided`` (and a short detail), coloured; ``-`` when missing."""
    if not isinstance(outcome, str):
        return text(None)
    return text(f"{outcome}: {detail}" if detail else outcome, cls=OUTCOME_CLS.get(outcome, ""))


def verdict_line(v: Any) -> str:
    """The outcome, its reason and the question it answered, in one line."""
    if not isinstance(v, dict) or "outcome" not in v:
        return "-"
    q = (f"{v.get('metric', '?')} delta >= -{v.get('margin', '?')}; "
         f"{v.get('correction', '?')} over {v.get('n_tests', '?')} test(s), one-sided alpha "
         f"{v.get('alpha', '?')}; {v.get('method', '?')}; {v.get('n', '?')} images")
    return f"{v['outcome']}: {v.get('reason', '')} ({q})"


def verdict_table(rel: str, v: Any, path: tuple[Any, ...], key: str, title: str) -> Table | None:
    """One row per unit of the verdict stored at ``path`` inside the JSON file ``rel``."""
    if not isinstance(v, dict) or not isinstance(v.get("units"), list):
        return None
    t = Table(["unit", "outcome", "estimate", "interval low", "interval high",
               "tail level (Holm)", "margin", "n", "positives / negatives", "reason"], key=key,
              title=title)
    for i, u in enumerate(v["units"]):
        if not isinstance(u, dict):
            continue
        p = lambda *k: pointer(rel, *path, "units", i, *k)  # noqa: E731
        counts = (f"{u.get('n_pos')} / {u.get('n_neg')}" if u.get("n_pos") is not None
                  else "-")
        t.add(text(u.get("name")), outcome_cell(u.get("outcome")),
              num(u.get("estimate"), p("estimate"), 4, "signed"),
              num(u.get("ci_low"), p("ci_low"), 4, "signed"),
              num(u.get("ci_high"), p("ci_high"), 4, "signed"),
              num(u.get("level_adj"), p("level_adj"), 4),
              num(u.get("margin"), p("margin"), 4), num(u.get("n"), p("n"), 0, "int"),
              text(counts), text(u.get("reason")))
    return t if t.rows else None
