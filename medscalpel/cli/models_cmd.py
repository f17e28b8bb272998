"""Model zoo and import commands: ``medscalpel models list / import / import-xrv`` and
``medscalpel predictions import`` (foreign checkpoints and predictions made elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli.common import console, print_table


def models_list() -> None:
    """List the architectures of the zoo."""
    from medscalpel.models.zoo import list_models

    print_table([{"arch": k, "description": v} for k, v in list_models().items()], "model zoo")


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
