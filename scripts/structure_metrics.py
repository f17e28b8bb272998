"""Structure counts of issue S (issue 33, part 7): measured on a source tree, printed and written
to benchmarks/results/structure_metrics.json with a "before" entry (a git commit, default
a4c875b, the commit issue S was measured on) and an "after" entry (the working tree).

    nice -n 10 .venv/bin/python scripts/structure_metrics.py [--before a4c875b] [--runs 5]

What is counted (all by ``ast`` over ``medscalpel/**/*.py`` of the tree):

- ``write_json_calls_outside_layout``: calls of ``write_json`` (a name or an attribute) outside
  ``medscalpel/layout.py`` and ``medscalpel/runs.py``.
- ``retyped_artifact_names``: the file names of the artifacts declared in
  ``medscalpel/layout.py`` (``ARTIFACTS[k].path``, its last component, read by importing the
  tree's own layout module) that appear again in a string literal (docstrings excluded) of
  another module: how many names and how many literals.
- ``imports_in_functions``: ``import`` statements inside a function body, in all of medscalpel
  and in ``medscalpel/cli`` (where the deferral is the documented pattern).
- ``import_cycles``: strongly connected components (more than one module) of the graph of
  MODULE-LEVEL imports between medscalpel modules (``if TYPE_CHECKING:`` blocks and imports
  inside functions or classes left out; ``from pkg import name`` is an edge to ``pkg.name``
  when that is a module, else to ``pkg``).
- ``files_over_600_lines`` and ``functions_over_80_lines`` (``def`` to its last line).
- ``help_seconds``: wall time of ``medscalpel -h`` (the console entry point
  ``medscalpel.cli.main.run(['-h'])`` in a fresh interpreter, the tree first on the path),
  median and all of ``--runs`` runs, after one unmeasured warm-up run (file cache); the same
  for ``medscalpel compress prune -h`` (``command_help_seconds``). The machine is shared: the
  1-minute load average around the timed runs is recorded with them.

The "before" tree is exported with ``git archive`` into a temporary folder (the repository is
not touched); both trees run with this interpreter and its installed packages.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_result  # noqa: E402

EXEMPT_WRITE_JSON = {"medscalpel/layout.py", "medscalpel/runs.py"}
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


# ----------------------------------------------------------------------------- parsing
def _sources(tree: Path) -> dict[str, ast.Module]:
    out = {}
    for path in sorted((tree / "medscalpel").rglob("*.py")):
        rel = path.relative_to(tree).as_posix()
        out[rel] = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    return out


def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _docstring_nodes(mod: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(mod):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                ids.add(id(body[0].value))
    return ids


def _functions(mod: ast.Module):
    return [n for n in ast.walk(mod) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


# ----------------------------------------------------------------------------- counts
def write_json_calls(mods: dict[str, ast.Module]) -> dict[str, Any]:
    per_file = {}
    for rel, mod in mods.items():
        if rel in EXEMPT_WRITE_JSON:
            continue
        n = sum(1 for node in ast.walk(mod) if isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Name) and node.func.id == "write_json")
            or (isinstance(node.func, ast.Attribute) and node.func.attr == "write_json")))
        if n:
            per_file[rel] = n
    return {"total": sum(per_file.values()),
            "in_cli": sum(v for k, v in per_file.items() if k.startswith("medscalpel/cli/")),
            "per_file": per_file}


def artifact_names(tree: Path) -> dict[str, str]:
    """key -> declared relative path, from the tree's own ``medscalpel.layout.ARTIFACTS``."""
    code = ("import json; from medscalpel.layout import ARTIFACTS; "
            "print(json.dumps({k: a.path for k, a in ARTIFACTS.items()}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tree)}, timeout=300, check=True)
    return json.loads(r.stdout)


def retyped_artifacts(mods: dict[str, ast.Module], declared: dict[str, str]) -> dict[str, Any]:
    names = sorted({p.rsplit("/", 1)[-1] for p in declared.values() if "{" not in p})
    patterns = {n: re.compile(r"(?:^|[/\s'\"(])" + re.escape(n) + r"(?:$|[\s'\",)])")
                for n in names}
    hits: dict[str, int] = defaultdict(int)
    files: dict[str, set[str]] = defaultdict(set)
    for rel, mod in mods.items():
        if rel == "medscalpel/layout.py":
            continue
        docs = _docstring_nodes(mod)
        for node in ast.walk(mod):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docs:
                for n, pat in patterns.items():
                    if pat.search(node.value):
                        hits[n] += 1
                        files[n].add(rel)
    return {"declared_names": len(names), "names_retyped": len(hits),
            "literals": sum(hits.values()),
            "per_name": {n: {"literals": hits[n], "files": sorted(files[n])}
                         for n in sorted(hits)}}


def imports_in_functions(mods: dict[str, ast.Module]) -> dict[str, Any]:
    per_file = {}
    for rel, mod in mods.items():
        n = 0
        for fn in _functions(mod):
            # count each import once: at its innermost function
            inner = {id(x) for f in _functions(fn) if f is not fn for x in ast.walk(f)}
            n += sum(1 for x in ast.walk(fn) if isinstance(x, (ast.Import, ast.ImportFrom))
                     and id(x) not in inner)
        if n:
            per_file[rel] = n
    return {"total": sum(per_file.values()),
            "in_cli": sum(v for k, v in per_file.items() if k.startswith("medscalpel/cli/")),
            "outside_cli": sum(v for k, v in per_file.items()
                               if not k.startswith("medscalpel/cli/")),
            "per_file": per_file}


def _module_level_imports(mod: ast.Module):
    """Import nodes run when the module is imported (not under TYPE_CHECKING)."""
    def visit(stmts):
        for s in stmts:
            if isinstance(s, (ast.Import, ast.ImportFrom)):
                yield s
            elif isinstance(s, ast.If):
                test = ast.unparse(s.test)
                if "TYPE_CHECKING" not in test:
                    yield from visit(s.body)
                yield from visit(s.orelse)
            elif isinstance(s, ast.Try):
                for block in (s.body, s.orelse, s.finalbody, *[h.body for h in s.handlers]):
                    yield from visit(block)
            elif isinstance(s, ast.With):
                yield from visit(s.body)
    yield from visit(mod.body)


def import_graph(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
    names = {_module_name(rel): rel for rel in mods}
    graph: dict[str, set[str]] = {m: set() for m in names}
    for rel, mod in mods.items():
        me = _module_name(rel)
        package = me if rel.endswith("__init__.py") else me.rsplit(".", 1)[0]
        for node in _module_level_imports(mod):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[:len(up) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.append(full if full in names else base)
            for t in targets:
                while t and t not in names and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in names and t != me:
                    graph[me].add(t)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components with more than one module, sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def long_files_and_functions(tree: Path, mods: dict[str, ast.Module]) -> dict[str, Any]:
    files = {}
    for rel in mods:
        n = len((tree / rel).read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES:
            files[rel] = n
    funcs = {}
    for rel, mod in mods.items():
        for fn in _functions(mod):
            n = fn.end_lineno - fn.lineno + 1
            if n > MAX_FUNCTION_LINES:
                funcs[f"{rel}:{fn.lineno}:{fn.name}"] = n
    return {"files_over_600_lines": {"count": len(files),
                                     "files": dict(sorted(files.items(), key=lambda kv: -kv[1]))},
            "functions_over_80_lines": {"count": len(funcs),
                                        "functions": dict(sorted(funcs.items(),
                                                                 key=lambda kv: -kv[1]))}}


def help_seconds(tree: Path, runs: int, argv: tuple[str, ...] = ("-h",)) -> dict[str, Any]:
    code = f"from medscalpel.cli.main import run; run({list(argv)!r})"
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "80"}

    def once() -> float:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env,
                           capture_output=True, text=True, timeout=300)
        dt = time.perf_counter() - t0
        if r.returncode != 0 or "Usage: medscalpel" not in r.stdout:
            raise RuntimeError(f"medscalpel -h failed in {tree}: {r.stderr[-500:]}")
        return dt

    once()  # warm-up: file cache, .pyc files
    load = os.getloadavg()[0]
    times = [once() for _ in range(runs)]
    return {"median": round(statistics.median(times), 3),
            "runs": [round(t, 3) for t in times],
            # a shared machine: the 1-minute load average before and after the timed runs
            "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
            "cpus": os.cpu_count()}


#: what a command calls when it runs a registered unit: a stage (run_command / run_stage /
#: run_demo, or run_in_place / run_stage_in_place for a folder the stage manages itself) or a
#: compressor (compress = COMPRESSORS[method])
_REGISTERED_RUNNERS = {"run_command", "run_stage", "run_demo", "run_in_place",
                       "run_stage_in_place", "compress"}

_COMMANDS_SNIPPET = r"""
import ast, inspect, json, textwrap
import typer
from medscalpel.cli.main import app
RUNNERS = set(json.loads(__import__("sys").argv[1]))

def calls(fn):
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError):
        return set()
    return {n.func.id if isinstance(n.func, ast.Name) else n.func.attr
            for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, (ast.Name, ast.Attribute))}

def through_registry(fn):
    seen, todo = set(), [fn]
    mod = inspect.getmodule(fn)
    while todo:  # the command and the module-level helpers of its own module it calls
        f = todo.pop()
        names = calls(f)
        if names & RUNNERS:
            return True
        for n in names - seen:
            seen.add(n)
            g = getattr(mod, n, None)
            if inspect.isfunction(g) and inspect.getmodule(g) is mod:
                todo.append(g)
    return False

out = {}
def walk(cmd, path):
    if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
        for name, sub in cmd.commands.items():
            if not getattr(sub, "hidden", False):
                walk(sub, path + [name])
    elif cmd.callback is not None:
        fn = inspect.unwrap(cmd.callback)
        writes = any(getattr(p, "name", None) == "out" for p in cmd.params)
        out[" ".join(path)] = [through_registry(fn), writes]
walk(typer.main.get_command(app), [])
print(json.dumps(out))
"""


def commands_through_registries(tree: Path) -> dict[str, Any]:
    """Which CLI commands run a registered stage or compressor (issue S: a command = parse
    options + run one stage), by reading each command's source and its module's helpers."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run([sys.executable, "-c", _COMMANDS_SNIPPET,
                        json.dumps(sorted(_REGISTERED_RUNNERS))], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"listing the commands of {tree} failed: {r.stderr[-800:]}")
    by_cmd = json.loads(r.stdout.strip().splitlines()[-1])
    yes = sorted(c for c, (v, _) in by_cmd.items() if v)
    writing = sorted(c for c, (_, w) in by_cmd.items() if w)
    return {"commands": len(by_cmd), "through_registries": len(yes), "which": yes,
            "not": sorted(c for c, (v, _) in by_cmd.items() if not v),
            # commands with an --out (they write); the others only print (show, models list)
            "writing_commands": len(writing),
            "writing_through_registries": len(set(writing) & set(yes)),
            "not_writing": sorted(set(by_cmd) - set(writing))}


def artifact_aliases(tree: Path) -> int:
    """Second locations that commands write an artifact to (layout.py's ``aliases``)."""
    text = (tree / "medscalpel" / "layout.py").read_text(encoding="utf-8")
    mod = ast.parse(text)
    n = 0
    for node in ast.walk(mod):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_a":
            if len(node.args) >= 7:
                n += len(getattr(node.args[6], "elts", ()))
            n += sum(len(getattr(k.value, "elts", ())) for k in node.keywords
                     if k.arg == "aliases")
    return n


def measure(tree: Path, runs: int) -> dict[str, Any]:
    mods = _sources(tree)
    cycles = strongly_connected(import_graph(mods))
    return {
        "write_json_calls_outside_layout": write_json_calls(mods),
        "retyped_artifact_names": retyped_artifacts(mods, artifact_names(tree)),
        "imports_in_functions": imports_in_functions(mods),
        "import_cycles": {"count": len(cycles), "components": cycles},
        **long_files_and_functions(tree, mods),
        "artifact_aliases": artifact_aliases(tree),
        "commands_through_registries": commands_through_registries(tree),
        "help_seconds": help_seconds(tree, runs),
        "command_help_seconds": {"command": "medscalpel compress prune -h",
                                 **help_seconds(tree, runs, ("compress", "prune", "-h"))},
    }


def headline(m: dict[str, Any]) -> dict[str, Any]:
    return {"write_json outside layout/runs": m["write_json_calls_outside_layout"]["total"],
            "  write_json in cli/": m["write_json_calls_outside_layout"]["in_cli"],
            "artifact names retyped (names / literals)":
                f"{m['retyped_artifact_names']['names_retyped']} of "
                f"{m['retyped_artifact_names']['declared_names']} / "
                f"{m['retyped_artifact_names']['literals']}",
            "imports inside functions": m["imports_in_functions"]["total"],
            "  in cli/ (the deferral pattern)": m["imports_in_functions"]["in_cli"],
            "  outside cli/": m["imports_in_functions"]["outside_cli"],
            "import cycles (module level SCCs)": m["import_cycles"]["count"],
            "  modules in them": sum(map(len, m["import_cycles"]["components"])),
            "files > 600 lines": m["files_over_600_lines"]["count"],
            "functions > 80 lines": m["functions_over_80_lines"]["count"],
            "artifact aliases (a second path commands write)": m["artifact_aliases"],
            "CLI commands running a registered stage / compressor":
                f"{m['commands_through_registries']['through_registries']} of "
                f"{m['commands_through_registries']['commands']}",
            "  of the commands with --out (that write)":
                f"{m['commands_through_registries'].get('writing_through_registries', '-')} of "
                f"{m['commands_through_registries'].get('writing_commands', '-')}",
            "medscalpel -h median s": m["help_seconds"]["median"],
            "medscalpel compress prune -h median s": m["command_help_seconds"]["median"]}


def export_commit(commit: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT,
                             capture_output=True, check=True).stdout
    tar_path = dest / "tree.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as t:
        t.extractall(dest / "tree", filter="data")
    return dest / "tree"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="a4c875b", help="commit of the 'before' entry")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of medscalpel -h")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args()

    commit = subprocess.run(["git", "rev-parse", args.before], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "medscalpel"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="structure-before-") as tmp:
        before = measure(export_commit(commit, Path(tmp)), args.runs)
    after = measure(ROOT, args.runs)
    rows = headline(before), headline(after)
    width = max(len(k) for k in rows[0])
    print(f"{'':{width}}  {'before':>14}  {'after':>14}")
    for k in rows[0]:
        print(f"{k:{width}}  {str(rows[0][k]):>14}  {str(rows[1][k]):>14}")
    if args.no_save:
        return
    path = save_result("structure_metrics", {
        "before": {"tree": f"git commit {commit}", **before},
        "after": {"tree": f"working tree at HEAD {head}"
                          + (" with uncommitted changes under medscalpel/" if dirty else ""),
                  **after},
        "headline": {"before": rows[0], "after": rows[1]},
    }, {"before": args.before, "runs": args.runs, "max_file_lines": MAX_FILE_LINES,
        "max_function_lines": MAX_FUNCTION_LINES,
        "help_command": "python -c \"from medscalpel.cli.main import run; run(['-h'])\" "
                        "(= the medscalpel console script), PYTHONPATH=<tree>, COLUMNS=80"})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
