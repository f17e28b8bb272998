"""A native elastic supernet (once-for-all, Cai et al. 2020) in medscalpel's model shape.

Why native and not the ``ofa`` package (checked on this machine, torch 2.14.1):
``pip install --dry-run ofa`` resolves without touching torch and ``OFAMobileNetV3`` imports and
runs; but (1) its first convolution is hard-wired to 3 input channels (a grey chest X-ray fails
with "expected input[2, 1, 64, 64] to have 3 channels"; only patching its private layers fixes
that), (2) its non-elastic ImageNet head (960 -> 1280 channels at width 1.0) dominates the cost of
a 64-128 px, 2-core CPU model, (3) its subnets are its own ``MobileNetV3`` class with a wrapped
``LinearLayer`` classifier, not a :class:`~medscalpel.models.classifier.MedClassifier` (``f(x)
W^T + b`` with an ``nn.Linear``, a CAM layer), and (4) it has not been released since 2023.
Its training code needs its ImageNet run manager. So the elastic network is written here
(small, tested in ``tests/test_ofa.py``) and follows the paper's three elastic dimensions:

* **kernel size** (3 / 5 / 7) of every depthwise convolution: one 7x7 weight; a smaller kernel
  is the centre crop of the next larger one multiplied by a learned ``k^2 x k^2`` transform
  matrix (initialised to the identity, so a fresh supernet's 5x5 is the plain centre crop);
* **depth** per stage: the first ``d`` blocks of the stage run, the rest are skipped;
* **width** (expand ratio) of every block: the first ``mid`` middle channels are used; before
  the width phase the middle channels are sorted by the L1 norm of their projection weights
  (:meth:`OFASupernet.sort_channels`), so the most important ones are the ones kept.

The active subnet is set with :meth:`OFASupernet.set_active`; :func:`extract_subnet` copies it
into a standalone ``ofa_subnet`` zoo model (plain convolutions) whose logits equal the
supernet's at that configuration.

Example:
    >>> import torch
    >>> space = OFASpace(stage_widths=(8, 16), stage_strides=(1, 2), max_depth=2,
    ...                  depth_choices=(1, 2), head_width=16, stem_width=8)
    >>> net = OFASupernet(space, num_classes=2, in_chans=1).eval()
    >>> cfg = space.min_config()
    >>> net.set_active(cfg)
    >>> sub = extract_subnet(net, cfg)
    >>> x = torch.randn(2, 1, 32, 32)
    >>> bool((net(x) - sub(x)).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medscalpel.errors import ConfigError, ModelError
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.ofa_subnet import build_ofa_subnet, conv_bn
from medscalpel.validation import check_range

SCHEMA = 1
ARCH = "ofa_supernet"


def mid_channels(c_in: int, expand: float) -> int:
    """Middle width of a block: ``round(c_in * expand)`` (at least 1)."""
    return max(1, int(round(c_in * float(expand))))


# ----------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class SubnetConfig:
    """One subnet: the active depth of every stage and, for every block slot of the supernet
    (``max_depth`` per stage, in order), its kernel size and expand ratio (slots beyond a
    stage's depth are carried but unused)."""

    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    expands: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"depths": list(self.depths), "kernels": list(self.kernels),
                "expands": list(self.expands)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubnetConfig":
        return cls(tuple(int(v) for v in d["depths"]), tuple(int(v) for v in d["kernels"]),
                   tuple(float(v) for v in d["expands"]))

    def key(self, space: "OFASpace") -> str:
        """A canonical string of the ACTIVE choices (unused slots ignored): equal keys, equal
        subnets."""
        parts = []
        for s, d in enumerate(self.depths):
            for j in range(d):
                i = s * space.max_depth + j
                parts.append(f"{self.kernels[i]}x{self.expands[i]:g}")
            parts.append("|")
        return ",".join(parts)


@dataclass(frozen=True)
class OFASpace:
    """The elastic dimensions and the fixed skeleton of a supernet.

    Attributes:
        stage_widths, stage_strides: output channels and stride of the first block of each
            stage (the other blocks of a stage keep the width with stride 1).
        max_depth: blocks per stage in the full network; ``depth_choices`` the active depths.
        kernel_choices: depthwise kernel sizes (odd, ascending; the largest is stored).
        expand_choices: expand ratios of the middle channels (ascending).
        stem_width, stem_stride: the first convolution (3x3); head_width: the final 1x1 conv
            (the CAM layer) whose pooled output is the penultimate feature vector.
    """

    stage_widths: tuple[int, ...] = (16, 24, 40, 64)
    stage_strides: tuple[int, ...] = (1, 2, 2, 2)
    max_depth: int = 3
    depth_choices: tuple[int, ...] = (1, 2, 3)
    kernel_choices: tuple[int, ...] = (3, 5, 7)
    expand_choices: tuple[float, ...] = (2.0, 3.0, 4.0)
    stem_width: int = 16
    stem_stride: int = 2
    head_width: int = 128

    def __post_init__(self):
        o = "OFASpace"
        if len(self.stage_widths) != len(self.stage_strides) or not self.stage_widths:
            raise ConfigError(f"{o}: stage_widths and stage_strides must have the same length "
                              f"(>= 1); got {self.stage_widths} and {self.stage_strides}.")
        check_range(self.max_depth, "max_depth", o, 1, integer=True)
        ks = tuple(int(k) for k in self.kernel_choices)
        if not ks or any(k % 2 == 0 or k < 1 for k in ks) or list(ks) != sorted(set(ks)):
            raise ConfigError(f"The 'kernel_choices' parameter of {o} must be ascending odd "
                              f"sizes. Got {self.kernel_choices!r} instead.")
        ds = tuple(int(d) for d in self.depth_choices)
        if not ds or list(ds) != sorted(set(ds)) or ds[0] < 1 or ds[-1] != self.max_depth:
            raise ConfigError(f"The 'depth_choices' parameter of {o} must be ascending depths in "
                              f"1..max_depth ending at max_depth={self.max_depth}. Got "
                              f"{self.depth_choices!r} instead.")
        es = tuple(float(e) for e in self.expand_choices)
        if not es or list(es) != sorted(set(es)) or es[0] <= 0:
            raise ConfigError(f"The 'expand_choices' parameter of {o} must be ascending positive "
                              f"ratios. Got {self.expand_choices!r} instead.")
        for name in ("stem_width", "stem_stride", "head_width"):
            check_range(getattr(self, name), name, o, 1, integer=True)

    @property
    def n_stages(self) -> int:
        return len(self.stage_widths)

    @property
    def n_slots(self) -> int:
        return self.n_stages * self.max_depth

    def slot_channels(self) -> list[tuple[int, int, int]]:
        """(in, out, stride) of every block slot."""
        out, prev = [], self.stem_width
        for w, s in zip(self.stage_widths, self.stage_strides):
            for j in range(self.max_depth):
                out.append((prev, w, s if j == 0 else 1))
                prev = w
        return out

    def max_config(self) -> SubnetConfig:
        return SubnetConfig((self.max_depth,) * self.n_stages,
                            (max(self.kernel_choices),) * self.n_slots,
                            (max(self.expand_choices),) * self.n_slots)

    def min_config(self) -> SubnetConfig:
        return SubnetConfig((min(self.depth_choices),) * self.n_stages,
                            (min(self.kernel_choices),) * self.n_slots,
                            (min(self.expand_choices),) * self.n_slots)

    def sample(self, rng: np.random.Generator | np.random.RandomState,
               kernel: bool = True, depth: bool = True, width: bool = True) -> SubnetConfig:
        """A uniformly random subnet over the elastic dimensions switched on (the others at
        their maximum)."""
        mx = self.max_config()
        n, ns = self.n_slots, self.n_stages
        ks = tuple(int(rng.choice(self.kernel_choices)) for _ in range(n)) if kernel \
            else mx.kernels
        ds = tuple(int(rng.choice(self.depth_choices)) for _ in range(ns)) if depth \
            else mx.depths
        es = tuple(float(rng.choice(self.expand_choices)) for _ in range(n)) if width \
            else mx.expands
        return SubnetConfig(ds, ks, es)

    def validate_config(self, cfg: SubnetConfig) -> SubnetConfig:
        if (len(cfg.depths) != self.n_stages or len(cfg.kernels) != self.n_slots
                or len(cfg.expands) != self.n_slots):
            raise ConfigError(f"A subnet of this supernet has {self.n_stages} depths and "
                              f"{self.n_slots} kernels / expand ratios; got {len(cfg.depths)}, "
                              f"{len(cfg.kernels)} and {len(cfg.expands)}.")
        bad = ([d for d in cfg.depths if d not in self.depth_choices]
               + [k for k in cfg.kernels if k not in self.kernel_choices]
               + [e for e in cfg.expands if e not in self.expand_choices])
        if bad:
            raise ConfigError(f"Subnet choices {bad} are outside the supernet's space (depths "
                              f"{self.depth_choices}, kernels {self.kernel_choices}, expands "
                              f"{self.expand_choices}).")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OFASpace":
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
              if k in cls.__dataclass_fields__}
        return cls(**kw)


# ----------------------------------------------------------------------------- elastic ops
class DynamicBatchNorm2d(nn.Module):
    """BatchNorm over the first ``c`` channels of its input (``c`` <= the stored width)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, c = self.bn, x.shape[1]
        if c == bn.num_features:
            return bn(x)
        factor = 0.0
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked += 1
            factor = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None
                      else bn.momentum)
        # slices of the running buffers are views: the update lands in the stored buffers
        return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c],
                            bn.bias[:c], bn.training or not bn.track_running_stats, factor,
                            bn.eps)


class DynamicPointwise(nn.Module):
    """1x1 convolution using the first ``c_out`` filters over the first ``c_in`` inputs."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)

    def weight(self, c_in: int, c_out: int) -> torch.Tensor:
        return self.conv.weight[:c_out, :c_in]

    def forward(self, x: torch.Tensor, c_out: int) -> torch.Tensor:
        return F.conv2d(x, self.weight(x.shape[1], c_out))


class DynamicDepthwise(nn.Module):
    """Depthwise convolution with an elastic kernel (centre crop + learned transform)."""

    def __init__(self, channels: int, kernel_choices: tuple[int, ...], stride: int):
        super().__init__()
        self.kernel_choices = tuple(int(k) for k in kernel_choices)
        kmax = self.kernel_choices[-1]
        self.conv = nn.Conv2d(channels, channels, kmax, stride, kmax // 2, groups=channels,
                              bias=False)
        self.stride = stride
        # one transform per shrink step (7 -> 5, 5 -> 3), shared by the channels (as in OFA)
        self.transforms = nn.ParameterDict({
            f"{a}to{b}": nn.Parameter(torch.eye(b * b))
            for a, b in zip(self.kernel_choices[::-1], self.kernel_choices[::-1][1:])})

    def weight(self, kernel: int, channels: int) -> torch.Tensor:
        w = self.conv.weight[:channels]
        size = w.shape[-1]
        for a, b in zip(self.kernel_choices[::-1], self.kernel_choices[::-1][1:]):
            if size == kernel:
                break
            lo = (a - b) // 2
            crop = w[:, :, lo:lo + b, lo:lo + b].reshape(channels, b * b)
            w = (crop @ self.transforms[f"{a}to{b}"]).reshape(channels, 1, b, b)
            size = b
        if size != kernel:
            raise ConfigError(f"Kernel size {kernel} is not one of {self.kernel_choices}.")
        return w

    def forward(self, x: torch.Tensor, kernel: int) -> torch.Tensor:
        c = x.shape[1]
        return F.conv2d(x, self.weight(kernel, c), None, self.stride, kernel // 2, 1, c)


class DynamicInvertedResidual(nn.Module):
    """An inverted residual block with elastic kernel and expand ratio."""

    def __init__(self, c_in: int, c_out: int, stride: int, space: OFASpace):
        super().__init__()
        self.c_in, self.c_out, self.stride = c_in, c_out, stride
        self.mid_max = mid_channels(c_in, max(space.expand_choices))
        self.expand = DynamicPointwise(c_in, self.mid_max)
        self.expand_bn = DynamicBatchNorm2d(self.mid_max)
        self.depthwise = DynamicDepthwise(self.mid_max, space.kernel_choices, stride)
        self.depthwise_bn = DynamicBatchNorm2d(self.mid_max)
        self.project = DynamicPointwise(self.mid_max, c_out)
        self.project_bn = DynamicBatchNorm2d(c_out)
        self.residual = stride == 1 and c_in == c_out
        self.active_kernel = max(space.kernel_choices)
        self.active_mid = self.mid_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.expand_bn(self.expand(x, self.active_mid)))
        h = F.relu(self.depthwise_bn(self.depthwise(h, self.active_kernel)))
        y = self.project_bn(self.project(h, self.c_out))
        return y + x if self.residual else y

    @torch.no_grad()
    def sort_channels(self) -> torch.Tensor:
        """Reorder the middle channels by decreasing L1 norm of their projection weights
        (function unchanged at full width); returns the permutation."""
        importance = self.project.conv.weight.abs().sum(dim=(0, 2, 3))
        order = torch.argsort(importance, descending=True, stable=True)
        self.expand.conv.weight.copy_(self.expand.conv.weight[order])
        self.depthwise.conv.weight.copy_(self.depthwise.conv.weight[order])
        self.project.conv.weight.copy_(self.project.conv.weight[:, order])
        for bn in (self.expand_bn.bn, self.depthwise_bn.bn):
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t.copy_(t[order])
        return order


class OFABackbone(nn.Module):
    """stem -> stages of elastic blocks (first ``depth`` of each run) -> head -> pool."""

    def __init__(self, space: OFASpace, in_chans: int):
        super().__init__()
        self.space = space
        self.stem = conv_bn(in_chans, space.stem_width, 3, space.stem_stride)
        slots = space.slot_channels()
        d = space.max_depth
        self.stages = nn.ModuleList(
            nn.ModuleList(DynamicInvertedResidual(*slots[s * d + j], space) for j in range(d))
            for s in range(space.n_stages))
        self.head = conv_bn(space.stage_widths[-1], space.head_width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.active_depths = [d] * space.n_stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for stage, depth in zip(self.stages, self.active_depths):
            for block in stage[:depth]:
                h = block(h)
        return self.flatten(self.pool(self.head(h)))


class OFASupernet(MedClassifier):
    """The elastic supernet as a :class:`MedClassifier` (``backbone`` + ``nn.Linear``; the CAM
    layer is ``backbone.head``). Its forward runs the ACTIVE subnet (the full network unless
    :meth:`set_active` chose another)."""

    def __init__(self, space: OFASpace, num_classes: int, in_chans: int = 1,
                 img_size: int = 64):
        check_range(num_classes, "num_classes", "OFASupernet", 1, integer=True)
        if in_chans not in (1, 3):
            raise ModelError(f"The 'in_chans' parameter of OFASupernet must be 1 or 3. Got "
                             f"{in_chans!r} instead.")
        super().__init__(OFABackbone(space, in_chans), nn.Linear(space.head_width, num_classes),
                         ARCH, cam_layer="backbone.head",
                         arch_kwargs={"space": space.to_dict(), "in_chans": in_chans,
                                      "img_size": img_size})
        self.space = space
        self.img_size = img_size
        self.active = space.max_config()

    def set_active(self, cfg: SubnetConfig) -> None:
        """Make ``cfg`` the subnet that :meth:`forward` runs."""
        self.space.validate_config(cfg)
        bb: OFABackbone = self.backbone  # type: ignore[assignment]
        bb.active_depths = list(cfg.depths)
        d = self.space.max_depth
        for s, stage in enumerate(bb.stages):
            for j, block in enumerate(stage):
                i = s * d + j
                block.active_kernel = int(cfg.kernels[i])
                block.active_mid = mid_channels(block.c_in, cfg.expands[i])
        self.active = cfg

    def sort_channels(self) -> None:
        """Sort every block's middle channels by importance (before the width phase)."""
        for stage in self.backbone.stages:
            for block in stage:
                block.sort_channels()

    def fingerprint(self) -> str:
        """A short content hash of the space and the weights (the supernet id)."""
        h = hashlib.sha256(json.dumps(self.space.to_dict(), sort_keys=True).encode())
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- extraction
def subnet_blocks(space: OFASpace, cfg: SubnetConfig) -> list[dict[str, int]]:
    """The ``ofa_subnet`` block list of a configuration (active blocks only)."""
    space.validate_config(cfg)
    slots = space.slot_channels()
    out = []
    for s, depth in enumerate(cfg.depths):
        for j in range(depth):
            i = s * space.max_depth + j
            c_in, c_out, stride = slots[i]
            out.append({"in": c_in, "out": c_out, "mid": mid_channels(c_in, cfg.expands[i]),
                        "kernel": int(cfg.kernels[i]), "stride": stride})
    return out


def _copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, c: int) -> None:
    dst.weight.copy_(src.weight[:c])
    dst.bias.copy_(src.bias[:c])
    dst.running_mean.copy_(src.running_mean[:c])
    dst.running_var.copy_(src.running_var[:c])
    dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.eps, dst.momentum = src.eps, src.momentum


@torch.no_grad()
def extract_subnet(supernet: OFASupernet, cfg: SubnetConfig) -> MedClassifier:
    """The subnet ``cfg`` as a standalone ``ofa_subnet`` :class:`MedClassifier` with the
    supernet's (sliced, kernel-transformed) weights; the supernet is left unchanged."""
    space = supernet.space
    blocks = subnet_blocks(space, cfg)
    sub = build_ofa_subnet(supernet.num_classes, supernet.in_chans, space.stem_width, blocks,
                           space.head_width, space.stem_stride)
    sub.arch_kwargs.update({"in_chans": supernet.in_chans, "img_size": supernet.img_size})
    bb = supernet.backbone
    sub.backbone.stem.load_state_dict(bb.stem.state_dict())
    sub.backbone.head.load_state_dict(bb.head.state_dict())
    sub.classifier.load_state_dict(supernet.classifier.state_dict())
    k = 0
    for s, depth in enumerate(cfg.depths):
        for j in range(depth):
            src = bb.stages[s][j]
            dst = sub.backbone.blocks[k]
            b = blocks[k]
            mid = b["mid"]
            dst.expand.conv.weight.copy_(src.expand.weight(b["in"], mid))
            _copy_bn(dst.expand.bn, src.expand_bn.bn, mid)
            dst.depthwise.conv.weight.copy_(src.depthwise.weight(b["kernel"], mid))
            _copy_bn(dst.depthwise.bn, src.depthwise_bn.bn, mid)
            dst.project.conv.weight.copy_(src.project.weight(mid, b["out"]))
            _copy_bn(dst.project.bn, src.project_bn.bn, b["out"])
            k += 1
    sub.train(supernet.training)
    return sub


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``images``
    (cumulative average over the batches; OFA's step before evaluating a subnet, whose
    statistics in the supernet are a mixture over all subnets)."""
    m = copy.deepcopy(model)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    m.train()
    for i in range(0, len(images), batch_size):
        m(images[i:i + batch_size].float())
    for bn, orig in zip(bns, [mod for mod in model.modules() if isinstance(mod, nn.BatchNorm2d)]):
        bn.momentum = orig.momentum
    m.eval()
    return m


def supernet_from_dict(d: dict[str, Any]) -> OFASupernet:
    """An (untrained) supernet from its ``arch_kwargs``-style description."""
    return OFASupernet(OFASpace.from_dict(d["space"]), int(d["num_classes"]),
                       int(d.get("in_chans", 1)), int(d.get("img_size", 64)))


@dataclass(frozen=True)
class SupernetInfo:
    """What identifies a trained supernet: its id (content hash), space and input contract."""

    supernet_id: str
    space: dict[str, Any]
    num_classes: int
    in_chans: int
    img_size: int
    parameters: int
    history: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SupernetInfo":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


__all__ = ["ARCH", "DynamicBatchNorm2d", "DynamicDepthwise", "DynamicInvertedResidual",
           "DynamicPointwise", "OFABackbone", "OFASpace", "OFASupernet", "SubnetConfig",
           "SupernetInfo", "extract_subnet", "mid_channels", "recalibrate_bn", "subnet_blocks",
           "supernet_from_dict"]
