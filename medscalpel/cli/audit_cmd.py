"""``medscalpel audit ...`` commands: forgettability curves / FCD, and PIEs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from medscalpel.cli.common import N_BOOT, N_BOOT_HELP, console, fmt, run_stage


def forgettability(
    sweep_dir: Path = typer.Argument(..., help="Output folder of 'medscalpel compress sweep' "
                                     "or 'medscalpel scale prune' (read through its index.json)."),
    out: Path = typer.Option(Path("runs/audit-forgettability"), help="Run directory to create "
                             "(audit/forgettability/: forgettability.json, audit_*.png; "
                             "manifest.json)."),
    method: Optional[str] = typer.Option(None, help="Sweep method to audit when the sweep holds "
                                         "several (e.g. l1, random)."),
    train_data: Optional[str] = typer.Option(None, help="Dataset spec whose 'train' split gives "
                                             "prevalence and co-occurrence (default: the "
                                             "evaluated split's labels)."),
    drop_threshold: float = typer.Option(0.2, help="Relative AP drop defining 'first drop'."),
    n_boot: int = typer.Option(N_BOOT, help=N_BOOT_HELP),
    n_perm: int = typer.Option(999, help="Mantel permutations for the FCD correlations."),
    seed: int = typer.Option(0, help="Seed of the bootstrap and permutations."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Forgettability curves per class (median and IQR over seeds), first 20%-drop level, delta
    AP at the highest level, their correlation with log prevalence, and FCD between classes."""
    from medscalpel.layout import artifact
    from medscalpel.pipeline.stages.audit import ForgettabilitySettings

    config = {"sweep_dir": str(sweep_dir), "method": method, "train_data": train_data,
              "drop_threshold": drop_threshold, "n_boot": n_boot, "n_perm": n_perm}
    settings = ForgettabilitySettings(sweep_dir=str(sweep_dir), method=method,
                                      train_data=train_data, drop_threshold=drop_threshold,
                                      n_boot=n_boot, n_perm=n_perm)
    result = run_stage("forgettability", out, settings, "audit forgettability", config,
                       seed=seed, overwrite=overwrite)
    table = Table(title=f"Forgettability ({result.method}, {len(result.seeds)} seeds, "
                        f"prevalence from {result.prevalence_source})")
    for col in ("class", "prevalence", "AP ref", "first 20% drop", "rel. ΔAP at max"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in sorted(result.table(), key=lambda r: -r["prevalence"]):
        table.add_row(row["class"], fmt(row["prevalence"], 4), fmt(row["ap_ref_median"]),
                      fmt(row["first_drop"], 2), fmt(row["delta_at_max"]))
    console.print(table)
    for name, c in {**result.correlations, **result.fcd.correlations}.items():
        console.print(f"{name}: {c.label()}")
    console.print(f"written to {artifact('forgettability').dir_in(out)}")


def pies(
    sweep_dir: Path = typer.Argument(..., help="Output folder of 'medscalpel compress sweep'."),
    out: Path = typer.Option(Path("runs/audit-pies"), help="Run directory to create "
                             "(audit/pies/: pies.json, pies.csv, pie_gallery.png; manifest.json)."),
    ratio: float = typer.Option(0.9, help="Compressed level compared with the dense model."),
    quantile: float = typer.Option(0.05, help="Fraction of images flagged as PIEs."),
    score: str = typer.Option("auto", help="auto, spearman (multi-label), tvd or true_class "
                              "(multi-class)."),
    method: Optional[str] = typer.Option(None, help="Sweep method when the sweep holds several."),
    data: Optional[str] = typer.Option(None, help="Dataset spec of the evaluated images, to draw "
                                       "the PIE gallery (audit/pies/pie_gallery.png)."),
    split: str = typer.Option("test", help="Split of --data the sweep was evaluated on."),
    n_boot: int = typer.Option(N_BOOT, help=N_BOOT_HELP),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Pruning-identified exemplars: images whose compressed predictions disagree most with the
    dense model's, and which classes / how many findings are over-represented among them."""
    from medscalpel.layout import artifact
    from medscalpel.pipeline.stages.audit import PiesSettings

    config = {"sweep_dir": str(sweep_dir), "ratio": ratio, "quantile": quantile, "score": score,
              "method": method, "data": data, "split": split, "n_boot": n_boot}
    settings = PiesSettings(sweep_dir=str(sweep_dir), ratio=ratio, quantile=quantile,
                            score=score, method=method, gallery_data=data, gallery_split=split,
                            n_boot=n_boot)
    result = run_stage("pies", out, settings, "audit pies", config, seed=seed,
                       overwrite=overwrite)
    table = Table(title=f"PIEs at {result.level_name} {result.level:g}: {int(result.is_pie.sum())}"
                        f" of {len(result.ids)} images ({result.score_name})")
    for col in ("group", "PIEs with", "share PIE", "share all", "ratio", "95% CI", "Fisher p"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for r in result.class_overrep + result.findings_overrep:
        table.add_row(r["name"], str(r["n_pie_with"]), fmt(r["share_pie"]),
                      fmt(r["share_overall"]), fmt(r["ratio"], 2), fmt(tuple(r["ratio_ci"]), 2),
                      fmt(r["fisher_p"], 4))
    console.print(table)
    console.print(f"written to {artifact('pies').dir_in(out)}")
