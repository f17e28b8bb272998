"""Preprocessing the field expects for chest X-rays, recorded with the model.

Raw images are grey (``[H, W]``, uint8 or float in [0, 1]; uint16 / uint32 / int32 samples are
scaled by their real bit depth, see :func:`medscalpel.data.io.scale_samples`); they are resized,
optionally augmented with light CXR-appropriate transforms (small rotation, scale,
brightness/contrast; never vertical flips, and no horizontal flips either: laterality matters in
a CXR), normalised and repeated to the number of input channels the model takes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medscalpel.data.io import scale_samples
from medscalpel.errors import ConfigError

GREY_MEAN = 0.5
GREY_STD = 0.25
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Augment:
    """Light augmentation for chest X-rays (applied on tensors in [0, 1]).

    Geometry (rotation, scale, translation), then an intensity change: ``x ** g`` with ``g``
    log-uniform in ``[exp(-gamma), exp(gamma)]`` (a display / detector curve; off at 0), contrast
    and brightness around the image mean, and Gaussian noise of a standard deviation drawn in
    ``[0, noise]`` (off at 0). :meth:`preset` names the two profiles medscalpel uses.
    """

    rotation_deg: float = 7.0
    scale: tuple[float, float] = (0.92, 1.08)
    translate: float = 0.04
    brightness: float = 0.08
    contrast: float = 0.12
    gamma: float = 0.0
    noise: float = 0.0

    #: named profiles: ``light`` (the default: small pose and exposure changes) and
    #: ``acquisition`` (also another scanner's field of view, display curve and detector noise:
    #: zoom up to 1.15x, gamma 0.67-1.49, contrast +-25%, brightness +-0.1, noise sd <= 0.05)
    PRESETS = ("light", "acquisition")

    @classmethod
    def preset(cls, name: str) -> "Augment":
        """An :class:`Augment` by profile name (see :data:`PRESETS`).

        >>> Augment.preset("acquisition").gamma
        0.4
        """
        key = str(name).strip().lower()
        if key == "light":
            return cls()
        if key == "acquisition":
            return cls(scale=(0.9, 1.15), brightness=0.1, contrast=0.25, gamma=0.4, noise=0.05)
        raise ConfigError(f"Unknown augmentation profile {name!r}; use one of "
                          f"{', '.join(cls.PRESETS)}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"] = list(self.scale)
        return d

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # img: [C, H, W] in [0, 1]
        def u(lo: float, hi: float) -> float:
            return float(torch.empty(1).uniform_(lo, hi, generator=generator))

        angle = np.deg2rad(u(-self.rotation_deg, self.rotation_deg))
        s = u(*self.scale)
        tx, ty = u(-self.translate, self.translate) * 2, u(-self.translate, self.translate) * 2
        cos, sin = np.cos(angle) / s, np.sin(angle) / s
        theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=img.dtype)[None]
        grid = F.affine_grid(theta, [1, *img.shape], align_corners=False)
        out = F.grid_sample(img[None], grid, mode="bilinear", padding_mode="border",
                            align_corners=False)[0]
        if self.gamma:
            out = out.clamp(0.0, 1.0) ** float(np.exp(u(-self.gamma, self.gamma)))
        c = 1.0 + u(-self.contrast, self.contrast)
        b = u(-self.brightness, self.brightness)
        mean = out.mean()
        out = (out - mean) * c + mean + b
        if self.noise:
            sd = u(0.0, self.noise)
            out = out + sd * torch.randn(out.shape, generator=generator, dtype=out.dtype)
        return out.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class Preprocess:
    """How raw images become model input. Saved in model.json as the model's input contract.

    Args:
        size: output side length in pixels (square).
        channels: 1 (grey) or 3 (grey repeated, for ImageNet-style backbones).
        mean, std: per-channel normalisation; defaults depend on ``channels``.
        augment: an :class:`Augment` for training, ``None`` for evaluation.
    """

    size: int = 64
    channels: int = 1
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    augment: Augment | None = None
    colour: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ConfigError(f"The 'channels' parameter of Preprocess must be 1 or 3. "
                              f"Got {self.channels!r} instead.")
        if not isinstance(self.size, int) or self.size < 8:
            raise ConfigError(f"The 'size' parameter of Preprocess must be an integer >= 8. "
                              f"Got {self.size!r} instead.")
        if not self.mean:
            object.__setattr__(self, "mean", (GREY_MEAN,) * self.channels if self.channels == 1
                               else IMAGENET_MEAN)
        if not self.std:
            object.__setattr__(self, "std", (GREY_STD,) * self.channels if self.channels == 1
                               else IMAGENET_STD)
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"Preprocess: mean/std need {self.channels} values each; got "
                              f"mean={self.mean}, std={self.std}.")

    def with_augment(self, augment: Augment | None = Augment()) -> "Preprocess":

        return replace(self, augment=augment)

    def to_tensor01(self, raw: np.ndarray) -> torch.Tensor:
        """Raw array -> float tensor ``[c, size, size]`` in [0, 1] (c = 1, or 3 if colour)."""
        arr = np.asarray(raw)
        if arr.dtype == np.uint8:
            t = torch.from_numpy(arr.astype(np.float32) / 255.0)
        elif arr.dtype in (np.uint16, np.uint32, np.int32):
            # deeper samples (uint16, Pillow's int32): their real bit depth is the smallest of
            # 8/10/12/14/16 bits that holds the maximum, as for a 16-bit PNG without sBIT (12-bit
            # data is not divided by 65535); file readers return float32 in [0, 1] already
            out = scale_samples(arr, 8 * arr.dtype.itemsize)[0]
            t = torch.from_numpy(out.astype(np.float32) / 255.0 if out.dtype == np.uint8 else out)
        else:
            t = torch.from_numpy(arr.astype(np.float32, copy=False))
        if t.ndim == 2:
            t = t[None]
        elif t.ndim == 3:
            t = t.permute(2, 0, 1)
            if not self.colour:
                t = t[:3].mean(0, keepdim=True) if t.shape[0] >= 3 else t[:1]
        if t.shape[-1] != self.size or t.shape[-2] != self.size:
            t = F.interpolate(t[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        return t.clamp(0.0, 1.0)

    def normalize(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[-3] == 1 and self.channels == 3:
            t = t.expand(*t.shape[:-3], 3, *t.shape[-2:])
        elif t.shape[-3] == 3 and self.channels == 1:
            t = t.mean(-3, keepdim=True)
        mean = torch.tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
        return (t - mean) / std

    def denormalize(self, t: torch.Tensor) -> torch.Tensor:
        """Model input -> grey image in [0, 1] (``[..., H, W]``) for display."""
        mean = torch.tensor(self.mean, dtype=t.dtype, device=t.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=t.dtype, device=t.device).view(-1, 1, 1)
        return (t * std + mean).mean(-3).clamp(0, 1)

    def __call__(self, raw: np.ndarray) -> torch.Tensor:
        t = self.to_tensor01(raw)
        if self.augment is not None:
            t = self.augment(t)
        return self.normalize(t).contiguous()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("augment")
        d.pop("extra")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        return cls(size=int(d["size"]), channels=int(d["channels"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]), colour=bool(d.get("colour", False)))
