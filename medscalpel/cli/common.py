"""Shared CLI helpers: rich tables, error handling, run directories."""

from __future__ import annotations

import math
import re
from typing import Any

from rich.console import Console
from rich.table import Table
from typer._click.exceptions import UsageError  # typer vendors click: its usage-error class
from typer.core import TyperArgument, TyperCommand, TyperGroup

from medscalpel.cli import deprecations
from medscalpel.cli.bounds import constraint_for
from medscalpel.errors import ConfigError
from medscalpel.validation import Interval

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


def run_stage(stage: str, out: Any, settings: Any, command: str, config: dict[str, Any], *,
              seed: int | None = 0, overwrite: bool = False, resumable: bool = False,
              spec: str = "", data: dict[str, Any] | None = None,
              manifest_data: tuple[str, ...] = (),
              manifest_config: tuple[str, ...] = ()) -> Any:
    """A command's body: run the registered ``stage`` into a new run directory ``out``
    (:func:`medscalpel.pipeline.stage.run_command`) and return the result object it made
    (``None`` for a stage whose record is its artifact alone). ``resumable``: an interrupted
    run keeps its ``.partial`` folder and the same command resumes it (``train``); ``seed``
    ``None``: the command draws nothing (the manifest says so)."""
    import medscalpel.pipeline.stages  # noqa: F401  (registers the stages)
    from medscalpel.pipeline.stage import run_command

    _, ctx = run_command(stage, out, settings, command=command, config=config, seed=seed,
                         spec=spec, overwrite=overwrite, resumable=resumable, data=data,
                         manifest_data=manifest_data,
                         manifest_config=manifest_config)
    return ctx.results.get(stage)


def run_stage_in_place(stage: str, folder: Any, settings: Any) -> Any:
    """A command whose stage manages its own folder (a resumable grid that IS its run
    directory, a report rendered into the run it reads): run the registered ``stage`` there
    (:func:`medscalpel.pipeline.stage.run_in_place`) and return the result object it made."""
    import medscalpel.pipeline.stages  # noqa: F401  (registers the stages)
    from medscalpel.pipeline.stage import run_in_place

    _, ctx = run_in_place(stage, folder, settings)
    return ctx.results.get(stage)


# ----------------------------------------------------------------------------- help rows
#: parameter names by what they take: the help row shows what to give, never a type label
#: (a command whose option takes something else names it with ``metavar=``)
_MODEL_NAMES = {"model", "model_dir", "teacher", "dense", "compressed", "models", "reference",
                "compare_with"}
_DATA_NAMES = {"data", "data_spec", "spec", "like", "labels", "external", "train_data",
               "dataset"}
_CLASS_NAMES = {"target", "target_class", "positive"}
_INT_LISTS = {"seeds", "batch_sizes", "batch", "saliency_classes"}
_REAL_LISTS = {"budgets", "temperatures", "soft_weights", "max_auroc_drops", "max_recall_drops"}
_NAMED = {"class_map": "EXTERNAL=MODEL", "id_column": "COLUMN", "ray_address": "ADDRESS",
          "arch": "ARCH", "ratios": "START:STOP:STEP|X,..."}
#: a help text that opens with its choices, 'auto | cpu | cuda' or 'gradcam, gradcam++ or
#: scorecam.'
_CHOICES = re.compile(r"^\s*([\w+\-]+(?:\s*\|\s*[\w+\-]+)+)\s*(?:[.(]|$)")
_CHOICES_WORDS = re.compile(r"^\s*([\w+\-]+(?:, [\w+\-]+)* or [\w+\-]+)\.?\s*$")


def _metavar(p: Any) -> str:
    name = (p.name or "").lower()
    bare = _bare(p)
    text = (p.help or "") if isinstance(getattr(p, "help", None), str) else ""
    text = re.sub(r"\s*\([^)]*\)", "", text)  # 'sync (GPU) | local': the choices alone
    if name in _NAMED:
        return _NAMED[name]
    if name in _MODEL_NAMES or name == "student":  # a str student: a zoo name or a folder
        return "MODEL_DIR" if bare != "str" else "ARCH|MODEL_DIR"
    if name in _DATA_NAMES:
        return "SPEC"
    if name in _CLASS_NAMES:
        return "CLASS"
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
    if bare == "str" or bare == "Optional[str]":
        m = _CHOICES.match(text) or _CHOICES_WORDS.match(text)
        if m:
            return "|".join(w.strip() for w in re.split(r"\||,| or ", m.group(1)) if w.strip())
        if name in _INT_LISTS:
            return "N,..."
        if name in _REAL_LISTS:
            return "X,..."
        if "comma" in text.lower():
            return "NAME,..."
    return name.upper() or "VALUE"


def plain_params(params: list[Any], command: str = "") -> list[Any]:
    """Replace typer's type labels (``<bool>``, ``<str>``, ``<path>``...) in help rows by
    what to give (``FILE``, ``DIR``, ``SPEC``, ``N``...); flags show none; a numeric option's
    help ends with its valid range (:mod:`medscalpel.cli.bounds`) for ``command``
    ('compress prune')."""
    for p in params:
        if getattr(p, "_plain", False):
            continue
        if p.param_type_name == "option":
            constraint = constraint_for(command, list(p.opts))
            if constraint is not None:
                label = "Range" if isinstance(constraint, Interval) else "One of"
                p.help = f"{(p.help or '').rstrip()} {label}: {constraint.span()}.".lstrip()
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


def _check_values(ctx: Any, params: list[Any]) -> None:
    """Every parsed numeric value against :mod:`medscalpel.cli.bounds` (one ConfigError in
    the validation template, naming the flag and its range), before the command runs."""
    command = _command(ctx)
    for p in params:
        if p.param_type_name != "option" or p.name not in ctx.params:
            continue
        constraint = constraint_for(command, list(p.opts))
        value = ctx.params[p.name]
        if constraint is None or value is None:
            continue
        for item in (value if isinstance(value, (list, tuple)) else (value,)):
            constraint.check(item, p.opts[0], ctx.command_path)


def _refuse_empty_paths(ctx: Any, params: list[Any], args: list[str]) -> None:
    """``--out ''`` (or any path option given an empty string) would mean the current
    directory: refuse it before parsing turns it into ``Path('.')``."""
    flags = {o for p in params if p.param_type_name == "option"
             and _bare(p) in ("Path", "Optional[Path]", "list[Path]") for o in p.opts}
    for i, a in enumerate(args):
        flag, eq, val = a.partition("=")
        empty = (eq and not val.strip()) or (not eq and i + 1 < len(args)
                                             and not args[i + 1].strip())
        if flag in flags and empty:
            raise ConfigError(f"The '{flag}' parameter of {ctx.command_path} must be a path. Got "
                              "'' instead (an empty path is the current directory): give a "
                              "file or folder name, e.g. runs/my-run.")


def _glob_hint(message: str) -> str:
    """typer's 'unexpected extra argument' usually means an unquoted glob the shell expanded."""
    if "unexpected extra argument" in message:
        return (message + " -- if you gave a glob such as /scans/*.png, quote it "
                "('/scans/*.png') so that the shell does not expand it into several arguments.")
    return message


def _with_range(message: str, param: Any, command: str) -> str:
    """A value that did not even parse ('1e12' for an integer) also learns the valid range."""
    opts = list(getattr(param, "opts", None) or ())
    constraint = constraint_for(command, opts) if opts else None
    if constraint is None:
        return message
    return f"{message.rstrip('.')}; {opts[0]} takes {constraint.describe()}."


def _command(ctx: Any) -> str:
    """The command path without the program name: 'compress prune'."""
    return ctx.command_path.split(" ", 1)[1] if " " in ctx.command_path else ""


def _bare(p: Any) -> str:
    try:
        return str(p.bare_type())
    except Exception:  # pragma: no cover - a parameter without a type descriptor
        return ""


class PlainCommand(TyperCommand):
    """A command whose help is plain click text (readable at 80 columns, no rich panels),
    whose usage line hides hidden arguments, and whose numeric values are range-checked
    before its body runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rich_markup_mode = None

    def get_params(self, ctx):  # noqa: D401 - click API
        return plain_params(super().get_params(ctx), _command(ctx))

    def collect_usage_pieces(self, ctx):
        """``[OPTIONS] FIT HELD_OUT`` (click's spelling: upper-case names, ``[X]`` when
        optional, ``X...`` for several); hidden arguments (old spellings) left out."""
        rv = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if not isinstance(p, TyperArgument):
                rv.extend(p.get_usage_pieces(ctx))
            elif not getattr(p, "hidden", False):
                name = (p.name or "arg").upper() + ("..." if p.nargs != 1 else "")
                rv.append(name if p.required else f"[{name}]")
        return rv

    def parse_args(self, ctx, args):
        params = self.get_params(ctx)
        _refuse_empty_paths(ctx, params, list(args))
        try:
            rest = super().parse_args(ctx, args)
        except UsageError as exc:
            exc.message = _with_range(_glob_hint(exc.message), getattr(exc, "param", None),
                                      _command(ctx))
            raise
        if not ctx.resilient_parsing:
            _check_values(ctx, params)
        return rest


class PlainGroup(TyperGroup):
    """A command group with the same plain help as :class:`PlainCommand`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rich_markup_mode = None

    def get_params(self, ctx):
        return plain_params(super().get_params(ctx))


def finish_app(app: Any) -> None:
    """Give every command and group of ``app`` (recursively) plain help rows."""
    for info in app.registered_commands:
        if info.cls is None or info.cls is TyperCommand:
            info.cls = PlainCommand
    app.info.cls = PlainGroup
    for g in app.registered_groups:
        if g.typer_instance is not None:
            finish_app(g.typer_instance)


# ----------------------------------------------------------------------------- aliases
def one_of(option: Any, alias: Any, flag: str, alias_name: str, what: str,
           required: bool = True, *, command: str) -> Any:
    """The value of ``flag`` or of its older (hidden) spelling ``alias_name`` of ``command``
    (an entry of :data:`medscalpel.cli.deprecations.DEPRECATIONS`: using it warns, or fails
    from its removal version): giving both with different values, or neither when
    ``required``, is a one-line ConfigError."""
    if alias is not None:
        deprecations.used(alias_name, command)
    if option is not None and alias is not None and option != alias:
        raise ConfigError(f"{what} given twice ({flag} {option} and {alias_name} {alias}); "
                          f"give it once with {flag}.")
    value = option if option is not None else alias
    if value is None and required:
        raise ConfigError(f"Missing {flag} ({what}); see -h.")
    return value
