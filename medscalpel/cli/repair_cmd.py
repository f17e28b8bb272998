"""``medscalpel repair ...`` commands: surgery, retrain, triage (``repair calibrate`` lives in
``calibrate_cmd.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli.common import console, one_of, print_table, run_stage
from medscalpel.errors import ConfigError


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
    delta_prob: Optional[float] = typer.Option(None, help="Goal: required fall of the targets' "
                                               "probability (give this or "
                                               "--below-threshold)."),
    criterion: str = typer.Option("mean", help="mean or each (for --delta-prob: the mean "
                                  "target or each target must fall by it)."),
    below_threshold: bool = typer.Option(False, help="Goal: every target below threshold "
                                         "(give this or --delta-prob)."),
    tp_loss_budget: int = typer.Option(0, help="Validation true positives that may be lost."),
    adjust_bias: bool = typer.Option(False, help="Allow moving the class bias too."),
    max_weights: int = typer.Option(32, help="Most weights the search may zero."),
    dry_run: bool = typer.Option(False, help="Compute the plan only."),
    out: Path = typer.Option(Path("runs/repair-surgery"), help="Run directory to create."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Zero the fewest weights of one classifier row that remove the given false positives
    while no validation true positive falls below threshold; verify that every other class's
    logits are bit-identical; save the corrected model (OUT/repair/surgery/) with lineage."""
    from medscalpel.layout import artifact
    from medscalpel.validation import check_in

    model = one_of(model, model_arg, "--model", "MODEL", "the model directory",
                   command="repair surgery")
    dataset = one_of(dataset, dataset_old, "--data", "--dataset", "the dataset spec",
                     required=False, command="repair surgery")
    # the library's own checks name its Python arguments: check the flags here first
    if below_threshold == (delta_prob is not None):
        raise ConfigError("repair surgery: give exactly one goal: --delta-prob X (the fall in "
                          "the targets' probability) or --below-threshold.")
    check_in(criterion, "--criterion", "medscalpel repair surgery", ("mean", "each"))
    if dataset is not None and confounder is None:
        raise ConfigError("repair surgery: --data needs --confounder NAME to select the false "
                          "positives.")
    if dataset is None and features is None:
        raise ConfigError("repair surgery: give --features (or --data with --confounder).")

    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in dict(
        model=model, target_class=target_class, features=features, val=val, fp_ids=fp_ids,
        dataset=dataset, split=split, confounder=confounder, delta_prob=delta_prob,
        criterion=criterion, below_threshold=below_threshold, tp_loss_budget=tp_loss_budget,
        adjust_bias=adjust_bias, max_weights=max_weights, dry_run=dry_run).items()}
    result = _run_surgery(out, cfg, overwrite)
    _print_surgery(result)
    console.print(f"written to {artifact('surgery').dir_in(out)}")


def _run_surgery(out: Path, cfg: dict, overwrite: bool):
    """Run the registered 'surgery' stage into a new run directory ``out`` (false positives
    from --features, or from --data's images carrying --confounder): repair/surgery/
    surgery.json and the corrected model beside it unless a dry run; the SurgeryResult."""
    from medscalpel.pipeline.stages.repair import SurgerySettings

    settings = SurgerySettings(**{("data" if k == "dataset" else k): v for k, v in cfg.items()})
    return run_stage("surgery", out, settings, "repair surgery", cfg, overwrite=overwrite)


def _print_surgery(result) -> None:
    """OK / FAILED with the reason, and on success the targets' fall and the TPs lost."""
    d = result.to_dict()
    console.print(f"{'OK' if result.success else 'FAILED'}: {result.message}")
    if result.success:
        console.print(f"targets: {d['targets']['n']}, mean delta prob "
                      f"{d['targets']['delta_prob_mean']:+.4f}; TPs lost {result.tp_lost}/"
                      f"{result.tp_total}; other logits bit-identical: "
                      f"{result.other_logits_identical}")


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
    from medscalpel.pipeline.stages.repair import RetrainSettings
    from medscalpel.validation import check_in

    check_in(method, "method", "repair retrain", ("finetune", "reoptimize"))
    cls = [c.strip() for c in classes.split(",")] if classes else None
    cfg = {"train": str(train), "val": str(val) if val else None,
           "held_out": str(held_out) if held_out else None, "method": method,
           "model": str(model) if model else None, "classes": cls, "steps": steps, "lr": lr}
    settings = RetrainSettings(**{**cfg, "classes": tuple(cls) if cls else None})
    result = run_stage("retrain", out, settings, "repair retrain", cfg, overwrite=overwrite)
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
                                         "starting point; the repaired model goes to "
                                         "OUT/repair/triage/model."),
    budget: float = typer.Option(5.0, help="Largest cost (units) a treatment may have to be run; "
                                 "dearer ones are proposed with an estimated cost."),
    costs: Optional[Path] = typer.Option(None, metavar="FILE.json", help="Cost matrix JSON "
                                         "shared between runs: loaded if present and updated "
                                         "in place with the measured costs (default: a fresh "
                                         "matrix, written to OUT/repair/triage/costs.json)."),
    out: Path = typer.Option(Path("runs/repair-triage"), help="Run directory to create."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Diagnose each class (recall, precision, calibration, false-positive clusters, AUROC), try
    treatments cheapest-first, keep what helps on held-out data, learn the costs; writes
    decision_log.json / decision_log.md."""
    from medscalpel.layout import artifact
    from medscalpel.pipeline.stages.repair import TriageSettings

    cfg = {"fit": str(fit), "held_out": str(held_out), "model": str(model) if model else None,
           "budget": budget, "costs": str(costs) if costs is not None else None}
    settings = TriageSettings(fit=str(fit), held_out=str(held_out),
                              model=str(model) if model else None, budget=budget,
                              costs=str(costs) if costs is not None else None)
    result = run_stage("triage", out, settings, "repair triage", cfg, overwrite=overwrite)
    console.print(result.markdown(), highlight=False, markup=False)
    for c in result.classes:
        for a in c.attempts:
            if a.get("outcome") is not None:
                console.print(f"{c.name} / {a['treatment']}: helped? {a['outcome']} "
                              f"({a['reason']}) [{a['verdict_summary']}]", highlight=False,
                              markup=False)
    console.print(f"'helped' = a paired verdict on {result.settings['n_selection']} selection "
                  "images (pass / fail / undecided; undecided is not kept)", highlight=False)
    console.print(f"written to {artifact('triage').dir_in(out)}")
