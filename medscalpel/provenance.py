"""Provenance: what a result was made from and with.

Content hashes of the inputs (files, bytes, string lists, arrays: the data hash of a manifest and
of a grid's identity), the package versions, the machine (CPU model and the features that decide
int8 / bf16 speed, threads, GPU) and the git commit. Every run manifest
(:class:`medscalpel.runs.RunDir`) and every benchmark result file records them; they are
re-exported by :mod:`medscalpel.runs`, where they were first defined.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch


# ----------------------------------------------------------------------------- hashing
def hash_file(path: str | os.PathLike, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_strings(items: list[str] | tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def hash_array(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- environment
def package_versions() -> dict[str, str]:

    names = ["medscalpel", "torch", "torchvision", "timm", "numpy", "scikit-learn", "torch-pruning",
             "captum", "grad-cam", "zennit", "onnx", "onnxruntime", "openvino", "nncf",
             "scipy", "pydicom"]
    out: dict[str, str] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return out


# CPU features that decide which precisions pay off (recorded in every result file)
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile")


def _cpuinfo() -> tuple[str | None, set[str]]:
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if model is None and line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif not flags and line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if model is not None and flags:
                    break
    except OSError:
        pass
    return model, flags


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (``/proc/cpuinfo``; empty where unreadable)."""
    return _cpuinfo()[1]


def cpu_info() -> dict[str, Any]:
    """The CPU model and the features that decide int8 / bf16 speed, for result files: a
    CPU-specific number is only meaningful with the CPU it was measured on."""
    model, flags = _cpuinfo()
    return {"model": model or platform.processor() or platform.machine(),
            "features": [f for f in CPU_FEATURES if f in flags],
            "logical_cpus": os.cpu_count()}


def machine_info() -> dict[str, Any]:

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():  # pragma: no cover - GPU only
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


__all__ = ["CPU_FEATURES", "cpu_flags", "cpu_info", "git_commit", "hash_array", "hash_bytes",
           "hash_file", "hash_strings", "machine_info", "package_versions"]
