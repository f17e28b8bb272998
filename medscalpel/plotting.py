"""Shared matplotlib helpers: a headless pyplot and atomic PNG writing."""

from __future__ import annotations

import os
from pathlib import Path

from medscalpel.runs import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (unless a backend was already chosen). Imported
    here, at first use: the backend must be chosen before pyplot is imported, and importing
    matplotlib (~0.5 s) stays off the path of every module that only may draw."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (temporary name, then rename) and close it."""
    plt = pyplot()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
