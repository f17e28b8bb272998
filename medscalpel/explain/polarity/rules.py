"""Strong-weight rules and the polarized classifier channels they select.

A rule (:class:`StrongWeightRule`, registered in :data:`POLARITY_RULES`: ``quantile``,
``zscore``, ``topk``, ``absolute``; :func:`make_rule` builds one from a name or a mapping)
marks a classifier's strong positive and strong negative weights; a channel with both is
polarized. :func:`_triples` lists every (channel, positive class, negative class) triple,
:func:`_channel_pairs` one strongest pair per channel (seed 000's table).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medscalpel.errors import ConfigError
from medscalpel.registry import Registry
from medscalpel.validation import check_fraction, check_range

#: strong-weight rules by name (``quantile``, ``zscore``, ``topk``, ``absolute``)
POLARITY_RULES: Registry["StrongWeightRule"] = Registry("polarity rule")


# ----------------------------------------------------------------------------- rules
class StrongWeightRule:
    """Decides which classifier weights are *strong*. Subclasses implement :meth:`strong`."""

    name = "base"

    def strong(self, weight: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Bool ``[K, C]``: ``weight[k, c]`` is strong."""
        raise NotImplementedError

    def masks(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(strong positive, strong negative) bool ``[K, C]`` masks; zero weights are neither."""
        s = self.strong(weight)
        return s & (weight > 0), s & (weight < 0)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return {"name": self.name, **d}


@POLARITY_RULES.register("quantile", help="|w| at or above the q-quantile of |w| in its class row")
@dataclass(frozen=True)
class QuantileRule(StrongWeightRule):
    """``|W[k, c]| >= quantile_q(|W[k, :]|)``: the channel is among the ``1 - q`` strongest
    channels (by magnitude) of class ``k``'s classifier row."""

    q: float = 0.9
    name = "quantile"

    def __post_init__(self):
        check_fraction(self.q, "q", "QuantileRule")

    def strong(self, weight: np.ndarray) -> np.ndarray:
        a = np.abs(weight)
        thr = np.quantile(a, self.q, axis=1, keepdims=True)
        return a >= thr

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "q": self.q}


@POLARITY_RULES.register("zscore", help="|w| at least z standard deviations of its class row")
@dataclass(frozen=True)
class ZScoreRule(StrongWeightRule):
    """``|W[k, c] - mean_k| >= z * std_k`` over class ``k``'s row."""

    z: float = 2.0
    name = "zscore"

    def __post_init__(self):
        check_range(self.z, "z", "ZScoreRule", 0.0, low_inclusive=False)

    def strong(self, weight: np.ndarray) -> np.ndarray:
        mu = weight.mean(1, keepdims=True)
        sd = weight.std(1, keepdims=True)
        return np.abs(weight - mu) >= self.z * np.where(sd > 0, sd, np.inf)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "z": self.z}


@POLARITY_RULES.register("topk", help="the k largest |w| of each class row")
@dataclass(frozen=True)
class TopKRule(StrongWeightRule):
    """The ``k`` channels of largest ``|W[k, c]|`` in each class row (ties broken by index)."""

    k: int = 10
    name = "topk"

    def __post_init__(self):
        check_range(self.k, "k", "TopKRule", 1, integer=True)

    def strong(self, weight: np.ndarray) -> np.ndarray:
        k = min(self.k, weight.shape[1])
        idx = np.argsort(-np.abs(weight), axis=1, kind="stable")[:, :k]
        out = np.zeros(weight.shape, bool)
        np.put_along_axis(out, idx, True, axis=1)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k}


@POLARITY_RULES.register("absolute", help="|w| at or above a fixed threshold")
@dataclass(frozen=True)
class AbsoluteRule(StrongWeightRule):
    """``|W[k, c]| >= threshold``."""

    threshold: float = 0.1
    name = "absolute"

    def __post_init__(self):
        check_range(self.threshold, "threshold", "AbsoluteRule", 0.0, low_inclusive=False)

    def strong(self, weight: np.ndarray) -> np.ndarray:
        return np.abs(weight) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold}


def make_rule(rule: StrongWeightRule | str | Mapping[str, Any]) -> StrongWeightRule:
    """A rule object from an instance, a name (``"quantile"``) or ``{"name": .., **params}``."""
    if isinstance(rule, StrongWeightRule):
        return rule
    if isinstance(rule, str):
        return POLARITY_RULES.create(rule)
    if isinstance(rule, Mapping):
        params = dict(rule)
        name = params.pop("name", None)
        if name is None:
            raise ConfigError("A polarity rule given as a mapping needs a 'name' key, e.g. "
                              "{'name': 'quantile', 'q': 0.9}.")
        return POLARITY_RULES.create(name, **params)
    raise ConfigError(f"The 'rule' parameter of polarity_analysis must be a StrongWeightRule, a "
                      f"name in {POLARITY_RULES.names()} or a mapping. Got {rule!r} instead.")


# ----------------------------------------------------------------------------- core
def _triples(weight: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """``[T, 3]`` (channel, positive class, negative class) of every polarized triple."""
    out = []
    for c in np.flatnonzero(pos.any(0) & neg.any(0)):
        p = np.flatnonzero(pos[:, c])
        n = np.flatnonzero(neg[:, c])
        pp, nn = np.meshgrid(p, n, indexing="ij")
        out.append(np.stack([np.full(pp.size, c), pp.ravel(), nn.ravel()], 1))
    return np.concatenate(out) if out else np.zeros((0, 3), np.int64)


def _channel_pairs(weight: np.ndarray, pos: np.ndarray, neg: np.ndarray,
                   max_channels: int | None) -> np.ndarray:
    """``[P, 3]`` (channel, strongest positive class, strongest negative class) of polarized
    channels, sorted by polarization strength min(w+, |w-|) (top ``max_channels`` kept)."""
    chans = np.flatnonzero(pos.any(0) & neg.any(0))
    if chans.size == 0:
        return np.zeros((0, 3), np.int64)
    wp = np.where(pos[:, chans], weight[:, chans], -np.inf)
    wn = np.where(neg[:, chans], weight[:, chans], np.inf)
    p = wp.argmax(0)
    n = wn.argmin(0)
    score = np.minimum(wp.max(0), -wn.min(0))
    order = np.argsort(-score, kind="stable")
    if max_channels is not None:
        order = order[:max_channels]
    return np.stack([chans[order], p[order], n[order]], 1)


def _weights_of(weight: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(rows) == 0:
        return np.zeros(0), np.zeros(0)
    return weight[rows[:, 1], rows[:, 0]], weight[rows[:, 2], rows[:, 0]]



__all__ = ["POLARITY_RULES", "AbsoluteRule", "QuantileRule", "StrongWeightRule", "TopKRule",
           "ZScoreRule", "make_rule"]
