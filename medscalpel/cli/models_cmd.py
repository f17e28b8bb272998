"""Model zoo and import commands: ``medscalpel models list / import / import-xrv`` and
``medscalpel predictions import`` (foreign checkpoints and predictions made elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli.common import console, print_table, run_stage


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
    from medscalpel.pipeline.stages.imports import ImportModelSettings

    data = one_of(data, like, "--data", "--like", "the dataset spec", command="models import")
    settings = ImportModelSettings(checkpoint=str(checkpoint), arch=arch, data=data, size=size,
                                   channels=channels, adapt_channels=adapt_channels)
    # size / channels: those given, else what the stage read from the checkpoint (its summary
    # records them in the manifest's config); seed None: nothing here is random
    config = {"checkpoint": str(checkpoint), "arch": arch, "data": data, "size": size,
              "channels": channels}
    res = run_stage("import_model", out, settings, "models import", config, seed=None,
                    overwrite=overwrite,
                    manifest_config=("size", "channels", "checkpoint_channels",
                                     "adapted_channels"))
    for note in res.notes:
        console.print(f"input: {note}", highlight=False)
    if res.adapted_channels:
        console.print(f"[yellow]warning: the first convolution was adapted from "
                      f"{res.checkpoint_channels} to {res.channels} input channel(s) "
                      "(--adapt-channels): check accuracy before use.[/yellow]")
    console.print(f"imported {checkpoint} as {arch} -> {out} ({res.num_parameters:,} params)")


def models_import_xrv(
    out: Path = typer.Option(..., help="Output model directory."),
    weights: Optional[Path] = typer.Option(None, help="Local state dict of xrv's DenseNet121 "
                                                      "(default: the xrv extra downloads it)."),
    size: int = typer.Option(224, help="Input size recorded in the model card."),
    overwrite: bool = typer.Option(False),
) -> None:
    """Import torchxrayvision's DenseNet121 (op_threshs disabled: outputs are logits)."""
    from medscalpel.pipeline.stages.imports import ImportXrvSettings

    settings = ImportXrvSettings(weights=None if weights is None else str(weights), size=size)
    model = run_stage("import_xrv", out, settings, "models import-xrv",
                      {"weights": str(weights)}, seed=None, overwrite=overwrite)
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
    from medscalpel.pipeline.stages.imports import ImportPredictionsSettings

    labels = one_of(labels, labels_old, "--data", "--labels", "the dataset spec of the labels",
                    command="predictions import")
    settings = ImportPredictionsSettings(csv=str(csv), labels=labels, id_column=id_column,
                                         values=values, split=split, allow_missing=allow_missing)
    preds = run_stage("import_predictions", out, settings, "predictions import",
                      {"csv": str(csv), "labels": labels}, seed=None, overwrite=overwrite,
                      manifest_data=("spec",))
    console.print(f"imported {preds.n} predictions x {preds.num_classes} classes -> {out}")
