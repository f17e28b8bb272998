"""The ``medscalpel`` command line: a thin layer over the Python API.

Each command parses its arguments, calls one public function, writes that result's
``to_dict()`` (and its files) into a run directory with a manifest, and prints a summary.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from medscalpel import __version__
from medscalpel.cli import deprecations
from medscalpel.cli.common import (N_BOOT, N_BOOT_HELP, console, err_console, finish_app, fmt,
                                   print_table)
from medscalpel.errors import MedScalpelError

app = typer.Typer(name="medscalpel", no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Compress, audit, explain and repair medical image classifiers "
                       "(chest X-ray first).")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: label statistics, the phantom.")
models_app = typer.Typer(no_args_is_help=True, help="The model zoo and checkpoint import.")
preds_app = typer.Typer(no_args_is_help=True, help="Predictions made elsewhere.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(preds_app, name="predictions")


def _version(value: bool) -> None:
    if value:
        console.print(f"medscalpel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


# ----------------------------------------------------------------------------- models
@models_app.command("list")
def models_list() -> None:
    """List the architectures of the zoo."""
    from medscalpel.models.zoo import list_models

    print_table([{"arch": k, "description": v} for k, v in list_models().items()], "model zoo")


@models_app.command("import")
def models_import(
    checkpoint: Path = typer.Argument(..., help="A .pt/.pth/.pth.tar state dict or .safetensors."),
    arch: str = typer.Option(..., help="Zoo architecture the weights belong to (models list)."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset spec whose class names / "
                                       "task the model predicts, e.g. "
                                       "'nih:/data/nih?labels_only=true'."),
    like: Optional[str] = typer.Option(None, "--like", hidden=True),
    out: Path = typer.Option(..., help="Output model directory."),
    size: Optional[int] = typer.Option(None, help="Input size in pixels (default: from the "
                                                  "checkpoint when it fixes it (ViT), else 224: "
                                                  "give the size it was trained at)."),
    channels: Optional[int] = typer.Option(None, help="Input channels, 1 or 3 (default: those "
                                                      "of the checkpoint's first convolution)."),
    adapt_channels: bool = typer.Option(False, "--adapt-channels", help="Convert a first "
                                        "convolution made for other input channels than "
                                        "--channels (3->1 sums, 1->3 spreads the filters); "
                                        "without it such a mismatch is refused."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
) -> None:
    """Import a foreign checkpoint (CheXNet, torchvision, timm key layouts) without unpickling
    code, into a medscalpel model directory. Input channels come from the checkpoint's first
    convolution; a mismatch with --channels is refused unless --adapt-channels."""
    from medscalpel.cli.common import one_of
    from medscalpel.data.spec import open_dataset
    from medscalpel.data.transforms import Preprocess
    from medscalpel.models.checkpoint import foreign_input, import_foreign, save_model
    from medscalpel.runs import RunDir

    data = one_of(data, like, "--data", "--like", "the dataset spec", command="models import")
    found = foreign_input(checkpoint)
    notes = []
    if channels is None:
        channels = found["channels"] or 3
        notes.append(f"channels {channels} (from {found['first_conv']})" if found["channels"]
                     else "channels 3 (the checkpoint has no convolution to read them from)")
    if size is None:
        size = found["size"] or 224
        notes.append(f"size {size} (from the position embedding)" if found["size"] else
                     "size 224 (a CNN checkpoint does not record its input size: pass --size "
                     "if it was trained at another)")
    ds = open_dataset(data, split="all")
    pp = Preprocess(size=size, channels=channels)
    model = import_foreign(checkpoint, arch, ds.class_names, ds.task, pp,
                           adapt_channels=adapt_channels)
    adapted = (adapt_channels and found["channels"] is not None
               and found["channels"] != channels)
    with RunDir(out, command="models import",
                config={"checkpoint": str(checkpoint), "arch": arch, "data": data, "size": size,
                        "channels": channels, "checkpoint_channels": found["channels"],
                        "adapted_channels": adapted}, overwrite=overwrite) as run:
        save_model(model, run.path, model.card)
    for note in notes:
        console.print(f"input: {note}", highlight=False)
    if adapted:
        console.print(f"[yellow]warning: the first convolution was adapted from "
                      f"{found['channels']} to {channels} input channel(s) "
                      "(--adapt-channels): check accuracy before use.[/yellow]")
    console.print(f"imported {checkpoint} as {arch} -> {out} ({model.num_parameters():,} params)")


@models_app.command("import-xrv")
def models_import_xrv(
    out: Path = typer.Option(..., help="Output model directory."),
    weights: Optional[Path] = typer.Option(None, help="Local state dict of xrv's DenseNet121 "
                                                      "(default: the xrv extra downloads it)."),
    size: int = typer.Option(224, help="Input size recorded in the model card."),
    overwrite: bool = typer.Option(False),
) -> None:
    """Import torchxrayvision's DenseNet121 (op_threshs disabled: outputs are logits)."""
    from medscalpel.models.checkpoint import save_model
    from medscalpel.models.xrv import load_xrv_densenet
    from medscalpel.runs import RunDir

    model = load_xrv_densenet(weights, size=size)
    with RunDir(out, command="models import-xrv", config={"weights": str(weights)},
                overwrite=overwrite) as run:
        save_model(model, run.path, model.card)
    console.print(f"xrv DenseNet121 ({len(model.card.class_names)} pathologies) -> {out}")


# ----------------------------------------------------------------------------- train / predict
@app.command()
def train(
    data: str = typer.Option(..., help="Dataset spec, e.g. 'phantom?n=2000', 'nih:/data/nih', "
                                       "'folder:/data/kermany/train?dedup=true'."),
    arch: str = typer.Option("densenet121", help="Zoo architecture (see 'models list')."),
    out: Path = typer.Option(..., help="Run directory to create (model/ inside)."),
    size: int = typer.Option(64, help="Input size in pixels."),
    channels: int = typer.Option(1, help="Input channels: 1 (grey) or 3."),
    epochs: int = typer.Option(5), batch_size: int = typer.Option(64), lr: float = typer.Option(1e-3),
    weight_decay: float = typer.Option(1e-4), patience: int = typer.Option(3),
    pos_weight: str = typer.Option("none", help="none | balanced"),
    seed: int = typer.Option(0), device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: int = typer.Option(0, help="DataLoader worker processes."),
    augment: bool = typer.Option(True, help="Light CXR augmentation on the train split."),
    augment_profile: str = typer.Option(
        "light", help="Augmentation profile: 'light' (pose, exposure) or 'acquisition' (also "
                      "another scanner's field of view, display curve and noise; for models that "
                      "must hold up at other sites)."),
    pretrained: bool = typer.Option(False, help="Start from ImageNet weights (needs internet)."),
    n_boot: int = typer.Option(N_BOOT, help=N_BOOT_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    resume: bool = typer.Option(False, hidden=True,
                                help="Deprecated: an interrupted run resumes by itself."),
) -> None:
    """Train a zoo model on a dataset (train split; early stopping on val; test metrics).

    An interrupted run (Ctrl-C, kill -9, power loss) resumes from its last finished epoch when
    the same command is run again."""
    deprecations.renamed(None, resume or None, "--resume", "train")
    from medscalpel.engine.api import as_augment, fit
    from medscalpel.engine.train import TrainConfig
    from medscalpel.layout import write_artifact
    from medscalpel.runs import RunDir

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      patience=patience, pos_weight=pos_weight, seed=seed, device=device,
                      num_workers=workers)
    aug = as_augment(augment_profile if augment else False)  # a bad name fails before any write
    config = {"data": data, "arch": arch, "size": size, "channels": channels, **cfg.to_dict(),
              **({"augment_profile": augment_profile} if augment_profile != "light" else {})}
    with RunDir(out, command="train", config=config, seed=seed, data={"spec": data},
                overwrite=overwrite, resumable=True) as run:
        res = fit(data, arch, run.path, cfg, size=size, channels=channels, augment=aug,
                  pretrained=pretrained, n_boot=n_boot)
        write_artifact(run.path, "fit", res)
        if res.test is not None:
            write_artifact(run.path, "metrics", res.test)
    if res.test is not None:
        print_table(res.test.table(), f"test metrics ({arch})")
        console.print(f"macro AUROC {fmt(res.test.macro['auroc'])}")
    console.print(f"model saved to {out / 'model'}")


@app.command()
def predict(
    model: Path = typer.Option(..., help="Model directory (model.safetensors + model.json), or "
                                         "a served artifact: the run directory of 'compress "
                                         "deploy' or its serve/ folder."),
    data: str = typer.Option(..., help="Dataset spec, or unlabelled images: one image file, a "
                                       "folder of images or a quoted glob ('/scans/*.png')."),
    split: str = typer.Option("auto", help="Split to predict: train | val | test | all | auto "
                                           "(auto: 'test' of the dataset the model was trained "
                                           "on, else 'all')."),
    out: Path = typer.Option(..., help="Run directory to create (predictions.npz inside)."),
    batch_size: int = typer.Option(64, help="Images per model call (the runtime gets whole "
                                             "batches)."),
    threads: Optional[int] = typer.Option(None, help="Inference threads (a served runtime's "
                                                     "session; torch intra-op threads)."),
    workers: Optional[int] = typer.Option(None, help="Processes decoding images ahead of the "
                                                     "model (bulk path; default: half the CPUs, "
                                                     "0: none). A served artifact, --threads or "
                                                     "--workers selects the bulk path."),
    overwrite: bool = typer.Option(False),
) -> None:
    """Predict a dataset split with a saved model -> a Predictions artifact, and a per-image
    table of probabilities and findings (the first rows printed, all in predictions.csv)."""
    from medscalpel.deploy.served import artifact_line, is_served, load_any
    from medscalpel.engine.api import model_provenance as provenance
    from medscalpel.engine.api import predict_spec, usage_line
    from medscalpel.engine.bulk import BulkSettings
    from medscalpel.engine.findings import FILENAME as FINDINGS_CSV
    from medscalpel.engine.findings import findings_table
    from medscalpel.layout import write_artifact
    from medscalpel.runs import RunDir

    settings = BulkSettings(batch_size, workers, threads).validate()  # before loading
    bulk = settings if is_served(model) or threads is not None or workers is not None else None
    m = load_any(model, threads=threads or 1)
    card, art = m.card, provenance(m)
    with RunDir(out, command="predict", config={"model": str(model), "data": data, "split": split,
                                                "artifact": art, "batch_size": batch_size,
                                                "bulk": bulk.to_dict() if bulk else None},
                data={"spec": data, "split": split}, overwrite=overwrite) as run:
        preds = predict_spec(m, data, split, batch_size, bulk=bulk)
        preds.save(run.path / "predictions.npz")
        write_artifact(run.path, "predictions_meta", preds)
        op = card.decision_point()
        table = findings_table(preds, card.thresholds if preds.task == "multilabel" else None,
                               operating_point=op if op.calibrated else None)
        table.save_csv(run.path / FINDINGS_CSV)
        run.data.update(split=preds.split, split_unit=preds.meta.get("split_unit"),
                        n_used=preds.meta.get("n_used"), n_total=preds.meta.get("n_total"))
    console.print(f"used {usage_line(preds)}", highlight=False)
    if art is not None:
        console.print(f"model: {artifact_line(art)}", highlight=False)
    if preds.meta.get("bulk"):
        b = preds.meta["bulk"]
        console.print(f"bulk: {b['images_per_s']} images/s ({b['model']}, batch {b['batch_size']},"
                      f" {b['workers']} decoding worker(s), threads {b['threads'] or 'default'})",
                      highlight=False)
    _print_findings(table, out / FINDINGS_CSV)
    if preds.meta.get("unlabelled"):
        console.print("note: the images have no labels: the predictions' labels are unknown "
                      "(NaN), so 'evaluate' has nothing to score them against.", highlight=False)
    console.print(f"{preds.n} predictions -> {out / 'predictions.npz'}")


#: image rows 'predict' prints (the rest are in the CSV)
PREDICT_ROWS = 10
#: class probabilities a printed row shows (highest first) when there are more classes
PREDICT_TOP = 3


def _print_findings(table, csv_path: Path) -> None:
    """The first rows of a FindingsTable: every probability when the classes fit a terminal,
    else the highest few; then where the whole table is."""
    names = table.class_names
    rows = []
    for r in table.rows[:PREDICT_ROWS]:
        row = {"id": r["id"]}
        if len(names) <= 5:
            row.update({c: r[c] for c in names})
        else:
            top = sorted(names, key=lambda c: -r[c])[:PREDICT_TOP]
            row["highest probabilities"] = ", ".join(f"{c} {r[c]:.3f}" for c in top)
        row["findings"] = r["findings"]
        rows.append(row)
    print_table(rows, f"findings at {table.threshold_source}")
    rest = len(table.rows) - len(rows)
    console.print(f"{'all ' if rest <= 0 else f'{rest} more rows; all '}{len(table.rows)} rows "
                  f"(every class's probability and the findings) -> {csv_path}", highlight=False)


@app.command()
def features(
    model: Path = typer.Option(..., help="Model directory (model.safetensors + model.json)."),
    data: str = typer.Option(..., help="Dataset spec."),
    split: str = typer.Option("auto", help="Split: train | val | test | all | auto (as in "
                                           "predict)."),
    out: Path = typer.Option(..., metavar="FILE.npz", help="Features file to write, ending in "
                                       ".npz (what 'repair retrain' and 'repair surgery "
                                       "--features' read)."),
    batch_size: int = typer.Option(64, help="Batch size."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Penultimate features of a dataset split with the classifier they feed -> a Features
    file (for repair retrain / surgery / triage)."""
    from medscalpel.data.spec import open_dataset
    from medscalpel.engine.api import choose_split
    from medscalpel.engine.predict import extract_features
    from medscalpel.errors import RunError
    from medscalpel.models.checkpoint import load_model

    if out.suffix != ".npz":
        raise MedScalpelError(f"--out {out}: a Features file ends in .npz (e.g. "
                              f"{out.with_suffix('.npz').name}).")
    if out.exists() and not overwrite:
        raise RunError(f"{out} already exists; choose another --out or pass --overwrite.")
    m = load_model(model)
    chosen, why = choose_split(m.card, data, split)
    ds = open_dataset(data, split=chosen, preprocess=m.card.preprocess)
    feats = extract_features(m, ds, batch_size=batch_size)
    feats.save(out)
    console.print(f"used {len(ds)} images of split '{chosen}' ({why})", highlight=False)
    console.print(f"{feats.features.shape[0]} x {feats.features.shape[1]} features -> {out}")


def _parse_class_map(items: list[str]) -> dict[str, str] | None:
    out = {}
    for it in items:
        if "=" not in it:
            raise MedScalpelError(f"--class-map takes EXTERNAL=MODEL pairs (e.g. normal=NORMAL); "
                                  f"got {it!r}.")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out or None


@app.command()
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
    from medscalpel.engine.api import evaluate_file
    from medscalpel.layout import write_artifact
    from medscalpel.runs import RunDir

    if reference is not None:
        if external is not None:
            raise MedScalpelError("evaluate: give --reference or --external, not both.")
        _evaluate_reference(predictions, reference, model, out, n_boot, seed, overwrite)
        return
    if external is not None:
        from medscalpel.engine.bulk import BulkSettings

        settings = BulkSettings(batch_size, workers, threads).validate()  # before loading
        _evaluate_external(predictions, model, external, external_split,
                           _parse_class_map(class_map), out, n_boot, seed, overwrite, settings)
        return
    from medscalpel.deploy.served import artifact_line, card_of

    res = evaluate_file(predictions, card_of(model) if model is not None else None,
                        n_boot=n_boot, seed=seed)
    if res.extra.get("artifact"):
        console.print(f"predictions made by the {artifact_line(res.extra['artifact'])}",
                      highlight=False)
    op = _stored_operating_point(predictions, model)
    if op is not None:
        res.extra["operating_point"] = op.to_dict()
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
    if out is not None:
        with RunDir(out, command="evaluate", config={"predictions": str(predictions),
                                                     "n_boot": n_boot}, seed=seed,
                    data={"split_unit": res.extra.get("split_unit")},
                    overwrite=overwrite) as run:
            write_artifact(run.path, "metrics", res)


def _stored_operating_point(predictions: Path, model: Optional[Path]):
    """The model card's operating point measured on these predictions (sens/spec with CIs),
    or None without --model or when the model decides by the uncalibrated default (the
    table above is already at 0.5 / argmax then)."""
    from medscalpel.deploy.served import card_of
    from medscalpel.engine.api import load_predictions
    from medscalpel.repair.calibrate import measure_operating_point

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
    from medscalpel.cli.common import load_predictions
    from medscalpel.engine.compare import FILENAME, compare_predictions
    from medscalpel.runs import RunDir

    cand, ref = load_predictions(predictions), load_predictions(reference)
    thresholds = None
    if model is not None:
        from medscalpel.deploy.served import card_of

        card = card_of(model)
        if card.task != "multiclass" and card.thresholds is not None:
            thresholds = card.effective_thresholds()
    cmp = compare_predictions(ref, cand, n_boot=n_boot, seed=seed, thresholds=thresholds)
    print_table(cmp.table(), f"{predictions} vs reference {reference} ({cmp.n} common images, "
                             f"thresholds: {cmp.threshold_source})")
    console.print(cmp.summary(), highlight=False)
    if cmp.n_unmatched:
        console.print(f"[yellow]note: {cmp.n_unmatched} image(s) are in only one of the two "
                      "files and were left out.[/yellow]")
    if out is not None:
        with RunDir(out, command="evaluate --reference",
                    config={"predictions": str(predictions), "reference": str(reference),
                            "model": str(model) if model else None, "n_boot": n_boot},
                    seed=seed, overwrite=overwrite) as run:
            cmp.save(run.path / FILENAME)
        console.print(f"-> {out / FILENAME}")


def _evaluate_external(predictions: Path, model: Optional[Path], external: str,
                       external_split: str, class_map: dict[str, str] | None,
                       out: Optional[Path], n_boot: int, seed: int, overwrite: bool,
                       settings=None) -> None:
    from medscalpel.engine.api import usage_line, validate_external
    from medscalpel.engine.external import FILENAME, plot_reliability
    from medscalpel.layout import write_artifact
    from medscalpel.runs import RunDir

    if model is None:
        raise MedScalpelError("evaluate --external needs --model (the model that made the "
                              "internal predictions): it predicts the external set.")
    from medscalpel.deploy.served import artifact_line, is_served, load_any

    bulk = settings if settings is not None and (
        is_served(model) or settings.threads is not None or settings.workers is not None) \
        else None
    res, ext = validate_external(predictions, load_any(model, threads=(settings.threads if
                                                                      settings else None) or 1),
                                 external, external_split, class_map, n_boot=n_boot, seed=seed,
                                 batch_size=settings.batch_size if settings else 64, bulk=bulk)
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
        with RunDir(out, command="evaluate --external",
                    config={"predictions": str(predictions), "model": str(model),
                            "external": external, "external_split": external_split,
                            "class_map": class_map, "n_boot": n_boot}, seed=seed,
                    data={"spec": external, "split": ext.split, "n_used": ext.meta.get("n_used"),
                          "n_total": ext.meta.get("n_total"),
                          "split_unit": ext.meta.get("split_unit")},
                    overwrite=overwrite) as run:
            art = ext.meta.get("artifact")
            write_artifact(run.path, "external",
                           {**res.to_dict(), **({"artifact": art} if art else {})})
            ext.save(run.path / "external_predictions.npz")
            plot_reliability(res, run.path / "reliability.png")
        console.print(f"-> {out / FILENAME}, {out / 'reliability.png'}")


@preds_app.command("import")
def predictions_import(
    csv: Path = typer.Argument(..., help="CSV of per-class probabilities keyed by image id."),
    labels: Optional[str] = typer.Option(None, "--data", help="Dataset spec giving the labels, "
                                         "e.g. 'nih:/data/nih14-labels?labels_only=true'."),
    labels_old: Optional[str] = typer.Option(None, "--labels", hidden=True),
    out: Path = typer.Option(..., help="Run directory to create."),
    id_column: str = typer.Option("Image Index"),
    values: str = typer.Option("probability", help="probability | logit"),
    split: str = typer.Option("test"),
    allow_missing: bool = typer.Option(False, help="Drop ids that have no label."),
    overwrite: bool = typer.Option(False),
) -> None:
    """Import predictions made elsewhere into a Predictions artifact."""
    from medscalpel.cli.common import one_of
    from medscalpel.engine.importer import import_predictions
    from medscalpel.layout import write_artifact
    from medscalpel.runs import RunDir

    labels = one_of(labels, labels_old, "--data", "--labels", "the dataset spec of the labels",
                    command="predictions import")

    with RunDir(out, command="predictions import", config={"csv": str(csv), "labels": labels},
                data={"spec": labels}, overwrite=overwrite) as run:
        preds = import_predictions(csv, labels, id_column=id_column, values=values, split=split,
                                   allow_missing=allow_missing)
        preds.save(run.path / "predictions.npz")
        write_artifact(run.path, "predictions_meta", preds)
    console.print(f"imported {preds.n} predictions x {preds.num_classes} classes -> {out}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory to create."),
    profile: str = typer.Option("quick", help="micro (seconds, for CI) | quick (<= 10 min on a "
                                              "2-core CPU) | full (closer to the issues' sizes)"),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
) -> None:
    """The main job: phantom -> baseline -> calibrate -> compress -> sweep -> audit -> explain ->
    repair -> distil -> experiment report, on the embedded phantom dataset. An interrupted run
    resumes after its last finished stage when the same command is run again."""
    from medscalpel.pipeline.demo import PROFILES, run_demo
    from medscalpel.runs import RunDir

    if profile not in PROFILES:
        raise MedScalpelError(f"Unknown demo profile '{profile}'. Valid names: "
                              f"{', '.join(PROFILES)}.")
    console.print(f"medscalpel demo ({profile} profile) -> {out}")
    with RunDir(out, command="demo", config=PROFILES[profile].to_dict(), seed=seed,
                data={"spec": "phantom"}, overwrite=overwrite, resumable=True) as run:
        res = run_demo(run.path, profile, seed=seed, log=console.print)
    console.print(f"done in {res.seconds / 60:.1f} min; open {out / 'reports' / 'experiment.html'}")


def _register_optional_groups() -> None:
    """Attach the stage command groups (each lives in its own module)."""
    from medscalpel.cli import groups

    groups.register(app, data_app)
    finish_app(app)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_error_line(exc: OSError) -> str:
    """A file-system failure as a one-line message that says where and what to do."""
    import errno

    where = exc.filename if exc.filename is not None else "a path"
    reason = exc.strerror or type(exc).__name__
    advice = {
        errno.ENOENT: "check the path (or its parent folder) exists",
        errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
        errno.EISDIR: "it is a folder where a file is expected: give the file inside it",
        errno.EACCES: "it is not writable/readable by you: choose another --out or path",
        errno.EPERM: "the operation is not permitted there: choose another --out or path",
        errno.EROFS: "the file system is read-only: choose another --out",
        errno.ENOSPC: "the disk is full: free space or choose another --out",
        errno.EEXIST: "it already exists: choose another --out or pass --overwrite",
    }.get(exc.errno or -1, "check the path and its permissions")
    return f"cannot use {where}: {reason}; {advice}."


def run(argv: list[str] | None = None) -> None:
    """Console entry point. Every failure ends in one line ``error: ...`` on stderr and no
    traceback: bad input (a MedScalpelError, a usage error, a path that cannot be read or
    written) exits with code 2; anything else is a bug in medscalpel: exit 1, with the
    traceback only when MEDSCALPEL_DEBUG=1."""
    import os

    from typer import Abort
    from typer._click.exceptions import (  # typer vendors click: its usage-error classes
        ClickException, NoArgsIsHelpError)

    debug = os.environ.get("MEDSCALPEL_DEBUG") == "1"
    try:
        code = app(args=argv, prog_name="medscalpel", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(0)
    except ClickException as exc:
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see '{ctx.command_path} -h')"
        err_console.print(f"error: {_one_line(exc.format_message())}{hint}", highlight=False,
                          markup=False, soft_wrap=True)
        sys.exit(2)
    except MedScalpelError as exc:
        if debug:
            raise
        err_console.print(f"error: {_one_line(str(exc))}", highlight=False, markup=False,
                          soft_wrap=True)
        sys.exit(2)
    except OSError as exc:
        if debug:
            raise
        err_console.print(f"error: {_one_line(_os_error_line(exc))}", highlight=False,
                          markup=False, soft_wrap=True)
        sys.exit(2)
    except (KeyboardInterrupt, Abort):
        err_console.print("error: interrupted; nothing was written under --out (a resumable "
                          "command such as train keeps its work and resumes when run again).",
                          highlight=False, markup=False, soft_wrap=True)
        sys.exit(130)
    except Exception as exc:  # a bug: say so in one line, keep the traceback for debugging
        if debug:
            raise
        err_console.print(f"error: internal error ({type(exc).__name__}: "
                          f"{_one_line(str(exc))[:300]}); this is a medscalpel bug: please "
                          "report it, re-running with MEDSCALPEL_DEBUG=1 for the traceback.",
                          highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


_register_optional_groups()

if __name__ == "__main__":  # pragma: no cover
    run()
