"""Per-class metrics with stratified bootstrap confidence intervals.

AUROC and AP are computed from ranks (exactly as scikit-learn's ``roc_auc_score`` and
``average_precision_score``, which the tests check) so that thousands of bootstrap replicates
stay fast. A class without positives (or without negatives) in a split gets NaN and a reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import rankdata

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- kernels
def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (ties count 1/2), NaN when a class is absent."""
    y = np.asarray(y, bool)
    npos = int(y.sum())
    nneg = y.size - npos
    if npos == 0 or nneg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision as scikit-learn defines it (step-wise, ties grouped)."""
    y = np.asarray(y, bool)
    npos = int(y.sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    # keep the last index of each run of tied scores
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), y_sorted.size - 1]
    tp_at, n_at = tp[last], last + 1
    precision = tp_at / n_at
    recall = tp_at / npos
    prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev) * precision))


def calibration_bins(p: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Bin index of each probability in ``n_bins`` EQUAL-WIDTH bins ``[k/n, (k+1)/n)`` (the
    last bin closed at 1): ``min(floor(p * n_bins), n_bins - 1)``. The one binning of every ECE
    and reliability diagram in medscalpel."""
    return np.minimum((np.asarray(p, np.float64) * n_bins).astype(np.int64), n_bins - 1)


def weighted_ece(y: np.ndarray, p: np.ndarray, w: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Expected calibration error of probabilities ``p`` for 0/1 outcomes ``y`` under image
    weights ``w`` ``[B, n]`` (one bootstrap replicate per row) -> ``[B]``.

    ``ECE = sum_b |sum_{i in b} w_i (p_i - y_i)| / sum_i w_i`` over the equal-width bins of
    :func:`calibration_bins`, i.e. each bin's ``|mean p - mean y|`` weighted by its share of the
    (weighted) images (Naeini et al. 2015; Guo et al. 2017 for the top-label form, see
    :func:`expected_calibration_error`). NaN for a replicate with no weight.
    """
    y = np.asarray(y, np.float64)
    p = np.asarray(p, np.float64)
    w = np.atleast_2d(np.asarray(w, np.float64))
    if p.size == 0:
        return np.full(w.shape[0], float("nan"))
    onehot = np.zeros((p.size, n_bins))
    onehot[np.arange(p.size), calibration_bins(p, n_bins)] = 1.0
    gap = w @ (onehot * (p - y)[:, None])       # [B, bins]
    tot = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.abs(gap).sum(1) / tot
    out[tot == 0] = np.nan
    return out


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """ECE of one binary outcome (see :func:`weighted_ece`; every image weight 1). For the
    top-label ECE of a multi-class model pass ``y = (argmax == label)`` and ``p = max prob``.

    >>> expected_calibration_error(np.array([1, 0, 0, 1]), np.array([0.75, 0.75, 0.25, 0.25]))
    0.25
    """
    p = np.asarray(p, np.float64)
    return float(weighted_ece(y, p, np.ones((1, p.size)), n_bins)[0])


def confusion_at(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    y = np.asarray(y, bool)
    pred = np.asarray(pred, bool)
    tp = int(np.sum(y & pred))
    fp = int(np.sum(~y & pred))
    fn = int(np.sum(y & ~pred))
    tn = int(np.sum(~y & ~pred))
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "sensitivity": sens, "specificity": spec,
            "precision": prec, "f1": f1}


# ----------------------------------------------------------------------------- results
@dataclass
class ClassMetrics:
    name: str
    n_pos: int
    n_neg: int
    auroc: float
    auroc_ci: tuple[float, float]
    ap: float
    ap_ci: tuple[float, float]
    threshold: float
    sensitivity: float
    specificity: float
    precision: float
    f1: float
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class EvalResult:
    """Per-class and macro metrics of one Predictions artifact."""

    classes: list[ClassMetrics]
    macro: dict[str, Any]
    task: str
    split: str
    model_id: str
    n: int
    n_boot: int
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    def per_class(self, metric: str) -> dict[str, float]:
        return {c.name: getattr(c, metric) for c in self.classes}

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "task": self.task, "split": self.split,
                "model_id": self.model_id, "n": self.n, "n_boot": self.n_boot, "seed": self.seed,
                "macro": self.macro, "classes": [c.to_dict() for c in self.classes],
                "extra": self.extra}

    def table(self) -> list[dict[str, Any]]:
        return [{"class": c.name, "pos": c.n_pos, "AUROC": c.auroc, "AUROC 95% CI": c.auroc_ci,
                 "AP": c.ap, "sens": c.sensitivity, "spec": c.specificity, "F1": c.f1}
                for c in self.classes]


def bootstrap_ci(reps: np.ndarray, confidence: float = 0.95, min_finite: int = 10
                 ) -> tuple[tuple[float, float], int]:
    """Percentile interval of the FINITE bootstrap replicates and how many were dropped.

    A replicate is NaN where its statistic is undefined on that resample (a rare class or a
    small subgroup drawn without a positive); such replicates are left out, and the count says
    so, because an interval over the survivors describes resamples that HAD positives.
    Fewer than ``min_finite`` finite replicates: ``(NaN, NaN)``.

    >>> (lo, hi), dropped = bootstrap_ci(np.r_[np.arange(101.0), np.nan, np.nan], 0.9)
    >>> round(lo, 9), round(hi, 9), dropped
    (5.0, 95.0, 2)
    """
    v = np.asarray(reps, np.float64).ravel()
    ok = np.isfinite(v)
    dropped = int(v.size - ok.sum())
    if ok.sum() < min_finite:
        return (float("nan"), float("nan")), dropped
    a = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(v[ok], [a, 1.0 - a])
    return (float(lo), float(hi)), dropped


def _ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    return bootstrap_ci(values, 1.0 - alpha)[0]


def _stratified_boot(y: np.ndarray, s: np.ndarray, n_boot: int, rng: np.random.Generator,
                     fn) -> np.ndarray:
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    out = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        out[b] = fn(y[idx], s[idx])
    return out


def evaluate(
    preds: Predictions,
    thresholds: list[float] | np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> EvalResult:
    """Per-class AUROC, AP, sensitivity, specificity, precision and F1 with bootstrap CIs.

    Args:
        preds: the predictions (labels with NaN are ignored per class).
        thresholds: per-class probability thresholds (default 0.5; ignored for multi-class,
            where the predicted class is the argmax).
        n_boot: bootstrap replicates (stratified by class label, seeded); 0 disables CIs.
        seed: bootstrap seed.

    Example:
        >>> import numpy as np
        >>> p = Predictions(np.array([[2.], [-1.], [0.5], [-2.]]), np.array([[1.], [0.], [1.], [0.]]),
        ...                 ids=("a", "b", "c", "d"), class_names=("x",), task="multilabel")
        >>> evaluate(p, n_boot=0).classes[0].auroc
        1.0
    """
    check_range(n_boot, "n_boot", "evaluate", 0, integer=True)
    rng = np.random.default_rng(seed)
    probs = preds.probs()
    targets = preds.targets()
    k = preds.num_classes
    if thresholds is None:
        thr = np.full(k, 0.5)
    else:
        thr = np.asarray(thresholds, dtype=float)
        if thr.shape != (k,):
            raise ConfigError(f"evaluate: {thr.size} thresholds given for {k} classes.")
    if preds.task == "multiclass":
        decided = np.zeros_like(probs, dtype=bool)
        decided[np.arange(preds.n), probs.argmax(1)] = True
    else:
        decided = probs >= thr[None, :]
    classes: list[ClassMetrics] = []
    for j, name in enumerate(preds.class_names):
        known = np.isfinite(targets[:, j])
        y = targets[known, j] > 0.5
        s = probs[known, j].astype(np.float64)
        npos, nneg = int(y.sum()), int((~y).sum())
        reason = ""
        if npos == 0:
            reason = f"no positive images of '{name}' in split '{preds.split}'"
        elif nneg == 0:
            reason = f"no negative images of '{name}' in split '{preds.split}'"
        a, ap = auroc(y, s), average_precision(y, s)
        a_ci = ap_ci = (float("nan"), float("nan"))
        if not reason and n_boot:
            a_ci = _ci(_stratified_boot(y, s, n_boot, rng, auroc), alpha)
            ap_ci = _ci(_stratified_boot(y, s, n_boot, rng, average_precision), alpha)
        conf = confusion_at(y, decided[known, j])
        classes.append(ClassMetrics(
            name=name, n_pos=npos, n_neg=nneg, auroc=a, auroc_ci=a_ci, ap=ap, ap_ci=ap_ci,
            threshold=float(thr[j]) if preds.task == "multilabel" else float("nan"),
            sensitivity=conf["sensitivity"], specificity=conf["specificity"],
            precision=conf["precision"], f1=conf["f1"], reason=reason))
    macro = _macro(preds, probs, targets, classes, n_boot, rng, alpha)
    return EvalResult(classes=classes, macro=macro, task=preds.task, split=preds.split,
                      model_id=preds.model_id, n=preds.n, n_boot=n_boot, seed=seed)


def _nanmean(vals: list[float]) -> float:
    arr = np.asarray(vals, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def _macro(preds, probs, targets, classes, n_boot, rng, alpha) -> dict[str, Any]:
    valid = [j for j, c in enumerate(classes) if not c.reason]
    out: dict[str, Any] = {
        "auroc": _nanmean([c.auroc for c in classes]),
        "ap": _nanmean([c.ap for c in classes]),
        "sensitivity": _nanmean([c.sensitivity for c in classes]),
        "specificity": _nanmean([c.specificity for c in classes]),
        "f1": _nanmean([c.f1 for c in classes]),
        "n_classes_scored": len(valid),
    }
    if preds.task == "multiclass":
        out["accuracy"] = float(np.mean(probs.argmax(1) == preds.labels))
    if n_boot and valid:
        au = np.empty(n_boot)
        aps = np.empty(n_boot)
        partial = np.zeros(n_boot, bool)
        n = preds.n
        for b in range(n_boot):
            idx = rng.integers(0, n, n)
            a_vals, p_vals = [], []
            for j in valid:
                t = targets[idx, j]
                known = np.isfinite(t)
                y = t[known] > 0.5
                s = probs[idx, j][known].astype(np.float64)
                a_vals.append(auroc(y, s))
                p_vals.append(average_precision(y, s))
            au[b], aps[b] = _nanmean(a_vals), _nanmean(p_vals)
            partial[b] = not np.isfinite(a_vals).all()
        for key, reps in (("auroc", au), ("ap", aps)):
            interval, dropped = bootstrap_ci(reps, 1.0 - alpha)
            out[f"{key}_ci"] = list(interval)
            out[f"{key}_ci_dropped"] = dropped
        # a resample without a positive of a rare class leaves that class out of ITS macro mean
        out["ci_replicates_missing_a_class"] = int(partial.sum())
    return out
