"""``medscalpel report ...`` commands: clinical (per-image reports) and experiment (one page
from a demo run directory)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from medscalpel.cli import deprecations
from medscalpel.cli.common import console, run_stage, run_stage_in_place
from medscalpel.errors import ConfigError

_MODEL_HELP = ("Model directory (model.json + model.safetensors), ideally with calibrated "
               "thresholds, or a served artifact ('compress deploy' run or its serve/): its "
               "logits and its own CAM output (Grad-CAM), no channel evidence.")
_STATS_HELP = ("stats.json of the TRAINING labels ('medscalpel data stats', same label set as "
               "the model): enables the evidence-based conflict check.")
_CALIBRATION_HELP = ("calibration.json of the model's thresholds ('medscalpel repair "
                     "calibrate'): shows sensitivity/specificity at each threshold on its "
                     "evaluation split.")
_HIDE_HELP = ("Hide the weaker of two findings that the training labels show to be mutually "
              "exclusive (default: list both and flag the conflict). The report marks what it "
              "hid.")
_KEEP_IDS_HELP = ("Name DICOM images by their file names and record their paths (default: "
                  "salted pseudonyms, no identifier in any output); marked at the top of every "
                  "report page.")
_DICOM_SR_HELP = ("Also write each DICOM image's report as a DICOM Structured Report "
                  "(<name>.sr.dcm, highdicom) referencing the source image; no patient name / "
                  "ID / birth date / accession number copied unless --keep-identifiers. Needs "
                  "the [dicom] extra.")


def clinical(
    images: List[Path] = typer.Argument(..., help="Chest X-ray image files (PNG, JPEG, ...)."),
    model: Path = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
    stats: Optional[Path] = typer.Option(None, help=_STATS_HELP),
    calibration: Optional[Path] = typer.Option(None, help=_CALIBRATION_HELP),
    hide_exclusive: bool = typer.Option(False, "--hide-exclusive", help=_HIDE_HELP),
    max_lift_upper: float = typer.Option(0.1, help="Exclusion rule: upper 95% CI bound of the "
                                         "lift (observed / expected co-occurrences) below this."),
    min_expected: float = typer.Option(10.0, help="Exclusion rule: at least this many "
                                       "co-occurrences expected under independence."),
    min_images: int = typer.Option(5000, help="Exclusion rule: at least this many images in the "
                                   "label statistics (below: no exclusion, a warning)."),
    min_cam_size: int = typer.Option(7, help="Smallest CAM map side (cells) for lung-zone "
                                     "words; coarser maps say 'map too coarse to localise'."),
    jaccard_exclusion: Optional[float] = typer.Option(None, hidden=True),
    cam_method: str = typer.Option("gradcam", help="gradcam, gradcam++ or scorecam."),
    top_channels: int = typer.Option(5, help="Channels listed per finding."),
    out: Path = typer.Option(Path("runs/report-clinical"), help="Run directory to create: one "
                             "HTML + JSON per image and index.html."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    keep_identifiers: bool = typer.Option(False, "--keep-identifiers", help=_KEEP_IDS_HELP),
    dicom_sr: bool = typer.Option(False, "--dicom-sr", help=_DICOM_SR_HELP),
) -> None:
    """Decision-support report per image: every finding above its threshold (with the
    threshold's origin and operating point), conflicts flagged with the training-label
    evidence, the channels behind each finding, where the model looked (lung zones when the CAM
    resolution allows + overlay). Self-contained HTML and JSON."""
    from medscalpel.data.cooccurrence import ExclusionRule
    from medscalpel.pipeline.stages.report import ClinicalSettings

    deprecations.renamed(None, jaccard_exclusion, "--jaccard-exclusion", "report clinical")
    if dicom_sr:  # before any work: DICOM inputs and highdicom
        from medscalpel.report.dicom_sr import require_sr_inputs

        require_sr_inputs(images)
    rule = ExclusionRule(max_lift_upper=max_lift_upper, min_expected=min_expected,
                         min_images=min_images)
    mode = "hide" if hide_exclusive else "flag"
    # "images" (DICOM: a pseudonym, no path, unless the user opts in) and "artifact" (the
    # served artifact's provenance) come from the stage, which reads the files and the model
    cfg = {"model": str(model), "images": None,
           "stats": str(stats) if stats else None,
           "calibration": str(calibration) if calibration else None, "conflicts": mode,
           "exclusion_rule": rule.to_dict(), "min_cam_size": min_cam_size,
           "cam_method": cam_method, "top_channels": top_channels, "artifact": None,
           "keep_identifiers": keep_identifiers, "dicom_sr": dicom_sr}
    settings = ClinicalSettings(
        images=tuple(str(i) for i in images), model=str(model), stats=cfg["stats"],
        calibration=cfg["calibration"], conflicts=mode, max_lift_upper=max_lift_upper,
        min_expected=min_expected, min_images=min_images, min_cam_size=min_cam_size,
        cam_method=cam_method, top_channels=top_channels, keep_identifiers=keep_identifiers,
        dicom_sr=dicom_sr)
    # no seed: the reports are deterministic and the manifest records none (as before)
    res = run_stage("clinical", out, settings, "report clinical", cfg, seed=None,
                    overwrite=overwrite, manifest_config=("images", "artifact"))
    _print_clinical(res.reports)
    if dicom_sr:
        console.print(f"DICOM SR: {len(res.sr_files)} of {len(images)} image(s) (the DICOM "
                      "ones)", highlight=False)
    _print_served(res.model, res.artifact)
    console.print(f"written to {out / 'index.html'}")


def _print_served(m, art) -> None:
    """The served artifact that made the reports (and what a served graph cannot give)."""
    from medscalpel.deploy.served import artifact_line

    if art is not None and not getattr(m, "supports_gradients", True):
        console.print(f"model: {artifact_line(art)}; maps: {m.label()}; no channel evidence "
                      "(the served graph has no penultimate features)", highlight=False)
    elif art is not None:
        console.print(f"model: {artifact_line(art)}", highlight=False)


def _print_clinical(reports) -> None:
    from rich.markup import escape

    first = reports[0]
    if first.operating.get("notice"):
        console.print(f"[bold yellow]WARNING:[/bold yellow] {escape(first.operating['notice'])}",
                      markup=True, highlight=False)
    for w in first.exclusion.get("warnings", []):
        console.print(f"[yellow]note:[/yellow] {escape(w)}", markup=True, highlight=False)
    if first.resolution.get("note"):
        console.print(f"[yellow]note:[/yellow] {escape(first.resolution['note'])}", markup=True,
                      highlight=False)
    for r in reports:
        hidden = ", ".join(f"{e.name} vs {e.excluded_by}" for e in r.excluded)
        console.print(f"[bold]{escape(r.image_id)}[/bold]: {escape(r.summary())}"
                      + (f"  (HIDDEN by --hide-exclusive: {escape(hidden)})" if hidden else ""),
                      markup=True, highlight=False)


def experiment(
    run_dir: Path = typer.Argument(..., help="A run directory: a demo run, or the --out of a "
                                   "single command (train, evaluate, compress deploy, audit "
                                   "changes, ...)."),
    out: Optional[Path] = typer.Option(None, metavar="FILE.html", help="HTML file to write, "
                                       "with a JSON summary beside it. Without --out both go "
                                       "INTO the input run directory (RUN_DIR/report.html, "
                                       "RUN_DIR/report.summary.json)."),
) -> None:
    """One self-contained HTML page from a run directory: every section whose declared
    artifact (medscalpel/layout.py) the run holds, at its demo path or where a single command
    writes it; sections not run say so."""
    from medscalpel.pipeline.stages.report import ExperimentSettings

    if out is not None and out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"The '--out' parameter of medscalpel report experiment must be an "
                          f"HTML file name ending in .html. Got {str(out)!r} instead (e.g. "
                          f"{out.with_suffix('.html') if out.suffix else out / 'report.html'}).")
    if out is None:
        console.print(f"no --out: writing into the input run directory {run_dir}",
                      highlight=False)
    # the stage renders RUN_DIR in place: no new run directory (no manifest), only the page
    # and its JSON summary, where --out names them or into RUN_DIR
    d = run_stage_in_place("experiment", run_dir,
                           ExperimentSettings(html=str(out) if out else None)).to_dict()
    console.print(f"sections: {len(d['present'])} present"
                  + (f", not run: {', '.join(d['not_run'])}" if d["not_run"] else ""),
                  highlight=False)
    # a folder holding no artifact any section renders was refused by the stage (DataError)
    console.print(f"written to {d['html']}")
