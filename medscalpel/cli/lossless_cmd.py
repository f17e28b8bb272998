"""``medscalpel compress lossless``: fold dead / constant / dependent channels (provably by
default, ``--mode empirical`` from calibration images), or with ``--tolerance`` reconstruct to a
target parameter reduction, or with ``--sparsify-ratio`` sparsify by training and then fold the
zeroed channels provably; save the smaller model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer

from medscalpel.errors import ConfigError, MedScalpelError


def _images(ds, n: int, seed: int) -> tuple[torch.Tensor, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    idx = sorted(rng.permutation(len(ds))[:n].tolist()) if n < len(ds) else list(range(len(ds)))
    x = torch.stack([ds.image(i) for i in idx])
    labels = ds.labels[idx]
    return x, labels, idx


def lossless(
    model_dir: Path = typer.Argument(..., help="medscalpel model directory to compress"),
    data_spec: str = typer.Argument(..., help="dataset spec, e.g. 'phantom:/runs/ph' or "
                                              "'folder:/data/kermany'"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory to create"),
    mode: str = typer.Option("provable", help="provable: data-free analysis of the weights, "
                                              "exact for every input (default); empirical: "
                                              "channels found on calibration images, verified "
                                              "on held-out images only"),
    calib_images: int = typer.Option(512, help="calibration images (empirical mode decides on "
                                               "them)"),
    heldout_images: int = typer.Option(1024, help="held-out images (verification only; the "
                                                  "whole split when it is smaller)"),
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
    seed: int = typer.Option(0, help="seed of the image sampling"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
) -> None:
    """Compress a model without changing its outputs (or with a reported tolerance)."""
    from medscalpel.data import open_dataset
    from medscalpel.models.checkpoint import load_model, save_model
    from medscalpel.runs import RunDir, write_json

    try:
        if tolerance is not None and sparsify_ratio is not None:
            raise ConfigError("Use either --tolerance or --sparsify-ratio, not both.")
        model = load_model(model_dir)
        card = model.card
        pre = card.preprocess
        cal_ds = open_dataset(data_spec, split=calib_split, preprocess=pre).require_nonempty()
        held_ds = open_dataset(data_spec, split=heldout_split, preprocess=pre).require_nonempty()
        calib, _, _ = _images(cal_ds, calib_images, seed)
        held, held_labels, held_idx = _images(held_ds, heldout_images, seed + 1)
        config = {"model_dir": str(model_dir), "data": data_spec, "mode": mode,
                  "calib_images": len(calib), "heldout_images": len(held),
                  "random_inputs": random_inputs, "tolerance": tolerance,
                  "sparsify_ratio": sparsify_ratio, "sparsify_epochs": sparsify_epochs,
                  "sparsify_lr": sparsify_lr, "sparsify_lam": sparsify_lam, "atol": atol,
                  "rank_rtol": rank_rtol, "weight_rtol": weight_rtol, "dependent": dependent,
                  "calib_split": calib_split, "heldout_split": heldout_split, "seed": seed}
        data = {"spec": data_spec, "calib_hash": cal_ds.content_hash(),
                "heldout_hash": held_ds.content_hash()}
        with RunDir(out, command="compress lossless", config=config, seed=seed, data=data,
                    overwrite=overwrite) as run:
            if sparsify_ratio is not None:
                from medscalpel.compress.sparsify import sparsify_and_fold

                result = sparsify_and_fold(model, cal_ds, held_ds.subset(held_idx), held,
                                           sparsify_ratio, sparsify_epochs, atol=atol,
                                           latency=latency, lr=sparsify_lr, lam=sparsify_lam,
                                           batch_size=batch_size, seed=seed)
                rep = result.report.lossless
                srep = result.report
                verification = {"max_abs_logit_delta": srep.max_abs_logit_delta_fold,
                                "max_abs_logit_delta_vs_dense":
                                    srep.max_abs_logit_delta_vs_dense,
                                "metrics_dense": srep.metrics_dense,
                                "metrics_folded": srep.metrics_folded,
                                "heldout_images": rep.n_heldout, "split": heldout_split,
                                "guarantee": "lossy sparsification (trained), then a provable "
                                             "fold of the zeroed channels"}
                method = "sparsify-fold"
                settings = {"target_ratio": sparsify_ratio, "epochs": sparsify_epochs,
                            "lr": sparsify_lr, "lam": sparsify_lam,
                            "params_removed_pct": srep.params_removed_pct}
            elif tolerance is None:
                from medscalpel.compress.lossless import fold_lossless

                result = fold_lossless(model, calib, held, atol=atol, rank_rtol=rank_rtol,
                                       dependent=dependent, batch_size=batch_size,
                                       latency=latency, mode=mode, weight_rtol=weight_rtol,
                                       random_inputs=random_inputs, seed=seed)
                rep = result.report
                verification = {"max_abs_logit_delta": rep.max_abs_logit_delta, "atol": atol,
                                "max_abs_logit_delta_random": rep.max_abs_logit_delta_random,
                                "heldout_images": rep.n_heldout,
                                "random_inputs": rep.n_random, "split": heldout_split,
                                "guarantee": rep.guarantee}
                method = "lossless" if mode == "provable" else "lossless-empirical"
                settings = {"mode": mode, "rank_rtol": rank_rtol, "weight_rtol": weight_rtol,
                            "dependent": dependent, "calib_images": rep.n_calib,
                            "channels": rep.channels,
                            "params_removed_pct": rep.params_removed_pct}
            else:
                from medscalpel.compress.reconstruct import compress_with_tolerance

                result = compress_with_tolerance(model, calib, held, tolerance,
                                                 heldout_labels=held_labels,
                                                 batch_size=batch_size, latency=latency,
                                                 seed=seed)
                rep = result.report
                verification = {"max_abs_logit_delta": rep.max_abs_logit_delta,
                                "delta_macro_auroc": rep.delta_macro_auroc,
                                "heldout_images": rep.n_heldout, "split": heldout_split}
                method = "lossless-tolerance"
                settings = {"target_ratio": tolerance, "achieved_ratio": rep.achieved_ratio,
                            "keep_fraction": rep.keep_fraction,
                            "params_removed_pct": rep.params_removed_pct,
                            "refits": rep.refits,
                            "refits_plain_removal": rep.refits_plain_removal}
            new_card = card.with_lineage(method, parent=card.model_id, **settings,
                                         verification=verification)
            save_model(result.model, run.path / "model", new_card)
            write_json(run.path / "report.json", result.to_dict())
    except MedScalpelError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    if sparsify_ratio is not None:
        srep = result.report
        typer.echo(f"{method}: {srep.params_dense} -> {srep.params_folded} parameters "
                   f"({srep.params_removed_pct:.2f}% removed); fold exact to max |delta logit| "
                   f"{srep.max_abs_logit_delta_fold:.3g} (sparsified vs folded); vs dense "
                   f"{srep.max_abs_logit_delta_vs_dense:.3g}; saved to {out / 'model'}")
        return
    extra = ""
    if tolerance is not None:
        extra = (f"; {rep.refits - rep.refits_plain_removal} of {rep.refits} consumer refits "
                 "beat plain removal on held-out calibration images")
        if rep.delta_macro_auroc is not None:
            extra += f"; delta macro AUROC {rep.delta_macro_auroc:+.4f}"
    rand = getattr(rep, "random_relative_delta", None)
    if rand is not None:
        extra += (f"; random inputs: max |delta logit| {rep.max_abs_logit_delta_random:.3g} = "
                  f"{rand:.3g} x their logit scale {rep.random_logit_scale:.3g} " +
                  (f"(relative tolerance {rep.random_rtol:g})" if rep.random_rtol is not None
                   else "(reported, not gated: empirical mode)"))
    typer.echo(f"{method}: {rep.params_before} -> {rep.params_after} parameters "
               f"({rep.params_removed_pct:.2f}% removed), max |delta logit| on held-out images "
               f"{rep.max_abs_logit_delta:.3g}{extra}; saved to {out / 'model'}")
