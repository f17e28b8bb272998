"""Small helpers the sections share: tolerant lookups into a JSON dict, yes/no cells, short
lists, and figures drawn from the JSON (a drawing error becomes a note, never a broken page)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medscalpel.errors import DataError
from medscalpel.report import html as H
from medscalpel.report.html import Cell, Figure, text
from medscalpel.report.page import Section


def drawn(sec: Section, draw: Callable[[], bytes], caption: str, source: str) -> None:
    try:
        sec.figures.append(Figure(H.png_data_uri(draw()), caption, source))
    except (DataError, ValueError, TypeError, KeyError, IndexError) as exc:
        sec.notes.append(f"{caption}: not drawn ({exc}).")


def get(d: Any, *keys: Any, default: Any = None) -> Any:
    cur = d
    for k in keys:
        if isinstance(cur, dict) and k in cur:
            cur = cur[k]
        elif isinstance(cur, list) and isinstance(k, int) and -len(cur) <= k < len(cur):
            cur = cur[k]
        else:
            return default
    return cur


def yes_no(v: Any, good_if: bool = True) -> Cell:
    if not isinstance(v, bool):
        return text(None)
    return text("yes" if v else "no", cls="good" if v == good_if else "bad")


def short_list(v: Any, n: int = 12) -> str:
    if not isinstance(v, list):
        return "-" if v is None else str(v)
    items = [H.fmt_num(x, 2) if H.is_number(x) and isinstance(x, float) else str(x)
             for x in v[:n]]
    return ", ".join(items) + (f", ... ({len(v)} in all)" if len(v) > n else "")

