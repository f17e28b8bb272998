"""Forgettability curve distance (FCD) between classes, and what explains it.

PruneCXR (Holste et al., MICCAI 2023) compares the *forgettability curves* of two classes (median
relative change in AP over the compression levels, the reference level left out) by the
Euclidean distance between them; the poster calls it the MSE. Both are given here:
``euclidean = ||a - b||_2`` and ``mse = ||a - b||^2 / L`` (L compressed levels), so
``mse == euclidean**2 / L``. The pairwise FCD is then set against

* ``|delta log prevalence|``: classes whose prevalences differ more should be forgotten more
  differently (PruneCXR NIH: r = 0.71);
* co-occurrence IoU (the Jaccard index of the two labels, ``|A and B| / |A or B|`` over images
  where both labels are known): classes that co-occur more should be forgotten alike.

Pairs of classes are not independent observations (each class enters K-1 pairs), so besides the
Pearson / Spearman p-values a Mantel permutation p-value (classes permuted) is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial.distance import pdist, squareform

from medscalpel.audit.stats import Correlation, correlate, mantel
from medscalpel.errors import DataError


def fcd_matrices(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise Euclidean distance and MSE between the rows of ``curves`` ``[K, L]``.

    Rows with a NaN give NaN distances. Both matrices are symmetric with a zero diagonal.

    Example:
        >>> e, m = fcd_matrices(np.array([[0.0, -0.1], [0.0, -0.5]]))
        >>> round(float(e[0, 1]), 3), round(float(m[0, 1]), 3)
        (0.4, 0.08)
    """
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] == 0:
        raise DataError(f"fcd_matrices: curves must be [classes, levels] with at least one "
                        f"level; got shape {c.shape}.")
    k, n_levels = c.shape
    euclid = np.full((k, k), np.nan)
    ok = np.all(np.isfinite(c), axis=1)
    idx = np.flatnonzero(ok)
    if idx.size:
        sub = squareform(pdist(c[idx], metric="euclidean")) if idx.size > 1 else np.zeros((1, 1))
        euclid[np.ix_(idx, idx)] = sub
    np.fill_diagonal(euclid, 0.0)
    return euclid, euclid ** 2 / n_levels


def cooccurrence_iou(labels: np.ndarray) -> np.ndarray:
    """Jaccard index of every pair of labels ``[K, K]`` (diagonal 1; NaN where undefined).

    ``labels`` is ``[N, K]`` with 0/1 and NaN for unknown; a pair is counted over the images
    where both labels are known.
    """
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim != 2:
        raise DataError(f"cooccurrence_iou: labels must be [N, K]; got shape {y.shape}.")
    known = np.isfinite(y).astype(np.float64)
    pos = (np.nan_to_num(y) > 0.5).astype(np.float64) * known
    inter = pos.T @ pos
    # |A or B| over rows where both are known = |A & Bk| + |B & Ak| - |A & B|
    union = pos.T @ known + known.T @ pos - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
    np.fill_diagonal(iou, np.where(np.diag(union) > 0, 1.0, np.nan))
    return iou


@dataclass
class FCDResult:
    """FCD between every pair of classes and its correlates.

    Attributes:
        class_names: K names.
        levels: the compression levels the curves cover (reference level left out).
        euclidean, mse: ``[K, K]`` FCD matrices (symmetric, zero diagonal).
        iou: ``[K, K]`` co-occurrence Jaccard index.
        abs_dlogprev: ``[K, K]`` ``|log p_i - log p_j|``.
        correlations: ``{name: Correlation}`` over the K(K-1)/2 pairs.
        mantel: ``{name: {statistic, p, n_perm, method}}``.
        label_source: which labels gave prevalence and IoU (``train`` / ``evaluated split``).
    """

    class_names: tuple[str, ...]
    levels: np.ndarray
    euclidean: np.ndarray
    mse: np.ndarray
    iou: np.ndarray
    abs_dlogprev: np.ndarray
    correlations: dict[str, Correlation] = field(default_factory=dict)
    mantel: dict[str, dict[str, Any]] = field(default_factory=dict)
    label_source: str = ""

    def pairs(self) -> list[dict[str, Any]]:
        """One row per unordered class pair."""
        rows = []
        k = len(self.class_names)
        for i in range(k):
            for j in range(i + 1, k):
                rows.append({"a": self.class_names[i], "b": self.class_names[j],
                             "fcd_euclidean": float(self.euclidean[i, j]),
                             "fcd_mse": float(self.mse[i, j]), "iou": float(self.iou[i, j]),
                             "abs_delta_log_prevalence": float(self.abs_dlogprev[i, j])})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names), "levels": self.levels.tolist(),
                "label_source": self.label_source,
                "definition": {"fcd_euclidean": "||a-b||_2 over the compressed levels (PruneCXR "
                                                "code)",
                               "fcd_mse": "||a-b||^2 / L (PruneCXR poster)",
                               "iou": "|A and B| / |A or B| (Jaccard of the two labels)"},
                "euclidean": self.euclidean.tolist(), "mse": self.mse.tolist(),
                "iou": self.iou.tolist(), "abs_delta_log_prevalence": self.abs_dlogprev.tolist(),
                "correlations": {k: v.to_dict() for k, v in self.correlations.items()},
                "mantel": self.mantel, "pairs": self.pairs()}


def fcd_analysis(
    curves: np.ndarray,
    class_names: tuple[str, ...] | list[str],
    prevalence: np.ndarray,
    labels: np.ndarray,
    *,
    levels: np.ndarray | None = None,
    label_source: str = "",
    n_boot: int = 2000,
    n_perm: int = 999,
    seed: int = 0,
) -> FCDResult:
    """FCD matrices and their correlation with |delta log prevalence| and co-occurrence IoU.

    Args:
        curves: ``[K, L]`` median relative-change curves (compressed levels only).
        class_names: K names.
        prevalence: ``[K]`` prevalences (fractions); classes with 0 are left out of the
            prevalence correlations.
        labels: ``[N, K]`` 0/1/NaN labels for the IoU.
        n_boot: bootstrap resamples for the correlation CIs.
        n_perm: Mantel permutations.
    """
    curves = np.asarray(curves, dtype=np.float64)
    k = curves.shape[0] if curves.ndim == 2 else -1
    if k != len(class_names):
        raise DataError(f"fcd_analysis: {k} curves for {len(class_names)} classes.")
    prev = np.asarray(prevalence, dtype=np.float64)
    if prev.shape != (k,):
        raise DataError(f"fcd_analysis: prevalence has shape {prev.shape}, expected ({k},).")
    euclid, mse = fcd_matrices(curves)
    iou = cooccurrence_iou(labels)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.where(prev > 0, np.log(prev), np.nan)
    dlog = np.abs(logp[:, None] - logp[None, :])
    iu = np.triu_indices(k, 1)
    corr: dict[str, Correlation] = {}
    man: dict[str, dict[str, Any]] = {}
    for fname, fmat in (("euclidean", euclid), ("mse", mse)):
        for xname, xmat in (("abs_delta_log_prevalence", dlog), ("iou", iou)):
            name = f"fcd_{fname}_vs_{xname}"
            corr[name] = correlate(xmat[iu], fmat[iu], x_name=xname, y_name=f"fcd_{fname}",
                                   n_boot=n_boot, seed=seed)
            if k >= 4:
                man[name] = mantel(xmat, fmat, n_perm=n_perm, seed=seed)
    lv = np.asarray(levels if levels is not None else np.arange(curves.shape[1]), dtype=float)
    return FCDResult(class_names=tuple(class_names), levels=lv, euclidean=euclid, mse=mse,
                     iou=iou, abs_dlogprev=dlog, correlations=corr, mantel=man,
                     label_source=label_source)
