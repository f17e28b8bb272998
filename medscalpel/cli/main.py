"""The ``medscalpel`` command line: a thin layer over the Python API.

Each command parses its arguments, calls one public function, writes that result's
``to_dict()`` (and its files) into a run directory with a manifest, and prints a summary.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from medscalpel import __version__
from medscalpel.cli import evaluate_cmd, models_cmd, predict_cmd
from medscalpel.cli.common import console, err_console, finish_app
from medscalpel.errors import MedScalpelError

app = typer.Typer(name="medscalpel", no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Compress, audit, explain and repair medical image classifiers "
                       "(chest X-ray first).")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: label statistics, the phantom.")
models_app = typer.Typer(no_args_is_help=True, help="The model zoo and checkpoint import.")
preds_app = typer.Typer(no_args_is_help=True, help="Predictions made elsewhere.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(preds_app, name="predictions")


def _version(value: bool) -> None:
    if value:
        console.print(f"medscalpel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory to create."),
    profile: str = typer.Option("quick", help="micro (seconds, for CI) | quick (<= 10 min on a "
                                              "2-core CPU) | full (closer to the issues' sizes)"),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
) -> None:
    """The main job: phantom -> baseline -> calibrate -> compress -> sweep -> audit -> explain ->
    repair -> distil -> experiment report, on the embedded phantom dataset. An interrupted run
    resumes after its last finished stage when the same command is run again."""
    from medscalpel.layout import artifact
    from medscalpel.pipeline.demo import PROFILES, run_demo
    from medscalpel.runs import RunDir

    if profile not in PROFILES:
        raise MedScalpelError(f"Unknown demo profile '{profile}'. Valid names: "
                              f"{', '.join(PROFILES)}.")
    console.print(f"medscalpel demo ({profile} profile) -> {out}")
    with RunDir(out, command="demo", config=PROFILES[profile].to_dict(), seed=seed,
                data={"spec": "phantom"}, overwrite=overwrite, resumable=True) as run:
        res = run_demo(run.path, profile, seed=seed, log=console.print)
    console.print(f"done in {res.seconds / 60:.1f} min; open "
                  f"{artifact('experiment_report').path_in(out)}")


def _register_model_commands() -> None:
    """Attach the model commands (zoo, import, train, predict, features, evaluate, predictions
    import; each group of them lives in its own ``*_cmd.py`` module) and the demo, in the
    order ``medscalpel -h`` lists them."""
    models_app.command("list")(models_cmd.models_list)
    models_app.command("import")(models_cmd.models_import)
    models_app.command("import-xrv")(models_cmd.models_import_xrv)
    app.command("train")(predict_cmd.train)
    app.command("predict")(predict_cmd.predict)
    app.command("features")(predict_cmd.features)
    app.command("evaluate")(evaluate_cmd.evaluate)
    preds_app.command("import")(models_cmd.predictions_import)
    app.command("demo")(demo)


def _register_optional_groups() -> None:
    """Attach the stage command groups (each lives in its own module)."""
    from medscalpel.cli import groups

    groups.register(app, data_app)
    finish_app(app)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_error_line(exc: OSError) -> str:
    """A file-system failure as a one-line message that says where and what to do."""
    import errno

    where = exc.filename if exc.filename is not None else "a path"
    reason = exc.strerror or type(exc).__name__
    advice = {
        errno.ENOENT: "check the path (or its parent folder) exists",
        errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
        errno.EISDIR: "it is a folder where a file is expected: give the file inside it",
        errno.EACCES: "it is not writable/readable by you: choose another --out or path",
        errno.EPERM: "the operation is not permitted there: choose another --out or path",
        errno.EROFS: "the file system is read-only: choose another --out",
        errno.ENOSPC: "the disk is full: free space or choose another --out",
        errno.EEXIST: "it already exists: choose another --out or pass --overwrite",
    }.get(exc.errno or -1, "check the path and its permissions")
    return f"cannot use {where}: {reason}; {advice}."


def run(argv: list[str] | None = None) -> None:
    """Console entry point. Every failure ends in one line ``error: ...`` on stderr and no
    traceback: bad input (a MedScalpelError, a usage error, a path that cannot be read or
    written) exits with code 2; anything else is a bug in medscalpel: exit 1, with the
    traceback only when MEDSCALPEL_DEBUG=1."""
    import os

    from typer import Abort
    from typer._click.exceptions import (  # typer vendors click: its usage-error classes
        ClickException, NoArgsIsHelpError)

    debug = os.environ.get("MEDSCALPEL_DEBUG") == "1"
    try:
        code = app(args=argv, prog_name="medscalpel", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(0)
    except ClickException as exc:
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see '{ctx.command_path} -h')"
        err_console.print(f"error: {_one_line(exc.format_message())}{hint}", highlight=False,
                          markup=False, soft_wrap=True)
        sys.exit(2)
    except MedScalpelError as exc:
        if debug:
            raise
        err_console.print(f"error: {_one_line(str(exc))}", highlight=False, markup=False,
                          soft_wrap=True)
        sys.exit(2)
    except OSError as exc:
        if debug:
            raise
        err_console.print(f"error: {_one_line(_os_error_line(exc))}", highlight=False,
                          markup=False, soft_wrap=True)
        sys.exit(2)
    except (KeyboardInterrupt, Abort):
        err_console.print("error: interrupted; nothing was written under --out (a resumable "
                          "command such as train keeps its work and resumes when run again).",
                          highlight=False, markup=False, soft_wrap=True)
        sys.exit(130)
    except Exception as exc:  # a bug: say so in one line, keep the traceback for debugging
        if debug:
            raise
        err_console.print(f"error: internal error ({type(exc).__name__}: "
                          f"{_one_line(str(exc))[:300]}); this is a medscalpel bug: please "
                          "report it, re-running with MEDSCALPEL_DEBUG=1 for the traceback.",
                          highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


_register_model_commands()
_register_optional_groups()

if __name__ == "__main__":  # pragma: no cover
    run()
