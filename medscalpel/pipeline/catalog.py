"""The registries as markdown tables: docs/architecture.md holds them between
``<!-- generated: NAME -->`` and ``<!-- /generated -->`` markers (stages, report sections,
artifacts, compressors, runtimes, dataset adapters), written by
``scripts/architecture_tables.py`` and checked by ``tests/test_stages.py``, so the architecture
page cannot go stale."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import medscalpel.pipeline.stages  # noqa: F401  (registers the stages)
from medscalpel.compress.contract import COMPRESSORS
from medscalpel.deploy.runtimes import RUNTIMES
from medscalpel.data.spec import DATASETS
from medscalpel.layout import ARTIFACTS
from medscalpel.pipeline.stage import STAGES
from medscalpel.report.sections import page_sections

_BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- /generated -->)", re.S)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def artifacts_table() -> str:
    rows = ["| key | path | type or required keys |", "|---|---|---|"]
    for key, a in ARTIFACTS.items():
        what = a.type_path.rsplit(":", 1)[1] if a.type_path else (
            ", ".join(a.keys) if a.keys else "(file)")
        rows.append(f"| {key} | `{a.path}` | {what} |")
    return "\n".join(rows)


def stages_table() -> str:
    rows = ["| stage | reads | writes | settings | what |", "|---|---|---|---|---|"]
    for name in STAGES.names():
        cls = STAGES.get(name)
        writes = [*cls.writes, *(f"({w})" for w in cls.may_write)]
        reads = [*cls.reads, *(f"({r})" for r in cls.may_read)]
        settings = ", ".join(f.name for f in fields(cls.Settings)) or "-"
        rows.append(f"| {name} | {', '.join(reads) or '-'} | {', '.join(writes)} | "
                    f"{settings} | {_cell(STAGES.describe()[name])} |")
    return "\n".join(rows)


def sections_table() -> str:
    rows = ["| section | title | renders | also reads | module |", "|---|---|---|---|---|"]
    for cls in page_sections():
        module = cls.__module__.removeprefix("medscalpel.report.sections.")
        rows.append(f"| {cls.key} | {_cell(cls.title)} | {_cell(', '.join(cls.renders))} | "
                    f"{', '.join(cls.also_reads) or '-'} | `{module}.py` |")
    return "\n".join(rows)


def _registry_table(reg, what: str) -> str:
    """The entries medscalpel itself registers (a test or a user may register more at run
    time: they are not the library's)."""
    rows = [f"| {what} | what |", "|---|---|"]
    rows += [f"| {n} | {_cell(h)} |" for n, h in reg.describe().items()
             if getattr(reg.get(n), "__module__", "").startswith("medscalpel.")]
    return "\n".join(rows)


TABLES = {
    "artifacts": artifacts_table,
    "stages": stages_table,
    "sections": sections_table,
    "compressors": lambda: _registry_table(COMPRESSORS, "compressor"),
    "runtimes": lambda: _registry_table(RUNTIMES, "runtime variant"),
    "datasets": lambda: _registry_table(DATASETS, "dataset adapter"),
}


def render(doc: str) -> str:
    """``doc`` with every generated block replaced by its current table."""
    def repl(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise KeyError(f"unknown generated block '{name}'; valid: {', '.join(TABLES)}")
        return f"{m.group(1)}{TABLES[name]()}\n{m.group(4)}"

    return _BLOCK.sub(repl, doc)


def blocks(doc: str) -> list[str]:
    return [m.group(2) for m in _BLOCK.finditer(doc)]


def update(path: str | Path) -> bool:
    """Rewrite the generated blocks of ``path``; return whether it changed."""
    p = Path(path)
    old = p.read_text(encoding="utf-8")
    new = render(old)
    if new != old:
        p.write_text(new, encoding="utf-8")
    return new != old


__all__ = ["TABLES", "blocks", "render", "update"]
