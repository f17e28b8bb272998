"""Faithfulness of saliency maps: deletion / insertion AUC and ROAD (remove and debias),
measured on a scale that does not depend on the model's confidence.

Deletion replaces a map's top pixels by the mean image (0 in normalised units) step by step;
insertion puts them back into a blurred image (Petsiuk et al. 2018, RISE). ROAD (Rong et al.
2022) removes pixels by noisy linear imputation, so the removal's shape does not itself leak
class information, and scores ``s(least relevant removed) - s(most relevant removed)`` averaged
over removal fractions (higher = more faithful).

What is integrated (``measure="normalised"``, the default). The RISE curves integrate the raw
class probability, so they measure confidence as much as faithfulness: the same pixel order on a
copy of a model whose logits are multiplied by 0.3 scores a LOWER deletion ("more faithful") and
a lower insertion. Here each image's curve is instead taken on the class's log-odds ``s`` (the
logit for sigmoid outputs; the margin ``z_t - max_{j != t} z_j`` for softmax outputs, which is
the log-odds for two classes) and min-max normalised per image over its own span:

    deletion / insertion:  c_k = (s_k - min_j s_j) / (max_j s_j - min_j s_j)   in [0, 1]
    ROAD:                  mean_f [s(LeRF_f) - s(MoRF_f)] / span of the deletion curve

so a score says where, within its own range, the image's evidence curve spends the removal
(deletion 0: it falls to its lowest at the first step; 1: it stays at its highest to the end).
Per-input normalisation is what Edin et al. (2025, "Normalized AOPC: fixing misleading
faithfulness metrics") show cross-model comparisons need; they normalise by the best and worst
achievable curves, found by search, which costs many more forward passes, so this module uses the
curve's observed span instead (our choice, not theirs). It is EXACTLY invariant to a positive
scale and a shift of the class logit (temperature, ``a * z + b``), which ``curve / p_clean``
would not be (the sigmoid is not linear), and it stays bounded where the clean and the fully
perturbed image give nearly the same output (dividing by that difference instead, tried first,
is unbounded there: a few such images dominated the mean and its CI). An image whose span is at most ``FLAT`` times the
median span of the images carries no evidence to order and scores NaN (counted by the caller).
``measure="probability"``: the raw RISE probability AUCs (ROAD: the raw probability
difference), kept for comparison only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from scipy.sparse.linalg import spsolve
from torch import nn

from medscalpel.audit.changes._util import logits_of
from medscalpel.validation import check_in

ROAD_FRACTIONS = (0.1, 0.3, 0.5)
MEASURES = ("normalised", "probability")
#: an image whose log-odds curve spans at most this share of the median span over the images
#: is "flat" (no evidence to order): NaN
FLAT = 1e-3


def top_mask(maps: np.ndarray, frac: float) -> np.ndarray:
    """Boolean masks of the top ``frac`` pixels of each map (``[..., H, W]``); ties go to the
    lower pixel index (a stable sort, as the deletion order), not to an arbitrary one."""
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1])
    k = max(1, int(round(frac * flat.shape[1])))
    idx = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    m = np.zeros(flat.shape, bool)
    np.put_along_axis(m, idx, True, axis=1)
    return m.reshape(maps.shape)


def target_score(logits: np.ndarray, target: np.ndarray, multiclass: bool,
                 measure: str = "normalised") -> np.ndarray:
    """Per image the explained class's score from logits ``[N, K]``: its log-odds
    (``measure="normalised"``: the logit for sigmoid outputs, the margin over the best other
    class for softmax outputs) or its probability (``measure="probability"``), float64.

    >>> z = np.array([[2.0, 0.5, -1.0]])
    >>> target_score(z, np.array([0]), True).tolist()     # softmax: 2.0 - 0.5
    [1.5]
    >>> target_score(z, np.array([1]), False).tolist()    # sigmoid: the logit
    [0.5]
    """
    z = np.asarray(logits, np.float64)
    rows = np.arange(len(target))
    t = np.asarray(target, np.int64)
    if measure == "probability":
        zt = torch.from_numpy(z)
        p = torch.softmax(zt, 1) if multiclass else torch.sigmoid(zt)
        return p.numpy()[rows, t]
    if not multiclass:
        return z[rows, t]
    other = z.copy()
    other[rows, t] = -np.inf
    return z[rows, t] - other.max(1)


def _score(model: nn.Module, x: torch.Tensor, target: np.ndarray, multiclass: bool,
           batch_size: int, measure: str) -> np.ndarray:
    return target_score(logits_of(model, x, batch_size), target, multiclass, measure)


def normalise_curve(curve: np.ndarray) -> np.ndarray:
    """Each row of ``curve`` ``[N, S]`` min-max scaled to its own span, NaN where the span is
    flat (:func:`flat_images`)."""
    c = np.asarray(curve, np.float64)
    lo, hi = c.min(1, keepdims=True), c.max(1, keepdims=True)
    span = (hi - lo)[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (c - lo) / (hi - lo)
    out[flat_images(span)] = np.nan
    return out


def flat_images(spans: np.ndarray) -> np.ndarray:
    """Images whose score span is too small to order: ``span <= FLAT * median span`` (free of
    the logit scale) or exactly 0."""
    r = np.abs(np.asarray(spans, np.float64))
    ok = np.isfinite(r)
    med = float(np.median(r[ok])) if ok.any() else 0.0
    return ~ok | (r <= FLAT * med) | (r == 0)


def _blurred(x: torch.Tensor) -> torch.Tensor:
    k = max(3, int(x.shape[-1] // 8) | 1)
    return F.avg_pool2d(F.pad(x, [k // 2] * 4, mode="replicate"), k, stride=1)


def deletion_insertion(model: nn.Module, images: torch.Tensor, maps: np.ndarray,
                       target: np.ndarray, *, steps: int = 8, multiclass: bool = False,
                       batch_size: int = 64, clean_logits: np.ndarray | None = None,
                       measure: str = "normalised", return_curves: bool = False):
    """Per-image deletion and insertion AUC (trapezoid over the removed / inserted fraction
    0, 1/steps, ..., 1); the pixels in order of ``maps`` (ties: lower index first).

    ``measure="normalised"`` (default): the class log-odds curve min-max normalised per image
    over its own span (module docstring; NaN for a flat image); ``"probability"``: the raw
    class probability (RISE). ``clean_logits``: the model's logits on ``images`` if known (the
    unmodified image is step 0 of deletion and the last step of insertion; reused, not
    recomputed). ``return_curves``: also the two raw ``[N, steps + 1]``
    score curves (log-odds or probability, before any normalisation; deletion's span gives
    :func:`road_scores` its ``ranges``).
    """
    check_in(measure, "measure", "deletion_insertion", MEASURES)
    n, hw = maps.shape[0], maps.shape[1] * maps.shape[2]
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(hw)[None].repeat(n, 0), axis=1)
    rank_t = torch.from_numpy(rank.reshape(n, 1, *maps.shape[1:]))
    base_del = torch.zeros_like(images)          # the mean image in normalised units
    base_ins = _blurred(images)
    fr = np.linspace(0, 1, steps + 1)
    dele, ins = [], []
    clean = None
    if clean_logits is not None:
        clean = target_score(clean_logits, target, multiclass, measure)
    for i, f in enumerate(fr):
        top = rank_t < int(round(f * hw))
        if clean is not None and i == 0:
            dele.append(clean)
        else:
            dele.append(_score(model, torch.where(top, base_del, images), target, multiclass,
                               batch_size, measure))
        if clean is not None and i == len(fr) - 1:
            ins.append(clean)
        else:
            ins.append(_score(model, torch.where(top, images, base_ins), target, multiclass,
                              batch_size, measure))
    raw_d, raw_i = np.stack(dele, 1), np.stack(ins, 1)
    d, s = raw_d, raw_i
    if measure == "normalised":
        d, s = normalise_curve(raw_d), normalise_curve(raw_i)
    aucs = np.trapezoid(d, fr, axis=1), np.trapezoid(s, fr, axis=1)
    return (*aucs, raw_d, raw_i) if return_curves else aucs


def impute_linear(img: np.ndarray, removed: np.ndarray, noise: float,
                  rng: np.random.Generator) -> np.ndarray:
    """ROAD's noisy linear imputation of one ``[H, W]`` image: every removed pixel becomes the
    weighted mean of its 8 neighbours (1/6 direct, 1/12 diagonal; solved jointly as a sparse
    system), plus gaussian noise of std ``noise``."""
    h, w = img.shape
    idx = -np.ones((h, w), np.int64)
    ys, xs = np.nonzero(removed)
    m = len(ys)
    if m == 0:
        return img.copy()
    idx[ys, xs] = np.arange(m)
    rows, cols, vals = [np.arange(m)], [np.arange(m)], []
    diag = np.zeros(m)
    rhs = np.zeros(m)
    for dy, dx, wt in ((-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
                       (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)):
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        diag[ok] += wt
        nyo, nxo = ny[ok], nx[ok]
        j = idx[nyo, nxo]
        unk = j >= 0
        src = np.flatnonzero(ok)
        rows.append(src[unk])
        cols.append(j[unk])
        vals.append(np.full(int(unk.sum()), -wt))
        np.add.at(rhs, src[~unk], wt * img[nyo[~unk], nxo[~unk]])
    diag = np.maximum(diag, 1e-12)
    a = sparse.csr_matrix((np.concatenate([diag, *vals]),
                           (np.concatenate(rows), np.concatenate(cols))), shape=(m, m))
    sol = spsolve(a, rhs) if m > 1 else rhs / diag
    out = img.copy()
    out[ys, xs] = np.asarray(sol).reshape(-1) + rng.normal(0, noise, m)
    return out


def road_scores(model: nn.Module, images: torch.Tensor, maps: np.ndarray, target: np.ndarray,
                *, fractions: Sequence[float] = ROAD_FRACTIONS, multiclass: bool = False,
                noise: float = 0.05, seed: int = 0, batch_size: int = 64,
                measure: str = "normalised", ranges: np.ndarray | None = None) -> np.ndarray:
    """Per-image ROAD score: mean over ``fractions`` of s(least relevant removed) - s(most
    relevant removed), pixels removed by :func:`impute_linear` in every input channel (higher =
    more faithful).

    ``measure="normalised"`` (default): ``s`` is the class log-odds and the mean is divided by
    the image's ``ranges`` (the span of its deletion curve, from :func:`deletion_insertion`'s
    ``return_curves``; when None, ``|s(clean) - s(mean image)|`` from two forward passes), NaN
    for a flat image; ``"probability"``: the raw probability difference.
    """
    check_in(measure, "measure", "road_scores", MEASURES)
    rng = np.random.default_rng(seed)
    n, c = maps.shape[0], int(images.shape[1])
    arr = images.numpy().astype(np.float64)
    out = np.zeros(n)
    for f in fractions:
        most = top_mask(maps, f)
        least = top_mask(-maps, f)
        batch = {}
        for key, rem in (("morf", most), ("lerf", least)):
            imp = np.stack([np.stack([impute_linear(arr[i, k], rem[i], noise, rng)
                                      for k in range(c)]) for i in range(n)])
            x = torch.from_numpy(imp.astype(np.float32))
            batch[key] = _score(model, x.contiguous(), target, multiclass, batch_size, measure)
        out += batch["lerf"] - batch["morf"]
    out /= len(fractions)
    if measure == "probability":
        return out
    if ranges is None:
        ranges = (_score(model, images, target, multiclass, batch_size, measure)
                  - _score(model, torch.zeros_like(images), target, multiclass, batch_size,
                           measure))
    ranges = np.abs(np.asarray(ranges, np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = out / ranges
    out[flat_images(ranges)] = np.nan
    return out
