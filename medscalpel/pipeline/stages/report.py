"""Report stages: per-image clinical reports (of the demo's most confident test images, or of
image files: ``report clinical``) and the experiment report of a run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscalpel.data.cooccurrence import ExclusionRule
from medscalpel.data.dicom_read import deidentified_inputs
from medscalpel.deploy.served import load_any, require_served_cams
from medscalpel.engine.api import model_provenance
from medscalpel.layout import ARTIFACTS, write_artifact
from medscalpel.pipeline.stage import Stage, StageContext, register_stage
from medscalpel.pipeline.stages.explain import phantom_zones
from medscalpel.report.clinical import ClinicalReport, clinical_report
from medscalpel.report.dicom_sr import write_clinical_srs
from medscalpel.report.experiment import experiment_report
from medscalpel.report.sections import page_sections
from medscalpel.runs import write_json

#: the artifacts the experiment page's sections render or read (globs of files left out)
SECTION_ARTIFACTS: tuple[str, ...] = tuple(dict.fromkeys(
    k for cls in page_sections() for k in (*cls.renders, *cls.also_reads) if k in ARTIFACTS))


@dataclass(frozen=True)
class ExperimentSettings:
    """Settings of the 'experiment' stage: the page to write (default: ``report.html`` in the
    run directory it renders) and whether its JSON summary goes beside it (same stem,
    ``.summary.json``)."""

    html: str | None = None
    summary: bool = True


@register_stage
class ExperimentStage(Stage):
    """One self-contained HTML page of the run directory: every section whose declared
    artifact the run holds, sections not run say so (``report experiment``; the demo's
    'reports' stage writes it as reports/experiment.html)."""

    name = "experiment"
    may_read = SECTION_ARTIFACTS
    may_write = ("experiment_page", "experiment_summary")
    Settings = ExperimentSettings

    def run(self, ctx: StageContext, s: ExperimentSettings) -> dict[str, Any]:
        html = (Path(s.html) if s.html is not None
                else ARTIFACTS["experiment_page"].path_in(ctx.out))
        rep = experiment_report(ctx.out, html)
        if s.summary:
            _write_summary(ctx.out, html, rep.to_dict())
        ctx.results[self.name] = rep
        return {"html": str(html), "sections_present": [sec.key for sec in rep.sections
                                                        if sec.present]}


def _write_summary(run_dir: Path, html: Path, doc: dict[str, Any]) -> None:
    """The page's JSON summary beside it: the declared ``report.summary.json`` of the run
    directory, or ``FILE.summary.json`` beside a page the user named, checked against the same
    declaration. Never ``report.json``: that is the report of a compressor's run
    (``compression_report``), which rendering the run must not overwrite."""
    where = html.with_suffix(".summary.json")
    if where == ARTIFACTS["experiment_summary"].path_in(run_dir):
        write_artifact(run_dir, "experiment_summary", doc)
    else:
        ARTIFACTS["experiment_summary"].check(doc, f"writing {where}")
        write_json(where, doc)


@dataclass(frozen=True)
class ReportsSettings:
    n_clinical: int = 3


@register_stage
class ReportsStage(Stage):
    """Clinical reports of the most confident test images, then the experiment report."""

    name = "reports"
    reads = ("calibrated_card", "predictions:split=test", "label_stats")
    writes = ("clinical_index", "experiment_report")
    Settings = ReportsSettings

    def run(self, ctx: StageContext, s: ReportsSettings) -> dict[str, Any]:
        test = ctx.ds("test")
        order = np.argsort(-ctx.preds["test"].probs().max(1))[: s.n_clinical]
        imgs = torch.stack([test.image(int(i)) for i in order])
        rows = ctx.phantom.rows("test")
        zones = [phantom_zones(ctx.phantom, rows[int(i)]) for i in order]
        cal = ARTIFACTS["calibration"].path_in(ctx.out)
        clinical_report(ctx.model, imgs, ctx.dir_of("clinical_index"),
                        label_stats=ARTIFACTS["label_stats"].path_in(ctx.out),
                        calibration=cal if cal.is_file() else None,
                        image_ids=[test.ids[int(i)] for i in order], zones=zones,
                        progress=ctx.progress)
        out = ExperimentStage().run(ctx, ExperimentSettings(
            html=str(ARTIFACTS["experiment_report"].path_in(ctx.out)), summary=False))
        # section keys only: the Section objects hold the page's embedded figures (megabytes)
        return {"experiment_report": ARTIFACTS["experiment_report"].path,
                "sections_present": out["sections_present"]}


@dataclass(frozen=True)
class ClinicalSettings:
    """Settings of the 'clinical' stage (``report clinical``): the image files, the model
    directory or served artifact, and how the reports decide."""

    images: tuple[str, ...]
    model: str
    stats: str | None = None  # stats.json of the training labels (conflict evidence)
    calibration: str | None = None  # calibration.json of the model's thresholds
    conflicts: str = "flag"  # flag, or hide the weaker of two exclusive findings
    max_lift_upper: float = 0.1
    min_expected: float = 10.0
    min_images: int = 5000
    min_cam_size: int = 7
    cam_method: str = "gradcam"
    top_channels: int = 5
    keep_identifiers: bool = False
    dicom_sr: bool = False


@dataclass(frozen=True)
class ClinicalRun:
    """What the 'clinical' stage made: one report per image, the DICOM SR files written, the
    model that made them and the served artifact it runs (``None``: a model directory)."""

    reports: list[ClinicalReport]
    sr_files: list[Path]
    model: Any
    artifact: dict[str, Any] | None


@register_stage
class ClinicalStage(Stage):
    """Decision-support report per image file, written at the top of the run directory (one
    HTML + JSON per image, index.html, clinical.json; a DICOM SR per DICOM image on request):
    ``report clinical``. The demo's 'reports' stage writes its own under reports/clinical/
    from the phantom's test images and their ground-truth zones."""

    name = "clinical"
    writes = ("clinical_reports",)
    Settings = ClinicalSettings

    def run(self, ctx: StageContext, s: ClinicalSettings) -> dict[str, Any]:
        m = load_any(s.model)
        art = model_provenance(m)
        require_served_cams(m, s.cam_method, "--cam-method", "report clinical")  # before work
        rule = ExclusionRule(max_lift_upper=s.max_lift_upper, min_expected=s.min_expected,
                             min_images=s.min_images)
        # DICOM: no path, a pseudonym (unless the user opts in)
        items, image_ids, recorded = deidentified_inputs(list(s.images), s.keep_identifiers)
        reports = clinical_report(m, items, ctx.out, image_ids=image_ids,
                                  label_stats=s.stats, cam_method=s.cam_method,
                                  top_channels=s.top_channels, conflicts=s.conflicts,
                                  exclusion_rule=rule, calibration=s.calibration,
                                  min_cam_size=s.min_cam_size,
                                  identifiers_kept=s.keep_identifiers)
        write_artifact(ctx.out, "clinical_reports", {"reports": [r.to_dict() for r in reports]})
        srs = (write_clinical_srs(reports, list(s.images), ctx.out, s.keep_identifiers)
               if s.dicom_sr else [])
        ctx.results[self.name] = ClinicalRun(reports, srs, m, art)
        return {"images": recorded, "artifact": art, "reports": len(reports),
                "dicom_sr": len(srs)}
