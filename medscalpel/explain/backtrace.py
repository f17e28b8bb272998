"""DL-Backtrace (Sankarapu et al. 2024, AryaXAI), implemented natively in torch.

DL-Backtrace distributes the explained output backwards, layer by layer, from each unit to its
inputs, in proportion to the *magnitude* of what each input contributed in the forward pass.
The ``dl-backtrace`` package cannot be installed beside medscalpel (it pins torch 2.6 and
TensorFlow), so this module implements the published default-mode rules itself, from the
DLBacktrace paper (arXiv 2411.12643) and the rules described in its public repository, on top
of zennit's backward-hook machinery (the same as :mod:`medscalpel.explain.lrp`).

Rules (default mode; ``R_j`` is the relevance at the output of unit ``j``)
-------------------------------------------------------------------------
* **Linear units** (Conv, Linear, and with ``bn_rule="fold"`` the BN folded into them or the
  per-channel affine map of a DenseNet BN): unit ``j`` computes ``t_j = sum_i z_ij + b_j`` with
  contributions ``z_ij = w_ij x_i``. Split the contributions by sign: ``P_j = sum of the
  positive z_ij``, ``N_j = |sum of the negative z_ij|``, and the bias into ``B+ = max(b_j, 0)``,
  ``B- = max(-b_j, 0)``. The positive inputs share ``R_j (P_j + B+)/D_j * P_j/(P_j + B+)`` in
  proportion to their contribution, the negative inputs share ``R_j (N_j + B-)/D_j * N_j/(N_j +
  B-)`` in proportion to theirs, with ``D_j = P_j + N_j + B+ + B-``. Both sides receive relevance
  of the *same sign* as ``R_j``, so the rule collapses to

      ``R_i<-j = |w_ij x_i| / (sum_k |w_kj x_k| + |b_j|) * R_j``

  which is what is computed here, vectorised: ``D = |W| * |x| + |b|`` (a forward pass of the
  layer with absolute weights on the absolute input) and ``R_x = |x| * |W|^T (R / D)`` (its
  gradient); ``R / D`` is 0 where ``D = 0``.
* **Bias**: the bias's share ``|b_j| / D_j`` of ``R_j`` is *absorbed* (goes to no input), as in
  the paper. ``zero_bias=True`` leaves biases out of ``D`` so every layer conserves relevance.
* **Activations** (ReLU): the unit's activation is part of the unit; relevance at its output is
  relevance at its pre-activation (``Pass``). The published rule gates the split by the
  activation's range: below the lower bound (a ReLU that is off) only the negative contributions
  would receive relevance, above an upper (saturation) bound only the positive ones. For ReLU
  networks that gate never has anything to route: a unit whose ReLU is off outputs exactly 0,
  and every consumer rule hands an input of value 0 exactly zero relevance (``|w * 0| = 0``),
  so **zero activations receive zero relevance**. Saturating activations (sigmoid, tanh, SiLU,
  GELU ...) are not supported (:class:`~medscalpel.errors.ModelError`); none of the zoo CNNs
  uses them.
* **Residual additions** (torchvision BasicBlock / Bottleneck, via zennit's ``Sum``
  canonizer) and **average pooling** (``AvgPool2d``, ``AdaptiveAvgPool2d``) are linear units
  without bias and with unit weights: ``R_i = |x_i| / sum_k |x_k| * R``.
* **Concatenation** (DenseNet): relevance of each concatenated channel goes back to the layer
  that produced it (the split); relevance arriving from several consumers adds up.
* **Max pooling**: the window's relevance goes to its maximum (the input torch routes the
  gradient to; DL-Backtrace splits exact ties equally, which changes only maps, never channel
  sums, and only where a window holds equal non-zero maxima).
* **BatchNorm**: ``bn_rule="pass"`` (default) makes BN transparent (relevance of channel ``c``
  passes unchanged), as the DLBacktrace PyTorch engine treats it; ``bn_rule="fold"`` folds
  each Conv -> BN pair exactly and turns BNs after a DenseNet concatenation into per-channel
  affine units (:mod:`medscalpel.explain.canonizers`), so the BN shift acts as a bias that takes
  its share.

Start and what is conserved
---------------------------
Relevance starts as the explained logit, ``R = f_t(x)`` on the target class and 0 elsewhere
(the DLBacktrace library starts from the largest output, times a ``multiplier``; the rules are
linear in ``R`` so that only rescales; medscalpel never picks an argmax). Every rule hands out
non-negative fractions of ``R_j``, so every relevance has the sign of ``f_t(x)``. Per unit,
``sum_i R_i<-j = R_j (1 - |b_j| / D_j)``: relevance is conserved layer to layer up to what the
biases absorb (exactly conserved with ``zero_bias=True``). ``delta`` is the relative
conservation error ``(sum R_input - f_t(x)) / |f_t(x)|``: minus the fraction of ``f_t(x)`` the
biases absorbed, times the sign of ``f_t(x)`` (0 with ``zero_bias=True``, up to rounding).

Difference from LRP
-------------------
LRP's epsilon / z+ / alpha-beta rules (:mod:`medscalpel.explain.lrp`, zennit composites) weigh
contributions by their *sign*: epsilon gives negative contributions negative relevance (they
argue against the class), z+ ignores them, alpha-beta weighs the two sides ``alpha`` and
``-beta``. DL-Backtrace credits every input with the *magnitude* of its contribution, same
sign as the unit's relevance, so an input that pushed a unit down is as relevant as one that
pushed it up: relevance measures how much of the unit's activity each input accounts for, not
whether it argued for or against the class. It has no stabiliser epsilon and no per-layer
choice of rule; biases take their share like in LRP-epsilon, but in proportion to ``|b|``.
DL-Backtrace's contrastive mode (separate positive / negative relevance streams) is not
implemented.

Example:
    >>> import torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("resnet_tiny", num_classes=3, img_size=32)
    >>> res = backtrace(m, torch.randn(2, 1, 32, 32), target=0, zero_bias=True)
    >>> res.attribution.shape, bool(res.delta.abs().max() < 1e-4)
    (torch.Size([2, 1, 32, 32]), True)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from zennit.composites import LayerMapComposite
from zennit.core import BasicHook, ParamMod
from zennit.layer import Sum
from zennit.rules import NoMod, Pass
from zennit.types import Activation, AvgPool, BatchNorm, Convolution

from medscalpel.errors import ModelError
from medscalpel.explain.attribution_base import (ATTRIBUTIONS, Attribution,
                                                 AttributionResult, check_inputs,
                                                 num_classes_of, prepare_model_copy,
                                                 resolve_targets)
from medscalpel.explain.canonizers import (ChannelAffine, OutOfPlaceActivations,
                                           ResidualBlockCanonizer, canonizers_for, is_resnet,
                                           unsupported_leaves)
from medscalpel.explain.rule_session import RuleSession
from medscalpel.validation import check_in

logger = logging.getLogger(__name__)

BN_RULES = ("pass", "fold")


_SUPPORTED = ("densenet121/densenet_tiny, resnet18/resnet50/resnet_tiny, vgg19_bn/vgg_tiny and "
              "Sequential CNNs of Conv/BN/ReLU/pooling/Linear layers")


def _abs_param(param: torch.Tensor, _name: str) -> torch.Tensor:
    return param.abs()


def _share(out_grad: torch.Tensor, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``R / D`` with ``D = sum |z| + |b| >= 0``; 0 where ``D = 0`` (nothing to distribute)."""
    denom = outputs[0]
    pos = denom > 0
    return [torch.where(pos, out_grad / torch.where(pos, denom, torch.ones_like(denom)),
                        torch.zeros_like(out_grad))]


def _times_abs_input(inputs: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    return inputs[0] * gradients[0]


class BacktraceRule(BasicHook):
    """DL-Backtrace's default rule for a linear unit: ``R_i = |w_ij x_i| / D_j * R_j``.

    Args:
        zero_bias: leave the bias out of ``D_j`` (then the layer conserves relevance).
        params: the module has ``weight`` / ``bias`` (Conv, Linear, :class:`ChannelAffine`);
            ``False`` for parameter-free linear maps (average pooling, zennit ``Sum``).
    """

    def __init__(self, zero_bias: bool = False, params: bool = True):
        self.zero_bias = zero_bias
        self.params = params
        if params:
            pmod = ParamMod(_abs_param, zero_params=["bias"] if zero_bias else None,
                            require_params=False)
        else:
            pmod = NoMod(param_keys=[])
        super().__init__(input_modifiers=[torch.abs], param_modifiers=[pmod],
                         output_modifiers=[lambda out: out], gradient_mapper=_share,
                         reducer=_times_abs_input)

    def copy(self) -> "BacktraceRule":
        return BacktraceRule(self.zero_bias, self.params)


def check_backtrace_support(model: nn.Module, owner: str = "backtrace") -> None:
    """Raise :class:`ModelError` when ``model`` has layers DL-Backtrace has no rule for here."""
    bad = unsupported_leaves(model)
    if bad:
        arch = getattr(model, "arch", type(model).__name__)
        shown = ", ".join(f"'{n}' ({t})" for n, t in bad[:4])
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise ModelError(
            f"{owner}: DL-Backtrace does not support architecture '{arch}': no rule for layer "
            f"{shown}{more}. Supported: {_SUPPORTED}. Use method='ig' (Integrated Gradients "
            "works on any differentiable model).")


def build_composite(model: nn.Module, zero_bias: bool = False,
                    bn_rule: str = "pass") -> LayerMapComposite:
    """The zennit composite of DL-Backtrace's rules for ``model`` (canonizers included).

    Args:
        model: the (private) model the composite will be registered on; its structure picks
            the canonizers.
        zero_bias: biases take no share (every layer conserves relevance).
        bn_rule: ``"pass"`` (BN transparent) or ``"fold"`` (BN folded / a biased affine unit).
    """
    check_in(bn_rule, "bn_rule", "backtrace", BN_RULES)
    unit = BacktraceRule(zero_bias=zero_bias)
    free = BacktraceRule(params=False)
    layer_map: list[tuple[type, Any]] = [
        (Activation, Pass()),
        (Sum, free),
        (AvgPool, free),
        (Convolution, unit),
        (nn.Linear, unit),
        (ChannelAffine, Pass() if zero_bias else BacktraceRule(zero_bias=False)),
        (BatchNorm, Pass()),
    ]
    if bn_rule == "fold":
        canonizers = canonizers_for(model)
    else:
        canonizers = [OutOfPlaceActivations()]
        if is_resnet(model):
            canonizers.append(ResidualBlockCanonizer())
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


class BacktraceSession(RuleSession):
    """A private copy of a model with the DL-Backtrace composite registered.

    Used by :class:`Backtrace` and by :func:`medscalpel.explain.relevance.channel_relevance`.
    Use it as a context manager: hooks and canonizers are removed on exit.

    Args:
        model: the caller's model (only read).
        zero_bias: biases take no share of relevance (conserving).
        bn_rule: ``"pass"`` or ``"fold"`` (see the module docstring).
    """

    owner = "backtrace"
    hint = "use bn_rule='pass' or method='ig', and report the architecture."

    def __init__(self, model: nn.Module, zero_bias: bool = False, bn_rule: str = "pass"):
        super().__init__()
        check_in(bn_rule, "bn_rule", "backtrace", BN_RULES)
        check_backtrace_support(model)
        self.reference = prepare_model_copy(model)
        self.work = prepare_model_copy(model)
        self.settings = {"zero_bias": bool(zero_bias), "bn_rule": bn_rule,
                         "start": "target logit", "mode": "default",
                         "arch": getattr(model, "arch", type(model).__name__)}
        self.composite = build_composite(self.work, zero_bias=zero_bias, bn_rule=bn_rule)


@ATTRIBUTIONS.register("backtrace", help="DL-Backtrace (native torch): relevance split over "
                                         "inputs by |contribution|")
class Backtrace(Attribution):
    """DL-Backtrace attribution (default mode), see the module docstring for the rules.

    Args:
        model: densenet121/densenet_tiny, resnet18/50/resnet_tiny, vgg19_bn/vgg_tiny (or a
            Sequential CNN of Conv/BN/ReLU/pooling/Linear layers).
        zero_bias: biases take no share of relevance (every layer conserves it, ``delta ~ 0``).
        bn_rule: ``"pass"`` (BN transparent, default) or ``"fold"`` (BN shift acts as a bias).
    """

    name = "backtrace"

    def __init__(self, model: nn.Module, zero_bias: bool = False, bn_rule: str = "pass"):
        super().__init__(model)
        check_in(bn_rule, "bn_rule", "backtrace", BN_RULES)
        check_backtrace_support(model)
        self.zero_bias = bool(zero_bias)
        self.bn_rule = bn_rule

    def attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> AttributionResult:
        x, t = self._prepare(inputs, target)
        session = BacktraceSession(self.model, zero_bias=self.zero_bias, bn_rule=self.bn_rule)
        with session:
            rel, logit, _ = session.relevance(x, t)
        total = rel.flatten(1).sum(1)
        settings = dict(session.settings)
        settings["canonizer_max_abs_diff"] = session.max_canonizer_diff
        return AttributionResult(
            attribution=rel, delta=(total - logit) / logit.abs().clamp_min(1e-6),
            method="backtrace", target=t, output=logit, settings=settings,
            delta_definition="relative conservation error (sum(R_input) - f_t(x)) / |f_t(x)| "
                             "(|f_t(x)| floored at 1e-6); relevance starts as R = f_t(x); "
                             "= -sign(f_t(x)) x the fraction the biases absorbed")


def backtrace(model: nn.Module, inputs: torch.Tensor, target: int | torch.Tensor,
              zero_bias: bool = False, bn_rule: str = "pass") -> AttributionResult:
    """DL-Backtrace relevance of the ``target`` logit on the input pixels.

    Args:
        model: the classifier (left unchanged; the rules run on a private deep copy).
        inputs: normalised images ``[N, C, H, W]``.
        target: class index (``int``) or ``LongTensor[N]``; never an argmax.
        zero_bias: biases take no share, so relevance is conserved layer by layer.
        bn_rule: ``"pass"`` (BatchNorm transparent) or ``"fold"`` (folded; its shift is a bias).

    Returns:
        :class:`AttributionResult`; ``delta = (sum R_input - f_t(x)) / |f_t(x)|`` per image.

    Raises:
        ModelError: the architecture has layers without a rule (e.g. ViTs, SiLU).
    """
    owner = "backtrace"
    x = check_inputs(inputs, owner)
    resolve_targets(target, x.shape[0], num_classes_of(model, x), owner)
    return Backtrace(model, zero_bias=zero_bias, bn_rule=bn_rule).attribute(x, target)
