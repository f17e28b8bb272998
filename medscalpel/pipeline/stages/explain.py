"""Explain stage: Grad-CAMs of true positives with lung-zone reports, polarized classifier
channels of the dense model and how they change with compression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medscalpel.explain.cams import compute_cam
from medscalpel.explain.figures import cam_overlay_figure, polarity_table_figure
from medscalpel.explain.polarity import compare_stages, polarity_analysis
from medscalpel.explain.regions import describe_location, zones_from_masks
from medscalpel.layout import write_artifact
from medscalpel.models import load_model
from medscalpel.pipeline.stage import Stage, StageContext, register_stage
from medscalpel.runs import write_json


def phantom_zones(phantom, row: int):
    """Lung zones of one phantom image from its ground-truth masks."""
    m = phantom.masks(int(row))
    return zones_from_masks(right_lung=m["lung_right"], left_lung=m["lung_left"],
                            heart_mask=m["heart"])


@dataclass(frozen=True)
class ExplainSettings:
    n_cam: int = 4


@register_stage
class ExplainStage(Stage):
    """Grad-CAMs of a few clearly positive test images with lung zones; polarity analysis of
    the classifier rows, dense and compressed."""

    name = "explain"
    reads = ("calibrated_card", "predictions:split=test", "compress")
    writes = ("cams", "polarity")
    Settings = ExplainSettings

    def run(self, ctx: StageContext, s: ExplainSettings) -> dict[str, Any]:
        summary = _cams(ctx, s)
        names = list(ctx.ds("test").class_names)
        pol = polarity_analysis(ctx.model.classifier.weight.detach().numpy(),
                                ctx.ds("train").labels, names, seed=ctx.seed, n_null=100)
        write_artifact(ctx.out, "polarity", pol.to_dict())
        pdir = ctx.dir_of("polarity")
        polarity_table_figure(pol, pdir / "polarity.png")
        weights = {"dense": ctx.model.classifier.weight.detach().numpy()}
        for r in ctx.compress_rows:
            if r.get("model_dir") and r["method"] in ("lossless", "structured-l1"):
                weights[r["method"]] = load_model(r["model_dir"]).classifier.weight.detach().numpy()
        stages = compare_stages(weights, ctx.ds("train").labels, names, seed=ctx.seed,
                                n_null=100)
        write_json(pdir / "stages.json", stages.to_dict())
        return {"cams": summary}


def _cams(ctx: StageContext, s: ExplainSettings) -> list[dict[str, Any]]:
    test = ctx.ds("test")
    names = list(test.class_names)
    rows = ctx.phantom.rows("test")
    # a few test images with a clearly visible finding: the CAM of that finding's class
    probs = ctx.preds["test"].probs()
    picks = []
    for k in np.argsort(-np.nansum(test.labels, 0)):
        hits = np.flatnonzero((test.labels[:, k] == 1) & (probs[:, k] >= 0.5))
        if len(hits):
            picks.append((int(hits[0]), int(k)))
        if len(picks) >= s.n_cam:
            break
    summary: list[dict[str, Any]] = []
    if not picks:  # no clearly positive test image: an empty, declared list
        write_artifact(ctx.out, "cams", {"method": "gradcam", "images": summary})
        return summary
    idx = [i for i, _ in picks]
    imgs = torch.stack([test.image(i) for i in idx])
    cam = compute_cam(ctx.model, imgs, [k for _, k in picks], method="gradcam",
                      progress=ctx.progress, ids=[test.ids[i] for i in idx])
    zones = []
    for (i, k), m in zip(picks, cam.maps):
        z = phantom_zones(ctx.phantom, rows[i])
        zones.append(z)
        summary.append({"id": test.ids[i], "class": names[k],
                        "location": describe_location(np.asarray(m), z.resized(m.shape))})
    grey = ctx.pp.denormalize(imgs).numpy()
    cdir = ctx.dir_of("cams")
    cam_overlay_figure(grey, cam, cdir / "gradcam.png", zones=zones,
                       title="Grad-CAM (true positives) with lung zones")
    write_artifact(ctx.out, "cams", {"method": "gradcam", "images": summary})
    return summary
