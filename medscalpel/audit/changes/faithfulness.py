"""Faithfulness of saliency maps: deletion / insertion AUC and ROAD (remove and debias).

Deletion replaces a map's top pixels by the mean image (0 in normalised units) step by step;
insertion puts them back into a blurred image; each is the area under the class-probability
curve over the fraction moved (deletion lower = more faithful, insertion higher). ROAD
(Rong et al. 2022) removes pixels by noisy linear imputation, so the removal's shape does not
itself leak class information, and scores ``p(least relevant removed) - p(most relevant
removed)`` averaged over removal fractions (higher = more faithful).
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

ROAD_FRACTIONS = (0.1, 0.3, 0.5)


def top_mask(maps: np.ndarray, frac: float) -> np.ndarray:
    """Boolean masks of the top ``frac`` pixels of each map (``[..., H, W]``)."""
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1])
    k = max(1, int(round(frac * flat.shape[1])))
    idx = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    m = np.zeros(flat.shape, bool)
    np.put_along_axis(m, idx, True, axis=1)
    return m.reshape(maps.shape)


def _prob(model: nn.Module, x: torch.Tensor, target: np.ndarray, multiclass: bool,
          batch_size: int) -> np.ndarray:
    z = torch.from_numpy(logits_of(model, x, batch_size))
    p = torch.softmax(z, 1) if multiclass else torch.sigmoid(z)
    return p[torch.arange(len(target)), torch.from_numpy(target)].numpy().astype(np.float64)


def _blurred(x: torch.Tensor) -> torch.Tensor:
    k = max(3, int(x.shape[-1] // 8) | 1)
    return F.avg_pool2d(F.pad(x, [k // 2] * 4, mode="replicate"), k, stride=1)


def deletion_insertion(model: nn.Module, images: torch.Tensor, maps: np.ndarray,
                       target: np.ndarray, *, steps: int = 8, multiclass: bool = False,
                       batch_size: int = 64, clean_logits: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-image deletion and insertion AUC (trapezoid over the removed / inserted fraction
    0, 1/steps, ..., 1) of the target's probability; the pixels in order of ``maps``.
    ``clean_logits``: the model's logits on ``images`` if known (the unmodified image is
    step 0 of deletion and the last step of insertion; reused, not recomputed)."""
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
        z = torch.from_numpy(np.asarray(clean_logits, np.float32))
        p = torch.softmax(z, 1) if multiclass else torch.sigmoid(z)
        clean = p[torch.arange(len(target)), torch.from_numpy(target)].numpy().astype(np.float64)
    for i, f in enumerate(fr):
        top = rank_t < int(round(f * hw))
        if clean is not None and i == 0:
            dele.append(clean)
        else:
            dele.append(_prob(model, torch.where(top, base_del, images), target, multiclass,
                              batch_size))
        if clean is not None and i == len(fr) - 1:
            ins.append(clean)
        else:
            ins.append(_prob(model, torch.where(top, images, base_ins), target, multiclass,
                             batch_size))
    return np.trapezoid(np.stack(dele, 1), fr, axis=1), np.trapezoid(np.stack(ins, 1), fr, axis=1)


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
                noise: float = 0.05, seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """Per-image ROAD score: mean over ``fractions`` of p(least relevant removed) - p(most
    relevant removed), pixels removed by :func:`impute_linear` in every input channel (higher =
    more faithful)."""
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
            batch[key] = _prob(model, x.contiguous(), target, multiclass, batch_size)
        out += batch["lerf"] - batch["morf"]
    return out / len(fractions)
