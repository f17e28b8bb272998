"""The base of every pixel attribution: the registry :data:`ATTRIBUTIONS`, the result type
:class:`AttributionResult`, the base class :class:`Attribution` and the input / target checks
every method shares. Integrated Gradients (:mod:`.attributions`), LRP (:mod:`.lrp`) and
Backtrace (:mod:`.backtrace`) build on this module, so none of them imports another."""

from __future__ import annotations

import copy
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.registry import Registry
from medscalpel.runs import atomic_path

logger = logging.getLogger(__name__)

SCHEMA = 1

ATTRIBUTIONS: Registry["Attribution"] = Registry("attribution method")


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True)
class AttributionResult:
    """Pixel attributions of one class logit per image.

    Attributes:
        attribution: ``[N, C, H, W]`` relevance of each input element (same shape as inputs).
        delta: ``[N]`` completeness / convergence delta per image (see ``delta_definition``).
        method: registry name of the method (``"ig"``, ``"lrp"``, ...).
        target: ``LongTensor[N]``: the class explained for each image.
        output: ``[N]`` the explained logit ``f_target(x)`` of each image.
        settings: the method's settings (steps, composite, baseline, ...), JSON-able.
        delta_definition: how ``delta`` was computed, in words.
    """

    attribution: torch.Tensor
    delta: torch.Tensor
    method: str
    target: torch.Tensor
    output: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    delta_definition: str = ""

    def total(self) -> torch.Tensor:
        """Sum of the attribution of each image ``[N]``."""
        return self.attribution.flatten(1).sum(1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the maps themselves are written by :meth:`save`)."""
        return {
            "schema": SCHEMA,
            "method": self.method,
            "shape": list(self.attribution.shape),
            "target": [int(t) for t in self.target],
            "output": [float(v) for v in self.output],
            "total": [float(v) for v in self.total()],
            "delta": [float(v) for v in self.delta],
            "max_abs_delta": float(self.delta.abs().max()) if self.delta.numel() else 0.0,
            "delta_definition": self.delta_definition,
            "settings": self.settings,
        }

    def save(self, path: str | Path) -> Path:
        """Write the maps (safetensors) and :meth:`to_dict` (``.json`` beside it)."""

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        tensors = {"attribution": self.attribution.detach().float().contiguous(),
                   "delta": self.delta.detach().float().contiguous(),
                   "target": self.target.detach().long().contiguous(),
                   "output": self.output.detach().float().contiguous()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        meta = path.with_suffix(".json")
        with atomic_path(meta) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AttributionResult":
        """Read a result written by :meth:`save`."""

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise DataError(f"AttributionResult.load: {path} or {meta_path} does not exist; write "
                            "both with AttributionResult.save().")
        t = load_file(str(path))
        meta = json.loads(meta_path.read_text())
        return cls(attribution=t["attribution"], delta=t["delta"], method=meta["method"],
                   target=t["target"], output=t["output"], settings=meta.get("settings", {}),
                   delta_definition=meta.get("delta_definition", ""))


# ----------------------------------------------------------------------------- helpers
def prepare_model_copy(model: nn.Module) -> nn.Module:
    """A private copy of ``model`` ready for attribution: eval mode, no in-place ReLUs,
    no gradient checkpointing (torchvision DenseNet ``memory_efficient``).

    The caller's model is only read. Hooks the caller registered are dropped from the copy.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"Attribution needs a torch.nn.Module; got {type(model).__name__}.")
    # deepcopy without the caller's hooks (they may hold references to unpicklable objects)
    saved = {}
    for name, mod in model.named_modules():
        hooks = (mod._forward_hooks, mod._forward_pre_hooks, mod._backward_hooks,
                 getattr(mod, "_backward_pre_hooks", None))
        if any(h for h in hooks if h):
            saved[name] = hooks
    clone = copy.deepcopy(model)
    for name in saved:
        mod = clone.get_submodule(name) if name else clone
        mod._forward_hooks.clear()
        mod._forward_pre_hooks.clear()
        mod._backward_hooks.clear()
        if getattr(mod, "_backward_pre_hooks", None) is not None:
            mod._backward_pre_hooks.clear()
    clone.eval()
    for mod in clone.modules():
        if isinstance(mod, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Hardswish)):
            if getattr(mod, "inplace", False):
                mod.inplace = False
        if hasattr(mod, "memory_efficient"):
            mod.memory_efficient = False
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def check_inputs(inputs: Any, owner: str) -> torch.Tensor:
    """Validate a ``[N, C, H, W]`` float batch."""
    if not isinstance(inputs, torch.Tensor):
        raise DataError(f"The 'inputs' parameter of {owner} must be a torch.Tensor [N, C, H, W]. "
                        f"Got {type(inputs).__name__} instead.")
    if inputs.ndim != 4 or inputs.shape[0] == 0:
        raise DataError(f"The 'inputs' parameter of {owner} must have shape [N, C, H, W] with "
                        f"N >= 1. Got shape {tuple(inputs.shape)} instead.")
    if not torch.is_floating_point(inputs):
        raise DataError(f"The 'inputs' parameter of {owner} must be a float tensor (normalised "
                        f"images). Got dtype {inputs.dtype} instead.")
    if not torch.isfinite(inputs).all():
        raise DataError(f"The 'inputs' parameter of {owner} contains NaN or inf values.")
    return inputs.detach()


def num_classes_of(model: nn.Module, inputs: torch.Tensor | None = None) -> int:
    """Number of output logits (``model.num_classes`` for a MedClassifier)."""
    k = getattr(model, "num_classes", None)
    if isinstance(k, int):
        return k
    if inputs is None:
        raise ModelError("Cannot tell the number of classes of this model; give a MedClassifier.")
    with torch.no_grad():  # on a private eval copy: a train-mode BN must not update its stats
        return int(prepare_model_copy(model)(inputs[:1]).shape[1])


def resolve_targets(target: Any, n: int, num_classes: int, owner: str) -> torch.Tensor:
    """Turn ``int | LongTensor[N] | sequence`` into a validated ``LongTensor[N]``.

    There is no default: a multi-label head is explained one given class at a time.
    """
    if target is None:
        raise ConfigError(f"The 'target' parameter of {owner} must be a class index (int) or a "
                          "LongTensor[N] of class indices; multi-label heads are explained one "
                          "class at a time and medscalpel never picks the argmax. Got None instead.")
    if isinstance(target, bool):
        raise ConfigError(f"The 'target' parameter of {owner} must be an int class index. Got "
                          f"{target!r} instead.")
    if isinstance(target, int):
        t = torch.full((n,), int(target), dtype=torch.long)
    else:
        t = torch.as_tensor(target)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ConfigError(f"The 'target' parameter of {owner} must hold integer class indices. "
                              f"Got dtype {t.dtype} instead.")
        t = t.long().flatten()
        if t.numel() == 1:
            t = t.expand(n).clone()
        if t.numel() != n:
            raise ConfigError(f"The 'target' parameter of {owner} must have one class per image "
                              f"({n}). Got {t.numel()} instead.")
    if (t < 0).any() or (t >= num_classes).any():
        bad = int(t[(t < 0) | (t >= num_classes)][0])
        raise ConfigError(f"The 'target' parameter of {owner} must be in the range [0, "
                          f"{num_classes - 1}] (the model has {num_classes} classes). Got {bad} "
                          "instead.")
    return t


def target_logits(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    return out.gather(1, target.view(-1, 1)).squeeze(1)


# ----------------------------------------------------------------------------- base class
class Attribution(ABC):
    """Base class of pixel-attribution methods.

    Subclasses set ``name`` and implement :meth:`attribute`; the base validates inputs and
    targets (:meth:`_prepare`). Instances never modify the model they were given.

    Args:
        model: the classifier (usually a :class:`~medscalpel.models.classifier.MedClassifier`).
    """

    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise ModelError(f"{type(self).__name__} needs a torch.nn.Module; got "
                             f"{type(model).__name__}.")
        self.model = model

    @abstractmethod
    def attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> AttributionResult:
        """Attribute the ``target`` logit of every image to its input pixels.

        Args:
            inputs: normalised images ``[N, C, H, W]``.
            target: class index for all images (``int``) or one per image (``LongTensor[N]``).
        """

    def __call__(self, inputs: torch.Tensor, target: int | torch.Tensor) -> AttributionResult:
        return self.attribute(inputs, target)

    def _prepare(self, inputs: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
        owner = f"{type(self).__name__}.attribute"
        x = check_inputs(inputs, owner)
        k = num_classes_of(self.model, x)
        return x, resolve_targets(target, x.shape[0], k, owner)


# ----------------------------------------------------------------------------- Integrated Gradients
