"""Deployment export: ONNX with an onnxruntime parity check, CPU latency against the dense
reference measured in the same run, and optional int8 quantisation through onnxruntime.

The package: this module holds :func:`export_onnx` (export, parity, latency table) with its
:class:`ExportResult` and the onnxruntime session helpers; :mod:`.onnx_file` writes ONNX files
(exporter choice, fallback, logits-only subgraph); :mod:`.quantize` int8-quantises them.

Example:
    >>> import tempfile, torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("vgg_tiny", num_classes=2, img_size=32)
    >>> r = export_onnx(m, tempfile.mkdtemp() + "/m.onnx", batch_sizes=(1,), repeats=2,
    ...                 input_size=(1, 32, 32))
    >>> r.parity["random"] < 1e-4
    True
"""

from __future__ import annotations

import copy
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import onnxruntime as ort
import torch
from torch import nn

from medscalpel.compress.measure import cpu_latency, eval_mode
from medscalpel.deploy.export.onnx_file import (DEFAULT_OPSET, DYNAMO_MIN_OPSET, EXPORTERS, INPUT,
                                                OUTPUT, OWNER, TORCHSCRIPT_ARCHS, choose_exporter,
                                                export_onnx_file, logits_only_onnx,
                                                preferred_exporter)
from medscalpel.deploy.export.quantize import _quantize, has_vnni, quantize_onnx
from medscalpel.deploy.timing import median_ms
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import collect_images, make_loader
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, VerificationError
from medscalpel.runs import cpu_flags, write_json
from medscalpel.validation import check_in, check_range


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and measured.

    Attributes:
        onnx_path: the float32 ONNX file.
        parity: max |logit(onnxruntime) - logit(torch)| on ``random`` and ``real`` inputs.
        latency: rows ``{runtime, model, batch, ms}`` (median over repeats, after warm-up) for
            ``torch`` and ``onnxruntime``, for this model, the reference and the int8 model.
        speedup: ``reference_ms / model_ms`` per ``{runtime}@b{batch}`` (> 1: faster than the
            reference), measured alternately in this run.
        quantization: int8 path, mode, parity vs float32 ONNX, delta macro AUROC (with a
            dataset), or ``None``.
        opset: the opset the file declares.
        exporter: which torch exporter wrote the file (``dynamo`` or ``torchscript``), why,
            and whether it was a fallback after a dynamo failure (with the error); the
            reference's under ``reference``. See :func:`export_onnx_file`.
    """

    onnx_path: str
    opset: int
    input_shape: list[int]
    parity: dict[str, float | None]
    latency: list[dict[str, Any]]
    speedup: dict[str, float]
    file_bytes: int
    quantization: dict[str, Any] | None = None
    reference: str | None = None
    threads: int = 1
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    exporter: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # schema 2: + exporter (which torch exporter wrote the file, why); opset as written
        return {"schema_version": 2, **{k: v for k, v in self.__dict__.items()}}

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())


# ----------------------------------------------------------------------------- helpers
def _input_shape(model: nn.Module, dataset, real_images, input_size) -> tuple[int, int, int]:
    if input_size is not None:
        shape = tuple(int(v) for v in input_size)
        if len(shape) != 3:
            raise ConfigError(f"The 'input_size' parameter of {OWNER} must be (C, H, W). Got "
                              f"{input_size!r} instead.")
        return shape  # type: ignore[return-value]
    card = getattr(model, "card", None)
    if card is not None and card.input.get("size"):
        return (int(card.input.get("channels", 1)), int(card.input["size"]),
                int(card.input["size"]))
    kw = getattr(model, "arch_kwargs", {}) or {}
    if "img_size" in kw:
        c = int(kw.get("in_chans", getattr(model, "in_chans", 1)))
        return (c, int(kw["img_size"]), int(kw["img_size"]))
    if real_images is not None:
        return tuple(real_images.shape[1:])  # type: ignore[return-value]
    if dataset is not None:
        return tuple(dataset.image(0).shape)  # type: ignore[return-value]
    raise ConfigError(f"{OWNER} cannot tell the model's input size: pass input_size=(C, H, W), "
                      "real images or a dataset.")


#: the dynamo-based exporter (``torch.onnx.export(dynamo=True)``, needs onnxscript) writes opset
#: 18 and later; a lower opset goes through the TorchScript exporter (the dynamo exporter's
#: down-conversion to 17 fails on some zoo graphs, e.g. densenet_tiny's ReduceMean axes, and then

def ort_session(path: str | os.PathLike | bytes, threads: int | None = None):
    """An onnxruntime CPU session with ``threads`` intra-op threads (default: torch's) of an
    ONNX file, or of a serialized model (``bytes``, e.g. :func:`logits_only_onnx`)."""

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so,
                                providers=["CPUExecutionProvider"])


def ort_run(session, x: torch.Tensor | np.ndarray, batch_size: int = 64) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = arr.astype(np.float32, copy=False)
    outs = [session.run(None, {INPUT: arr[i:i + batch_size]})[0]
            for i in range(0, arr.shape[0], batch_size)]
    return np.concatenate(outs)


def ort_latency(session, example: torch.Tensor, batch_size: int, warmup: int = 3,
                repeats: int = 10) -> float:
    """Median ms of one onnxruntime run at ``batch_size`` (after ``warmup`` runs)."""
    x = example[:1].float().cpu().numpy()
    x = np.ascontiguousarray(np.repeat(x, batch_size, axis=0))
    return median_ms(lambda: session.run(None, {INPUT: x}), warmup, repeats)


def _torch_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    with eval_mode(model), torch.no_grad():
        return torch.cat([model(x[i:i + batch_size].float()) for i in range(0, x.shape[0],
                                                                            batch_size)]).numpy()


def _dataset_logits(session, dataset, batch_size: int = 64) -> np.ndarray:

    outs = [ort_run(session, x, batch_size) for x, _ in make_loader(dataset, batch_size)]
    return np.concatenate(outs)


def _macro_auroc(logits: np.ndarray, dataset) -> float:

    p = Predictions(logits, dataset.labels, tuple(dataset.ids), tuple(dataset.class_names),
                    dataset.task, dataset.split)
    return float(evaluate(p, n_boot=0).macro["auroc"])

# ----------------------------------------------------------------------------- export_onnx steps
def _validate(batch_sizes, opset, repeats, rounds, parity_tolerance, quantize,
              real_images) -> None:
    if not batch_sizes:
        raise ConfigError(f"The 'batch_sizes' parameter of {OWNER} must not be empty.")
    for b in batch_sizes:
        check_range(b, "batch_sizes", OWNER, 1, integer=True)
    check_range(opset, "opset", OWNER, 11, 23, integer=True)
    check_range(repeats, "repeats", OWNER, 1, integer=True)
    check_range(rounds, "rounds", OWNER, 1, integer=True)
    check_range(parity_tolerance, "parity_tolerance", OWNER, 0, low_inclusive=False)
    if quantize is not None:
        check_in(quantize, "quantize", OWNER, ("dynamic", "static"))
    if real_images is not None and (not isinstance(real_images, torch.Tensor)
                                    or real_images.ndim != 4):
        raise ConfigError(f"The 'real_images' parameter of {OWNER} must be a tensor "
                          "[N, C, H, W].")


def _real(real_images, dataset, n_real: int, seed: int, shape) -> torch.Tensor | None:
    """The real images for parity and calibration: ``real_images``, else ``n_real`` seeded
    images of ``dataset``, else ``None``; a shape other than the model input's is refused."""
    real = real_images
    if real is None and dataset is not None:
        real, _ = collect_images(dataset, n_real, seed=seed)
    if real is not None and tuple(real.shape[1:]) != tuple(shape):
        raise ConfigError(f"{OWNER}: real images have shape {tuple(real.shape[1:])} but the "
                          f"model input is {shape}.")
    return real


def _parity(model: nn.Module, sess, rand: torch.Tensor, real, parity_tolerance: float,
            out_path: Path) -> dict[str, float | None]:
    """max |onnxruntime - torch| on random and real images; over the tolerance the file is
    removed and :class:`VerificationError` raised."""
    parity = {"random": float(np.abs(ort_run(sess, rand) - _torch_logits(model, rand)).max()),
              "real": None}
    if real is not None:
        parity["real"] = float(np.abs(ort_run(sess, real) - _torch_logits(model, real)).max())
    worst = max(v for v in parity.values() if v is not None)
    if not np.isfinite(worst) or worst > parity_tolerance:
        out_path.unlink(missing_ok=True)
        raise VerificationError(
            f"{OWNER}: onnxruntime and torch disagree by {worst:.3g} (> {parity_tolerance:g}) "
            f"on {getattr(model, 'arch', '?')}; the ONNX file was removed. Try another opset.")
    return parity


def _reference_session(reference, tmpdir: str, shape, opset: int, threads: int,
                       exporter: dict[str, Any]):
    """The reference model (a copy, eval, CPU) and its onnxruntime session, its export info
    recorded in ``exporter["reference"]``; ``(None, None)`` without a reference."""
    if reference is None:
        return None, None
    reference = copy.deepcopy(reference).eval().cpu()
    ref_path = Path(tmpdir) / "reference.onnx"
    exporter["reference"] = export_onnx_file(reference, ref_path, shape, opset)
    return reference, ort_session(ref_path, threads)


def _int8(out_path: Path, quantize, real, rand, sess, dataset, threads: int):
    """The int8 model (``quantize`` mode) and its record: parity vs float32 ONNX and, with a
    dataset, the delta macro AUROC; ``(None, None)`` without ``quantize``."""
    if quantize is None:
        return None, None
    q_path = _quantize(out_path, quantize, real)
    q_sess = ort_session(q_path, threads)
    probe = real if real is not None else rand
    quant = {"mode": quantize, "path": str(q_path), "file_bytes": q_path.stat().st_size,
             "max_abs_delta_vs_fp32": float(np.abs(ort_run(q_sess, probe)
                                                   - ort_run(sess, probe)).max())}
    if dataset is not None:
        fp = _dataset_logits(sess, dataset)
        q8 = _dataset_logits(q_sess, dataset)
        a_fp, a_q = _macro_auroc(fp, dataset), _macro_auroc(q8, dataset)
        quant.update({"macro_auroc_fp32": a_fp, "macro_auroc_int8": a_q,
                      "delta_macro_auroc": a_q - a_fp,
                      "max_abs_delta_dataset": float(np.abs(q8 - fp).max()),
                      "n_images": len(dataset)})
    return quant, q_sess


def _timed_table(threads: int, *args) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """:func:`_latency_table` with torch's intra-op threads set to ``threads`` (restored)."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _latency_table(*args)
    finally:
        torch.set_num_threads(prev_threads)


# ----------------------------------------------------------------------------- public API
def export_onnx(
    model: nn.Module,
    out_path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 32),
    opset: int = DEFAULT_OPSET,
    reference: nn.Module | None = None,
    dataset=None,
    real_images: torch.Tensor | None = None,
    quantize: str | None = None,
    input_size: Sequence[int] | None = None,
    parity_tolerance: float = 1e-3,
    warmup: int = 3,
    repeats: int = 10,
    rounds: int = 3,
    threads: int | None = None,
    n_real: int = 32,
    seed: int = 0,
) -> ExportResult:
    """Export ``model`` to ONNX (dynamic batch), check onnxruntime parity, time it on the CPU
    against a reference model in the same run, and optionally quantise it to int8.

    Args:
        model: the (compressed) model to export.
        out_path: the ``.onnx`` file to write.
        batch_sizes: batch sizes for the latency table.
        opset: ONNX opset (>= 18 for the dynamo exporter; lower uses the TorchScript one).
        reference: the dense model to compare latency with (measured alternately with
            ``model``, ``rounds`` times, in this process). ``None``: no ratio.
        dataset: real images for parity / calibration, and the split on which the int8 model's
            delta macro AUROC is computed.
        real_images: real images ``[N, C, H, W]`` (instead of / besides ``dataset``).
        quantize: ``None``, ``"dynamic"`` (int8 weights, onnxruntime ``quantize_dynamic``) or
            ``"static"`` (QDQ U8S8: uint8 activations calibrated on the real images, per-channel
            int8 weights; see :func:`quantize_onnx`).
        input_size: ``(C, H, W)`` when neither the card, the data nor ``arch_kwargs`` tell it.
        parity_tolerance: refuse (:class:`VerificationError`, file removed) when onnxruntime
            and torch differ by more than this.
        threads: intra-op threads for both runtimes (default: torch's current setting).

    Returns:
        An :class:`ExportResult`.
    """
    t0 = time.perf_counter()
    _validate(batch_sizes, opset, repeats, rounds, parity_tolerance, quantize, real_images)
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        out_path = out_path.with_suffix(".onnx")
    threads = int(threads or torch.get_num_threads())
    model = copy.deepcopy(model).eval().cpu()
    shape = _input_shape(model, dataset, real_images, input_size)
    real = _real(real_images, dataset, n_real, seed, shape)
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn(4, *shape, generator=gen)

    exporter = export_onnx_file(model, out_path, shape, opset)
    sess = ort_session(out_path, threads)
    parity = _parity(model, sess, rand, real, parity_tolerance, out_path)
    example = (real[:1] if real is not None else rand[:1]).float()
    tmpdir = tempfile.mkdtemp(prefix="medscalpel-ref-")
    try:
        reference, ref_sess = _reference_session(reference, tmpdir, shape, opset, threads,
                                                 exporter)
        quant, q_sess = _int8(out_path, quantize, real, rand, sess, dataset, threads)
        rows, speedup = _timed_table(threads, model, reference, sess, ref_sess, q_sess, example,
                                     batch_sizes, warmup, repeats, rounds)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    return ExportResult(
        onnx_path=str(out_path), opset=int(exporter["opset"] or opset), exporter=exporter,
        input_shape=[int(s) for s in shape], parity=parity,
        latency=rows, speedup=speedup, file_bytes=out_path.stat().st_size, quantization=quant,
        reference=getattr(getattr(reference, "card", None), "model_id", None)
        or (getattr(reference, "arch", None) if reference is not None else None),
        threads=threads, seconds=round(time.perf_counter() - t0, 3),
        versions=_versions(onnxruntime.__version__))


def _versions(ort_version: str) -> dict[str, str]:
    out = {"torch": torch.__version__, "onnxruntime": ort_version}
    for name in ("onnx", "onnxscript"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _latency_table(model, reference, sess, ref_sess, q_sess, example, batch_sizes, warmup,
                   repeats, rounds) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Alternate the measurements (model, reference, int8) ``rounds`` times; keep medians."""
    samples: dict[tuple[str, str, int], list[float]] = {}

    def add(runtime: str, who: str, b: int, ms: float) -> None:
        samples.setdefault((runtime, who, b), []).append(ms)

    for _ in range(rounds):
        for b in batch_sizes:
            add("torch", "model", b, cpu_latency(model, example, b, warmup, repeats))
            add("onnxruntime", "model", b, ort_latency(sess, example, b, warmup, repeats))
            if reference is not None:
                add("torch", "reference", b, cpu_latency(reference, example, b, warmup, repeats))
                add("onnxruntime", "reference", b, ort_latency(ref_sess, example, b, warmup,
                                                               repeats))
            if q_sess is not None:
                add("onnxruntime", "int8", b, ort_latency(q_sess, example, b, warmup, repeats))
    rows = [{"runtime": rt, "model": who, "batch": b, "ms": float(statistics.median(v))}
            for (rt, who, b), v in samples.items()]
    med = {(r["runtime"], r["model"], r["batch"]): r["ms"] for r in rows}
    speedup: dict[str, float] = {}
    for (rt, who, b), ms in med.items():
        if who == "reference":
            continue
        ref = med.get((rt, "reference", b))
        if ref is not None:
            speedup[f"{rt}{'' if who == 'model' else '-' + who}@b{b}"] = ref / ms
        if who == "int8" and (rt, "model", b) in med:
            speedup[f"int8-vs-fp32@b{b}"] = med[(rt, "model", b)] / ms
    return rows, speedup


__all__ = ["DEFAULT_OPSET", "DYNAMO_MIN_OPSET", "EXPORTERS", "ExportResult", "INPUT", "OUTPUT",
           "TORCHSCRIPT_ARCHS", "choose_exporter", "cpu_flags", "export_onnx",
           "export_onnx_file", "has_vnni", "logits_only_onnx", "ort_latency", "ort_run",
           "ort_session", "preferred_exporter", "quantize_onnx"]
