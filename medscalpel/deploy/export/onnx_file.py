"""Writing ONNX files: which torch exporter (dynamo, TorchScript) writes a model, the export
itself with its fallback and checks, and the logits-only subgraph of a multi-output file.

:func:`choose_exporter` picks the exporter (explicit choice, a caller's
:func:`preferred_exporter`, the opset, :data:`TORCHSCRIPT_ARCHS`); :func:`export_onnx_file`
writes the file atomically and records which exporter wrote it and why;
:func:`logits_only_onnx` extracts the prediction path of a file with several outputs.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from medscalpel.compress.measure import eval_mode
from medscalpel.errors import ConfigError, ModelError
from medscalpel.validation import check_in

logger = logging.getLogger(__name__)

OWNER = "export_onnx"
INPUT, OUTPUT = "images", "logits"


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


__all__ = ["DEFAULT_OPSET", "DYNAMO_MIN_OPSET", "EXPORTERS", "INPUT", "OUTPUT",
           "TORCHSCRIPT_ARCHS", "choose_exporter", "export_onnx_file", "logits_only_onnx",
           "preferred_exporter"]
