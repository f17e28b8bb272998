"""Structured (channel) pruning with real speedup, on Torch-Pruning dependency graphs.

Torch-Pruning traces the model once and groups every layer whose channels are coupled (DenseNet
concatenations, ResNet residual additions, BN after conv, the classifier's input), so removing a
channel removes it consistently everywhere and the result is a physically smaller model that
reloads from medscalpel's own files (``save_model`` / ``load_model`` conform the layer shapes).

Criteria come from :mod:`medscalpel.compress.importance` (``l1``, ``l2``, ``bn_scale``,
``taylor``, ``lrp``, ``ig``; ``backtrace`` (native DL-Backtrace)). The classifier's outputs are
never pruned. Pruning can be per layer (local) or global, one-shot or iterative with a recovery
fine-tune after each step (optionally distilling from the unpruned model).

Example:
    >>> import torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("resnet_tiny", num_classes=2, img_size=32)
    >>> r = prune_structured(m, torch.randn(4, 1, 32, 32), "l1", ratio=0.5,
    ...                      measure_latency=False, progress=False)
    >>> r.params_after < r.params_before and r.model(torch.zeros(1, 1, 32, 32)).shape[1] == 2
    True

The package holds one concept a module, like Torch-Pruning's ``dependency/``: :mod:`.result`
(:class:`RecoveryConfig`, :class:`PruneResult`), :mod:`.channels` (the dependency-graph glue and
:func:`remove_channels`), :mod:`.validate` (step 1), :mod:`.ratio` (step 2: the ratio search)
and :mod:`.flow` (steps 3-5 and :func:`prune_structured`). Every name stays importable from here.
"""

from __future__ import annotations

from medscalpel.compress.structured.channels import OWNER, remove_channels
from medscalpel.compress.structured.flow import prune_structured
from medscalpel.compress.structured.result import PruneResult, RecoveryConfig

__all__ = ["OWNER", "PruneResult", "RecoveryConfig", "prune_structured", "remove_channels"]
