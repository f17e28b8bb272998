"""``medscalpel explain ...`` and ``medscalpel audit polarity``: thin wrappers over
:mod:`medscalpel.explain` (including :mod:`medscalpel.explain.polarity`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli.common import console, print_table

MODEL = typer.Option(..., help="Model directory (model.safetensors + model.json).")
DATA = typer.Option(..., help="Dataset spec, e.g. 'phantom:/runs/ph' or 'nih:/data/nih'.")
OUT = typer.Option(..., help="Run directory to create.")


def _open(model_dir: Path, data: str, split: str, served_ok: bool = False):
    """The model and its data, refused (ModelError naming both) when the model's classes,
    task or input channels do not match the data's: explanations of one class would otherwise
    be drawn for another class's images. ``served_ok``: a served artifact (a 'compress deploy'
    run or its serve/) is accepted; else it is refused with the reason (no gradients)."""
    from medscalpel.deploy.served import is_served, load_any
    from medscalpel.data.spec import open_dataset
    from medscalpel.errors import ModelError

    if is_served(model_dir) and not served_ok:
        raise ModelError(f"--model {model_dir} is a served artifact (compress deploy): it has no "
                         "gradients or weights to explain; this command needs the torch model "
                         "directory (only 'explain cam' runs on a served artifact, through its "
                         "CAM output).")
    model = load_any(model_dir)
    ds = open_dataset(data, split=split, preprocess=model.card.preprocess)
    _require_match(model, model_dir, ds, data)
    return model, ds


def _require_match(model, model_dir: Path, ds, data: str) -> None:
    from medscalpel.engine.predict import check_compatible
    from medscalpel.errors import ModelError

    try:
        check_compatible(model, ds)
    except ModelError as exc:
        raise ModelError(f"--model {model_dir} does not fit --data {data}: {exc}") from None


def _class_index(model, name: str) -> int:
    from medscalpel.errors import ConfigError

    names = list(model.card.class_names)
    if name not in names:
        raise ConfigError(f"Unknown class '{name}'. The model's classes: {', '.join(names)}.")
    return names.index(name)


def _positives(ds, k: int, n: int, seed: int) -> list[int]:
    import numpy as np

    y = ds.labels_multihot()[:, k]
    idx = np.flatnonzero(y == 1)
    if len(idx) == 0:
        idx = np.arange(len(ds))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(idx, min(n, len(idx)), replace=False).tolist())


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
    import torch

    from medscalpel.deploy.served import require_served_cams
    from medscalpel.engine.api import model_provenance as provenance
    from medscalpel.explain.cams import compute_cam
    from medscalpel.explain.figures import cam_overlay_figure
    from medscalpel.layout import write_artifact
    from medscalpel.runs import RunDir

    m, ds = _open(model, data, split, served_ok=True)
    art = provenance(m)
    require_served_cams(m, method, "--method", "explain cam")  # before any work, with why
    k = _class_index(m, target)
    idx = _positives(ds, k, n, seed)
    images = torch.stack([ds.image(i) for i in idx])
    with RunDir(out, command="explain cam", config={"model": str(model), "data": data,
                                                    "class": target, "method": method,
                                                    "artifact": art},
                seed=seed, overwrite=overwrite) as run:
        res = compute_cam(m, images, k, method=method, ids=[ds.ids[i] for i in idx])
        res.save(run.path / "cams.npz")
        cam_overlay_figure(ds.preprocess.denormalize(images).numpy(), res,
                           run.path / f"{method}.png",
                           title=res.meta.get("label"))
        write_artifact(run.path, "cam_result", {**res.to_dict(), "artifact": art}
                       if art is not None and "artifact" not in res.meta else res.to_dict())
    how = f" ({res.meta['label']})" if res.meta.get("label") else ""
    console.print(f"{len(idx)} {method} maps of '{target}'{how} -> {out}", highlight=False)


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
    import torch

    from medscalpel.explain.attributions import attribute as run_attribution
    from medscalpel.layout import write_artifact
    from medscalpel.runs import RunDir

    m, ds = _open(model, data, split)
    k = _class_index(m, target)
    idx = _positives(ds, k, n, seed)
    images = torch.stack([ds.image(i) for i in idx])
    with RunDir(out, command="explain attribute", config={"model": str(model), "data": data,
                                                          "class": target, "method": method},
                seed=seed, overwrite=overwrite) as run:
        res = run_attribution(method, m, images, k)
        res.save(run.path / "attributions.safetensors")
        write_artifact(run.path, "attribution",
                       {**res.to_dict(), "ids": [ds.ids[i] for i in idx]})
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
    from medscalpel.engine.predict import collect_images
    from medscalpel.explain.channels import channel_contributions_from_model
    from medscalpel.explain.figures import channel_bar_figure
    from medscalpel.layout import write_artifact
    from medscalpel.runs import RunDir

    m, ds = _open(model, data, split)
    k = _class_index(m, target)
    images, idx = collect_images(ds, n_images, seed=seed)
    cc = channel_contributions_from_model(m, images, labels=ds.labels_multihot()[idx],
                                          ids=[ds.ids[i] for i in idx])
    rows = cc.false_positives(k, threshold=m.card.effective_thresholds()[k]) if fp_only else None
    if fp_only and len(rows) == 0:
        from medscalpel.errors import DataError

        raise DataError(f"No false positives of '{target}' among the {len(idx)} images of "
                        f"split '{split}'; drop --fp-only or use more images.")
    table = cc.top_channels(k, n=top, rows=rows)
    with RunDir(out, command="explain channels", config={"model": str(model), "data": data,
                                                         "class": target, "fp_only": fp_only},
                seed=seed, overwrite=overwrite) as run:
        write_artifact(run.path, "channels", table)
        channel_bar_figure(table, run.path / "channels.png")
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
    from medscalpel.engine.predict import collect_images
    from medscalpel.explain.compare import compare_saliency
    from medscalpel.layout import write_artifact
    from medscalpel.runs import RunDir

    t, ds = _open(teacher, data, split)
    s, ds_s = _open(student, data, split)
    images, idx = collect_images(ds, n, seed=seed)
    s_images = collect_images(ds_s, indices=idx)[0]
    with RunDir(out, command="explain compare", config={"teacher": str(teacher),
                                                        "student": str(student), "data": data,
                                                        "method": method},
                seed=seed, overwrite=overwrite) as run:
        res = compare_saliency(t, s, images, list(range(t.num_classes)), method=method,
                               student_images=s_images, ids=[ds.ids[i] for i in idx])
        write_artifact(run.path, "comparison", res)
    console.print(f"saliency comparison ({method}) of {len(idx)} images -> {out}")


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
    import medscalpel.pipeline.stages  # noqa: F401  (registers the stages)
    from medscalpel.data.spec import open_dataset
    from medscalpel.layout import artifact
    from medscalpel.models import load_model
    from medscalpel.pipeline.stage import run_command
    from medscalpel.pipeline.stages.explain import PolaritySettings

    m = load_model(model)
    _require_match(m, model, open_dataset(data, split=split, preprocess=m.card.preprocess),
                   data)
    settings = PolaritySettings(model=str(model), data=data, split=split, quantile=quantile,
                                n_null=n_null,
                                compare_with=tuple(str(p) for p in compare_with or ()))
    run_command("polarity", out, settings, command="audit polarity",
                config={"model": str(model), "data": data, "quantile": quantile}, seed=seed,
                overwrite=overwrite)
    console.print(f"polarity analysis -> {artifact('polarity').dir_in(out)}")
