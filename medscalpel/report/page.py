"""The page model of the experiment report: what a section fills (:class:`Section`,
:class:`Link`; tables, cells and figures are :mod:`medscalpel.report.html`'s), where it reads
from (:class:`RunFiles`: the run directory, its paths, PNGs and links) and how a number cell
names its source (:func:`pointer`, a JSON pointer into the file it came from).

Sections (:mod:`medscalpel.report.sections`) and the driver
(:mod:`medscalpel.report.experiment`) both import this module; it imports neither.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medscalpel.layout import ARTIFACTS, artifact, read_artifact
from medscalpel.report import html as H
from medscalpel.report.html import Cell, Figure, Table, text
from medscalpel.validation import check_range


# ----------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Link:
    href: str
    text: str
    note: str = ""


@dataclass
class Section:
    """One section of the page (what the template renders)."""

    key: str
    title: str
    expected: list[str] = field(default_factory=list)
    present: bool = False
    sources: list[str] = field(default_factory=list)
    intro: str = ""
    facts: list[tuple[str, Cell]] = field(default_factory=list)
    tables_before: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    links_title: str = "Files"
    notes: list[str] = field(default_factory=list)
    badge: str = ""
    badge_cls: str = ""
    grid: bool = True

    def fact(self, label: str, cell: Cell | Any) -> None:
        self.facts.append((label, cell if isinstance(cell, Cell) else text(cell)))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "present": self.present,
                "sources": list(self.sources), "expected": list(self.expected),
                "n_tables": len(self.tables) + len(self.tables_before),
                "n_figures": len(self.figures), "notes": list(self.notes)}


# ----------------------------------------------------------------------------- reading
def pointer(rel: str, *keys: Any) -> str:
    """``rel#/k1/k2`` (RFC 6901: ``~`` -> ``~0``, ``/`` -> ``~1``)."""
    toks = [str(k).replace("~", "~0").replace("/", "~1") for k in keys]
    return f"{rel}#/" + "/".join(toks)


def resolve_pointer(doc: Any, ptr: str) -> Any:
    """The value at a JSON pointer (the part after ``#``)."""
    ptr = ptr.split("#", 1)[-1]
    cur = doc
    for tok in [t for t in ptr.split("/")[1:]] if ptr else []:
        tok = tok.replace("~1", "/").replace("~0", "~")
        cur = cur[int(tok)] if isinstance(cur, list) else cur[tok]
    return cur


class RunFiles:
    """The run directory a page is built from: paths, files, PNG listings and links relative to
    the page. Sections read through :class:`~medscalpel.report.sections.base.ReportSection`,
    which records each file used and turns an unreadable one into a note on the page."""

    def __init__(self, root: Path, out_html: Path):
        self.root = root
        self.out_dir = out_html.parent

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def locate(self, key: str, **fmt: Any) -> str | None:
        """The relative path of a declared artifact when it is there, else ``None``."""
        return artifact(key).locate(self.root, **fmt)

    def relpath(self, key: str, **fmt: Any) -> str:
        """Where a declared artifact is (or would be), relative to the run directory."""
        return self.locate(key, **fmt) or artifact(key).relpath(**fmt)

    def read_json(self, rel: str) -> Any:
        """The JSON document at ``rel`` (raises on an unreadable file)."""
        return json.loads(self.path(rel).read_text(encoding="utf-8"))

    def read(self, key: str, **fmt: Any) -> Any:
        """A declared artifact (:mod:`medscalpel.layout`): its typed object or checked dict
        (raises when the file does not match its declaration)."""
        return read_artifact(self.root, key, **fmt)

    def png_uri(self, rel: str) -> str:
        return H.png_data_uri(self.path(rel))

    def pngs(self, rel_dir: str, first: tuple[str, ...] = ()) -> list[str]:
        d = self.path(rel_dir)
        if not d.is_dir():
            return []
        names = sorted(p.name for p in d.glob("*.png") if p.is_file())
        ordered = [n for n in first if n in names] + [n for n in names if n not in first]
        return [f"{rel_dir}/{n}" for n in ordered]

    def href(self, rel: str) -> str:
        return Path(os.path.relpath(self.path(rel), self.out_dir)).as_posix()


@dataclass(frozen=True)
class ReportOptions:
    """What the caller of the report chooses; every section gets the same options and reads
    the ones it uses (the clinical section: ``clinical_examples``)."""

    clinical_examples: int = 5

    def __post_init__(self) -> None:
        check_range(self.clinical_examples, "clinical_examples", "experiment_report", 0,
                    integer=True)


def expected_files(expected: tuple[str, ...] | list[str]) -> list[str]:
    """A section's expected inputs: artifact keys of :data:`medscalpel.layout.ARTIFACTS`
    (their declared paths) or literal glob patterns."""
    return [ARTIFACTS[e].path if e in ARTIFACTS else e for e in expected]


__all__ = ["Link", "ReportOptions", "RunFiles", "Section", "expected_files", "pointer",
           "resolve_pointer"]
