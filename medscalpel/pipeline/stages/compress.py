"""Compression stages: the compression table (every registered compressor the run asks for,
each row measured against the dense model), deployment on every installed CPU runtime (the
demo's budgeted one, or ``compress deploy``), the unstructured sparsity sweep (the demo's, or
``compress sweep``'s grid that is its own run directory), the hardware-aware student choice
(``compress students``) and the ONNX export of one model (``compress export``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from medscalpel.compress.contract import CompressionInputs, CompressionTable, compress
from medscalpel.deploy.flow import DEMO_EXPORTER_REASON, deploy, quick_deploy
from medscalpel.deploy.export import export_onnx, preferred_exporter
from medscalpel.compress.measure import (count_macs, count_parameters, latency_pair,
                                         max_abs_logit_delta)
from medscalpel.compress.structured import RecoveryConfig
from medscalpel.compress.student_search import choose_student
from medscalpel.compress.sweep import run_sweep
from medscalpel.data.spec import open_dataset
from medscalpel.data.transforms import Preprocess
from medscalpel.engine.compare import compare_predictions
from medscalpel.errors import VerificationError
from medscalpel.layout import write_artifact
from medscalpel.models import load_model
from medscalpel.models.checkpoint import CARD, ModelCard
from medscalpel.pipeline.stage import Stage, StageContext, register_stage
from medscalpel.runs import read_json, write_json


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
    """Settings of the 'deploy' stage. Without ``model`` (the demo): the best structured model
    of the run's compression table, deployed by the budgeted :func:`quick_deploy`, and the
    other fields are not used; with ``model`` (``compress deploy``): that model, every field
    passed to :func:`~medscalpel.deploy.flow.deploy`."""

    model: str | None = None  # model directory; default: the run's best structured model
    data: str | None = None  # dataset spec; default: the run's dataset
    split: str = "test"  # parity and paired delta AUROC; int8 calibration from 'train'
    external: str | None = None  # a second site's spec: all of its images
    runtimes: tuple[str, ...] | None = None  # default: every available one
    precisions: tuple[str, ...] | None = None
    batches: tuple[int, ...] = (1, 8)
    rounds: int = 5
    repeats: int = 5
    floor_macro: float = -0.005
    floor_class: float = -0.01
    eval_images: int = 256  # deploy()'s n_images (a profile's n_images is the phantom's size)
    n_calib: int = 64
    threads: int | None = None
    bootstrap: int = 1000  # deploy()'s n_boot (the demo's quick deploy uses its own 200)
    accept_unscorable: bool = False
    min_positives: int = 10
    explain: bool = True
    require_guarantee: bool = False


@register_stage
class DeployStage(Stage):
    """The best structured model on every installed CPU runtime (budgeted: batch 1, few
    rounds), or a given model on every runtime x precision (``compress deploy``); parity,
    paired accuracy delta, recommendation, and the served artifact in deploy/serve/."""

    name = "deploy"
    may_read = ("compress",)
    writes = ("deploy",)
    Settings = DeploySettings

    def run(self, ctx: StageContext, s: DeploySettings) -> dict[str, Any]:
        if s.model is not None:
            return self._deploy_model(ctx, s)
        best = best_compressed(ctx)
        if best is None:
            return {"status": "skipped", "reason": "no structured model in the compression table"}
        # overwrite: a resumed run replaces what its own interrupted attempt left there
        res = quick_deploy(best[1], ctx.ds("test"), ctx.dir_of("deploy"),
                           calib_data=ctx.ds("train"), progress=ctx.progress, overwrite=True)
        ctx.results[self.name] = res
        return {"model": best[0], "recommendation": res.to_dict().get("recommendation")}

    def _deploy_model(self, ctx: StageContext, s: DeploySettings) -> dict[str, Any]:
        """``compress deploy``: the given model, written into this run's deploy/ folder (the
        run's one manifest records it: the summary holds what deploy() would have put in a
        manifest of its own)."""
        m = load_model(s.model)
        pre = m.card.preprocess if m.card is not None else None
        spec = s.data or ctx.data_spec()
        ds = open_dataset(spec, split=s.split, preprocess=pre)
        calib = open_dataset(spec, split="train", preprocess=pre) if s.split != "train" else None
        # the whole external site, as 'evaluate --external' uses it (none of it was seen)
        ext = (open_dataset(s.external, split="all", preprocess=pre) if s.external is not None
               else None)
        res = deploy(m, ds, ctx.dir_of("deploy"), calib_data=calib,
                     runtimes=list(s.runtimes) if s.runtimes else None,
                     precisions=list(s.precisions) if s.precisions else None,
                     batches=list(s.batches), rounds=s.rounds, repeats=s.repeats,
                     n_images=s.eval_images, n_calib=s.n_calib, floor_macro=s.floor_macro,
                     floor_class=s.floor_class, threads=s.threads, n_boot=s.bootstrap,
                     seed=ctx.seed, explain=s.explain, external_data=ext,
                     accept_unscorable=s.accept_unscorable, min_positives=s.min_positives,
                     require_guarantee=s.require_guarantee, progress=ctx.progress,
                     manifest=False)
        ctx.results[self.name] = res
        return {"model": s.model, "recommended": res.recommended,
                # the run's data and the deploy configuration (manifest data / config)
                "eval": ds.content_hash(), "calib": (calib or ds).content_hash(),
                "variants": [v.name for v in res.variants], "batches": list(res.batches),
                "rounds": res.rounds, "repeats": res.repeats, "threads": res.threads,
                "floor_macro": res.floor["macro"], "floor_class": res.floor["per_class"]}


@dataclass(frozen=True)
class SweepSettings:
    """Settings of the sparsity sweep. Without ``models`` (the demo): the run's current model
    on the run's dataset; with them (``compress sweep``): those model directories on
    ``data``, preprocessed as the first model's card says."""

    sweep_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.65, 0.8, 0.9, 0.95)
    sweep_seeds: tuple[int, ...] = (0,)
    sweep_methods: tuple[str, ...] = ("l1", "random")
    models: tuple[str, ...] = ()  # model directories; empty: the run's current model
    data: str | None = None  # evaluation data spec; default: the run's dataset
    split: str = "test"
    finetune_epochs: int = 0  # > 0: fine-tune each pruned model on data's train split
    finetune_lr: float = 1e-4
    sweep_batch_size: int = 64  # prediction batch size


@register_stage
class SweepStage(Stage):
    """Global L1 and random unstructured sparsity sweep of the current model (a grid)."""

    name = "sweep"
    reads = ("calibrated_card",)
    writes = ("sweep_index",)
    Settings = SweepSettings
    #: the artifact that is the grid's index: its folder is the grid directory
    grid: str = "sweep_index"

    def run(self, ctx: StageContext, s: SweepSettings) -> dict[str, Any]:
        if s.models:
            first = load_model(s.models[0])
            pre = first.card.preprocess if first.card is not None else None
            spec = s.data or ctx.data_spec()
            ds = open_dataset(spec, split=s.split, preprocess=pre)
            train = (open_dataset(spec, split="train", preprocess=pre) if s.finetune_epochs
                     else None)
            models: Any = list(s.models)
        else:
            ds, models = ctx.ds(s.split), ctx.model
            train = ctx.ds("train") if s.finetune_epochs else None
        res = run_sweep(models, ds, ctx.dir_of(self.grid), ratios=s.sweep_ratios,
                        methods=s.sweep_methods, seeds=s.sweep_seeds,
                        finetune_epochs=s.finetune_epochs, train_ds=train,
                        finetune_lr=s.finetune_lr, batch_size=s.sweep_batch_size,
                        progress=ctx.progress)
        ctx.results[self.name] = res
        return {"cells": len(res.cells), "computed": res.n_computed}


@register_stage
class SweepGridStage(SweepStage):
    """A sparsity sweep of given models that is its own run directory (``compress sweep``):
    the grid at the top of ``--out``, built and resumed in place by the cell engine (run it
    with :func:`~medscalpel.pipeline.stage.run_stage` on a context at ``--out``, not inside a
    second run directory)."""

    name = "sweep_grid"
    reads = ()
    writes = ("sweep_grid",)
    grid = "sweep_grid"


def teacher_preprocess(model_dir: str, size: int = 64, channels: int = 1) -> Preprocess:
    """The input contract of a teacher model directory (its card's, augmentation off), else
    ``size`` / ``channels`` (a teacher given by zoo name is trained on the data first)."""
    card = Path(model_dir) / CARD
    if card.is_file():
        return ModelCard.from_dict(read_json(card), source=str(card)).preprocess.with_augment(None)
    return Preprocess(size=size, channels=channels)


@dataclass(frozen=True)
class StudentsSettings:
    teacher: str  # trained teacher model directory
    data: str  # proxy training on its train split, scoring on its val split
    candidates: tuple[str, ...]  # zoo architectures and/or model directories
    latency_budget_ms: float
    proxy_epochs: int = 1
    proxy_steps: int = 20
    soft_weight: float = 0.5
    temperature: float = 4.0
    lr: float = 1e-3
    batch_size: int = 32


@register_stage
class StudentsStage(Stage):
    """Hardware-aware student choice: each candidate's CPU latency measured here, those within
    the budget proxy-distilled from the teacher, the most accurate chosen (``compress
    students``)."""

    name = "students"
    writes = ("students",)
    Settings = StudentsSettings

    def run(self, ctx: StageContext, s: StudentsSettings) -> dict[str, Any]:
        pre = teacher_preprocess(s.teacher)
        train_ds = open_dataset(s.data, split="train", preprocess=pre.with_augment(None))
        val_ds = open_dataset(s.data, split="val", preprocess=pre)
        res = choose_student(list(s.candidates), s.latency_budget_ms, (train_ds, val_ds),
                             s.teacher, proxy_epochs=s.proxy_epochs, proxy_steps=s.proxy_steps,
                             soft_weight=s.soft_weight, temperature=s.temperature, lr=s.lr,
                             batch_size=s.batch_size, seed=ctx.seed, progress=ctx.progress)
        write_artifact(ctx.out, "students", res)
        ctx.results[self.name] = res
        # the data hashes go into the manifest's data
        return {"chosen": res.chosen, "train": train_ds.content_hash(),
                "val": val_ds.content_hash()}


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
