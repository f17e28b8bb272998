"""Calibration stages of single commands: the operating point fitted on one split and measured
on another (``repair calibrate FIT``), certified thresholds (``--guarantee``), a card's
guarantee re-checked on new labelled predictions (``--recertify``) or carried to a new site
without its labels (``--transfer-to``), and the k-shot recalibration at a new site (``repair
recalibrate-site``).

Each stage has a ``*_inputs(settings)`` function that loads and checks its inputs (one
:class:`~medscalpel.errors.MedScalpelError` naming the flag): the command calls it before the
run directory is made, so that a bad input fails before anything is written, and the stage
calls it again to do the work (the inputs are small files: predictions, a model card).

The demo's ``calibrate`` stage (:mod:`medscalpel.pipeline.stages.model`) writes the same
``calibrate/calibration.json`` and ``calibrate/model`` but stays its own stage: its model card
records a ``threshold_calibration`` lineage step with the evaluation summary
(:func:`~medscalpel.repair.calibrate.save_with_thresholds`), the command's an
``operating_point`` step that also covers the two-class cut and the temperature
(:func:`~medscalpel.repair.calibrate.save_with_operating_point`); one stage would change one of
the two cards.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medscalpel.data.spec import open_dataset
from medscalpel.engine.api import load_predictions, predict_spec, usage_line
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.layout import write_artifact
from medscalpel.models.checkpoint import load_model, save_model
from medscalpel.models.operating_point import OperatingPoint
from medscalpel.pipeline.stage import Stage, StageContext, register_stage
from medscalpel.repair.calibrate import (binary_view, calibrate_temperature,
                                         calibrate_thresholds, guarantee_operating_point,
                                         measure_operating_point, save_with_operating_point,
                                         temperature_operating_point, threshold_operating_point)
from medscalpel.repair.card_guarantee import guarantee_of_card
from medscalpel.repair.conformal import (GuaranteeResult, GuaranteeSpec, Recertification,
                                         calibrate_guarantee, parse_guarantee, patient_split,
                                         recertify)
from medscalpel.repair.label_shift import LabelShiftTransfer, transfer_guarantee
from medscalpel.repair.shift import SiteRecalibration, recalibrate_site, recalibrated_model
from medscalpel.runs import hash_file


def _source(path: str) -> str:
    """What an operating point was fitted on: the hash and name of the predictions file."""
    return f"sha256:{hash_file(path)[:16]} ({Path(path).name})"


# ----------------------------------------------------------------------------- point
@dataclass(frozen=True)
class PointSettings:
    fit: str  # labelled Predictions .npz the operating point is fitted on
    eval: str | None = None  # Predictions .npz of another split it is measured on
    method: str = "youden"
    target_sensitivity: float = 0.9
    positive: str | None = None  # two-class predictions: the positive class
    model: str | None = None  # a copy deciding by the operating point goes to calibrate/model


@dataclass(frozen=True)
class PointInputs:
    fit: Predictions
    eval: Predictions | None
    kind: str  # thresholds (multi-label), binary (two classes) or temperature (more classes)
    model: Any | None
    source: str  # the hash and name of FIT: what the operating point records it was fitted on


@dataclass(frozen=True)
class PointCalibration:
    """What ``repair calibrate FIT`` made: the calibration result of ``kind``, its (measured)
    operating point and the folder of the model deciding by it (``None`` without --model)."""

    kind: str
    result: Any
    operating_point: OperatingPoint
    method: str
    model_dir: str | None


def point_inputs(s: PointSettings) -> PointInputs:
    """The predictions (labels required on FIT), the kind of calibration they call for and the
    model of the same classes, or one error naming the flag."""
    fit_p = load_predictions(s.fit).require_labels("fitting thresholds", str(s.fit))
    eval_p = load_predictions(s.eval) if s.eval else None
    kind = ("thresholds" if fit_p.task == "multilabel" else
            "binary" if fit_p.num_classes == 2 else "temperature")
    if s.positive is not None and kind != "binary":
        raise ConfigError("--positive applies to two-class predictions only.")
    m = load_model(s.model) if s.model else None
    if m is not None and tuple(m.card.class_names) != tuple(fit_p.class_names):
        raise ConfigError(f"--model {s.model} predicts {list(m.card.class_names)[:4]} but the "
                          f"predictions are of {list(fit_p.class_names)[:4]}: give the "
                          "predictions of this model.")
    return PointInputs(fit_p, eval_p, kind, m, _source(s.fit))


def fit_point(kind: str, fit_p: Predictions, eval_p: Predictions | None, method: str,
              target_sensitivity: float, positive: str | None, source: str):
    """The calibration result of ``kind`` (thresholds, binary, temperature) fitted on ``fit_p``
    and evaluated on ``eval_p``, and its (not yet measured) operating point."""
    if kind == "temperature":
        result = calibrate_temperature(fit_p, eval_p)
        return result, temperature_operating_point(result, fit_p, source=source)
    fit_v = binary_view(fit_p, positive) if kind == "binary" else fit_p
    eval_v = binary_view(eval_p, positive) if kind == "binary" and eval_p is not None \
        else eval_p
    result = calibrate_thresholds(fit_v, eval_v, method, target_sensitivity)
    op = threshold_operating_point(result.calibrator, fit_v, tuple(fit_p.class_names),
                                   source=source)
    if kind == "binary":
        bv = fit_v.meta["binary_view"]
        result.extra["binary"] = {"positive": bv["positive"], "negative": bv["negative"]}
    return result, op


@register_stage
class PointStage(Stage):
    """Fit the operating point on one split and measure it on another: per-class thresholds
    (multi-label), the positive class's cut (two classes) or a temperature (more classes); with
    a model, a copy deciding by it (``repair calibrate FIT``)."""

    name = "calibrate_point"
    writes = ("calibration",)
    may_write = ("calibrated_card",)
    Settings = PointSettings

    def run(self, ctx: StageContext, s: PointSettings) -> dict[str, Any]:
        inp = point_inputs(s)
        result, op = fit_point(inp.kind, inp.fit, inp.eval, s.method, s.target_sensitivity,
                               s.positive, inp.source)
        if inp.eval is not None:
            op = measure_operating_point(op, inp.eval, held_out=not (
                set(inp.fit.ids) & set(inp.eval.ids)))
        model_dir = None
        if inp.model is not None:
            save_with_operating_point(inp.model, ctx.dir_of("calibrated_card"), op,
                                      source=inp.source)
            model_dir = str(ctx.final_dir_of("calibrated_card"))
        d = result.to_dict()
        d["operating_point"] = op.to_dict()
        d["model_dir"] = model_dir
        write_artifact(ctx.out, "calibration", d)
        ctx.results[self.name] = PointCalibration(inp.kind, result, op, s.method, model_dir)
        return {"kind": inp.kind, "operating_point": op.describe(),
                "measured": bool(op.measured), "model_dir": model_dir}


# ----------------------------------------------------------------------------- guarantee
@dataclass(frozen=True)
class GuaranteeSettings:
    fit: str  # labelled Predictions .npz the guarantee is certified on
    guarantee: str  # 'recall>=0.90', 'E[recall]>=0.90', 'precision>=0.8', 'fnr<=0.1'
    eval: str | None = None  # held-out labelled Predictions the guarantee is re-checked on
    alpha: float = 0.1
    patients: str | None = None  # CSV: columns id, patient
    holdout: float | None = None  # share of FIT's patients held out to re-check
    positive: str | None = None
    model: str | None = None  # a copy deciding by the certified thresholds
    per_patient: bool = False  # certify on one image per patient (seeded by the run's seed)


@dataclass(frozen=True)
class GuaranteeInputs:
    spec: GuaranteeSpec
    calibration: Predictions  # FIT, or its calibration part with --holdout
    check: Predictions | None  # --eval, or FIT's held-out part
    split_unit: str | None  # what --holdout split by (patient / image / mixed)
    patients: dict[str, str] | None
    model: Any | None
    class_names: tuple[str, ...]  # of FIT as given (two classes for a binary view)
    task: str

    def patient_ids(self, preds: Predictions | None) -> list[str | None] | None:
        if preds is None or self.patients is None:
            return None
        return [self.patients.get(i) for i in preds.ids]


@dataclass(frozen=True)
class GuaranteeRun:
    """What ``repair calibrate --guarantee`` made: the certificate, its held-out re-check
    (``None`` without one), the model's operating point (``None`` without --model), and the
    patients of the calibration images (``None`` unless --patients without --per-patient)."""

    spec: GuaranteeSpec
    result: GuaranteeResult
    check: Recertification | None
    operating_point: OperatingPoint | None
    calibration_split: str
    split_unit: str | None
    repeat_ids: list[str | None] | None


def read_patients(path: str | Path) -> dict[str, str]:
    """image id -> patient id from a CSV with columns 'id' and 'patient'."""
    if not Path(path).is_file():
        raise DataError(f"--patients: file not found: {path} (a CSV with columns 'id' and "
                        "'patient').")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "id" not in cols or "patient" not in cols:
            raise DataError(f"--patients {path}: needs the columns 'id' and 'patient'; it has "
                            f"{cols}.")
        return {r["id"]: r["patient"] for r in reader if r.get("id")}


def guarantee_inputs(s: GuaranteeSettings, seed: int) -> GuaranteeInputs:
    """The parsed guarantee, the calibration and re-check predictions (``seed``: the --holdout
    split), the patients and the model, or one error naming the flag."""
    spec = parse_guarantee(s.guarantee)  # a bad spec fails before anything is read
    if s.holdout is not None and s.eval is not None:
        raise ConfigError("Give --eval or --holdout, not both: the guarantee is re-checked on "
                          "one held-out set.")
    fit_p = load_predictions(s.fit).require_labels("certifying a guarantee", str(s.fit))
    eval_p = load_predictions(s.eval) if s.eval else None
    m = load_model(s.model) if s.model is not None else None
    names, task = tuple(fit_p.class_names), fit_p.task
    if m is not None and tuple(m.card.class_names) != names:
        raise ConfigError(f"--model {s.model} predicts {list(m.card.class_names)[:4]} but the "
                          f"predictions are of {list(names)[:4]}.")
    if fit_p.task == "multiclass":
        if fit_p.num_classes != 2:
            raise ConfigError(f"--guarantee needs multi-label or two-class predictions; these "
                              f"are multi-class with {fit_p.num_classes} classes.")
        fit_p = binary_view(fit_p, s.positive)
        eval_p = binary_view(eval_p, s.positive) if eval_p is not None else None
    elif s.positive is not None:
        raise ConfigError("--positive applies to two-class predictions only.")
    if s.per_patient and s.patients is None:
        raise ConfigError("--per-patient needs --patients CSV (columns 'id' and 'patient'): "
                          "without patient ids every image is its own patient.")
    pmap = read_patients(s.patients) if s.patients else None
    cal_p, chk_p, unit = fit_p, eval_p, None
    if s.holdout is not None:
        pids = [pmap.get(i) for i in fit_p.ids] if pmap is not None else None
        sp = patient_split(fit_p, pids, s.holdout, seed)
        cal_p, chk_p, unit = fit_p.select(sp.calibration), fit_p.select(sp.held_out), sp.unit
    return GuaranteeInputs(spec, cal_p, chk_p, unit, pmap, m, names, task)


@register_stage
class GuaranteeStage(Stage):
    """Per-class thresholds with a finite-sample guarantee (conformal), re-checked on held-out
    predictions or patients; with a model, a copy deciding by them (``repair calibrate
    --guarantee``)."""

    name = "certify"
    writes = ("guarantee",)
    may_write = ("guarantee_check", "calibrated_card")
    Settings = GuaranteeSettings

    def run(self, ctx: StageContext, s: GuaranteeSettings) -> dict[str, Any]:
        seed = ctx.seed
        inp = guarantee_inputs(s, seed)
        pid = inp.patient_ids
        cal_p = inp.calibration
        result = calibrate_guarantee(cal_p, inp.spec, s.alpha, patient_ids=pid(cal_p),
                                     groups=pid(cal_p) if s.per_patient else None, seed=seed)
        write_artifact(ctx.out, "guarantee", result)
        check = (recertify(result, inp.check, patient_ids=pid(inp.check))
                 if inp.check is not None else None)
        if check is not None:
            write_artifact(ctx.out, "guarantee_check", check)
        op = None
        if inp.model is not None:
            op = guarantee_operating_point(
                result, inp.class_names, inp.task, kept=inp.model.card.effective_thresholds(),
                source=_source(s.fit), check=None if check is None else check.to_dict())
            save_with_operating_point(inp.model, ctx.dir_of("calibrated_card"), op)
        repeat = pid(cal_p) if inp.patients is not None and not s.per_patient else None
        ctx.results[self.name] = GuaranteeRun(inp.spec, result, check, op, cal_p.split,
                                              inp.split_unit, repeat)
        return {"guarantee": inp.spec.text, "split_unit": inp.split_unit,
                "check": None if check is None else check.outcome,
                "model_dir": None if op is None else str(ctx.final_dir_of("calibrated_card"))}


# ----------------------------------------------------------------------------- card guarantee
def card_guarantee(model_dir: str, flag: str):
    """The model of ``model_dir`` and the guarantee its card's operating point carries
    (``(model, guarantee, positive, notes)``); a one-line error naming ``flag`` when none."""
    m = load_model(model_dir)
    g, pos, notes = guarantee_of_card(m.card)
    if g is None:
        raise ConfigError(f"{flag} {model_dir}: its model card's operating point carries "
                          "no guarantee (certify one with 'repair calibrate FIT --guarantee "
                          "recall>=0.90 --model DIR').")
    return m, g, pos, notes


@dataclass(frozen=True)
class RecertifySettings:
    model_dir: str  # the model whose card carries the guarantee
    eval: str  # labelled Predictions of the model (or site) to re-check it on
    alpha: float = 0.1
    patients: str | None = None


@dataclass(frozen=True)
class RecertifyInputs:
    guarantee: GuaranteeResult
    notes: tuple[str, ...]
    preds: Predictions  # as given (its split and model id are printed)
    view: Predictions  # the positive class's binary view of a two-class model, else preds
    patient_ids: list[str | None] | None


@dataclass(frozen=True)
class RecertifyRun:
    """What ``repair calibrate --recertify`` made: the card's guarantee and its re-check on the
    predictions of split ``split`` of model ``model_id``."""

    guarantee: GuaranteeResult
    check: Recertification
    split: str
    model_id: str


def recertify_inputs(s: RecertifySettings) -> RecertifyInputs:
    """The card's guarantee and the labelled predictions of the same classes to check it on,
    or one error naming the flag."""
    m, g, pos, notes = card_guarantee(s.model_dir, "--recertify")
    preds = load_predictions(s.eval).require_labels("re-certifying a guarantee", str(s.eval))
    if tuple(preds.class_names) != tuple(m.card.class_names):
        raise ConfigError(f"--eval {s.eval} is of classes {list(preds.class_names)[:4]}, "
                          f"the model's are {list(m.card.class_names)[:4]}.")
    view = binary_view(preds, pos) if pos is not None else preds
    pmap = read_patients(s.patients) if s.patients else None
    pids = [pmap.get(i) for i in view.ids] if pmap is not None else None
    return RecertifyInputs(g, tuple(notes), preds, view, pids)


@register_stage
class RecertifyStage(Stage):
    """Re-check the guarantee a model card carries on new labelled predictions (exact
    one-sample tests, Holm): pass / fail / undecided per class (``repair calibrate
    --recertify``)."""

    name = "recertify"
    writes = ("guarantee_check",)
    Settings = RecertifySettings

    def run(self, ctx: StageContext, s: RecertifySettings) -> dict[str, Any]:
        inp = recertify_inputs(s)
        check = recertify(inp.guarantee, inp.view, alpha=s.alpha, patient_ids=inp.patient_ids)
        if inp.notes:
            check = dataclasses.replace(check, notes=(*check.notes, *inp.notes))
        write_artifact(ctx.out, "guarantee_check", check)
        ctx.results[self.name] = RecertifyRun(inp.guarantee, check, inp.preds.split,
                                              inp.preds.model_id)
        return {"guarantee": inp.guarantee.spec, "outcome": check.outcome}


@dataclass(frozen=True)
class TransferSettings:
    model_dir: str  # the model whose card carries the guarantee
    fit: str  # the labelled predictions the guarantee was certified on
    transfer_to: str  # predictions of the new site (labels not used)


@dataclass(frozen=True)
class TransferInputs:
    model: Any
    guarantee: GuaranteeResult
    notes: tuple[str, ...]
    calibration: Predictions
    new: Predictions


@dataclass(frozen=True)
class TransferRun:
    """What ``repair calibrate --transfer-to`` made: the card's guarantee, its transfer to the
    new site and the operating point of the model written (``None``: it did not transfer)."""

    guarantee: GuaranteeResult
    transfer: LabelShiftTransfer
    operating_point: OperatingPoint | None


def transfer_inputs(s: TransferSettings) -> TransferInputs:
    """The card's guarantee, the labelled calibration predictions and the new site's, all of
    the model's classes (the positive class's binary views for a two-class model), or one
    error naming the file."""
    m, g, pos, notes = card_guarantee(s.model_dir, "--transfer-to")
    cal = load_predictions(s.fit).require_labels("carrying a guarantee", str(s.fit))
    new = load_predictions(s.transfer_to)
    for p, name in ((cal, str(s.fit)), (new, str(s.transfer_to))):
        if tuple(p.class_names) != tuple(m.card.class_names):
            raise ConfigError(f"{name} is of classes {list(p.class_names)[:4]}, the model's "
                              f"are {list(m.card.class_names)[:4]}.")
    if pos is not None:
        cal, new = binary_view(cal, pos), binary_view(new, pos)
    return TransferInputs(m, g, tuple(notes), cal, new)


@register_stage
class TransferStage(Stage):
    """Carry a card's guarantee to a new site without its labels, under pure label shift;
    when it transfers, a copy of the model deciding by the carried guarantee (``repair
    calibrate --recertify MODEL_DIR FIT --transfer-to NEW``)."""

    name = "transfer_guarantee"
    writes = ("label_shift_transfer",)
    may_write = ("calibrated_card",)
    Settings = TransferSettings

    def run(self, ctx: StageContext, s: TransferSettings) -> dict[str, Any]:
        inp = transfer_inputs(s)
        g, m = inp.guarantee, inp.model
        t = transfer_guarantee(g, inp.calibration, inp.new, site=inp.new.split)
        if inp.notes:
            t = dataclasses.replace(t, notes=(*t.notes, *inp.notes))
        write_artifact(ctx.out, "label_shift_transfer", t)
        op = None
        if t.transferable and t.guarantee is not None:
            op = guarantee_operating_point(
                t.guarantee, m.card.class_names, m.card.task,
                kept=m.card.effective_thresholds(),
                source=f"{_source(s.transfer_to)}, its labels not used",
                transfer={"outcome": t.outcome, "site": t.site, "assumption": t.assumption,
                          "from_split": g.split, "n_new_images": t.n_new_images,
                          "rows": {r["name"]: r["status"] for r in t.rows}})
            save_with_operating_point(m, ctx.dir_of("calibrated_card"), op)
        ctx.results[self.name] = TransferRun(g, t, op)
        return {"guarantee": g.spec, "outcome": t.outcome, "transferable": t.transferable}


# ----------------------------------------------------------------------------- new site
@dataclass(frozen=True)
class SiteSettings:
    model: str  # its stored thresholds are the start
    internal: str  # the model's internal (test) predictions: the operating point to restore
    external: str  # dataset spec of the new site (labelled)
    external_split: str = "all"
    k: int = 20
    method: str = "threshold"
    classes: tuple[str, ...] | None = None
    tolerance: float = 0.05
    n_boot: int = 1000
    class_map: dict[str, str] | None = None  # EXTERNAL -> MODEL class names


@dataclass(frozen=True)
class SiteRun:
    """What ``repair recalibrate-site`` made: the recalibration, the recalibrated model's
    operating point and which images of the site were used."""

    result: SiteRecalibration
    operating_point: OperatingPoint
    usage: str
    method: str
    k: int


def site_inputs(s: SiteSettings) -> tuple[Any, Predictions]:
    """The model and its internal predictions, or one error naming the file (the new site's
    images are predicted by the stage itself)."""
    return load_model(s.model), load_predictions(s.internal)


@register_stage
class RecalibrateSiteStage(Stage):
    """Re-fit thresholds / temperature on k labelled images per class of a new site (drawn by
    patient when the dataset knows patients), measure sensitivity and specificity on the rest
    against the internal ones, and save a recalibrated copy whose card carries the site's
    operating point (``repair recalibrate-site``)."""

    name = "recalibrate_site"
    writes = ("recalibration", "model")
    Settings = SiteSettings

    def run(self, ctx: StageContext, s: SiteSettings) -> dict[str, Any]:
        m, int_preds = site_inputs(s)
        ext = predict_spec(s.model, s.external, s.external_split, class_map=s.class_map or None,
                           progress=ctx.progress)
        ds = open_dataset(s.external, split=ext.split, preprocess=m.card.preprocess)
        patients = dict(zip(ds.ids, ds.patient_ids))
        res, rec = recalibrate_site(m, int_preds, ext, k=s.k, method=s.method,
                                    classes=list(s.classes) if s.classes else None,
                                    tolerance=s.tolerance, n_boot=s.n_boot, seed=ctx.seed,
                                    patient_ids=patients)
        write_artifact(ctx.out, "recalibration", res)
        rm = recalibrated_model(m, rec, site=s.external, result=res, split=ext.split)
        save_model(rm, ctx.dir_of("model"))
        ctx.results[self.name] = SiteRun(res, rm.card.operating_point, usage_line(ext),
                                         s.method, s.k)
        return {"spec": s.external, "split": ext.split, "n_used": ext.meta.get("n_used"),
                "n_total": ext.meta.get("n_total"), "verdict": res.verdict}


__all__ = ["GuaranteeRun", "GuaranteeSettings", "GuaranteeStage", "PointCalibration",
           "PointSettings", "PointStage", "RecalibrateSiteStage", "RecertifyRun",
           "RecertifySettings", "RecertifyStage", "SiteRun", "SiteSettings", "TransferRun",
           "TransferSettings", "TransferStage", "card_guarantee", "fit_point",
           "guarantee_inputs", "point_inputs", "read_patients", "recertify_inputs",
           "site_inputs", "transfer_inputs"]
