"""Channel-importance criteria for structured pruning (the ``IMPORTANCE`` registry).

Every criterion is a :class:`Criterion` whose one required method, :meth:`Criterion.importance`,
returns a Torch-Pruning ``Importance`` (``group -> 1-D score per channel of the group's root``).
Data-driven criteria also override :meth:`Criterion.prepare`, called on the current model before
every pruning step (gradients for Taylor, attribution scores for LRP / IG).

Registered names:

* ``l1`` / ``l2``: group L1 / L2 weight magnitude (Torch-Pruning ``GroupMagnitudeImportance``).
* ``bn_scale``: |gamma| of the BatchNorm layers in the group (network slimming).
* ``taylor``: first-order Taylor |w * dL/dw| on calibration images (labels when given, otherwise
  the model's own hard predictions as targets).
* ``lrp`` / ``ig`` / ``backtrace``: channel relevance from
  :func:`medscalpel.explain.relevance.channel_relevance` (seed 002's attribution-guided
  pruning; ``backtrace`` is medscalpel's native torch DL-Backtrace), mapped onto each group's
  channels.

Example:
    >>> crit = IMPORTANCE.create("l1")
    >>> type(crit.importance()).__name__
    'GroupMagnitudeImportance'
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from medscalpel.errors import ConfigError, ModelError
from medscalpel.explain.relevance import channel_relevance
from medscalpel.registry import Registry

logger = logging.getLogger(__name__)

#: criterion name -> factory of :class:`Criterion`
IMPORTANCE: Registry["Criterion"] = Registry("pruning criterion")


class Criterion(abc.ABC):
    """Base class of the pruning criteria.

    Subclasses implement :meth:`importance`; data-driven ones override :meth:`prepare` (and set
    ``needs_data = True``).
    """

    name: str = ""
    needs_data: bool = False

    def prepare(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None,
                task: str = "multilabel", batch_size: int = 16,
                progress: bool | None = None) -> None:
        """Compute what :meth:`importance` needs on the current ``model`` (default: nothing)."""

    def finish(self, model: nn.Module) -> None:
        """Release per-step state (gradients, scores) after a pruning step."""

    @abc.abstractmethod
    def importance(self) -> Any:
        """The Torch-Pruning ``Importance`` object scoring each group's channels."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "needs_data": self.needs_data}


# ----------------------------------------------------------------------------- magnitude
@IMPORTANCE.register("l1", help="Group L1 norm of the weights (Torch-Pruning magnitude, p=1)")
class L1Criterion(Criterion):
    """Group L1 weight magnitude."""

    name = "l1"
    p = 1

    def importance(self):

        return tp.importance.GroupMagnitudeImportance(p=self.p)


@IMPORTANCE.register("l2", help="Group L2 norm of the weights (Torch-Pruning magnitude, p=2)")
class L2Criterion(L1Criterion):
    """Group L2 weight magnitude (the Torch-Pruning default)."""

    name = "l2"
    p = 2


@IMPORTANCE.register("bn_scale", help="|gamma| of the BatchNorm layers (network slimming)")
class BNScaleCriterion(Criterion):
    """BatchNorm scale factors."""

    name = "bn_scale"

    def importance(self):

        return tp.importance.BNScaleImportance()


# ----------------------------------------------------------------------------- Taylor
def _task_loss(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    if task == "multiclass":
        return nn.functional.cross_entropy(logits, targets.long())
    known = torch.isfinite(targets)
    t = torch.where(known, targets, torch.zeros_like(targets))
    per = nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none") * known
    return per.sum() / known.sum().clamp(min=1)


def pseudo_targets(logits: torch.Tensor, task: str) -> torch.Tensor:
    """The model's own hard decisions as targets (argmax, or p >= 0.5 per class)."""
    if task == "multiclass":
        return logits.argmax(1)
    return (logits > 0).float()


@IMPORTANCE.register("taylor", help="First-order Taylor |w * dL/dw| on calibration images")
class TaylorCriterion(Criterion):
    """Taylor expansion of the loss (Molchanov et al. 2019) accumulated over calibration images."""

    name = "taylor"
    needs_data = True

    def prepare(self, model, images, targets, task="multilabel", batch_size=16, progress=None):
        was_training = model.training
        model.eval()  # BN statistics must not move while scoring
        model.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                for p in model.parameters():
                    p.requires_grad_(True)
                for i in range(0, images.shape[0], batch_size):
                    x = images[i:i + batch_size]
                    logits = model(x)
                    t = (targets[i:i + batch_size] if targets is not None
                         else pseudo_targets(logits.detach(), task))
                    _task_loss(logits, t, task).backward()
        finally:
            model.train(was_training)

    def finish(self, model):
        model.zero_grad(set_to_none=True)

    def importance(self):

        return tp.importance.GroupTaylorImportance()


# ----------------------------------------------------------------------------- channel scores
class ChannelScoreImportance:
    """A Torch-Pruning ``Importance`` built from per-layer channel scores.

    ``scores`` maps qualified layer names (as in ``model.named_modules()``) to a 1-D tensor with
    one score per output channel of that Conv/Linear/BatchNorm layer. For a group, every member
    whose output channels are pruned and that has scores contributes
    ``|scores[layer][idxs]|`` at the group's root channel positions; contributions are averaged
    and divided by their mean (Torch-Pruning's ``mean`` normaliser), so global pruning compares
    groups on one scale. Groups without any scored member fall back to group L1 magnitude (their
    count is kept in ``fallback_groups``).
    """

    def __init__(self, names: Mapping[nn.Module, str], scores: Mapping[str, torch.Tensor]):

        self.names = dict(names)
        self.scores = {k: torch.as_tensor(v).detach().float().abs().flatten()
                       for k, v in scores.items()}
        self._fallback = tp.importance.GroupMagnitudeImportance(p=1)
        self.fallback_groups = 0
        self.scored_groups = 0

    @staticmethod
    def _is_out_fn(fn) -> bool:

        return fn in (tp.pruner.function.prune_conv_out_channels,
                      tp.pruner.function.prune_linear_out_channels,
                      tp.pruner.function.prune_batchnorm_out_channels)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        total = None
        count = None
        n_root = len(group[0].idxs)
        for item in group:
            dep, idxs = item.dep, item.idxs
            layer = dep.target.module
            if not self._is_out_fn(dep.handler):
                continue
            name = self.names.get(layer)
            if name is None or name not in self.scores:
                continue
            s = self.scores[name]
            width = (layer.num_features if isinstance(layer, nn.modules.batchnorm._BatchNorm)
                     else layer.weight.shape[0])
            if s.numel() != width:
                raise ModelError(
                    f"Channel scores for layer '{name}' have {s.numel()} entries but the layer has "
                    f"{width} output channels: the scores were computed on another model (or "
                    "before a pruning step). Recompute them on the model being pruned.")
            root = item.root_idxs
            if any(r is None for r in root):
                continue
            if total is None:
                total = torch.zeros(n_root)
                count = torch.zeros(n_root)
            r = torch.as_tensor(root, dtype=torch.long)
            total.index_add_(0, r, s[torch.as_tensor(idxs, dtype=torch.long)])
            count.index_add_(0, r, torch.ones(len(root)))
        if total is None:
            self.fallback_groups += 1
            return self._fallback(group)
        self.scored_groups += 1
        imp = total / count.clamp(min=1)
        mean = imp.mean()
        return imp / mean if mean > 0 else imp


class ScoresCriterion(Criterion):
    """Prune by given per-layer channel scores (e.g. a saved ``ChannelRelevance.scores``).

    The scores must come from the model being pruned (one-shot pruning; with several iterative
    steps the layer widths change and the scores no longer fit).

    Args:
        scores: qualified layer name -> score per output channel.
    """

    name = "scores"

    def __init__(self, scores: Mapping[str, torch.Tensor]):
        if not scores:
            raise ConfigError("ScoresCriterion needs a non-empty mapping layer name -> scores.")
        self.scores = dict(scores)
        self._names: dict[nn.Module, str] = {}
        self._imp: ChannelScoreImportance | None = None
        self.stats = {"scored_groups": 0, "fallback_groups": 0}

    def prepare(self, model, images, targets, task="multilabel", batch_size=16, progress=None):
        self._names = {m: n for n, m in model.named_modules()}
        self._imp = None

    def importance(self):
        if self._imp is None:
            self._imp = ChannelScoreImportance(self._names, self.scores)
        return self._imp

    def finish(self, model):
        if self._imp is not None:
            self.stats["scored_groups"] += self._imp.scored_groups
            self.stats["fallback_groups"] += self._imp.fallback_groups
        self._imp = None

    def to_dict(self):
        return {**super().to_dict(), "layers": len(self.scores), **self.stats}


class RelevanceCriterion(ScoresCriterion):
    """Channel relevance from attributions, recomputed on the current model before each step.

    Uses :func:`medscalpel.explain.relevance.channel_relevance` with ``method`` (``lrp``,
    ``ig`` or ``backtrace``); the relevance of every Conv/BN output channel is accumulated over
    the calibration images, and channels with the smallest |relevance| are pruned first.
    """

    name = ""
    method = ""
    needs_data = True

    def __init__(self, targets: int | list[int] | None = None):
        self.targets = targets
        self.scores = {}
        self._names = {}
        self._imp = None
        self.stats = {"scored_groups": 0, "fallback_groups": 0}

    def prepare(self, model, images, targets, task="multilabel", batch_size=16, progress=None):
        layers = [n for n, m in model.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm))]
        rel = channel_relevance(model, images, self.targets, method=self.method, layers=layers,
                                batch_size=batch_size, progress=progress, labels=targets)
        self.scores = {k: torch.as_tensor(v) for k, v in rel.scores.items()}
        if not self.scores:
            raise ModelError(f"channel_relevance ({self.method}) returned no layer scores for "
                             f"{getattr(model, 'arch', type(model).__name__)}.")
        self._names = {m: n for n, m in model.named_modules()}
        self._imp = None

    def finish(self, model):
        super().finish(model)
        self.scores = {}

    def to_dict(self):
        return {"name": self.name, "needs_data": True, "method": self.method,
                "targets": self.targets, **self.stats}

    def importance(self):
        if not self.scores:
            raise ModelError(f"The '{self.name}' criterion has no relevance scores yet: call "
                             "prepare(model, images, ...) first (prune_structured does).")
        return super().importance()


@IMPORTANCE.register("lrp", help="Layer-wise Relevance Propagation channel relevance (seed 002)")
class LRPCriterion(RelevanceCriterion):
    """Attribution-guided pruning with LRP relevance (DenseNet-capable LRP of medscalpel.explain)."""

    name = "lrp"
    method = "lrp"


@IMPORTANCE.register("ig", help="Integrated Gradients channel relevance (seed 002)")
class IGCriterion(RelevanceCriterion):
    """Attribution-guided pruning with Integrated Gradients relevance."""

    name = "ig"
    method = "ig"


@IMPORTANCE.register("backtrace", help="DL-Backtrace channel relevance (native torch, seed 002)")
class BacktraceCriterion(RelevanceCriterion):
    """Attribution-guided pruning with DL-Backtrace relevance (medscalpel's native
    implementation, :mod:`medscalpel.explain.backtrace`)."""

    name = "backtrace"
    method = "backtrace"


def make_criterion(criterion: str | Criterion | Mapping[str, torch.Tensor]) -> Criterion:
    """A :class:`Criterion` from a registered name, an instance, or a scores mapping."""
    if isinstance(criterion, Criterion):
        return criterion
    if isinstance(criterion, Mapping):
        return ScoresCriterion(criterion)
    if hasattr(criterion, "scores") and isinstance(getattr(criterion, "scores"), Mapping):
        return ScoresCriterion(criterion.scores)  # a ChannelRelevance result
    if not isinstance(criterion, str):
        raise ConfigError(f"The 'criterion' parameter of prune_structured must be one of "
                          f"{', '.join(IMPORTANCE.names())}, a Criterion or a mapping layer -> "
                          f"scores. Got {type(criterion).__name__} instead.")
    return IMPORTANCE.create(criterion)
