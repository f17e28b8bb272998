"""Rewrite the generated tables of docs/architecture.md from the registries (stages,
artifacts, compressors, runtimes, dataset adapters). tests/test_stages.py fails when the page
and the registries disagree: run this script after adding a stage, an artifact, a compressor, a
runtime or an adapter.

    .venv/bin/python scripts/architecture_tables.py
"""

from pathlib import Path

from medscalpel.pipeline.catalog import update

if __name__ == "__main__":
    doc = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
    print(("updated " if update(doc) else "already current: ") + str(doc))
