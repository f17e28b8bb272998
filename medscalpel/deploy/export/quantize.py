"""int8 quantisation of ONNX files with onnxruntime (static QDQ U8S8 / S8S8, or dynamic).

:func:`quantize_onnx` quantises Conv / MatMul / Gemm only (a quantised Concat fails on
fine-tuned DenseNets) with calibration images read through a
:class:`~onnxruntime.quantization.CalibrationDataReader`; :func:`has_vnni` tells whether the CPU
has int8 dot-product instructions (without them U8S8 weights use 7 bits).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)

from medscalpel.deploy.export.onnx_file import INPUT, OWNER
from medscalpel.errors import ConfigError
from medscalpel.runs import cpu_flags
from medscalpel.validation import check_in

logger = logging.getLogger(__name__)


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
            # imported here: it needs onnx's shape inference, whose absence or failure only
            # skips this optional step
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


__all__ = ["has_vnni", "quantize_onnx"]
