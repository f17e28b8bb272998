"""Label relations of class pairs: the training labels' Jaccard index and its categories, and
the co-occurrence evidence categories.

:func:`jaccard_matrix` and seed 000's categories (:func:`classify_jaccard`: perfect,
legitimate, mixed, conflict, undefined; kept for comparison with the seed paper only), and
:func:`evidence_matrix`: each class pair's
:mod:`~medscalpel.data.cooccurrence` verdict (exclusive, not_exclusive, insufficient).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from medscalpel.data.cooccurrence import CooccurrenceEvidence
from medscalpel.errors import DataError

#: seed 000's Jaccard categories (for comparison with the seed paper only)
CATEGORIES = ("perfect", "legitimate", "mixed", "conflict", "undefined")


def multihot(labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """``[N, K]`` float labels (NaN = unknown) from multi-hot or multi-class int ``[N]`` labels."""
    y = np.asarray(labels)
    if y.ndim == 1:
        if num_classes is None:
            num_classes = int(y.max()) + 1 if y.size else 0
        out = np.zeros((len(y), num_classes), np.float64)
        out[np.arange(len(y)), y.astype(np.int64)] = 1.0
        return out
    if y.ndim != 2:
        raise DataError(f"Labels must be [N, K] multi-hot or [N] class indices; got {y.shape}.")
    y = y.astype(np.float64)
    bad = ~np.isnan(y) & (y != 0) & (y != 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"Labels must be 0/1 (NaN = unknown); row {r}, column {c} holds "
                        f"{float(y[r, c]):g}. Binarise uncertain labels first.")
    return y


def jaccard_matrix(labels: np.ndarray) -> np.ndarray:
    """Pairwise Jaccard index ``|a & b| / |a | b|`` of the label columns, ``[K, K]``.

    Rows where either label is unknown (NaN) are left out of that pair. Pairs whose union is
    empty (neither label ever positive) get NaN.
    """
    y = multihot(labels)
    known = (~np.isnan(y)).astype(np.float64)
    a = np.nan_to_num(y, nan=0.0)
    inter = a.T @ a
    s = a.T @ known                      # s[i, j] = #(y_i = 1 and y_j known)
    union = s + s.T - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.where(union > 0, inter / np.where(union > 0, union, 1.0), np.nan)
    np.fill_diagonal(j, np.where(np.diag(union) > 0, 1.0, np.nan))
    return j


def classify_jaccard(j: float | np.ndarray, bounds: tuple[float, float] = (0.1, 0.3)) -> np.ndarray:
    """Seed 000's categories: perfect J = 0, legitimate 0 < J < b0, mixed b0 <= J < b1,
    conflict J >= b1; NaN (neither label ever positive) -> 'undefined'.

    For comparison with the seed paper only: these categories are no evidence of mutual
    exclusivity (see :func:`evidence_matrix`)."""
    j = np.asarray(j, dtype=np.float64)
    lo, hi = bounds
    out = np.full(j.shape, "undefined", dtype=object)
    ok = ~np.isnan(j)
    out[ok & (j <= 0)] = "perfect"
    out[ok & (j > 0) & (j < lo)] = "legitimate"
    out[ok & (j >= lo) & (j < hi)] = "mixed"
    out[ok & (j >= hi)] = "conflict"
    return out


def _count(cats: np.ndarray) -> dict[str, int]:
    return {c: int(np.sum(cats == c)) for c in CATEGORIES}


def evidence_matrix(evidence: CooccurrenceEvidence) -> np.ndarray:
    """``[K, K]`` object array of each class pair's evidence category (``exclusive``,
    ``not_exclusive``, ``insufficient``; the diagonal ``insufficient``), in the evidence's class
    order."""
    k = len(evidence.class_names)
    out = np.full((k, k), "insufficient", dtype=object)
    idx = {c: i for i, c in enumerate(evidence.class_names)}
    for p in evidence.pairs:
        out[idx[p.a], idx[p.b]] = out[idx[p.b], idx[p.a]] = p.verdict
    return out


def _fractions(counts: Mapping[str, float]) -> dict[str, float]:
    tot = sum(counts[c] for c in CATEGORIES if c != "undefined")
    return {c: (counts[c] / tot if tot else float("nan")) for c in CATEGORIES if c != "undefined"}



__all__ = ["CATEGORIES", "classify_jaccard", "evidence_matrix", "jaccard_matrix", "multihot"]
