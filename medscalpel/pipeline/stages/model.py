"""Model stages: train the baseline (predictions and features of every split), calibrate its
thresholds."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from medscalpel.engine.api import fit
from medscalpel.engine.predict import extract_features
from medscalpel.engine.train import TrainConfig
from medscalpel.layout import ARTIFACTS, write_artifact
from medscalpel.models import load_model
from medscalpel.pipeline.stage import Stage, StageContext, register_stage
from medscalpel.repair.calibrate import calibrate_thresholds

SPLITS = ("val", "test", "shifted")


@dataclass(frozen=True)
class BaselineSettings:
    arch: str = "densenet_small"
    size: int = 64
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    max_steps_per_epoch: int | None = None
    n_boot: int = 200


@register_stage
class BaselineStage(Stage):
    """Train the dense model; its test metrics, and Predictions + Features of every split."""

    name = "baseline"
    reads = ("phantom_data",)
    writes = ("baseline_metrics", "baseline_train", "baseline_card",
              *(f"predictions:split={s}" for s in SPLITS),
              *(f"features:split={s}" for s in SPLITS))
    Settings = BaselineSettings

    def run(self, ctx: StageContext, s: BaselineSettings) -> dict[str, Any]:
        cfg = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=ctx.seed,
                          patience=max(2, s.epochs), max_steps_per_epoch=s.max_steps_per_epoch)
        bdir = ctx.dir_of("baseline_metrics")
        res = fit(ctx.spec, s.arch, bdir, cfg, size=s.size, channels=1, n_boot=s.n_boot,
                  progress=ctx.progress)
        write_artifact(ctx.out, "baseline_metrics", res.test.to_dict())
        write_artifact(ctx.out, "baseline_train", res.train.to_dict())
        ctx.model = load_model(res.model_dir)
        for split in SPLITS:
            f = extract_features(ctx.model, ctx.ds(split), progress=ctx.progress)
            ctx.features[split] = f
            ctx.preds[split] = f.to_predictions()
            ctx.preds[split].save(ARTIFACTS["predictions"].path_in(ctx.out, split=split))
            f.save(ARTIFACTS["features"].path_in(ctx.out, split=split))
        shutil.rmtree(bdir / "checkpoint", ignore_errors=True)
        return {"macro_auroc": res.test.macro["auroc"],
                "macro_auroc_ci": res.test.macro.get("auroc_ci"),
                "epochs": len(res.train.history), "train_seconds": res.train.seconds}


@dataclass(frozen=True)
class CalibrateSettings:
    method: str = "youden"
    fit_split: str = "val"
    eval_split: str = "test"


@register_stage
class CalibrateStage(Stage):
    """Per-class thresholds fitted on the validation split, stored in a calibrated model."""

    name = "calibrate"
    reads = ("baseline_card", "predictions:split=val", "predictions:split=test")
    writes = ("calibration", "calibrated_card")
    Settings = CalibrateSettings

    def run(self, ctx: StageContext, s: CalibrateSettings) -> dict[str, Any]:
        res = calibrate_thresholds(ctx.preds[s.fit_split], ctx.preds[s.eval_split],
                                   method=s.method, model=ctx.model,
                                   model_out=ctx.dir_of("calibrated_card"))
        write_artifact(ctx.out, "calibration", res.to_dict())
        ctx.model = load_model(ctx.dir_of("calibrated_card"))
        ctx.thresholds = ctx.model.card.effective_thresholds()
        ev = res.to_dict().get("evaluation") or {}
        return {"thresholds": dict(zip(ctx.model.card.class_names,
                                       np.round(ctx.thresholds, 3))),
                "macro": ev.get("macro")}
