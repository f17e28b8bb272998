"""Canonizers: rewrite a model (temporarily, on a private copy) into a form LRP rules fit.

zennit ships canonizers for VGG and ResNet but none for DenseNet, and captum's LRP supports
neither concatenations nor BatchNorm. medscalpel's canonizers are zennit
:class:`~zennit.canonizers.Canonizer` objects, so they plug into any zennit composite:

* :class:`ExactMergeBatchNorm` folds an eval-mode BatchNorm into the Conv/Linear right before
  it and swaps the BN for ``nn.Identity`` (zennit's own merge leaves a BN computing
  ``x / sqrt(1 + eps)``, a 5e-6 relative error per layer that adds up over DenseNet121's depth).
* :class:`SequentialMergeBatchNormExact` finds those (Conv/Linear -> BN) pairs by module order,
  which is right for torchvision ResNet / VGG and the zoo's Sequential backbones.
* :class:`DenseNetCanonizer` handles torchvision DenseNets, where module order lies: every
  ``_DenseLayer.norm1``, ``_Transition.norm`` and ``features.norm5`` normalise a
  *concatenation* (the outputs of several earlier layers, each also read by other layers with
  other BNs), so they cannot be folded into any producer, and a ReLU separates them from their
  consumer conv. They become :class:`ChannelAffine` modules, the exact per-channel affine map
  ``y = a * x + b`` of the eval-mode BN, which the composite gives its own rule (``pass``: the
  relevance of channel c goes to channel c unchanged, or ``epsilon``: the bias ``b`` absorbs its
  share, ``R_x = a x / (a x + b) R_y``). The concatenation itself needs no rule: its gradient is
  the channel split, so relevance of each concatenated channel flows back to the layer that
  produced it, and relevance arriving from several consumers adds up, as LRP requires.
  ``conv0 -> norm0`` and ``_DenseLayer.conv1 -> norm2`` are true Conv -> BN pairs and are merged.
* ResNet additions use zennit's own ``ResNetBasicBlockCanonizer`` / ``ResNetBottleneckCanonizer``
  (the addition becomes a ``zennit.layer.Sum`` module that gets the proportional ``Norm`` rule),
  see :func:`canonizers_for`.
* :class:`OutOfPlaceActivations` makes in-place ReLUs out-of-place (zennit hooks and tensor
  hooks need the pre-activation tensors intact).

Every canonizer restores the module exactly on ``remove()``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchvision.models.densenet import _DenseBlock, _DenseLayer, _Transition
from torchvision.models.resnet import BasicBlock, Bottleneck
from zennit.canonizers import Canonizer
from zennit.core import collect_leaves
from zennit.layer import Sum
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

from medscalpel.errors import ModelError

logger = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ChannelAffine(nn.Module):
    """The per-channel affine map ``y[:, c] = weight[c] * x[:, c] + bias[c]`` of an eval-mode BN.

    Args:
        weight: ``[C]`` scale ``gamma / sqrt(running_var + eps)``.
        bias: ``[C]`` shift ``beta - running_mean * scale``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "ChannelAffine":
        if bn.running_mean is None or bn.running_var is None:
            raise ModelError("A BatchNorm without running statistics (track_running_stats=False) "
                             "cannot be written as a fixed affine map for LRP.")
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        return cls(scale.to(bn.running_var.dtype), shift.to(bn.running_var.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}"


def _parent_and_attr(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        parent_name, attr = name.rsplit(".", 1)
        return root.get_submodule(parent_name), attr
    return root, name


class _Swaps:
    """Replace submodules by name and put the originals back."""

    def __init__(self):
        self._undo: list[tuple[nn.Module, str, nn.Module]] = []

    def swap(self, root: nn.Module, name: str, new: nn.Module) -> None:
        parent, attr = _parent_and_attr(root, name)
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        self._undo.append((parent, attr, old))

    def undo(self) -> None:
        while self._undo:
            parent, attr, old = self._undo.pop()
            setattr(parent, attr, old)


class ExactMergeBatchNorm(Canonizer):
    """Fold eval-mode BNs into the Conv/Linear layer producing their input, exactly.

    Args:
        pairs: ``[(linear_name, bn_name), ...]`` qualified names inside the root module; ``None``
            lets subclasses find them in :meth:`find_pairs`.
    """

    def __init__(self, pairs: list[tuple[str, str]] | None = None):
        self.pairs = pairs
        self._swaps = _Swaps()
        self._params: list[tuple[nn.Module, nn.Parameter, nn.Parameter | None]] = []

    def copy(self) -> "ExactMergeBatchNorm":
        return type(self)(self.pairs)

    def find_pairs(self, root: nn.Module) -> list[tuple[str, str]]:
        return list(self.pairs or [])

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        pairs = self.find_pairs(root_module)
        if not pairs:
            return []
        inst = self.copy()
        inst.register(root_module, pairs)
        return [inst]

    def register(self, root: nn.Module, pairs: list[tuple[str, str]]) -> None:  # type: ignore[override]
        for lin_name, bn_name in pairs:
            lin = root.get_submodule(lin_name)
            bn = root.get_submodule(bn_name)
            if not isinstance(lin, _LINEAR) or not isinstance(bn, _BN):
                raise ModelError(f"Cannot merge '{bn_name}' ({type(bn).__name__}) into "
                                 f"'{lin_name}' ({type(lin).__name__}): need Conv/Linear -> BN.")
            if bn.training:
                raise ModelError(f"BatchNorm '{bn_name}' is in training mode; LRP needs eval-mode "
                                 "statistics (call model.eval()).")
            aff = ChannelAffine.from_batchnorm(bn)
            self._params.append((lin, lin.weight, lin.bias))
            w, b = lin.weight.data, (None if lin.bias is None else lin.bias.data)
            scale, shift = aff.weight.data.double(), aff.bias.data.double()
            view = (-1,) + (1,) * (w.ndim - 1)
            new_w = (w.double() * scale.view(view)).to(w.dtype)
            old_b = torch.zeros_like(scale) if b is None else b.double()
            new_b = (old_b * scale + shift).to(w.dtype)
            lin.weight = nn.Parameter(new_w, requires_grad=False)
            lin.bias = nn.Parameter(new_b, requires_grad=False)
            self._swaps.swap(root, bn_name, nn.Identity())

    def remove(self) -> None:
        self._swaps.undo()
        while self._params:
            lin, w, b = self._params.pop()
            lin.weight = w
            lin.bias = b


class SequentialMergeBatchNormExact(ExactMergeBatchNorm):
    """:class:`ExactMergeBatchNorm` on every BN whose preceding leaf module (in registration
    order) is a Conv/Linear of matching width, as zennit's ``SequentialMergeBatchNorm`` finds
    them. Right for torchvision ResNet / VGG; wrong for DenseNet (use
    :class:`DenseNetCanonizer`)."""

    def find_pairs(self, root: nn.Module) -> list[tuple[str, str]]:
        names = {id(m): n for n, m in root.named_modules()}
        pairs = []
        last = None
        for leaf in collect_leaves(root):
            if (isinstance(last, _LINEAR) and isinstance(leaf, _BN)
                    and (last.out_features if isinstance(last, nn.Linear) else last.out_channels)
                    == leaf.num_features):
                pairs.append((names[id(last)], names[id(leaf)]))
            last = leaf
        return pairs


class OutOfPlaceActivations(Canonizer):
    """Set ``inplace=False`` on every activation module that has the flag."""

    def __init__(self):
        self._changed: list[nn.Module] = []

    def copy(self) -> "OutOfPlaceActivations":
        return OutOfPlaceActivations()

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        inst = self.copy()
        inst.register(root_module)
        return [inst]

    def register(self, root: nn.Module) -> None:  # type: ignore[override]
        for m in root.modules():
            if getattr(m, "inplace", False) is True:
                m.inplace = False
                self._changed.append(m)

    def remove(self) -> None:
        for m in self._changed:
            m.inplace = True
        self._changed.clear()


def _densenet_types():

    return _DenseBlock, _DenseLayer, _Transition


def is_densenet(model: nn.Module) -> bool:
    _, layer_t, _ = _densenet_types()
    return any(isinstance(m, layer_t) for m in model.modules())


def is_resnet(model: nn.Module) -> bool:

    return any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules())


class DenseNetCanonizer(Canonizer):
    """Canonizer for torchvision DenseNets (``densenet121``, ``densenet_tiny`` of the zoo).

    * ``features.conv0 -> features.norm0`` and each ``_DenseLayer.conv1 -> norm2`` are merged
      exactly (:class:`ExactMergeBatchNorm`).
    * BNs that normalise a concatenation (``_DenseLayer.norm1``, ``_Transition.norm``, the final
      ``norm5``: any BN whose input is not the output of a single Conv) become
      :class:`ChannelAffine` modules; the LRP composite gives them their own rule.
    * ``memory_efficient`` (gradient checkpointing) is switched off, since checkpointing re-runs
      forward passes inside backward, which would fire LRP hooks twice.
    """

    def __init__(self):
        self._merge: ExactMergeBatchNorm | None = None
        self._swaps = _Swaps()
        self._mem: list[tuple[nn.Module, bool]] = []

    def copy(self) -> "DenseNetCanonizer":
        return DenseNetCanonizer()

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        if not is_densenet(root_module):
            return []
        inst = self.copy()
        inst.register(root_module)
        return [inst]

    @staticmethod
    def plan(root: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
        """``(merge_pairs, affine_bn_names)`` for a DenseNet: what the canonizer will do."""
        _, layer_t, trans_t = _densenet_types()
        merge: list[tuple[str, str]] = []
        affine: list[str] = []
        handled: set[str] = set()
        for name, mod in root.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(mod, layer_t):
                merge.append((prefix + "conv1", prefix + "norm2"))
                affine.append(prefix + "norm1")
                handled.update({prefix + "norm1", prefix + "norm2"})
            elif isinstance(mod, trans_t):
                affine.append(prefix + "norm")
                handled.add(prefix + "norm")
            elif isinstance(mod, nn.Sequential):
                # the stem (conv0 -> norm0) and the final norm5 live in DenseNet.features
                children = list(mod.named_children())
                for i, (cname, child) in enumerate(children):
                    if not isinstance(child, _BN) or prefix + cname in handled:
                        continue
                    prev = children[i - 1][1] if i > 0 else None
                    if isinstance(prev, nn.Conv2d) and prev.out_channels == child.num_features:
                        merge.append((prefix + children[i - 1][0], prefix + cname))
                    else:  # after a dense block (a concatenation) or anything else: affine
                        affine.append(prefix + cname)
                    handled.add(prefix + cname)
        return merge, affine

    def register(self, root: nn.Module) -> None:  # type: ignore[override]
        merge, affine = self.plan(root)
        for m in root.modules():
            if hasattr(m, "memory_efficient"):
                self._mem.append((m, m.memory_efficient))
                m.memory_efficient = False
        for name in affine:
            bn = root.get_submodule(name)
            if bn.training:
                raise ModelError(f"BatchNorm '{name}' is in training mode; LRP needs eval-mode "
                                 "statistics (call model.eval()).")
            self._swaps.swap(root, name, ChannelAffine.from_batchnorm(bn))
        self._merge = ExactMergeBatchNorm(merge)
        self._merge.register(root, merge)

    def remove(self) -> None:
        if self._merge is not None:
            self._merge.remove()
            self._merge = None
        self._swaps.undo()
        for m, flag in self._mem:
            m.memory_efficient = flag
        self._mem.clear()


class ResidualBlockCanonizer(Canonizer):
    """zennit's BasicBlock / Bottleneck canonizers (residual addition as a ``Sum`` module)."""

    def __init__(self):
        self._parts = [ResNetBasicBlockCanonizer(), ResNetBottleneckCanonizer()]

    def copy(self) -> "ResidualBlockCanonizer":
        return ResidualBlockCanonizer()

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        out: list[Canonizer] = []
        for part in self._parts:
            out += part.apply(root_module)
        return out

    def register(self) -> None:  # the applied zennit instances do the work
        return None

    def remove(self) -> None:
        return None


def canonizers_for(model: nn.Module) -> list[Canonizer]:
    """The canonizers medscalpel applies to ``model`` before LRP, by structure.

    DenseNet (torchvision ``_DenseLayer`` inside): out-of-place activations + DenseNet canonizer.
    ResNet (torchvision ``BasicBlock`` / ``Bottleneck``): out-of-place activations + exact
    sequential BN merge + zennit's residual ``Sum`` canonizers. Anything else (VGG, plain
    Sequential CNNs): out-of-place activations + exact sequential BN merge.
    """
    cans: list[Canonizer] = [OutOfPlaceActivations()]
    if is_densenet(model):
        cans.append(DenseNetCanonizer())
        return cans
    cans.append(SequentialMergeBatchNormExact())
    if is_resnet(model):
        cans.append(ResidualBlockCanonizer())
    return cans


# leaf module types LRP knows how to handle (with the canonizers above)
def supported_leaf_types() -> tuple[type, ...]:

    return (nn.Conv1d, nn.Conv2d, nn.Linear, *_BN, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d,
            nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout, nn.Identity,
            ChannelAffine, Sum)


def unsupported_leaves(model: nn.Module) -> list[tuple[str, str]]:
    """``[(name, type)]`` of leaf modules LRP has no rule for (empty when supported)."""
    ok = supported_leaf_types()
    names = {id(m): n for n, m in model.named_modules()}
    bad = []
    for leaf in collect_leaves(model):
        if leaf is model and not isinstance(leaf, ok):
            bad.append(("<root>", type(leaf).__name__))
        elif not isinstance(leaf, ok):
            bad.append((names.get(id(leaf), "?"), type(leaf).__name__))
    return bad

