"""The standalone network of a once-for-all subnet (zoo architecture ``ofa_subnet``).

A subnet extracted from :class:`medscalpel.compress.ofa.supernet.OFASupernet` is rebuilt from its
``arch_kwargs`` alone (so :func:`~medscalpel.models.checkpoint.save_model` /
:func:`~medscalpel.models.checkpoint.load_model` round-trip it) out of plain torch layers::

    stem    conv3x3(in_chans -> stem_width, stride stem_stride) - BN - ReLU
    blocks  inverted residuals (MobileNetV2/V3 style, no squeeze-excitation):
            conv1x1(in -> mid) - BN - ReLU - depthwise conv k x k (stride) - BN - ReLU
            - conv1x1(mid -> out) - BN  (+ the input when stride 1 and in == out)
    head    conv1x1(last width -> head_width) - BN - ReLU   (the CAM layer: ``backbone.head``)
    pool, flatten, classifier nn.Linear(head_width, K)

Every block is described by ``{"in", "out", "mid", "kernel", "stride"}``; nothing else is needed.

Example:
    >>> import torch
    >>> m = build_ofa_subnet(2, 1, 8, [{"in": 8, "out": 8, "mid": 16, "kernel": 3, "stride": 2}],
    ...                      16)
    >>> m(torch.zeros(1, 1, 32, 32)).shape, tuple(m.feature_map(torch.zeros(1, 1, 32, 32)).shape)
    (torch.Size([1, 2]), (1, 16, 8, 8))
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medscalpel.errors import ModelError
from medscalpel.models.classifier import MedClassifier

BLOCK_KEYS = ("in", "out", "mid", "kernel", "stride")
#: the layout of ``create_model("ofa_subnet")`` without ``blocks`` (an example, untrained):
#: real layouts come from a supernet's extraction and travel in the model card's arch_kwargs
DEFAULT_BLOCKS = ({"in": 16, "out": 24, "mid": 48, "kernel": 3, "stride": 2},
                  {"in": 24, "out": 40, "mid": 96, "kernel": 5, "stride": 2})


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    """conv (no bias, 'same' padding) - BN - optional ReLU, as named children conv/bn/act."""
    layers: "OrderedDict[str, nn.Module]" = OrderedDict(
        conv=nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        bn=nn.BatchNorm2d(c_out))
    if act:
        layers["act"] = nn.ReLU(inplace=False)
    return nn.Sequential(layers)


class InvertedResidual(nn.Module):
    """expand 1x1 - depthwise k x k - project 1x1, with the identity shortcut when shapes agree."""

    def __init__(self, c_in: int, c_out: int, mid: int, kernel: int, stride: int):
        super().__init__()
        self.expand = conv_bn(c_in, mid, 1)
        self.depthwise = conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = conv_bn(mid, c_out, 1, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return y + x if self.residual else y


def _check_blocks(blocks: Sequence[dict[str, Any]], stem_width: int) -> list[dict[str, int]]:
    if not blocks:
        raise ModelError("ofa_subnet needs at least one block.")
    out: list[dict[str, int]] = []
    prev = int(stem_width)
    for i, b in enumerate(blocks):
        missing = [k for k in BLOCK_KEYS if k not in b]
        if missing:
            raise ModelError(f"ofa_subnet block {i} lacks {missing}; every block has {BLOCK_KEYS}.")
        b = {k: int(b[k]) for k in BLOCK_KEYS}
        if b["in"] != prev:
            raise ModelError(f"ofa_subnet block {i} takes {b['in']} channels but the previous "
                             f"layer gives {prev}.")
        if b["kernel"] % 2 == 0 or min(b.values()) < 1:
            raise ModelError(f"ofa_subnet block {i} is invalid: {b} (odd kernel, sizes >= 1).")
        out.append(b)
        prev = b["out"]
    return out


def build_ofa_subnet(num_classes: int, in_chans: int, stem_width: int,
                     blocks: Sequence[dict[str, Any]], head_width: int, stem_stride: int = 2,
                     arch_kwargs: dict[str, Any] | None = None) -> MedClassifier:
    """A :class:`MedClassifier` from a subnet description (see the module docstring)."""
    bl = _check_blocks(blocks, stem_width)
    backbone = nn.Sequential(OrderedDict(
        stem=conv_bn(in_chans, int(stem_width), 3, int(stem_stride)),
        blocks=nn.Sequential(*[InvertedResidual(b["in"], b["out"], b["mid"], b["kernel"],
                                                b["stride"]) for b in bl]),
        head=conv_bn(bl[-1]["out"], int(head_width), 1),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(1),
    ))
    kw = {"stem_width": int(stem_width), "stem_stride": int(stem_stride),
          "head_width": int(head_width), "blocks": [dict(b) for b in bl],
          **(arch_kwargs or {})}
    return MedClassifier(backbone, nn.Linear(int(head_width), num_classes), "ofa_subnet",
                         cam_layer="backbone.head", arch_kwargs=kw)


__all__ = ["BLOCK_KEYS", "DEFAULT_BLOCKS", "InvertedResidual", "build_ofa_subnet", "conv_bn"]
