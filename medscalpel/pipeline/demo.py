"""The main job: ``medscalpel demo``.

On the embedded phantom dataset: generate the phantom, train the baseline, evaluate, calibrate,
compress (lossless + structured + sweep), audit, explain, repair the chest-tube shortcut by
surgery and triage, distil a student, and write the experiment report and a few clinical
reports. Every stage writes into its own folder of the run directory (the layout the
experiment report reads) and is timed in ``demo.json``.
"""

from __future__ import annotations

import functools

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscalpel.audit.changes import audit_changes
from medscalpel.compress.contract import CompressionInputs, CompressionTable, compress
from medscalpel.compress.deploy import quick_deploy
from medscalpel.compress.measure import (count_macs, count_parameters, latency_pair,
                                         max_abs_logit_delta)
from medscalpel.compress.structured import RecoveryConfig
from medscalpel.engine.compare import compare_predictions
from medscalpel.errors import ConfigError, DataError, VerificationError
from medscalpel.layout import ARTIFACTS, write_artifact
from medscalpel.repair.shift_flow import run_site_shift, summary_lines
from medscalpel.runs import write_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoProfile:
    """Sizes of one demo profile."""

    name: str
    n_images: int
    size: int
    arch: str
    epochs: int
    batch_size: int = 64
    lr: float = 2e-3
    sweep_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.65, 0.8, 0.9, 0.95)
    sweep_seeds: tuple[int, ...] = (0,)
    prune_criteria: tuple[str, ...] = ("l1", "bn_scale", "lrp")
    prune_speedup: float = 2.0
    recovery_epochs: int = 1
    calib_images: int = 128
    heldout_images: int = 128
    sparsify_ratio: float = 0.5
    sparsify_epochs: int = 2
    student: str = "resnet_tiny"
    distill_epochs: int = 2
    #: where teacher and students look (distill stage): Score-CAM (seed 004) costs one forward
    #: pass per feature channel per image and class; Grad-CAM one backward pass
    distill_saliency: str = "scorecam"
    n_cam: int = 4
    n_clinical: int = 3
    n_boot: int = 200
    max_steps_per_epoch: int | None = None
    shift_k: int = 20  # labelled site-B images per class for the k-shot recalibration
    changes_images: int = 200  # test images of the what-compression-changed audit
    changes_faithfulness: int = 32  # images of its deletion / insertion / ROAD measures

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROFILES: dict[str, DemoProfile] = {
    # for CI: everything runs, on tiny data, in about a minute
    "micro": DemoProfile("micro", n_images=400, size=32, arch="densenet_tiny", epochs=2,
                         batch_size=32, sweep_ratios=(0.0, 0.5, 0.9), prune_criteria=("l1", "lrp"),
                         prune_speedup=1.5, recovery_epochs=0, sparsify_epochs=1, calib_images=32,
                         heldout_images=32, distill_epochs=1, n_cam=2, n_clinical=2, n_boot=50,
                         shift_k=5, changes_images=60, changes_faithfulness=8,
                         distill_saliency="gradcam"),
    # make demo: budgeted for <= 5 minutes on this project's 2-core CPU (AVX2) with the
    # shift, deploy and changes stages: fewer images and epochs, one sparsify and one distill
    # epoch, two pruning criteria (magnitude and attribution-guided)
    "quick": DemoProfile("quick", n_images=3000, size=64, arch="densenet_small", epochs=6,
                         batch_size=64, n_boot=200, sparsify_epochs=1, distill_epochs=1,
                         prune_criteria=("l1", "lrp"), distill_saliency="gradcam"),
    # closer to the issues' numbers: 20,000 images, densenet121, a full ratio grid
    "full": DemoProfile("full", n_images=20000, size=64, arch="densenet121", epochs=6,
                        sweep_ratios=tuple(np.round(np.arange(0, 0.96, 0.05), 2)),
                        sweep_seeds=(0, 1, 2), recovery_epochs=2, calib_images=256,
                        heldout_images=512, student="mobilenetv3_small_100", distill_epochs=4,
                        n_cam=8, n_clinical=5, n_boot=1000),
}


@dataclass
class StageRecord:
    name: str
    seconds: float
    status: str
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    out_dir: Path
    profile: DemoProfile
    stages: list[StageRecord]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.name, "settings": self.profile.to_dict(),
                "seconds": round(self.seconds, 1),
                "stages": [asdict(s) for s in self.stages]}


class _Context:
    """What the stages share: the run directory, the data and the models made so far."""

    def __init__(self, out: Path, profile: DemoProfile, seed: int, progress: bool | None):
        from medscalpel.data.transforms import Preprocess

        self.out = out
        self.p = profile
        self.seed = seed
        self.progress = progress
        self.pp = Preprocess(size=profile.size, channels=1)
        self.spec = ""
        self.phantom = None
        self.datasets: dict[str, Any] = {}
        self.model = None
        self.preds: dict[str, Any] = {}
        self.features: dict[str, Any] = {}
        self.thresholds: list[float] | None = None
        self.compress_rows: list[dict[str, Any]] = []

    def ds(self, split: str):
        from medscalpel.data.spec import open_dataset

        if split not in self.datasets:
            self.datasets[split] = open_dataset(self.spec, split=split, preprocess=self.pp)
        return self.datasets[split]

    def images(self, split: str, n: int, seed: int = 0) -> torch.Tensor:
        return self.labelled_images(split, n, seed)[0]

    def labelled_images(self, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, Any]:
        from medscalpel.engine.predict import collect_images

        ds = self.ds(split)
        x, idx = collect_images(ds, n, seed=seed)
        return x, np.asarray(ds.labels)[idx]


# ----------------------------------------------------------------------------- stages
def _stage_phantom(c: _Context) -> dict[str, Any]:
    from medscalpel.data.phantom import generate_phantom

    d = c.out / "data" / "phantom"
    c.phantom = generate_phantom(n=c.p.n_images, size=c.p.size, seed=c.seed, out=d,
                                 progress=c.progress)
    c.spec = f"phantom:{d}"
    try:
        from medscalpel.data.phantom.preview import contact_sheet

        contact_sheet(c.phantom, c.out / "data" / "phantom_preview.png")
    except ImportError:  # pragma: no cover - preview is part of the package
        pass
    return {"spec": "phantom:data/phantom", "n": len(c.phantom),
            "splits": {s: int(len(c.phantom.rows(s))) for s in ("train", "val", "test", "shifted")}}


def _stage_stats(c: _Context) -> dict[str, Any]:
    from medscalpel.data.stats import dataset_statistics

    st = dataset_statistics(c.spec, "train", c.out / "data" / "stats")
    return {"n": st.n, "prevalence": dict(zip(st.class_names, np.round(st.prevalence, 4)))}


def _stage_baseline(c: _Context) -> dict[str, Any]:
    from medscalpel.engine.api import fit
    from medscalpel.engine.predict import extract_features
    from medscalpel.engine.train import TrainConfig
    from medscalpel.models import load_model

    cfg = TrainConfig(epochs=c.p.epochs, batch_size=c.p.batch_size, lr=c.p.lr, seed=c.seed,
                      patience=max(2, c.p.epochs), max_steps_per_epoch=c.p.max_steps_per_epoch)
    res = fit(c.spec, c.p.arch, c.out / "baseline", cfg, size=c.p.size, channels=1,
              n_boot=c.p.n_boot, progress=c.progress)
    write_json(c.out / "baseline" / "metrics.json", res.test.to_dict())
    write_json(c.out / "baseline" / "train.json", res.train.to_dict())
    c.model = load_model(res.model_dir)
    pdir = c.out / "baseline" / "predictions"
    for split in ("val", "test", "shifted"):
        f = extract_features(c.model, c.ds(split), progress=c.progress)
        c.features[split] = f
        c.preds[split] = f.to_predictions()
        c.preds[split].save(pdir / f"{split}.npz")
        f.save(pdir / f"{split}_features.npz")
    import shutil

    shutil.rmtree(c.out / "baseline" / "checkpoint", ignore_errors=True)
    return {"macro_auroc": res.test.macro["auroc"], "macro_auroc_ci": res.test.macro.get("auroc_ci"),
            "epochs": len(res.train.history), "train_seconds": res.train.seconds}


def _stage_calibrate(c: _Context) -> dict[str, Any]:
    from medscalpel.models import load_model
    from medscalpel.repair.calibrate import calibrate_thresholds

    d = c.out / "calibrate"
    res = calibrate_thresholds(c.preds["val"], c.preds["test"], method="youden", model=c.model,
                               model_out=d / "model")
    write_json(d / "calibration.json", res.to_dict())
    c.model = load_model(d / "model")
    c.thresholds = c.model.card.effective_thresholds()
    ev = res.to_dict().get("evaluation") or {}
    return {"thresholds": dict(zip(c.model.card.class_names, np.round(c.thresholds, 3))),
            "macro": ev.get("macro")}


def _row(c: _Context, name: str, model, dense, test_images: torch.Tensor,
         comparison, model_dir: Path | None, extra: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """One line of the compression table, every number measured in this run; the accuracy
    delta is the PAIRED one (same test images) from the contract's comparison."""
    example = test_images[:1]
    lat = latency_pair(dense, model, example, batch_size=1, repeats=10, rounds=3)
    params = count_parameters(model)
    m = comparison.macro
    return {
        "method": name,
        "params": params,
        "params_ratio": params / count_parameters(dense),
        "macs": count_macs(model, example),
        "latency_ms": lat["b_ms"],
        "dense_latency_ms": lat["a_ms"],
        "speedup": lat["ratio"],
        "latency_spread": lat["spread"],  # of the per-round ratios; noisy above 20%
        "latency_noisy": lat["noisy"],
        "macro_auroc": m["auroc_new"],
        "macro_auroc_ci": [float(v) for v in m["auroc_new_ci"]],  # same paired replicates
        "delta_macro_auroc": m["delta_auroc"],
        "delta_macro_auroc_ci": list(m["delta_auroc_ci"]),
        "max_abs_delta_logit": max_abs_logit_delta(dense, model, test_images),
        "model_dir": str(model_dir) if model_dir else None,
        **(extra or {}),
    }


def _compress_plan(c: _Context) -> list[tuple[str, str, dict[str, Any]]]:
    """(row name, compressor, settings) of the demo's compression table, in order."""
    # latency is measured once per row, alternated with the dense model (see _row)
    plan: list[tuple[str, str, dict[str, Any]]] = [("lossless", "lossless", {"latency": False})]
    if c.p.sparsify_epochs:
        plan.append(("sparsify+fold", "sparsify-fold",
                     {"ratio": c.p.sparsify_ratio, "epochs": c.p.sparsify_epochs,
                      "batch_size": c.p.batch_size, "progress": c.progress, "latency": False}))
    for crit in c.p.prune_criteria:
        plan.append((f"structured-{crit}", "prune", {
            "criterion": crit, "target_speedup": c.p.prune_speedup,
            "recovery": RecoveryConfig(epochs=c.p.recovery_epochs, batch_size=c.p.batch_size),
            "progress": c.progress, "measure_latency": False}))
    return plan


def _stage_compress(c: _Context) -> dict[str, Any]:
    d = c.out / "compress"
    dense = c.model
    test_images = c.images("test", c.p.heldout_images, seed=c.seed + 1)
    calib, calib_labels = c.labelled_images("train", c.p.calib_images, seed=c.seed)
    inputs = CompressionInputs(
        calib=calib, calib_labels=calib_labels,
        heldout=c.images("val", c.p.heldout_images, seed=c.seed), train=c.ds("train"),
        val=c.ds("val"), evaluate=c.ds("test"))
    rows: list[dict[str, Any]] = []
    self_cmp = compare_predictions(c.preds["test"], c.preds["test"], n_boot=c.p.n_boot,
                                   seed=c.seed)
    dense_row = _row(c, "dense", dense, dense, test_images, self_cmp,
                     c.out / "calibrate" / "model")
    for name, method, settings in _compress_plan(c):
        if method == "prune" and not c.p.recovery_epochs:
            inputs_m = replace(inputs, train=None, val=None)
        else:
            inputs_m = inputs
        rdir = d / name.replace("+", "_").replace("-", "_")
        try:
            res = compress(method, dense, inputs_m, n_boot=c.p.n_boot, **settings)
        except VerificationError as exc:  # a fold refuses rather than save a wrong model
            write_json(rdir / "report.json", {"refused": str(exc)})
            rows.append({"method": name, "refused": str(exc)})
            continue
        res.save(rdir)
        extra = {"compressor": method, "macs_speedup": res.speedup_macs,
                 "verification": {k: v for k, v in res.verification.items()
                                  if isinstance(v, (int, float, str, bool)) or v is None}}
        if method == "prune":
            extra.update(criterion=settings["criterion"], channel_ratio=res.report.ratio)
        rows.append(_row(c, name, res.model, dense, test_images, res.comparison,
                         rdir / "model", extra))
    _export_best(c, d, rows, dense, test_images)
    table = CompressionTable(dense_row, tuple(rows), {
        "split": "test", "n": len(c.ds("test")), "n_boot": c.p.n_boot,
        "accuracy_delta": "paired bootstrap on the same test images"})
    write_artifact(c.out, "compress", table)
    c.compress_rows = rows
    return {"rows": [{k: r.get(k) for k in ("method", "params_ratio", "speedup",
                                            "delta_macro_auroc", "max_abs_delta_logit")}
                     for r in rows]}


def _export_best(c: _Context, d: Path, rows: list[dict[str, Any]], dense,
                 test_images: torch.Tensor) -> None:
    """ONNX of the most accurate structured model: parity and latency vs the dense model."""
    from medscalpel.compress.export import export_onnx
    from medscalpel.models import load_model

    best = max((r for r in rows if r.get("method", "").startswith("structured")
                and not r.get("refused")), key=lambda r: r["macro_auroc"], default=None)
    if best is not None:
        # batch 1 only, few repeats: the deploy stage is the runtime comparison
        ex = export_onnx(load_model(best["model_dir"]), d / "export" / "model.onnx",
                         reference=dense, real_images=test_images[:8], batch_sizes=(1,),
                         repeats=5)
        write_json(d / "export" / "export.json", ex.to_dict())


def _stage_shift(c: _Context) -> dict[str, Any]:
    """Site shift with ground truth: validate on the phantom's scanner B, check the shift
    without labels, recalibrate with k labelled site-B images per class (measured on the rest)."""
    site_b = c.spec + ("&" if "?" in c.spec else "?") + "site=B"
    try:
        rep = run_site_shift(c.model, c.spec, site_b, k=c.p.shift_k, n_boot=c.p.n_boot,
                             seed=c.seed, train_split="val",
                             out_dir=c.out / ARTIFACTS["site_shift"].relpath().rsplit("/", 1)[0])
    except DataError as exc:  # e.g. too few labelled site-B images per class (micro profile)
        return {"status": "skipped", "reason": str(exc)}
    return {"lines": summary_lines(rep), "verdict": rep.recalibration.verdict}


def _best_compressed(c: _Context) -> tuple[str, Any] | None:
    """The most accurate structured model of the compression table (name, model)."""
    from medscalpel.models import load_model

    best = max((r for r in c.compress_rows if r.get("method", "").startswith("structured")
                and not r.get("refused")), key=lambda r: r["macro_auroc"], default=None)
    return None if best is None else (best["method"], load_model(best["model_dir"]))


def _stage_deploy(c: _Context) -> dict[str, Any]:
    """The best structured model on every installed CPU runtime (budgeted: batch 1, few
    rounds); parity, paired accuracy delta, recommendation (artifact ``deploy``)."""
    best = _best_compressed(c)
    if best is None:
        return {"status": "skipped", "reason": "no structured model in the compression table"}
    res = quick_deploy(best[1], c.ds("test"), c.out / ARTIFACTS["deploy"].relpath().rsplit(
        "/", 1)[0], calib_data=c.ds("train"), progress=c.progress)
    rec = res.to_dict().get("recommendation")
    return {"model": best[0], "recommendation": rec}


def _stage_changes(c: _Context) -> dict[str, Any]:
    """What compression changed (calibration, explanations, subgroups, robustness) for the
    best structured model against the dense one (artifact ``changes``)."""
    best = _best_compressed(c)
    if best is None:
        return {"status": "skipped", "reason": "no structured model in the compression table"}
    res = audit_changes(c.model, {best[0]: best[1]}, c.ds("test"), n_images=c.p.changes_images,
                        n_boot=c.p.n_boot, seed=c.seed, n_faithfulness=c.p.changes_faithfulness,
                        severities=(2,), progress=c.progress)
    res.save(c.out / ARTIFACTS["changes"].relpath().rsplit("/", 1)[0])
    return {"model": best[0], "pairs": len(res.pairs)}


def _stage_sweep(c: _Context) -> dict[str, Any]:
    from medscalpel.compress.sweep import run_sweep

    res = run_sweep(c.model, c.ds("test"), c.out / "sweep", ratios=c.p.sweep_ratios,
                    methods=("l1", "random"), seeds=c.p.sweep_seeds, progress=c.progress)
    return {"cells": len(res.cells), "computed": res.n_computed}


def _stage_audit(c: _Context) -> dict[str, Any]:
    from medscalpel.audit.forgettability import audit_forgettability
    from medscalpel.audit.pies import find_pies, pie_gallery, pie_ground_truth_tests

    d = c.out / "audit"
    train_labels = c.ds("train").labels
    fg = audit_forgettability(c.out / "sweep", train_labels=train_labels, method="l1",
                              n_boot=c.p.n_boot, seed=c.seed, progress=c.progress)
    fg.save(d / "forgettability")
    ratio = max(r for r in c.p.sweep_ratios if r <= 0.9)
    pies = find_pies(c.out / "sweep", ratio=ratio, method="l1", n_boot=c.p.n_boot, seed=c.seed)
    pies.save(d / "pies")
    pie_gallery(c.ds("test"), pies, d / "pies" / "pie_gallery.png")
    gt = c.phantom.gt.copy()
    sev = c.phantom.severity()
    clean = c.phantom.clean_labels()
    with np.errstate(invalid="ignore"):
        mean_sev = np.where(clean.sum(1) > 0, (sev * clean).sum(1) / np.maximum(clean.sum(1), 1),
                            np.nan)
    table = gt[["id", "quality"]].assign(label_noise=gt["n_flipped"].to_numpy() > 0,
                                         severity=mean_sev)
    gtr = pie_ground_truth_tests(pies, table)
    gtr.save(d / "pies")
    pd_ = pies.to_dict()
    return {"pie_ratio": ratio, "n_pies": pd_.get("n_pies"),
            "ground_truth": {k: v for k, v in gtr.to_dict().items()
                             if isinstance(v, (int, float, str, bool))}}


def _stage_explain(c: _Context) -> dict[str, Any]:
    from medscalpel.explain.polarity import compare_stages, polarity_analysis
    from medscalpel.explain.cams import compute_cam
    from medscalpel.explain.figures import cam_overlay_figure, polarity_table_figure
    from medscalpel.explain.regions import describe_location, zones_from_masks

    d = c.out / "explain"
    test = c.ds("test")
    names = list(test.class_names)
    rows = c.phantom.rows("test")
    # a few test images with a clearly visible finding: the CAM of that finding's class
    probs = c.preds["test"].probs()
    picks = []
    for k in np.argsort(-np.nansum(test.labels, 0)):
        hits = np.flatnonzero((test.labels[:, k] == 1) & (probs[:, k] >= 0.5))
        if len(hits):
            picks.append((int(hits[0]), int(k)))
        if len(picks) >= c.p.n_cam:
            break
    summary = []
    if picks:
        idx = [i for i, _ in picks]
        imgs = torch.stack([test.image(i) for i in idx])
        cam = compute_cam(c.model, imgs, [k for _, k in picks], method="gradcam",
                          progress=c.progress, ids=[test.ids[i] for i in idx])
        zones = []
        for (i, k), m in zip(picks, cam.maps):
            masks = c.phantom.masks(int(rows[i]))
            z = zones_from_masks(right_lung=masks["lung_right"], left_lung=masks["lung_left"],
                                 heart_mask=masks["heart"])
            zones.append(z)
            summary.append({"id": test.ids[i], "class": names[k],
                            "location": describe_location(np.asarray(m), z.resized(m.shape))})
        grey = c.pp.denormalize(imgs).numpy()
        cam_overlay_figure(grey, cam, d / "cams" / "gradcam.png", zones=zones,
                           title="Grad-CAM (true positives) with lung zones")
        write_json(d / "cams" / "cams.json", {"method": "gradcam", "images": summary})
    pol = polarity_analysis(c.model.classifier.weight.detach().numpy(), c.ds("train").labels,
                            names, seed=c.seed, n_null=100)
    (d / "polarity").mkdir(parents=True, exist_ok=True)
    write_json(d / "polarity" / "polarity.json", pol.to_dict())
    polarity_table_figure(pol, d / "polarity" / "polarity.png")
    weights = {"dense": c.model.classifier.weight.detach().numpy()}
    for r in c.compress_rows:
        if r.get("model_dir") and r["method"] in ("lossless", "structured-l1"):
            from medscalpel.models import load_model

            weights[r["method"]] = load_model(r["model_dir"]).classifier.weight.detach().numpy()
    stages = compare_stages(weights, c.ds("train").labels, names, seed=c.seed, n_null=100)
    write_json(d / "polarity" / "stages.json", stages.to_dict())
    return {"cams": summary}


def _stage_repair(c: _Context) -> dict[str, Any]:
    from medscalpel.repair.surgery import save_surgery, surgery_from_rule, surgery_ladder
    from medscalpel.repair.triage import triage

    d = c.out / "repair"
    out: dict[str, Any] = {}
    shifted = c.ds("shifted")
    # the chest-tube shortcut: pneumothorax false positives on tube-only images of the shifted
    # split; ask for the strictest goal first, then for a fixed drop in probability
    goals = [{"below_threshold": True}, {"delta_prob": 0.1}, {"delta_prob": 0.05},
             {"delta_prob": 0.02}]
    ladder = surgery_ladder(functools.partial(
        surgery_from_rule, c.model, shifted, "chest_tube", "Pneumothorax",
        val=c.features["val"], progress=c.progress), goals)
    save_surgery(ladder, d / "surgery", parent_card=c.model.card)
    sd = ladder.to_dict()
    out["surgery"] = {"status": ladder.status, "goal": sd.get("goal"),
                      "delta_prob": sd.get("delta_prob"), "success": sd.get("success"),
                      "false_positives_still_above_threshold":
                          (sd.get("false_positives_still_above_threshold") or {}).get("text"),
                      "attempts": len(ladder.attempts),
                      "weights_changed": sd.get("n_weights_changed"),
                      "other_logits_identical": sd.get("other_logits_identical"),
                      "message": sd.get("message")}
    tri = triage(c.features["val"], c.features["test"], thresholds=c.thresholds,
                 cost_path=d / "triage" / "costs.json")
    tri.save(d / "triage", model=c.model)
    out["triage"] = tri.table() if hasattr(tri, "table") else None
    return out


def _stage_distill(c: _Context) -> dict[str, Any]:
    from medscalpel.compress.distill import DistillConfig, distill
    from medscalpel.engine.train import TrainConfig

    cfg = DistillConfig(train=TrainConfig(epochs=c.p.distill_epochs, batch_size=c.p.batch_size,
                                          lr=c.p.lr, seed=c.seed,
                                          max_steps_per_epoch=c.p.max_steps_per_epoch),
                        n_boot=c.p.n_boot, saliency_images=min(8, c.p.n_cam * 2),
                        saliency_method=c.p.distill_saliency)
    res = distill(c.model, c.p.student, c.ds("train"), c.ds("val"), c.ds("test"), cfg,
                  progress=c.progress)
    res.save(c.out / "distill")
    return {"targets": res.to_dict().get("targets")}


def _stage_reports(c: _Context) -> dict[str, Any]:
    from medscalpel.report.clinical import clinical_report
    from medscalpel.report.experiment import experiment_report

    test = c.ds("test")
    probs = c.preds["test"].probs()
    order = np.argsort(-probs.max(1))[: c.p.n_clinical]
    from medscalpel.explain.regions import zones_from_masks

    imgs = torch.stack([test.image(int(i)) for i in order])
    rows = c.phantom.rows("test")
    zones = []
    for i in order:
        m = c.phantom.masks(int(rows[int(i)]))
        zones.append(zones_from_masks(right_lung=m["lung_right"], left_lung=m["lung_left"],
                                      heart_mask=m["heart"]))
    clinical_report(c.model, imgs, c.out / "reports" / "clinical",
                    label_stats=c.out / "data" / "stats" / "stats.json",
                    calibration=(c.out / "calibrate" / "calibration.json")
                    if (c.out / "calibrate" / "calibration.json").is_file() else None,
                    image_ids=[test.ids[int(i)] for i in order], zones=zones,
                    progress=c.progress)
    rep = experiment_report(c.out, c.out / "reports" / "experiment.html")
    # section keys only: the Section objects hold the page's embedded figures (megabytes)
    return {"experiment_report": ARTIFACTS["experiment_report"].path,
            "sections_present": [s.key for s in rep.sections if s.present]}


STAGES: list[tuple[str, Callable[[_Context], dict[str, Any]]]] = [
    ("phantom", _stage_phantom),
    ("stats", _stage_stats),
    ("baseline", _stage_baseline),
    ("calibrate", _stage_calibrate),
    ("shift", _stage_shift),
    ("compress", _stage_compress),
    ("deploy", _stage_deploy),
    ("sweep", _stage_sweep),
    ("audit", _stage_audit),
    ("changes", _stage_changes),
    ("explain", _stage_explain),
    ("repair", _stage_repair),
    ("distill", _stage_distill),
    ("reports", _stage_reports),
]


def run_demo(out: str | os.PathLike, profile: str | DemoProfile = "quick", seed: int = 0,
             progress: bool | None = None, log: Callable[[str], None] | None = None,
             **overrides: Any) -> DemoResult:
    """Run every stage of medscalpel on the phantom into ``out`` (which must not exist or be
    empty: the CLI wraps this in a :class:`~medscalpel.runs.RunDir`).

    Args:
        profile: ``micro`` (CI), ``quick`` (``make demo``, <= 10 min on 2 CPU cores) or ``full``.
        overrides: profile fields to change (e.g. ``epochs=1``).
        log: called with one line per finished stage (the CLI prints it).
    """
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ConfigError(f"Unknown demo profile '{profile}'. Valid names: "
                              f"{', '.join(PROFILES)}.")
        profile = PROFILES[profile]
    if overrides:
        profile = replace(profile, **overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(out, profile, seed, progress)
    records: list[StageRecord] = []
    t_all = time.perf_counter()
    for i, (name, fn) in enumerate(STAGES, 1):
        t0 = time.perf_counter()
        summary = fn(ctx)
        rec = StageRecord(name, round(time.perf_counter() - t0, 2), "ok", summary or {})
        records.append(rec)
        write_json(out / "demo.json", DemoResult(out, profile, records,
                                                 time.perf_counter() - t_all).to_dict())
        if log is not None:
            log(f"[{i}/{len(STAGES)}] {name:<10} {rec.seconds:7.1f} s")
    return DemoResult(out, profile, records, time.perf_counter() - t_all)
