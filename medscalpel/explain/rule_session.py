"""The base of rule-based relevance sessions (LRP, DL-Backtrace): a private copy of a model
with a zennit composite registered while the session is open, one relevance pass, and the check
that the canonized copy still computes the caller's logits.

This module imports nothing of ``medscalpel.explain`` so that both rule families
(:mod:`~medscalpel.explain.lrp`, :mod:`~medscalpel.explain.backtrace`) can build on it
without an import circle through the attribution registry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medscalpel.errors import ModelError, VerificationError

#: the canonized copy may differ from the caller's model by at most this x the logit scale
CANONIZER_TOLERANCE = 1e-4


class RuleSession:
    """The base of rule-based relevance sessions (LRP, DL-Backtrace): a private copy
    ``work`` of a model with a zennit composite registered while the session is open, and the
    unmodified copy ``reference`` that checks the canonized logit. A subclass builds
    ``reference``, ``work``, ``composite`` and ``settings`` in its constructor and names its
    ``owner`` and the ``hint`` shown when its canonization does not fit a model.
    """

    owner = "rule"
    hint = "report the architecture, or use method='ig'."

    def __init__(self) -> None:
        self.max_canonizer_diff = 0.0
        self._active = False

    def __enter__(self):
        self.composite.register(self.work)
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.composite.remove()
        self._active = False

    def modules(self) -> dict[str, nn.Module]:
        """Named modules of the private copy (names are the caller's model's names)."""
        return dict(self.work.named_modules())

    def relevance(self, x: torch.Tensor, target: torch.Tensor,
                  capture: list[str] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Propagate ``R = f_t(x)`` back to the input.

        Returns:
            ``(input_relevance [N, C, H, W], target_logit [N], {layer: relevance at its
            output})``; layers whose output does not reach the logit are absent.
        """
        if not self._active:
            raise RuntimeError(f"{type(self).__name__}.relevance must be called inside "
                               "'with session:'.")
        return rule_relevance(self, x, target, capture, self.owner, self.hint)


def rule_relevance(session: Any, x: torch.Tensor, target: torch.Tensor,
                   capture: list[str] | None, owner: str, hint: str
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One relevance pass of a rule-based session (LRP, DL-Backtrace): the rules live in the
    zennit composite registered on ``session.work`` (a canonized copy); the backward pass starts
    from ``R = f_t(x)`` at the target logit and returns the input relevance, the target logit of
    the unmodified ``session.reference`` and the relevance at the output of each ``capture``
    layer (layers whose output does not reach the logit are absent).

    Raises:
        ModelError: a ``capture`` layer is not in the model.
        VerificationError: the canonized copy changed the target logit beyond
            ``CANONIZER_TOLERANCE`` x its scale (``hint`` says what to do).
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    mods = dict(session.work.named_modules())

    def make_hook(layer: str):
        def fwd_hook(_m, _inp, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g, layer=layer: captured.__setitem__(layer, g))
        return fwd_hook

    try:
        for layer in capture or []:
            if layer not in mods:
                raise ModelError(f"{owner}: layer '{layer}' not found in the model.")
            handles.append(mods[layer].register_forward_hook(make_hook(layer)))
        with torch.enable_grad():
            xin = x.detach().clone().requires_grad_(True)
            out = session.work(xin)
            logit = out.gather(1, target.view(-1, 1)).squeeze(1)
            start = torch.zeros_like(out)
            start.scatter_(1, target.view(-1, 1), logit.detach().view(-1, 1))
            (rel,) = torch.autograd.grad(out, xin, grad_outputs=start)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        ref = session.reference(x).gather(1, target.view(-1, 1)).squeeze(1)
    diff = float((ref - logit.detach()).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    session.max_canonizer_diff = max(session.max_canonizer_diff, diff)
    if diff > CANONIZER_TOLERANCE * scale:
        raise VerificationError(
            f"{owner}: the canonized {session.settings['arch']} changed the target logit by "
            f"{diff:.3g} (tolerance {CANONIZER_TOLERANCE * scale:.3g}); {hint}")
    return rel.detach(), ref.detach(), captured


__all__ = ["CANONIZER_TOLERANCE", "RuleSession", "rule_relevance"]
