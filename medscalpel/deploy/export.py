"""Deployment export: ONNX with an onnxruntime parity check, CPU latency against the dense
reference measured in the same run, and optional int8 quantisation through onnxruntime.

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

import contextlib
import contextvars
import copy
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import onnxruntime as ort
import torch
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from torch import nn

from medscalpel.compress.measure import cpu_latency, eval_mode
from medscalpel.deploy.timing import median_ms
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import make_loader
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, ModelError, VerificationError
from medscalpel.runs import cpu_flags, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

OWNER = "export_onnx"
INPUT, OUTPUT = "images", "logits"


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
#: leaves the file at 18).
DYNAMO_MIN_OPSET = 18
DEFAULT_OPSET = 18

#: architectures exported with the TorchScript exporter, with the reason (the dynamo exporter's
#: error). Empty: every zoo architecture (densenet121/_tiny/_small, resnet18/50/_tiny, vgg19_bn,
#: vgg_tiny, mobilenetv3_small/large_100, efficientnet_b0, deit_tiny, visformer_small, vit_test)
#: and CamHead exports with the dynamo exporter at torch 2.14.1 / onnxscript 0.7.2
#: (tests/test_export_dynamo.py checks the parity per architecture). An architecture that fails
#: later goes here with the error it raised.
TORCHSCRIPT_ARCHS: dict[str, str] = {}

EXPORTERS = ("auto", "dynamo", "torchscript")


def _arch(model: nn.Module) -> str:
    inner = getattr(model, "model", None)  # CamHead wraps the classifier
    return str(getattr(model, "arch", None) or getattr(inner, "arch", None)
               or type(model).__name__)


#: a caller's preference for ``exporter="auto"`` exports in its block (see
#: :func:`preferred_exporter`): ``(exporter, reason)`` or ``None``
_PREFERRED: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "medscalpel_preferred_exporter", default=None)


@contextlib.contextmanager
def preferred_exporter(exporter: str, reason: str) -> Iterator[None]:
    """Within the block, ``exporter="auto"`` exports use ``exporter``, recorded with
    ``reason`` (e.g. the demo's time budget: the dynamo exporter takes 2-35 s per model where
    the TorchScript one takes 0.1-4 s)."""
    check_in(exporter, "exporter", "preferred_exporter", EXPORTERS)
    token = _PREFERRED.set((exporter, reason))
    try:
        yield
    finally:
        _PREFERRED.reset(token)


def choose_exporter(model: nn.Module, opset: int, exporter: str = "auto") -> tuple[str, str]:
    """``(exporter, reason)``: the explicit choice (``"dynamo"`` or ``"torchscript"``), else a
    caller's :func:`preferred_exporter`, else the TorchScript exporter for an opset below
    :data:`DYNAMO_MIN_OPSET` or an architecture in :data:`TORCHSCRIPT_ARCHS`, the dynamo
    exporter otherwise."""
    check_in(exporter, "exporter", "export_onnx_file", EXPORTERS)
    if exporter != "auto":
        return exporter, "requested"
    pref = _PREFERRED.get()
    if pref is not None and pref[0] != "auto":
        return pref[0], f"preferred by the caller: {pref[1]}"
    if opset < DYNAMO_MIN_OPSET:
        return "torchscript", (f"opset {opset} requested; the dynamo exporter writes opset "
                               f">= {DYNAMO_MIN_OPSET}")
    arch = _arch(model)
    if arch in TORCHSCRIPT_ARCHS:
        return "torchscript", f"{arch}: {TORCHSCRIPT_ARCHS[arch]}"
    return "dynamo", "default"


def _export_dynamo(model: nn.Module, tmp: Path, shape: Sequence[int], opset: int,
                   outputs: list[str]) -> None:
    # batch 2 in the example: torch.export specialises a dimension of size 1
    x = torch.zeros(2, *shape)
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset,
                                input_names=[INPUT], output_names=outputs,
                                dynamic_shapes=({0: torch.export.Dim("batch")},),
                                optimize=True, verbose=False, report=False)
    program.save(str(tmp), external_data=False)
    _strip_node_metadata(tmp)


def _strip_node_metadata(path: Path) -> None:
    """Drop the dynamo exporter's per-node ``metadata_props`` (Python stack traces with this
    machine's file paths, FX node text: over half of a small model's file); the graph, the
    weights and the model-level metadata stay."""

    proto = onnx.load(str(path))
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        del node.metadata_props[:]
    onnx.save(proto, str(path))


def _export_torchscript(model: nn.Module, tmp: Path, shape: Sequence[int], opset: int,
                        outputs: list[str]) -> None:
    x = torch.zeros(1, *shape)
    with warnings.catch_warnings():
        # the deprecation warning of the TorchScript exporter: this path is chosen on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=outputs,
                          dynamic_axes={INPUT: {0: "batch"},
                                        **{o: {0: "batch"} for o in outputs}},
                          do_constant_folding=True)


def export_onnx_file(model: nn.Module, path: str | os.PathLike, shape: Sequence[int],
                     opset: int = DEFAULT_OPSET, exporter: str = "auto") -> dict[str, Any]:
    """Write ``model`` (eval mode, dynamic batch) to ``path`` atomically; checked by onnx. A
    model with several outputs names them in ``model.output_names`` (e.g.
    :class:`~medscalpel.deploy.cam_head.CamHead`: logits and class activation maps); the
    first is always the logits.

    The dynamo-based exporter is used unless :func:`choose_exporter` picks the TorchScript one
    (opset < 18, an architecture in :data:`TORCHSCRIPT_ARCHS`, or ``exporter="torchscript"``).
    With ``exporter="auto"``, a dynamo failure falls back to the TorchScript exporter, logged as
    a warning and recorded with the error (``fallback: True``).

    Returns:
        ``{"exporter", "reason", "fallback", "opset", "dynamo_error"}``: which exporter wrote
        the file, why, and the opset the file declares.
    """

    path = Path(path)
    arch = _arch(model)
    chosen, reason = choose_exporter(model, opset, exporter)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    info: dict[str, Any] = {"exporter": chosen, "reason": reason, "fallback": False,
                            "opset": None, "dynamo_error": None}
    try:
        outputs = list(getattr(model, "output_names", (OUTPUT,)))
        with eval_mode(model), torch.no_grad():
            if chosen == "dynamo":
                try:
                    _export_dynamo(model, tmp, shape, opset, outputs)
                except Exception as exc:  # noqa: BLE001 - recorded and logged, never silent
                    if exporter != "auto":
                        raise
                    err = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                    logger.warning("%s: the dynamo ONNX exporter failed on %s (%s); falling "
                                   "back to the TorchScript exporter", OWNER, arch, err)
                    if tmp.exists():
                        tmp.unlink()
                    info.update(exporter="torchscript", fallback=True, dynamo_error=err,
                                reason=f"fallback: the dynamo exporter failed ({err})")
                    _export_torchscript(model, tmp, shape, opset, outputs)
            else:
                _export_torchscript(model, tmp, shape, opset, outputs)
        onnx.checker.check_model(str(tmp))
        declared = onnx.load(str(tmp), load_external_data=False).opset_import
        info["opset"] = next((int(o.version) for o in declared if o.domain in ("", "ai.onnx")),
                             None)
        os.replace(tmp, path)
    except Exception as exc:
        if tmp.exists():
            tmp.unlink()
        if isinstance(exc, (ConfigError, ModelError)):
            raise
        raise ModelError(f"{OWNER}: exporting {arch} to ONNX (opset {opset}, "
                         f"{info['exporter']} exporter) failed: {type(exc).__name__}: "
                         f"{exc}.") from exc
    if info["exporter"] == "torchscript" and not info["fallback"]:
        logger.info("%s: %s exported with the TorchScript exporter (%s)", OWNER, arch,
                    info["reason"])
    return info


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


def logits_only_onnx(path: str | os.PathLike) -> tuple[bytes | None, list[str]]:
    """The prediction path of an ONNX file with several outputs (e.g. ``logits`` + the CAM
    output): the subgraph that computes only its FIRST output (the logits), serialized, so a
    session of it never runs the nodes only the other outputs need; ``None`` when the file has
    one output. Also returns the file's output names."""
    proto = onnx.load(str(path))
    names = [o.name for o in proto.graph.output]
    if len(names) < 2:
        return None, names
    inputs = [i.name for i in proto.graph.input
              if i.name not in {t.name for t in proto.graph.initializer}]
    sub = onnx.utils.Extractor(proto).extract_model(inputs, names[:1])
    sub.ir_version = proto.ir_version  # make_model would stamp the newest IR version
    return sub.SerializeToString(), names


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


class _Calib:
    """onnxruntime CalibrationDataReader over calibration images."""

    def __init__(self, images: torch.Tensor, batch_size: int = 8):
        self.batches = [images[i:i + batch_size].float().numpy()
                        for i in range(0, images.shape[0], batch_size)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {INPUT: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def quantize_onnx(fp32: str | os.PathLike, out: str | os.PathLike, mode: str = "static",
                  calib: torch.Tensor | None = None, activation: str = "u8",
                  reduce_range: bool | None = None) -> dict[str, Any]:
    """int8-quantise an ONNX file with onnxruntime; returns the settings used.

    Static mode writes QDQ with per-channel int8 weights and ``activation`` (``"u8"``: U8S8,
    the onnxruntime default recommended on x86; ``"s8"``: S8S8) calibrated on ``calib`` images
    (take them from the training distribution). Only Conv / MatMul / Gemm are quantised: a
    quantised Concat becomes ``QLinearConcat``, which fails on fine-tuned DenseNets whose
    concatenated inputs have different scales, so concatenations stay in float. On AVX2
    without VNNI, U8S8 weights use 7 bits (``reduce_range``) against ``vpmaddubsw`` saturation,
    as the onnxruntime docs advise.
    """
    check_in(mode, "mode", "quantize_onnx", ("dynamic", "static"))
    check_in(activation, "activation", "quantize_onnx", ("u8", "s8"))
    if reduce_range is None:
        reduce_range = activation == "u8" and not has_vnni()
    root = logging.getLogger()
    level = root.level
    # onnxruntime.quantization logs per-tensor notes on the root logger: quiet them while it runs
    root.setLevel(max(level, logging.ERROR))
    try:
        _quantize_files(Path(fp32), Path(out), mode, calib, activation, bool(reduce_range))
    finally:
        root.setLevel(level)
    return {"mode": mode, "activation": activation, "weights": "s8 per-channel",
            "format": "QDQ" if mode == "static" else "dynamic", "reduce_range": bool(reduce_range),
            "op_types": list(_QUANT_OPS), "calibration_images": None if calib is None
            else int(calib.shape[0])}


_QUANT_OPS = ("Conv", "MatMul", "Gemm")


def _quantize(fp32: Path, mode: str, calib: torch.Tensor | None) -> Path:
    out = fp32.with_name(fp32.stem + f".int8-{mode}.onnx")
    quantize_onnx(fp32, out, mode, calib)
    return out


def _quantize_files(fp32: Path, out: Path, mode: str, calib: torch.Tensor | None,
                    activation: str, reduce_range: bool) -> None:

    src = fp32
    with tempfile.TemporaryDirectory() as tmp:
        try:  # the recommended pre-processing (shape inference + graph optimisation)
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception as exc:  # noqa: BLE001 - pre-processing is optional
            logger.info("quant_pre_process skipped: %s", exc)
        if mode == "dynamic":
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(_QUANT_OPS))
            return
        if calib is None:
            raise ConfigError(f"{OWNER}: static int8 quantization needs calibration images "
                              "(real_images or a dataset).")

        class Reader(_Calib, CalibrationDataReader):
            pass

        act = QuantType.QUInt8 if activation == "u8" else QuantType.QInt8
        quantize_static(str(src), str(out), Reader(calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=act, weight_type=QuantType.QInt8,
                        reduce_range=reduce_range, op_types_to_quantize=list(_QUANT_OPS))


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
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        out_path = out_path.with_suffix(".onnx")
    threads = int(threads or torch.get_num_threads())
    model = copy.deepcopy(model).eval().cpu()
    shape = _input_shape(model, dataset, real_images, input_size)

    real = real_images
    if real is None and dataset is not None:
        from medscalpel.engine.predict import collect_images

        real, _ = collect_images(dataset, n_real, seed=seed)
    if real is not None and tuple(real.shape[1:]) != tuple(shape):
        raise ConfigError(f"{OWNER}: real images have shape {tuple(real.shape[1:])} but the "
                          f"model input is {shape}.")
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn(4, *shape, generator=gen)

    exporter = export_onnx_file(model, out_path, shape, opset)
    sess = ort_session(out_path, threads)
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

    example = (real[:1] if real is not None else rand[:1]).float()
    ref_sess = None
    tmpdir = tempfile.mkdtemp(prefix="medscalpel-ref-")
    try:
        if reference is not None:
            reference = copy.deepcopy(reference).eval().cpu()
            ref_path = Path(tmpdir) / "reference.onnx"
            exporter["reference"] = export_onnx_file(reference, ref_path, shape, opset)
            ref_sess = ort_session(ref_path, threads)

        quant: dict[str, Any] | None = None
        q_sess = None
        if quantize is not None:
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

        prev_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            rows, speedup = _latency_table(model, reference, sess, ref_sess, q_sess, example,
                                           batch_sizes, warmup, repeats, rounds)
        finally:
            torch.set_num_threads(prev_threads)
    finally:
        import shutil

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


__all__ = ["DYNAMO_MIN_OPSET", "ExportResult", "TORCHSCRIPT_ARCHS", "choose_exporter",
           "cpu_flags", "export_onnx", "export_onnx_file", "has_vnni", "logits_only_onnx",
           "ort_latency", "ort_run", "ort_session", "quantize_onnx"]
