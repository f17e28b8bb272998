"""Shared helpers of classifier-row surgery (also used by triage, retrain, treatments): class
indices, per-channel contributions, margins at a threshold, class probabilities."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medscalpel.errors import ConfigError
from medscalpel.explain.channels import channel_contributions
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers
def class_index(class_names: Sequence[str], k: int | str, owner: str) -> int:
    """Index of class ``k`` (name or index) with a helpful error."""
    if isinstance(k, str):
        if k not in class_names:
            raise ConfigError(f"{owner}: unknown class {k!r}. Valid names: "
                              f"{', '.join(class_names)}.")
        return list(class_names).index(k)
    return int(check_range(k, "target_class", owner, 0, len(class_names) - 1, integer=True))


def contributions(features: np.ndarray, weight: np.ndarray, bias: np.ndarray, k: int
                  ) -> np.ndarray:
    """float64 ``[N, C]`` contributions ``W[k, c] * f_c(x)`` of every channel to logit ``k``
    (via :func:`medscalpel.explain.channels.channel_contributions`)."""
    return channel_contributions(features, weight, bias).for_class(k)


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))


def margins(logits: np.ndarray, k: int, task: str, threshold: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """(probability margin, decision margin) of class ``k``; both move one-for-one with logit k.

    Multi-label: ``p_k = sigmoid(z_k)``, decided positive when ``z_k >= logit(threshold)``.
    Multi-class: ``p_k = sigmoid(z_k - logsumexp_{j != k} z_j)`` (the softmax probability),
    decided positive when ``z_k`` is the largest logit.
    """
    z = np.asarray(logits, np.float64)
    if task == "multilabel":
        return z[:, k].copy(), z[:, k] - _logit(threshold)
    others = np.delete(z, k, axis=1)
    mx = others.max(1)
    lse = mx + np.log(np.exp(others - mx[:, None]).sum(1))
    return z[:, k] - lse, z[:, k] - mx


def class_probs(logits: np.ndarray, task: str) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    if task == "multilabel":
        return sigmoid(z)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _linear_from(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.asarray(weight, np.float32)))
        lin.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))
    return lin


def label_k(labels: np.ndarray, k: int, task: str) -> np.ndarray:
    """1 / 0 / NaN for class k."""
    if task == "multilabel":
        return np.asarray(labels, np.float64)[:, k]
    return (np.asarray(labels) == k).astype(np.float64)
