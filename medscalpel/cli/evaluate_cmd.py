"""``medscalpel evaluate``: per-class metrics of predictions, against a reference
(``--reference``) or next to an external set (``--external``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli.common import N_BOOT, N_BOOT_HELP, console, fmt, print_table, run_stage
from medscalpel.errors import MedScalpelError


def _parse_class_map(items: list[str]) -> dict[str, str] | None:
    out = {}
    for it in items:
        if "=" not in it:
            raise MedScalpelError(f"--class-map takes EXTERNAL=MODEL pairs (e.g. normal=NORMAL); "
                                  f"got {it!r}.")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out or None


def evaluate(
    predictions: Path = typer.Argument(..., help="predictions.npz (or a directory holding it)."),
    model: Optional[Path] = typer.Option(None, help="Model directory (or served artifact: a "
                                                    "'compress deploy' run or its serve/) "
                                                    "whose calibrated thresholds to use "
                                                    "(default 0.5)."),
    external: Optional[str] = typer.Option(None, help="Dataset spec of an EXTERNAL set: predict it "
                                                      "with --model and report it next to these "
                                                      "(internal) predictions."),
    external_split: str = typer.Option("all", help="Split of the external set (default: all)."),
    reference: Optional[Path] = typer.Option(None, metavar="PREDICTIONS",
                                             help="Reference predictions.npz (e.g. of the "
                                                        "dense model): paired comparison of "
                                                        "PREDICTIONS against it on the common "
                                                        "images (deltas with bootstrap CIs)."),
    class_map: list[str] = typer.Option([], "--class-map", help="EXTERNAL=MODEL class-name pair "
                                                                "(repeatable) when they differ."),
    out: Optional[Path] = typer.Option(None, help="Run directory for metrics.json (and "
                                                  "external.json + reliability.png)."),
    n_boot: int = typer.Option(N_BOOT, help=N_BOOT_HELP),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(64, help="With --external: images per model call."),
    threads: Optional[int] = typer.Option(None, help="With --external: inference threads."),
    workers: Optional[int] = typer.Option(None, help="With --external: processes decoding "
                                                     "images ahead of the model (bulk path, as "
                                                     "in 'predict'; a served --model, --threads "
                                                     "or --workers selects it)."),
    overwrite: bool = typer.Option(False),
) -> None:
    """Per-class AUROC, AP, sensitivity/specificity/F1 with bootstrap 95% CIs; with --external,
    the same model on an external set next to the internal numbers."""
    if reference is not None:
        if external is not None:
            raise MedScalpelError("evaluate: give --reference or --external, not both.")
        _evaluate_reference(predictions, reference, model, out, n_boot, seed, overwrite)
        return
    if external is not None:
        from medscalpel.engine.bulk import BulkSettings

        BulkSettings(batch_size, workers, threads).validate()  # before loading
        _evaluate_external(predictions, model, external, external_split,
                           _parse_class_map(class_map), out, n_boot, seed, overwrite,
                           batch_size, threads, workers)
        return
    from medscalpel.deploy.served import artifact_line, card_of
    from medscalpel.pipeline.stages.predict import EvaluateSettings, evaluate_predictions

    settings = EvaluateSettings(predictions=str(predictions),
                                model=str(model) if model is not None else None, n_boot=n_boot)
    if out is None:  # print only
        res, op = evaluate_predictions(settings, seed)
    else:
        if model is not None:
            card_of(model)  # a missing model fails before anything is written
        res, op = run_stage("evaluate", out, settings, "evaluate",
                            {"predictions": str(predictions), "n_boot": n_boot}, seed=seed,
                            overwrite=overwrite, manifest_data=("split_unit",))
    if res.extra.get("artifact"):
        console.print(f"predictions made by the {artifact_line(res.extra['artifact'])}",
                      highlight=False)
    print_table(res.table(), f"{res.split} ({res.n} images)")
    m = res.macro
    console.print(f"macro AUROC {fmt(m['auroc'])} {fmt(tuple(m.get('auroc_ci', ())) or None)}  "
                  f"macro AP {fmt(m['ap'])}")
    if m.get("accuracy") is not None:
        ci = tuple(m.get("accuracy_ci") or ())
        console.print(f"accuracy {fmt(m['accuracy'])}{' ' + fmt(ci) if len(ci) == 2 else ''} "
                      "(argmax, multi-class)", highlight=False)
    for c in res.classes:
        if c.reason:
            console.print(f"[yellow]{c.name}: NaN ({c.reason})[/yellow]")
    if res.extra.get("split_warning"):
        console.print(f"[yellow]warning: {res.extra['split_warning']}[/yellow]")
    if op is not None:
        _print_stored_operating_point(op)


def _print_stored_operating_point(op) -> None:
    on = op.measured_on
    rows = [{"class": r["class"], "sens": r["sensitivity"],
             "sens 95% CI": tuple(r["sensitivity_ci"]), "spec": r["specificity"],
             "spec 95% CI": tuple(r["specificity_ci"]), "pos": r["n_pos"], "neg": r["n_neg"]}
            for r in op.measured]
    print_table(rows, f"at the model's operating point ({on.get('ci')} "
                      f"{on.get('confidence', 0.95):.0%} CIs): {op.describe()}")


def _evaluate_reference(predictions: Path, reference: Path, model: Optional[Path],
                        out: Optional[Path], n_boot: int, seed: int, overwrite: bool) -> None:
    """``evaluate --reference``: the registered 'evaluate_reference' stage into ``out`` (or,
    without --out, its comparison printed only)."""
    from medscalpel.layout import artifact
    from medscalpel.pipeline.stages.predict import ReferenceSettings, compare_with_reference

    settings = ReferenceSettings(predictions=str(predictions), reference=str(reference),
                                 model=str(model) if model else None, n_boot=n_boot)
    if out is None:  # print only
        cmp = compare_with_reference(settings, seed)
    else:
        cmp = run_stage("evaluate_reference", out, settings, "evaluate --reference",
                        {"predictions": str(predictions), "reference": str(reference),
                         "model": str(model) if model else None, "n_boot": n_boot},
                        seed=seed, overwrite=overwrite)
    print_table(cmp.table(), f"{predictions} vs reference {reference} ({cmp.n} common images, "
                             f"thresholds: {cmp.threshold_source})")
    console.print(cmp.summary(), highlight=False)
    if cmp.n_unmatched:
        console.print(f"[yellow]note: {cmp.n_unmatched} image(s) are in only one of the two "
                      "files and were left out.[/yellow]")
    if out is not None:
        console.print(f"-> {artifact('comparison').path_in(out)}")


def _evaluate_external(predictions: Path, model: Optional[Path], external: str,
                       external_split: str, class_map: dict[str, str] | None,
                       out: Optional[Path], n_boot: int, seed: int, overwrite: bool,
                       batch_size: int, threads: Optional[int], workers: Optional[int]) -> None:
    """``evaluate --external``: the registered 'evaluate_external' stage into ``out`` (or,
    without --out, its numbers printed only)."""
    from medscalpel.deploy.served import artifact_line, card_of
    from medscalpel.engine.api import usage_line
    from medscalpel.layout import artifact
    from medscalpel.pipeline.stages.predict import ExternalSettings, validate_external_set

    if model is None:
        raise MedScalpelError("evaluate --external needs --model (the model that made the "
                              "internal predictions): it predicts the external set.")
    card_of(model)  # a missing model fails before anything is written
    settings = ExternalSettings(predictions=str(predictions), model=str(model),
                                external=external, external_split=external_split,
                                class_map=tuple(class_map.items()) if class_map else None,
                                n_boot=n_boot, batch_size=batch_size, threads=threads,
                                workers=workers)
    if out is None:  # print only
        res, ext = validate_external_set(settings, seed)
    else:
        res, ext = run_stage(
            "evaluate_external", out, settings, "evaluate --external",
            {"predictions": str(predictions), "model": str(model), "external": external,
             "external_split": external_split, "class_map": class_map, "n_boot": n_boot},
            seed=seed, overwrite=overwrite,
            manifest_data=("spec", "split", "n_used", "n_total", "split_unit"))
    if ext.meta.get("artifact"):
        console.print(f"external set predicted by the {artifact_line(ext.meta['artifact'])}",
                      highlight=False)
    console.print(f"external set: used {usage_line(ext)}")
    if ext.meta.get("bulk"):
        b = ext.meta["bulk"]
        console.print(f"bulk: {b['images_per_s']} images/s ({b['model']}, batch "
                      f"{b['batch_size']}, {b['workers']} decoding worker(s))", highlight=False)
    print_table(res.table(), f"internal ({res.internal['n']}) vs external ({res.external['n']}) "
                             f"at {res.threshold_source} thresholds")
    mi, me, md = res.macro["internal"], res.macro["external"], res.macro["delta"]
    console.print(f"macro AUROC internal {fmt(mi['auroc'])} {fmt(tuple(mi['auroc_ci']))}  "
                  f"external {fmt(me['auroc'])} {fmt(tuple(me['auroc_ci']))}  "
                  f"delta {fmt(md['auroc']['value'])} {fmt(tuple(md['auroc']['ci']))}")
    console.print(f"macro sens {fmt(mi['sensitivity'])} -> {fmt(me['sensitivity'])}, spec "
                  f"{fmt(mi['specificity'])} -> {fmt(me['specificity'])}, ECE {fmt(mi['ece'])} "
                  f"-> {fmt(me['ece'])}")
    for note in res.notes[2:]:
        console.print(f"[yellow]note: {note}[/yellow]")
    if out is not None:
        console.print(f"-> {artifact('external').path_in(out)}, "
                      f"{artifact('external_reliability').path_in(out)}")
