"""Progress bars for long work (rich), silent when disabled or not on a terminal in CI."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled(progress: bool | None = None) -> bool:
    if progress is not None:
        return progress
    return os.environ.get("MEDSCALPEL_PROGRESS", "1") != "0"


def track(iterable: Iterable[T], description: str = "", total: int | None = None,
          progress: bool | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar (to stderr) when progress is enabled."""
    if not progress_enabled(progress):
        yield from iterable
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=False, disable=not console.is_terminal
                  and os.environ.get("MEDSCALPEL_PROGRESS") != "force") as bar:
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        task = bar.add_task(description, total=total, info="")
        for item in iterable:
            yield item
            bar.advance(task)


class LiveStatus:
    """A progress bar whose trailing text can be updated (e.g. live loss / AUROC)."""

    def __init__(self, description: str, total: int, progress: bool | None = None):
        self.enabled = progress_enabled(progress)
        self.description = description
        self.total = total
        self._bar = None
        self._task = None

    def __enter__(self) -> "LiveStatus":
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            console = Console(stderr=True)
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=console,
                                 disable=not console.is_terminal
                                 and os.environ.get("MEDSCALPEL_PROGRESS") != "force")
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, info="")
        return self

    def advance(self, n: int = 1, info: str | None = None) -> None:
        if self._bar is not None:
            kw = {"info": info} if info is not None else {}
            self._bar.update(self._task, advance=n, **kw)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
