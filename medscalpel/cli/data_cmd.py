"""``medscalpel data ...`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rich.table import Table

from medscalpel.cli.common import console, fmt, one_of, run_stage


def stats(
    spec_arg: Optional[str] = typer.Argument(None, hidden=True, metavar="SPEC"),
    spec: Optional[str] = typer.Option(None, "--data", help="Dataset spec, e.g. "
                                       "'nih:/data/nih', 'folder:/data/kermany/train?dedup=true', "
                                       "'nih:/data/nih-labels?labels_only=true'."),
    split: str = typer.Option("all", help="Split to describe: train, val, test or all."),
    out: Path = typer.Option(Path("runs/data-stats"), help="Run directory to create "
                             "(data/stats/: stats.json, jaccard.png, cooccurrence.png)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Label statistics of a dataset: prevalence per class, co-occurrence counts, Jaccard
    matrix and the pairs of findings that never occur together. Prints a table and writes
    JSON plus two heatmap PNGs into a new run directory."""
    from medscalpel.layout import artifact, read_artifact
    from medscalpel.pipeline.stages.data import StatsSettings

    spec = one_of(spec, spec_arg, "--data", "SPEC", "the dataset spec", command="data stats")
    run_stage("stats", out, StatsSettings(split=split), "data stats",
              {"spec": spec, "split": split}, spec=spec, overwrite=overwrite,
              manifest_data=("spec", "split", "content_hash", "n_images"))
    result = read_artifact(out, "label_stats")
    table = Table(title=f"{result.spec} [{split}]: {result.n} images, {result.task}")
    for col in ("class", "positives", "known", "prevalence"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, c, k, p in zip(result.class_names, result.counts, result.known, result.prevalence):
        table.add_row(name, str(c), str(k), fmt(p, 4))
    console.print(table)
    if result.task == "multilabel":
        ev = result.cooccurrence_evidence()
        console.print(f"images with >= 3 findings: {result.n_ge3}; pairs that never co-occur: "
                      f"{len(result.never_cooccur)} (descriptive only); mutually exclusive by "
                      f"evidence: {len(ev.exclusive_pairs())}", highlight=False)
        for w in ev.warnings:
            console.print(f"note: {w}", highlight=False)
    console.print(f"written to {artifact('label_stats').dir_in(out)}")
