"""``medscalpel report ...`` commands: clinical (per-image reports) and experiment (one page
from a demo run directory)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from medscalpel.cli.common import console
from medscalpel.runs import RunDir, write_json


def clinical(
    images: List[Path] = typer.Argument(..., help="Chest X-ray image files (PNG, JPEG, ...)."),
    model: Path = typer.Option(..., "--model", "-m", help="Model directory (model.json + "
                               "model.safetensors), ideally with calibrated thresholds."),
    stats: Optional[Path] = typer.Option(None, help="stats.json of the TRAINING labels "
                                         "('medscalpel data stats'): enables the "
                                         "mutual-exclusivity check."),
    jaccard_exclusion: float = typer.Option(0.01, help="Two findings whose training-label "
                                            "Jaccard index is below this are mutually "
                                            "exclusive: only the stronger is reported."),
    cam_method: str = typer.Option("gradcam", help="gradcam, gradcam++ or scorecam."),
    top_channels: int = typer.Option(5, help="Channels listed per finding."),
    out: Path = typer.Option(Path("runs/report-clinical"), help="Run directory to create: one "
                             "HTML + JSON per image and index.html."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Decision-support report per image: findings above their calibrated thresholds, the
    channels behind each, where the model looked (lung zones + overlay) and findings excluded
    as mutually exclusive. Self-contained HTML and JSON."""
    from medscalpel.models.checkpoint import load_model
    from medscalpel.report.clinical import clinical_report

    cfg = {"model": str(model), "images": [str(i) for i in images],
           "stats": str(stats) if stats else None, "jaccard_exclusion": jaccard_exclusion,
           "cam_method": cam_method, "top_channels": top_channels}
    with RunDir(out, command="report clinical", config=cfg, overwrite=overwrite) as run:
        reports = clinical_report(load_model(model), [str(i) for i in images], run.path,
                                  label_stats=stats, jaccard_exclusion=jaccard_exclusion,
                                  cam_method=cam_method, top_channels=top_channels)
        write_json(run.path / "clinical.json", {"reports": [r.to_dict() for r in reports]})
    for r in reports:
        console.print(f"[bold]{r.image_id}[/bold]: {r.summary()}"
                      + (f"  (excluded: {', '.join(e.name for e in r.excluded)})"
                         if r.excluded else ""), markup=True, highlight=False)
    console.print(f"written to {out / 'index.html'}")


def experiment(
    run_dir: Path = typer.Argument(..., help="A demo run directory (medscalpel demo --out)."),
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default "
                                       "RUN_DIR/report.html); a JSON summary is written beside "
                                       "it."),
) -> None:
    """One self-contained HTML page from a demo run directory: dataset statistics, baseline
    metrics, compression + Pareto plot, forgettability, PIEs, polarity, repair log, distillation
    and example clinical reports. Sections not run say so."""
    from medscalpel.report.experiment import experiment_report

    rep = experiment_report(run_dir, out)
    write_json(Path(rep.html_path).with_suffix(".json"), rep.to_dict())
    d = rep.to_dict()
    console.print(f"sections: {len(d['present'])} present"
                  + (f", not run: {', '.join(d['not_run'])}" if d["not_run"] else ""),
                  highlight=False)
    console.print(f"written to {rep.html_path}")
