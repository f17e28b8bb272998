"""Audit stages: the site shift (external validation, label-free shift check, k-shot
recalibration), forgettability and PIEs of the sparsity sweep, and what compression changed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.audit.changes import MEASURES, audit_changes
from medscalpel.audit.forgettability import audit_forgettability
from medscalpel.audit.pies import find_pies, pie_gallery, pie_ground_truth_tests
from medscalpel.data.spec import open_dataset
from medscalpel.deploy.served import load_served, runtime_model
from medscalpel.engine.api import model_provenance
from medscalpel.engine.predict import collect_images
from medscalpel.errors import DataError
from medscalpel.models import load_model
from medscalpel.pipeline.stage import Stage, StageContext, register_stage
from medscalpel.pipeline.stages.compress import best_compressed
from medscalpel.repair.shift_flow import run_site_shift, summary_lines


@dataclass(frozen=True)
class ShiftSettings:
    shift_k: int = 20  # labelled site-B images per class for the k-shot recalibration
    n_boot: int = 200


@register_stage
class ShiftStage(Stage):
    """Site shift with ground truth: validate on the phantom's scanner B, check the shift
    without labels, recalibrate with k labelled site-B images per class (measured on the
    rest)."""

    name = "shift"
    reads = ("calibrated_card",)
    writes = ("site_shift",)
    Settings = ShiftSettings

    def run(self, ctx: StageContext, s: ShiftSettings) -> dict[str, Any]:
        site_b = ctx.spec + ("&" if "?" in ctx.spec else "?") + "site=B"
        try:
            rep = run_site_shift(ctx.model, ctx.spec, site_b, k=s.shift_k, n_boot=s.n_boot,
                                 seed=ctx.seed, train_split="val",
                                 out_dir=ctx.dir_of("site_shift"))
        except DataError as exc:  # e.g. too few labelled site-B images per class (micro)
            return {"status": "skipped", "reason": str(exc)}
        return {"lines": summary_lines(rep), "verdict": rep.recalibration.verdict}


@dataclass(frozen=True)
class AuditSettings:
    sweep_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.65, 0.8, 0.9, 0.95)
    n_boot: int = 200


@dataclass(frozen=True)
class ForgettabilitySettings:
    sweep_dir: str | None = None  # default: this run's sweep (the 'sweep' stage)
    method: str | None = None
    train_data: str | None = None  # spec whose 'train' split gives prevalence; default: run's
    drop_threshold: float = 0.2
    n_boot: int = 200
    n_perm: int = 999


@register_stage
class ForgettabilityStage(Stage):
    """Forgettability curves per class over the sweep's levels, their first drop, correlation
    with prevalence, and FCD between classes (``audit forgettability``)."""

    name = "forgettability"
    may_read = ("sweep_index", "phantom_data")
    writes = ("forgettability",)
    Settings = ForgettabilitySettings

    def run(self, ctx: StageContext, s: ForgettabilitySettings) -> dict[str, Any]:
        sweep = s.sweep_dir or ctx.dir_of("sweep_index")
        train = (open_dataset(s.train_data, split="train") if s.train_data
                 else ctx.ds("train").labels if ctx.has_data() else None)
        fg = audit_forgettability(sweep, train_labels=train, method=s.method,
                                  drop_threshold=s.drop_threshold, n_boot=s.n_boot,
                                  n_perm=s.n_perm, seed=ctx.seed, progress=ctx.progress)
        fg.save(ctx.dir_of("forgettability"))
        ctx.results[self.name] = fg
        return {"method": fg.method, "seeds": len(fg.seeds)}


@dataclass(frozen=True)
class PiesSettings:
    sweep_dir: str | None = None  # default: this run's sweep (the 'sweep' stage)
    ratio: float = 0.9
    quantile: float = 0.05
    score: str = "auto"
    method: str | None = None
    gallery_data: str | None = None  # spec of the evaluated images; default: the run's
    gallery_split: str = "test"
    n_boot: int = 200


@register_stage
class PiesStage(Stage):
    """Pruning-identified exemplars at one sweep level, with the classes and finding counts
    over-represented among them, and their gallery (``audit pies``)."""

    name = "pies"
    may_read = ("sweep_index", "phantom_data")
    writes = ("pies",)
    Settings = PiesSettings

    def run(self, ctx: StageContext, s: PiesSettings) -> dict[str, Any]:
        sweep = s.sweep_dir or ctx.dir_of("sweep_index")
        pies = find_pies(sweep, ratio=s.ratio, quantile=s.quantile, score=s.score,
                         method=s.method, n_boot=s.n_boot, seed=ctx.seed)
        pdir = ctx.dir_of("pies")
        pies.save(pdir)
        images = (open_dataset(s.gallery_data, split=s.gallery_split) if s.gallery_data
                  else ctx.ds(s.gallery_split) if ctx.has_data() else None)
        if images is not None:
            pie_gallery(images, pies, pdir / "pie_gallery.png")
        ctx.results[self.name] = pies
        return {"pie_ratio": s.ratio, "n_pies": pies.to_dict().get("n_pies")}


@register_stage
class AuditStage(Stage):
    """Forgettability curves / FCD and pruning-identified exemplars of the L1 sweep (the
    'forgettability' and 'pies' stages), the PIEs tested against the phantom's per-image
    ground truth."""

    name = "audit"
    reads = ("sweep_index", "phantom_data")
    writes = ("forgettability", "pies")
    Settings = AuditSettings

    def run(self, ctx: StageContext, s: AuditSettings) -> dict[str, Any]:
        ForgettabilityStage().run(ctx, ForgettabilitySettings(method="l1", n_boot=s.n_boot))
        ratio = max(r for r in s.sweep_ratios if r <= 0.9)
        out = PiesStage().run(ctx, PiesSettings(ratio=ratio, method="l1", n_boot=s.n_boot))
        gtr = pie_ground_truth_tests(ctx.results["pies"], _ground_truth_table(ctx.phantom))
        gtr.save(ctx.dir_of("pies"))
        return {**out, "ground_truth": {k: v for k, v in gtr.to_dict().items()
                                        if isinstance(v, (int, float, str, bool))}}


def _ground_truth_table(phantom):
    """Per image: acquisition quality, whether a label was flipped, mean finding severity."""
    gt = phantom.gt.copy()
    sev = phantom.severity()
    clean = phantom.clean_labels()
    with np.errstate(invalid="ignore"):
        mean_sev = np.where(clean.sum(1) > 0,
                            (sev * clean).sum(1) / np.maximum(clean.sum(1), 1), np.nan)
    return gt[["id", "quality"]].assign(label_noise=gt["n_flipped"].to_numpy() > 0,
                                       severity=mean_sev)


@dataclass(frozen=True)
class ChangesSettings:
    """Settings of the 'changes' stage. Without ``dense`` (the demo): the run's model against
    the best structured model of its compression table, on the run's dataset; with ``dense``
    (``audit changes``): that model directory against each of ``compressed`` (model
    directories or served artifacts) and, per ``runtime``, the dense and torch models as that
    deploy runtime runs them, on ``data``."""

    dense: str | None = None  # reference model directory; default: the run's model
    compressed: tuple[str, ...] = ()  # model directories / served artifacts (with dense)
    runtime: tuple[str, ...] = ()  # deploy runtimes, e.g. 'openvino:int8' (with dense)
    data: str | None = None  # dataset spec (with dense); default: the run's dataset
    split: str = "test"
    measures: tuple[str, ...] = MEASURES
    changes_images: int = 200  # test images of the what-compression-changed audit
    changes_faithfulness: int = 32  # images of its deletion / insertion / ROAD measures
    n_boot: int = 200
    attributes: tuple[str, ...] = ()  # subgroup attributes; empty: all the data carries
    min_subgroup: int = 20
    corruptions: tuple[str, ...] = ()  # empty: every corruption
    severities: tuple[int, ...] = (2,)
    n_calib: int = 32  # calibration images of a runtime variant, from calib_split
    calib_split: str = "train"
    threads: int = 2  # threads of a runtime variant or served artifact


@register_stage
class ChangesStage(Stage):
    """What compression changed (calibration, explanations, subgroups, robustness): the best
    structured model against the dense one (the demo), or the given compressed models, served
    artifacts and runtime variants against a dense model directory (``audit changes``)."""

    name = "changes"
    may_read = ("compress", "calibrated_card", "phantom_data")
    writes = ("changes",)
    Settings = ChangesSettings

    def run(self, ctx: StageContext, s: ChangesSettings) -> dict[str, Any]:
        if s.dense is None:
            best = best_compressed(ctx)
            if best is None:
                return {"status": "skipped",
                        "reason": "no structured model in the compression table"}
            ref, models, ds = ctx.model, {best[0]: best[1]}, ctx.ds(s.split)
        else:
            ref, models, ds = compared_models(s)
        res = audit_changes(ref, models, ds, measures=s.measures, n_images=s.changes_images,
                            n_boot=s.n_boot, seed=ctx.seed,
                            attribute_names=list(s.attributes) or None,
                            min_subgroup=s.min_subgroup, n_faithfulness=s.changes_faithfulness,
                            corruptions=list(s.corruptions) or None, severities=s.severities,
                            progress=ctx.progress)
        res.save(ctx.dir_of("changes"))
        ctx.results[self.name] = res
        if s.dense is None:
            return {"model": next(iter(models)), "pairs": len(res.pairs)}
        return {"models": list(models), "pairs": len(res.pairs),
                "artifacts": {k: model_provenance(m) for k, m in models.items()
                              if model_provenance(m) is not None}}


def compared_models(s: ChangesSettings) -> tuple[Any, dict[str, Any], Any]:
    """The dense model of ``s.dense``, every compared model by name (each of ``s.compressed``
    by its folder's name, a served artifact by its run's name, and the dense and torch ones
    again as each of ``s.runtime`` runs them: ``NAME@RUNTIME``) and the audited split of
    ``s.data``: ``(dense_model, models, dataset)``."""
    ref = load_model(s.dense)
    models: dict[str, Any] = {}
    for d in map(Path, s.compressed):
        name = d.parent.name if d.name == "serve" else d.name
        name = name if name not in models else str(d)
        models[name] = (load_served(d, s.threads) if (d / "serve.json").is_file()
                        else load_model(d))
    ds = open_dataset(s.data, split=s.split, preprocess=ref.card.preprocess)
    if s.runtime:
        cal_ds = open_dataset(s.data, split=s.calib_split, preprocess=ref.card.preprocess)
        calib = collect_images(cal_ds, s.n_calib, seed=1)[0]
        torch_models = {"dense": ref, **{k: m for k, m in models.items()
                                        if getattr(m, "supports_gradients", True)}}
        for rt in s.runtime:
            for k, m in torch_models.items():
                models[f"{k}@{rt}"] = runtime_model(m, rt, calib, threads=s.threads)
    return ref, models, ds
