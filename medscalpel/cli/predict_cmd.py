"""``medscalpel train / predict / features``: a model from a dataset, and its predictions or
penultimate features on a dataset split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli import deprecations
from medscalpel.cli.common import N_BOOT, N_BOOT_HELP, console, fmt, print_table, run_stage
from medscalpel.errors import MedScalpelError


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
    from medscalpel.engine.api import as_augment
    from medscalpel.layout import artifact
    from medscalpel.pipeline.stages.predict import TrainSettings, train_config

    settings = TrainSettings(arch=arch, size=size, channels=channels, epochs=epochs,
                             batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                             patience=patience, pos_weight=pos_weight, device=device,
                             num_workers=workers,
                             augment_profile=augment_profile if augment else None,
                             pretrained=pretrained, n_boot=n_boot)
    as_augment(settings.augment_profile or False)  # a bad name fails before any write
    config = {"data": data, "arch": arch, "size": size, "channels": channels,
              **train_config(settings, seed).to_dict(),
              **({"augment_profile": augment_profile} if augment_profile != "light" else {})}
    res = run_stage("train", out, settings, "train", config, seed=seed, overwrite=overwrite,
                    resumable=True, spec=data, data={"spec": data}, manifest_data=("spec",))
    if res.test is not None:
        print_table(res.test.table(), f"test metrics ({arch})")
        console.print(f"macro AUROC {fmt(res.test.macro['auroc'])}")
    console.print(f"model saved to {artifact('model').dir_in(out)}")


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
    from medscalpel.deploy.served import artifact_line, card_of
    from medscalpel.engine.api import usage_line
    from medscalpel.layout import artifact
    from medscalpel.pipeline.stages.predict import PredictSettings, bulk_settings

    bulk = bulk_settings(str(model), batch_size, workers, threads)  # before loading
    card_of(model)  # a missing model fails before anything is written
    settings = PredictSettings(model=str(model), split=split, batch_size=batch_size,
                               threads=threads, workers=workers)
    config = {"model": str(model), "data": data, "split": split,
              "artifact": None,  # the served artifact's provenance: filled in by the stage
              "batch_size": batch_size, "bulk": bulk.to_dict() if bulk else None}
    preds, table = run_stage("predict", out, settings, "predict", config,
                             seed=None,  # predict draws nothing
                             overwrite=overwrite, spec=data,
                             manifest_data=("spec", "split", "split_unit", "n_used", "n_total"),
                             manifest_config=("artifact",))
    console.print(f"used {usage_line(preds)}", highlight=False)
    if preds.meta.get("artifact") is not None:
        console.print(f"model: {artifact_line(preds.meta['artifact'])}", highlight=False)
    if preds.meta.get("bulk"):
        b = preds.meta["bulk"]
        console.print(f"bulk: {b['images_per_s']} images/s ({b['model']}, batch {b['batch_size']},"
                      f" {b['workers']} decoding worker(s), threads {b['threads'] or 'default'})",
                      highlight=False)
    _print_findings(table, artifact("findings_csv").path_in(out))
    if preds.meta.get("unlabelled"):
        console.print("note: the images have no labels: the predictions' labels are unknown "
                      "(NaN), so 'evaluate' has nothing to score them against.", highlight=False)
    console.print(f"{preds.n} predictions -> {artifact('predictions_file').path_in(out)}")


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
