"""Report stage: per-image clinical reports of the most confident test images and the
experiment report of the whole run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medscalpel.layout import ARTIFACTS
from medscalpel.pipeline.stage import Stage, StageContext, register_stage
from medscalpel.pipeline.stages.explain import phantom_zones
from medscalpel.report.clinical import clinical_report
from medscalpel.report.experiment import experiment_report


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
        rep = experiment_report(ctx.out, ARTIFACTS["experiment_report"].path_in(ctx.out))
        # section keys only: the Section objects hold the page's embedded figures (megabytes)
        return {"experiment_report": ARTIFACTS["experiment_report"].path,
                "sections_present": [sec.key for sec in rep.sections if sec.present]}
