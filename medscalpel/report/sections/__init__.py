"""The sections of the experiment report: one module per section, each a registered
:class:`~medscalpel.report.sections.base.ReportSection` subclass (key, title, the artifacts it
renders, ``render(run, sec)``). :func:`page_sections` lists them in page order (their
``order``); docs/architecture.md holds the generated table of them.

One naming scheme: the section ``KEY`` lives in ``report/sections/KEY.py``. Adding a section: that
module with one ``@register_section`` class, and its import below.
"""

from medscalpel.report.sections import (  # noqa: F401  (each module registers its section)
    baseline,
    calibration,
    cams,
    changes,
    clinical,
    compression,
    dataset,
    deployment,
    distill,
    forgettability,
    overview,
    pies,
    polarity,
    repair,
    site_shift,
)
from medscalpel.report.sections.base import (SECTIONS, ReportSection, page_sections,
                                             register_section)

__all__ = ["SECTIONS", "ReportSection", "page_sections", "register_section"]
