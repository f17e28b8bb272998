"""Progress for long work: a rich bar on a terminal; plain log lines (one per N% and at the
end, with elapsed time and ETA) when stderr is not a terminal (CI logs, nohup, notebooks), so
a long run is never silent. ``MEDSCALPEL_PROGRESS=0`` turns both off, ``=force`` forces the
bar, ``=plain`` forces the lines; ``MEDSCALPEL_PROGRESS_EVERY`` sets N (default 10)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

T = TypeVar("T")


def progress_enabled(progress: bool | None = None) -> bool:
    if progress is not None:
        return progress
    return os.environ.get("MEDSCALPEL_PROGRESS", "1") != "0"


def _mode() -> str:
    """'bar' on a terminal (or when forced), else 'plain'."""
    env = os.environ.get("MEDSCALPEL_PROGRESS", "1")
    if env == "force":
        return "bar"
    if env == "plain":
        return "plain"
    stream = sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "plain"


def _every() -> float:
    try:
        v = float(os.environ.get("MEDSCALPEL_PROGRESS_EVERY", "10"))
    except ValueError:
        v = 10.0
    return min(max(v, 1.0), 100.0)


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PlainProgress:
    """One line per ``every`` percent of ``total`` (and a last line at the end):
    ``description: 30% (300/1000) 0:12 elapsed, ETA 0:28 info``. Without a total, a line every
    ``every`` items' worth of 30 seconds at most."""

    def __init__(self, description: str, total: int | None, every: float | None = None,
                 stream: IO[str] | None = None, clock=time.monotonic):
        self.description = description or "working"
        self.total = total if total and total > 0 else None
        self.every = _every() if every is None else every
        self.stream = stream
        self.clock = clock
        self.done = 0
        self.info = ""
        self._t0 = clock()
        self._next = self.every
        self._last_print = self._t0
        self._printed_end = False

    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def line(self) -> str:
        el = self.clock() - self._t0
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = el * (self.total - self.done) / self.done if self.done else float("nan")
            eta_s = _clock(eta) if self.done else "?"
            text = (f"{self.description}: {pct:.0f}% ({self.done}/{self.total}) "
                    f"{_clock(el)} elapsed, ETA {eta_s}")
        else:
            text = f"{self.description}: {self.done} done, {_clock(el)} elapsed"
        return text + (f" {self.info}" if self.info else "")

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.done += n
        if info is not None:
            self.info = info
        if self.total:
            pct = 100.0 * self.done / self.total
            if pct >= self._next or self.done >= self.total:
                while self._next <= pct:
                    self._next += self.every
                self._write(self.line())
                self._printed_end = self.done >= self.total
        elif self.clock() - self._last_print >= 30:
            self._last_print = self.clock()
            self._write(self.line())

    def close(self) -> None:
        if not self._printed_end and (self.done or not self.total):
            self._write(self.line())
            self._printed_end = True


def track(iterable: Iterable[T], description: str = "", total: int | None = None,
          progress: bool | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar (to stderr) on a terminal, or plain progress lines
    elsewhere, when progress is enabled."""
    if not progress_enabled(progress):
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if _mode() == "plain":
        plain = PlainProgress(description, total)
        for item in iterable:
            yield item
            plain.advance()
        plain.close()
        return
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, info="")
        for item in iterable:
            yield item
            bar.advance(task)


class LiveStatus:
    """A progress bar whose trailing text can be updated (e.g. live loss / AUROC); plain lines
    (one per N% and one at the end, e.g. per epoch) when not on a terminal."""

    def __init__(self, description: str, total: int, progress: bool | None = None):
        self.enabled = progress_enabled(progress)
        self.description = description
        self.total = total
        self._bar = None
        self._task = None
        self._plain: PlainProgress | None = None

    def __enter__(self) -> "LiveStatus":
        if not self.enabled:
            return self
        if _mode() == "plain":
            self._plain = PlainProgress(self.description, self.total)
            return self
        console = Console(stderr=True)
        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                             TextColumn("{task.fields[info]}"), console=console)
        self._bar.__enter__()
        self._task = self._bar.add_task(self.description, total=self.total, info="")
        return self

    def advance(self, n: int = 1, info: str | None = None) -> None:
        if self._plain is not None:
            self._plain.advance(n, info)
        elif self._bar is not None:
            kw = {"info": info} if info is not None else {}
            self._bar.update(self._task, advance=n, **kw)

    def __exit__(self, *exc) -> None:
        if self._plain is not None:
            self._plain.close()
        elif self._bar is not None:
            self._bar.__exit__(*exc)
