"""``medscalpel show RUN``: print any run directory's results again, as tables.

Reads the manifest and every artifact declared in :mod:`medscalpel.layout` that the directory
holds, at its declared path (the demo's stages and the single commands write the same paths;
a run directory of medscalpel < 0.2 is read at :data:`~medscalpel.layout.LEGACY_PATHS`);
typed artifacts through their ``table()`` when they have one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from medscalpel.cli.common import console, fmt, print_table

MAX_ROWS = 40
MAX_COLS = 8
#: the columns kept first when a table is too wide for a terminal
PRIORITY = ("name", "class", "method", "model", "n_pos", "n", "auroc", "auroc_ci", "ap",
            "accuracy", "sensitivity", "specificity", "f1", "delta_auroc", "delta_auroc_ci",
            "delta_ap", "delta_accuracy", "params", "speedup", "latency_ms", "status", "seconds")


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _pair(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(x, (int, float)) or x is None for x in v))


def _cell(v: Any) -> Any:
    if _pair(v):
        return tuple(float("nan") if x is None else float(x) for x in v)
    if isinstance(v, str) and len(v) > 80:
        return v[:77] + "..."
    return v


def _rows_of(items: list[Any]) -> list[dict[str, Any]]:
    """A list of JSON objects as table rows (scalar and [lo, hi] columns only)."""
    cols: list[str] = []
    for it in items:
        for k, v in it.items():
            if (_scalar(v) or _pair(v)) and k not in cols:
                cols.append(k)
    if len(cols) > MAX_COLS:
        keep = [cols[0]] + [c for c in PRIORITY if c in cols and c != cols[0]]
        cols = (keep if len(keep) >= 3 else cols)[:MAX_COLS]
    return [{c: _cell(it.get(c)) for c in cols} for it in items]


def render(doc: Any, title: str, depth: int = 0) -> int:
    """Print a JSON document as tables: its scalar fields, each list of objects and each
    object of scalars; returns how many tables were printed."""
    if not isinstance(doc, dict):
        if isinstance(doc, list) and doc and all(isinstance(x, dict) for x in doc):
            rows = _rows_of(doc)
            print_table(rows[:MAX_ROWS], title)
            return 1
        console.print(f"{title}: {fmt(doc)}", highlight=False)
        return 0
    printed = 0
    fields = [{"field": k, "value": _cell(v)} for k, v in doc.items()
              if (_scalar(v) or _pair(v)) and k != "schema_version"]
    if fields:
        print_table(fields[:MAX_ROWS], title)
        printed += 1
    for k, v in doc.items():
        sub = f"{title}: {k}"
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            rows = _rows_of(v)
            if rows and rows[0]:
                print_table(rows[:MAX_ROWS], sub + (f" (first {MAX_ROWS} of {len(rows)})"
                                                   if len(rows) > MAX_ROWS else ""))
                printed += 1
        elif isinstance(v, dict) and v:
            if all(_scalar(x) or _pair(x) for x in v.values()):
                if len(v) > 6:  # a wide record reads better as field / value rows
                    print_table([{"field": kk, "value": _cell(x)} for kk, x in v.items()][
                        :MAX_ROWS], sub)
                else:
                    print_table([{kk: _cell(x) for kk, x in v.items()}], sub)
                printed += 1
            elif all(isinstance(x, dict) for x in v.values()) and all(
                    all(_scalar(y) or _pair(y) for y in x.values()) for x in v.values()):
                print_table([{"": kk, **{c: _cell(y) for c, y in x.items()}}
                             for kk, x in list(v.items())[:MAX_ROWS]], sub)
                printed += 1
            elif depth < 1:
                printed += render(v, sub, depth + 1)
    return printed


def _typed_table(obj: Any) -> list[dict[str, Any]] | None:
    table = getattr(obj, "table", None)
    if callable(table):
        try:
            rows = table()
        except TypeError:
            return None
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            return rows
    return None


def show(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A run directory written by any "
                                   "medscalpel command (train, evaluate, compress, audit, "
                                   "demo...)."),
) -> None:
    """Print a run's results again, as tables: its manifest, every declared artifact it holds
    and the result files of single commands."""
    from medscalpel.errors import DataError
    from medscalpel.layout import ARTIFACTS, artifact, read_artifact
    from medscalpel.runs import read_json

    if not run_dir.is_dir():
        raise DataError(f"{run_dir} is not a run directory (give the --out of a medscalpel "
                        "command).")
    shown = 0
    man_path = artifact("manifest").path_in(run_dir)
    if man_path.is_file():
        man = read_json(man_path)
        if isinstance(man, dict):
            seconds = man.get("seconds")
            print_table([{"command": man.get("command"), "status": man.get("status"),
                          "started": man.get("started"),
                          "seconds": float(seconds) if isinstance(seconds, (int, float))
                          else None,
                          "seed": man.get("seed")}], f"run {run_dir}")
            shown += 1
    done: set[Path] = {man_path.resolve()}
    for key, a in ARTIFACTS.items():
        if not a.is_json or "{" in a.path or key == "manifest":
            continue
        rel = a.locate(run_dir)  # its declared path (or its legacy one)
        if rel is None:
            continue
        p = run_dir / rel
        if p.resolve() in done:
            continue
        try:
            obj = read_artifact(run_dir, key)
        except DataError as exc:
            console.print(f"[yellow]{a.path}: not shown ({exc})[/yellow]")
            continue
        done.add(p.resolve())
        rows = _typed_table(obj)
        title = f"{key} ({rel}): {a.description}" if rel == a.path else rel
        if rows is not None:
            print_table(rows[:MAX_ROWS], title)
            shown += 1
        else:
            shown += render(obj.to_dict() if hasattr(obj, "to_dict") else obj, title)
    if shown == 0:
        raise DataError(f"{run_dir} holds no result medscalpel knows (a "
                        f"{artifact('manifest').filename} or an artifact declared in medscalpel/layout.py: `medscalpel show -h`).")

