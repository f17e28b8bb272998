"""DL-Backtrace (Aryaxai's ``dl-backtrace`` package): availability probe and attribution entry.

Seed 002 scores channels with DL-Backtrace besides LRP and IG. medscalpel does not re-implement
it; it uses the ``dl-backtrace`` package when that package can run here. On this project's
stack (Python 3.11, torch 2.14.1, CPU) it cannot, for reasons checked on 2026-11-22 and written
in ``docs/explain_attributions.md``:

* ``dl-backtrace`` 0.1.x (the torch-graph engine, ``DLBacktrace``) pins ``torch==2.6.0``
  (0.1.0: ``torch==2.6.0+cu126``, ``transformers==4.52.3``) and pulls ``tensorflow``:
  ``pip install dl-backtrace`` starts by uninstalling the project's torch 2.14.1. Imported
  without installing (``--no-deps``), 0.1.24 fails at import: its Linear/pooling kernels are
  precompiled CUDA extensions for CPython 3.12 that need ``libcudart.so.12``.
* ``dl-backtrace`` 0.0.x pins ``tensorflow==2.14.0``; its PyTorch ``Backtrace`` only walks the
  top-level children of a plain ``Sequential`` named by convention (activations recognised by
  their *names*), so DenseNet concatenations and ResNet additions are out of its reach.

:class:`Backtrace` therefore raises :class:`BacktraceUnavailableError` (a
:class:`~medscalpel.errors.MissingExtraError`) with the reason found by
:func:`backtrace_status`; use ``"lrp"`` (the closest relevance method) or ``"ig"`` instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medscalpel.errors import MissingExtraError
from medscalpel.explain.attributions import ATTRIBUTIONS, Attribution, AttributionResult

_WHY = ("dl-backtrace 0.1.x pins torch==2.6.0 and tensorflow (installing it replaces this "
        "project's torch 2.14.1) and ships CUDA-only CPython-3.12 kernels that fail to import on "
        "this CPU/Python 3.11 stack; 0.0.x pins tensorflow==2.14.0 and only handles flat "
        "Sequential models, not DenseNet concatenations or ResNet additions. See "
        "docs/explain_attributions.md. Use method='lrp' or method='ig' instead.")


class BacktraceUnavailableError(MissingExtraError):
    """DL-Backtrace cannot run in this environment (the message says why)."""

    def __init__(self, reason: str):
        # not MissingExtraError's "pip install medscalpel[backtrace]" advice: that install
        # would replace the project's torch
        Exception.__init__(self, f"DL-Backtrace is unavailable here: {reason}")
        self.package = "dl-backtrace"
        self.extra = "backtrace"
        self.reason = reason


@dataclass(frozen=True)
class BacktraceStatus:
    """Result of probing the ``dl-backtrace`` package.

    Attributes:
        available: whether medscalpel can run DL-Backtrace here (currently never: see module doc).
        installed_version: the installed distribution's version, or ``None``.
        reason: why it is unavailable.
    """

    available: bool
    installed_version: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"available": self.available, "installed_version": self.installed_version,
                "reason": self.reason, "torch": torch.__version__}


def backtrace_status() -> BacktraceStatus:
    """Probe ``dl-backtrace``: installed? importable? compatible with this torch?"""
    try:
        version = importlib.metadata.version("dl-backtrace")
    except importlib.metadata.PackageNotFoundError:
        return BacktraceStatus(False, None, "the 'dl-backtrace' package is not installed, and it "
                               "cannot be installed beside this project: " + _WHY)
    if importlib.util.find_spec("dl_backtrace") is None:
        return BacktraceStatus(False, version, "'dl-backtrace' is registered but its module "
                               "'dl_backtrace' is missing (a broken install). " + _WHY)
    try:
        importlib.import_module("dl_backtrace")
    except Exception as exc:  # noqa: BLE001 - any import failure is the answer we report
        return BacktraceStatus(False, version, f"importing dl_backtrace {version} failed with "
                               f"{type(exc).__name__}: {exc}. " + _WHY)
    return BacktraceStatus(False, version, f"dl_backtrace {version} imports, but it requires torch "
                           f"2.6.0 (this is torch {torch.__version__}) and has no validated "
                           "adapter in medscalpel for DenseNet/ResNet graphs. " + _WHY)


@ATTRIBUTIONS.register("backtrace", help="DL-Backtrace via the dl-backtrace package (unavailable "
                                         "on this stack: raises with the reason)")
class Backtrace(Attribution):
    """DL-Backtrace attribution entry point.

    Constructing it probes the package; :meth:`attribute` raises
    :class:`BacktraceUnavailableError` with the reason (see the module docstring).
    """

    name = "backtrace"

    def __init__(self, model: nn.Module, **settings: Any):
        super().__init__(model)
        self.settings = settings
        self.status = backtrace_status()

    def attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> AttributionResult:
        self._prepare(inputs, target)
        raise BacktraceUnavailableError(self.status.reason)


def backtrace(model: nn.Module, inputs: torch.Tensor, target: int | torch.Tensor,
              **settings: Any) -> AttributionResult:
    """DL-Backtrace relevance; raises :class:`BacktraceUnavailableError` on this stack."""
    return Backtrace(model, **settings).attribute(inputs, target)
