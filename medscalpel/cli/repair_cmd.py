"""``medscalpel repair ...`` commands: calibrate, surgery, retrain, triage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli.common import console, load_predictions, one_of, print_table
from medscalpel.runs import RunDir, write_json


def _load_data(path: Path):
    """Features (``features`` array inside) or Predictions from an ``.npz``; anything else is
    one DataError naming the file."""
    import zipfile

    import numpy as np

    from medscalpel.engine.predict import Features
    from medscalpel.errors import DataError

    if not Path(path).is_file():
        raise DataError(f"File not found: {path} (give a Features or Predictions .npz).")
    try:
        with np.load(path, allow_pickle=False) as z:
            is_features = "features" in z.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz file ({type(exc).__name__}); give a "
                        "Features or Predictions file written by medscalpel.") from exc
    return Features.load(path) if is_features else load_predictions(path)


def calibrate(
    fit: Path = typer.Argument(..., help="Predictions (.npz) to fit the thresholds on "
                               "(validation split)."),
    evaluate_on: Optional[Path] = typer.Option(None, "--eval", help="Predictions (.npz) of "
                                               "another split to evaluate the thresholds on."),
    method: str = typer.Option("youden", help="youden, f1 or sensitivity."),
    target_sensitivity: float = typer.Option(0.9, help="For --method sensitivity."),
    positive: Optional[str] = typer.Option(None, help="Two-class model: the positive class "
                                           "whose operating point is fitted (default: the "
                                           "second class)."),
    model: Optional[Path] = typer.Option(None, help="Model directory (multi-label): a copy "
                                         "with the thresholds in model.json is written to "
                                         "OUT/model."),
    out: Path = typer.Option(Path("runs/repair-calibrate"), help="Run directory to create."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Calibrate decisions, fitted on one split and measured on another. Multi-label: per-class
    thresholds (Youden's J, F1-optimal or a target sensitivity) vs 0.5 (F1, recall, precision).
    Two-class: the operating point of the positive class (same methods) vs argmax. More
    classes: temperature scaling (NLL and ECE before/after; accuracy unchanged)."""
    from medscalpel.errors import ConfigError
    from medscalpel.models.checkpoint import load_model
    from medscalpel.repair.calibrate import (binary_view, calibrate_temperature,
                                             calibrate_thresholds)

    fit_p = load_predictions(fit)
    eval_p = load_predictions(evaluate_on) if evaluate_on else None
    kind = ("thresholds" if fit_p.task == "multilabel" else
            "binary" if fit_p.num_classes == 2 else "temperature")
    if model is not None and kind != "thresholds":
        raise ConfigError(f"repair calibrate --model writes thresholds into a multi-label "
                          f"model's card; these predictions are {fit_p.task} with "
                          f"{fit_p.num_classes} classes: drop --model (the result is in "
                          "calibration.json).")
    if positive is not None and kind != "binary":
        raise ConfigError("--positive applies to two-class predictions only.")
    cfg = {"fit": str(fit), "eval": str(evaluate_on) if evaluate_on else None, "method": method,
           "target_sensitivity": target_sensitivity, "model": str(model) if model else None,
           "kind": kind, "positive": positive}
    with RunDir(out, command="repair calibrate", config=cfg, overwrite=overwrite) as run:
        if kind == "temperature":
            result = calibrate_temperature(fit_p, eval_p)
        else:
            m = load_model(model) if model else None
            if kind == "binary":
                fit_p = binary_view(fit_p, positive)
                eval_p = binary_view(eval_p, positive) if eval_p is not None else None
            result = calibrate_thresholds(fit_p, eval_p, method, target_sensitivity, model=m,
                                          model_out=run.path / "model" if m is not None
                                          else None)
            result.model_dir = str(out / "model") if m is not None else None
            if kind == "binary":
                result.extra["binary"] = fit_p.meta["binary_view"]
        write_json(run.path / "calibration.json", result.to_dict())
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
    console.print(f"written to {out}")


def surgery(
    model_arg: Optional[Path] = typer.Argument(None, hidden=True, metavar="MODEL"),
    model: Optional[Path] = typer.Option(None, "--model", help="Model directory to correct."),
    target_class: str = typer.Option(..., "--class", help="Class whose false positives to fix."),
    features: Optional[Path] = typer.Option(None, help="Features (.npz) holding the false "
                                            "positives (extract_features output)."),
    val: Optional[Path] = typer.Option(None, help="Validation Features (.npz) for the "
                                       "true-positive constraint (default: --features)."),
    fp_ids: Optional[Path] = typer.Option(None, help="Text file, one image id per line: the "
                                          "false positives (default: all of --features)."),
    dataset: Optional[str] = typer.Option(None, "--data", help="Instead of --features: a "
                                          "dataset spec whose images are run through the "
                                          "model."),
    dataset_old: Optional[str] = typer.Option(None, "--dataset", hidden=True),
    split: str = typer.Option("test", help="Split of --data."),
    confounder: Optional[str] = typer.Option(None, help="With --data: select the false "
                                             "positives carrying this confounder flag "
                                             "(e.g. chest_tube)."),
    delta_prob: Optional[float] = typer.Option(None, help="Required fall of the targets' "
                                               "probability."),
    criterion: str = typer.Option("mean", help="mean or each (for --delta-prob)."),
    below_threshold: bool = typer.Option(False, help="Require every target below threshold."),
    tp_loss_budget: int = typer.Option(0, help="Validation true positives that may be lost."),
    adjust_bias: bool = typer.Option(False, help="Allow moving the class bias too."),
    max_weights: int = typer.Option(32, help="Most weights the search may zero."),
    dry_run: bool = typer.Option(False, help="Compute the plan only."),
    out: Path = typer.Option(Path("runs/repair-surgery"), help="Run directory to create."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Zero the fewest weights of one classifier row that remove the given false positives
    while no validation true positive falls below threshold; verify that every other class's
    logits are bit-identical; save the corrected model (OUT/model) with lineage."""
    from medscalpel.engine.predict import Features
    from medscalpel.errors import ConfigError
    from medscalpel.models.checkpoint import load_model
    from medscalpel.repair.surgery import surgery_from_rule, surgical_correction

    model = one_of(model, model_arg, "--model", "MODEL", "the model directory")
    dataset = one_of(dataset, dataset_old, "--data", "--dataset", "the dataset spec",
                     required=False)

    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in dict(
        model=model, target_class=target_class, features=features, val=val, fp_ids=fp_ids,
        dataset=dataset, split=split, confounder=confounder, delta_prob=delta_prob,
        criterion=criterion, below_threshold=below_threshold, tp_loss_budget=tp_loss_budget,
        adjust_bias=adjust_bias, max_weights=max_weights, dry_run=dry_run).items()}
    kw = dict(delta_prob=delta_prob, below_threshold=below_threshold, criterion=criterion,
              tp_loss_budget=tp_loss_budget, adjust_bias=adjust_bias, max_weights=max_weights,
              dry_run=dry_run)
    with RunDir(out, command="repair surgery", config=cfg, overwrite=overwrite) as run:
        m = load_model(model)
        model_out = None if dry_run else run.path / "model"
        if dataset is not None:
            if confounder is None:
                raise ConfigError("repair surgery: --data needs --confounder NAME to select "
                                  "the false positives.")
            from medscalpel.data.spec import open_dataset

            ds = open_dataset(dataset, split=split, preprocess=m.card.preprocess)
            vf = Features.load(val) if val else None
            result = surgery_from_rule(m, ds, confounder, target_class, val=vf,
                                       out_dir=model_out, **kw)
        else:
            if features is None:
                raise ConfigError("repair surgery: give --features (or --data with "
                                  "--confounder).")
            ids = [s.strip() for s in fp_ids.read_text().splitlines() if s.strip()] \
                if fp_ids else None
            tf = Features.load(features)
            result = surgical_correction(m, target_class, tf, fp_ids=ids,
                                         val=Features.load(val) if val else None,
                                         out_dir=model_out, **kw)
        if result.model_dir is not None:
            result.model_dir = str(out / "model")
        result.save(run.path / "surgery.json")
    d = result.to_dict()
    console.print(f"{'OK' if result.success else 'FAILED'}: {result.message}")
    if result.success:
        console.print(f"targets: {d['targets']['n']}, mean delta prob "
                      f"{d['targets']['delta_prob_mean']:+.4f}; TPs lost {result.tp_lost}/"
                      f"{result.tp_total}; other logits bit-identical: "
                      f"{result.other_logits_identical}")
    console.print(f"written to {out}")


def retrain(
    train: Path = typer.Argument(..., help="Training Features (.npz)."),
    val: Optional[Path] = typer.Option(None, help="Validation Features (.npz) for selection."),
    held_out: Optional[Path] = typer.Option(None, help="Held-out Features (.npz) for the "
                                            "before/after report."),
    method: str = typer.Option("finetune", help="finetune (classifier fine-tune) or reoptimize "
                               "(logistic-regression refit)."),
    model: Optional[Path] = typer.Option(None, help="Model directory: the retrained model is "
                                         "written to OUT/model."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated classes to retrain "
                                          "(default all)."),
    steps: int = typer.Option(300, help="finetune: optimisation steps."),
    lr: float = typer.Option(1e-2, help="finetune: learning rate."),
    out: Path = typer.Option(Path("runs/repair-retrain"), help="Run directory to create."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Retrain only the final layer on cached features: a classifier fine-tune or an
    F re-optimization (regularised logistic regression, C chosen on validation)."""
    from medscalpel.engine.predict import Features
    from medscalpel.models.checkpoint import load_model
    from medscalpel.repair.retrain import finetune_classifier, reoptimize_classifier
    from medscalpel.validation import check_in

    check_in(method, "method", "repair retrain", ("finetune", "reoptimize"))
    cls = [c.strip() for c in classes.split(",")] if classes else None
    cfg = {"train": str(train), "val": str(val) if val else None,
           "held_out": str(held_out) if held_out else None, "method": method,
           "model": str(model) if model else None, "classes": cls, "steps": steps, "lr": lr}
    with RunDir(out, command="repair retrain", config=cfg, overwrite=overwrite) as run:
        m = load_model(model) if model else None
        tr = Features.load(train)
        va = Features.load(val) if val else None
        ho = Features.load(held_out) if held_out else None
        if method == "finetune":
            result = finetune_classifier(tr, va, ho, model=m, classes=cls, steps=steps, lr=lr)
        else:
            result = reoptimize_classifier(tr, va, ho, model=m, classes=cls)
        result.save(run.path / "model" if m is not None else run.path)
        if m is not None:
            result.model_dir = str(out / "model")
            write_json(run.path / "retrain.json", result.to_dict())
    rows = [{"class": c, "AUROC before": result.auroc_before[c],
             "AUROC after": result.auroc_after[c]} for c in result.auroc_before]
    print_table(rows, title=f"{result.method}: {result.trainable_params} trainable params, "
                f"{result.seconds:.2f} s, held-out {result.held_out_split}")
    console.print(f"written to {out}")


def triage(
    fit: Path = typer.Argument(..., help="Features or Predictions (.npz) of the validation "
                               "split: diagnosis and fitting of treatments."),
    held_out: Path = typer.Argument(..., help="Features or Predictions (.npz) of a separate "
                                    "split: where each treatment's effect is measured."),
    model: Optional[Path] = typer.Option(None, help="Model directory: its thresholds are the "
                                         "starting point; the repaired model goes to OUT/model."),
    budget: float = typer.Option(5.0, help="Largest cost (units) a treatment may have to be run; "
                                 "dearer ones are proposed with an estimated cost."),
    costs: Path = typer.Option(Path("runs/treatment_costs.json"), help="Cost matrix JSON, "
                               "loaded if present and updated with the measured costs."),
    out: Path = typer.Option(Path("runs/repair-triage"), help="Run directory to create."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Diagnose each class (recall, precision, calibration, false-positive clusters, AUROC), try
    treatments cheapest-first, keep what helps on held-out data, learn the costs; writes
    decision_log.json / decision_log.md."""
    from medscalpel.models.checkpoint import load_model
    from medscalpel.repair.triage import triage as run_triage

    cfg = {"fit": str(fit), "held_out": str(held_out), "model": str(model) if model else None,
           "budget": budget, "costs": str(costs)}
    with RunDir(out, command="repair triage", config=cfg, overwrite=overwrite) as run:
        m = load_model(model) if model else None
        thr = m.card.effective_thresholds() if m is not None and m.card is not None else None
        result = run_triage(_load_data(fit), _load_data(held_out), thresholds=thr, budget=budget,
                            cost_path=costs)
        result.save(run.path, model=m)
    console.print(result.markdown())
    console.print(f"written to {out}")
