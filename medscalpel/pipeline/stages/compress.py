"""Compression stages: the compression table (every registered compressor the run asks for,
each row measured against the dense model), deployment on every installed CPU runtime, and
the unstructured sparsity sweep."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from medscalpel.compress.contract import CompressionInputs, CompressionTable, compress
from medscalpel.deploy.flow import DEMO_EXPORTER_REASON, quick_deploy
from medscalpel.deploy.export import export_onnx, preferred_exporter
from medscalpel.compress.measure import (count_macs, count_parameters, latency_pair,
                                         max_abs_logit_delta)
from medscalpel.compress.structured import RecoveryConfig
from medscalpel.compress.sweep import run_sweep
from medscalpel.data.spec import open_dataset
from medscalpel.engine.compare import compare_predictions
from medscalpel.errors import VerificationError
from medscalpel.layout import write_artifact
from medscalpel.models import load_model
from medscalpel.pipeline.stage import Stage, StageContext, register_stage
from medscalpel.runs import write_json


def _row(name: str, model, dense, test_images: torch.Tensor, comparison,
         model_dir: Path | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of the compression table, every number measured in this run; the accuracy
    delta is the PAIRED one (same test images) from the contract's comparison."""
    example = test_images[:1]
    lat = latency_pair(dense, model, example, batch_size=1, repeats=10, rounds=3)
    params = count_parameters(model)
    m = comparison.macro
    return {
        "method": name,
        "params": params,
        "params_ratio": params / count_parameters(dense),
        "macs": count_macs(model, example),
        "latency_ms": lat["b_ms"],
        "dense_latency_ms": lat["a_ms"],
        "speedup": lat["ratio"],
        "latency_spread": lat["spread"],  # of the per-round ratios; noisy above 20%
        "latency_noisy": lat["noisy"],
        "macro_auroc": m["auroc_new"],
        "macro_auroc_ci": [float(v) for v in m["auroc_new_ci"]],  # same paired replicates
        "delta_macro_auroc": m["delta_auroc"],
        "delta_macro_auroc_ci": list(m["delta_auroc_ci"]),
        "max_abs_delta_logit": max_abs_logit_delta(dense, model, test_images),
        "model_dir": str(model_dir) if model_dir else None,
        **(extra or {}),
    }


@dataclass(frozen=True)
class CompressSettings:
    batch_size: int = 64
    prune_criteria: tuple[str, ...] = ("l1", "lrp")
    prune_speedup: float = 2.0
    recovery_epochs: int = 1
    calib_images: int = 128
    heldout_images: int = 128
    sparsify_ratio: float = 0.5
    sparsify_epochs: int = 2
    n_boot: int = 200
    ofa_budget_ms: float = 0.0  # > 0: add a once-for-all subnet within this latency budget


def compress_plan(s: CompressSettings, progress: bool | None
                  ) -> list[tuple[str, str, dict[str, Any]]]:
    """(row name, registered compressor, settings) of the compression table, in order."""
    # latency is measured once per row, alternated with the dense model (see _row)
    plan: list[tuple[str, str, dict[str, Any]]] = [("lossless", "lossless", {"latency": False})]
    if s.sparsify_epochs:
        plan.append(("sparsify+fold", "sparsify-fold",
                     {"ratio": s.sparsify_ratio, "epochs": s.sparsify_epochs,
                      "batch_size": s.batch_size, "progress": progress, "latency": False}))
    for crit in s.prune_criteria:
        plan.append((f"structured-{crit}", "prune", {
            "criterion": crit, "target_speedup": s.prune_speedup,
            "recovery": RecoveryConfig(epochs=s.recovery_epochs, batch_size=s.batch_size),
            "progress": progress, "measure_latency": False}))
    if s.ofa_budget_ms > 0:
        plan.append(("ofa", "ofa", {"latency_budget_ms": s.ofa_budget_ms,
                                    "progress": progress}))
    return plan


@register_stage
class CompressStage(Stage):
    """Run the planned compressors on the current model; one measured row each, and the ONNX
    export of the most accurate structured model."""

    name = "compress"
    reads = ("calibrated_card", "predictions:split=test")
    writes = ("compress",)
    may_write = ("export",)
    Settings = CompressSettings

    def run(self, ctx: StageContext, s: CompressSettings) -> dict[str, Any]:
        d = ctx.out / "compress"
        dense = ctx.model
        test_images = ctx.images("test", s.heldout_images, seed=ctx.seed + 1)
        calib, calib_labels = ctx.labelled_images("train", s.calib_images, seed=ctx.seed)
        inputs = CompressionInputs(
            calib=calib, calib_labels=calib_labels,
            heldout=ctx.images("val", s.heldout_images, seed=ctx.seed), train=ctx.ds("train"),
            val=ctx.ds("val"), evaluate=ctx.ds("test"))
        rows: list[dict[str, Any]] = []
        self_cmp = compare_predictions(ctx.preds["test"], ctx.preds["test"], n_boot=s.n_boot,
                                       seed=ctx.seed)
        dense_row = _row("dense", dense, dense, test_images, self_cmp,
                         ctx.dir_of("calibrated_card"))
        for name, method, settings in compress_plan(s, ctx.progress):
            inputs_m = (replace(inputs, train=None, val=None)
                        if method == "prune" and not s.recovery_epochs else inputs)
            rdir = d / name.replace("+", "_").replace("-", "_")
            try:
                res = compress(method, dense, inputs_m, n_boot=s.n_boot, **settings)
            except VerificationError as exc:  # a fold refuses rather than save a wrong model
                write_json(rdir / "report.json", {"refused": str(exc)})
                rows.append({"method": name, "refused": str(exc)})
                continue
            res.save(rdir)
            extra = {"compressor": method, "macs_speedup": res.speedup_macs,
                     "verification": {k: v for k, v in res.verification.items()
                                      if isinstance(v, (int, float, str, bool)) or v is None}}
            if method == "prune":
                extra.update(criterion=settings["criterion"], channel_ratio=res.report.ratio)
            rows.append(_row(name, res.model, dense, test_images, res.comparison,
                             rdir / "model", extra))
        _export_best(ctx, rows, dense, test_images)
        table = CompressionTable(dense_row, tuple(rows), {
            "split": "test", "n": len(ctx.ds("test")), "n_boot": s.n_boot,
            "accuracy_delta": "paired bootstrap on the same test images"})
        write_artifact(ctx.out, "compress", table)
        ctx.compress_rows = rows
        return {"rows": [{k: r.get(k) for k in ("method", "params_ratio", "speedup",
                                                "delta_macro_auroc", "max_abs_delta_logit")}
                         for r in rows]}


def _export_best(ctx: StageContext, rows: list[dict[str, Any]], dense,
                 test_images: torch.Tensor) -> None:
    """ONNX of the most accurate structured model: parity and latency vs the dense model."""
    best = best_structured_row(rows)
    if best is not None:
        # batch 1 only, few repeats: the deploy stage is the runtime comparison
        d = ctx.dir_of("export")
        with preferred_exporter("torchscript", DEMO_EXPORTER_REASON):
            ex = export_onnx(load_model(best["model_dir"]), d / "model.onnx", reference=dense,
                             real_images=test_images[:8], batch_sizes=(1,), repeats=5)
        write_artifact(ctx.out, "export", ex.to_dict())


def best_structured_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The most accurate structured model of a compression table."""
    return max((r for r in rows if r.get("method", "").startswith("structured")
                and not r.get("refused")), key=lambda r: r["macro_auroc"], default=None)


def best_compressed(ctx: StageContext) -> tuple[str, Any] | None:
    """(name, model) of the most accurate structured model of this run's compression table."""
    best = best_structured_row(ctx.compress_rows)  # loaded from compress.json when needed
    return None if best is None else (best["method"], load_model(best["model_dir"]))


@dataclass(frozen=True)
class DeploySettings:
    pass


@register_stage
class DeployStage(Stage):
    """The best structured model on every installed CPU runtime (budgeted: batch 1, few
    rounds); parity, paired accuracy delta, recommendation."""

    name = "deploy"
    reads = ("compress",)
    writes = ("deploy",)
    Settings = DeploySettings

    def run(self, ctx: StageContext, s: DeploySettings) -> dict[str, Any]:
        best = best_compressed(ctx)
        if best is None:
            return {"status": "skipped", "reason": "no structured model in the compression table"}
        # overwrite: a resumed run replaces what its own interrupted attempt left there
        res = quick_deploy(best[1], ctx.ds("test"), ctx.dir_of("deploy"),
                           calib_data=ctx.ds("train"), progress=ctx.progress, overwrite=True)
        return {"model": best[0], "recommendation": res.to_dict().get("recommendation")}


@dataclass(frozen=True)
class SweepSettings:
    sweep_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.65, 0.8, 0.9, 0.95)
    sweep_seeds: tuple[int, ...] = (0,)


@register_stage
class SweepStage(Stage):
    """Global L1 and random unstructured sparsity sweep of the current model (a grid)."""

    name = "sweep"
    reads = ("calibrated_card",)
    writes = ("sweep_index",)
    Settings = SweepSettings

    def run(self, ctx: StageContext, s: SweepSettings) -> dict[str, Any]:
        res = run_sweep(ctx.model, ctx.ds("test"), ctx.dir_of("sweep_index"),
                        ratios=s.sweep_ratios, methods=("l1", "random"), seeds=s.sweep_seeds,
                        progress=ctx.progress)
        return {"cells": len(res.cells), "computed": res.n_computed}


@dataclass(frozen=True)
class ExportSettings:
    model: str
    reference: str | None = None  # dense model timed in the same run
    data: str | None = None  # real-image parity, int8 calibration, delta AUROC
    split: str = "test"
    quantize: str | None = None  # dynamic or static int8
    batch_sizes: tuple[int, ...] = (1, 32)
    opset: int = 18
    repeats: int = 10


@register_stage
class ExportStage(Stage):
    """ONNX export of one model with ONNX Runtime parity, CPU latency against a reference
    measured in the same run, and optional int8 with its delta macro AUROC (``compress
    export``)."""

    name = "export_onnx"
    writes = ("onnx_export",)
    Settings = ExportSettings

    def run(self, ctx: StageContext, s: ExportSettings) -> dict[str, Any]:
        m = load_model(s.model)
        ref = load_model(s.reference) if s.reference is not None else None
        ds = (open_dataset(s.data, split=s.split,
                           preprocess=m.card.preprocess if m.card is not None else None)
              if s.data else None)
        onnx = ctx.dir_of("onnx_export") / "model.onnx"
        res = export_onnx(m, onnx, batch_sizes=list(s.batch_sizes), opset=s.opset,
                          reference=ref, dataset=ds, quantize=s.quantize, repeats=s.repeats)
        final = ctx.final_dir_of("onnx_export")  # where the files are once the run finished
        res.onnx_path = str(final / onnx.name)
        if res.quantization:
            res.quantization["path"] = str(final / Path(res.quantization["path"]).name)
        write_artifact(ctx.out, "onnx_export", res)
        ctx.results[self.name] = res
        return {"onnx_path": res.onnx_path, "quantized": bool(res.quantization)}
