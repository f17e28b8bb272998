"""Single-model stages: train a model on a dataset, predict a dataset split with a saved model,
evaluate predictions (alone, against a reference, or next to an external set).

These are the stages of ``medscalpel train``, ``predict`` and ``evaluate``; they write their
files at the top of their run directory (``model/``, ``train.json``, ``metrics.json``,
``predictions.npz`` ...: the single-command artifacts of :mod:`medscalpel.layout`). The demo's
own training stage is ``baseline`` (:mod:`medscalpel.pipeline.stages.model`), which writes
under ``baseline/``.

The evaluation stages' work is also a public function (:func:`evaluate_predictions`,
:func:`compare_with_reference`, :func:`validate_external_set`): ``evaluate`` without ``--out``
prints the same numbers without writing a run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from medscalpel.deploy.served import card_of, is_served, load_any
from medscalpel.engine.api import (as_augment, evaluate_file, fit, load_predictions,
                                   model_provenance, predict_spec, validate_external)
from medscalpel.engine.bulk import BulkSettings
from medscalpel.engine.compare import PairedComparison, compare_predictions
from medscalpel.engine.external import ExternalValidation, plot_reliability
from medscalpel.engine.findings import FindingsTable, findings_table
from medscalpel.engine.metrics import EvalResult
from medscalpel.engine.predictions import Predictions
from medscalpel.engine.train import TrainConfig
from medscalpel.errors import MedScalpelError
from medscalpel.layout import ARTIFACTS, write_artifact
from medscalpel.models.operating_point import OperatingPoint
from medscalpel.pipeline.stage import Stage, StageContext, register_stage
from medscalpel.repair.calibrate import measure_operating_point


# ----------------------------------------------------------------------------- train
@dataclass(frozen=True)
class TrainSettings:
    """``medscalpel train``: the architecture, input and training recipe (the seed is the
    run's; the dataset is the command's ``--data``, else the run's phantom)."""

    arch: str = "densenet121"
    size: int = 64
    channels: int = 1
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3
    pos_weight: str = "none"
    device: str = "auto"
    num_workers: int = 0
    augment_profile: str | None = "light"  # None: no augmentation
    pretrained: bool = False
    n_boot: int = 1000


def train_config(s: TrainSettings, seed: int) -> TrainConfig:
    """The :class:`TrainConfig` of ``s`` with the run's ``seed`` (recorded in the manifest)."""
    return TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
                       weight_decay=s.weight_decay, patience=s.patience,
                       pos_weight=s.pos_weight, seed=seed, device=s.device,
                       num_workers=s.num_workers)


@register_stage
class TrainStage(Stage):
    """Train a zoo model on the train split (early stopping on val), its test metrics; the
    model directory with its card (``train``; resumes from its last epoch's checkpoint)."""

    name = "train"
    may_read = ("phantom_data",)  # the run's phantom; a command's --data instead
    writes = ("model", "fit", "metrics")
    Settings = TrainSettings

    def run(self, ctx: StageContext, s: TrainSettings) -> dict[str, Any]:
        spec = ctx.data_spec()
        res = fit(spec, s.arch, ctx.dir_of("fit"), train_config(s, ctx.seed), size=s.size,
                  channels=s.channels, augment=as_augment(s.augment_profile or False),
                  pretrained=s.pretrained, n_boot=s.n_boot, progress=ctx.progress)
        res.model_dir = ctx.final_dir_of("model")  # where the model is once the run finished
        write_artifact(ctx.out, "fit", res)
        write_artifact(ctx.out, "metrics", res.test)
        ctx.results[self.name] = res
        return {"spec": spec, "macro_auroc": res.test.macro["auroc"],
                "epochs": len(res.train.history), "resumed_from": res.train.resumed_from}


# ----------------------------------------------------------------------------- predict
def bulk_settings(model: str, batch_size: int, workers: int | None,
                  threads: int | None) -> BulkSettings | None:
    """The bulk path's settings (validated: a bad value fails before any model is loaded) when
    a served artifact, ``threads`` or ``workers`` selects it, else ``None`` (the in-process
    loop)."""
    settings = BulkSettings(batch_size, workers, threads).validate()
    chosen = is_served(model) or threads is not None or workers is not None
    return settings if chosen else None


class Predicted(NamedTuple):
    """What ``predict`` made: the Predictions and their per-image findings."""

    predictions: Predictions
    findings: FindingsTable


@dataclass(frozen=True)
class PredictSettings:
    """``medscalpel predict``: the model (a model directory or a served artifact) and how to
    run it; the data is the command's ``--data`` (a dataset spec or image files), else the
    run's phantom."""

    model: str
    split: str = "auto"
    batch_size: int = 64
    threads: int | None = None
    workers: int | None = None


@register_stage
class PredictStage(Stage):
    """Predict a dataset split (or image files) with a saved model: the Predictions, their
    summary and a per-image table of probabilities and findings (``predict``)."""

    name = "predict"
    may_read = ("phantom_data",)  # the run's phantom; a command's --data instead
    writes = ("predictions_file", "predictions_meta", "findings_csv")
    Settings = PredictSettings

    def run(self, ctx: StageContext, s: PredictSettings) -> dict[str, Any]:
        bulk = bulk_settings(s.model, s.batch_size, s.workers, s.threads)
        m = load_any(s.model, threads=s.threads or 1)
        spec = ctx.data_spec()
        preds = predict_spec(m, spec, s.split, s.batch_size, progress=ctx.progress, bulk=bulk)
        preds.save(ARTIFACTS["predictions_file"].path_in(ctx.out))
        write_artifact(ctx.out, "predictions_meta", preds)
        op = m.card.decision_point()
        table = findings_table(preds, m.card.thresholds if preds.task == "multilabel" else None,
                               operating_point=op if op.calibrated else None)
        table.save_csv(ARTIFACTS["findings_csv"].path_in(ctx.out))
        ctx.results[self.name] = Predicted(preds, table)
        return {"spec": spec, "split": preds.split, "split_unit": preds.meta.get("split_unit"),
                "n_used": preds.meta.get("n_used"), "n_total": preds.meta.get("n_total"),
                "artifact": model_provenance(m)}


# ----------------------------------------------------------------------------- evaluate
class Evaluated(NamedTuple):
    """What ``evaluate`` measured: the metrics, and the model card's operating point measured
    on the same predictions (``None`` without a calibrated model)."""

    metrics: EvalResult
    operating_point: OperatingPoint | None


@dataclass(frozen=True)
class EvaluateSettings:
    """``medscalpel evaluate``: a Predictions file (or a folder holding predictions.npz) and
    the model whose thresholds decide (``None``: 0.5 / argmax)."""

    predictions: str
    model: str | None = None
    n_boot: int = 1000


def stored_operating_point(predictions: str, model: str | None) -> OperatingPoint | None:
    """The model card's operating point measured on these predictions (sens/spec with CIs),
    or None without a model or when the model decides by the uncalibrated default (the metrics
    are already at 0.5 / argmax then)."""
    if model is None:
        return None
    op = card_of(model).decision_point()
    if not op.calibrated and op.temperature == 1.0:
        return None
    preds = load_predictions(predictions)
    if tuple(preds.class_names) != tuple(op.class_names):
        raise MedScalpelError(f"--model {model} predicts {list(op.class_names)[:4]} but the "
                              f"predictions are of {list(preds.class_names)[:4]}.")
    return measure_operating_point(op, preds, held_out=preds.split != op.fitted_on.get("split"))


def evaluate_predictions(s: EvaluateSettings, seed: int = 0) -> Evaluated:
    """Per-class metrics with bootstrap CIs of ``s.predictions`` at the model's thresholds, and
    its stored operating point measured on them (recorded in the metrics' ``extra``)."""
    res = evaluate_file(s.predictions, card_of(s.model) if s.model is not None else None,
                        n_boot=s.n_boot, seed=seed)
    op = stored_operating_point(s.predictions, s.model)
    if op is not None:
        res.extra["operating_point"] = op.to_dict()
    return Evaluated(res, op)


@register_stage
class EvaluateStage(Stage):
    """Per-class AUROC, AP, sensitivity / specificity / F1 with bootstrap CIs of a Predictions
    file (``evaluate``)."""

    name = "evaluate"
    writes = ("metrics",)
    Settings = EvaluateSettings

    def run(self, ctx: StageContext, s: EvaluateSettings) -> dict[str, Any]:
        done = evaluate_predictions(s, ctx.seed)
        write_artifact(ctx.out, "metrics", done.metrics)
        ctx.results[self.name] = done
        return {"split_unit": done.metrics.extra.get("split_unit"), "n": done.metrics.n}


@dataclass(frozen=True)
class ReferenceSettings:
    """``medscalpel evaluate --reference``: candidate and reference Predictions, and the
    model whose thresholds decide (``None``: 0.5 / argmax)."""

    predictions: str
    reference: str
    model: str | None = None
    n_boot: int = 1000


def compare_with_reference(s: ReferenceSettings, seed: int = 0) -> PairedComparison:
    """Paired per-class deltas (candidate - reference) with bootstrap CIs on the images both
    files hold."""
    cand, ref = load_predictions(s.predictions), load_predictions(s.reference)
    thresholds = None
    if s.model is not None:
        card = card_of(s.model)
        if card.task != "multiclass" and card.thresholds is not None:
            thresholds = card.effective_thresholds()
    return compare_predictions(ref, cand, n_boot=s.n_boot, seed=seed, thresholds=thresholds)


@register_stage
class ReferenceStage(Stage):
    """Paired comparison of predictions against reference predictions of the same images
    (``evaluate --reference``)."""

    name = "evaluate_reference"
    writes = ("comparison",)
    Settings = ReferenceSettings

    def run(self, ctx: StageContext, s: ReferenceSettings) -> dict[str, Any]:
        cmp = compare_with_reference(s, ctx.seed)
        write_artifact(ctx.out, "comparison", cmp)
        ctx.results[self.name] = cmp
        return {"n": cmp.n, "n_unmatched": cmp.n_unmatched}


class ExternallyValidated(NamedTuple):
    """What ``evaluate --external`` measured, and the external set's Predictions."""

    validation: ExternalValidation
    external: Predictions


@dataclass(frozen=True)
class ExternalSettings:
    """``medscalpel evaluate --external``: the internal Predictions, the model that made them
    (it predicts the external set), the external dataset spec and how to run the model."""

    predictions: str
    model: str
    external: str
    external_split: str = "all"
    class_map: tuple[tuple[str, str], ...] | None = None  # (EXTERNAL, MODEL) name pairs
    n_boot: int = 1000
    batch_size: int = 64
    threads: int | None = None
    workers: int | None = None


def validate_external_set(s: ExternalSettings, seed: int = 0) -> ExternallyValidated:
    """Predict the external set with the model and put its numbers next to the internal
    predictions at the model's stored thresholds."""
    bulk = bulk_settings(s.model, s.batch_size, s.workers, s.threads)
    res, ext = validate_external(s.predictions, load_any(s.model, threads=s.threads or 1),
                                 s.external, s.external_split,
                                 dict(s.class_map) if s.class_map else None, n_boot=s.n_boot,
                                 seed=seed, batch_size=s.batch_size, bulk=bulk)
    return ExternallyValidated(res, ext)


@register_stage
class ExternalStage(Stage):
    """The model on an external set next to its internal predictions: metrics, unpaired
    deltas, reliability diagrams (``evaluate --external``)."""

    name = "evaluate_external"
    writes = ("external", "external_predictions", "external_reliability")
    Settings = ExternalSettings

    def run(self, ctx: StageContext, s: ExternalSettings) -> dict[str, Any]:
        done = validate_external_set(s, ctx.seed)
        res, ext = done
        art = ext.meta.get("artifact")
        write_artifact(ctx.out, "external", {**res.to_dict(), **({"artifact": art} if art else {})})
        ext.save(ARTIFACTS["external_predictions"].path_in(ctx.out))
        plot_reliability(res, ARTIFACTS["external_reliability"].path_in(ctx.out))
        ctx.results[self.name] = done
        return {"spec": s.external, "split": ext.split, "n_used": ext.meta.get("n_used"),
                "n_total": ext.meta.get("n_total"), "split_unit": ext.meta.get("split_unit")}


__all__ = ["EvaluateSettings", "EvaluateStage", "Evaluated", "ExternalSettings", "ExternalStage",
           "ExternallyValidated", "PredictSettings", "PredictStage", "Predicted",
           "ReferenceSettings", "ReferenceStage", "TrainSettings", "TrainStage", "bulk_settings",
           "compare_with_reference", "evaluate_predictions", "stored_operating_point",
           "train_config", "validate_external_set"]
