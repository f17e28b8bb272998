"""Channel relevance per layer: the scores attribution-guided pruning ranks channels by.

For every Conv2d / BatchNorm layer (or the layers named), the relevance of output channel ``c``
for one (image, class) pair is the sum over spatial positions of the relevance at that layer's
output, for the class's logit:

* ``"lrp"``: the LRP relevance flowing through the layer's output (zennit with medscalpel's
  canonizers, captured with tensor hooks on the canonized copy; in that copy a BN folded into
  its conv is an identity, so the conv and its BN share one score).
* ``"backtrace"``: the DL-Backtrace relevance flowing through the layer's output
  (:mod:`medscalpel.explain.backtrace`, captured the same way as LRP; with the default
  ``bn_rule="pass"`` a BN passes its conv's relevance unchanged, so the two share one score).
  Relevance carries the sign of the explained logit everywhere.
* ``"ig"``: layer conductance of the channel (Dhamdhere et al. 2018): Integrated Gradients along
  the straight input path, read at the layer, ``sum_k g_k . (a_{k+1} - a_k)`` (trapezoidal),
  for all layers in one pass. On a layer that every path to the logit crosses (a *cut*), the
  channel scores add up to ``f_t(x) - f_t(baseline)``.
* ``"taylor"``: first-order Taylor (Molchanov et al. 2017) ``sum_spatial a * df_t/da``.

Pairs are accumulated over calibration images and targets: ``aggregate="abs"`` sums
``|channel relevance|`` over pairs (default; a channel that strongly *lowers* a logit is still
important), ``"signed"`` sums the signed values. ``scores`` are normalised per layer
(``normalize``; default ``"sum"``: each layer's absolute scores add up to 1), ``raw_scores`` are
not. The caller's model is never changed.

Example:
    >>> import torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("resnet_tiny", num_classes=3, img_size=32)
    >>> cr = channel_relevance(m, torch.randn(4, 1, 32, 32), targets=[0, 2], method="taylor",
    ...                        progress=False)
    >>> cr.scores["backbone.conv1"].shape
    torch.Size([8])
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.explain.attribution_base import (check_inputs, num_classes_of,
                                                 prepare_model_copy)
from medscalpel.explain.backtrace import BacktraceSession
from medscalpel.explain.lrp import LRPSession
from medscalpel.progress import track
from medscalpel.runs import atomic_path
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
METHODS = ("lrp", "ig", "taylor", "backtrace")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class ChannelRelevance:
    """Relevance of each output channel of each layer, accumulated over images and targets.

    Attributes:
        scores: ``{layer: Tensor[C_out]}`` normalised per layer (see ``normalize``).
        raw_scores: the same before normalisation.
        method: ``"lrp"``, ``"ig"``, ``"taylor"`` or ``"backtrace"``.
        aggregate: ``"abs"`` (sum over pairs of |channel relevance|) or ``"signed"``.
        normalize: ``"sum"``, ``"max"``, ``"mean"`` or ``None``.
        n_images: images used.
        n_pairs: (image, class) pairs accumulated.
        class_counts: ``{class index: pairs}``.
        settings: method settings (composite, steps, ...), JSON-able.
    """

    scores: dict[str, torch.Tensor]
    raw_scores: dict[str, torch.Tensor]
    method: str
    aggregate: str
    normalize: str | None
    n_images: int
    n_pairs: int
    class_counts: dict[int, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def layers(self) -> list[str]:
        return list(self.scores)

    def ranking(self, layer: str, descending: bool = True) -> list[int]:
        """Channel indices of ``layer`` from most to least relevant."""
        if layer not in self.scores:
            raise ModelError(f"ChannelRelevance: no scores for layer '{layer}'. Layers: "
                             f"{', '.join(list(self.scores)[:8])}...")
        s = self.scores[layer]
        key = s.abs() if self.aggregate == "signed" else s
        return torch.argsort(key, descending=descending).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "method": self.method, "aggregate": self.aggregate,
                "normalize": self.normalize, "n_images": self.n_images, "n_pairs": self.n_pairs,
                "class_counts": {str(k): v for k, v in self.class_counts.items()},
                "settings": self.settings,
                "scores": {k: [float(x) for x in v] for k, v in self.scores.items()},
                "raw_scores": {k: [float(x) for x in v] for k, v in self.raw_scores.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChannelRelevance":
        if d.get("schema") != SCHEMA:
            raise DataError(f"ChannelRelevance: unsupported schema {d.get('schema')!r} (expected "
                            f"{SCHEMA}).")
        return cls(scores={k: torch.tensor(v) for k, v in d["scores"].items()},
                   raw_scores={k: torch.tensor(v) for k, v in d["raw_scores"].items()},
                   method=d["method"], aggregate=d["aggregate"], normalize=d["normalize"],
                   n_images=int(d["n_images"]), n_pairs=int(d["n_pairs"]),
                   class_counts={int(k): int(v) for k, v in d.get("class_counts", {}).items()},
                   settings=d.get("settings", {}))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ChannelRelevance":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"ChannelRelevance.load: {path} does not exist.")
        return cls.from_dict(json.loads(path.read_text()))


# ----------------------------------------------------------------------------- inputs and pairs
def _collect_inputs(inputs: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    owner = "channel_relevance"
    if isinstance(inputs, torch.Tensor):
        return check_inputs(inputs, owner), (None if labels is None else torch.as_tensor(labels))
    if isinstance(inputs, torch.utils.data.Dataset) and hasattr(inputs, "__len__"):
        xs, ys = [], []
        for i in range(len(inputs)):
            item = inputs[i]
            if isinstance(item, (tuple, list)):
                xs.append(torch.as_tensor(item[0]))
                if len(item) > 1:
                    ys.append(torch.as_tensor(item[1]))
            else:
                xs.append(torch.as_tensor(item))
        if not xs:
            raise DataError("channel_relevance: the calibration dataset is empty.")
        x = check_inputs(torch.stack(xs).float(), owner)
        y = torch.as_tensor(labels) if labels is not None else (
            torch.stack(ys) if len(ys) == len(xs) else None)
        return x, y
    raise DataError(f"The 'inputs' parameter of channel_relevance must be a tensor [N, C, H, W] "
                    f"or a Dataset of (image, label). Got {type(inputs).__name__} instead.")


def _pairs(targets: Any, labels: torch.Tensor | None, n: int, k: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, class) pairs as two LongTensors."""
    owner = "channel_relevance"
    if targets is None:
        if labels is None:
            img = torch.arange(n).repeat_interleave(k)
            cls = torch.arange(k).repeat(n)
            return img, cls
        lab = labels
        if lab.ndim == 1 and not lab.is_floating_point():  # multiclass: the true class
            if lab.numel() != n:
                raise DataError(f"channel_relevance: {lab.numel()} labels for {n} images.")
            return torch.arange(n), lab.long()
        if lab.ndim != 2 or lab.shape != (n, k):
            raise DataError(f"channel_relevance: labels of shape {tuple(lab.shape)} do not fit "
                            f"{n} images x {k} classes.")
        pos = torch.nan_to_num(lab.float(), nan=0.0) > 0.5
        img, cls = pos.nonzero(as_tuple=True)
        if img.numel() == 0:
            raise DataError("channel_relevance: no image has a positive label; pass targets "
                            "explicitly (e.g. targets=list(range(num_classes))).")
        return img, cls
    if isinstance(targets, bool):
        raise ConfigError(f"The 'targets' parameter of {owner} must be an int, a list of ints or "
                          f"None. Got {targets!r} instead.")
    tl = [targets] if isinstance(targets, int) else list(targets)
    if not tl:
        raise ConfigError(f"The 'targets' parameter of {owner} must not be empty.")
    for t in tl:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < k:
            raise ConfigError(f"The 'targets' parameter of {owner} must hold class indices in "
                              f"[0, {k - 1}]. Got {t!r} instead.")
    tt = torch.tensor([int(t) for t in tl])
    return torch.arange(n).repeat_interleave(len(tl)), tt.repeat(n)


def default_layers(model: nn.Module) -> list[str]:
    """Names of every Conv2d and BatchNorm layer (in module order)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, *_BN))]


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """``[B, C, ...] -> [B, C]`` (sum over every dimension after the channel)."""
    return t.flatten(2).sum(2) if t.ndim > 2 else t


# ----------------------------------------------------------------------------- per-method passes
class _Capture:
    """Forward hooks that keep the outputs of named layers (graph-attached)."""

    def __init__(self, model: nn.Module, layers: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        mods = dict(model.named_modules())
        for name in layers:
            self.handles.append(mods[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def fn(_m, _i, out):
            if isinstance(out, torch.Tensor):
                self.out[name] = out
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _grads(out: torch.Tensor, cls: torch.Tensor, acts: dict[str, torch.Tensor]
           ) -> dict[str, torch.Tensor]:
    names = [n for n, a in acts.items() if a.requires_grad]
    uniq: dict[int, torch.Tensor] = {}
    for n in names:
        uniq.setdefault(id(acts[n]), acts[n])
    sel = out.gather(1, cls.view(-1, 1)).sum()
    grads = torch.autograd.grad(sel, list(uniq.values()), allow_unused=True)
    by_id = dict(zip(uniq.keys(), grads))
    res = {}
    for n, a in acts.items():
        g = by_id.get(id(a)) if a.requires_grad else None
        res[n] = torch.zeros_like(a) if g is None else g
    return res


def _taylor_chunk(work: nn.Module, x: torch.Tensor, cls: torch.Tensor, layers: list[str]
                  ) -> dict[str, torch.Tensor]:
    cap = _Capture(work, layers)
    try:
        with torch.enable_grad():
            out = work(x.detach().clone().requires_grad_(True))
            g = _grads(out, cls, cap.out)
    finally:
        cap.remove()
    return {n: _channel_sum(cap.out[n].detach() * g[n]) for n in layers if n in cap.out}


def _conductance_chunk(work: nn.Module, x: torch.Tensor, cls: torch.Tensor, layers: list[str],
                       baseline: torch.Tensor, n_steps: int) -> dict[str, torch.Tensor]:
    """Layer conductance of every layer for a chunk of pairs (trapezoidal rule)."""
    b = x.shape[0]
    alphas = torch.linspace(0.0, 1.0, n_steps + 1, dtype=x.dtype)
    path = baseline.unsqueeze(0) + alphas.view(-1, 1, 1, 1, 1) * (x - baseline).unsqueeze(0)
    path = path.reshape(-1, *x.shape[1:])  # [(S+1)*B, C, H, W], step-major
    cls_rep = cls.repeat(n_steps + 1)
    cap = _Capture(work, layers)
    try:
        with torch.enable_grad():
            out = work(path.detach().clone().requires_grad_(True))
            g = _grads(out, cls_rep, cap.out)
    finally:
        cap.remove()
    res = {}
    for n in layers:
        if n not in cap.out:
            continue
        a = cap.out[n].detach().reshape(n_steps + 1, b, *cap.out[n].shape[1:])
        gg = g[n].reshape(n_steps + 1, b, *g[n].shape[1:])
        cond = (0.5 * (gg[1:] + gg[:-1]) * (a[1:] - a[:-1])).sum(0)
        res[n] = _channel_sum(cond)
    return res


# ----------------------------------------------------------------------------- public API
def channel_relevance(model: nn.Module, inputs: Any, targets: int | list[int] | None = None,
                      method: str = "lrp", layers: list[str] | None = None,
                      batch_size: int = 16, progress: bool | None = None, *,
                      labels: Any = None, aggregate: str = "abs", normalize: str | None = "sum",
                      composite: str = "epsilon_plus_flat", epsilon: float = 1e-6,
                      zero_bias: bool = False, bn_rule: str = "pass", n_steps: int = 16,
                      baseline: Any = None) -> ChannelRelevance:
    """Relevance of every output channel of every Conv2d / BN layer, over images and targets.

    Args:
        model: the classifier (left unchanged).
        inputs: calibration images ``[N, C, H, W]`` (normalised) or a Dataset of
            ``(image, label)``.
        targets: a class index, a list of class indices (each applied to every image), or
            ``None``: each image's positive classes when labels are known (``labels`` or the
            dataset's; multi-class: the true class), otherwise all classes.
        method: ``"lrp"``, ``"ig"`` (layer conductance), ``"taylor"`` or ``"backtrace"``
            (DL-Backtrace).
        layers: qualified layer names; default every Conv2d and BatchNorm layer.
        batch_size: (image, class) pairs per pass (``"ig"``: path points per pass, so
            ``batch_size // (n_steps + 1)`` pairs, at least 1).
        progress: progress bar (``None``: on unless ``MEDSCALPEL_PROGRESS=0``).
        labels: labels ``[N, K]`` (multi-label, NaN = unknown) or ``[N]`` (multi-class).
        aggregate: ``"abs"`` (sum of |channel relevance| over pairs) or ``"signed"``.
        normalize: ``"sum"`` (per layer, absolute scores sum to 1), ``"max"``, ``"mean"`` or
            ``None``.
        composite, epsilon, zero_bias, bn_rule: LRP settings (see :func:`~medscalpel.explain.lrp.lrp`);
            ``"backtrace"`` uses ``zero_bias`` and ``bn_rule`` (``"pass"`` or ``"fold"``, see
            :func:`~medscalpel.explain.backtrace.backtrace`).
        n_steps: integration steps for ``"ig"``.
        baseline: IG baseline (``None``: zeros of the normalised input, or a tensor ``[C, H, W]``).

    Returns:
        :class:`ChannelRelevance`.
    """
    _check_settings(method, aggregate, normalize, batch_size, n_steps)
    x, lab = _collect_inputs(inputs, labels)
    k = num_classes_of(model, x)
    img, cls = _pairs(targets, lab, x.shape[0], k)
    layers = _resolve_layers(model, layers)
    raw = {n: torch.zeros(w, dtype=torch.float64) for n, w in _widths(model, layers).items()}
    settings: dict[str, Any] = {"layers": len(layers)}
    if method == "ig":
        per_chunk = max(1, batch_size // (n_steps + 1))
        settings.update({"n_steps": n_steps, "baseline": "zeros" if baseline is None else "tensor",
                         "rule": "trapezoidal layer conductance"})
    else:
        per_chunk = batch_size
    chunks = [(s, min(s + per_chunk, img.numel())) for s in range(0, img.numel(), per_chunk)]

    def accumulate(scores: dict[str, torch.Tensor]) -> None:
        _accumulate(raw, scores, aggregate)

    # (images, classes) of one chunk at a time, as the progress bar advances
    steps = ((x[img[s:e]], cls[s:e])
             for s, e in track(chunks, f"channel relevance ({method})", progress=progress))
    if method == "lrp":
        settings.update(_lrp_pass(model, x, steps, layers, accumulate, composite, epsilon,
                                  zero_bias, bn_rule))
    elif method == "backtrace":
        settings.update(_backtrace_pass(model, steps, layers, accumulate, zero_bias, bn_rule))
    else:
        _gradient_pass(model, x, steps, layers, accumulate, method, baseline, n_steps)
    counts = {int(c): int((cls == c).sum()) for c in torch.unique(cls)}
    return ChannelRelevance(scores=_normalised(raw, normalize),
                            raw_scores={n: v.float() for n, v in raw.items()},
                            method=method, aggregate=aggregate, normalize=normalize,
                            n_images=int(torch.unique(img).numel()), n_pairs=int(img.numel()),
                            class_counts=counts, settings=settings)


# ----------------------------------------------------------------------------- relevance steps
def _check_settings(method: str, aggregate: str, normalize: str | None, batch_size: int,
                    n_steps: int) -> None:
    owner = "channel_relevance"
    check_in(method, "method", owner, METHODS)
    check_in(aggregate, "aggregate", owner, ["abs", "signed"])
    check_in(normalize, "normalize", owner, ["sum", "max", "mean", None])
    check_range(batch_size, "batch_size", owner, 1, integer=True)
    check_range(n_steps, "n_steps", owner, 1, integer=True)


def _resolve_layers(model: nn.Module, layers: list[str] | None) -> list[str]:
    """The layers to score: ``layers`` (each must exist) or every Conv2d / BatchNorm layer."""
    all_names = dict(model.named_modules())
    if layers is None:
        layers = default_layers(model)
    else:
        layers = list(layers)
        missing = [n for n in layers if n not in all_names]
        if missing:
            raise ModelError(f"channel_relevance: layer(s) {', '.join(repr(m) for m in missing[:4])} "
                             f"not found in the model. Examples of valid names: "
                             f"{', '.join(default_layers(model)[:4])}.")
    if not layers:
        raise ModelError("channel_relevance: the model has no Conv2d / BatchNorm layer to score; "
                         "name the layers explicitly.")
    return layers


def _widths(model: nn.Module, layers: list[str]) -> dict[str, int]:
    """Output channels of each layer (Conv2d ``out_channels``, BN ``num_features``, ...)."""
    all_names = dict(model.named_modules())
    widths = {}
    for n in layers:
        m = all_names[n]
        widths[n] = int(getattr(m, "out_channels", 0) or getattr(m, "num_features", 0)
                        or getattr(m, "out_features", 0))
    return widths


def _accumulate(raw: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                aggregate: str) -> None:
    """Add one chunk's ``[B, C]`` channel scores to ``raw`` (|.| or signed, summed over B)."""
    for n, v in scores.items():
        v = v.double()
        if v.shape[1] != raw[n].numel():
            raise ModelError(f"channel_relevance: layer '{n}' produced {v.shape[1]} channels, "
                             f"expected {raw[n].numel()}.")
        raw[n] += (v.abs() if aggregate == "abs" else v).sum(0)


def _lrp_pass(model: nn.Module, x: torch.Tensor, steps, layers: list[str], accumulate,
              composite: str, epsilon: float, zero_bias: bool, bn_rule: str) -> dict[str, Any]:
    """LRP relevance of every chunk's captured layers; returns the session's settings."""
    low = float(x.min()) if composite == "epsilon_gamma_box" else None
    high = float(x.max()) if composite == "epsilon_gamma_box" else None
    session = LRPSession(model, composite=composite, epsilon=epsilon, zero_bias=zero_bias,
                         bn_rule=bn_rule, low=low, high=high)
    with session:
        for xb, cb in steps:
            _, _, cap = session.relevance(xb, cb, capture=layers)
            accumulate({n: _channel_sum(r) for n, r in cap.items()})
    return {**session.settings, "canonizer_max_abs_diff": session.max_canonizer_diff}


def _backtrace_pass(model: nn.Module, steps, layers: list[str], accumulate, zero_bias: bool,
                    bn_rule: str) -> dict[str, Any]:
    """DL-Backtrace relevance of every chunk's captured layers; returns the settings."""
    bt = BacktraceSession(model, zero_bias=zero_bias, bn_rule=bn_rule)
    with bt:
        for xb, cb in steps:
            _, _, cap = bt.relevance(xb, cb, capture=layers)
            accumulate({n: _channel_sum(r) for n, r in cap.items()})
    return {**bt.settings, "canonizer_max_abs_diff": bt.max_canonizer_diff}


def _gradient_pass(model: nn.Module, x: torch.Tensor, steps, layers: list[str], accumulate,
                   method: str, baseline: Any, n_steps: int) -> None:
    """Taylor (activation x gradient) or layer conductance (``"ig"``) on a prepared copy."""
    work = prepare_model_copy(model)
    base = None
    if method == "ig":
        base = torch.zeros_like(x[0]) if baseline is None else torch.as_tensor(
            baseline, dtype=x.dtype).expand_as(x[0])
    for xb, cb in steps:
        if method == "taylor":
            accumulate(_taylor_chunk(work, xb, cb, layers))
        else:
            accumulate(_conductance_chunk(work, xb, cb, layers, base, n_steps))


def _normalised(raw: dict[str, torch.Tensor], normalize: str | None) -> dict[str, torch.Tensor]:
    """Per-layer float scores: raw, or divided by the sum / max / mean of their magnitudes
    (all zeros when that is 0)."""
    scores = {}
    for n, v in raw.items():
        v = v.float()
        if normalize is None:
            scores[n] = v.clone()
            continue
        mag = v.abs()
        denom = {"sum": mag.sum(), "max": mag.max(), "mean": mag.mean()}[normalize]
        scores[n] = v / denom if float(denom) > 0 else torch.zeros_like(v)
    return scores
