"""Classifier-channel attribution: which penultimate channels push a class's logit.

Every :class:`~medscalpel.models.classifier.MedClassifier` ends in one linear layer, so

    logit_k(x) = sum_c W[k, c] * f_c(x) + b[k]

and the contribution of channel ``c`` to class ``k`` on image ``n`` is
``contrib[n, k, c] = W[k, c] * f_c(x_n)``; the contributions of an image sum to its logit minus
the bias exactly (products of float32 numbers are exact in float64, and the sum is taken in
float64). Seed 000's surgical correction zeroes the few weights ``W[k, c]`` with the largest
contributions to a false positive; :meth:`ChannelContributions.top_channels` is that table.

Contributions are computed on demand per class (``[N, C]``), never stored as ``[N, K, C]``,
so a whole test split of a DenseNet121 fits in memory.

Example:
    >>> import numpy as np
    >>> f = np.array([[1.0, 2.0], [0.0, 3.0]]); W = np.array([[0.5, -1.0]]); b = np.array([0.1])
    >>> cc = channel_contributions(f, W, b)
    >>> cc.for_class(0)
    array([[ 0.5, -2. ],
           [ 0. , -3. ]])
    >>> cc.logits()[:, 0]
    array([-1.4, -2.9])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medscalpel.data.base import CXRDataset
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.explain.polarity import QuantileRule, make_rule
from medscalpel.progress import track
from medscalpel.validation import check_fraction, check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1


@dataclass(frozen=True)
class ChannelRow:
    """One row of a top-channel table.

    Attributes:
        channel: penultimate channel index.
        weight: ``W[k, c]``.
        mean_contribution: mean of ``W[k, c] * f_c(x)`` over the selected images.
        mean_activation: mean of ``f_c(x)`` over the selected images.
        share: mean contribution / mean of (logit - bias) over the selected images.
        top_fraction: fraction of the selected images in which this channel is among that
            image's own top-``n`` channels (same ordering as the table).
        pushes: OTHER classes to which this channel has a strong positive weight ``(name, w)``.
        pulls: OTHER classes to which it has a strong negative weight ``(name, w)``.
    """

    channel: int
    weight: float
    mean_contribution: float
    mean_activation: float
    share: float
    top_fraction: float
    pushes: tuple[tuple[str, float], ...]
    pulls: tuple[tuple[str, float], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"channel": self.channel, "weight": self.weight,
                "mean_contribution": self.mean_contribution,
                "mean_activation": self.mean_activation, "share": self.share,
                "top_fraction": self.top_fraction,
                "pushes": [{"class": c, "weight": w} for c, w in self.pushes],
                "pulls": [{"class": c, "weight": w} for c, w in self.pulls]}


@dataclass(frozen=True)
class TopChannels:
    """The strongest channels of one class over a set of images."""

    class_index: int
    class_name: str
    order: str
    n_images: int
    rows: tuple[ChannelRow, ...]
    mean_logit_minus_bias: float
    rows_desc: str = "all"

    def channels(self) -> list[int]:
        return [r.channel for r in self.rows]

    def to_frame(self):

        return pd.DataFrame([{**r.to_dict(),
                              "pushes": ", ".join(f"{c} ({w:+.3f})" for c, w in r.pushes),
                              "pulls": ", ".join(f"{c} ({w:+.3f})" for c, w in r.pulls)}
                             for r in self.rows])

    def to_dict(self) -> dict[str, Any]:
        return {"class_index": self.class_index, "class": self.class_name, "order": self.order,
                "n_images": self.n_images, "images": self.rows_desc,
                "mean_logit_minus_bias": self.mean_logit_minus_bias,
                "rows": [r.to_dict() for r in self.rows]}


@dataclass(frozen=True)
class ChannelContributions:
    """Penultimate features with the classifier they feed; contributions on demand.

    Attributes:
        features: ``[N, C]`` penultimate features (dtype kept; math in float64).
        weight: ``[K, C]`` classifier weight.
        bias: ``[K]`` classifier bias.
        class_names: K names.
        ids: N image ids (optional).
        labels: ``[N, K]`` labels (optional; needed for :meth:`false_positives`).
    """

    features: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    class_names: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    labels: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        f, w, b = np.asarray(self.features), np.asarray(self.weight), np.asarray(self.bias)
        if f.ndim != 2:
            raise DataError(f"Channel contributions need features [N, C]; got shape {f.shape}.")
        if w.ndim != 2 or w.shape[1] != f.shape[1]:
            raise DataError(f"Channel contributions: weight of shape {w.shape} does not fit "
                            f"features with {f.shape[1]} channels (expected [K, {f.shape[1]}]).")
        if b.shape != (w.shape[0],):
            raise DataError(f"Channel contributions: bias of shape {b.shape}, expected "
                            f"({w.shape[0]},).")
        names = tuple(self.class_names) or tuple(f"class{i}" for i in range(w.shape[0]))
        if len(names) != w.shape[0]:
            raise DataError(f"Channel contributions: {len(names)} class names for {w.shape[0]} "
                            "classifier rows.")
        if self.ids and len(self.ids) != f.shape[0]:
            raise DataError(f"Channel contributions: {f.shape[0]} feature rows but "
                            f"{len(self.ids)} ids.")
        if self.labels is not None:
            lab = np.asarray(self.labels)
            if lab.shape[0] != f.shape[0]:
                raise DataError(f"Channel contributions: {f.shape[0]} feature rows but "
                                f"{lab.shape[0]} label rows.")
            object.__setattr__(self, "labels", lab)
        object.__setattr__(self, "features", f)
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)
        object.__setattr__(self, "class_names", tuple(str(c) for c in names))
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))

    # ------------------------------------------------------------------ basics
    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_channels(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def class_index(self, k: int | str) -> int:
        if isinstance(k, str):
            if k not in self.class_names:
                raise ConfigError(f"Unknown class {k!r}. Valid names: "
                                  f"{', '.join(self.class_names)}.")
            return self.class_names.index(k)
        check_range(k, "k", "ChannelContributions", 0, self.num_classes - 1, integer=True)
        return int(k)

    def _rows(self, rows: Any) -> np.ndarray:
        if rows is None:
            return np.arange(self.n)
        r = np.asarray(rows)
        if r.dtype == bool:
            if r.shape != (self.n,):
                raise DataError(f"A boolean row mask must have length {self.n}; got {r.shape}.")
            return np.flatnonzero(r)
        r = r.astype(np.int64).ravel()
        if r.size and (r.min() < -self.n or r.max() >= self.n):
            raise DataError(f"Row index out of range for {self.n} images.")
        return r

    def for_class(self, k: int | str, rows: Any = None) -> np.ndarray:
        """float64 ``[n, C]``: ``W[k, c] * f_c(x_n)`` for the selected rows (all by default)."""
        k = self.class_index(k)
        f = self.features[self._rows(rows)].astype(np.float64)
        return f * self.weight[k].astype(np.float64)[None, :]

    def image(self, i: int, k: int | str) -> np.ndarray:
        """float64 ``[C]``: the contributions of image ``i`` to class ``k``."""
        return self.for_class(k, [i])[0]

    def all(self, rows: Any = None) -> np.ndarray:
        """float64 ``[n, K, C]`` contributions (memory: n * K * C * 8 bytes)."""
        f = self.features[self._rows(rows)].astype(np.float64)
        return f[:, None, :] * self.weight.astype(np.float64)[None]

    def logits(self, rows: Any = None) -> np.ndarray:
        """float64 ``[n, K]`` logits rebuilt from the contributions (sum + bias)."""
        f = self.features[self._rows(rows)].astype(np.float64)
        return f @ self.weight.astype(np.float64).T + self.bias.astype(np.float64)

    def mean(self, k: int | str, rows: Any = None) -> np.ndarray:
        """float64 ``[C]``: mean contribution of each channel to class ``k`` over the rows."""
        sel = self._rows(rows)
        if sel.size == 0:
            raise DataError("No images selected: cannot average channel contributions over an "
                            "empty set (e.g. no false positives of this class).")
        return self.for_class(k, sel).mean(0)

    def false_positives(self, k: int | str, threshold: float | None = None) -> np.ndarray:
        """Rows predicted positive for class ``k`` (probability >= ``threshold``, default 0.5,
        or the card's threshold when stored in ``meta['thresholds']``) whose label is 0."""
        k = self.class_index(k)
        if self.labels is None:
            raise DataError("false_positives needs labels: build the contributions with labels "
                            "(e.g. from a Features file or channel_contributions(..., labels=)).")
        if threshold is None:
            thr = self.meta.get("thresholds")
            threshold = float(thr[k]) if thr else 0.5
        check_fraction(threshold, "threshold", "false_positives")
        lab = self.labels
        y = lab[:, k] if lab.ndim == 2 else (lab == k).astype(np.float64)
        prob = 1.0 / (1.0 + np.exp(-self.logits()[:, k]))
        return np.flatnonzero((prob >= threshold) & (y == 0))

    # ------------------------------------------------------------------ tables
    def top_channels(self, k: int | str, n: int = 10, rows: Any = None, order: str = "positive",
                     rule: Any = None, rows_desc: str | None = None) -> TopChannels:
        """The ``n`` channels with the largest mean contribution to class ``k``.

        Args:
            k: class index or name.
            n: table length.
            rows: images to average over (indices or bool mask; default all), e.g.
                ``cc.false_positives(k)``.
            order: ``positive`` (largest mean contribution first: what pushes the logit up),
                ``negative`` (most negative first) or ``abs``.
            rule: the strong-weight rule deciding which OTHER classes a channel pushes or pulls
                (default :class:`~medscalpel.explain.polarity.QuantileRule` ``q=0.9`` on each
                class row, the same rule as the polarity analysis).
            rows_desc: a label for the selected images stored with the table.
        """

        k = self.class_index(k)
        check_range(n, "n", "top_channels", 1, integer=True)
        check_in(order, "order", "top_channels", ("positive", "negative", "abs"))
        sel = self._rows(rows)
        contrib = self.for_class(k, sel)
        if contrib.shape[0] == 0:
            raise DataError(f"top_channels: no images selected for class "
                            f"'{self.class_names[k]}' (e.g. it has no false positives).")
        key = {"positive": lambda a: -a, "negative": lambda a: a,
               "abs": lambda a: -np.abs(a)}[order]
        mean = contrib.mean(0)
        top = np.argsort(key(mean), kind="stable")[:n]
        n_eff = min(n, self.num_channels)
        per_img_top = np.argsort(key(contrib), axis=1, kind="stable")[:, :n_eff]
        in_top = np.zeros(contrib.shape, bool)
        np.put_along_axis(in_top, per_img_top, True, axis=1)
        frac = in_top.mean(0)
        w = self.weight.astype(np.float64)
        pos, neg = make_rule(rule if rule is not None else QuantileRule(0.9)).masks(w)
        act = self.features[sel].astype(np.float64).mean(0)
        lmb = float(contrib.sum(1).mean())
        out = []
        for c in top:
            others = [j for j in range(self.num_classes) if j != k]
            pushes = tuple(sorted(((self.class_names[j], float(w[j, c])) for j in others
                                   if pos[j, c]), key=lambda t: -t[1]))
            pulls = tuple(sorted(((self.class_names[j], float(w[j, c])) for j in others
                                  if neg[j, c]), key=lambda t: t[1]))
            out.append(ChannelRow(channel=int(c), weight=float(w[k, c]),
                                  mean_contribution=float(mean[c]),
                                  mean_activation=float(act[c]),
                                  share=float(mean[c] / lmb) if lmb != 0 else float("nan"),
                                  top_fraction=float(frac[c]), pushes=pushes, pulls=pulls))
        return TopChannels(class_index=k, class_name=self.class_names[k], order=order,
                           n_images=int(sel.size), rows=tuple(out), mean_logit_minus_bias=lmb,
                           rows_desc=rows_desc or ("all" if rows is None else "selected"))

    def to_dict(self, n: int = 10) -> dict[str, Any]:
        """Summary: per class, the top-``n`` channels over all images (and over the class's
        false positives when labels are known)."""
        out: dict[str, Any] = {"schema_version": SCHEMA, "n_images": self.n,
                               "num_channels": self.num_channels,
                               "class_names": list(self.class_names), "meta": self.meta,
                               "max_abs_reconstruction_error": self.meta.get(
                                   "max_abs_reconstruction_error"),
                               "classes": {}}
        for k, name in enumerate(self.class_names):
            entry = {"all": self.top_channels(k, n).to_dict()}
            if self.labels is not None:
                fp = self.false_positives(k)
                entry["n_false_positives"] = int(fp.size)
                if fp.size:
                    entry["false_positives"] = self.top_channels(
                        k, n, rows=fp, rows_desc="false positives").to_dict()
            out["classes"][name] = entry
        return out


def channel_contributions(features: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                          class_names: Sequence[str] | None = None,
                          ids: Sequence[str] | None = None, labels: np.ndarray | None = None,
                          meta: dict[str, Any] | None = None) -> ChannelContributions:
    """Contributions ``W[k, c] * f_c(x_n)`` from cached features.

    Args:
        features: ``[N, C]`` penultimate features (``model.features(x)`` or a ``Features`` file).
        weight: ``[K, C]`` classifier weight.
        bias: ``[K]`` classifier bias.
        class_names, ids, labels: optional tables carried along.

    Returns:
        A :class:`ChannelContributions`; ``cc.for_class(k).sum(1) == cc.logits()[:, k] - b[k]``.
    """
    def arr(a: Any) -> np.ndarray:
        return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)

    return ChannelContributions(arr(features), arr(weight), arr(bias),
                                tuple(class_names or ()), tuple(ids or ()),
                                None if labels is None else arr(labels), dict(meta or {}))


def channel_contributions_from_features(feats: Any) -> ChannelContributions:
    """From a :class:`medscalpel.engine.predict.Features` (cached features + classifier)."""
    for attr in ("features", "weight", "bias"):
        if not hasattr(feats, attr):
            raise DataError(f"channel_contributions_from_features needs a Features object (with "
                            f"features, weight, bias); {type(feats).__name__} lacks '{attr}'.")
    return channel_contributions(feats.features, feats.weight, feats.bias,
                                 getattr(feats, "class_names", None), getattr(feats, "ids", None),
                                 getattr(feats, "labels", None),
                                 {"model_id": getattr(feats, "model_id", "")})


def channel_contributions_from_model(model: nn.Module, images: Any, batch_size: int = 32,
                                     labels: np.ndarray | None = None,
                                     ids: Sequence[str] | None = None,
                                     progress: bool | None = None) -> ChannelContributions:
    """Run ``model.features`` on ``images`` (a ``[N, C, H, W]`` tensor or a ``CXRDataset``) and
    return the contributions, checking that they rebuild the model's logits.

    The model's train/eval flags are restored; features are computed in eval mode without
    gradients. ``meta['max_abs_reconstruction_error']`` is ``max |sum_c contrib + b - logit|``
    against the model's own forward pass (float32 rounding only).
    """
    if not hasattr(model, "features") or not isinstance(getattr(model, "classifier", None),
                                                        nn.Linear):
        raise ModelError(f"channel_contributions_from_model needs a MedClassifier (features() and "
                         f"an nn.Linear classifier); got {type(model).__name__}.")
    check_range(batch_size, "batch_size", "channel_contributions_from_model", 1, integer=True)

    class_names = getattr(getattr(model, "card", None), "class_names", None)
    if isinstance(images, CXRDataset):
        ds = images
        n = len(ds)
        get = lambda s, e: torch.stack([ds.image(i) for i in range(s, e)])  # noqa: E731
        labels = ds.labels if labels is None else labels
        ids = ds.ids if ids is None else ids
        class_names = ds.class_names
    elif isinstance(images, torch.Tensor) and images.ndim == 4:
        n = int(images.shape[0])
        get = lambda s, e: images[s:e]  # noqa: E731
    else:
        raise DataError(f"channel_contributions_from_model needs images as a [N, C, H, W] tensor "
                        f"or a CXRDataset; got {getattr(images, 'shape', type(images).__name__)}.")
    if n == 0:
        raise DataError("channel_contributions_from_model got 0 images.")
    device = next(model.parameters()).device
    modes = [(m, m.training) for m in model.modules()]
    feats, logits = [], []
    try:
        model.eval()
        with torch.no_grad():
            for s in track(range(0, n, batch_size), "features", progress=progress):
                x = get(s, min(n, s + batch_size)).to(device)
                f = model.features(x)
                feats.append(f.cpu())
                logits.append(model.classifier(f).cpu())
    finally:
        for m, mode in modes:
            m.training = mode
    f = torch.cat(feats).numpy()
    lg = torch.cat(logits).numpy().astype(np.float64)
    w = model.classifier.weight.detach().cpu().numpy()
    b = (model.classifier.bias.detach().cpu().numpy() if model.classifier.bias is not None
         else np.zeros(w.shape[0], w.dtype))
    cc = channel_contributions(f, w, b, class_names, ids, labels)
    err = float(np.abs(cc.logits() - lg).max())
    thr = getattr(getattr(model, "card", None), "thresholds", None)
    meta = {"arch": getattr(model, "arch", type(model).__name__),
            "model_id": getattr(getattr(model, "card", None), "model_id", ""),
            "max_abs_reconstruction_error": err,
            "thresholds": list(thr) if thr is not None else None}
    return ChannelContributions(cc.features, cc.weight, cc.bias, cc.class_names, cc.ids,
                                cc.labels, meta)
