"""``medscalpel repair calibrate``: decision thresholds / temperature fitted on one split and
measured on another, and its other modes: certified thresholds (``--guarantee``), the check of
a card's guarantee on new labelled predictions (``--recertify``) and its transfer to a new site
without labels (``--recertify --transfer-to``).

Each mode checks its flags and inputs, then runs one registered stage of
:mod:`medscalpel.pipeline.stages.calibration` into OUT and prints what it made."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli.common import console, print_table, run_stage
from medscalpel.errors import ConfigError

_MODEL_HELP = ("Model directory: a copy deciding by the fitted operating point (multi-label "
               "thresholds, the two-class cut, or the temperature; with --guarantee the "
               "certified thresholds) is written to OUT/calibrate/model.")
_GUARANTEE_HELP = ("Certified thresholds instead of point ones: 'recall>=0.90' (with confidence "
                   "1-alpha), 'E[recall]>=0.90' (in expectation), 'precision>=0.8' or "
                   "'fnr<=0.1' (multi-label set); written to calibrate/guarantee.json.")
_PATIENTS_HELP = ("With --guarantee: CSV with columns 'id' and 'patient' (image id -> patient "
                  "id); patients are counted and --holdout splits by patient.")
_PER_PATIENT_HELP = ("With --guarantee and --patients: certify on ONE random image per patient "
                     "(seeded by --seed), so the certificate counts independent patients, not "
                     "correlated follow-up images of one patient.")
_HOLDOUT_HELP = ("With --guarantee and no --eval: the share of patients of FIT held out to "
                 "re-check the guarantee (split by patient; seeded by --seed).")
_RECERTIFY_HELP = ("Check the guarantee stored in this model's card on the labelled predictions "
                   "of --eval (a compressed model, another site): pass / fail / undecided per "
                   "class and the minimum labelled images a site needs; writes "
                   "guarantee_check.json. --alpha is the family error of the check.")
_TRANSFER_HELP = ("With --recertify MODEL_DIR FIT: carry the card's guarantee (certified on the "
                  "labelled FIT) to the site of NEW_PREDS WITHOUT its labels, under pure label "
                  "shift: recall kept, precision re-certified at the estimated prevalence, "
                  "after a label-free check; writes calibrate/label_shift_transfer.json and, "
                  "when it transfers, OUT/calibrate/model: a copy of MODEL_DIR whose card "
                  "carries the carried guarantee as its operating point.")


def calibrate(
    fit: Optional[Path] = typer.Argument(None, help="Predictions (.npz) to fit the thresholds "
                                         "on (validation split); not with --recertify."),
    evaluate_on: Optional[Path] = typer.Option(None, "--eval", help="Predictions (.npz) of "
                                               "another split to evaluate the thresholds on."),
    method: str = typer.Option("youden", help="youden, f1 or sensitivity."),
    target_sensitivity: float = typer.Option(0.9, help="For --method sensitivity."),
    positive: Optional[str] = typer.Option(None, help="Two-class model: the positive class "
                                           "whose operating point is fitted (default: the "
                                           "second class)."),
    model: Optional[Path] = typer.Option(None, help=_MODEL_HELP),
    out: Path = typer.Option(Path("runs/repair-calibrate"), help="Run directory to create."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    guarantee: Optional[str] = typer.Option(None, help=_GUARANTEE_HELP),
    alpha: float = typer.Option(0.1, help="With --guarantee: the allowed probability that the "
                                "guarantee fails."),
    patients: Optional[Path] = typer.Option(None, help=_PATIENTS_HELP),
    per_patient: bool = typer.Option(False, "--per-patient", help=_PER_PATIENT_HELP),
    holdout: Optional[float] = typer.Option(None, help=_HOLDOUT_HELP),
    seed: int = typer.Option(0, help="Seed of the --holdout split."),
    recertify_model: Optional[Path] = typer.Option(None, "--recertify", metavar="MODEL_DIR",
                                                   help=_RECERTIFY_HELP),
    transfer_to: Optional[Path] = typer.Option(None, "--transfer-to", metavar="NEW_PREDS",
                                               help=_TRANSFER_HELP),
) -> None:
    """Calibrate decisions, fitted on one split and measured on another. Multi-label: per-class
    thresholds (Youden's J, F1-optimal or a target sensitivity) vs 0.5 (F1, recall, precision).
    Two-class: the operating point of the positive class (same methods) vs argmax. More
    classes: temperature scaling (NLL and ECE before/after; accuracy unchanged). With
    --guarantee: per-class thresholds with a finite-sample guarantee (conformal), re-checked on
    --eval or a --holdout of patients. With --recertify MODEL_DIR --eval PREDS: re-check the
    guarantee a model card carries on new labelled predictions. FIT, --eval and --transfer-to
    may also name the run directory of 'predict' (its predictions.npz)."""
    from medscalpel.engine.api import predictions_file

    fit = predictions_file(fit) if fit is not None else None
    evaluate_on = predictions_file(evaluate_on) if evaluate_on is not None else None
    transfer_to = predictions_file(transfer_to) if transfer_to is not None else None
    if transfer_to is not None:
        if recertify_model is None:
            raise ConfigError("--transfer-to needs --recertify MODEL_DIR (the card whose "
                              "guarantee to carry) and FIT (the predictions it was certified "
                              "on).")
        return _transfer_card(recertify_model, fit, transfer_to, evaluate_on, guarantee,
                              holdout, model, positive, out, overwrite)
    if recertify_model is not None:
        return _recertify_card(recertify_model, fit, evaluate_on, guarantee, holdout, model,
                               alpha, patients, positive, out, overwrite)
    if fit is None:
        raise ConfigError("Give the predictions to fit on (FIT), or --recertify MODEL_DIR "
                          "--eval PREDS to check a stored guarantee.")
    if guarantee is not None:
        return _calibrate_guarantee(fit, evaluate_on, guarantee, alpha, patients, holdout, seed,
                                    positive, model, out, overwrite, per_patient)
    if holdout is not None or patients is not None or per_patient:
        raise ConfigError("--holdout, --patients and --per-patient apply with --guarantee only.")
    return _calibrate_point(fit, evaluate_on, method, target_sensitivity, positive, model, out,
                            overwrite)


def _calibrate_point(fit: Path, evaluate_on: Optional[Path], method: str,
                     target_sensitivity: float, positive: Optional[str], model: Optional[Path],
                     out: Path, overwrite: bool) -> None:
    """``repair calibrate FIT``: per-class thresholds (multi-label), the positive class's cut
    (two classes) or temperature scaling (more classes), fitted on FIT and measured on --eval
    (the 'calibrate_point' stage); writes calibrate/calibration.json (and OUT/calibrate/model
    with --model)."""
    from medscalpel.layout import artifact
    from medscalpel.pipeline.stages.calibration import PointSettings, point_inputs

    settings = PointSettings(fit=str(fit), eval=str(evaluate_on) if evaluate_on else None,
                             method=method, target_sensitivity=target_sensitivity,
                             positive=positive, model=str(model) if model else None)
    kind = point_inputs(settings).kind  # a bad input fails here, before OUT is made
    cfg = {"fit": str(fit), "eval": str(evaluate_on) if evaluate_on else None, "method": method,
           "target_sensitivity": target_sensitivity, "model": str(model) if model else None,
           "kind": kind, "positive": positive}
    run = run_stage("calibrate_point", out, settings, "repair calibrate", cfg, seed=None,
                    overwrite=overwrite)
    _print_point(run.kind, run.result, run.operating_point, method)
    if run.model_dir is not None:
        console.print(f"model deciding by this operating point -> {run.model_dir}",
                      highlight=False)
    console.print(f"written to {artifact('calibration').dir_in(out)}")


def _print_point(kind: str, result, op, method: str) -> None:
    """The fitted thresholds (or temperature) against the default, then the operating point."""
    if kind == "temperature":
        print_table(result.table(), title=f"temperature scaling: T = {result.temperature:.3f} "
                    f"(fit on {result.fit_split}, measured on {result.eval_split}"
                    f"{'' if result.held_out else ': NOT held out'})")
    else:
        if kind == "binary":
            b = result.extra["binary"]
            console.print(f"positive class {b['positive']} (vs {b['negative']}): threshold "
                          f"{result.thresholds[0]:.4f} on its softmax probability ({method}); "
                          "0.5 is the argmax.", highlight=False)
        if result.evaluation is not None:
            print_table(result.evaluation.table(), title=f"thresholds ({method}) vs 0.5")
    _print_operating_point(op)


def _print_operating_point(op) -> None:
    """The operating point in one line, and its measured sens/spec with CIs per class."""
    console.print(f"operating point: {op.describe()}", highlight=False)
    if op.measured:
        rows = [{"class": r["class"], "sens": r["sensitivity"],
                 "sens 95% CI": tuple(r["sensitivity_ci"]), "spec": r["specificity"],
                 "spec 95% CI": tuple(r["specificity_ci"]), "pos": r["n_pos"],
                 "neg": r["n_neg"]} for r in op.measured]
        on = op.measured_on
        print_table(rows, title=f"at the operating point on split '{on.get('split')}' "
                    f"({on.get('n_images')} images{'' if on.get('held_out') else ', NOT held out'}"
                    f"; {on.get('ci')} {on.get('confidence', 0.95):.0%} CIs)")
    else:
        console.print("not measured: give --eval (another split) for its sensitivity and "
                      "specificity", highlight=False)


def _calibrate_guarantee(fit: Path, evaluate_on: Optional[Path], guarantee: str, alpha: float,
                         patients: Optional[Path], holdout: Optional[float], seed: int,
                         positive: Optional[str], model: Optional[Path], out: Path,
                         overwrite: bool, per_patient: bool = False) -> None:
    """``repair calibrate --guarantee``: certify on FIT (or its calibration part), re-check on
    --eval or on the held-out patients (the 'certify' stage); writes calibrate/guarantee.json
    (+ guarantee_check.json, + OUT/calibrate/model with --model)."""
    from medscalpel.pipeline.stages.calibration import GuaranteeSettings, guarantee_inputs

    settings = GuaranteeSettings(
        fit=str(fit), guarantee=guarantee, eval=str(evaluate_on) if evaluate_on else None,
        alpha=alpha, patients=str(patients) if patients else None, holdout=holdout,
        positive=positive, model=str(model) if model is not None else None,
        per_patient=per_patient)
    inp = guarantee_inputs(settings, seed)  # a bad input fails here, before OUT is made
    cfg = {"fit": str(fit), "eval": str(evaluate_on) if evaluate_on else None,
           "guarantee": inp.spec.text, "alpha": alpha, "patients": str(patients) if patients
           else None, "holdout": holdout, "seed": seed, "positive": positive,
           "split_unit": inp.split_unit, "per_patient": per_patient}
    run = run_stage("certify", out, settings, "repair calibrate", cfg, seed=seed,
                    overwrite=overwrite)
    _print_guarantee(run.spec, run.result, run.calibration_split, run.split_unit,
                     run.repeat_ids, run.check, run.operating_point, out)


def _print_guarantee(spec, result, split: str, unit: Optional[str],
                     repeat_ids: Optional[list], check, op, out: Path) -> None:
    """The certified thresholds and their notes (``repeat_ids``: the patient of each calibration
    image, to count images of a patient already counted), the held-out re-check and the model
    deciding by the guarantee."""
    from medscalpel.layout import artifact

    pat = f", {result.n_patients} patients" if result.n_patients is not None else ""
    print_table(result.table(), title=f"{spec.text}: certified on {result.n_images} images"
                f"{pat} ({split}{', split by ' + unit if unit else ''})")
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    if repeat_ids is not None:
        ids = [i for i in repeat_ids if i is not None]
        repeated = len(ids) - len(set(ids))
        if repeated:
            console.print(f"note: {repeated} of {len(ids)} calibration images are further "
                          "images of a patient already counted; the certificate counts images "
                          "as independent (real follow-up films are correlated: on NIH "
                          "ChestX-ray14 the design effect was 1.5-6.3, "
                          "benchmarks/results/conformal_population.md). --per-patient "
                          "certifies on one image per patient.", highlight=False)
    if check is not None:
        print_table(check.table(), title=f"re-check on {check.n_images} held-out images: "
                    f"{check.outcome.upper()} ({check.correction}, confidence "
                    f"{check.confidence:.3f})")
    else:
        console.print("not re-checked: give --eval or --holdout for a held-out check",
                      highlight=False)
    if op is not None:
        console.print(f"operating point: {op.describe()}", highlight=False)
        console.print(f"model deciding by it -> {artifact('calibrated_card').dir_in(out)}",
                      highlight=False)
    console.print(f"written to {out}")


def _recertify_card(model_dir: Path, fit: Optional[Path], evaluate_on: Optional[Path],
                    guarantee: Optional[str], holdout: Optional[float], model: Optional[Path],
                    alpha: float, patients: Optional[Path], positive: Optional[str], out: Path,
                    overwrite: bool) -> None:
    """``repair calibrate --recertify MODEL_DIR --eval PREDS``: the card's guarantee re-checked
    on PREDS (exact one-sample tests, Holm; the 'recertify' stage); writes
    guarantee_check.json."""
    from medscalpel.pipeline.stages.calibration import RecertifySettings, recertify_inputs
    from medscalpel.runs import hash_file

    clash = [n for n, v in (("FIT", fit), ("--guarantee", guarantee), ("--holdout", holdout),
                            ("--model", model), ("--positive", positive)) if v is not None]
    if clash:
        raise ConfigError(f"--recertify checks the guarantee stored in MODEL_DIR's card on "
                          f"--eval; drop {', '.join(clash)}.")
    if evaluate_on is None:
        raise ConfigError("--recertify needs --eval PREDS: labelled predictions of the model "
                          "(or site) to re-check the guarantee on.")
    settings = RecertifySettings(model_dir=str(model_dir), eval=str(evaluate_on), alpha=alpha,
                                 patients=str(patients) if patients else None)
    g = recertify_inputs(settings).guarantee  # a bad input fails here, before OUT is made
    cfg = {"recertify": str(model_dir), "eval": str(evaluate_on), "alpha": alpha,
           "patients": str(patients) if patients else None, "guarantee": g.spec,
           "eval_sha256": hash_file(evaluate_on)[:16]}
    run = run_stage("recertify", out, settings, "repair calibrate", cfg, seed=None,
                    overwrite=overwrite)
    check = run.check
    print_table(check.table(), title=f"{g.spec} (certified on {g.n_images} images of "
                f"'{g.split}') re-checked on {check.n_images} images of '{run.split}' "
                f"({run.model_id or 'model'}): {check.outcome.upper()} ({check.correction})")
    console.print(f"verdict: {check.verdict.summary()}", highlight=False, markup=False)
    console.print(f"minimum k: {check.min_k['statement']}", highlight=False, markup=False)
    for note in check.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    console.print(f"written to {out}")


def _transfer_card(model_dir: Path, fit: Optional[Path], new_preds: Path,
                   evaluate_on: Optional[Path], guarantee: Optional[str],
                   holdout: Optional[float], model: Optional[Path], positive: Optional[str],
                   out: Path, overwrite: bool) -> None:
    """``repair calibrate --recertify MODEL_DIR FIT --transfer-to NEW``: the card's guarantee
    carried to NEW's site without its labels (medscalpel.repair.label_shift; the
    'transfer_guarantee' stage); writes calibrate/label_shift_transfer.json and, when it
    transfers, OUT/calibrate/model: MODEL_DIR deciding by the carried guarantee (its operating
    point holds it, as ``--guarantee --model`` writes it, so deploy's serve.json carries it
    too)."""
    from medscalpel.layout import artifact
    from medscalpel.pipeline.stages.calibration import TransferSettings, transfer_inputs
    from medscalpel.runs import hash_file

    clash = [n for n, v in (("--eval", evaluate_on), ("--guarantee", guarantee),
                            ("--holdout", holdout), ("--model", model),
                            ("--positive", positive)) if v is not None]
    if clash:
        raise ConfigError(f"--transfer-to carries the guarantee of MODEL_DIR's card to "
                          f"NEW_PREDS; drop {', '.join(clash)}.")
    if fit is None:
        raise ConfigError("--transfer-to needs FIT: the labelled predictions the card's "
                          "guarantee was certified on.")
    settings = TransferSettings(model_dir=str(model_dir), fit=str(fit),
                                transfer_to=str(new_preds))
    g = transfer_inputs(settings).guarantee  # a bad input fails here, before OUT is made
    cfg = {"recertify": str(model_dir), "fit": str(fit), "transfer_to": str(new_preds),
           "guarantee": g.spec, "fit_sha256": hash_file(fit)[:16],
           "transfer_to_sha256": hash_file(new_preds)[:16]}
    run = run_stage("transfer_guarantee", out, settings, "repair calibrate", cfg, seed=None,
                    overwrite=overwrite)
    t, op = run.transfer, run.operating_point
    rows = [{"class": r["name"], "status": r["status"], "prevalence (cal)":
             r.get("prior_calibration"), "prevalence (EM)": r.get("prior_em"),
             "BBSE interval": tuple(r["prior_bbse_interval"]) if r.get("prior_bbse_interval")
             else None, "check p": r.get("check_p_value"),
             "threshold (logit)": r.get("new_threshold_logit", r.get("threshold_logit"))}
            for r in t.rows]
    print_table(rows, title=f"{g.spec} carried to '{t.site}' ({t.n_new_images} images, labels "
                f"not used): {t.outcome.upper()}")
    console.print(t.summary(), highlight=False, markup=False)
    console.print(f"assumption: {t.assumption}", highlight=False, markup=False)
    for note in t.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    if op is not None:
        console.print(f"operating point: {op.describe()}", highlight=False, markup=False)
        console.print(f"model deciding by it -> {artifact('calibrated_card').dir_in(out)}",
                      highlight=False, markup=False)
    else:
        console.print("no model written: the guarantee did not transfer (the card of "
                      f"{model_dir} is unchanged)", highlight=False, markup=False)
    console.print(f"written to {out}")
