"""Pixel attributions: the attribution registry, its base class and Integrated Gradients.

Every method answers one question: how much did each input pixel contribute to the logit of
*one* class? Multi-label heads are explained one class at a time: ``target`` is always a class
index given by the caller (an ``int`` for every image or a ``LongTensor[N]``), never an argmax.

Methods register in :data:`ATTRIBUTIONS` (``"ig"``, ``"lrp"``, ``"backtrace"``) and share the
small base class :class:`Attribution` whose one required method is
:meth:`Attribution.attribute`. Each returns an :class:`AttributionResult` that carries its own
self-check, the completeness (convergence) delta per image.

The caller's model is never changed: every method works on a private ``copy.deepcopy`` in eval
mode with in-place ReLUs made out-of-place, so the caller's parameters, buffers, train/eval mode
and hooks stay exactly as they were.

Example:
    >>> import torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("vgg_tiny", num_classes=3, img_size=32)
    >>> res = integrated_gradients(m, torch.randn(2, 1, 32, 32), target=1, n_steps=16)
    >>> res.attribution.shape, res.delta.shape
    (torch.Size([2, 1, 32, 32]), torch.Size([2]))
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from captum.attr import IntegratedGradients as CaptumIG
from torch import nn

from medscalpel.errors import ConfigError, DataError
# the base, re-exported here where the methods have always been imported from
from medscalpel.explain.attribution_base import (ATTRIBUTIONS, Attribution, AttributionResult,
                                                 prepare_model_copy, target_logits)
from medscalpel.validation import check_in, check_range

# the other registered methods: importing this module registers all three (they import only
# attribution_base, so there is no import cycle)
from medscalpel.explain import backtrace as _backtrace  # noqa: F401  (registers "backtrace")
from medscalpel.explain import lrp as _lrp  # noqa: F401  (registers "lrp")

logger = logging.getLogger(__name__)


def _baseline_tensor(baseline: Any, inputs: torch.Tensor, owner: str) -> torch.Tensor:
    if baseline is None:
        return torch.zeros_like(inputs)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(inputs, float(baseline))
    if isinstance(baseline, torch.Tensor):
        b = baseline.detach().to(inputs.dtype)
        try:
            return b.expand_as(inputs).clone()
        except RuntimeError as exc:
            raise DataError(f"The 'baseline' parameter of {owner} must broadcast to the inputs "
                            f"{tuple(inputs.shape)}. Got shape {tuple(b.shape)} instead.") from exc
    raise ConfigError(f"The 'baseline' parameter of {owner} must be None (zeros of the normalised "
                      f"input), a number or a tensor. Got {type(baseline).__name__} instead.")


@ATTRIBUTIONS.register("ig", help="Integrated Gradients (captum) with its convergence delta")
class IntegratedGradients(Attribution):
    """Integrated Gradients (Sundararajan et al. 2017) through captum.

    Args:
        model: the classifier.
        baseline: ``None`` (zeros of the normalised input, i.e. the dataset mean image), a
            number, or a tensor broadcastable to the inputs.
        n_steps: integration steps (Gauss-Legendre, captum's default method).
        internal_batch_size: images per forward pass inside captum (memory bound).
        method: captum's approximation method (``"gausslegendre"``, ``"riemann_trapezoid"``...).

    ``delta`` is captum's convergence delta, an absolute quantity in logit units:
    ``sum(attribution) - (f_t(x) - f_t(baseline))``.
    """

    name = "ig"

    def __init__(self, model: nn.Module, baseline: Any = None, n_steps: int = 32,
                 internal_batch_size: int | None = 32, method: str = "gausslegendre"):
        super().__init__(model)
        owner = "IntegratedGradients"
        self.n_steps = check_range(n_steps, "n_steps", owner, 1, integer=True)
        if internal_batch_size is not None:
            check_range(internal_batch_size, "internal_batch_size", owner, 1, integer=True)
        self.internal_batch_size = internal_batch_size

        self.method = check_in(method, "method", owner, ["gausslegendre", "riemann_trapezoid",
                                                         "riemann_left", "riemann_right",
                                                         "riemann_middle"])
        self.baseline = baseline

    def attribute(self, inputs: torch.Tensor, target: int | torch.Tensor) -> AttributionResult:

        x, t = self._prepare(inputs, target)
        base = _baseline_tensor(self.baseline, x, "IntegratedGradients")
        work = prepare_model_copy(self.model)
        ig = CaptumIG(work)
        with torch.enable_grad():
            attr, delta = ig.attribute(x.clone().requires_grad_(True), baselines=base, target=t,
                                       n_steps=self.n_steps, method=self.method,
                                       internal_batch_size=self.internal_batch_size,
                                       return_convergence_delta=True)
        out = target_logits(work, x, t)
        settings = {"n_steps": self.n_steps, "method": self.method,
                    "internal_batch_size": self.internal_batch_size,
                    "baseline": ("zeros" if self.baseline is None else
                                 float(self.baseline) if isinstance(self.baseline, (int, float))
                                 else "tensor")}
        return AttributionResult(
            attribution=attr.detach(), delta=delta.detach().view(-1).to(attr.dtype), method="ig",
            target=t, output=out.detach(), settings=settings,
            delta_definition="captum convergence delta (absolute, logit units): "
                             "sum(attribution) - (f_t(x) - f_t(baseline))")


def integrated_gradients(model: nn.Module, inputs: torch.Tensor, target: int | torch.Tensor,
                         baseline: Any = None, n_steps: int = 32,
                         internal_batch_size: int | None = 32,
                         method: str = "gausslegendre") -> AttributionResult:
    """Integrated Gradients of the ``target`` logit with captum's convergence delta.

    Args:
        model: the classifier (left unchanged).
        inputs: normalised images ``[N, C, H, W]``.
        target: class index (``int``) or ``LongTensor[N]``; never an argmax.
        baseline: ``None`` = zeros of the normalised input, a number, or a tensor.
        n_steps: integration steps; raise it until ``|delta|`` is small.
        internal_batch_size: images per forward pass inside captum.
        method: captum approximation method.

    Returns:
        :class:`AttributionResult` with ``delta = sum(attr) - (f(x) - f(baseline))`` per image.
    """
    return IntegratedGradients(model, baseline=baseline, n_steps=n_steps,
                               internal_batch_size=internal_batch_size,
                               method=method).attribute(inputs, target)


def attribute(method: str, model: nn.Module, inputs: torch.Tensor, target: int | torch.Tensor,
              **settings: Any) -> AttributionResult:
    """Run a registered attribution method by name (``"ig"``, ``"lrp"``, ``"backtrace"``)."""
    return ATTRIBUTIONS.create(method, model=model, **settings).attribute(inputs, target)
