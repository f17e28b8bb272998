"""What is really deployed, as a model: a runtime variant (ONNX Runtime / OpenVINO, fp32 or int8)
behind an ``nn.Module`` that returns logits.

Audits that need only predictions (accuracy, calibration, subgroups, robustness) can then run on
the int8 artifact a server would load, not on the float32 model it came from. The module has no
parameters and no gradients (``supports_gradients = False``): gradient explanations (IG, LRP,
Grad-CAM++, Score-CAM) cannot run on it. When the served graph carries the class activation map
output ``cam`` (``compress deploy`` with a GAP + linear head, see
:mod:`medscalpel.deploy.cam_head`), :meth:`RuntimeModel.cams` returns the maps the runtime
itself computed (``[N, K, h, w]``, pre-ReLU; Grad-CAM = ReLU(cam) min-max scaled): ``explain
cam``, ``report clinical`` and ``audit changes`` use them. Every loaded artifact names itself
(:attr:`RuntimeModel.artifact`: runtime, precision, file and its sha256, the CPU it ran on) so
every result written from it says what produced it.

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

from medscalpel.deploy.cam_head import cam_maps
from medscalpel.deploy.export import logits_only_onnx, ort_session
from medscalpel.deploy.runtimes import (RUNTIMES, compile_openvino, logits_only_openvino,
                                        openvino_core)
from medscalpel.errors import ConfigError, DataError, MedScalpelError, ModelError, VerificationError
from medscalpel.layout import artifact
from medscalpel.models import load_model
from medscalpel.models.checkpoint import WEIGHTS, ModelCard, _resolve
from medscalpel.models.operating_point import OperatingPoint
from medscalpel.runs import cpu_info, hash_file, read_json

if TYPE_CHECKING:
    from medscalpel.deploy.runtimes import Runtime

OWNER = "runtime_model"


class RuntimeModel(nn.Module):
    """Logits of a deployed artifact. ``run`` maps a float32 NCHW array to logits ``[N, K]``.

    Attributes: ``card`` (class names, task, thresholds, input; lineage names the runtime),
    ``runtime`` / ``precision``, ``parity`` (max |delta logit| vs the torch model when built by
    :func:`runtime_model`), ``supports_gradients`` (False), ``artifact`` (provenance: runtime,
    precision, file, sha256, CPU; see :func:`artifact_info`), ``cam_info`` (the served CAM
    output: layer, definition, how it was checked; ``status`` is ``served`` when it exists).
    """

    supports_gradients = False

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], card: ModelCard, runtime: str,
                 precision: str, parity: dict[str, Any] | None = None, keep: Any = None, *,
                 run_all: Callable[[np.ndarray], list[np.ndarray]] | None = None,
                 cam_info: dict[str, Any] | None = None,
                 artifact: dict[str, Any] | None = None):
        super().__init__()
        self._run = run
        self._run_all = run_all
        self.card = card
        self.runtime, self.precision = runtime, precision
        self.arch = card.arch
        self.num_classes = len(card.class_names)
        self.in_chans = int(card.input.get("channels", 1))
        self.parity = dict(parity or {})
        self.cam_info = dict(cam_info or {"status": "not available",
                                          "reason": "the artifact was built without a CAM "
                                                    "output"})
        self.artifact = dict(artifact or {"runtime": runtime, "precision": precision,
                                          "cpu": cpu_info()})
        self._keep = keep   # the runtime object / files the session needs alive

    @property
    def name(self) -> str:
        return f"{self.runtime}:{self.precision}"

    @property
    def has_cams(self) -> bool:
        """Whether the artifact returns class activation maps beside the logits."""
        return self._run_all is not None and self.cam_info.get("status") == "served"

    def cam_refusal(self) -> str | None:
        """Why this artifact cannot give CAMs (None when it can)."""
        if self.has_cams:
            return None
        why = self.cam_info.get("reason") or f"status {self.cam_info.get('status', '?')!r}"
        return (f"the {self.name} runtime artifact has no CAM output ({why}) and no gradients; "
                "explain the torch model it was built from, or re-run `medscalpel compress "
                "deploy` with --explain on a model with a global-average-pool + linear head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise ModelError(f"{OWNER}: the {self.name} artifact has no gradients; gradient "
                             "explanations (Grad-CAM, IG, LRP) need the torch model.")
        y = self._run(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))
        return torch.from_numpy(np.asarray(y, dtype=np.float32)).to(x.device)

    def logits_and_cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[N, K]`` and raw class activation maps ``[N, K, h, w]`` from ONE run of the
        artifact (``cam[n, k] = sum_c W[k, c] A[n, c]`` at :attr:`cam_layer`, pre-ReLU)."""
        refusal = self.cam_refusal()
        if refusal is not None:
            raise ModelError(f"{OWNER}: {refusal}.")
        outs = self._run_all(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))
        if len(outs) < 2 or np.asarray(outs[1]).ndim != 4:
            raise ModelError(f"{OWNER}: the {self.name} artifact returned {len(outs)} output(s) "
                             f"but serve.json declares a CAM output; re-run `medscalpel compress "
                             "deploy`.")
        logits = torch.from_numpy(np.asarray(outs[0], dtype=np.float32)).to(x.device)
        return logits, torch.from_numpy(np.asarray(outs[1], dtype=np.float32)).to(x.device)

    def cams(self, x: torch.Tensor) -> torch.Tensor:
        """Raw class activation maps ``[N, K, h, w]`` the served runtime computed (see
        :meth:`logits_and_cams`); :class:`ModelError` naming why when it has none."""
        return self.logits_and_cams(x)[1]

    def gradcam_maps(self, x: torch.Tensor, targets: list[int]
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Grad-CAM maps ``[N, H, W]`` in [0, 1] at the input resolution from the served CAM
        output, one class per image, scaled exactly as pytorch-grad-cam scales its Grad-CAM
        (:func:`~medscalpel.deploy.cam_head.cam_maps`), and the explained logit of each
        image ``[N]``; both from one run of the artifact."""
        logits, raw = self.logits_and_cams(x)
        maps = cam_maps(raw.numpy(), targets, (int(x.shape[2]), int(x.shape[3])))
        z = logits.numpy()
        return maps, np.asarray([z[i, int(t)] for i, t in enumerate(targets)], np.float32)

    def label(self) -> str:
        """How a map from this artifact is labelled: ``Grad-CAM (served onnxruntime:int8 CAM
        output)``."""
        return f"Grad-CAM (served {self.name} CAM output)"

    @property
    def cam_layer(self) -> str:
        """The layer the served CAMs are taken at (from serve.json), or ''."""
        return str((self.cam_info.get("support") or {}).get("layer") or "")

    def provenance(self) -> dict[str, Any]:
        """What produced a result: :attr:`artifact` plus the CAM output's status."""
        return {**self.artifact, "cam_output": self.cam_info.get("status", "not available")}

    def extra_repr(self) -> str:
        return f"{self.name}, {self.num_classes} classes"


def artifact_info(files: list[Path], runtime: str, precision: str, source: str | None = None,
                  **extra: Any) -> dict[str, Any]:
    """Provenance of a runtime artifact for every result written from it: runtime, precision,
    the model file (its name and sha256, and every file's sha256), the folder it was loaded
    from and the CPU model / features it runs on (:func:`medscalpel.runs.cpu_info`)."""
    main = files[0] if files else None
    return {"runtime": runtime, "precision": precision,
            "file": main.name if main is not None else None,
            "sha256": hash_file(main) if main is not None and main.is_file() else None,
            "files": {f.name: hash_file(f) for f in files if f.is_file()},
            "source": source, "cpu": cpu_info(), **extra}


def serve_folder(path: str | os.PathLike) -> Path | None:
    """The ``serve/`` folder ``path`` names: the folder itself (holding ``serve.json``), a
    deploy folder holding ``serve/``, or a run directory holding the declared deploy artifact
    (``compress deploy --out RUN`` and the demo: ``RUN/deploy/serve``); ``None`` when none."""
    p = Path(path)
    for d in (p, p / "serve", artifact("deploy").dir_in(p) / "serve"):
        if (d / "serve.json").is_file():
            return d
    return None


def is_served(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a served artifact (see :func:`serve_folder`)."""
    return serve_folder(path) is not None


def load_any(path: str | os.PathLike, threads: int = 1) -> nn.Module:
    """A medscalpel model directory (:func:`medscalpel.models.load_model`) or a served artifact
    (:func:`load_served`: ``RUN`` or ``RUN/serve`` of ``compress deploy``)."""
    if is_served(path):
        return load_served(path, threads)

    return load_model(path)


def card_of(path: str | os.PathLike) -> ModelCard:
    """The ModelCard of a model directory or of a served artifact (its serve.json), without
    loading weights or a runtime."""
    if is_served(path):
        return read_serve(path)[2]

    _, card_path = _resolve(path)
    return ModelCard.from_dict(read_json(card_path), source=str(card_path))


def artifact_line(art: dict[str, Any]) -> str:
    """One line naming a served artifact: runtime:precision, file, sha256 prefix, CPU model."""
    cpu = (art.get("cpu") or {}).get("model") or "?"
    sha = (art.get("sha256") or "?")[:12]
    return (f"served {art.get('runtime')}:{art.get('precision')} artifact {art.get('file')} "
            f"(sha256 {sha}...) on {cpu}")


def _card(model: nn.Module) -> ModelCard:
    card = getattr(model, "card", None)
    if card is None:
        raise ConfigError(f"{OWNER}: the model has no ModelCard (class names, task, input); "
                          "load it with load_model or set model.card.")
    return card


def runtime_model(model: nn.Module, runtime: "str | Runtime", calib: torch.Tensor, *,
                  threads: int = 1,
                  workdir: str | os.PathLike | None = None) -> RuntimeModel:
    """Build ``runtime`` (a :data:`~medscalpel.deploy.runtimes.RUNTIMES` name, e.g.
    ``"openvino:int8"``, or a :class:`~medscalpel.deploy.runtimes.Runtime`) from the torch
    ``model`` with ``calib`` (normalised images ``[N, C, H, W]``) as calibration and parity images; refuse it (:class:`VerificationError`) when its
    max |delta logit| on them exceeds the precision's parity tolerance relative to the logit
    scale. The artifact lives in ``workdir`` (default: a temporary folder removed with the
    returned model)."""

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
    art = artifact_info([Path(f) for f in rt.serve_files()], rt.runtime, rt.precision,
                        source=f"built in memory from {card.model_id or card.arch}")
    out = RuntimeModel(rt.run, new_card, rt.runtime, rt.precision, parity=parity, keep=rt,
                       artifact=art)
    if own:
        weakref.finalize(out, shutil.rmtree, str(wd), True)
    return out


def load_served(path: str | os.PathLike, threads: int = 1) -> nn.Module:
    """The model ``compress deploy`` served in ``path`` (its ``serve/`` folder, or the deploy
    run directory holding it): a torch model for a torch variant, else a :class:`RuntimeModel`
    running the ONNX / OpenVINO file named in ``serve.json`` (a torch model names its served
    weights in ``model.artifact``), with its CAM output when
    ``serve.json`` declares one (``outputs`` holds ``cam``) and its provenance
    (:attr:`RuntimeModel.artifact`)."""
    p, meta, card = read_serve(path)
    meta_path = p / "serve.json"
    runtime, precision, files = str(meta["runtime"]), str(meta["precision"]), list(meta["files"])
    if runtime.startswith("torch"):   # the torch model itself: gradients, every explanation
        return _load_torch(p, meta, runtime, precision)
    if runtime == "onnxruntime":
        return _load_onnxruntime(p, meta, card, files, threads)
    if runtime == "openvino":
        return _load_openvino(p, meta, card, files, precision, threads)
    raise DataError(f"{meta_path}: unknown runtime {runtime!r} (expected torch, onnxruntime or "
                    "openvino).")


def _load_torch(p: Path, meta: dict[str, Any], runtime: str, precision: str) -> nn.Module:
    """A served torch variant: the model itself, its served weights named in
    ``model.artifact``."""
    model = load_model(p)
    model.artifact = artifact_info([p / WEIGHTS], runtime, precision, source=str(p),
                                   variant=meta.get("variant"), model_id=meta.get("model_id"),
                                   cam_output="torch: Grad-CAM by autograd")
    return model


def _load_onnxruntime(p: Path, meta: dict[str, Any], card: ModelCard, files: list[str],
                      threads: int) -> RuntimeModel:
    """A served ONNX file: predictions run its logits-only subgraph, the whole graph (with the
    CAM output) is opened only when maps are asked for."""
    onnx = [f for f in files if f.endswith(".onnx")]
    if not onnx or not (p / onnx[0]).is_file():
        raise DataError(f"{p / 'serve.json'}: no ONNX file {onnx or files} in {p}.")
    full: list[Any] = []   # the session of the whole graph, opened when maps are asked for

    def session(what: Path | bytes) -> Any:
        try:
            return ort_session(what, threads)
        except (MedScalpelError, ImportError):
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own (pybind) types
            raise _unloadable(p / onnx[0], "onnxruntime", exc) from exc

    try:
        sub, outputs = logits_only_onnx(p / onnx[0])
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and its own types
        raise _unloadable(p / onnx[0], "onnx", exc) from exc
    # predictions run the logits-only subgraph; the whole graph only when maps are asked for
    sess = session(sub if sub is not None else p / onnx[0])
    name = sess.get_inputs()[0].name
    _check_outputs(p / onnx[0], [o.shape for o in sess.get_outputs()][:1], card)

    def run_all(x: np.ndarray) -> list[np.ndarray]:
        if not full:
            full.append(sess if sub is None else session(p / onnx[0]))
        return list(full[0].run(None, {name: x}))

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: x})[0]

    return _served_model(run, run_all, len(outputs), card, meta, p, [p / onnx[0]],
                         (sess, full))


def _load_openvino(p: Path, meta: dict[str, Any], card: ModelCard, files: list[str],
                   precision: str, threads: int) -> RuntimeModel:
    """A served OpenVINO IR: predictions run its logits-only copy, the whole graph (with the
    CAM output) is compiled only when maps are asked for."""
    xml = [f for f in files if f.endswith(".xml")]
    if not xml or not (p / xml[0]).is_file():
        raise DataError(f"{p / 'serve.json'}: no OpenVINO IR (.xml) {xml or files} in {p}.")
    hint = "bf16" if precision == "bf16" else "f32"
    full: list[Any] = []   # (compiled, request) of the whole graph, when maps are asked for

    def compiled_request(model: Any) -> tuple[Any, Any]:
        try:
            compiled = compile_openvino(model, hint, threads)
            return compiled, compiled.create_infer_request()
        except (MedScalpelError, ImportError):
            raise
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError and its own
            raise _unloadable(p / xml[0], "OpenVINO", exc) from exc

    try:
        ov_model = openvino_core().read_model(str(p / xml[0]))
    except (MedScalpelError, ImportError):
        raise
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError and its own types
        raise _unloadable(p / xml[0], "OpenVINO", exc) from exc
    n_outputs = len(ov_model.outputs)
    # predictions run the logits-only copy; the whole graph only when maps are asked for
    sub = logits_only_openvino(p / xml[0])
    compiled, request = compiled_request(sub if sub is not None else ov_model)
    if sub is None:
        full.append((compiled, request))

    def run_ov(x: np.ndarray) -> np.ndarray:
        res = request.infer({0: x})
        return np.asarray(res[compiled.output(0)], dtype=np.float32).copy()

    def run_ov_all(x: np.ndarray) -> list[np.ndarray]:
        if not full:
            full.append(compiled_request(ov_model))
        whole, req = full[0]
        res = req.infer({0: x})
        return [np.asarray(res[o], dtype=np.float32).copy() for o in whole.outputs]

    ov_files = [p / xml[0]] + [p / f for f in files if f.endswith(".bin")
                               and not f.startswith("logits_only/")]
    return _served_model(run_ov, run_ov_all, n_outputs, card, meta, p, ov_files,
                         (compiled, request, full))


def read_serve(path: str | os.PathLike) -> tuple[Path, dict[str, Any], ModelCard]:
    """The serve/ folder, its ``serve.json`` and the ModelCard it describes (class names, task,
    thresholds, input), without loading the runtime; DataError naming what is missing."""
    p = serve_folder(path) or Path(path)
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
    runtime, precision = str(meta["runtime"]), str(meta["precision"])
    if runtime.startswith("torch"):
        _, card_path = _resolve(p)
        return p, meta, ModelCard.from_dict(read_json(card_path), source=str(card_path))
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
                         model_id=f"{meta.get('model_id') or 'served'}@{runtime}:{precision}",
                         operating_point=(OperatingPoint.from_dict(meta["operating_point"])
                                          if isinstance(meta.get("operating_point"), dict)
                                          else None))
    except MedScalpelError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise DataError(f"{meta_path}: not a serve contract this medscalpel can read "
                        f"({type(exc).__name__}: {exc}); re-run `medscalpel compress deploy`."
                        ) from exc
    return p, meta, card


def _served_model(run: Callable, run_all: Callable, n_outputs: int, card: ModelCard,
                  meta: dict[str, Any], folder: Path, files: list[Path], keep: Any
                  ) -> RuntimeModel:
    """A :class:`RuntimeModel` of a loaded serve/ folder: the CAM output when serve.json
    declares it (refused when the graph does not return it), the artifact's provenance."""
    runtime, precision = str(meta["runtime"]), str(meta["precision"])
    outputs = meta.get("outputs") if isinstance(meta.get("outputs"), list) else ["logits"]
    expl = meta.get("explanation") if isinstance(meta.get("explanation"), dict) else {}
    cam_info = dict(expl) or {"status": "not available",
                              "reason": "serve.json has no 'explanation' block (written before "
                                        "served CAMs existed)"}
    if "cam" in outputs:
        if n_outputs < 2:
            raise ModelError(f"{folder / 'serve.json'} declares a 'cam' output but "
                             f"{files[0].name} returns {n_outputs} output; the files do not "
                             "belong together. Re-run `medscalpel compress deploy`.")
        cam_info["status"] = "served"
    elif cam_info.get("status") == "served":
        cam_info["status"] = "not available"
        cam_info["reason"] = "serve.json's outputs do not list 'cam'"
    art = artifact_info(files, runtime, precision, source=str(folder),
                        variant=meta.get("variant"), model_id=meta.get("model_id"))
    return RuntimeModel(run, card, runtime, precision, keep=keep,
                        run_all=run_all if cam_info.get("status") == "served" else None,
                        cam_info=cam_info, artifact=art)


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


def require_served_cams(model: Any, method: str, flag: str, owner: str) -> None:
    """Refuse, before any work, what a served artifact cannot explain: a method other than
    Grad-CAM (its CAM output IS Grad-CAM for a GAP + linear head; it has no gradients), or an
    artifact exported without a CAM output. A model with gradients passes."""
    if getattr(model, "supports_gradients", True):
        return
    if method != "gradcam":
        raise ConfigError(f"{flag} {method}: the served {model.name} artifact has no gradients; "
                          "its CAM output is Grad-CAM (equal to it for a global-average-pool + "
                          f"linear head), so only {flag} gradcam runs on it. Give the torch model "
                          "directory for other methods.")
    if model.cam_refusal() is not None:
        raise ModelError(f"{owner}: {model.cam_refusal()}.")


__all__ = ["require_served_cams", "RuntimeModel", "artifact_info", "artifact_line", "card_of",
           "is_served", "serve_folder", "load_any", "load_served", "read_serve", "runtime_model"]
