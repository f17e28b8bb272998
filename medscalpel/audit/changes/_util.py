"""Shared pieces of the what-compression-changed audit: bootstrap weights, intervals, p-values,
batched logits. Paired deltas of AUROC / AP / sensitivity / specificity come from
:func:`medscalpel.engine.compare.compare_predictions`; the helpers here serve the statistics it
does not cover (ECE, Brier, differences of deltas, per-image explanation scores), always with the
same resampling: one multinomial image-count vector per replicate, applied to every model at once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

NAN = float("nan")


def boot_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` float64 multinomial image counts (one bootstrap replicate per row)."""
    rng = np.random.default_rng(seed)
    if n_boot <= 0 or n <= 0:
        return np.zeros((0, n))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def ci(reps: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of the finite replicates (NaN when fewer than 10)."""
    v = np.asarray(reps, np.float64)
    v = v[np.isfinite(v)]
    if v.size < 10:
        return (NAN, NAN)
    a = 1.0 - confidence
    lo, hi = np.quantile(v, [a / 2, 1 - a / 2])
    return (float(lo), float(hi))


def n_dropped(reps: np.ndarray) -> int:
    """Bootstrap replicates :func:`ci` leaves out (non-finite: the statistic was undefined on
    that resample, e.g. a subgroup or rare class drawn without a positive)."""
    return int((~np.isfinite(np.asarray(reps, np.float64))).sum())


def p_two_sided(reps: np.ndarray) -> float:
    """Bootstrap p-value of ``H0: statistic = 0``: twice the smaller tail share (with the +1
    correction), capped at 1; NaN with fewer than 10 finite replicates."""
    v = np.asarray(reps, np.float64)
    v = v[np.isfinite(v)]
    if v.size < 10:
        return NAN
    lo = (np.sum(v <= 0) + 1) / (v.size + 1)
    hi = (np.sum(v >= 0) + 1) / (v.size + 1)
    return float(min(1.0, 2 * min(lo, hi)))


def holm(p: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and is not counted)."""
    p = np.asarray(p, np.float64)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(p.shape, NAN)
    order = ok[np.argsort(p[ok], kind="mergesort")]
    m = len(order)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out.tolist()


def mean_with_ci(values: np.ndarray, w: np.ndarray, confidence: float) -> dict[str, Any]:
    """Mean of per-image ``values`` (NaN ignored) with the bootstrap CI under weights ``w``
    ``[B, n]`` and the bootstrap p-value of mean = 0 (meaningful for paired differences);
    ``dropped``: replicates that drew none of the scored images (undefined, left out)."""
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v)
    out: dict[str, Any] = {"mean": float(v[ok].mean()) if ok.any() else NAN, "n": int(ok.sum()),
                           "ci": [NAN, NAN], "p": NAN, "dropped": 0}
    if ok.sum() >= 2 and len(w):
        ww = w[:, ok]
        den = ww.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            reps = (ww @ v[ok]) / den
        out["ci"] = list(ci(reps, confidence))
        out["p"] = p_two_sided(reps)
        out["dropped"] = n_dropped(reps)
    return out


def num(v: Any) -> float:
    """JSON value -> float (None / null -> NaN)."""
    return NAN if v is None else float(v)


def ci_excludes_zero(interval: Sequence[float]) -> int:
    """+1 when the interval lies above 0, -1 when below, 0 otherwise (or undefined)."""
    lo, hi = (num(x) for x in interval)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0
    return 1 if lo > 0 else (-1 if hi < 0 else 0)


def fast_copy(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of ``model`` in channels-last memory format (faster convolutions
    on CPU) for the forward-only passes of the audit; the caller's model is not touched. A
    deployed runtime artifact (no parameters, ``supports_gradients`` False) is returned as is."""

    if not getattr(model, "supports_gradients", True):
        return model
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast.to(memory_format=torch.channels_last)


def logits_of(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Logits ``[N, K]`` of ``model`` on the tensor ``x`` in eval mode (mode restored), under
    :func:`torch.inference_mode`."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return _logits(model, x, batch_size)
    finally:
        for m, mode in modes:
            m.training = mode


@torch.inference_mode()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    first = next(model.parameters(), None)   # a deployed runtime artifact has none
    dev = first.device if first is not None else torch.device("cpu")
    out = [model(x[s:s + batch_size].to(dev)).float().cpu().numpy()
           for s in range(0, int(x.shape[0]), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
