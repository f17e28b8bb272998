"""An explanation output in the exported graph (issue T): class activation maps computed by the
served runtime itself, beside the logits.

For a model whose head is global average pooling + one linear layer after its CAM layer
(DenseNet, ResNet, the tiny CNNs, MobileNet / EfficientNet through timm), the logit of class k
is ``mean_hw(sum_c W[k, c] A[c, h, w]) + b[k]`` with ``A`` the CAM layer's map, so the class
activation map ``CAM_k = sum_c W[k, c] A[c]`` (Zhou et al. 2016) is one more matrix product on a
tensor the runtime computes anyway. For such heads Grad-CAM at that layer has weights
``alpha_k = W[k] / (h w)``: Grad-CAM = ReLU(CAM_k) / (h w), equal after the min-max scaling
pytorch-grad-cam applies. :func:`cam_support` checks the head identity numerically (refused
otherwise: a VGG with its fully connected head, ViTs, whose CAM layer is not pooled linearly,
get no CAM output, and say so), :func:`cam_maps` scales raw maps exactly as pytorch-grad-cam
does, so that served maps compare with the torch Grad-CAM one to one.

Example:
    >>> import torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("densenet_tiny", num_classes=3, img_size=32).eval()
    >>> s = cam_support(m, torch.rand(2, 1, 32, 32))
    >>> s.ok, s.max_rel_delta < 1e-5
    (True, True)
    >>> logits, cam = CamHead(m)(torch.rand(2, 1, 32, 32))
    >>> tuple(logits.shape), tuple(cam.shape)[:2]
    ((2, 3), (2, 3))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from pytorch_grad_cam.utils.image import scale_cam_image
from scipy.stats import spearmanr
from torch import nn

from medscalpel.errors import ModelError

#: relative |mean_hw(CAM) + b - logits| above which a head is not GAP + linear
HEAD_TOLERANCE = 1e-4
CAM_OUTPUT = "cam"


class CamHead(nn.Module):
    """``x -> (logits, cam)`` of a :class:`~medscalpel.models.classifier.MedClassifier`:
    ``cam[n, k] = sum_c W[k, c] A[n, c]`` with ``A`` the CAM layer's map. Shares the model's
    weights (no copy); export it with ``output_names = ("logits", "cam")``."""

    output_names = ("logits", CAM_OUTPUT)

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "cam_layer") or not hasattr(model, "classifier"):
            raise ModelError(f"CamHead needs a MedClassifier; got {type(model).__name__}.")
        self.model = model
        self.card = getattr(model, "card", None)
        self.arch = getattr(model, "arch", type(model).__name__)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        store: list[torch.Tensor] = []
        hook = self.model.cam_layer().register_forward_hook(lambda m, i, o: store.append(o))
        try:
            feats = self.model.backbone(x)
        finally:
            hook.remove()
        a = store[-1]
        reshape = getattr(self.model, "cam_reshape", None)
        if reshape is not None:
            a = reshape(a)
        w = self.model.classifier.weight
        cam = torch.einsum("kc,nchw->nkhw", w, a)
        return self.model.classifier(feats), cam


@dataclass(frozen=True)
class CamSupport:
    """Whether a model's head lets the served graph carry exact CAMs, and the evidence:
    ``max_rel_delta`` = max |mean_hw(CAM) + b - logits| / max(1, |logits|) on the check
    images."""

    ok: bool
    reason: str
    max_rel_delta: float
    layer: str
    map_shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["map_shape"] = list(self.map_shape)
        return d


@torch.no_grad()
def cam_support(model: nn.Module, images: torch.Tensor) -> CamSupport:
    """Check numerically that ``logits = mean_hw(CAM) + b`` on ``images``."""
    layer = getattr(model, "cam_layer_name", "")
    if getattr(model, "cam_reshape", None) is not None:
        return CamSupport(False, "token model (ViT): its CAM layer is not pooled linearly into "
                                 "the logits; no CAM output (use Grad-CAM in torch)", float("nan"),
                          layer, ())
    was = model.training
    model.eval()
    try:
        logits, cam = CamHead(model)(images.float())
    except Exception as exc:  # noqa: BLE001 - an unsupported layout is an answer, not a crash
        return CamSupport(False, f"the CAM layer's output is not a [N, C, h, w] map "
                                 f"({type(exc).__name__}: {exc})", float("nan"), layer, ())
    finally:
        model.train(was)
    approx = cam.mean(dim=(2, 3)) + model.classifier.bias
    rel = float(((approx - logits).abs() / logits.abs().clamp_min(1.0)).max())
    ok = rel <= HEAD_TOLERANCE
    reason = ("GAP + linear head after the CAM layer: logits = mean(CAM) + b" if ok else
              f"the head after '{layer}' is not global average pooling + one linear layer "
              f"(max relative delta {rel:.3g} > {HEAD_TOLERANCE:g}); no CAM output")
    return CamSupport(ok, reason, rel, layer, tuple(int(s) for s in cam.shape[2:]))


def cam_maps(raw: np.ndarray, targets: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """Maps ``[N, H, W]`` in [0, 1] from raw CAMs ``[N, K, h, w]`` for one class per image:
    ReLU, then pytorch-grad-cam's own scaling (min-max per image, bilinear resize, min-max
    again as it does when it aggregates layers), so a served map and the torch Grad-CAM of the
    same class compare one to one."""

    raw = np.asarray(raw, np.float32)
    sel = np.stack([raw[i, int(t)] for i, t in enumerate(targets)])
    # as pytorch-grad-cam: per layer ReLU + min-max + resize, then min-max again over layers
    per_layer = scale_cam_image(np.maximum(sel, 0.0), target_size=(int(size[1]), int(size[0])))
    return scale_cam_image(per_layer)


def rank_agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation per image between two stacks of maps ``[N, H, W]``."""

    out = []
    for x, y in zip(a, b):
        x, y = x.ravel(), y.ravel()
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            out.append(float("nan"))
            continue
        out.append(float(spearmanr(x, y).statistic))
    return np.asarray(out)


__all__ = ["CAM_OUTPUT", "CamHead", "CamSupport", "HEAD_TOLERANCE", "cam_maps", "cam_support",
           "rank_agreement"]
