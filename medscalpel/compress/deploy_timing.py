"""Timing for :func:`medscalpel.compress.deploy.deploy`: variants alternated in rounds, and
the fp32 / int8 GEMM peaks timed in the same rounds (the denominator of each variant's
efficiency)."""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscalpel.compress.export import ort_session
from medscalpel.progress import track

logger = logging.getLogger(__name__)


def _time_once(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(ts))


def _ort_int8_gemm(n: int, threads: int):
    """An onnxruntime MatMulInteger (uint8 x int8, the U8S8 kernel of quantised convs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper


    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.integers(-128, 127, (n, n), dtype=np.int8), "B")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "gemm",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])],
                              [b])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemm.onnx"
        onnx.save(proto, str(path))
        sess = ort_session(path, threads)
    a = rng.integers(0, 255, (n, n), dtype=np.uint8)
    return lambda: sess.run(None, {"A": a})


def peak_gemms(threads: int) -> dict[str, Any]:
    """fp32 GEMM (torch) and int8 GEMM (onnxruntime MatMulInteger, U8S8) for the peak MAC
    rates; bf16 is not measured (no bf16 GEMM on CPUs without avx512_bf16 / AMX)."""
    n = 512
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    fns = {"fp32": (lambda: torch.mm(a, b), n ** 3)}
    try:
        fns["int8"] = (_ort_int8_gemm(n, threads), n ** 3)
    except Exception as exc:  # noqa: BLE001 - the peak is informative, never blocking
        logger.info("int8 peak not measurable: %s", exc)
    return fns


def benchmark_variants(live: list, example: torch.Tensor, batches, rounds, warmup, repeats,
               threads, progress) -> dict[str, Any]:
    """All live variants alternated, rounds x batches; the variant order rotates each round so
    no variant always runs first. The matmul peak is timed in the same rounds."""
    inputs = {b: np.ascontiguousarray(np.repeat(example[:1].numpy(), b, axis=0))
              for b in batches}
    peaks = peak_gemms(threads)
    peak_t: dict[str, list[float]] = {k: [] for k in peaks}
    with torch.inference_mode():
        for r in track(range(rounds), "benchmark rounds", progress=progress):
            order = live[r % len(live):] + live[:r % len(live)] if live else []
            for b in batches:
                for v in order:
                    ms = _time_once(lambda: v.rt.run(inputs[b]), warmup, repeats)
                    v.times.setdefault(b, []).append(ms)
            for k, (fn, _) in peaks.items():
                peak_t[k].append(_time_once(fn, 1, 3))
    return {f"{k}_gmacs": peaks[k][1] / (statistics.median(t) / 1000.0) / 1e9
            for k, t in peak_t.items()} | {
        "method": "512^3 GEMM timed in the same rounds: fp32 torch.mm; int8 onnxruntime "
                  "MatMulInteger (U8S8)"}


__all__ = ["benchmark_variants", "peak_gemms"]
