"""The one model shape every stage of medscalpel works on.

A :class:`MedClassifier` is ``logits = classifier(backbone(x))`` where ``backbone`` maps images to
penultimate features ``f(x)`` of shape ``[N, C]`` and ``classifier`` is a single ``nn.Linear``
(``W [K x C]``, ``b [K]``). So for every architecture of the zoo, ``logits = f(x) W^T + b``
exactly: classifier-channel attribution, surgery, partial retraining, polarity analysis and
feature caching all rest on that identity. ``cam_layer`` names the module whose output is the
last convolutional feature map (the CAM target); ``cam_reshape`` turns a ViT's token sequence
into a map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medscalpel.errors import ModelError


class MedClassifier(nn.Module):
    """A backbone producing penultimate features and one linear classifier.

    Args:
        backbone: module mapping ``[N, C_in, H, W]`` images to ``[N, C]`` features.
        classifier: ``nn.Linear(C, K)``.
        arch: architecture name in the zoo.
        cam_layer: qualified name (from this module) of the CAM target layer.
        cam_reshape: optional function turning that layer's output into ``[N, C, h, w]``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        classifier: nn.Linear,
        arch: str,
        cam_layer: str,
        cam_reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
        arch_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if not isinstance(classifier, nn.Linear):
            raise ModelError(f"The classifier of a MedClassifier must be nn.Linear; got "
                             f"{type(classifier).__name__}.")
        self.backbone = backbone
        self.classifier = classifier
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        self.cam_layer_name = cam_layer
        self.cam_reshape = cam_reshape
        self.card = None  # a medscalpel.models.checkpoint.ModelCard once loaded / trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``f(x)`` ``[N, C]`` with ``logits = f W^T + b``."""
        return self.backbone(x)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    @property
    def in_chans(self) -> int:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
        return int(self.arch_kwargs.get("in_chans", 3))

    def cam_layer(self) -> nn.Module:
        """The module whose output is the last convolutional feature map."""
        try:
            return self.get_submodule(self.cam_layer_name)
        except AttributeError as exc:
            raise ModelError(f"CAM layer '{self.cam_layer_name}' not found in {self.arch}.") from exc

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the CAM layer (reshaped to ``[N, C, h, w]`` for token models)."""
        store: list[torch.Tensor] = []
        h = self.cam_layer().register_forward_hook(lambda m, i, o: store.append(o))
        try:
            self.backbone(x)
        finally:
            h.remove()
        out = store[-1]
        return self.cam_reshape(out) if self.cam_reshape is not None else out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
