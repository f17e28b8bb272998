"""CPU runtimes x precisions for :func:`medscalpel.deploy.flow.deploy`.

Each variant is a small :class:`Runtime` subclass registered in :data:`RUNTIMES` under
``"<runtime>:<precision>"``: it says whether it can run here (:meth:`Runtime.available`),
builds its artifact from the float32 model (:meth:`Runtime.prepare`: export, quantise, compile)
and runs a batch (:meth:`Runtime.run`, numpy in, logits out). The optional runtimes (OpenVINO,
NNCF) raise :class:`~medscalpel.errors.MissingExtraError` naming the ``deploy`` extra.

Example:
    >>> import numpy as np, tempfile, torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("vgg_tiny", num_classes=2, img_size=32).eval()
    >>> rt = RUNTIMES.create("onnxruntime:fp32", threads=1)
    >>> rt.prepare(m, torch.zeros(4, 1, 32, 32), None, tempfile.mkdtemp())
    >>> rt.run(np.zeros((2, 1, 32, 32), np.float32)).shape
    (2, 2)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from medscalpel.deploy.export import (INPUT, cpu_flags, export_onnx_file, has_vnni,
                                      logits_only_onnx, ort_session, quantize_onnx)
from medscalpel.deploy.timing import median_ms
from medscalpel.errors import ConfigError, optional_import
from medscalpel.registry import Registry

logger = logging.getLogger(__name__)

RUNTIMES: Registry["Runtime"] = Registry("deployment runtime")

#: largest |delta logit| vs torch float32, relative to the reference logit scale (max |logit|),
#: per precision. float32 must match; for bf16 / int8 it is a sanity bound against a broken
#: conversion (the accuracy floor on delta AUROC is the real test of a reduced precision).
PARITY_TOLERANCE = {"fp32": 1e-3, "bf16": 0.05, "int8": 0.5}


def openvino():
    """The ``openvino`` module, or :class:`MissingExtraError` naming the ``deploy`` extra."""
    return optional_import("openvino", "deploy", "OpenVINO deployment")


def nncf():
    """The ``nncf`` module, or :class:`MissingExtraError` naming the ``deploy`` extra."""
    return optional_import("nncf", "deploy", "int8 quantization for OpenVINO")


class Runtime:
    """One runtime at one precision. Subclasses set ``runtime``/``precision`` and implement
    :meth:`prepare` and :meth:`run`; :meth:`available` returns ``None`` or why not here."""

    runtime: str = ""
    precision: str = "fp32"

    def __init__(self, threads: int = 1):
        self.threads = int(threads)
        self.files: list[Path] = []  # artifact files (removed when the variant is refused)
        self.info: dict[str, Any] = {}  # settings worth reporting (quantisation, precision)

    @property
    def name(self) -> str:
        return f"{self.runtime}:{self.precision}"

    @property
    def tolerance(self) -> float:
        """Parity tolerance (relative to the logit scale) of this precision."""
        return PARITY_TOLERANCE["int8" if self.precision.startswith("int8") else self.precision]

    def available(self) -> str | None:
        return None

    def prepare(self, model: nn.Module, example: torch.Tensor, calib: torch.Tensor | None,
                workdir: str | os.PathLike) -> None:
        raise NotImplementedError

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def run_outputs(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output of the artifact (logits first; e.g. class activation maps second)."""
        return [self.run(x)]

    def remove_files(self) -> None:
        for f in self.files:
            if f.is_dir():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)
        self.files = []

    def serve_files(self) -> list[Path]:
        """The files a server needs (copied into ``deploy``'s ``serve/``)."""
        return list(self.files)


def _register(cls: type[Runtime]) -> type[Runtime]:
    RUNTIMES.register(f"{cls.runtime}:{cls.precision}", help=(cls.__doc__ or "").split("\n")[0])(
        cls)
    return cls


# ----------------------------------------------------------------------------- torch
@_register
class TorchEager(Runtime):
    """PyTorch eager mode, float32 (the reference)."""

    runtime, precision = "torch", "fp32"

    def _convert(self, model: nn.Module) -> nn.Module:
        return model

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def prepare(self, model, example, calib, workdir) -> None:
        self.model = self._convert(copy.deepcopy(model).eval().cpu().float())
        self.run(example[:1].numpy())

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_outputs(x)[0]

    def run_outputs(self, x: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            out = self.model(self._input(torch.from_numpy(np.ascontiguousarray(x))))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.float().numpy() for o in outs]


@_register
class TorchChannelsLast(TorchEager):
    """PyTorch eager mode with channels-last (NHWC) memory format, float32."""

    runtime = "torch_channels_last"

    def _convert(self, model):
        return model.to(memory_format=torch.channels_last)

    def _input(self, x):
        return x.contiguous(memory_format=torch.channels_last)


@_register
class TorchCompile(TorchEager):
    """torch.compile (inductor, C++ codegen), float32."""

    runtime = "torch_compile"

    def available(self) -> str | None:
        if shutil.which("g++") is None and shutil.which("c++") is None:
            return "no C++ compiler for inductor's CPU code"
        return None

    def _convert(self, model):
        return torch.compile(model, dynamic=False)

    def prepare(self, model, example, calib, workdir) -> None:
        super().prepare(model, example, calib, workdir)
        self.info["note"] = "recompiles once per batch size (dynamic=False)"


# ----------------------------------------------------------------------------- onnxruntime
#: beside the shared ONNX file of a work folder: how it was exported (which exporter, why)
EXPORT_INFO = "export_info.json"


def onnx_once(model: nn.Module, example: torch.Tensor, workdir: str | Path, filename: str
              ) -> tuple[Path, dict[str, Any]]:
    """The fp32 ONNX file every ONNX-based variant of one work folder starts from, exported on
    first use, and how it was exported (:func:`export_onnx_file`'s record: exporter, reason,
    fallback, opset), kept beside it so that variants built later report the same record."""
    path = Path(workdir) / "onnx" / filename
    side = path.with_name(EXPORT_INFO)
    if not path.exists():
        info = export_onnx_file(model, path, tuple(example.shape[1:]))
        side.write_text(json.dumps(info, default=str))
    return path, (json.loads(side.read_text()) if side.is_file() else
                  {"exporter": "unknown", "reason": f"{path} existed before this run"})


@_register
class OrtFp32(Runtime):
    """ONNX Runtime CPU, float32 (graph optimisation ORT_ENABLE_ALL)."""

    runtime, precision = "onnxruntime", "fp32"
    filename = "model.onnx"

    def _build(self, model, example, calib, workdir) -> Path:
        path, self.info["export"] = onnx_once(model, example, workdir, self.filename)
        return path

    def prepare(self, model, example, calib, workdir) -> None:
        path = self._build(model, example, calib, workdir)
        self.files = [path]
        self.session = ort_session(path, self.threads)
        # a graph with more outputs than the logits (the CAM output) predicts through its
        # logits-only subgraph: predictions never run what only the maps need
        sub, _ = logits_only_onnx(path)
        self.predict_session = self.session if sub is None else ort_session(sub, self.threads)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.predict_session.run(None, {INPUT: np.ascontiguousarray(x, np.float32)})[0]

    def run_outputs(self, x: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(None, {INPUT: np.ascontiguousarray(x, np.float32)}))


class _OrtInt8(OrtFp32):
    activation = "u8"

    def _build(self, model, example, calib, workdir) -> Path:
        fp32 = OrtFp32._build(self, model, example, calib, workdir)
        if calib is None:
            raise ConfigError(f"{self.name} needs calibration images (the training split).")
        out = fp32.with_name(f"model.{self.precision}.onnx")
        self.info.update(quantize_onnx(fp32, out, "static", calib, activation=self.activation))
        self.info["vnni"] = has_vnni()
        return out


@_register
class OrtInt8U8S8(_OrtInt8):
    """ONNX Runtime int8 QDQ, uint8 activations x int8 per-channel weights (x86 default)."""

    precision, activation = "int8-u8s8", "u8"


@_register
class OrtInt8S8S8(_OrtInt8):
    """ONNX Runtime int8 QDQ, int8 activations x int8 per-channel weights."""

    precision, activation = "int8-s8s8", "s8"


# ----------------------------------------------------------------------------- OpenVINO
@functools.lru_cache(maxsize=1)
def openvino_core() -> Any:
    """The process's one ``openvino.Core``: every read and compile goes through it (two compiled
    models of one runtime, each from its own Core, crashed the process later, in a subprocess
    call, after they were collected)."""
    return openvino().Core()


def openvino_capabilities() -> list[str]:
    """The OpenVINO CPU plugin's OPTIMIZATION_CAPABILITIES (e.g. FP32, BF16, INT8)."""
    return [str(c) for c in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def logits_only_openvino(xml: str | os.PathLike) -> Any | None:
    """The prediction path of an OpenVINO IR with several outputs (e.g. ``logits`` + the CAM
    output): the model read from ``xml`` keeping only its FIRST result (nodes no result needs
    are not compiled), or ``None`` when it has one output."""
    model = openvino_core().read_model(str(xml))
    if len(model.outputs) < 2:
        return None
    for result in list(model.get_results())[1:]:
        model.remove_result(result)
    model.validate_nodes_and_infer_types()
    return model


def compile_openvino(model: Any, hint: str, threads: int):
    """Compile an OpenVINO model (or the path of its IR) for the CPU at one explicit inference
    precision (``"f32"`` / ``"bf16"``; never left to the plugin), latency-oriented."""
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": int(threads),
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    return openvino_core().compile_model(model if not isinstance(model, Path) else str(model),
                                           "CPU", config)


@_register
class OpenVinoFp32(Runtime):
    """OpenVINO CPU plugin, INFERENCE_PRECISION_HINT=f32 set explicitly (it would silently
    use bf16 on avx512_bf16 / AMX CPUs)."""

    runtime, precision = "openvino", "fp32"
    hint = "f32"

    def available(self) -> str | None:
        openvino()  # MissingExtraError when the extra is absent
        return None

    def _ir(self, model, example, workdir) -> Path:
        ov = openvino()
        xml = Path(workdir) / "openvino" / "model.xml"
        onnx_path, self.info["export"] = onnx_once(model, example, workdir, OrtFp32.filename)
        if not xml.exists():
            ov_model = ov.convert_model(str(onnx_path))
            xml.parent.mkdir(parents=True, exist_ok=True)
            ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        return xml

    def _model(self, model, example, calib, workdir):
        xml = self._ir(model, example, workdir)
        self.files = [xml, xml.with_suffix(".bin")]
        return openvino_core().read_model(str(xml))

    def prepare(self, model, example, calib, workdir) -> None:
        ov_model = self._model(model, example, calib, workdir)
        self.compiled = compile_openvino(ov_model, self.hint, self.threads)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        used = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.info.update({"inference_precision_hint": self.hint, "precision_used": used})
        self.request = self.compiled.create_infer_request()
        # several outputs (the CAM output): predictions run the logits-only copy of the graph
        sub = logits_only_openvino(self.files[0])
        self.predict_compiled = (self.compiled if sub is None else
                                 compile_openvino(sub, self.hint, self.threads))
        self.predict_request = (self.request if sub is None else
                                self.predict_compiled.create_infer_request())

    def run(self, x: np.ndarray) -> np.ndarray:
        res = self.predict_request.infer({0: np.ascontiguousarray(x, np.float32)})
        return np.asarray(res[self.predict_compiled.output(0)], dtype=np.float32).copy()

    def run_outputs(self, x: np.ndarray) -> list[np.ndarray]:
        res = self.request.infer({0: np.ascontiguousarray(x, np.float32)})
        return [np.asarray(res[o], dtype=np.float32).copy() for o in self.compiled.outputs]


@_register
class OpenVinoBf16(OpenVinoFp32):
    """OpenVINO CPU plugin, INFERENCE_PRECISION_HINT=bf16 (needs avx512_bf16 or AMX)."""

    precision, hint = "bf16", "bf16"

    def available(self) -> str | None:
        if "BF16" not in openvino_capabilities():
            return ("no bf16 on this CPU (OpenVINO reports no BF16 capability: needs "
                    "avx512_bf16 or AMX); the hint would silently run f32")
        return None


@_register
class OpenVinoInt8(OpenVinoFp32):
    """OpenVINO CPU plugin, int8 from NNCF post-training quantization (default preset)."""

    precision = "int8"

    def available(self) -> str | None:
        nncf()
        if "INT8" not in openvino_capabilities():
            return "OpenVINO reports no INT8 capability on this CPU"
        return None

    def _quantize(self, ov_model, calib: torch.Tensor):
        n = nncf()
        data = n.Dataset([calib[i:i + 1].numpy() for i in range(calib.shape[0])])
        return n.quantize(ov_model, data, subset_size=int(calib.shape[0]))

    def _model(self, model, example, calib, workdir):
        ov = openvino()
        if calib is None:
            raise ConfigError(f"{self.name} needs calibration images (the training split).")
        fp32 = OpenVinoFp32._model(self, model, example, calib, workdir)
        q = _quiet(lambda: self._quantize(fp32, calib))
        xml = Path(workdir) / "openvino" / f"model.{self.precision}.xml"
        ov.save_model(q, str(xml), compress_to_fp16=False)
        self.files = [xml, xml.with_suffix(".bin")]
        self.info.update({"quantizer": "nncf.quantize", "calibration_images": int(calib.shape[0]),
                          "vnni": has_vnni()})
        return q


@_register
class OpenVinoInt8AccuracyControl(OpenVinoInt8):
    """OpenVINO int8 from NNCF quantize_with_accuracy_control driven by per-class AUROC."""

    precision = "int8-ac"

    def __init__(self, threads: int = 1, validation: tuple[np.ndarray, np.ndarray] | None = None,
                 max_drop: float = 0.01, metric: Callable[[np.ndarray], float] | None = None):
        super().__init__(threads)
        self.validation = validation
        self.max_drop = float(max_drop)
        self.metric = metric

    def available(self) -> str | None:
        reason = super().available()
        if reason is None and (self.validation is None or self.metric is None):
            return "accuracy control needs labelled validation images and a metric"
        return reason

    def _quantize(self, ov_model, calib):
        n = nncf()
        images, _ = self.validation
        cal = n.Dataset([calib[i:i + 1].numpy() for i in range(calib.shape[0])])
        val = n.Dataset([images[i:i + 8] for i in range(0, images.shape[0], 8)])
        metric = self.metric

        def validate(compiled, batches) -> float:
            out = np.concatenate([np.asarray(compiled(b)[compiled.output(0)]) for b in batches])
            return float(metric(out))

        q = n.quantize_with_accuracy_control(ov_model, cal, val, validation_fn=validate,
                                             max_drop=self.max_drop,
                                             drop_type=n.DropType.ABSOLUTE,
                                             subset_size=int(calib.shape[0]))
        self.info["accuracy_control"] = {"max_drop": self.max_drop, "metric":
                                         "1 + min(worst per-class dAUROC, 2 x macro dAUROC) vs "
                                         "torch fp32"}
        return q


def _quiet(fn: Callable[[], Any]) -> Any:
    """Run NNCF with its INFO logs and its progress bars (printed to stdout) quietened."""
    nlog = logging.getLogger("nncf")
    level = nlog.level
    nlog.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return fn()
    finally:
        nlog.setLevel(level)


def cpu_features() -> dict[str, bool]:
    """The CPU features that decide which precisions pay off here."""
    flags = cpu_flags()
    return {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "vnni": has_vnni(flags),
            "avx512_bf16": "avx512_bf16" in flags, "amx": bool(flags & {"amx_bf16", "amx_int8"})}


def vector_width() -> int:
    """fp32 lanes of the widest vector unit here (16 with AVX-512, else 8): channel counts
    that are multiples of it fill the registers of convolution kernels."""
    return 16 if "avx512f" in cpu_flags() else 8


def time_runtime(rt: Runtime, x: np.ndarray, warmup: int = 2, repeats: int = 5) -> float:
    """Median ms of ``rt.run(x)`` over ``repeats`` runs after ``warmup`` runs."""
    return median_ms(lambda: rt.run(x), warmup, repeats)


def runtime_latency(model: nn.Module, runtime: str, example: torch.Tensor, batch_size: int = 1,
                    threads: int = 1, warmup: int = 2, repeats: int = 5) -> float:
    """Median batch latency (ms) of ``model`` in a registered runtime variant (e.g.
    ``"onnxruntime:fp32"``, ``"openvino:fp32"``), built in a temporary directory."""

    rt = RUNTIMES.create(runtime, threads=threads)
    reason = rt.available()
    if reason is not None:
        raise ConfigError(f"The runtime '{runtime}' cannot run here: {reason}.")
    x = np.ascontiguousarray(np.repeat(example[:1].float().numpy(), batch_size, axis=0))
    with tempfile.TemporaryDirectory(prefix="medscalpel-rt-") as tmp:
        rt.prepare(model, example[:1].float(), None, tmp)
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return time_runtime(rt, x, warmup, repeats)
        finally:
            torch.set_num_threads(prev)


__all__ = ["PARITY_TOLERANCE", "RUNTIMES", "Runtime", "compile_openvino", "cpu_features",
           "logits_only_openvino", "openvino", "openvino_core", "openvino_capabilities", "nncf", "runtime_latency",
           "time_runtime", "vector_width"]
