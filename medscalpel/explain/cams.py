"""Class activation maps (Grad-CAM, Grad-CAM++, Score-CAM) through the ``grad-cam`` package.

Every zoo model is a :class:`~medscalpel.models.classifier.MedClassifier`, which names its CAM
target layer (``model.cam_layer()``; for DenseNet the non-inplace ``backbone.relu`` after
``norm5``, so DenseNet's in-place ReLUs never modify a hooked tensor) and, for ViTs, how tokens
become a map (``model.cam_reshape``). A multi-label head has one independent logit per class:
the CAM of class ``k`` explains logit ``k`` (``ClassifierOutputTarget(k)``), never the argmax.

The ``grad-cam`` package changes the model it is given (its constructor calls ``model.eval()``,
it registers forward hooks and its backward pass writes parameter gradients); :func:`compute_cam`
undoes all of that in ``finally``: per-module train/eval flags, ``requires_grad`` flags and
``.grad`` of every parameter are restored and the hooks are released.

Example:
    >>> import torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("densenet_tiny", num_classes=3, img_size=32)
    >>> res = compute_cam(m, torch.randn(2, 1, 32, 32), targets=1, progress=False)
    >>> res.maps.shape
    (2, 32, 32)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytorch_grad_cam
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as target_cls
from torch import nn

from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.progress import track
from medscalpel.registry import Registry
from medscalpel.runs import atomic_path, dumps_json
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

SCHEMA = 1

#: CAM method name -> factory ``(model, target_layers, reshape_transform, batch_size, progress)``
#: returning a ``pytorch_grad_cam.base_cam.BaseCAM``.
CAMS: Registry[Any] = Registry("CAM method")


def _gradcam_module():

    return pytorch_grad_cam


@CAMS.register("gradcam", help="Grad-CAM: channel weights = spatial mean of the gradients")
def _make_gradcam(model: nn.Module, target_layers: list[nn.Module],
                  reshape_transform: Callable | None, batch_size: int, progress: bool | None):
    return _gradcam_module().GradCAM(model, target_layers, reshape_transform=reshape_transform)


@CAMS.register("gradcam++", help="Grad-CAM++: second/third-order gradient weighting")
def _make_gradcampp(model: nn.Module, target_layers: list[nn.Module],
                    reshape_transform: Callable | None, batch_size: int, progress: bool | None):
    return _gradcam_module().GradCAMPlusPlus(model, target_layers,
                                             reshape_transform=reshape_transform)


def _score_cam_class():
    """grad-cam's ScoreCAM with the channel loop on medscalpel's progress bar (the package's
    own loop writes a tqdm bar per image to stderr) and a configurable masking batch size."""
    score_cam = _gradcam_module().ScoreCAM

    class _ScoreCAM(score_cam):
        def __init__(self, model, target_layers, reshape_transform=None, batch_size: int = 32,
                     progress: bool | None = False):
            super().__init__(model, target_layers, reshape_transform=reshape_transform)
            self.batch_size = batch_size
            self.progress = progress

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            # Same computation as pytorch_grad_cam.ScoreCAM.get_cam_weights: each activation
            # channel, min-max normalised and upsampled, masks the input; the target's score on
            # the masked input, softmaxed over channels, is the channel's weight.
            with torch.no_grad():
                acts = torch.from_numpy(activations).to(self.device)
                up = nn.functional.interpolate(acts, size=input_tensor.shape[-2:],
                                               mode="bilinear", align_corners=True)
                flat = up.flatten(2)
                lo = flat.min(-1)[0][:, :, None, None]
                hi = flat.max(-1)[0][:, :, None, None]
                up = (up - lo) / (hi - lo + 1e-8)
                n_img, n_ch = acts.shape[:2]
                scores = torch.empty(n_img, n_ch, dtype=torch.float64)
                chunks = [(i, c) for i in range(n_img) for c in range(0, n_ch, self.batch_size)]
                for i, c in track(chunks, "Score-CAM masks", progress=self.progress):
                    masked = input_tensor[i][None] * up[i, c:c + self.batch_size, None]
                    out = self.model(masked)
                    scores[i, c:c + self.batch_size] = targets[i](out).double().cpu()
                return torch.softmax(scores, dim=-1).float().numpy()

    return _ScoreCAM


@CAMS.register("scorecam", help="Score-CAM: channel weights from the score of masked inputs")
def _make_scorecam(model: nn.Module, target_layers: list[nn.Module],
                   reshape_transform: Callable | None, batch_size: int, progress: bool | None):
    return _score_cam_class()(model, target_layers, reshape_transform=reshape_transform,
                              batch_size=batch_size, progress=progress)


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class CamResult:
    """Class activation maps of N images.

    Attributes:
        maps: float32 ``[N, H, W]`` in ``[0, 1]`` at the input resolution (each map min-max
            scaled by grad-cam after the ReLU; an all-zero map means no positive evidence).
        method: ``gradcam``, ``gradcam++`` or ``scorecam``.
        targets: the explained class index of every image (length N).
        class_names: names of the model's classes (or ``class0..``).
        layer: qualified name of the CAM target layer.
        ids: optional image ids.
        logits: float32 ``[N]``: the explained logit of every image.
        meta: anything else (model id, arch, seconds).
    """

    maps: np.ndarray
    method: str
    targets: tuple[int, ...]
    class_names: tuple[str, ...]
    layer: str
    ids: tuple[str, ...] = ()
    logits: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        maps = np.asarray(self.maps, dtype=np.float32)
        if maps.ndim != 3:
            raise DataError(f"CamResult: maps must be [N, H, W]; got shape {maps.shape}.")
        if len(self.targets) != maps.shape[0]:
            raise DataError(f"CamResult: {maps.shape[0]} maps but {len(self.targets)} targets.")
        if self.ids and len(self.ids) != maps.shape[0]:
            raise DataError(f"CamResult: {maps.shape[0]} maps but {len(self.ids)} ids.")
        object.__setattr__(self, "maps", maps)
        object.__setattr__(self, "targets", tuple(int(t) for t in self.targets))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        if self.logits is not None:
            object.__setattr__(self, "logits", np.asarray(self.logits, dtype=np.float32))

    @property
    def n(self) -> int:
        return int(self.maps.shape[0])

    def target_names(self) -> list[str]:
        return [self.class_names[t] for t in self.targets]

    def peaks(self) -> np.ndarray:
        """``[N, 2]`` (row, col) of each map's maximum."""
        flat = self.maps.reshape(self.n, -1).argmax(1)
        return np.stack(np.unravel_index(flat, self.maps.shape[1:]), 1)

    def empty(self) -> np.ndarray:
        """``[N]`` bool: maps with no positive evidence (all zero)."""
        return self.maps.reshape(self.n, -1).max(1) <= 0

    def to_dict(self) -> dict[str, Any]:
        peaks = self.peaks()
        per_image = []
        for i in range(self.n):
            per_image.append({
                "id": self.ids[i] if self.ids else str(i),
                "target": self.targets[i], "class": self.class_names[self.targets[i]],
                "logit": None if self.logits is None else float(self.logits[i]),
                "peak_row": int(peaks[i, 0]), "peak_col": int(peaks[i, 1]),
                "mean": float(self.maps[i].mean()),
                "area_above_half": float((self.maps[i] >= 0.5).mean()),
                "empty": bool(self.empty()[i]),
            })
        return {"schema_version": SCHEMA, "method": self.method, "layer": self.layer,
                "n": self.n, "height": int(self.maps.shape[1]), "width": int(self.maps.shape[2]),
                "class_names": list(self.class_names), "n_empty": int(self.empty().sum()),
                "meta": self.meta, "images": per_image}

    def save(self, path: str | os.PathLike) -> Path:
        """Write maps and metadata to one ``.npz`` (read back with :meth:`load`)."""
        path = Path(path)
        meta = {"schema_version": SCHEMA, "method": self.method, "targets": list(self.targets),
                "class_names": list(self.class_names), "layer": self.layer,
                "ids": list(self.ids), "meta": self.meta}
        arrays = {"maps": self.maps, "meta": np.frombuffer(dumps_json(meta).encode(), np.uint8)}
        if self.logits is not None:
            arrays["logits"] = self.logits
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CamResult":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"CAM file not found: {path}. Run 'medscalpel explain cam' first.")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                maps = z["maps"]
                logits = z["logits"] if "logits" in z.files else None
        except (KeyError, ValueError, OSError) as exc:
            raise DataError(f"{path} is not a CAM file written by CamResult.save: {exc}.") from exc
        if meta.get("schema_version", 1) > SCHEMA:
            raise DataError(f"{path} has CAM schema {meta['schema_version']}; upgrade medscalpel.")
        return cls(maps, meta["method"], tuple(meta["targets"]), tuple(meta["class_names"]),
                   meta["layer"], tuple(meta.get("ids", ())), logits, meta.get("meta", {}))


# ----------------------------------------------------------------------------- model hygiene
@contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag and every parameter's ``requires_grad`` and
    ``.grad`` on exit (grad-cam calls ``model.eval()``, ``zero_grad()`` and ``backward()``)."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, req, grad in params:
            p.requires_grad_(req)
            p.grad = grad


def hook_counts(model: nn.Module) -> dict[str, int]:
    """Number of forward / pre-forward / backward hooks over all submodules (for checks that a
    tool left no hook behind)."""
    out = {"forward": 0, "forward_pre": 0, "backward": 0, "backward_pre": 0}
    for m in model.modules():
        out["forward"] += len(m._forward_hooks)
        out["forward_pre"] += len(m._forward_pre_hooks)
        out["backward"] += len(m._backward_hooks)
        out["backward_pre"] += len(getattr(m, "_backward_pre_hooks", {}))
    return out


def _resolve_targets(targets: int | Sequence[int], n: int, num_classes: int) -> list[int]:
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        out = [int(targets)] * n
    elif isinstance(targets, Sequence) or isinstance(targets, np.ndarray):
        out = [int(t) for t in targets]
        if len(out) != n:
            raise ConfigError(f"The 'targets' parameter of compute_cam must be one class index or "
                              f"one per image ({n}). Got {len(out)} indices instead.")
    else:
        raise ConfigError(f"The 'targets' parameter of compute_cam must be an int or a list of "
                          f"ints. Got {targets!r} instead.")
    bad = [t for t in out if not 0 <= t < num_classes]
    if bad:
        raise ConfigError(f"The 'targets' parameter of compute_cam must be class indices in "
                          f"[0, {num_classes - 1}]. Got {bad[0]} instead (the model has "
                          f"{num_classes} outputs).")
    return out


def _class_names(model: nn.Module, k: int) -> list[str]:
    card = getattr(model, "card", None)
    if card is not None and len(getattr(card, "class_names", ())) == k:
        return list(card.class_names)
    return [f"class{i}" for i in range(k)]


def compute_cam(
    model: nn.Module,
    images: torch.Tensor,
    targets: int | Sequence[int],
    method: str = "gradcam",
    batch_size: int = 16,
    progress: bool | None = None,
    ids: Sequence[str] | None = None,
    score_batch_size: int = 64,
) -> CamResult:
    """Class activation maps of ``images`` for the given class(es).

    Args:
        model: a :class:`MedClassifier` (any zoo architecture). It is left exactly as it was:
            train/eval flags, ``requires_grad``, ``.grad`` and hooks are restored.
        images: ``[N, C, H, W]`` model input (already preprocessed).
        targets: one class index for every image, or one index per image. Each map explains
            that class's logit (multi-label heads: never the argmax).
        method: a name in :data:`CAMS`: ``gradcam``, ``gradcam++`` or ``scorecam``.
        batch_size: images per forward/backward pass.
        progress: show a progress bar (``None``: follow ``MEDSCALPEL_PROGRESS``).
        ids: optional image ids stored with the result.
        score_batch_size: masked inputs per forward pass inside Score-CAM.

    Returns:
        A :class:`CamResult` with maps ``[N, H, W]`` in ``[0, 1]`` at input resolution.

    Raises:
        ModelError: the model has no CAM layer.
        ConfigError: unknown method, bad targets or batch size.
        DataError: images are not a 4-D tensor matching the model's input channels.
    """
    factory = CAMS.get(method)
    check_range(batch_size, "batch_size", "compute_cam", 1, integer=True)
    check_range(score_batch_size, "score_batch_size", "compute_cam", 1, integer=True)
    _check_images(images)
    if is_served_model(model):
        return _served_cam(model, images, targets, method, batch_size, progress, ids)
    _check_classifier(model, images)
    n = int(images.shape[0])
    num_classes = int(model.classifier.out_features)
    tlist = _resolve_targets(targets, n, num_classes)
    if ids is not None and len(ids) != n:
        raise DataError(f"compute_cam: {n} images but {len(ids)} ids.")
    layer = model.cam_layer()
    reshape = getattr(model, "cam_reshape", None)
    # grad-cam is imported on first use (slow to import), as in _gradcam_module
    device = next(model.parameters()).device
    t0 = time.time()
    with preserved_model_state(model):
        # grads are needed w.r.t. activations only: freeze parameters, let the input carry grad
        for p in model.parameters():
            p.requires_grad_(False)
        cam = factory(model=model, target_layers=[layer], reshape_transform=reshape,
                      batch_size=score_batch_size, progress=progress if n == 1 else False)
        maps, logits = _cam_batches(cam, model, images, tlist, method, batch_size, progress,
                                    device)
    return CamResult(maps=np.nan_to_num(maps, nan=0.0), method=method, targets=tuple(tlist),
                     class_names=tuple(_class_names(model, num_classes)),
                     layer=getattr(model, "cam_layer_name", ""), ids=tuple(ids or ()),
                     logits=logits,
                     meta={"arch": getattr(model, "arch", type(model).__name__),
                           "model_id": getattr(getattr(model, "card", None), "model_id", ""),
                           "seconds": round(time.time() - t0, 3)})


def _check_images(images: Any) -> None:
    """``images`` must be a non-empty ``[N, C, H, W]`` tensor."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise DataError(f"compute_cam needs images as a [N, C, H, W] tensor; got "
                        f"{getattr(images, 'shape', type(images).__name__)}.")
    if images.shape[0] == 0:
        raise DataError("compute_cam got 0 images.")


def _check_classifier(model: nn.Module, images: torch.Tensor) -> None:
    """``model`` must be a MedClassifier (a CAM layer and a classifier) taking the images'
    channels."""
    if not hasattr(model, "cam_layer") or not hasattr(model, "classifier"):
        raise ModelError(f"compute_cam needs a MedClassifier (with cam_layer() and classifier); "
                         f"got {type(model).__name__}. Build it with medscalpel.models.zoo or "
                         "load it with medscalpel.models.checkpoint.load_model.")
    in_chans = getattr(model, "in_chans", images.shape[1])
    if images.shape[1] != in_chans:
        raise DataError(f"compute_cam: images have {images.shape[1]} channels but the model "
                        f"{getattr(model, 'arch', '')} takes {in_chans}; preprocess with the "
                        "model card's input (card.preprocess).")


def _cam_batches(cam: Any, model: nn.Module, images: torch.Tensor, tlist: list[int],
                 method: str, batch_size: int, progress: bool | None, device: torch.device
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Run the grad-cam object batch by batch: maps ``[N, H, W]`` and each image's target
    logit; its hooks are released whatever happens."""
    n = int(images.shape[0])
    maps = np.zeros((n, images.shape[2], images.shape[3]), np.float32)
    logits = np.zeros(n, np.float32)
    try:
        starts = list(range(0, n, batch_size))
        for s in track(starts, f"{method} maps", progress=progress):
            x = images[s:s + batch_size].detach().to(device).requires_grad_(True)
            tg = [target_cls(t) for t in tlist[s:s + batch_size]]
            out = cam(input_tensor=x, targets=tg)
            maps[s:s + len(tg)] = out
            out_logits = cam.outputs.detach()
            logits[s:s + len(tg)] = [float(out_logits[j, t])
                                     for j, t in enumerate(tlist[s:s + batch_size])]
            cam.activations_and_grads.clear()
            cam.outputs = None
    except RuntimeError as exc:
        raise ModelError(f"compute_cam ({method}) failed on layer '{model.cam_layer_name}' of "
                         f"{getattr(model, 'arch', type(model).__name__)}: {exc}") from exc
    finally:
        cam.activations_and_grads.release()
    return maps, logits


def is_served_model(model: nn.Module) -> bool:
    """A deployed runtime artifact (:class:`medscalpel.deploy.served.RuntimeModel`): no
    gradients, maybe a CAM output of its own."""
    return not getattr(model, "supports_gradients", True) and hasattr(model, "gradcam_maps")


def _served_cam(model: nn.Module, images: torch.Tensor, targets: int | Sequence[int],
                method: str, batch_size: int, progress: bool | None,
                ids: Sequence[str] | None) -> CamResult:
    """Grad-CAM from a served artifact's own CAM output (the class activation map of its
    global-average-pool + linear head, which equals Grad-CAM at that layer after the same
    scaling); every other method is refused: the artifact has no gradients."""
    name = getattr(model, "name", type(model).__name__)
    if method != "gradcam":
        raise ConfigError(f"compute_cam: method '{method}' needs gradients, which the served "
                          f"{name} artifact does not have; its CAM output is Grad-CAM (for a "
                          "global-average-pool + linear head the class activation map equals "
                          "Grad-CAM at that layer), so only method='gradcam' runs on it. Use "
                          "the torch model for other methods.")
    refusal = model.cam_refusal()
    if refusal is not None:
        raise ModelError(f"compute_cam: {refusal}.")
    in_chans = int(getattr(model, "in_chans", images.shape[1]))
    if images.shape[1] != in_chans:
        raise DataError(f"compute_cam: images have {images.shape[1]} channels but the served "
                        f"{name} artifact takes {in_chans}; preprocess with its serve.json input.")
    n = int(images.shape[0])
    tlist = _resolve_targets(targets, n, int(model.num_classes))
    if ids is not None and len(ids) != n:
        raise DataError(f"compute_cam: {n} images but {len(ids)} ids.")
    maps = np.zeros((n, images.shape[2], images.shape[3]), np.float32)
    logits = np.zeros(n, np.float32)
    t0 = time.time()
    for s in track(list(range(0, n, batch_size)), f"{method} maps (served)", progress=progress):
        x = images[s:s + batch_size].detach().float()
        m, z = model.gradcam_maps(x, tlist[s:s + len(x)])
        maps[s:s + len(x)], logits[s:s + len(x)] = m, z
    card = getattr(model, "card", None)
    return CamResult(maps=np.nan_to_num(maps, nan=0.0), method=method, targets=tuple(tlist),
                     class_names=tuple(_class_names(model, int(model.num_classes))),
                     layer=str(getattr(model, "cam_layer", "")), ids=tuple(ids or ()),
                     logits=logits,
                     meta={"arch": getattr(model, "arch", type(model).__name__),
                           "model_id": getattr(card, "model_id", ""),
                           "source": "served CAM output", "label": model.label(),
                           "precision": getattr(model, "precision", None),
                           "artifact": model.provenance(),
                           "cam_definition": model.cam_info.get("definition"),
                           "seconds": round(time.time() - t0, 3)})

