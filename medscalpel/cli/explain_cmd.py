"""``medscalpel explain ...`` and ``medscalpel audit polarity``: thin wrappers over
:mod:`medscalpel.explain` (including :mod:`medscalpel.explain.polarity`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli.common import console, print_table, run_stage

MODEL = typer.Option(..., help="Model directory (model.safetensors + model.json).")
DATA = typer.Option(..., help="Dataset spec, e.g. 'phantom:/runs/ph' or 'nih:/data/nih'.")
OUT = typer.Option(..., help="Run directory to create.")


def _open(model_dir: Path, data: str, split: str, served_ok: bool = False):
    """The model and its data, checked against each other (see
    :func:`medscalpel.pipeline.stages.explain.open_model_data`)."""
    from medscalpel.pipeline.stages.explain import open_model_data

    return open_model_data(str(model_dir), data, split, served_ok)


def cam(
    model: Path = typer.Option(..., help="Model directory (model.safetensors + model.json), or a "
                               "served artifact ('compress deploy' run or its serve/): its own "
                               "CAM output gives Grad-CAM (other methods need the torch model)."),
    data: str = DATA, out: Path = OUT,
    target: str = typer.Option(..., "--class", help="Class to explain (one target per class)."),
    split: str = typer.Option("test"),
    n: int = typer.Option(8, "--n-images", "--n", help="Images (positives first)."),
    method: str = typer.Option("gradcam", help="gradcam | gradcam++ | scorecam"),
    seed: int = typer.Option(0), overwrite: bool = typer.Option(False),
) -> None:
    """Class activation maps of one class on a few images, with the lung-zone reading. On a
    served artifact, Grad-CAM from the artifact's own CAM output, labelled with its precision."""
    from medscalpel.pipeline.stages.explain import CamSettings

    settings = CamSettings(model=str(model), data=data, target=target, split=split, n_images=n,
                           method=method)
    res = run_stage("cam", out, settings, "explain cam",
                    {"model": str(model), "data": data, "class": target, "method": method},
                    seed=seed, overwrite=overwrite, manifest_config=("artifact",))
    how = f" ({res.meta['label']})" if res.meta.get("label") else ""
    console.print(f"{len(res.ids)} {method} maps of '{target}'{how} -> {out}", highlight=False)


def attribute(
    model: Path = MODEL, data: str = DATA, out: Path = OUT,
    target: str = typer.Option(..., "--class", help="Class whose logit is attributed."),
    method: str = typer.Option("lrp", help="ig | lrp | backtrace"),
    split: str = typer.Option("test"),
    n: int = typer.Option(4, "--n-images", "--n", help="Images."),
    seed: int = typer.Option(0), overwrite: bool = typer.Option(False),
) -> None:
    """Pixel attributions (Integrated Gradients with its convergence delta, or LRP with its
    conservation delta)."""
    from medscalpel.pipeline.stages.explain import AttributeSettings

    settings = AttributeSettings(model=str(model), data=data, target=target, method=method,
                                 split=split, n_images=n)
    res = run_stage("attribute", out, settings, "explain attribute",
                    {"model": str(model), "data": data, "class": target, "method": method},
                    seed=seed, overwrite=overwrite)
    console.print(f"{method}: max |delta| {float(res.delta.abs().max()):.2e} "
                  f"({res.delta_definition}) -> {out}")


def channels(
    model: Path = MODEL, data: str = DATA, out: Path = OUT,
    target: str = typer.Option(..., "--class", help="Class whose logit is decomposed."),
    split: str = typer.Option("val"), n_images: int = typer.Option(256),
    top: int = typer.Option(10), fp_only: bool = typer.Option(False, help="Aggregate over the "
                                                                          "false positives only."),
    seed: int = typer.Option(0), overwrite: bool = typer.Option(False),
) -> None:
    """Classifier-channel evidence: the penultimate channels behind a class's logit
    (w_kc * f_c(x)), and which other classes they push or pull."""
    from medscalpel.pipeline.stages.explain import ChannelsSettings

    settings = ChannelsSettings(model=str(model), data=data, target=target, split=split,
                                n_images=n_images, top=top, fp_only=fp_only)
    table = run_stage("channels", out, settings, "explain channels",
                      {"model": str(model), "data": data, "class": target, "fp_only": fp_only},
                      seed=seed, overwrite=overwrite)
    print_table([{k2: v for k2, v in r.items() if not isinstance(v, (list, dict))}
                 for r in table.to_dict()["rows"]], f"top channels of {target}")


def compare(
    teacher: Path = typer.Option(..., help="Teacher model directory."),
    student: Path = typer.Option(..., help="Student model directory."),
    data: str = DATA, out: Path = OUT,
    split: str = typer.Option("test"),
    n: int = typer.Option(16, "--n-images", "--n", help="Images."),
    method: str = typer.Option("scorecam", help="scorecam | gradcam | gradcam++"),
    seed: int = typer.Option(0), overwrite: bool = typer.Option(False),
) -> None:
    """Per-class saliency similarity (Pearson, top-k% IoU) between a teacher and a student."""
    from medscalpel.pipeline.stages.explain import SaliencyCompareSettings

    settings = SaliencyCompareSettings(teacher=str(teacher), student=str(student), data=data,
                                       split=split, n_images=n, method=method)
    res = run_stage("saliency_compare", out, settings, "explain compare",
                    {"teacher": str(teacher), "student": str(student), "data": data,
                     "method": method}, seed=seed, overwrite=overwrite)
    console.print(f"saliency comparison ({method}) of {res.pearson.shape[1]} images -> {out}")


def polarity(
    model: Path = MODEL,
    data: str = typer.Option(..., help="Dataset spec whose TRAINING labels define the Jaccard "
                                       "indices."),
    out: Path = OUT, split: str = typer.Option("train"),
    quantile: float = typer.Option(0.9, help="A weight is strong when |w| is above this quantile "
                                             "of its classifier row."),
    n_null: int = typer.Option(200, help="Draws of each null model."),
    seed: int = typer.Option(0), overwrite: bool = typer.Option(False),
    compare_with: Optional[list[Path]] = typer.Option(None, help="Other model directories "
                                                                 "(e.g. lossless, pruned)."),
) -> None:
    """Polarized classifier channels vs label mutual exclusivity (Jaccard), with null models."""
    from medscalpel.data.spec import open_dataset
    from medscalpel.layout import artifact
    from medscalpel.models import load_model
    from medscalpel.pipeline.stages.explain import PolaritySettings, require_match

    m = load_model(model)
    require_match(m, str(model), open_dataset(data, split=split, preprocess=m.card.preprocess),
                  data)
    settings = PolaritySettings(model=str(model), data=data, split=split, quantile=quantile,
                                n_null=n_null,
                                compare_with=tuple(str(p) for p in compare_with or ()))
    run_stage("polarity", out, settings, "audit polarity",
              {"model": str(model), "data": data, "quantile": quantile}, seed=seed,
              overwrite=overwrite)
    console.print(f"polarity analysis -> {artifact('polarity').dir_in(out)}")
