"""Deploy fast: benchmark every available CPU runtime x precision on the same images and serve
the fastest one that keeps the accuracy.

``deploy`` exports the model (ONNX; OpenVINO IR), builds each variant of
:data:`~medscalpel.deploy.runtimes.RUNTIMES` (torch eager / channels-last / compile, ONNX
Runtime fp32 / int8 U8S8 / int8 S8S8, OpenVINO fp32 / bf16 / int8 via NNCF), checks parity
against torch float32 (a variant over its tolerance is refused and its files removed), compares
per-class and macro AUROC with paired bootstrap CIs on a real split
(:func:`~medscalpel.engine.compare.compare_predictions`), times all variants ALTERNATED in
rounds (median and spread per variant, plus an fp32 matmul peak in the same rounds), and
recommends the fastest variant that is not slower than torch fp32 (nor, for a reduced
precision, than its own runtime's fp32) and meets the accuracy floor. Every other variant gets
its no-go reasons.

Example:
    >>> import tempfile, torch
    >>> from medscalpel.data import ArrayDataset, Preprocess
    >>> import numpy as np
    >>> from medscalpel.models.zoo import create_model
    >>> rng = np.random.default_rng(0)
    >>> ds = ArrayDataset(rng.random((16, 32, 32)).astype(np.float32),
    ...                   (rng.random((16, 2)) > .5).astype(np.float32), ["a", "b"],
    ...                   "multilabel", preprocess=Preprocess(size=32), split="test")
    >>> from medscalpel.models.checkpoint import make_card
    >>> m = create_model("vgg_tiny", num_classes=2, img_size=32)
    >>> m.card = make_card(m, ["a", "b"], "multilabel", Preprocess(size=32))
    >>> r = deploy(m, ds, tempfile.mkdtemp() + "/d", variants=["torch:fp32", "onnxruntime:fp32"],
    ...            batches=(1,), rounds=1, repeats=1, n_boot=0, progress=False)
    >>> r.recommended in ("torch:fp32", "onnxruntime:fp32")
    True
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medscalpel.deploy.assemble import _finish, _guarantee_info
from medscalpel.deploy.cam import explain_variant
from medscalpel.deploy.decide import _decide, _floor_error, _noisy, _recommend, accuracy_verdict
from medscalpel.deploy.export import preferred_exporter
from medscalpel.deploy.plan import (DEFAULT_VARIANTS, OWNER, REFERENCE, _collect, _Inputs, _notes,
                                    _Plan, _select, _validate, _Variant)
from medscalpel.deploy.result import DeployResult, VariantResult
from medscalpel.deploy.runtimes import RUNTIMES, OpenVinoInt8AccuracyControl, Runtime, cpu_features
from medscalpel.deploy.serve import serve_metadata
from medscalpel.deploy.variant_timing import benchmark_variants, peak_gemms
from medscalpel.engine.compare import compare_predictions
from medscalpel.engine.metrics import auroc
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, MedScalpelError, MissingExtraError
from medscalpel.progress import track
from medscalpel.repair.card_guarantee import guarantee_of_card
from medscalpel.repair.conformal import GuaranteeResult

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- measure
def _predictions(logits: np.ndarray, data, idx: list[int], name: str) -> Predictions:
    labels = np.asarray(data.labels)[idx]
    return Predictions(logits, labels, tuple(str(data.ids[i]) for i in idx),
                       tuple(data.class_names), data.task, data.split, model_id=name)


def run_batched(rt: Runtime, images: torch.Tensor, batch: int) -> np.ndarray:
    """Logits of ``rt`` on all images in full batches of ``batch`` (the last one padded, so a
    shape-specialised runtime compiles once)."""
    x = images.numpy()
    outs = []
    for i in range(0, x.shape[0], batch):
        chunk = x[i:i + batch]
        n = chunk.shape[0]
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outs.append(np.asarray(rt.run(chunk))[:n])
    return np.concatenate(outs).astype(np.float32)


def _ac_metric(labels: np.ndarray, ref_logits: np.ndarray, task: str):
    """NNCF accuracy-control metric from OUR per-class AUROC: ``1 + min(worst class delta,
    2 x macro delta)`` vs the torch fp32 reference, so ``max_drop=0.01`` encodes the default
    floors (class -0.01, macro -0.005)."""
    k = ref_logits.shape[1]
    y = (np.eye(k)[labels] if task == "multiclass" else labels).astype(float)

    def per_class(logits: np.ndarray) -> np.ndarray:
        return np.array([auroc(y[:, c][~np.isnan(y[:, c])], logits[:, c][~np.isnan(y[:, c])])
                         for c in range(k)])

    ref = per_class(ref_logits)

    def metric(logits: np.ndarray) -> float:
        d = per_class(logits) - ref
        d = d[np.isfinite(d)]
        return 1.0 + float(min(d.min(), 2 * d.mean())) if d.size else 1.0

    return metric


def _build(v: _Variant, model, example, calib, workdir) -> None:
    """available() -> prepare(); failures become the variant's status (never silent)."""
    rt = v.rt
    try:
        reason = rt.available()
    except MissingExtraError as exc:
        if getattr(rt, "_explicit", False):
            raise
        reason = str(exc)
    if reason is not None:
        v.fail("unavailable", reason)
        return
    t0 = time.perf_counter()
    try:
        rt.prepare(model, example, calib, workdir)
    except MedScalpelError as exc:
        v.fail("error", f"export/compile error: {exc}")
    except Exception as exc:  # noqa: BLE001 - a runtime's own failure is a result, not a crash
        v.fail("error", f"export/compile error: {type(exc).__name__}: {str(exc)[:300]}")
    v.prepare_s = round(time.perf_counter() - t0, 3)
    if v.status == "error":
        rt.remove_files()


def _check_accuracy(v: _Variant, images, ref_logits, ref_preds, data, idx, batch, n_boot,
                    seed, external=None) -> None:
    """Parity vs torch fp32 (refuse + remove files over tolerance) and paired delta AUROC on
    the evaluation images and, when given, on the external set (``external``: images,
    reference predictions, dataset, indices)."""
    try:
        logits = run_batched(v.rt, images, batch)
        ext_logits = (run_batched(v.rt, external[0], batch) if external is not None else None)
    except Exception as exc:  # noqa: BLE001
        v.fail("error", f"inference error: {type(exc).__name__}: {str(exc)[:300]}")
        v.rt.remove_files()
        return
    scale = max(float(np.abs(ref_logits).max()), 1e-6)
    worst = float(np.abs(logits - ref_logits).max()) if np.isfinite(logits).all() else np.inf
    v.parity = (worst, worst / scale)
    if not worst / scale <= v.rt.tolerance:
        v.fail("refused", f"failed parity: max |delta logit| {worst:.3g} = {worst / scale:.3g} of "
                          f"the logit scale > {v.rt.tolerance:g}; its files were removed")
        v.rt.remove_files()
        return
    v.preds = _predictions(logits, data, idx, v.rt.name)
    v.comparison = compare_predictions(ref_preds, v.preds, n_boot=n_boot, seed=seed,
                                       boot_metrics=("auroc",))
    if external is not None:
        _, ext_ref, ext_data, ext_idx = external
        v.ext_preds = _predictions(ext_logits, ext_data, ext_idx, v.rt.name)
        v.ext_comparison = compare_predictions(ext_ref, v.ext_preds, n_boot=n_boot, seed=seed,
                                               boot_metrics=("auroc",))


def _reference(model, data, inp: _Inputs, plan: _Plan, workdir: Path):
    """torch fp32 logits and Predictions on the evaluation images and, when given, the
    external set (``external``: images, reference predictions, dataset, indices)."""
    ref_rt = RUNTIMES.create(REFERENCE, threads=plan.threads)
    ref_rt.prepare(model, inp.images[:1], None, workdir)
    ref_logits = run_batched(ref_rt, inp.images, max(plan.batches))
    ref_preds = _predictions(ref_logits, data, inp.idx, REFERENCE)
    external = None
    if inp.external_data is not None:
        ext_ref = _predictions(run_batched(ref_rt, inp.ext_images, max(plan.batches)),
                               inp.external_data, inp.ext_idx, REFERENCE)
        external = (inp.ext_images, ext_ref, inp.external_data, inp.ext_idx)
    return ref_logits, ref_preds, external


def _ac_kwargs(model, inp: _Inputs, calib_data) -> dict[str, Any]:
    """OpenVINO int8 accuracy-control inputs (labelled calibration images and the metric),
    only when the calibration images come from their own labelled split."""
    if calib_data is None:
        return {}
    with torch.inference_mode():
        cal_ref = np.asarray(model(inp.calib).float())
    labels = np.asarray(inp.calib_src.labels)[inp.cidx]
    return {"validation": (inp.calib.numpy(), labels),
            "metric": _ac_metric(labels, cal_ref, inp.calib_src.task)}


def _time(live: list[_Variant], images, plan: _Plan, notes: list[str]) -> dict[str, Any]:
    """Time the live variants in alternated rounds; a noisy run is re-measured once with as
    many more rounds (appended to the same aligned series), and that is noted."""
    args = (live, images, plan.batches, plan.rounds, plan.warmup, plan.repeats, plan.threads,
            plan.progress)
    peak = benchmark_variants(*args)
    noisy = _noisy(live, plan.batches[0])
    if noisy:  # once: more rounds, appended to the same aligned series
        logger.warning("timing of %s was noisy; measuring %d more rounds", ", ".join(noisy),
                       plan.rounds)
        peak = benchmark_variants(*args)
        still = _noisy(live, plan.batches[0])
        notes.append(f"timing was noisy ({', '.join(noisy)}): re-measured with {plan.rounds} "
                     "more rounds" + (f"; still noisy: {', '.join(still)} (their speed-ups are "
                                      "uncertain in size: quote them with their intervals)"
                                      if still else ""))
    return peak


def _measure(model, data, calib_data, inp: _Inputs, plan: _Plan, notes: list[str],
             workdir: Path):
    """Reference logits, then every selected variant built, checked (parity, accuracy) and
    the live ones timed: ``(variants, reference logits, external, ac kwargs, peak)``."""
    ref_logits, ref_preds, external = _reference(model, data, inp, plan, workdir)
    ac_kwargs = _ac_kwargs(model, inp, calib_data)
    vs = [_Variant(rt) for rt in _select(plan.variants, plan.runtimes, plan.precisions,
                                         plan.threads, ac_kwargs)]
    for v in track(vs, "build variants", progress=plan.progress):
        _build(v, model, inp.images[:1], inp.calib, workdir)
        if v.status == "go":
            _check_accuracy(v, inp.images, ref_logits, ref_preds, data, inp.idx,
                            max(plan.batches), plan.n_boot, plan.seed, external)
    live = [v for v in vs if v.status == "go"]
    peak = _time(live, inp.images, plan, notes)
    return vs, ref_logits, external, ac_kwargs, peak


# ----------------------------------------------------------------------------- decide / serve
def _card_guarantee(model, require_guarantee: bool):
    """Before any work: the model's card (serving needs the contract) and the guarantee its
    operating point carries: ``(guarantee or None, positive class, deploy.json's info)``."""
    if getattr(model, "card", None) is None:  # before any work: serving needs the contract
        raise ConfigError(f"{OWNER}: the model has no ModelCard (class names, task, input, "
                          "thresholds), which the served artifact's serve.json is made of; "
                          "load it with load_model(dir) or set model.card = make_card(...).")
    g, positive, g_notes = guarantee_of_card(model.card)
    if require_guarantee and g is None:
        raise ConfigError(f"{OWNER}: require_guarantee, but the model card's operating point "
                          "carries no guarantee (certify one with 'repair calibrate --guarantee "
                          "... --model DIR').")
    return g, positive, _guarantee_info(g, g_notes, require_guarantee)


def _choose(vs: list[_Variant], plan: _Plan, g: GuaranteeResult | None, positive: str | None):
    """Judge every variant (:func:`~medscalpel.deploy.decide._decide`) and recommend one:
    ``(cpu features, chosen variant, reason)``; raises when none can be served."""
    feats = cpu_features()
    _decide(vs, plan.batches, plan.floor_macro, plan.floor_class, feats["vnni"], plan.n_boot,
            plan.accept_unscorable, plan.min_positives, None if g is None else (g, positive),
            plan.require_guarantee)
    chosen, reason = _recommend(vs, plan.batches[0])
    if chosen is None:
        raise _floor_error(vs, plan.floor_macro, plan.floor_class)
    return feats, chosen, reason


def _explain_chosen(explain: bool, chosen: _Variant, model, inp: _Inputs, ref_logits,
                    ac_kwargs: dict[str, Any], workdir: Path, plan: _Plan):
    """The chosen variant's class-activation-map runtime and its record, or why there is
    none (``explain=False``)."""
    if not explain:
        return None, {"status": "off", "reason": "explain=False: logits only"}
    kw = ac_kwargs if isinstance(chosen.rt, OpenVinoInt8AccuracyControl) else None
    return explain_variant(chosen.rt, model, inp.images, ref_logits, inp.calib, workdir / "cam",
                           plan.threads, plan.rounds, plan.repeats, plan.warmup, kw)


@contextmanager
def _workspace(threads: int) -> Iterator[Path]:
    """A private temporary folder with torch's intra-op threads set to ``threads``; both are
    restored / removed on exit."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    workdir = Path(tempfile.mkdtemp(prefix="medscalpel-deploy-"))
    try:
        yield workdir
    finally:
        torch.set_num_threads(prev)
        shutil.rmtree(workdir, ignore_errors=True)


# ----------------------------------------------------------------------------- public API
def deploy(
    model: nn.Module, data, out: str | os.PathLike, *, calib_data=None,
    variants: Sequence[str | Runtime] | None = None, runtimes: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None, batches: Sequence[int] = (1, 8), rounds: int = 5,
    repeats: int = 5, warmup: int = 2, n_images: int = 256, n_calib: int = 64,
    floor_macro: float = -0.005, floor_class: float = -0.01, threads: int | None = None,
    n_boot: int = 1000, seed: int = 0, overwrite: bool = False, progress: bool | None = None,
    explain: bool = True, external_data=None, accept_unscorable: bool | Sequence[str] = False,
    min_positives: int = 10, notes: Sequence[str] = (), require_guarantee: bool = False,
    manifest: bool = True,
) -> DeployResult:
    """Benchmark every available runtime x precision and write the fastest acceptable one.

    Args:
        model: the (compressed) float32 model; it is not changed.
        data: labelled dataset split for parity and paired delta AUROC (e.g. the test split).
        out: run directory to create: ``deploy.json``, ``deploy.md``, ``export/`` (ONNX and
            OpenVINO IR float32), ``serve/`` (the chosen artifact + ``serve.json``), manifest.
        calib_data: split the int8 calibration images come from (the training split); default
            ``data`` (labelled as leaky in the notes).
        variants: registered names (``RUNTIMES.names()``) and/or :class:`Runtime` instances;
            default :data:`DEFAULT_VARIANTS`. torch fp32 (the reference) is always included.
        runtimes, precisions: filters on the variant names (e.g. ``["openvino"]``, ``["fp32"]``).
        batches: batch sizes timed; the first one decides the recommendation.
        rounds: alternated rounds (each variant once per round); ``repeats`` timed runs each.
        n_images, n_calib: evaluation and calibration images.
        floor_macro, floor_class: accuracy floor (<= 0) on macro / every class delta AUROC: a
            variant is served only when its paired intervals SHOW the loss is within the
            floor (non-inferiority, Holm across classes + macro;
            :meth:`~medscalpel.engine.compare.PairedComparison.verdict`); undecided variants
            are reported, never served.
        external_data: an optional labelled second-site set (same classes): every variant is
            judged on it too and must pass on both.
        accept_unscorable: classes with fewer than ``min_positives`` positive or negative
            evaluation images cannot be checked and leave a verdict undecided; ``True`` (or
            class names) accepts them unchecked, recorded in each verdict.
        notes: the caller's own notes for the result (e.g. what it left out).
        require_guarantee: when the card's operating point carries a guarantee
            (``repair calibrate --guarantee --model``) every variant that meets the floor is
            re-certified on its own logits (evaluation and external sets): a FAIL is always
            no-go; with ``require_guarantee`` an undecided re-certification is too (and a card
            without a guarantee is refused before any work).
        threads: intra-op threads of every runtime (default: torch's current setting).
        n_boot: paired bootstrap replicates of the delta AUROC CIs.
        manifest: ``out`` is a run directory of its own (a manifest); ``False``: a folder of
            the caller's run directory (``compress deploy``'s stage), whose manifest it is.
        explain: serve the chosen variant with a second output, the class activation maps
            (:mod:`~medscalpel.deploy.cam`: checked against Grad-CAM, its latency
            cost measured); the logits-only artifact is kept in ``serve/logits_only``. Models
            whose head is not GAP + linear (ViTs, VGG's FC head) get none, stated.

    Returns:
        The :class:`DeployResult` (also in ``out/deploy.json``).

    Raises:
        MissingExtraError: an explicitly requested runtime is not installed (names the extra).
        VerificationError: no variant was shown to meet the floor (the best one and its
            verdicts in the message); nothing is left in ``out``.
    """
    t0 = time.perf_counter()
    batches = tuple(int(b) for b in batches)
    _validate(batches, rounds, repeats, warmup, n_images, n_calib, floor_macro, floor_class)
    g, positive, g_info = _card_guarantee(model, require_guarantee)
    plan = _Plan(variants, runtimes, precisions, batches, rounds, repeats, warmup,
                 int(threads or torch.get_num_threads()), n_boot, seed, progress, floor_macro,
                 floor_class, accept_unscorable, min_positives, require_guarantee)
    load_start = list(os.getloadavg())
    model = copy.deepcopy(model).eval().cpu().float()
    inp = _collect(model, data, calib_data, external_data, n_images, n_calib, seed)
    notes = _notes(data, notes, accept_unscorable, calib_data)
    with _workspace(plan.threads) as workdir:
        vs, ref_logits, external, ac_kwargs, peak = _measure(model, data, calib_data, inp, plan,
                                                             notes, workdir)
        feats, chosen, reason = _choose(vs, plan, g, positive)
        cam_rt, cam_info = _explain_chosen(explain, chosen, model, inp, ref_logits, ac_kwargs,
                                           workdir, plan)
        return _finish(model, inp, plan, vs, chosen, reason, workdir, out, data, peak, feats,
                       load_start, notes, overwrite, t0, cam_rt, cam_info, external, g_info,
                       manifest)


#: why the budgeted paths (quick_deploy, the demo's export) keep the TorchScript exporter
DEMO_EXPORTER_REASON = ("the demo's time budget: the dynamo exporter took 2-35 s per model where "
                        "the TorchScript one took 0.1-4 s (benchmarks/results/"
                        "export_exporters.json); same parity")

#: the demo's quick stage: the fp32 runtimes (int8 calibration alone took 43 s of a 121 s
#: quick run on densenet121 at 64 px under load average 11 on 2 cores), one batch, few rounds
QUICK_VARIANTS = ("torch:fp32", "onnxruntime:fp32", "openvino:fp32")


def quick_deploy(model: nn.Module, data, out: str | os.PathLike, calib_data=None,
                 overwrite: bool = False, progress: bool | None = None) -> DeployResult:
    """A budgeted :func:`deploy` for the demo (batch 1, 5 rounds: the fewest whose speed
    interval reaches 90% coverage, 64 evaluation and 16 calibration images, 200 bootstrap
    replicates, the :data:`QUICK_VARIANTS` that are installed; OpenVINO is skipped without the
    extra, and that is recorded). At 64 images most classes have too few positives to check:
    they are accepted unchecked, and every verdict names them. The int8 and bf16 variants are
    left to the full command."""
    names = [n for n in QUICK_VARIANTS
             if not n.startswith("openvino") or importlib.util.find_spec("openvino")]
    left_out = [n for n in QUICK_VARIANTS if n not in names]
    with preferred_exporter("torchscript", DEMO_EXPORTER_REASON):
        return deploy(model, data, out, calib_data=calib_data, variants=names, batches=(1,),
                  rounds=5, repeats=3, warmup=1, n_images=64, n_calib=16, n_boot=200,
                      overwrite=overwrite, progress=progress, accept_unscorable=True,
                      notes=([f"not measured: {', '.join(left_out)} (OpenVINO is not "
                              "installed: pip install 'medscalpel[deploy]')"] if left_out else [])
                      + [f"ONNX files exported with the TorchScript exporter: "
                         f"{DEMO_EXPORTER_REASON}"])


__all__ = ["DEFAULT_VARIANTS", "QUICK_VARIANTS", "quick_deploy", "DeployResult", "VariantResult",
           "accuracy_verdict", "deploy", "peak_gemms", "run_batched", "serve_metadata"]
