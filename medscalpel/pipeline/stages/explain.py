"""Explain stage: Grad-CAMs of true positives with lung-zone reports, polarized classifier
channels of the dense model and how they change with compression."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscalpel.deploy.cam_head import rank_agreement
from medscalpel.deploy.served import is_served, load_any
from medscalpel.explain.cams import compute_cam
from medscalpel.explain.figures import cam_overlay_figure, polarity_table_figure
from medscalpel.data.spec import open_dataset
from medscalpel.explain.polarity import QuantileRule, compare_stages, polarity_analysis
from medscalpel.explain.regions import describe_location, zones_from_masks
from medscalpel.layout import write_artifact
from medscalpel.models import load_model
from medscalpel.pipeline.stage import Stage, StageContext, register_stage


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
    may_write = ("polarity_stages",)
    Settings = ExplainSettings

    def run(self, ctx: StageContext, s: ExplainSettings) -> dict[str, Any]:
        summary = _cams(ctx, s)
        compressed = tuple(r["model_dir"] for r in ctx.compress_rows
                           if r.get("model_dir") and r["method"] in ("lossless", "structured-l1"))
        names = tuple(r["method"] for r in ctx.compress_rows
                      if r.get("model_dir") and r["method"] in ("lossless", "structured-l1"))
        PolarityStage().run(ctx, PolaritySettings(n_null=100, reference_name="dense",
                                                  compare_with=compressed,
                                                  compare_names=names))
        return {"cams": summary}


@dataclass(frozen=True)
class PolaritySettings:
    model: str | None = None  # default: the run's current model
    data: str | None = None  # spec whose labels define the Jaccard indices; default: the run's
    split: str = "train"
    quantile: float = 0.9  # a weight is strong above this quantile of its classifier row
    n_null: int = 200
    #: other models whose classifier rows are compared (and the names they get; default:
    #: their folder names), and the name of the model itself in that comparison
    compare_with: tuple[str, ...] = ()
    compare_names: tuple[str, ...] = ()
    reference_name: str = "model"


@register_stage
class PolarityStage(Stage):
    """Polarized classifier channels of a model vs label mutual exclusivity (Jaccard), with
    null models; how they change across other models (``explain polarity``)."""

    name = "polarity"
    may_read = ("calibrated_card", "phantom_data")
    writes = ("polarity",)
    may_write = ("polarity_stages",)
    Settings = PolaritySettings

    def run(self, ctx: StageContext, s: PolaritySettings) -> dict[str, Any]:
        m = load_model(s.model) if s.model else ctx.model
        ds = (open_dataset(s.data, split=s.split, preprocess=m.card.preprocess) if s.data
              else ctx.ds(s.split))
        labels, classes = ds.labels_multihot(), list(ds.class_names)
        rule = QuantileRule(q=s.quantile)
        w = m.classifier.weight.detach().numpy()
        pol = polarity_analysis(w, labels, classes, rule=rule, n_null=s.n_null, seed=ctx.seed)
        write_artifact(ctx.out, "polarity", pol)
        polarity_table_figure(pol, ctx.dir_of("polarity") / "polarity.png")
        ctx.results[self.name] = pol
        if not s.compare_with:
            return {"class_names": classes}
        weights = {s.reference_name: w}
        for i, d in enumerate(s.compare_with):
            key = s.compare_names[i] if i < len(s.compare_names) else Path(d).name
            weights[key] = load_model(d).classifier.weight.detach().numpy()
        stages = compare_stages(weights, labels, classes, rule=rule, n_null=s.n_null,
                                seed=ctx.seed)
        write_artifact(ctx.out, "polarity_stages", stages.to_dict())
        return {"class_names": classes, "compared": list(weights)}


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
