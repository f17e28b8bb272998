"""Grad-CAM maps of every class in one pass, from a torch model or a served artifact.

:func:`class_cams` computes Grad-CAM for ALL requested classes with one backbone pass per batch
(the gradient of each class logit w.r.t. the CAM layer needs only the head, so K classes cost
one forward pass); it equals :func:`medscalpel.explain.cams.compute_cam` with
``method="gradcam"`` on DenseNets and the textbook Grad-CAM computed with autograd on ResNet /
VGG (tested; the ``grad-cam`` package differs from the textbook by up to ~0.1 on those). A
served artifact with a CAM output (:func:`served_cams`) gives the same maps without gradients.
It lives in the audit layer because that layer sits below ``explain``; the change audit
(:mod:`medscalpel.audit.changes.explanation`) compares the maps of two models with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medscalpel.errors import ModelError


def class_cams(model: nn.Module, images: torch.Tensor, classes: Sequence[int],
               batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps ``[N, len(classes), H, W]`` in [0, 1] at input resolution.

    Per class: weights = spatial mean of d logit / d A over the CAM layer's map A, map =
    ReLU(sum_c weight_c A_c), min-max scaled, bilinearly resized (as ``grad-cam`` does). The
    model is left unchanged (modes, ``requires_grad``, hooks restored).

    A served artifact with a CAM output (:func:`served_cams`: no gradients, its runtime
    computes ``cam_k = sum_c W[k, c] A_c``) gives the same maps from that output: for its
    global-average-pool + linear head the Grad-CAM weights are ``W[k] / (h w)``, so
    ``ReLU(cam_k / (h w))`` is Grad-CAM, scaled here exactly as the torch maps are.
    """
    if served_cams(model):
        return _served_class_cams(model, images, classes, batch_size)
    if not hasattr(model, "cam_layer"):
        raise ModelError(f"class_cams needs a MedClassifier with cam_layer(); got "
                         f"{type(model).__name__}.")
    layer = model.cam_layer()
    reshape = getattr(model, "cam_reshape", None)
    store: dict[str, torch.Tensor] = {}

    def hook(_m, _i, out):
        leaf = out.detach().requires_grad_(True)
        store["a"] = leaf
        return leaf

    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handle = layer.register_forward_hook(hook)
    n, h, w = int(images.shape[0]), int(images.shape[-2]), int(images.shape[-1])
    out = np.zeros((n, len(classes), h, w), np.float32)
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        dev = next(model.parameters()).device
        for s in range(0, n, batch_size):
            with torch.enable_grad():
                logits = model(images[s:s + batch_size].to(dev))
                a = store["a"]
                grads = [torch.autograd.grad(logits[:, int(k)].sum(), a, retain_graph=True)[0]
                         for k in classes]
            act = reshape(a.detach()) if reshape is not None else a.detach()
            for j, g in enumerate(grads):
                g = reshape(g) if reshape is not None else g
                cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * act).sum(1))
                out[s:s + len(cam), j] = _scale_maps(cam, h, w)
            store.clear()
    finally:
        handle.remove()
        for m, mode in modes:
            m.training = mode
        for p, req in flags:
            p.requires_grad_(req)
    return np.nan_to_num(out, nan=0.0)


def _scale_maps(cam: torch.Tensor, h: int, w: int) -> np.ndarray:
    """ReLU'd maps ``[n, h', w']`` -> ``[n, h, w]``: min-max per map, bilinear resize."""
    flat = cam.flatten(1)
    cam = (cam - flat.min(1)[0][:, None, None])
    cam = cam / (1e-7 + cam.flatten(1).max(1)[0][:, None, None])
    up = F.interpolate(cam[:, None].float(), size=(h, w), mode="bilinear",
                       align_corners=False)[:, 0]
    return up.cpu().numpy()


def served_cams(model: nn.Module) -> bool:
    """Whether ``model`` is a served artifact whose graph returns class activation maps
    (:class:`medscalpel.deploy.served.RuntimeModel` with ``has_cams``)."""
    return (not getattr(model, "supports_gradients", True)
            and bool(getattr(model, "has_cams", False)))


def _served_class_cams(model: nn.Module, images: torch.Tensor, classes: Sequence[int],
                       batch_size: int) -> np.ndarray:
    n, h, w = int(images.shape[0]), int(images.shape[-2]), int(images.shape[-1])
    out = np.zeros((n, len(classes), h, w), np.float32)
    for s in range(0, n, batch_size):
        raw = model.cams(images[s:s + batch_size])          # [b, K, h', w'], pre-ReLU
        area = float(raw.shape[-2] * raw.shape[-1])
        for j, k in enumerate(classes):
            out[s:s + len(raw), j] = _scale_maps(torch.relu(raw[:, int(k)] / area), h, w)
    return np.nan_to_num(out, nan=0.0)


def n_outputs(model: nn.Module) -> int:
    """The number of classes a model explains (its classifier's outputs)."""
    clf = getattr(model, "classifier", None)
    return int(clf.out_features) if clf is not None else int(model.num_classes)


def map_source(model: nn.Module) -> dict[str, Any]:
    """Where a model's maps come from, for the result: torch autograd, or the served artifact
    (label with its precision, provenance)."""
    if served_cams(model):
        return {"maps": model.label(), "artifact": model.provenance()}
    return {"maps": "Grad-CAM (torch autograd at the CAM layer)"}


def cam_grid(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Spatial size ``[h, w]`` of the model's CAM layer output for input like ``x``."""
    if served_cams(model):
        return [int(d) for d in model.cams(x).shape[-2:]]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            f = model.feature_map(x.to(next(model.parameters()).device))
    finally:
        for m, mode in modes:
            m.training = mode
    return [int(f.shape[-2]), int(f.shape[-1])]
