"""Shared CLI helpers: rich tables, error handling, run directories."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{fmt(v[0], digits)}, {fmt(v[1], digits)}]"
    return str(v)


def print_table(rows: list[dict[str, Any]], title: str = "") -> None:
    if not rows:
        return
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(str(col))
    for r in rows:
        table.add_row(*(fmt(v) for v in r.values()))
    console.print(table)


# ----------------------------------------------------------------------------- inputs
N_BOOT = 1000
N_BOOT_HELP = "Bootstrap replicates of every CI (default 1000 in every command; 0 = no CIs)."


def load_predictions(path: Any):
    """Predictions from a ``.npz`` (or a run directory holding predictions.npz); every failure
    is one DataError naming the file (see :func:`medscalpel.engine.api.load_predictions`)."""
    from medscalpel.engine.api import load_predictions as _load

    return _load(path)


# ----------------------------------------------------------------------------- help rows
#: parameter names by what they take: the help row shows what to give, never a type label
_MODEL_NAMES = {"model", "model_dir", "teacher", "student", "dense", "compressed", "models",
                "reference"}
_DATA_NAMES = {"data", "data_spec", "spec", "like", "labels", "internal", "external",
               "train_data", "dataset"}


def _metavar(p: Any) -> str:
    name = (p.name or "").lower()
    try:
        bare = p.bare_type()
    except Exception:  # pragma: no cover - a parameter without a type descriptor
        bare = ""
    if name in _MODEL_NAMES:
        return "MODEL_DIR"
    if name in _DATA_NAMES:
        return "SPEC"
    if name.endswith("split"):
        return "SPLIT"
    if name == "out" or name.endswith("_dir"):
        return "DIR"
    if bare in ("Path", "list[Path]"):
        return "FILE"
    if bare in ("int", "list[int]"):
        return "N"
    if bare in ("float", "list[float]"):
        return "NUMBER"
    return name.upper() or "VALUE"


def plain_params(params: list[Any]) -> list[Any]:
    """Replace typer's type labels (``<bool>``, ``<str>``, ``<path>``...) in help rows by
    what to give (``FILE``, ``DIR``, ``SPEC``, ``N``...); flags show none."""
    from typer.core import TyperArgument

    for p in params:
        if getattr(p, "_plain", False):
            continue
        if p.param_type_name == "option":
            if getattr(p, "is_flag", False) or getattr(p, "count", False):
                p.metavar = ""
            elif p.metavar is None:
                desc = getattr(p, "type_descriptor", None)
                if desc is not None and desc.is_choice:
                    p.metavar = "|".join(str(c.value if hasattr(c, "value") else c)
                                         for c in desc.choices or ())
                else:
                    p.metavar = _metavar(p)
        elif isinstance(p, TyperArgument):
            label = p.metavar or _metavar(p)
            p.display_type_rich = (lambda ctx=None, _label=label: _label)  # type: ignore
            p.display_type = p.display_type_rich  # type: ignore[method-assign]
        p._plain = True
    return params


def _plain_classes():
    from typer.core import TyperCommand, TyperGroup

    class PlainCommand(TyperCommand):
        def get_params(self, ctx):  # noqa: D401 - click API
            return plain_params(super().get_params(ctx))

    class PlainGroup(TyperGroup):
        def get_params(self, ctx):
            return plain_params(super().get_params(ctx))

    return PlainCommand, PlainGroup


PlainCommand, PlainGroup = _plain_classes()


def finish_app(app: Any) -> None:
    """Give every command and group of ``app`` (recursively) plain help rows."""
    from typer.core import TyperCommand

    for info in app.registered_commands:
        if info.cls is None or info.cls is TyperCommand:
            info.cls = PlainCommand
    app.info.cls = PlainGroup
    for g in app.registered_groups:
        if g.typer_instance is not None:
            finish_app(g.typer_instance)


# ----------------------------------------------------------------------------- aliases
def one_of(option: Any, alias: Any, flag: str, alias_name: str, what: str,
           required: bool = True) -> Any:
    """The value of ``flag`` or of its older (hidden) spelling ``alias_name``: giving both with
    different values, or neither when ``required``, is a one-line ConfigError."""
    from medscalpel.errors import ConfigError

    if option is not None and alias is not None and option != alias:
        raise ConfigError(f"{what} given twice ({flag} {option} and {alias_name} {alias}); "
                          f"give it once with {flag}.")
    value = option if option is not None else alias
    if value is None and required:
        raise ConfigError(f"Missing {flag} ({what}); see -h.")
    return value
