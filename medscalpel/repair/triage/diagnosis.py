"""Diagnosis of one class: its metrics at the current threshold (:func:`class_metrics`) and the
issues they show against :class:`DiagnosisCriteria` (:func:`diagnose_class`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medscalpel.engine.metrics import auroc, expected_calibration_error
from medscalpel.engine.predict import Features
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import DataError
from medscalpel.repair.surgery.helpers import label_k, margins, sigmoid


@dataclass
class DiagnosisCriteria:
    """Limits that turn per-class metrics into issues (see the module docstring)."""

    min_recall: float = 0.5
    min_precision: float = 0.3
    max_ece: float = 0.1
    min_auroc: float = 0.75
    min_fp: int = 5
    cluster_share: float = 0.5
    confounder_ratio: float = 2.0
    ece_bins: int = 10
    top_channels: int = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ece_binary(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of one class (equal-width bins, weighted by count):
    :func:`medscalpel.engine.metrics.expected_calibration_error`."""
    return expected_calibration_error(y, p, bins)


def class_metrics(logits: np.ndarray, labels: np.ndarray, task: str, k: int, threshold: float,
                  bins: int = 10, flags: np.ndarray | None = None) -> dict[str, float]:
    """Recall, precision, F1, specificity, Youden's J, AUROC, ECE, Brier of class ``k``."""

    y = label_k(labels, k, task)
    known = np.isfinite(y)
    yk = y[known] > 0.5
    pm, dm = margins(logits, k, task, threshold)
    p, dec = sigmoid(pm)[known], dm[known] >= 0
    tp, fp = int(np.sum(yk & dec)), int(np.sum(~yk & dec))
    fn, tn = int(np.sum(yk & ~dec)), int(np.sum(~yk & ~dec))
    rec = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    out = {"n_pos": int(yk.sum()), "tp": tp, "fp": fp, "fn": fn, "tn": tn, "recall": rec,
           "precision": tp / (tp + fp) if tp + fp else 0.0,
           "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else float("nan"),
           "specificity": spec, "youden": rec + spec - 1 if np.isfinite(rec + spec) else
           float("nan"), "auroc": auroc(yk, p), "ece": ece_binary(yk, p, bins),
           "brier": float(np.mean((p - yk) ** 2)) if p.size else float("nan")}
    if flags is not None:
        f = np.asarray(flags, bool)[known]
        neg_f = ~yk & f
        out["specificity"] = float(1 - np.sum(neg_f & dec) / neg_f.sum()) if neg_f.any() else spec
    return out


def diagnose_class(logits: np.ndarray, data: Features | Predictions, k: int, threshold: float,
                   criteria: DiagnosisCriteria, weight: np.ndarray | None = None,
                   confounders: dict[str, np.ndarray] | None = None
                   ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Issues of class ``k`` on ``data`` (a list of dicts: kind, value, limit, detail)."""

    c = criteria
    m = class_metrics(logits, data.labels, data.task, k, threshold, c.ece_bins)
    issues: list[dict[str, Any]] = []
    if m["n_pos"] == 0:
        return issues, m
    if np.isfinite(m["recall"]) and m["recall"] < c.min_recall:
        issues.append({"kind": "low_recall", "value": m["recall"], "limit": c.min_recall})
    if m["fp"] >= c.min_fp and m["precision"] < c.min_precision:
        issues.append({"kind": "low_precision", "value": m["precision"],
                       "limit": c.min_precision})
    if np.isfinite(m["ece"]) and m["ece"] > c.max_ece:
        issues.append({"kind": "miscalibrated", "value": m["ece"], "limit": c.max_ece,
                       "brier": m["brier"]})
    if np.isfinite(m["auroc"]) and m["auroc"] < c.min_auroc:
        issues.append({"kind": "low_auroc", "value": m["auroc"], "limit": c.min_auroc})
    y = label_k(data.labels, k, data.task)
    _, dm = margins(logits, k, data.task, threshold)
    dec = dm >= 0
    fp_rows = np.flatnonzero((y == 0) & dec)
    tp_rows = np.flatnonzero((y == 1) & dec)
    if weight is not None and isinstance(data, Features) and fp_rows.size >= c.min_fp:
        contrib = data.features.astype(np.float64) * weight[k].astype(np.float64)[None]
        top = np.argsort(-contrib, axis=1)[:, : c.top_channels]
        counts = np.bincount(top[fp_rows].ravel(), minlength=contrib.shape[1])
        ch = int(np.argmax(counts))
        share_fp = counts[ch] / fp_rows.size
        share_tp = float(np.mean((top[tp_rows] == ch).any(1))) if tp_rows.size else 0.0
        if share_fp >= c.cluster_share and share_fp >= 2 * share_tp:
            rows = fp_rows[(top[fp_rows] == ch).any(1)]
            issues.append({"kind": "fp_cluster", "value": float(share_fp),
                           "limit": c.cluster_share, "channel": ch, "share_tp": share_tp,
                           "rows": rows.tolist()})
    for name, flags in (confounders or {}).items():
        f = np.asarray(flags, bool)
        if f.shape != (len(data.ids),):
            raise DataError(f"confounder {name!r}: {f.size} flags for {len(data.ids)} images.")
        neg = y == 0
        a, b = neg & f, neg & ~f
        if not a.any() or not b.any():
            continue
        rate_f, rate_o = float(np.mean(dec[a])), float(np.mean(dec[b]))
        n_f = int(np.sum(dec[a]))
        ratio = rate_f / rate_o if rate_o > 0 else (math.inf if rate_f > 0 else 1.0)
        if n_f >= c.min_fp and ratio >= c.confounder_ratio:
            issues.append({"kind": "confounder", "value": ratio, "limit": c.confounder_ratio,
                           "confounder": name, "fp_rate_flagged": rate_f,
                           "fp_rate_other": rate_o, "rows": np.flatnonzero(a & dec).tolist()})
    return issues, m
