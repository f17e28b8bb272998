"""What is really deployed, as a model: a runtime variant (ONNX Runtime / OpenVINO, fp32 or int8)
behind an ``nn.Module`` that returns logits.

Audits that need only predictions (accuracy, calibration, subgroups, robustness) can then run on
the int8 artifact a server would load, not on the float32 model it came from. The module has no
parameters and no gradients (``supports_gradients = False``): gradient explanations (Grad-CAM,
IG, LRP) cannot run on it, and :func:`medscalpel.audit.changes.audit_changes` says so instead.

- :func:`runtime_model` builds a variant of a torch model (export, quantise on calibration
  images, compile) and checks its parity with the torch model on those images;
- :func:`load_served` loads the ``serve/`` directory ``compress deploy`` wrote (its
  ``serve.json`` contract: runtime, files, input, classes, thresholds).

Example:
    >>> import torch
    >>> from medscalpel.data import Preprocess
    >>> from medscalpel.models import create_model, make_card
    >>> m = create_model("vgg_tiny", num_classes=2, img_size=32).eval()
    >>> m.card = make_card(m, ["a", "b"], "multilabel", Preprocess(size=32))
    >>> rm = runtime_model(m, "onnxruntime:fp32", torch.rand(4, 1, 32, 32))
    >>> rm(torch.rand(3, 1, 32, 32)).shape, rm.parity["max_abs_delta_logit"] < 1e-3
    (torch.Size([3, 2]), True)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from medscalpel.errors import (ConfigError, DataError, MedScalpelError, ModelError,
                               VerificationError)
from medscalpel.models.checkpoint import ModelCard

if TYPE_CHECKING:
    from medscalpel.compress.runtimes import Runtime

OWNER = "runtime_model"


class RuntimeModel(nn.Module):
    """Logits of a deployed artifact. ``run`` maps a float32 NCHW array to logits ``[N, K]``.

    Attributes: ``card`` (class names, task, thresholds, input; lineage names the runtime),
    ``runtime`` / ``precision``, ``parity`` (max |delta logit| vs the torch model when built by
    :func:`runtime_model`), ``supports_gradients`` (False).
    """

    supports_gradients = False

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], card: ModelCard, runtime: str,
                 precision: str, parity: dict[str, Any] | None = None, keep: Any = None):
        super().__init__()
        self._run = run
        self.card = card
        self.runtime, self.precision = runtime, precision
        self.arch = card.arch
        self.num_classes = len(card.class_names)
        self.parity = dict(parity or {})
        self._keep = keep   # the runtime object / files the session needs alive

    @property
    def name(self) -> str:
        return f"{self.runtime}:{self.precision}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise ModelError(f"{OWNER}: the {self.name} artifact has no gradients; gradient "
                             "explanations (Grad-CAM, IG, LRP) need the torch model.")
        y = self._run(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))
        return torch.from_numpy(np.asarray(y, dtype=np.float32)).to(x.device)

    def extra_repr(self) -> str:
        return f"{self.name}, {self.num_classes} classes"


def _card(model: nn.Module) -> ModelCard:
    card = getattr(model, "card", None)
    if card is None:
        raise ConfigError(f"{OWNER}: the model has no ModelCard (class names, task, input); "
                          "load it with load_model or set model.card.")
    return card


def runtime_model(model: nn.Module, runtime: "str | Runtime", calib: torch.Tensor, *,
                  threads: int = 1,
                  workdir: str | os.PathLike | None = None) -> RuntimeModel:
    """Build ``runtime`` (a :data:`~medscalpel.compress.runtimes.RUNTIMES` name, e.g.
    ``"openvino:int8"``, or a :class:`~medscalpel.compress.runtimes.Runtime`) from the torch ``model`` with ``calib`` (normalised images ``[N, C,
    H, W]``) as calibration and parity images; refuse it (:class:`VerificationError`) when its
    max |delta logit| on them exceeds the precision's parity tolerance relative to the logit
    scale. The artifact lives in ``workdir`` (default: a temporary folder removed with the
    returned model)."""
    from medscalpel.compress.runtimes import RUNTIMES

    card = _card(model)
    if calib.ndim != 4 or calib.shape[0] < 1:
        raise DataError(f"{OWNER}: calibration images must be [N, C, H, W] with N >= 1; got "
                        f"{tuple(calib.shape)}.")
    rt = RUNTIMES.create(runtime, threads=threads) if isinstance(runtime, str) else runtime
    runtime = rt.name
    why = rt.available()
    if why:
        raise ConfigError(f"{OWNER}: {runtime} cannot run here: {why}.")
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="medscalpel-rt-")) if own else Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    try:
        model = model.eval()
        rt.prepare(model, calib[:1], calib, wd)
        with torch.inference_mode():
            ref = model(calib).float().numpy()
        got = rt.run(calib.numpy().astype(np.float32))
    except BaseException:
        if own:
            shutil.rmtree(wd, ignore_errors=True)
        raise
    scale = max(float(np.abs(ref).max()), 1e-6)
    delta = float(np.abs(got - ref).max())
    parity = {"max_abs_delta_logit": delta, "logit_scale": scale, "relative": delta / scale,
              "tolerance": rt.tolerance, "n_images": int(calib.shape[0])}
    if delta / scale > rt.tolerance:
        if own:
            shutil.rmtree(wd, ignore_errors=True)
        raise VerificationError(f"{OWNER}: {runtime} fails parity with the torch model: max "
                                f"|delta logit| {delta:.3g} is {delta / scale:.3g} of the logit "
                                f"scale (tolerance {rt.tolerance}).")
    new_card = card.with_lineage(f"runtime {runtime}", card.model_id, runtime=rt.runtime,
                                 precision=rt.precision, parity=parity)
    new_card = replace(new_card, model_id=f"{card.model_id or card.arch}@{runtime}")
    out = RuntimeModel(rt.run, new_card, rt.runtime, rt.precision, parity=parity, keep=rt)
    if own:
        weakref.finalize(out, shutil.rmtree, str(wd), True)
    return out


def load_served(path: str | os.PathLike, threads: int = 1) -> nn.Module:
    """The model ``compress deploy`` served in ``path`` (its ``serve/`` folder, or the deploy
    run directory holding it): a torch model for a torch variant, else a :class:`RuntimeModel`
    running the ONNX / OpenVINO file named in ``serve.json``."""
    from medscalpel.runs import read_json

    p = Path(path)
    if (p / "serve" / "serve.json").is_file():
        p = p / "serve"
    meta_path = p / "serve.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found: give the serve/ folder (or the run directory) "
                        "written by `medscalpel compress deploy`.")
    try:
        meta = read_json(meta_path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{meta_path} is not a text JSON file ({exc.reason}); re-run `medscalpel "
                        "compress deploy` to write it again.") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path} must hold a JSON object (the serve contract); got "
                        f"{type(meta).__name__}. Re-run `medscalpel compress deploy`.")
    missing = [k for k in ("runtime", "precision", "files", "class_names", "task", "input")
               if meta.get(k) in (None, [], "")]
    if missing:
        raise DataError(f"{meta_path}: missing {missing}; re-run `medscalpel compress deploy` to "
                        "write a complete serve.json.")
    runtime, precision, files = str(meta["runtime"]), str(meta["precision"]), list(meta["files"])
    if runtime.startswith("torch"):
        from medscalpel.models import load_model

        return load_model(p)
    if not isinstance(meta["files"], list) or not isinstance(meta["input"], dict):
        raise DataError(f"{meta_path}: 'files' must be a list of file names and 'input' an "
                        "object (size, channels, mean, std); re-run `medscalpel compress deploy`.")
    try:
        card = ModelCard(arch=f"{runtime}:{precision} artifact",
                         class_names=tuple(meta["class_names"]), task=str(meta["task"]),
                         input=dict(meta["input"]),
                         thresholds=tuple(meta["thresholds"]) if meta.get("thresholds") else None,
                         lineage=({"method": f"served {runtime}:{precision}",
                                   "parent": meta.get("model_id") or "", "source": str(p)},),
                         model_id=f"{meta.get('model_id') or 'served'}@{runtime}:{precision}")
    except MedScalpelError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise DataError(f"{meta_path}: not a serve contract this medscalpel can read "
                        f"({type(exc).__name__}: {exc}); re-run `medscalpel compress deploy`."
                        ) from exc
    if runtime == "onnxruntime":
        onnx = [f for f in files if f.endswith(".onnx")]
        if not onnx or not (p / onnx[0]).is_file():
            raise DataError(f"{meta_path}: no ONNX file {onnx or files} in {p}.")
        from medscalpel.compress.export import ort_session

        try:
            sess = ort_session(p / onnx[0], threads)
        except (MedScalpelError, ImportError):
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own (pybind) types
            raise _unloadable(p / onnx[0], "onnxruntime", exc) from exc
        name = sess.get_inputs()[0].name
        _check_outputs(p / onnx[0], [o.shape for o in sess.get_outputs()][:1], card)

        def run(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {name: x})[0]

        return RuntimeModel(run, card, runtime, precision, keep=sess)
    if runtime == "openvino":
        xml = [f for f in files if f.endswith(".xml")]
        if not xml or not (p / xml[0]).is_file():
            raise DataError(f"{meta_path}: no OpenVINO IR (.xml) {xml or files} in {p}.")
        from medscalpel.compress.runtimes import compile_openvino

        try:
            compiled = compile_openvino(p / xml[0], "bf16" if precision == "bf16" else "f32",
                                        threads)
            request = compiled.create_infer_request()
        except (MedScalpelError, ImportError):
            raise
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError and its own types
            raise _unloadable(p / xml[0], "OpenVINO", exc) from exc

        def run_ov(x: np.ndarray) -> np.ndarray:
            res = request.infer({0: x})
            return np.asarray(res[compiled.output(0)], dtype=np.float32).copy()

        return RuntimeModel(run_ov, card, runtime, precision, keep=(compiled, request))
    raise DataError(f"{meta_path}: unknown runtime {runtime!r} (expected torch, onnxruntime or "
                    "openvino).")


def _unloadable(path: Path, runtime: str, exc: BaseException) -> DataError:
    """The error for a served model file the runtime cannot load (damaged, truncated, not a
    model): names the file, what the runtime said and how to get a good one."""
    said = " ".join(str(exc).split())[:300] or type(exc).__name__
    return DataError(f"{path} cannot be loaded by {runtime} ({type(exc).__name__}: {said}). The "
                     "file is damaged or not a model: re-run `medscalpel compress deploy` to "
                     "write the served artifact again.")


def _check_outputs(path: Path, shapes: list[Any], card: ModelCard) -> None:
    """Refuse a served graph whose (static) logits width differs from serve.json's classes."""
    if not shapes or not shapes[0]:
        return
    width = shapes[0][-1]
    if isinstance(width, int) and width != len(card.class_names):
        raise ModelError(f"{path} outputs {width} logits per image but serve.json names "
                         f"{len(card.class_names)} classes; the file belongs to another model. "
                         "Re-run `medscalpel compress deploy`.")


__all__ = ["RuntimeModel", "load_served", "runtime_model"]
