"""The base of an experiment-report section and the registry of sections.

A section is a small class: a ``key``, a ``title``, the artifacts it ``renders`` (artifact
keys of :data:`medscalpel.layout.ARTIFACTS` or glob patterns; the page lists them as the
section's expected files), the artifacts it ``also_reads`` (context such as the model card),
its place on the page (``order``) and one method, ``render(run, sec)``. The base owns the
plumbing: it reads only declared artifacts, records each file used (``sec.sources``), turns a
file that cannot be read into a note and an "unreadable file" badge, and a section that raises
on an unexpected file shape into an "incomplete" section; a section never breaks the page.

Adding a section touches its own module (``@register_section`` on the class) and the import
list of :mod:`medscalpel.report.sections`.

Example:
    >>> from medscalpel.report.sections import page_sections
    >>> [cls.key for cls in page_sections()][:3]
    ['overview', 'dataset', 'baseline']
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

from medscalpel.errors import ConfigError, DataError
from medscalpel.layout import ARTIFACTS
from medscalpel.registry import Registry
from medscalpel.report.html import Figure
from medscalpel.report.page import ReportOptions, RunFiles, Section, expected_files

logger = logging.getLogger(__name__)

#: the errors a section's reading or rendering turns into a note instead of a broken page
READ_ERRORS = (DataError, OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError,
               TypeError, ValueError)
RENDER_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError)


class UndeclaredArtifact(ConfigError):
    """A section read an artifact it does not declare: a bug in the section, raised (never
    shown as an incomplete section)."""


class ReportSection:
    """One section of the experiment report; subclasses set the class attributes and
    implement :meth:`render`."""

    key: ClassVar[str] = ""
    title: ClassVar[str] = ""
    #: artifact keys (or glob patterns of files) this section renders: its expected inputs
    renders: ClassVar[tuple[str, ...]] = ()
    #: artifact keys read for context besides (never listed as expected)
    also_reads: ClassVar[tuple[str, ...]] = ()
    #: position on the page, top to bottom
    order: ClassVar[int] = 0

    def __init__(self, options: ReportOptions | None = None):
        self.options = options if options is not None else ReportOptions()

    # ------------------------------------------------------------------------- the contract
    def render(self, run: RunFiles, sec: Section) -> None:
        """Fill ``sec`` (facts, tables, figures, notes) and set ``sec.present`` when the
        section's files are there; leave it untouched when they are absent."""
        raise NotImplementedError

    def build(self, run: RunFiles) -> Section:
        """The section as the page shows it: rendered, or marked incomplete when its files
        have an unexpected shape."""
        sec = Section(self.key, self.title, expected=expected_files(self.renders))
        try:
            self.render(run, sec)
        except UndeclaredArtifact:
            raise
        except RENDER_ERRORS as exc:
            logger.warning("section %s: %s", self.key, exc)
            sec.present = True
            sec.notes.append(f"This section could not be rendered completely from its files "
                             f"({type(exc).__name__}: {exc}); check that they were written by "
                             "this medscalpel version.")
            sec.badge, sec.badge_cls = "incomplete", "bad"
        return sec

    # ------------------------------------------------------------------------- reading
    def _declared(self, key: str) -> None:
        if key not in self.renders and key not in self.also_reads:
            raise UndeclaredArtifact(f"Section '{self.key}' reads artifact '{key}' without "
                                     f"declaring it (renders: {list(self.renders)}, also_reads: "
                                     f"{list(self.also_reads)}).")

    @staticmethod
    def unreadable(sec: Section, note: str) -> None:
        """Show ``note`` and the "unreadable file" badge."""
        sec.notes.append(note)
        sec.present = True
        sec.badge, sec.badge_cls = "unreadable file", "bad"

    def json(self, run: RunFiles, rel: str, sec: Section) -> Any:
        """The JSON file ``rel`` of the run directory; ``None`` when absent or unreadable."""
        if not run.exists(rel):
            return None
        try:
            doc = run.read_json(rel)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.unreadable(sec, f"{rel} could not be read: {exc}")
            return None
        sec.sources.append(rel)
        return doc

    def artifact(self, run: RunFiles, key: str, sec: Section, **fmt: Any) -> Any:
        """A declared artifact: its typed object or checked dict; ``None`` when absent. A file
        that does not match its declaration becomes a note and an "unreadable file" badge
        (and fails the report test)."""
        self._declared(key)
        rel = run.locate(key, **fmt)
        if rel is None:
            return None
        try:
            obj = run.read(key, **fmt)
        except READ_ERRORS as exc:
            self.unreadable(sec, f"{rel} could not be read as its declared artifact '{key}': "
                                 f"{type(exc).__name__}: {exc}")
            return None
        sec.sources.append(rel)
        return obj

    def doc(self, run: RunFiles, key: str, sec: Section,
            **fmt: Any) -> tuple[str, dict[str, Any] | None]:
        """``(relative path, JSON dict)`` of a declared artifact, validated by its type or its
        declared keys first; the dict is what number cells point into."""
        obj = self.artifact(run, key, sec, **fmt)
        d = obj.to_dict() if hasattr(obj, "to_dict") else obj
        return run.relpath(key, **fmt), d if isinstance(d, dict) else None

    def figure(self, run: RunFiles, rel: str, sec: Section, caption: str = "") -> Figure | None:
        """The PNG ``rel`` embedded as a figure; ``None`` when absent (a broken PNG: a note)."""
        if not run.exists(rel):
            return None
        try:
            uri = run.png_uri(rel)
        except DataError as exc:
            sec.notes.append(str(exc))
            return None
        sec.sources.append(rel)
        return Figure(uri, caption, rel)


#: the report's sections by key (each module registers its class with ``@register_section``)
SECTIONS: Registry[type[ReportSection]] = Registry("report section")


def register_section(cls: type[ReportSection]) -> type[ReportSection]:
    """Register a section class under its ``key`` (checked: a title, a place on the page no
    other section holds, and declared artifacts that exist)."""
    if not cls.key or not cls.title:
        raise ConfigError(f"Section class {cls.__name__} needs a key and a title.")
    unknown = [k for k in (*cls.renders, *cls.also_reads)
               if k not in ARTIFACTS and not ("/" in k and "." in k)]
    if unknown:
        raise ConfigError(f"Section '{cls.key}' declares unknown artifacts {unknown}; valid "
                          f"keys: {', '.join(ARTIFACTS)} (or a file pattern such as "
                          "'explain/cams/*.png').")
    if cls.key in SECTIONS:
        raise ConfigError(f"report section '{cls.key}' is registered twice.")
    taken = {SECTIONS.get(n).order: n for n in SECTIONS.names()}
    if cls.order in taken:
        raise ConfigError(f"Section '{cls.key}' has order {cls.order}, already taken by "
                          f"'{taken[cls.order]}'.")
    return SECTIONS.register(cls.key, help=cls.title)(cls)


def page_sections() -> list[type[ReportSection]]:
    """The registered section classes in page order."""
    return sorted((SECTIONS.get(n) for n in SECTIONS.names()), key=lambda c: c.order)


__all__ = ["ReportSection", "SECTIONS", "UndeclaredArtifact", "page_sections", "register_section"]
