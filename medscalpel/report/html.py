"""HTML helpers shared by the clinical and experiment reports.

* Every template is rendered by one jinja2 environment with ``autoescape=True``: class names,
  file names, paths and ids reach the page escaped, whatever they contain.
* Figures are embedded as ``data:image/png;base64,...`` URIs, so a report is one self-contained
  file that can be mailed or archived.
* Numbers are formatted by :func:`fmt_num` / :func:`fmt_ci` only, so a test can check that the
  number on the page equals the JSON value it came from (:class:`Cell` records the source as a
  JSON pointer in ``data-src``).

Example:
    >>> str(escape('<script>alert(1)</script>'))
    '&lt;script&gt;alert(1)&lt;/script&gt;'
    >>> fmt_num(0.81234), fmt_num(None), fmt_ci([0.7, 0.9], 2)
    ('0.812', '-', '[0.70, 0.90]')
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from medscalpel.errors import DataError
from medscalpel.runs import write_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEMPLATES = Path(__file__).resolve().parent / "templates"

#: the sentence every clinical report carries
DECISION_SUPPORT = ("Decision support only, not a diagnosis. These findings are the output of an "
                    "automated model; they must be reviewed and confirmed by a qualified "
                    "clinician together with the patient's history and other examinations.")

__all__ = ["escape", "Markup", "png_data_uri", "figure_data_uri", "fmt_num", "fmt_ci", "fmt_pct",
           "Cell", "Table", "Figure", "render", "write_html", "safe_filename", "is_number"]


# ----------------------------------------------------------------------------- images
def png_data_uri(png: bytes | str | os.PathLike) -> str:
    """A ``data:image/png;base64,...`` URI of PNG bytes or of a PNG file.

    Raises:
        DataError: the file is missing or is not a PNG.
    """
    if isinstance(png, (bytes, bytearray)):
        data, where = bytes(png), "the given bytes"
    else:
        path = Path(png)
        if not path.is_file():
            raise DataError(f"Figure file not found: {path}.")
        data, where = path.read_bytes(), str(path)
    if not data.startswith(PNG_SIGNATURE):
        raise DataError(f"{where} is not a PNG image (wrong signature); save figures as PNG.")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_png(fig, dpi: int = 110) -> bytes:
    """PNG bytes of a matplotlib figure (the figure is closed)."""

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    try:
        import matplotlib.pyplot as plt  # only here: a caller that drew a figure imported it

        plt.close(fig)
    except Exception:  # pragma: no cover - a Figure not created by pyplot
        pass
    return buf.getvalue()


def figure_data_uri(fig, dpi: int = 110) -> str:
    """A data URI of a matplotlib figure (the figure is closed)."""
    return png_data_uri(figure_png(fig, dpi))


# ----------------------------------------------------------------------------- numbers
def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_num(v: Any, digits: int = 3, style: str = "fixed") -> str:
    """Format a JSON number for the page; ``None``, NaN, Inf and non-numbers give ``-``.

    Args:
        digits: decimals (``fixed``) or significant decimals of the mantissa (``sci``).
        style: ``fixed`` (``0.812``), ``sci`` (``3.10e-06``), ``int`` (``1,234,567``),
            ``signed`` (``+0.012``) or ``ratio`` (``x2.41``).
    """
    if not is_number(v):
        return "-"
    if style == "int":
        return f"{int(round(v)):,}"
    if style == "sci":
        return f"{v:.{digits}e}"
    if style == "signed":
        return f"{v:+.{digits}f}"
    if style == "ratio":
        return f"x{v:.{digits}f}"
    return f"{v:.{digits}f}"


def fmt_ci(v: Any, digits: int = 3) -> str:
    """``[lo, hi]`` of a two-element list; ``-`` when missing or not finite."""
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(is_number(x) for x in v):
        return "-"
    return f"[{v[0]:.{digits}f}, {v[1]:.{digits}f}]"


def fmt_pct(v: Any, digits: int = 1) -> str:
    """A fraction as a percentage (``0.123`` -> ``12.3%``)."""
    return "-" if not is_number(v) else f"{100 * v:.{digits}f}%"


# ----------------------------------------------------------------------------- table model
@dataclass(frozen=True)
class Cell:
    """One table cell: its text and, for numbers, the value and where it came from.

    Attributes:
        text: what the page shows (escaped by the template).
        value: the JSON value (number or [lo, hi]) written as ``data-value``.
        src: ``file.json#/json/pointer`` of the value, written as ``data-src``.
        kind: ``num``, ``ci``, ``pct`` or ``text`` (``data-fmt``).
        cls: extra CSS class (``good``, ``bad``, ``muted``).
    """

    text: str
    value: Any = None
    src: str = ""
    kind: str = "text"
    cls: str = ""

    @property
    def is_numeric(self) -> bool:
        return self.kind != "text"

    def value_attr(self) -> str:
        if isinstance(self.value, (list, tuple)):
            return ",".join(repr(float(x)) for x in self.value)
        return repr(float(self.value)) if is_number(self.value) else ""


def text(v: Any, cls: str = "") -> Cell:
    """A text cell (``-`` for None / empty)."""
    return Cell("-" if v is None or v == "" else str(v), cls=cls)


def num(v: Any, src: str = "", digits: int = 3, style: str = "fixed", cls: str = "") -> Cell:
    """A number cell formatted by :func:`fmt_num` (``-`` and no source when missing)."""
    if not is_number(v):
        return Cell("-", cls=cls or "muted")
    return Cell(fmt_num(v, digits, style), v, src, "num", cls)


def ci(v: Any, src: str = "", digits: int = 3) -> Cell:
    if fmt_ci(v, digits) == "-":
        return Cell("-", cls="muted")
    return Cell(fmt_ci(v, digits), list(v), src, "ci")


def pct(v: Any, src: str = "", digits: int = 1) -> Cell:
    if not is_number(v):
        return Cell("-", cls="muted")
    return Cell(fmt_pct(v, digits), v, src, "pct")


@dataclass
class Table:
    """A table for the templates: column names and rows of :class:`Cell`."""

    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    title: str = ""
    caption: str = ""
    key: str = ""

    def add(self, *cells: Cell | Any) -> None:
        self.rows.append([c if isinstance(c, Cell) else text(c) for c in cells])


@dataclass
class Figure:
    """An embedded figure (``uri`` is a PNG data URI)."""

    uri: str
    caption: str = ""
    source: str = ""


# ----------------------------------------------------------------------------- rendering
@lru_cache(maxsize=1)
def _environment():

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt_num
    env.filters["ci"] = fmt_ci
    env.filters["pct"] = fmt_pct
    return env


def render(template: str, **context: Any) -> str:
    """Render ``templates/<template>`` with autoescaping on."""
    return _environment().get_template(template).render(**context)


def write_html(path: str | os.PathLike, html: str) -> Path:
    """Write a page atomically (UTF-8)."""
    return write_text(path, html)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, used: set[str] | None = None, max_len: int = 80) -> str:
    """A file-system and URL safe stem for ``name`` (unique within ``used``, which is updated).

    Example:
        >>> safe_filename('a&"<>b.png')
        'a_b'
    """
    stem = Path(str(name)).name
    for ext in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    stem = _UNSAFE.sub("_", stem).strip("._") or "image"
    stem = stem[:max_len]
    if used is not None:
        base, i = stem, 1
        while stem.lower() in used or stem.lower() == "index":
            i += 1
            stem = f"{base}_{i}"
        used.add(stem.lower())
    return stem
