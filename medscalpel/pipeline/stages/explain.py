"""Explain stage: Grad-CAMs of true positives with lung-zone reports, polarized classifier
channels of the dense model and how they change with compression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medscalpel.deploy.cam_head import rank_agreement
from medscalpel.deploy.served import is_served, load_any
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
    may_read = ("deploy",)
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
    served = _served_cams(ctx, imgs, [k for _, k in picks], [test.ids[i] for i in idx], cam,
                          zones, grey)
    write_artifact(ctx.out, "cams", {"method": "gradcam", "images": summary,
                                     **({"served": served} if served else {})})
    return summary


#: the figure of the served artifact's CAMs, beside the dense model's gradcam.png
SERVED_FIGURE = "served_gradcam.png"


def _served_cams(ctx: StageContext, imgs: torch.Tensor, targets: list[int], ids: list[str],
                 dense_cam, zones, grey) -> dict[str, Any] | None:
    """The same images explained by the artifact ``deploy`` serves (issue T): its own CAM
    output (no gradients) when it has one, labelled with runtime and precision, and each map's
    Spearman rank agreement with the dense torch model's Grad-CAM. ``None`` when this run
    served nothing (deploy skipped)."""
    where = ctx.dir_of("deploy")
    if not is_served(where):
        return None
    model = load_any(where)
    art = model.provenance() if hasattr(model, "provenance") else None
    if getattr(model, "cam_refusal", lambda: None)() is not None:
        return {"status": "not available", "reason": model.cam_refusal(), "artifact": art}
    cam = compute_cam(model, imgs, targets, method="gradcam", progress=ctx.progress, ids=ids)
    label = model.label() if hasattr(model, "label") else "Grad-CAM of the served torch model"
    cam_overlay_figure(grey, cam, ctx.dir_of("cams") / SERVED_FIGURE, zones=zones,
                       title=label)
    rho = rank_agreement(np.asarray(cam.maps), np.asarray(dense_cam.maps))
    return {"status": "served", "label": label, "artifact": art, "figure": SERVED_FIGURE,
            "spearman_vs_dense_gradcam": [None if not np.isfinite(r) else float(r)
                                          for r in rho],
            "note": "the served artifact is the compressed model deploy chose (runtime and "
                    "precision in 'artifact'); the reference is the DENSE torch model's "
                    "Grad-CAM, so the agreement measures compression + serving together"}
