"""Explain stages: Grad-CAMs of true positives with lung-zone reports, polarized classifier
channels of the dense model and how they change with compression (the demo's 'explain'); the
stages of the single explain commands (polarity, attribute, channels, saliency_compare)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscalpel.data.spec import open_dataset
from medscalpel.deploy.cam_head import rank_agreement
from medscalpel.deploy.served import is_served, load_any, require_served_cams
from medscalpel.engine.api import model_provenance
from medscalpel.engine.predict import check_compatible, collect_images
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.explain.attributions import attribute
from medscalpel.explain.cams import compute_cam
from medscalpel.explain.channels import channel_contributions_from_model
from medscalpel.explain.compare import compare_saliency
from medscalpel.explain.figures import (cam_overlay_figure, channel_bar_figure,
                                       polarity_table_figure)
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
        rows = [r for r in ctx.compress_rows
                if r.get("model_dir") and r["method"] in ("lossless", "structured-l1")]
        PolarityStage().run(ctx, PolaritySettings(
            n_null=100, reference_name="dense", compare_with=tuple(r["model_dir"] for r in rows),
            compare_names=tuple(r["method"] for r in rows)))
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


# ----------------------------------------------------------------------------- command stages
def open_model_data(model_dir: str, data: str, split: str, served_ok: bool = False):
    """The model and its data, refused (ModelError naming both) when the model's classes,
    task or input channels do not match the data's: explanations of one class would otherwise
    be drawn for another class's images. ``served_ok``: a served artifact (a 'compress deploy'
    run or its serve/) is accepted; else it is refused with the reason (no gradients)."""
    if is_served(model_dir) and not served_ok:
        raise ModelError(f"--model {model_dir} is a served artifact (compress deploy): it has no "
                         "gradients or weights to explain; this command needs the torch model "
                         "directory (only 'explain cam' runs on a served artifact, through its "
                         "CAM output).")
    model = load_any(model_dir)
    ds = open_dataset(data, split=split, preprocess=model.card.preprocess)
    require_match(model, model_dir, ds, data)
    return model, ds


def require_match(model, model_dir: str, ds, data: str) -> None:
    """ModelError naming ``--model`` and ``--data`` when the model does not fit the data."""
    try:
        check_compatible(model, ds)
    except ModelError as exc:
        raise ModelError(f"--model {model_dir} does not fit --data {data}: {exc}") from None


def class_index(model, name: str) -> int:
    """The index of class ``name`` of ``model`` (ConfigError listing the classes)."""
    names = list(model.card.class_names)
    if name not in names:
        raise ConfigError(f"Unknown class '{name}'. The model's classes: {', '.join(names)}.")
    return names.index(name)


def positives(ds, k: int, n: int, seed: int) -> list[int]:
    """``n`` images of ``ds`` positive for class ``k`` (any images when it has none), seeded."""
    y = ds.labels_multihot()[:, k]
    idx = np.flatnonzero(y == 1)
    if len(idx) == 0:
        idx = np.arange(len(ds))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(idx, min(n, len(idx)), replace=False).tolist())


@dataclass(frozen=True)
class CamSettings:
    model: str  # a model directory, or a served artifact (its own CAM output: Grad-CAM)
    data: str
    target: str
    split: str = "test"
    n_images: int = 8
    method: str = "gradcam"


@register_stage
class CamStage(Stage):
    """Class activation maps of one class on a few of its positive images with the lung-zone
    reading; on a served artifact, Grad-CAM from the artifact's own CAM output, labelled with
    its runtime and precision (``explain cam``)."""

    name = "cam"
    writes = ("cam_result",)
    Settings = CamSettings

    def run(self, ctx: StageContext, s: CamSettings) -> dict[str, Any]:
        m, ds = open_model_data(s.model, s.data, s.split, served_ok=True)
        art = model_provenance(m)
        require_served_cams(m, s.method, "--method", "explain cam")  # before any work, with why
        k = class_index(m, s.target)
        idx = positives(ds, k, s.n_images, ctx.seed)
        images = torch.stack([ds.image(i) for i in idx])
        res = compute_cam(m, images, k, method=s.method, ids=[ds.ids[i] for i in idx])
        cdir = ctx.dir_of("cam_result")
        res.save(cdir / "cams.npz")
        cam_overlay_figure(ds.preprocess.denormalize(images).numpy(), res,
                           cdir / f"{s.method}.png", title=res.meta.get("label"))
        write_artifact(ctx.out, "cam_result", {**res.to_dict(), "artifact": art}
                       if art is not None and "artifact" not in res.meta else res.to_dict())
        ctx.results[self.name] = res
        return {"artifact": art, "images": len(idx), "label": res.meta.get("label")}


@dataclass(frozen=True)
class AttributeSettings:
    model: str
    data: str
    target: str
    method: str = "lrp"
    split: str = "test"
    n_images: int = 4


@register_stage
class AttributeStage(Stage):
    """Pixel attributions of one class's logit on a few of its positive images (IG with its
    convergence delta, LRP / DL-Backtrace with their conservation delta) (``explain
    attribute``)."""

    name = "attribute"
    writes = ("attribution",)
    Settings = AttributeSettings

    def run(self, ctx: StageContext, s: AttributeSettings) -> dict[str, Any]:
        m, ds = open_model_data(s.model, s.data, s.split)
        k = class_index(m, s.target)
        idx = positives(ds, k, s.n_images, ctx.seed)
        images = torch.stack([ds.image(i) for i in idx])
        res = attribute(s.method, m, images, k)
        res.save(ctx.dir_of("attribution") / "attributions.safetensors")
        write_artifact(ctx.out, "attribution", {**res.to_dict(), "ids": [ds.ids[i] for i in idx]})
        ctx.results[self.name] = res
        return {"method": s.method, "images": len(idx),
                "max_abs_delta": float(res.delta.abs().max())}


@dataclass(frozen=True)
class ChannelsSettings:
    model: str
    data: str
    target: str
    split: str = "val"
    n_images: int = 256
    top: int = 10
    fp_only: bool = False


@register_stage
class ChannelsStage(Stage):
    """Classifier-channel evidence: the penultimate channels behind one class's logit
    (w_kc * f_c(x)) and which other classes they push or pull (``explain channels``)."""

    name = "channels"
    writes = ("channels",)
    Settings = ChannelsSettings

    def run(self, ctx: StageContext, s: ChannelsSettings) -> dict[str, Any]:
        m, ds = open_model_data(s.model, s.data, s.split)
        k = class_index(m, s.target)
        images, idx = collect_images(ds, s.n_images, seed=ctx.seed)
        cc = channel_contributions_from_model(m, images, labels=ds.labels_multihot()[idx],
                                              ids=[ds.ids[i] for i in idx])
        rows = (cc.false_positives(k, threshold=m.card.effective_thresholds()[k])
                if s.fp_only else None)
        if s.fp_only and len(rows) == 0:
            raise DataError(f"No false positives of '{s.target}' among the {len(idx)} images of "
                            f"split '{s.split}'; drop --fp-only or use more images.")
        table = cc.top_channels(k, n=s.top, rows=rows)
        write_artifact(ctx.out, "channels", table)
        channel_bar_figure(table, ctx.dir_of("channels") / "channels.png")
        ctx.results[self.name] = table
        return {"class": s.target, "images": len(idx)}


@dataclass(frozen=True)
class SaliencyCompareSettings:
    teacher: str
    student: str
    data: str
    split: str = "test"
    n_images: int = 16
    method: str = "scorecam"


@register_stage
class SaliencyCompareStage(Stage):
    """Per-class saliency similarity (Pearson, top-k% IoU) between a teacher and a student on
    the same images (``explain compare``)."""

    name = "saliency_compare"
    writes = ("comparison",)
    Settings = SaliencyCompareSettings

    def run(self, ctx: StageContext, s: SaliencyCompareSettings) -> dict[str, Any]:
        t, ds = open_model_data(s.teacher, s.data, s.split)
        st, ds_s = open_model_data(s.student, s.data, s.split)
        images, idx = collect_images(ds, s.n_images, seed=ctx.seed)
        s_images = collect_images(ds_s, indices=idx)[0]
        res = compare_saliency(t, st, images, list(range(t.num_classes)), method=s.method,
                               student_images=s_images, ids=[ds.ids[i] for i in idx])
        write_artifact(ctx.out, "comparison", res)
        ctx.results[self.name] = res
        return {"method": s.method, "images": len(idx)}
