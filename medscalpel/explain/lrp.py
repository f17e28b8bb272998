"""Layer-wise Relevance Propagation (zennit) for DenseNet, ResNet and VGG classifiers.

zennit computes LRP as a modified gradient: rules are backward hooks on Conv/Linear/pooling
modules, and the values flowing backward between hooked modules *are* relevances. medscalpel
adds the canonizers zennit lacks (:mod:`medscalpel.explain.canonizers`): DenseNet's BNs after
concatenations, an exact BN merge, out-of-place ReLUs; ResNet additions use zennit's ``Sum``
canonizers. All of it happens on a private deep copy of the model, so the caller's model keeps
its parameters, buffers, mode and hooks.

Relevance at the output is the explained logit itself (``R = f_t(x)`` on the target class,
0 elsewhere), so with conservative rules the input relevance sums to ``f_t(x)``. Biases (of the
classifier and of the convs that absorbed a BN) take a share of the relevance under the
standard rules; ``zero_bias=True`` excludes biases from the rules (zennit ``zero_params``) so
every layer conserves relevance and ``delta`` measures only numerical loss (stabilisers,
neurons with no positive contribution). ``docs/explain_attributions.md`` lists the deltas
measured per architecture.

Example:
    >>> import torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("densenet_tiny", num_classes=3, img_size=32)
    >>> res = lrp(m, torch.randn(2, 1, 32, 32), target=0, zero_bias=True)
    >>> res.attribution.shape, res.delta.shape
    (torch.Size([2, 1, 32, 32]), torch.Size([2]))
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from zennit import composites as zc
from zennit.rules import Epsilon, Pass
from zennit.types import Convolution

from medscalpel.errors import ModelError
from medscalpel.explain.attribution_base import (ATTRIBUTIONS, Attribution,
                                                 AttributionResult, check_inputs,
                                                 num_classes_of, prepare_model_copy,
                                                 resolve_targets)
from medscalpel.explain.canonizers import ChannelAffine, canonizers_for, unsupported_leaves
from medscalpel.explain.rule_session import RuleSession
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

COMPOSITES = ("epsilon_plus_flat", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1",
              "epsilon_alpha2_beta1_flat", "epsilon")
BN_RULES = ("pass", "epsilon")



def check_lrp_support(model: nn.Module, owner: str = "lrp") -> None:
    """Raise :class:`ModelError` when ``model`` has layers LRP has no rule for."""
    bad = unsupported_leaves(model)
    if bad:
        arch = getattr(model, "arch", type(model).__name__)
        shown = ", ".join(f"'{n}' ({t})" for n, t in bad[:4])
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise ModelError(
            f"{owner}: LRP does not support architecture '{arch}': no LRP rule for layer "
            f"{shown}{more}. Supported: densenet121/densenet_tiny, resnet18/resnet50/resnet_tiny, "
            "vgg19_bn/vgg_tiny and Sequential CNNs of Conv/BN/ReLU/pooling/Linear layers. Use "
            "method='ig' (Integrated Gradients works on any differentiable model).")


def build_composite(name: str = "epsilon_plus_flat", epsilon: float = 1e-6,
                    zero_bias: bool = False, bn_rule: str = "pass",
                    low: float | torch.Tensor | None = None,
                    high: float | torch.Tensor | None = None,
                    canonizers: list | None = None, stabilizer: float = 1e-6):
    """A zennit composite with medscalpel's rule for post-concatenation BNs.

    Args:
        name: one of :data:`COMPOSITES` (zennit's built-ins plus ``"epsilon"``: LRP-epsilon for
            every Conv/Linear).
        epsilon: the epsilon of the epsilon rule (Linear layers; every layer for ``"epsilon"``).
        zero_bias: exclude biases from the rules (relevance conserving).
        bn_rule: rule of :class:`ChannelAffine` (BN after a DenseNet concatenation): ``"pass"``
            (relevance of channel c passes to channel c) or ``"epsilon"`` (the BN shift absorbs
            its share ``b / (a x + b)``).
        low, high: input bounds of the ZBox rule (``"epsilon_gamma_box"`` only).
        canonizers: zennit canonizers to apply first (``None``: none).
        stabilizer: stabiliser of the other rules.
    """

    check_in(name, "composite", "lrp", COMPOSITES)
    check_in(bn_rule, "bn_rule", "lrp", BN_RULES)
    zero = ["bias"] if zero_bias else None
    affine_rule = Pass() if bn_rule == "pass" else Epsilon(epsilon=epsilon, zero_params=zero)
    layer_map = [(ChannelAffine, affine_rule)]
    canonizers = list(canonizers or [])
    if name == "epsilon":
        lm = layer_map + zc.layer_map_base(stabilizer) + [
            (Convolution, Epsilon(epsilon=epsilon, zero_params=zero)),
            (nn.Linear, Epsilon(epsilon=epsilon, zero_params=zero)),
        ]
        return zc.LayerMapComposite(layer_map=lm, canonizers=canonizers)
    if name == "epsilon_gamma_box":
        if low is None or high is None:
            raise ModelError("The 'epsilon_gamma_box' composite needs the input bounds 'low' and "
                             "'high' (normalised pixel range) for its ZBox first-layer rule.")
        return zc.EpsilonGammaBox(low=low, high=high, epsilon=epsilon, stabilizer=stabilizer,
                                  layer_map=layer_map, zero_params=zero, canonizers=canonizers)
    cls = {"epsilon_plus_flat": zc.EpsilonPlusFlat, "epsilon_plus": zc.EpsilonPlus,
           "epsilon_alpha2_beta1": zc.EpsilonAlpha2Beta1,
           "epsilon_alpha2_beta1_flat": zc.EpsilonAlpha2Beta1Flat}[name]
    return cls(epsilon=epsilon, stabilizer=stabilizer, layer_map=layer_map, zero_params=zero,
               canonizers=canonizers)


class LRPSession(RuleSession):
    """A canonized private copy of a model with an LRP composite registered.

    Used by :func:`lrp` and by :func:`medscalpel.explain.relevance.channel_relevance`. Always use
    it as a context manager: the composite (hooks, canonizers) is removed on exit.

    Args:
        model: the caller's model (only read).
        composite, epsilon, zero_bias, bn_rule, low, high: see :func:`build_composite`.
        canonize: apply medscalpel's canonizers (switching them off is for diagnosis only: BN is
            then passed through and ResNet additions duplicate relevance).
    """

    owner = "lrp"
    hint = ("its BatchNorm folding does not fit this model. Report the architecture, or use "
            "method='ig'.")

    def __init__(self, model: nn.Module, composite: str = "epsilon_plus_flat",
                 epsilon: float = 1e-6, zero_bias: bool = False, bn_rule: str = "pass",
                 low: float | torch.Tensor | None = None, high: float | torch.Tensor | None = None,
                 canonize: bool = True):
        super().__init__()
        check_range(epsilon, "epsilon", "lrp", 0.0)
        check_lrp_support(model)
        self.reference = prepare_model_copy(model)
        self.work = prepare_model_copy(model)
        self.settings = {"composite": composite, "epsilon": float(epsilon),
                         "zero_bias": bool(zero_bias), "bn_rule": bn_rule, "canonize": canonize,
                         "arch": getattr(model, "arch", type(model).__name__)}
        if low is not None:
            self.settings["low"] = float(low) if not isinstance(low, torch.Tensor) else "tensor"
            self.settings["high"] = float(high) if not isinstance(high, torch.Tensor) else "tensor"
        cans = canonizers_for(self.work) if canonize else []
        self.composite = build_composite(composite, epsilon=epsilon, zero_bias=zero_bias,
                                         bn_rule=bn_rule, low=low, high=high, canonizers=cans)


def relative_delta(total: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """``(sum R - f_t(x)) / max(|f_t(x)|, 1e-6)`` per image."""
    return (total - logit) / logit.abs().clamp_min(1e-6)


@ATTRIBUTIONS.register("lrp", help="Layer-wise Relevance Propagation (zennit + DenseNet canonizer)")
class LRP(Attribution):
    """LRP through zennit composites with medscalpel's canonizers.

    Args:
        model: densenet121/densenet_tiny, resnet18/50/resnet_tiny, vgg19_bn/vgg_tiny (or a
            Sequential CNN of Conv/BN/ReLU/pooling/Linear layers).
        composite: zennit composite name (:data:`COMPOSITES`).
        epsilon: epsilon of the epsilon rule.
        zero_bias: exclude biases from the rules (conserving; see module docstring).
        bn_rule: rule for BNs after DenseNet concatenations (``"pass"`` or ``"epsilon"``).
        low, high: ZBox input bounds for ``"epsilon_gamma_box"`` (default: the batch min / max).
        canonize: apply the canonizers (diagnosis only when False).
    """

    name = "lrp"

    def __init__(self, model: nn.Module, composite: str = "epsilon_plus_flat",
                 epsilon: float = 1e-6, zero_bias: bool = False, bn_rule: str = "pass",
                 low: float | torch.Tensor | None = None, high: float | torch.Tensor | None = None,
                 canonize: bool = True):
        super().__init__(model)
        check_in(composite, "composite", "lrp", COMPOSITES)
        check_in(bn_rule, "bn_rule", "lrp", BN_RULES)
        check_range(epsilon, "epsilon", "lrp", 0.0)
        check_lrp_support(model)
        self.kw = {"composite": composite, "epsilon": epsilon, "zero_bias": zero_bias,
                   "bn_rule": bn_rule, "low": low, "high": high, "canonize": canonize}

    def attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> AttributionResult:
        x, t = self._prepare(inputs, target)
        kw = dict(self.kw)
        if kw["composite"] == "epsilon_gamma_box" and (kw["low"] is None or kw["high"] is None):
            kw["low"] = float(x.min()) if kw["low"] is None else kw["low"]
            kw["high"] = float(x.max()) if kw["high"] is None else kw["high"]
        session = LRPSession(self.model, **kw)
        with session:
            rel, logit, _ = session.relevance(x, t)
        total = rel.flatten(1).sum(1)
        settings = dict(session.settings)
        settings["canonizer_max_abs_diff"] = session.max_canonizer_diff
        return AttributionResult(
            attribution=rel, delta=relative_delta(total, logit), method="lrp", target=t,
            output=logit, settings=settings,
            delta_definition="relative conservation error (sum(R_input) - f_t(x)) / |f_t(x)| "
                             "(|f_t(x)| floored at 1e-6); relevance starts as R = f_t(x)")


def lrp(model: nn.Module, inputs: torch.Tensor, target: int | torch.Tensor,
        composite: str = "epsilon_plus_flat", epsilon: float = 1e-6, zero_bias: bool = False,
        bn_rule: str = "pass", low: float | torch.Tensor | None = None,
        high: float | torch.Tensor | None = None, canonize: bool = True) -> AttributionResult:
    """LRP relevance of the ``target`` logit on the input pixels.

    Args:
        model: the classifier (left unchanged; LRP runs on a canonized deep copy).
        inputs: normalised images ``[N, C, H, W]``.
        target: class index (``int``) or ``LongTensor[N]``; never an argmax.
        composite: ``"epsilon_plus_flat"`` (default), ``"epsilon_plus"``,
            ``"epsilon_gamma_box"``, ``"epsilon_alpha2_beta1"``, ``"epsilon_alpha2_beta1_flat"``
            or ``"epsilon"``.
        epsilon: epsilon of the epsilon rule.
        zero_bias: exclude biases from all rules so relevance is conserved layer by layer.
        bn_rule: rule for BNs after DenseNet concatenations: ``"pass"`` or ``"epsilon"``.
        low, high: ZBox bounds for ``"epsilon_gamma_box"`` (default: min / max of ``inputs``).
        canonize: apply medscalpel's canonizers (turn off only to diagnose).

    Returns:
        :class:`AttributionResult`; ``delta = (sum R_input - f_t(x)) / |f_t(x)|`` per image and
        ``settings["canonizer_max_abs_diff"]`` = max |logit change| of the canonized copy.

    Raises:
        ModelError: the architecture has layers without an LRP rule (e.g. ViTs).
        VerificationError: the canonized copy does not reproduce the logits.
    """
    owner = "lrp"
    x = check_inputs(inputs, owner)
    resolve_targets(target, x.shape[0], num_classes_of(model, x), owner)
    return LRP(model, composite=composite, epsilon=epsilon, zero_bias=zero_bias, bn_rule=bn_rule,
               low=low, high=high, canonize=canonize).attribute(x, target)
