"""Exact optimal cut points: the confusion counts at every distinct score (:class:`CutTable`,
one sort and cumulative sums), the registered threshold objectives (:data:`THRESHOLD_METHODS`:
Youden's J, F1, a target sensitivity) and the best cut of one class (:func:`best_cut`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from medscalpel.registry import Registry

#: objective(tp, fp, fn, tn, npos, nneg, **params) -> score per cut (higher is better), or a
#: boolean feasibility mask for constraint methods (see :func:`_choose`).
THRESHOLD_METHODS: Registry[Callable[..., np.ndarray]] = Registry("threshold method")


@dataclass(frozen=True)
class CutTable:
    """Confusion counts at every distinct score, from the highest cut down.

    ``cuts[i]`` is a distinct score; predicting ``score >= cuts[i]`` gives ``tp[i]``, ``fp[i]``.
    Row 0 is the empty prediction (cut ``+inf``: nothing positive).
    """

    cuts: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    npos: int
    nneg: int

    @property
    def fn(self) -> np.ndarray:
        return self.npos - self.tp

    @property
    def tn(self) -> np.ndarray:
        return self.nneg - self.fp

    @property
    def sensitivity(self) -> np.ndarray:
        return self.tp / max(self.npos, 1)

    @property
    def specificity(self) -> np.ndarray:
        return self.tn / max(self.nneg, 1)


def cut_table(y: np.ndarray, s: np.ndarray) -> CutTable:
    """Confusion counts for every distinct cut point of ``s`` (labels ``y`` in {0, 1})."""
    y = np.asarray(y, bool)
    s = np.asarray(s, np.float64)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    last = (np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1] if s.size
            else np.zeros(0, int))
    return CutTable(cuts=np.r_[np.inf, s_sorted[last]], tp=np.r_[0, tp[last]].astype(np.int64),
                    fp=np.r_[0, fp[last]].astype(np.int64), npos=int(y.sum()),
                    nneg=int((~y).sum()))


@THRESHOLD_METHODS.register("youden", help="maximise sensitivity + specificity - 1")
def _youden(t: CutTable, **_: Any) -> np.ndarray:
    return t.tp / max(t.npos, 1) - t.fp / max(t.nneg, 1)


@THRESHOLD_METHODS.register("f1", help="maximise F1 = 2TP / (2TP + FP + FN)")
def _f1(t: CutTable, **_: Any) -> np.ndarray:
    den = 2 * t.tp + t.fp + t.fn
    return np.where(den > 0, 2 * t.tp / np.maximum(den, 1), 0.0)


@THRESHOLD_METHODS.register("sensitivity",
                            help="highest threshold with sensitivity >= target_sensitivity")
def _sensitivity(t: CutTable, target_sensitivity: float = 0.9, **_: Any) -> np.ndarray:
    sens = t.tp / max(t.npos, 1)
    # feasible cuts score by their height: the first feasible (highest) cut wins
    return np.where(sens >= target_sensitivity - 1e-12, -np.arange(t.cuts.size, dtype=float),
                    -np.inf)


def best_cut(y: np.ndarray, s: np.ndarray, method: str = "youden",
             target_sensitivity: float = 0.9) -> tuple[float, float]:
    """Exact optimal threshold of one class: ``(threshold, objective at it)``.

    Ties go to the higher cut. The threshold is the midpoint between the chosen cut score and the
    next lower distinct score (the same decisions on ``s``); above the top score when the best is
    to predict nothing positive; below the lowest when everything should be positive.
    """
    fn = THRESHOLD_METHODS.get(method)
    t = cut_table(y, s)
    obj = fn(t, target_sensitivity=target_sensitivity)
    i = int(np.argmax(obj))  # first maximum = highest cut
    value = float(t.tp[i] / max(t.npos, 1)) if method == "sensitivity" else float(obj[i])
    cuts = t.cuts
    if cuts.size == 1:  # no scores at all
        return 0.5, value
    if i == 0:  # predict nothing positive: go above the top score
        top = cuts[1]
        thr = 0.5 * (top + 1.0) if top < 1.0 else float(np.nextafter(top, np.inf))
    elif i + 1 < cuts.size:
        thr = 0.5 * (cuts[i] + cuts[i + 1])
    else:  # everything positive: go below the lowest score
        thr = 0.5 * cuts[i] if cuts[i] > 0 else float(cuts[i])
    return float(thr), value
