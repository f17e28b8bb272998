"""Old spellings of flags, arguments and commands: one table, with the version that removes
each (after timm's deprecation table for model names).

An old spelling stays a HIDDEN parameter (or command) of the CLI until its ``removed_in``
version. Using it prints one warning to stderr naming the new spelling and that version; from
``removed_in`` on, the same spelling is a one-line error (exit 2) with the note, so bumping
``medscalpel.__version__`` retires old spellings without touching the commands.
``tests/test_cli_truth.py`` checks both directions: every hidden parameter / command of the
CLI has an entry here, and every entry names a hidden parameter / command that exists.

Example:
    >>> e = entry("--calib", "compress prune")
    >>> e.new, e.removed_in
    ('--n-calib', '0.2.0')
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from medscalpel import __version__
from medscalpel.errors import ConfigError

#: warnings go to stderr (cli/common.py imports this module, so it keeps its own console)
_stderr = Console(stderr=True)


@dataclass(frozen=True)
class OldSpelling:
    """``old`` (a flag such as ``--calib``, a positional argument's metavar such as ``MODEL``,
    or a command path such as ``audit polarity``) of the ``commands`` it belongs to, replaced
    by ``new`` (empty: nothing replaces it, ``note`` says why) since ``since``, removed in
    ``removed_in``."""

    old: str
    new: str
    commands: tuple[str, ...]
    since: str
    removed_in: str
    note: str = ""

    @property
    def removed(self) -> bool:
        return _version(__version__) >= _version(self.removed_in)

    def message(self) -> str:
        where = "/".join(self.commands)
        head = f"{self.old} ({where})"
        instead = f"use {self.new}" if self.new else self.note
        if self.removed:
            return f"{head} was removed in {self.removed_in}: {instead}."
        return (f"{head} is deprecated since {self.since} and will be removed in "
                f"{self.removed_in}: {instead}.")


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3])


_POS = "positional arguments became flags: one spelling per input across commands"
DEPRECATIONS: tuple[OldSpelling, ...] = (
    OldSpelling("--calib", "--n-calib", ("compress prune",), "0.1.0", "0.2.0"),
    OldSpelling("--calib-images", "--n-calib", ("compress lossless",), "0.1.0", "0.2.0"),
    OldSpelling("--heldout-images", "--n-images", ("compress lossless",), "0.1.0", "0.2.0"),
    OldSpelling("--n", "--n-images", ("data phantom",), "0.1.0", "0.2.0"),
    OldSpelling("--like", "--data", ("models import",), "0.1.0", "0.2.0"),
    OldSpelling("--labels", "--data", ("predictions import",), "0.1.0", "0.2.0"),
    OldSpelling("--dataset", "--data", ("repair surgery",), "0.1.0", "0.2.0"),
    OldSpelling("SPEC", "--data", ("data stats",), "0.1.0", "0.2.0", _POS),
    OldSpelling("MODEL", "--model", ("compress lossless", "repair surgery"), "0.1.0", "0.2.0",
                _POS),
    OldSpelling("DATA", "--data", ("compress lossless",), "0.1.0", "0.2.0", _POS),
    OldSpelling("TEACHER", "--model", ("compress distill", "compress students",
                                       "scale distill"), "0.1.0", "0.2.0", _POS),
    OldSpelling("MODELS", "--model", ("scale prune",), "0.1.0", "0.2.0", _POS),
    OldSpelling("--resume", "", ("train", "scale train"), "0.1.0", "0.2.0",
                "an interrupted run resumes by itself when the same command is run again; "
                "drop the flag"),
    OldSpelling("--jaccard-exclusion", "", ("report clinical",), "0.1.0", "0.1.0",
                "a low Jaccard index only says that one finding is rare, so no finding is "
                "excluded on it. Conflicts now come from the co-occurrence evidence "
                "(--max-lift-upper, --min-expected, --min-images) and are flagged; add "
                "--hide-exclusive to hide the weaker finding"),
    OldSpelling("audit polarity", "explain polarity", ("audit polarity",), "0.1.0", "0.2.0"),
)


def entry(old: str, command: str) -> OldSpelling:
    """The table's entry for ``old`` in ``command`` (a programming error when missing)."""
    for e in DEPRECATIONS:
        if e.old == old and command in e.commands:
            return e
    raise KeyError(f"no deprecation entry for {old} of '{command}': add it to "
                   "medscalpel/cli/deprecations.py")


def used(old: str, command: str) -> None:
    """``old`` was given: a warning, or (from its ``removed_in`` version) a ConfigError."""
    e = entry(old, command)
    if e.removed:
        raise ConfigError(e.message())
    _stderr.print(f"warning: {e.message()}", style="yellow", highlight=False)


def renamed(new_value: Any, old_value: Any, old: str, command: str) -> Any:
    """The value of a renamed flag whose new spelling has a default: ``old_value`` when the old
    spelling was given (with its warning), else ``new_value``."""
    if old_value is None or old_value is False:
        return new_value
    used(old, command)
    return old_value


def old_command(path: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` registered under its old command ``path``: same parameters, plus the warning."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        used(path, path)
        return fn(*args, **kwargs)

    return wrapper


__all__ = ["DEPRECATIONS", "OldSpelling", "entry", "old_command", "renamed", "used"]
