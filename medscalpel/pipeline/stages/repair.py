"""Repair stages: surgery of the chest-tube shortcut in the Pneumothorax row, the treatment
router; distillation into a compact student."""

from __future__ import annotations

import functools
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.compress.contract import CompressionInputs, compress
from medscalpel.compress.distill import DistillConfig
from medscalpel.data.spec import open_dataset
from medscalpel.engine.api import load_predictions
from medscalpel.engine.predict import Features
from medscalpel.engine.predictions import Predictions
from medscalpel.engine.train import TrainConfig
from medscalpel.errors import DataError
from medscalpel.layout import artifact, write_artifact
from medscalpel.models import load_model
from medscalpel.pipeline.stage import Stage, StageContext, register_stage
from medscalpel.repair.retrain import finetune_classifier, reoptimize_classifier
from medscalpel.repair.surgery import (save_surgery, surgery_from_rule, surgery_ladder,
                                      surgical_correction)
from medscalpel.repair.triage import triage
from medscalpel.validation import check_in

#: the cost matrix the router learns, beside its decision log (unless a shared one is given)
COSTS_FILE = "costs.json"

#: ask for the strictest goal first, then for a fixed drop in probability
SURGERY_GOALS = ({"below_threshold": True}, {"delta_prob": 0.1}, {"delta_prob": 0.05},
                 {"delta_prob": 0.02})


@dataclass(frozen=True)
class RepairSettings:
    shortcut: str = "chest_tube"
    shortcut_class: str = "Pneumothorax"


@register_stage
class RepairStage(Stage):
    """The chest-tube shortcut: pneumothorax false positives on tube-only images of the
    shifted split, repaired by surgery of one classifier row; the cost-aware treatment router
    on validation / test features."""

    name = "repair"
    reads = ("calibrated_card", "features:split=val", "features:split=test")
    writes = ("surgery", "triage")
    Settings = RepairSettings

    def run(self, ctx: StageContext, s: RepairSettings) -> dict[str, Any]:
        SurgeryStage().run(ctx, SurgerySettings(target_class=s.shortcut_class,
                                                confounder=s.shortcut, split="shifted",
                                                goals=SURGERY_GOALS))
        ladder = ctx.results["surgery"]
        sd = ladder.to_dict()
        out: dict[str, Any] = {"surgery": {
            "status": ladder.status, "goal": sd.get("goal"), "delta_prob": sd.get("delta_prob"),
            "success": sd.get("success"),
            "false_positives_still_above_threshold":
                (sd.get("false_positives_still_above_threshold") or {}).get("text"),
            "attempts": len(ladder.attempts), "weights_changed": sd.get("n_weights_changed"),
            "other_logits_identical": sd.get("other_logits_identical"),
            "message": sd.get("message")}}
        TriageStage().run(ctx, TriageSettings())
        tri = ctx.results["triage"]
        out["triage"] = tri.table() if hasattr(tri, "table") else None
        return out


@dataclass(frozen=True)
class SurgerySettings:
    target_class: str
    confounder: str | None = None  # with images: select the false positives carrying this flag
    model: str | None = None  # default: the run's current model
    data: str | None = None  # images run through the model; default: the run's dataset
    split: str = "test"
    features: str | None = None  # instead of images: Features .npz holding the false positives
    fp_ids: str | None = None  # text file, one false-positive id per line
    val: str | None = None  # validation Features; default: the run's (for the run's model)
    #: goals tried strictest first (a ladder, as the demo repairs); empty: the one goal below
    goals: tuple[dict[str, Any], ...] = ()
    delta_prob: float | None = None
    below_threshold: bool = False
    criterion: str = "mean"
    tp_loss_budget: int = 0
    adjust_bias: bool = False
    max_weights: int = 32
    dry_run: bool = False


@register_stage
class SurgeryStage(Stage):
    """Zero the fewest weights of one classifier row that remove its false positives while no
    validation true positive falls below threshold, every other class's logits bit-identical;
    the corrected model with lineage beside surgery.json (``repair surgery``)."""

    name = "surgery"
    may_read = ("calibrated_card", "features:split=val", "phantom_data")
    writes = ("surgery",)
    Settings = SurgerySettings

    def run(self, ctx: StageContext, s: SurgerySettings) -> dict[str, Any]:
        model = load_model(s.model) if s.model else ctx.model
        val = (Features.load(s.val) if s.val else
               ctx.features["val"] if s.model is None else None)
        sdir = ctx.dir_of("surgery")
        kw = dict(delta_prob=s.delta_prob, below_threshold=s.below_threshold,
                  criterion=s.criterion, tp_loss_budget=s.tp_loss_budget,
                  adjust_bias=s.adjust_bias, max_weights=s.max_weights, dry_run=s.dry_run)
        if s.features is not None:
            ids = ([x.strip() for x in Path(s.fp_ids).read_text().splitlines() if x.strip()]
                   if s.fp_ids else None)
            result = surgical_correction(model, s.target_class, Features.load(s.features),
                                         fp_ids=ids, val=val,
                                         out_dir=None if s.dry_run else sdir, **kw)
        else:
            ds = (open_dataset(s.data, split=s.split, preprocess=model.card.preprocess)
                  if s.data else ctx.ds(s.split))
            if s.goals:
                result = surgery_ladder(functools.partial(
                    surgery_from_rule, model, ds, s.confounder, s.target_class, val=val,
                    progress=ctx.progress), [dict(g) for g in s.goals])
                save_surgery(result, sdir, parent_card=model.card)
                ctx.results[self.name] = result
                return {"status": result.status, "attempts": len(result.attempts)}
            result = surgery_from_rule(model, ds, s.confounder, s.target_class, val=val,
                                       out_dir=None if s.dry_run else sdir, **kw)
        if result.model_dir is not None:  # where the corrected model is once the run finished
            result.model_dir = str(ctx.final_dir_of("surgery"))
        result.save(artifact("surgery").path_in(ctx.out))
        ctx.results[self.name] = result
        return {"success": result.success, "message": result.message}


@dataclass(frozen=True)
class RetrainSettings:
    train: str  # training Features .npz
    val: str | None = None  # validation Features (selection)
    held_out: str | None = None  # held-out Features (the before / after report)
    method: str = "finetune"  # finetune (classifier fine-tune) or reoptimize (refit)
    model: str | None = None  # the retrained copy goes to model/
    classes: tuple[str, ...] | None = None
    steps: int = 300
    lr: float = 1e-2


@register_stage
class RetrainStage(Stage):
    """Retrain only the final layer on cached features: a classifier fine-tune or an F
    re-optimisation (regularised logistic regression, C chosen on validation) (``repair
    retrain``)."""

    name = "retrain"
    writes = ("retrain",)
    may_write = ("model",)
    Settings = RetrainSettings

    def run(self, ctx: StageContext, s: RetrainSettings) -> dict[str, Any]:
        check_in(s.method, "method", "repair retrain", ("finetune", "reoptimize"))
        m = load_model(s.model) if s.model else None
        tr = Features.load(s.train)
        va = Features.load(s.val) if s.val else None
        ho = Features.load(s.held_out) if s.held_out else None
        cls = list(s.classes) if s.classes else None
        if s.method == "finetune":
            result = finetune_classifier(tr, va, ho, model=m, classes=cls, steps=s.steps,
                                         lr=s.lr)
        else:
            result = reoptimize_classifier(tr, va, ho, model=m, classes=cls)
        result.save(ctx.dir_of("model") if m is not None else ctx.out)
        if m is not None:
            result.model_dir = str(ctx.final_dir_of("model"))
            write_artifact(ctx.out, "retrain", result)
        ctx.results[self.name] = result
        return {"method": result.method, "trainable_params": result.trainable_params}


def load_fit_data(path: str | os.PathLike) -> Features | Predictions:
    """Features (``features`` array inside) or Predictions from an ``.npz``; anything else is
    one DataError naming the file."""
    if not Path(path).is_file():
        raise DataError(f"File not found: {path} (give a Features or Predictions .npz).")
    try:
        with np.load(path, allow_pickle=False) as z:
            is_features = "features" in z.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz file ({type(exc).__name__}); give a "
                        "Features or Predictions file written by medscalpel.") from exc
    return Features.load(path) if is_features else load_predictions(path)


@dataclass(frozen=True)
class TriageSettings:
    fit: str | None = None  # Features / Predictions .npz; default: the run's val features
    held_out: str | None = None  # default: the run's test features
    model: str | None = None  # thresholds and the repaired copy; default: the run's model
    budget: float = 5.0
    costs: str | None = None  # shared cost matrix; default: costs.json beside the log


@register_stage
class TriageStage(Stage):
    """The cost-aware treatment router: diagnose each class, try treatments cheapest-first,
    keep what helps on held-out data, learn the costs (``repair triage``)."""

    name = "triage"
    may_read = ("calibrated_card", "features:split=val", "features:split=test")
    writes = ("triage",)
    Settings = TriageSettings

    def run(self, ctx: StageContext, s: TriageSettings) -> dict[str, Any]:
        fit = load_fit_data(s.fit) if s.fit else ctx.features["val"]
        held = load_fit_data(s.held_out) if s.held_out else ctx.features["test"]
        if s.model:
            model = load_model(s.model)
            thr = model.card.effective_thresholds() if model.card is not None else None
        elif s.fit:  # a command without --model: no thresholds, no repaired copy
            model, thr = None, None
        else:
            model, thr = ctx.model, ctx.thresholds
        tdir = ctx.dir_of("triage")
        tri = triage(fit, held, thresholds=thr, budget=s.budget,
                     cost_path=s.costs if s.costs is not None else tdir / COSTS_FILE)
        tri.save(tdir, model=model)
        ctx.results[self.name] = tri
        return {"classes": len(tri.classes)}


@dataclass(frozen=True)
class DistillSettings:
    student: str = "resnet_tiny"
    distill_epochs: int = 2
    batch_size: int = 64
    lr: float = 2e-3
    max_steps_per_epoch: int | None = None
    n_boot: int = 200
    n_cam: int = 4
    #: where teacher and students look: Score-CAM (seed 004) costs one forward pass per
    #: feature channel per image and class; Grad-CAM one backward pass
    distill_saliency: str = "scorecam"


@register_stage
class DistillStage(Stage):
    """Distil the current model into a compact student (hybrid KD loss), with saliency
    agreement."""

    name = "distill"
    reads = ("calibrated_card",)
    writes = ("distill",)
    Settings = DistillSettings

    def run(self, ctx: StageContext, s: DistillSettings) -> dict[str, Any]:
        cfg = DistillConfig(train=TrainConfig(epochs=s.distill_epochs, batch_size=s.batch_size,
                                              lr=s.lr, seed=ctx.seed,
                                              max_steps_per_epoch=s.max_steps_per_epoch),
                            n_boot=s.n_boot, saliency_images=min(8, s.n_cam * 2),
                            saliency_method=s.distill_saliency)
        inputs = CompressionInputs(train=ctx.ds("train"), val=ctx.ds("val"), test=ctx.ds("test"))
        res = compress("distill", ctx.model, inputs, student=s.student, config=cfg,
                       progress=ctx.progress).report
        res.save(ctx.dir_of("distill"))
        return {"targets": res.to_dict().get("targets")}
