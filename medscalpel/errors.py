"""Exception hierarchy. Every error a user can cause is a :class:`MedScalpelError` whose
message says what went wrong, where (file, row, layer) and how to fix it."""

from __future__ import annotations

import importlib


class MedScalpelError(Exception):
    """Base class of every error medscalpel raises for bad input or failed checks."""


class DataError(MedScalpelError, ValueError):
    """A dataset, label file or image is missing, malformed or inconsistent."""


class ModelError(MedScalpelError, ValueError):
    """A model architecture, layer or checkpoint is unknown or does not fit."""


class CheckpointError(ModelError):
    """A checkpoint file cannot be read safely or does not match its metadata."""


class ConfigError(MedScalpelError, ValueError):
    """A parameter or configuration value is invalid."""


class VerificationError(MedScalpelError):
    """A numerical self-check failed (e.g. lossless folding changed the logits)."""


class RunError(MedScalpelError):
    """A run directory is inconsistent (e.g. resumed with a different dataset or model)."""


class MissingExtraError(MedScalpelError, ImportError):
    """An optional integration is used but its extra is not installed."""

    def __init__(self, package: str, extra: str, feature: str = ""):
        what = f" for {feature}" if feature else ""
        super().__init__(
            f"The optional package '{package}' is needed{what} but is not installed. "
            f"Install it with: pip install 'medscalpel[{extra}]'"
        )
        self.package = package
        self.extra = extra


def optional_import(module: str, extra: str, feature: str = ""):
    """Import an optional dependency or raise :class:`MissingExtraError` naming the extra."""

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module, extra, feature) from exc
