"""Device choice: CPU by default, CUDA when present (or when asked)."""

from __future__ import annotations

import torch

from medscalpel.errors import ConfigError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("The 'device' parameter asks for CUDA but no GPU is available here. "
                          "Use --device cpu (or auto).")
    return dev
