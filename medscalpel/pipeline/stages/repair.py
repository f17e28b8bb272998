"""Repair stages: surgery of the chest-tube shortcut in the Pneumothorax row, the treatment
router; distillation into a compact student."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from medscalpel.compress.distill import DistillConfig, distill
from medscalpel.engine.train import TrainConfig
from medscalpel.pipeline.stage import Stage, StageContext, register_stage
from medscalpel.repair.surgery import save_surgery, surgery_from_rule, surgery_ladder
from medscalpel.repair.triage import triage

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
        ladder = surgery_ladder(functools.partial(
            surgery_from_rule, ctx.model, ctx.ds("shifted"), s.shortcut, s.shortcut_class,
            val=ctx.features["val"], progress=ctx.progress), [dict(g) for g in SURGERY_GOALS])
        save_surgery(ladder, ctx.dir_of("surgery"), parent_card=ctx.model.card)
        sd = ladder.to_dict()
        out: dict[str, Any] = {"surgery": {
            "status": ladder.status, "goal": sd.get("goal"), "delta_prob": sd.get("delta_prob"),
            "success": sd.get("success"),
            "false_positives_still_above_threshold":
                (sd.get("false_positives_still_above_threshold") or {}).get("text"),
            "attempts": len(ladder.attempts), "weights_changed": sd.get("n_weights_changed"),
            "other_logits_identical": sd.get("other_logits_identical"),
            "message": sd.get("message")}}
        tdir = ctx.dir_of("triage")
        tri = triage(ctx.features["val"], ctx.features["test"], thresholds=ctx.thresholds,
                     cost_path=tdir / "costs.json")
        tri.save(tdir, model=ctx.model)
        out["triage"] = tri.table() if hasattr(tri, "table") else None
        return out


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
        res = distill(ctx.model, s.student, ctx.ds("train"), ctx.ds("val"), ctx.ds("test"), cfg,
                      progress=ctx.progress)
        res.save(ctx.dir_of("distill"))
        return {"targets": res.to_dict().get("targets")}
