"""Weighted metric kernels: AUROC, AP, sensitivity and specificity under image weights.

A bootstrap replicate is a vector of multinomial image counts, so a block of replicates is a
weight matrix ``w`` ``[B, n]`` and every kernel returns ``[B]`` values at once. AUROC and AP are
computed from per-tie-group weight sums in score order; with unit weights (``w = ones((1, n))``)
they equal :func:`medscalpel.engine.metrics.auroc` / ``average_precision`` (scikit-learn's
definitions, ties grouped). :func:`medscalpel.engine.compare.compare_predictions` and the
change audits (:mod:`medscalpel.audit.changes`) resample with them.

Example:
    >>> import numpy as np
    >>> y = np.array([1, 0, 1, 0])
    >>> float(weighted_auroc(y, np.array([0.9, 0.1, 0.4, 0.6]), np.ones((1, 4)))[0])
    0.75
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: the metrics :func:`class_metrics` computes (and :mod:`medscalpel.engine.compare` compares)
METRICS = ("auroc", "ap", "sens", "spec")


def _groups(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending order of ``s`` and the start index of each run of tied scores in that order."""
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ss)) + 1]
    return order, starts


def weighted_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of scores ``s`` for labels ``y`` under image weights ``w`` ``[B, n]`` -> ``[B]``.

    Ties count 1/2 (the Mann-Whitney statistic with weights); NaN where a replicate has no
    positive or no negative weight.
    """
    y = np.asarray(y, bool)
    order, starts = _groups(np.asarray(s, np.float64))
    wo = np.asarray(w, np.float64)[:, order]
    yo = y[order]
    pos = np.add.reduceat(np.where(yo, wo, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(yo, 0.0, wo), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    tot_p, tot_n = pos.sum(1), neg.sum(1)
    num = (pos * (neg_below + 0.5 * neg)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / (tot_p * tot_n)
    out[(tot_p == 0) | (tot_n == 0)] = np.nan
    return out


def weighted_ap(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (scikit-learn's step-wise definition, ties grouped) under weights."""
    y = np.asarray(y, bool)
    order, starts = _groups(-np.asarray(s, np.float64))  # descending scores
    wo = np.asarray(w, np.float64)[:, order]
    yo = y[order]
    pos = np.add.reduceat(np.where(yo, wo, 0.0), starts, axis=1)
    allw = np.add.reduceat(wo, starts, axis=1)
    tp, n_at = np.cumsum(pos, axis=1), np.cumsum(allw, axis=1)
    tot_p = pos.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(n_at > 0, tp / n_at, 0.0)
        out = (pos * precision).sum(1) / tot_p
    out[tot_p == 0] = np.nan
    return out


def _rate(hit: np.ndarray, mask: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted share of ``hit`` among rows in ``mask``; NaN when ``mask`` has no weight."""
    den = w @ mask.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (w @ (hit & mask).astype(np.float64)) / den
    out[den == 0] = np.nan
    return out


def class_metrics(y: np.ndarray, s: np.ndarray, decided: np.ndarray, w: np.ndarray,
                  metrics: Sequence[str] = METRICS) -> dict[str, np.ndarray]:
    """The ``metrics`` of one class (labels ``y``, scores ``s``, decisions ``decided``) under
    each row of weights ``w`` ``[B, n]`` -> ``{metric: [B]}``."""
    fns = {"auroc": lambda: weighted_auroc(y, s, w), "ap": lambda: weighted_ap(y, s, w),
           "sens": lambda: _rate(decided, y, w), "spec": lambda: _rate(~decided, ~y, w)}
    return {m: fns[m]() for m in metrics}
