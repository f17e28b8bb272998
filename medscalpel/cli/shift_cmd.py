"""``medscalpel repair recalibrate-site``: k-shot recalibration of a model at a new site (the
registered 'recalibrate_site' stage of :mod:`medscalpel.pipeline.stages.calibration`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from medscalpel.cli.common import N_BOOT, N_BOOT_HELP, console, print_table, run_stage


def recalibrate_site(
    model: Path = typer.Option(..., help="Model directory (its stored thresholds are the start)."),
    internal: Path = typer.Option(..., metavar="PREDICTIONS",
                                  help="The model's internal (test) predictions: a "
                                       "predictions .npz or the run directory holding it; the "
                                       "operating point to restore."),
    external: str = typer.Option(..., help="Dataset spec of the new site (labelled)."),
    external_split: str = typer.Option("all", help="Split of the new site's dataset."),
    k: int = typer.Option(20, help="Labelled images per class used to recalibrate."),
    method: str = typer.Option("threshold", help="threshold | youden | temperature | platt | "
                               "offset | quantile (label-free: the site's unlabelled scores)"),
    classes: Optional[str] = typer.Option(None, help="Comma-separated classes to recalibrate "
                                                     "(default all)."),
    tolerance: float = typer.Option(0.05, help="'Restored' = sens and spec within this of the "
                                               "internal operating point."),
    n_boot: int = typer.Option(N_BOOT, help=N_BOOT_HELP),
    seed: int = typer.Option(0, help="Seed of the k-shot draw and the bootstrap."),
    class_map: list[str] = typer.Option([], "--class-map", help="EXTERNAL=MODEL class names."),
    out: Path = typer.Option(Path("runs/recalibrate-site"), help="Run directory to create "
                                                                 "(recalibration.json, model/)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Re-fit thresholds / temperature on k labelled images per class of a new site (drawn by
    patient when the dataset knows patients); measure sensitivity and specificity (with CIs) on
    the rest of that site (no image of a drawn patient) against the internal ones; write a
    recalibrated model copy whose card carries the site's operating point."""
    from medscalpel.errors import MedScalpelError
    from medscalpel.layout import artifact
    from medscalpel.pipeline.stages.calibration import SiteSettings, site_inputs
    from medscalpel.repair.shift.estimator import METHODS
    from medscalpel.validation import check_in

    check_in(method, "--method", "medscalpel repair recalibrate-site", METHODS)
    cmap = {}
    for it in class_map:
        if "=" not in it:
            raise MedScalpelError(f"--class-map takes EXTERNAL=MODEL pairs; got {it!r}.")
        a, b = it.split("=", 1)
        cmap[a.strip()] = b.strip()
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    cfg = {"model": str(model), "internal": str(internal), "external": external,
           "external_split": external_split, "k": k, "method": method, "classes": names,
           "tolerance": tolerance, "n_boot": n_boot, "class_map": cmap}
    settings = SiteSettings(model=str(model), internal=str(internal), external=external,
                            external_split=external_split, k=k, method=method,
                            classes=tuple(names) if names else None, tolerance=tolerance,
                            n_boot=n_boot, class_map=cmap or None)
    site_inputs(settings)  # an unreadable model or internal file fails before OUT is made
    run = run_stage("recalibrate_site", out, settings, "repair recalibrate-site", cfg,
                    seed=seed, overwrite=overwrite,
                    manifest_data=("spec", "split", "n_used", "n_total"))
    res = run.result
    console.print(f"new site: used {run.usage}")
    print_table(res.table(), f"{method} recalibration, k={k}: sens/spec on the rest of the site")
    for note in res.notes:
        console.print(note)
    colour = {"pass": "green", "fail": "red"}.get(res.restored_verdict.get("outcome"), "yellow")
    console.print(f"[{colour}]{escape(res.verdict)}[/{colour}]", highlight=False)
    if res.restored_verdict:
        console.print(f"evidence: {res.restored_verdict['method']}; "
                      f"{res.restored_verdict['correction']} over "
                      f"{res.restored_verdict['n_tests']} one-sided tests at alpha "
                      f"{res.restored_verdict['alpha']:g}; per-unit estimates, intervals and "
                      f"counts in {artifact('recalibration').filename} (restored_verdict)",
                      highlight=False)
    console.print(f"k-shot drawn by {res.split_unit}"
                  + (f" ({res.n_fit_patients} patients; {res.n_excluded_same_patient} images of "
                     "theirs kept out of the rest)" if res.split_unit == "patient" else
                     " (the dataset records no patients)"), highlight=False)
    console.print(f"operating point: {run.operating_point.describe()}", highlight=False)
    console.print(f"written to {out} (recalibrated model in {artifact('model').dir_in(out)})")
