"""``medscalpel compress lossless``: fold dead / constant / dependent channels (provably by
default, ``--mode empirical`` from calibration images), or with ``--tolerance`` reconstruct to a
target parameter reduction, or with ``--sparsify-ratio`` sparsify by training and then fold the
zeroed channels provably; save the smaller model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli import deprecations
from medscalpel.cli.common import N_BOOT, one_of
from medscalpel.errors import ConfigError


def _images(ds, n: int, seed: int):
    """``n`` images of ``ds`` (a seeded choice, sorted): (tensor, labels, indices)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    idx = sorted(rng.permutation(len(ds))[:n].tolist()) if n < len(ds) else list(range(len(ds)))
    x = torch.stack([ds.image(i) for i in idx])
    labels = ds.labels[idx]
    return x, labels, idx


def lossless(
    model_arg: Optional[Path] = typer.Argument(None, hidden=True, metavar="MODEL"),
    data_arg: Optional[str] = typer.Argument(None, hidden=True, metavar="DATA"),
    model_dir: Optional[Path] = typer.Option(None, "--model", help="Model directory to "
                                             "compress."),
    data_spec: Optional[str] = typer.Option(None, "--data", help="Dataset spec, e.g. "
                                            "'phantom:/runs/ph' or 'folder:/data/kermany'."),
    out: Path = typer.Option(..., "--out", "-o", help="run directory to create"),
    mode: str = typer.Option("provable", help="provable: data-free analysis of the weights, "
                                              "exact for every input (default); empirical: "
                                              "channels found on calibration images, verified "
                                              "on held-out images only"),
    calib_images: int = typer.Option(512, "--n-calib", help="calibration images (empirical "
                                     "mode decides on them)"),
    heldout_images: int = typer.Option(1024, "--n-images", help="held-out images "
                                       "(verification only; the whole split when it is "
                                       "smaller)"),
    calib_old: Optional[int] = typer.Option(None, "--calib-images", hidden=True),
    heldout_old: Optional[int] = typer.Option(None, "--heldout-images", hidden=True),
    random_inputs: int = typer.Option(64, help="random wide-range inputs also verified on"),
    tolerance: Optional[float] = typer.Option(
        None, help="lossy mode: target fraction of parameters to remove by LASSO channel "
                   "selection + least-squares refit (He et al. 2017); reports the achieved "
                   "max |delta logit| and delta macro AUROC"),
    sparsify_ratio: Optional[float] = typer.Option(
        None, help="lossy then exact: train with proximal group sparsity on BatchNorm scales "
                   "until channels carrying this fraction of the parameters are exactly zero, "
                   "then fold them away provably (reports dense vs sparsified vs folded)"),
    sparsify_epochs: int = typer.Option(3, help="training epochs of --sparsify-ratio"),
    sparsify_lr: float = typer.Option(1e-3, help="learning rate of --sparsify-ratio"),
    sparsify_lam: float = typer.Option(1e-4, help="group-lasso strength of --sparsify-ratio"),
    atol: float = typer.Option(1e-5, help="allowed max |delta logit| on held-out images"),
    rank_rtol: float = typer.Option(1e-5, help="empirical mode: relative residual below which a "
                                               "channel is linearly dependent"),
    weight_rtol: float = typer.Option(1e-6, help="provable mode: relative tolerance of the "
                                                 "filter proportionality test (0: exact)"),
    dependent: bool = typer.Option(True, help="also fold linearly dependent channels"),
    calib_split: str = typer.Option("train", help="split the calibration (and sparsification "
                                                  "training) images come from"),
    heldout_split: str = typer.Option("val", help="split the held-out images come from"),
    batch_size: int = typer.Option(64, help="batch size"),
    latency: bool = typer.Option(True, help="measure CPU latency before/after"),
    n_boot: int = typer.Option(N_BOOT, help="bootstrap replicates of the paired accuracy delta "
                                            "on the held-out images (default 1000 in every "
                                            "command; 0: no CIs)"),
    seed: int = typer.Option(0, help="seed of the image sampling"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
) -> None:
    """Compress a model without changing its outputs (or with a reported tolerance)."""
    from medscalpel.compress.contract import compress
    from medscalpel.runs import RunDir

    model_dir = one_of(model_dir, model_arg, "--model", "MODEL", "the model directory",
                       command="compress lossless")
    data_spec = one_of(data_spec, data_arg, "--data", "DATA", "the dataset spec",
                       command="compress lossless")
    calib_images = deprecations.renamed(calib_images, calib_old, "--calib-images",
                                        "compress lossless")
    heldout_images = deprecations.renamed(heldout_images, heldout_old, "--heldout-images",
                                          "compress lossless")
    method, kw = _method_settings(
        mode, tolerance, sparsify_ratio, {"ratio": sparsify_ratio, "epochs": sparsify_epochs,
                                          "lr": sparsify_lr, "lam": sparsify_lam, "atol": atol,
                                          "batch_size": batch_size, "seed": seed},
        {"atol": atol, "rank_rtol": rank_rtol, "dependent": dependent, "batch_size": batch_size,
         "weight_rtol": weight_rtol, "random_inputs": random_inputs, "seed": seed})
    model, cal_ds, held_ds, inputs = _load(model_dir, data_spec, calib_split, heldout_split,
                                           calib_images, heldout_images, seed, n_boot)
    config = {"model_dir": str(model_dir), "data": data_spec, "method": method, "mode": mode,
              "calib_images": len(inputs.calib), "heldout_images": len(inputs.heldout), **kw,
              "calib_split": calib_split, "heldout_split": heldout_split, "n_boot": n_boot}
    data = {"spec": data_spec, "calib_hash": cal_ds.content_hash(),
            "heldout_hash": held_ds.content_hash()}
    with RunDir(out, command="compress lossless", config=config, seed=seed, data=data,
                overwrite=overwrite) as run:
        result = compress(method, model, inputs, n_boot=n_boot, latency=latency, **kw)
        result.verification["split"] = heldout_split
        result.save(run.path)
    typer.echo(_summary(result, out))


def _load(model_dir: Path, data_spec: str, calib_split: str, heldout_split: str,
          calib_images: int, heldout_images: int, seed: int, n_boot: int):
    """The model, its calibration and held-out splits, and the compressor's inputs drawn from
    them (seeded image choices): ``(model, calib_dataset, heldout_dataset, inputs)``."""
    from medscalpel.compress.contract import CompressionInputs
    from medscalpel.data import open_dataset
    from medscalpel.models.checkpoint import load_model

    model = load_model(model_dir)
    pre = model.card.preprocess
    cal_ds = open_dataset(data_spec, split=calib_split, preprocess=pre).require_nonempty()
    held_ds = open_dataset(data_spec, split=heldout_split, preprocess=pre).require_nonempty()
    calib, _, _ = _images(cal_ds, calib_images, seed)
    held, held_labels, held_idx = _images(held_ds, heldout_images, seed + 1)
    held_sub = held_ds.subset(held_idx)
    inputs = CompressionInputs(calib=calib, heldout=held, heldout_labels=held_labels,
                               train=cal_ds, val=held_sub,
                               evaluate=held_sub if n_boot >= 0 else None)
    return model, cal_ds, held_ds, inputs


def _method_settings(mode: str, tolerance: Optional[float], sparsify_ratio: Optional[float],
                     sparsify: dict, exact: dict) -> tuple[str, dict]:
    """The registered compressor the flags select and its settings: ``sparsify-fold`` (with
    ``sparsify``), ``tolerance``, else ``lossless`` / ``lossless-empirical`` (with ``exact``);
    both lossy flags at once are refused."""
    if tolerance is not None and sparsify_ratio is not None:
        raise ConfigError("Use either --tolerance or --sparsify-ratio, not both.")
    if sparsify_ratio is not None:
        return "sparsify-fold", sparsify
    if tolerance is not None:
        return "tolerance", {"ratio": tolerance, "batch_size": sparsify["batch_size"],
                             "seed": sparsify["seed"]}
    return ("lossless" if mode == "provable" else "lossless-empirical"), exact


def _summary(res, out: Path) -> str:
    """One line: parameters, what was verified, the paired accuracy delta, where it went."""
    from medscalpel.layout import artifact

    v, rep = res.verification, res.report
    s = (f"{res.method}: {res.params_before} -> {res.params_after} parameters "
         f"({100 * res.param_reduction:.2f}% removed)")
    if res.method == "sparsify-fold":
        s += (f"; fold exact to max |delta logit| {v['max_abs_logit_delta']:.3g} (sparsified vs "
              f"folded); vs dense {v['max_abs_logit_delta_vs_dense']:.3g}")
    else:
        s += f", max |delta logit| on held-out images {v['max_abs_logit_delta']:.3g}"
    if res.method == "tolerance":
        s += (f"; {rep.refits - rep.refits_plain_removal} of {rep.refits} consumer refits beat "
              "plain removal on held-out calibration images")
    if v.get("random_relative_delta") is not None:
        s += (f"; random inputs: max |delta logit| {v['max_abs_logit_delta_random']:.3g} = "
              f"{v['random_relative_delta']:.3g} x their logit scale " +
              (f"(relative tolerance {v['random_rtol']:g})" if v.get("random_rtol") is not None
               else "(reported, not gated: empirical mode)"))
    if res.comparison is not None:
        s += f"; {res.comparison.summary()}"
    return s + f"; saved to {artifact('model').dir_in(out)}"
