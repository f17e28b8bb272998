"""Timing for :func:`medscalpel.deploy.flow.deploy`: variants alternated in rounds, and
the fp32 / int8 GEMM peaks timed in the same rounds (the denominator of each variant's
efficiency), beside the theoretical bound from the CPU's features and clock.

The measured peak is the fastest of a size sweep (256, 512, 1024) at the runtime's thread
count: a single small torch.mm is no peak (a dense ONNX Runtime model beat it by 1.0-1.8x in
earlier runs, i.e. "101-183% of peak"). The theoretical bound assumes two FMA units per core
(fp32 MACs per cycle: 32 with AVX-512, 16 with AVX2; int8 with VNNI 4x that) at the nominal
clock that ``/proc/cpuinfo`` reports, and says so: it is an upper bound, not a measurement."""

from __future__ import annotations

import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from medscalpel.deploy.export import ort_session
from medscalpel.deploy.timing import median_ms
from medscalpel.progress import track
from medscalpel.runs import cpu_flags

logger = logging.getLogger(__name__)


def _ort_int8_gemm(n: int, threads: int):
    """An onnxruntime MatMulInteger (uint8 x int8, the U8S8 kernel of quantised convs)."""

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


PEAK_SIZES = (256, 512, 1024)


def peak_gemms(threads: int) -> dict[str, Any]:
    """fp32 GEMMs (torch) and int8 GEMMs (onnxruntime MatMulInteger, U8S8) of every size in
    :data:`PEAK_SIZES`, at ``threads`` threads: ``{"fp32@512": (fn, macs), ...}``. bf16 is not
    measured (no bf16 GEMM on CPUs without avx512_bf16 / AMX)."""
    fns: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    for n in PEAK_SIZES:
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        fns[f"fp32@{n}"] = ((lambda a=a, b=b: torch.mm(a, b)), n ** 3)
        try:
            fns[f"int8@{n}"] = (_ort_int8_gemm(n, threads), n ** 3)
        except Exception as exc:  # noqa: BLE001 - the peak is informative, never blocking
            logger.info("int8 peak not measurable: %s", exc)
    return fns


def _cpu_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def theoretical_gmacs(threads: int) -> dict[str, Any]:
    """Upper bound of MACs per second from the CPU's vector width and nominal clock, assuming
    two FMA units per core and one thread per core (stated in ``assumption``)."""
    flags = cpu_flags()
    mhz = _cpu_mhz()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fp32_per_cycle = 2 * lanes
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    out: dict[str, Any] = {"clock_mhz": mhz, "threads": threads,
                           "fp32_macs_per_cycle_per_core": fp32_per_cycle,
                           "assumption": "2 FMA units per core, nominal clock from "
                                         "/proc/cpuinfo, no turbo, one thread per core; AMX "
                                         "tiles not counted"}
    if mhz:
        out["fp32_gmacs"] = fp32_per_cycle * mhz * 1e-3 * threads
        if vnni:
            out["int8_gmacs"] = 4 * fp32_per_cycle * mhz * 1e-3 * threads
    return out


def benchmark_variants(live: list, example: torch.Tensor, batches, rounds, warmup, repeats,
                       threads, progress, peaks: dict[str, Any] | None = None) -> dict[str, Any]:
    """All live variants alternated, rounds x batches; the variant order rotates each round so
    no variant always runs first. Each variant's time of a round is appended to
    ``v.times[batch]`` (rounds stay aligned across variants: per-round ratios are
    meaningful). The GEMM peaks are timed in the same rounds; the result holds the fastest
    size per precision (``fp32_gmacs``, ``int8_gmacs``), every size's rate and the theoretical
    bound."""
    inputs = {b: np.ascontiguousarray(np.repeat(example[:1].numpy(), b, axis=0))
              for b in batches}
    peaks = peak_gemms(threads) if peaks is None else peaks
    peak_t: dict[str, list[float]] = {k: [] for k in peaks}
    with torch.inference_mode():
        for r in track(range(rounds), "benchmark rounds", progress=progress):
            order = live[r % len(live):] + live[:r % len(live)] if live else []
            for b in batches:
                for v in order:
                    v.times.setdefault(b, []).append(
                        median_ms(lambda: v.rt.run(inputs[b]), warmup, repeats))
            for k, (fn, _) in peaks.items():
                peak_t[k].append(median_ms(fn, 1, 3))
    sizes = {k: peaks[k][1] / (statistics.median(t) / 1000.0) / 1e9 for k, t in peak_t.items()}
    out: dict[str, Any] = {"sizes_gmacs": sizes}
    for prec in ("fp32", "int8"):
        rates = {k: v for k, v in sizes.items() if k.startswith(prec + "@")}
        if rates:
            best = max(rates, key=rates.get)
            out[f"{prec}_gmacs"] = rates[best]
            out[f"{prec}_size"] = int(best.split("@")[1])
    out["theoretical"] = theoretical_gmacs(threads)
    out["threads"] = threads
    out["method"] = (f"fastest of {len(PEAK_SIZES)} GEMM sizes {PEAK_SIZES} at {threads} "
                     "thread(s), timed in the same rounds as the variants: fp32 torch.mm; int8 "
                     "onnxruntime MatMulInteger (U8S8); the theoretical bound beside it")
    return out


__all__ = ["PEAK_SIZES", "benchmark_variants", "peak_gemms", "theoretical_gmacs"]
