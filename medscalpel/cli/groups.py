"""Wiring of the stage command groups into the main app."""

from __future__ import annotations

import typer


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    pass
