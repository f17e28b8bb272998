"""One compressor contract: every compression method returns one :class:`CompressionResult`.

The five compressors of medscalpel (lossless folding, tolerance reconstruction, sparsify-and-fold,
structured pruning, distillation) each have their own detailed report; what travels between
stages is the same for all of them and is built here, once:

* the compressed ``model``;
* ``method`` (its name in :data:`COMPRESSORS`) and the ``settings`` it ran with;
* ``verification``: what was checked and on what (max |delta logit| on which images, the
  guarantee, the split), never more than was measured;
* parameters and MACs before and after;
* ``comparison``: the paired accuracy delta against the input model on a labelled split
  (:func:`medscalpel.engine.compare.compare_predictions`), when evaluation images are given;
* ``lineage()``: the model card of the compressed model (the parent card plus one step).

The CLI and the demo loop over :data:`COMPRESSORS` instead of calling each function its own way.

Example:
    >>> import torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("vgg_tiny", num_classes=2, img_size=32).eval()
    >>> res = compress("lossless", m, CompressionInputs(heldout=torch.randn(8, 1, 32, 32)),
    ...                latency=False)
    >>> res.method, res.params_after <= res.params_before, res.verification["exact"]
    ('lossless', True, True)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from medscalpel.compress.distill import DistillConfig, distill
from medscalpel.compress.lossless import fold_lossless
from medscalpel.compress.measure import count_macs, count_parameters
from medscalpel.compress.ofa.flow import OFAConfig, distill_ofa
from medscalpel.compress.ofa.search import LatencySpec
from medscalpel.compress.reconstruct import compress_with_tolerance
from medscalpel.compress.sparsify import sparsify_and_fold
from medscalpel.compress.structured import prune_structured
from medscalpel.engine.compare import PairedComparison, compare_predictions
from medscalpel.engine.predict import predict
from medscalpel.errors import ConfigError, DataError, ModelError, VerificationError
from medscalpel.layout import artifact, write_artifact_at
from medscalpel.models.checkpoint import save_model
from medscalpel.registry import Registry

logger = logging.getLogger(__name__)

SCHEMA = 1
#: file name of a compressor's own report beside ``model/`` (declared in medscalpel.layout)
REPORT = artifact("compression_report").filename


@dataclass
class CompressionInputs:
    """The data a compressor may use; each uses what it needs and says what is missing.

    Attributes:
        calib: calibration images ``[N, C, H, W]`` (channel analysis, scores, tracing).
        calib_labels: their labels (``[N, K]`` multi-label or ``[N]`` class indices): the
            attribution criteria (lrp, ig, backtrace) then score each image's POSITIVE classes
            (the seed's recipe; without labels every class of every image: K times the work)
            and Taylor uses them as its loss targets.
        heldout: held-out images (verification only, never for decisions).
        heldout_labels: their labels (tolerance mode reports delta macro AUROC with them).
        train, val, test: datasets for methods that train (sparsify, prune recovery, distill).
        evaluate: a labelled dataset on which both models are predicted for the paired
            accuracy comparison (``None``: no comparison).
    """

    calib: torch.Tensor | None = None
    calib_labels: Any = None
    heldout: torch.Tensor | None = None
    heldout_labels: Any = None
    train: Any = None
    val: Any = None
    test: Any = None
    evaluate: Any = None

    def need(self, method: str, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ConfigError(f"Compressor '{method}' needs {', '.join(missing)} in its "
                              f"CompressionInputs (got none); pass "
                              f"{', '.join(f'{n}=...' for n in missing)}.")


@dataclass
class CompressionResult:
    """What every compressor returns (see the module docstring)."""

    model: nn.Module
    method: str
    settings: dict[str, Any]
    verification: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    report: Any = field(repr=False, default=None)  # the method's own detailed report
    comparison: PairedComparison | None = None
    parent: Any = field(repr=False, default=None)  # the input model's ModelCard
    # a method that builds a NEW model (distillation) already wrote the student's own card,
    # lineage step included: lineage() then adds the accuracy delta to that step
    own_card: Any = field(repr=False, default=None)

    @property
    def param_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def speedup_macs(self) -> float | None:
        if not self.macs_before or not self.macs_after:
            return None
        return self.macs_before / self.macs_after

    def lineage(self):
        """The compressed model's :class:`~medscalpel.models.checkpoint.ModelCard`: the parent
        card with one lineage step (method, settings, verification, accuracy delta)."""
        acc: dict[str, Any] = {}
        if self.comparison is not None:
            m = self.comparison.macro
            acc["accuracy_delta"] = {
                "split": self.comparison.split, "n": self.comparison.n,
                "delta_macro_auroc": m["delta_auroc"],
                "delta_macro_auroc_ci": list(m["delta_auroc_ci"])}
        if self.own_card is not None:
            steps = list(self.own_card.lineage)
            if steps:
                steps[-1] = {**steps[-1], **acc}
            return replace(self.own_card, lineage=tuple(steps))
        if self.parent is None:
            raise ModelError(f"The {self.method} result has no parent ModelCard (the input "
                             "model had none); give the model a card (make_card) first.")
        details: dict[str, Any] = {**self.settings, "verification": self.verification,
                                   "params_before": self.params_before,
                                   "params_after": self.params_after, **acc}
        return self.parent.with_lineage(self.method, parent=self.parent.model_id, **details)

    def to_dict(self) -> dict[str, Any]:
        rep = self.report.to_dict() if hasattr(self.report, "to_dict") else self.report
        return {"schema_version": SCHEMA, "method": self.method, "settings": self.settings,
                "verification": self.verification, "params_before": self.params_before,
                "params_after": self.params_after, "param_reduction": self.param_reduction,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "speedup_macs": self.speedup_macs,
                "comparison": None if self.comparison is None else self.comparison.to_dict(),
                "report": rep}

    def save(self, directory: str | os.PathLike) -> Path:
        """``model/`` (weights + card with lineage) and ``report.json`` in ``directory``."""
        directory = Path(directory)
        save_model(self.model, directory / "model", self.lineage())
        write_artifact_at(directory, "compression_report", self)
        return directory


Compressor = Callable[..., CompressionResult]
#: compressor name -> ``fn(model, inputs, **settings) -> CompressionResult``
COMPRESSORS: Registry[CompressionResult] = Registry("compressor")


def compress(method: str, model: nn.Module, inputs: CompressionInputs, *,
             n_boot: int = 1000, **settings: Any) -> CompressionResult:
    """Run compressor ``method`` on ``model`` and, when ``inputs.evaluate`` is given, compare the
    compressed model with the input model on it (paired bootstrap, ``n_boot`` replicates,
    seeded by ``settings["seed"]`` when the compressor takes one, else 0).

    Raises:
        ConfigError: unknown method (the message lists the valid ones) or missing inputs.
    """
    fn = COMPRESSORS.get(method)
    res = fn(model, inputs, **settings)
    if inputs.evaluate is not None:
        res.comparison = compare_predictions(predict(model, inputs.evaluate, progress=False),
                                             predict(res.model, inputs.evaluate, progress=False),
                                             n_boot=n_boot, seed=int(settings.get("seed", 0)))
    return res


def _counts(before: nn.Module, after: nn.Module, example: torch.Tensor | None
            ) -> tuple[int, int, int | None, int | None]:
    p0, p1 = count_parameters(before), count_parameters(after)
    if example is None:
        return p0, p1, None, None
    x = example[:1]
    return p0, p1, count_macs(before, x), count_macs(after, x)


def _example(inputs: CompressionInputs) -> torch.Tensor | None:
    for x in (inputs.calib, inputs.heldout):
        if x is not None:
            return x
    return None


@COMPRESSORS.register("lossless", help="provable folding of dead / constant / proportional "
                                        "channels (exact for every input)")
def _lossless(model: nn.Module, inputs: CompressionInputs, **kw: Any) -> CompressionResult:
    return _fold(model, inputs, "provable", **kw)


@COMPRESSORS.register("lossless-empirical", help="folding of channels found dead / constant / "
                                                  "dependent on calibration images")
def _lossless_empirical(model: nn.Module, inputs: CompressionInputs,
                        **kw: Any) -> CompressionResult:
    inputs.need("lossless-empirical", "calib", "heldout")
    return _fold(model, inputs, "empirical", **kw)


def _fold(model: nn.Module, inputs: CompressionInputs, mode: str, **kw: Any) -> CompressionResult:
    r = fold_lossless(model, inputs.calib, inputs.heldout, mode=mode, **kw)
    rep = r.report
    verification = {"max_abs_logit_delta": rep.max_abs_logit_delta, "atol": rep.atol,
                    "heldout_images": rep.n_heldout,
                    "max_abs_logit_delta_random": rep.max_abs_logit_delta_random,
                    "random_relative_delta": rep.random_relative_delta,
                    "random_rtol": rep.random_rtol, "random_inputs": rep.n_random,
                    "guarantee": rep.guarantee, "exact": bool(rep.verified)}
    settings = {"mode": mode, "channels": rep.channels,
                "params_removed_pct": rep.params_removed_pct,
                **{k: v for k, v in kw.items() if isinstance(v, (int, float, str, bool))}}
    name = "lossless" if mode == "provable" else "lossless-empirical"
    return CompressionResult(r.model, name, settings, verification, rep.params_before,
                             rep.params_after, rep.macs_before, rep.macs_after, rep,
                             parent=getattr(model, "card", None))


@COMPRESSORS.register("tolerance", help="LASSO channel selection + ridge refit to a parameter "
                                         "budget (lossy; the delta is reported)")
def _tolerance(model: nn.Module, inputs: CompressionInputs, *, ratio: float,
               **kw: Any) -> CompressionResult:
    inputs.need("tolerance", "calib", "heldout")
    r = compress_with_tolerance(model, inputs.calib, inputs.heldout, ratio,
                                heldout_labels=inputs.heldout_labels, **kw)
    rep = r.report
    verification = {"max_abs_logit_delta": rep.max_abs_logit_delta,
                    "delta_macro_auroc": rep.delta_macro_auroc, "heldout_images": rep.n_heldout,
                    "guarantee": "lossy: the logit change is measured, not bounded",
                    "exact": False}
    settings = {"target_ratio": ratio, "achieved_ratio": rep.achieved_ratio,
                "keep_fraction": rep.keep_fraction, "params_removed_pct": rep.params_removed_pct,
                "refits": rep.refits, "refits_plain_removal": rep.refits_plain_removal}
    return CompressionResult(r.model, "tolerance", settings, verification, rep.params_before,
                             rep.params_after, rep.macs_before, rep.macs_after, rep,
                             parent=getattr(model, "card", None))


@COMPRESSORS.register("sparsify-fold", help="train with group sparsity on BN scales, then fold "
                                             "the zeroed channels provably")
def _sparsify_fold(model: nn.Module, inputs: CompressionInputs, *, ratio: float,
                   epochs: int = 3, **kw: Any) -> CompressionResult:
    inputs.need("sparsify-fold", "train", "heldout")
    held_ds = inputs.val if inputs.val is not None else inputs.train
    r = sparsify_and_fold(model, inputs.train, held_ds, inputs.heldout, ratio, epochs, **kw)
    rep = r.report
    verification = {"max_abs_logit_delta": rep.max_abs_logit_delta_fold,
                    "max_abs_logit_delta_vs_dense": rep.max_abs_logit_delta_vs_dense,
                    "metrics_dense": rep.metrics_dense, "metrics_folded": rep.metrics_folded,
                    "heldout_images": rep.lossless.n_heldout,
                    "guarantee": "lossy sparsification (trained), then a provable fold of the "
                                 "zeroed channels", "exact": False}
    settings = {"target_ratio": ratio, "epochs": epochs,
                "params_removed_pct": rep.params_removed_pct,
                **{k: v for k, v in kw.items() if isinstance(v, (int, float, str, bool))}}
    x = _example(inputs)
    p0, p1, m0, m1 = _counts(model, r.model, x)
    return CompressionResult(r.model, "sparsify-fold", settings, verification, p0, p1, m0, m1,
                             rep, parent=getattr(model, "card", None))


@COMPRESSORS.register("prune", help="structured pruning on the Torch-Pruning dependency graph "
                                     "(criteria: l1, l2, bn_scale, taylor, lrp, ig, backtrace)")
def _prune(model: nn.Module, inputs: CompressionInputs, **kw: Any) -> CompressionResult:
    inputs.need("prune", "calib")
    if inputs.calib_labels is not None and kw.get("calib_targets") is None:
        kw["calib_targets"] = torch.as_tensor(np.asarray(inputs.calib_labels))
    r = prune_structured(model, inputs.calib, train_ds=inputs.train, val_ds=inputs.val, **kw)
    if r.model is None:
        raise ConfigError("COMPRESSORS['prune'] got dry_run=True: a dry run has no model; call "
                          "prune_structured(..., dry_run=True) directly for a plan.")
    verification = {"max_abs_logit_delta": r.max_abs_logit_delta,
                    "heldout_images": 0, "measured_on": "calibration images",
                    "latency": r.latency,
                    "guarantee": "lossy: accuracy is measured by the paired comparison",
                    "exact": False}
    settings = {"criterion": r.criterion, "ratio": r.ratio, "target_speedup": r.target_speedup,
                "global_pruning": r.global_pruning, "iterative_steps": r.iterative_steps,
                "recovery": r.recovery is not None, "speedup_macs": r.speedup_macs}
    # prune_structured already added its lineage step ("prune_structured") to the pruned
    # model's card: lineage() adds the accuracy delta to that step instead of a second one
    return CompressionResult(r.model, "prune", settings, verification, r.params_before,
                             r.params_after, r.macs_before, r.macs_after, r,
                             parent=getattr(model, "card", None),
                             own_card=getattr(r.model, "card", None))


@COMPRESSORS.register("distill", help="knowledge distillation into a compact student")
def _distill(model: nn.Module | str | os.PathLike, inputs: CompressionInputs, *, student: Any,
             config: DistillConfig | None = None, **kw: Any) -> CompressionResult:
    inputs.need("distill", "train", "test")
    r = distill(model, student, inputs.train, inputs.val, inputs.test, config, **kw)
    cfg = r.config
    verification = {"metrics_teacher": r.teacher.get("metrics"),
                    "metrics_student": r.students["distilled"].get("metrics"),
                    "divergence": r.students["distilled"].get("divergence"),
                    "targets": r.targets,
                    "guarantee": "a new model: accuracy is measured, nothing is preserved",
                    "exact": False}
    settings = {"student": r.students["distilled"].get("arch"),
                "soft_weight": cfg.soft_weight, "temperature": cfg.temperature,
                "feature_weight": cfg.feature_weight, "attention_weight": cfg.attention_weight}
    # counted by distill() on the teacher it used (a model, a model directory, or an
    # architecture it trained first) and on the student, on one test image
    t, st = r.teacher, r.students["distilled"]
    p0, p1, m0, m1 = t["parameters"], st["parameters"], t.get("macs"), st.get("macs")
    return CompressionResult(r.model, "distill", settings, verification, p0, p1, m0, m1, r,
                             parent=getattr(model, "card", None),
                             own_card=getattr(r.model, "card", None))


@COMPRESSORS.register("ofa", help="once-for-all: an elastic supernet distilled from the model, "
                                  "the most accurate subnet within a latency budget measured on "
                                  "a deploy runtime")
def _ofa(model: nn.Module, inputs: CompressionInputs, *, latency_budget_ms: float,
         config: OFAConfig | None = None, latency: LatencySpec | None = None,
         **kw: Any) -> CompressionResult:
    inputs.need("ofa", "train", "val")
    test = inputs.test if inputs.test is not None else inputs.evaluate
    if test is None:
        inputs.need("ofa", "test")
    r = distill_ofa(model, inputs.train, inputs.val, test, (float(latency_budget_ms),), config,
                    latency, **kw)
    s = r.subnets[0]
    if not s["met"]:  # a refusal, not a model over the budget
        raise VerificationError(f"ofa: {s['reason']}")
    sub = r.models[s["label"]]
    verification = {"budget_ms": s["budget_ms"], "latency_ms": s["confirm_latency_ms"],
                    "latency_rounds_ms": s["confirm_rounds_ms"],
                    "runtime": r.search.latency.runtime,
                    "threads": r.search.latency.threads, "met": True,
                    "test_auroc": s["test_auroc"], "delta_auroc_vs_teacher": s["delta_auroc"],
                    "delta_auroc_ci": s["delta_auroc_ci"],
                    "guarantee": "a new model: accuracy is measured, nothing is preserved",
                    "exact": False}
    settings = {"latency_budget_ms": float(latency_budget_ms),
                "runtime": r.search.latency.runtime, "supernet_id": r.supernet.supernet_id,
                "subnet": s["candidate"]["key"],
                "phase_epochs": list(r.config.train.phase_epochs),
                "soft_weight": r.config.train.soft_weight,
                "temperature": r.config.train.temperature}
    p0, p1, m0, m1 = _counts(model, sub, test.image(0)[None])
    return CompressionResult(sub, "ofa", settings, verification, p0, p1, m0, m1, r,
                             parent=getattr(model, "card", None),
                             own_card=getattr(sub, "card", None))


# ----------------------------------------------------------------------------- the table
#: keys of every measured row of the compression table (a refused row: method + refused)
ROW_KEYS = ("method", "params", "params_ratio", "macs", "latency_ms", "dense_latency_ms",
            "speedup", "macro_auroc", "macro_auroc_ci", "delta_macro_auroc",
            "delta_macro_auroc_ci", "max_abs_delta_logit", "model_dir")


@dataclass(frozen=True)
class CompressionTable:
    """The compression stage's table: the dense row and one row per compressed model, every
    number measured in one run; ``evaluated_on`` names the split, its size and the bootstrap.
    Accuracy deltas are PAIRED (same images, :func:`compare_predictions`)."""

    dense: dict[str, Any]
    rows: tuple[dict[str, Any], ...]
    evaluated_on: dict[str, Any]
    schema_version: int = SCHEMA

    def __post_init__(self):
        for i, r in enumerate((self.dense, *self.rows)):
            where = "dense row" if i == 0 else f"row {i - 1} ({r.get('method')})"
            keys = ("method", "refused") if r.get("refused") else ROW_KEYS
            missing = [k for k in keys if k not in r]
            if missing:
                raise DataError(f"CompressionTable: the {where} lacks {missing}; every row "
                                "carries the keys of contract.ROW_KEYS.")

    def measured(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if not r.get("refused")]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "dense": self.dense,
                "rows": list(self.rows), "evaluated_on": self.evaluated_on}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompressionTable":
        if int(d.get("schema_version", 0)) != SCHEMA:
            raise DataError(f"{artifact('compress').filename} has schema "
                            f"{d.get('schema_version')}, not {SCHEMA}: "
                            "re-run the compression stage with this medscalpel.")
        return cls(dict(d["dense"]), tuple(dict(r) for r in d["rows"]),
                   dict(d.get("evaluated_on", {})))
