"""Forgettability: which classes does compression forget, how early and how badly?

Following PruneCXR (Holste et al., MICCAI 2023): for every model (seed) ``s``, compression level
``k`` and class ``c`` the per-class average precision ``AP[s, k, c]`` is computed on the evaluated
split; the *relative change* ``(AP[s, k, c] - AP[s, 0, c]) / AP[s, 0, c]`` against the same model's
reference (dense) level gives one curve per seed, and the class's *forgettability curve* is the
median over seeds (with the interquartile range as its band). Two summaries per class:

* ``first_drop``: the first level whose median relative change is <= -20% (NaN if none);
* ``delta_at_max``: the median relative change at the highest level.

Both are set against log prevalence (from the training labels when given, else from the
evaluated split; ``prevalence_source`` says which) with Pearson and Spearman coefficients,
p-values and bootstrap CIs, and the curves feed the FCD analysis (:mod:`medscalpel.audit.fcd`).
AUROC is computed alongside and reported the same way.

Nothing here assumes unstructured pruning: the levels can be any ordered compression setting
(structured ratios, quantization steps, teacher -> student).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.audit import figures as figs
from medscalpel.audit.fcd import FCDResult, fcd_analysis
from medscalpel.audit.stats import Correlation, correlate
from medscalpel.audit.sweepio import Sweep, SweepLike, as_sweep
from medscalpel.engine.metrics import auroc, average_precision
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import DataError
from medscalpel.layout import write_artifact_at
from medscalpel.progress import track
from medscalpel.validation import check_fraction, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
SUMMARIES = ("first_drop", "delta_at_max", "mean_rel_change")


# ----------------------------------------------------------------------------- metrics
def per_class_metrics(sweep: Sweep, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """AP and AUROC per (seed, level, class): two ``[S, L, K]`` arrays (NaN for missing cells
    and for classes without positives or negatives among the known labels)."""
    targets = sweep.targets()
    s_n, l_n, k_n = len(sweep.seeds), len(sweep.levels), sweep.num_classes
    ap = np.full((s_n, l_n, k_n), np.nan)
    au = np.full((s_n, l_n, k_n), np.nan)
    known = [np.isfinite(targets[:, c]) for c in range(k_n)]
    ys = [targets[known[c], c] > 0.5 for c in range(k_n)]
    keys = [(si, li) for si in range(s_n) for li in range(l_n)]
    for si, li in track(keys, "per-class AP/AUROC", progress=progress):
        key = (sweep.seeds[si], float(sweep.levels[li]))
        if key not in sweep.cells:
            continue
        probs = sweep.probs(*key)
        for c in range(k_n):
            s = probs[known[c], c].astype(np.float64)
            ap[si, li, c] = average_precision(ys[c], s)
            au[si, li, c] = auroc(ys[c], s)
    return ap, au


def relative_change(metric: np.ndarray, ref_index: int = 0) -> np.ndarray:
    """``(M[:, k] - M[:, ref]) / M[:, ref]`` for an ``[S, L, K]`` array (NaN where M_ref <= 0)."""
    m = np.asarray(metric, dtype=np.float64)
    ref = m[:, ref_index: ref_index + 1, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ref > 0, (m - ref) / ref, np.nan)


def _nanquantile(x: np.ndarray, q: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanquantile(x, q, axis=0)


def first_crossing(levels: np.ndarray, curves: np.ndarray, threshold: float,
                   ref_index: int = 0) -> np.ndarray:
    """First level (after the reference) where each curve ``[L, K]`` is <= ``-threshold``."""
    out = np.full(curves.shape[1], np.nan)
    for c in range(curves.shape[1]):
        for li in range(curves.shape[0]):
            if li == ref_index or levels[li] < levels[ref_index]:
                continue
            v = curves[li, c]
            if np.isfinite(v) and v <= -threshold + 1e-12:
                out[c] = levels[li]
                break
    return out


def _label_matrix(obj: Any, class_names: tuple[str, ...]) -> np.ndarray:
    """Training labels as ``[N, K]`` float (NaN unknown) from an array, Predictions or dataset."""
    if isinstance(obj, Predictions):
        if obj.class_names != class_names:
            raise DataError("train_labels: its classes differ from the sweep's "
                            f"({list(obj.class_names)[:3]}... vs {list(class_names)[:3]}...).")
        return obj.targets().astype(np.float64)
    if hasattr(obj, "labels_multihot"):
        names = tuple(getattr(obj, "class_names", class_names))
        if names != class_names:
            raise DataError("train_labels: the dataset's classes differ from the sweep's "
                            f"({list(names)[:3]}... vs {list(class_names)[:3]}...).")
        return np.asarray(obj.labels_multihot(), dtype=np.float64)
    y = np.asarray(obj)
    k = len(class_names)
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise DataError(f"train_labels: class index out of range [0, {k}).")
        out = np.zeros((len(y), k))
        out[np.arange(len(y)), y] = 1.0
        return out
    y = y.astype(np.float64)
    if y.ndim != 2 or y.shape[1] != k:
        raise DataError(f"train_labels has shape {y.shape}; expected [N, {k}] (one column per "
                        f"class of the sweep) or [N] class indices.")
    return y


def prevalence_of(labels: np.ndarray) -> np.ndarray:
    """Positives / known labels per class."""
    known = np.isfinite(labels)
    pos = (np.nan_to_num(labels) > 0.5) & known
    with np.errstate(invalid="ignore", divide="ignore"):
        return pos.sum(0) / known.sum(0)


# ----------------------------------------------------------------------------- result
@dataclass
class ForgettabilityResult:
    """Per-class forgettability of one sweep.

    Array shapes: S seeds, L levels (reference included), K classes.

    Attributes:
        ap, auroc: ``[S, L, K]`` per-seed metrics.
        rel_ap, rel_auroc: ``[S, L, K]`` relative change against each seed's reference level.
        median_rel_ap, q25_rel_ap, q75_rel_ap: ``[L, K]`` median and IQR band over seeds
            (likewise ``*_rel_auroc``).
        first_drop: ``[K]`` first level with median relative AP change <= -drop_threshold.
        delta_at_max: ``[K]`` median relative AP change at the highest level.
        abs_delta_ap_at_max: ``[K]`` median of ``AP_max - AP_ref``.
        mean_rel_change: ``[K]`` mean of the median curve over the compressed levels.
        prevalence: ``[K]``; ``prevalence_source`` is ``train`` or ``evaluated split``.
        correlations: ``{summary_vs_log_prevalence: Correlation}``.
        fcd: the FCD analysis of the median AP curves.
    """

    class_names: tuple[str, ...]
    levels: np.ndarray
    reference_level: float
    seeds: tuple[str, ...]
    method: str
    level_name: str
    task: str
    n_images: int
    n_pos_eval: np.ndarray
    ap: np.ndarray
    auroc: np.ndarray
    rel_ap: np.ndarray
    rel_auroc: np.ndarray
    median_rel_ap: np.ndarray
    q25_rel_ap: np.ndarray
    q75_rel_ap: np.ndarray
    median_rel_auroc: np.ndarray
    q25_rel_auroc: np.ndarray
    q75_rel_auroc: np.ndarray
    drop_threshold: float
    first_drop: np.ndarray
    delta_at_max: np.ndarray
    abs_delta_ap_at_max: np.ndarray
    mean_rel_change: np.ndarray
    prevalence: np.ndarray
    prevalence_source: str
    correlations: dict[str, Correlation]
    fcd: FCDResult
    sweep_info: dict[str, Any] = field(default_factory=dict)

    @property
    def log_prevalence(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.prevalence > 0, np.log(self.prevalence), np.nan)

    def order(self) -> list[str]:
        """Classes from first forgotten to last (by first_drop, then delta_at_max)."""
        fd = np.where(np.isfinite(self.first_drop), self.first_drop, np.inf)
        dm = np.where(np.isfinite(self.delta_at_max), self.delta_at_max, np.inf)
        idx = np.lexsort((dm, fd))
        return [self.class_names[i] for i in idx]

    def table(self) -> list[dict[str, Any]]:
        """One row per class (for the CLI and reports)."""
        return [{"class": n, "prevalence": float(self.prevalence[i]),
                 "n_pos_eval": int(self.n_pos_eval[i]),
                 "ap_ref_median": float(np.nanmedian(self.ap[:, self._ref, i]))
                 if np.isfinite(self.ap[:, self._ref, i]).any() else float("nan"),
                 "first_drop": float(self.first_drop[i]),
                 "delta_at_max": float(self.delta_at_max[i]),
                 "abs_delta_ap_at_max": float(self.abs_delta_ap_at_max[i])}
                for i, n in enumerate(self.class_names)]

    @property
    def _ref(self) -> int:
        return int(np.flatnonzero(np.abs(self.levels - self.reference_level) < 1e-9)[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA, "kind": "forgettability", "method": self.method,
            "level_name": self.level_name, "task": self.task, "n_images": self.n_images,
            "class_names": list(self.class_names), "levels": self.levels.tolist(),
            "reference_level": self.reference_level, "seeds": list(self.seeds),
            "drop_threshold": self.drop_threshold,
            "definition": {
                "relative_change": "(AP_k - AP_ref) / AP_ref per seed; median and IQR over seeds",
                "first_drop": f"first level with median relative change <= -{self.drop_threshold}"
                              " (null: never)",
                "delta_at_max": "median relative change in AP at the highest level",
                "mean_rel_change": "mean of the median curve over the compressed levels",
                "prevalence": f"positives / known labels in the {self.prevalence_source} labels",
            },
            "prevalence": self.prevalence.tolist(), "prevalence_source": self.prevalence_source,
            "log_prevalence": self.log_prevalence.tolist(),
            "n_pos_eval": self.n_pos_eval.tolist(),
            "first_drop": self.first_drop.tolist(), "delta_at_max": self.delta_at_max.tolist(),
            "abs_delta_ap_at_max": self.abs_delta_ap_at_max.tolist(),
            "mean_rel_change": self.mean_rel_change.tolist(),
            "forgotten_first_to_last": self.order(),
            "median_rel_ap": self.median_rel_ap.tolist(), "q25_rel_ap": self.q25_rel_ap.tolist(),
            "q75_rel_ap": self.q75_rel_ap.tolist(),
            "median_rel_auroc": self.median_rel_auroc.tolist(),
            "q25_rel_auroc": self.q25_rel_auroc.tolist(),
            "q75_rel_auroc": self.q75_rel_auroc.tolist(),
            "ap": self.ap.tolist(), "auroc": self.auroc.tolist(),
            "correlations": {k: v.to_dict() for k, v in self.correlations.items()},
            "fcd": self.fcd.to_dict(), "sweep": self.sweep_info, "table": self.table(),
        }

    def save(self, out_dir: str | os.PathLike, figures: bool = True) -> dict[str, Path]:
        """Write ``forgettability.json`` and the figures (PNG) into ``out_dir``."""

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {"json": write_artifact_at(out, "forgettability", self)}
        if figures:
            written["curves"] = figs.plot_forgettability_curves(self, out / "audit_curves.png")
            written["overview"] = figs.plot_forgettability_overview(
                self, out / "audit_curves_overview.png")
            written["scatter"] = figs.plot_summary_scatters(self, out / "audit_scatter.png")
            written["fcd_heatmap"] = figs.plot_fcd_heatmap(self.fcd, out / "audit_fcd_heatmap.png")
            written["fcd_scatter"] = figs.plot_fcd_scatters(self.fcd, out / "audit_fcd_scatter.png")
        return written


def _compared_levels(sw: Sweep, ref: int) -> list[int]:
    """Indices of the compressed levels (above the reference; any other level when none is)."""
    comp = [i for i in range(len(sw.levels)) if i != ref and sw.levels[i] > sw.reference_level]
    if not comp:
        comp = [i for i in range(len(sw.levels)) if i != ref]
    return comp


def _mean_rel_change(med_ap: np.ndarray, comp: list[int]) -> np.ndarray:
    """Per class, the mean over the compared levels of the median relative AP change."""
    # a class whose AP is undefined at every compared level (no positive in a tiny eval set)
    # stays NaN, without numpy's "Mean of empty slice" warning
    finite = np.isfinite(med_ap[comp])
    mean_rel = np.full(med_ap.shape[1], np.nan)
    cols = finite.any(axis=0)
    if cols.any():
        mean_rel[cols] = np.nanmean(med_ap[comp][:, cols], axis=0)
    return mean_rel


def _prevalence_labels(train_labels: Any, class_names: tuple[str, ...],
                       eval_targets: np.ndarray) -> tuple[np.ndarray, str]:
    """The label matrix prevalence and co-occurrence are measured on, and its source: the
    training labels when given, else the evaluated split's targets."""
    if train_labels is not None:
        return _label_matrix(train_labels, class_names), "train"
    return eval_targets, "evaluated split"


def _never_dropping(first: np.ndarray, delta_max: np.ndarray, drop_threshold: float) -> int:
    """How many classes never lose ``drop_threshold`` of their AP (left out of the
    ``first_drop`` correlation; logged)."""
    n_never = int(np.sum(~np.isfinite(first) & np.isfinite(delta_max)))
    if n_never:
        logger.info("%d classes never lose %.0f%% AP; they are left out of the first_drop "
                    "correlation.", n_never, 100 * drop_threshold)
    return n_never


def _prevalence_correlations(summaries: dict[str, np.ndarray], prev: np.ndarray, n_boot: int,
                             seed: int) -> dict[str, Correlation]:
    """Each per-class summary's correlation with the log prevalence, keyed
    ``<name>_vs_log_prevalence`` (a class of prevalence 0 is NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.where(prev > 0, np.log(prev), np.nan)
    return {f"{name}_vs_log_prevalence": correlate(values, logp, x_name=name,
                                                   y_name="log_prevalence", n_boot=n_boot,
                                                   seed=seed)
            for name, values in summaries.items()}


# ----------------------------------------------------------------------------- entry point
def audit_forgettability(
    sweep: SweepLike,
    train_labels: Any = None,
    out: str | os.PathLike | None = None,
    *,
    method: str | None = None,
    drop_threshold: float = 0.2,
    n_boot: int = 2000,
    n_perm: int = 999,
    seed: int = 0,
    progress: bool | None = None,
) -> ForgettabilityResult:
    """Forgettability curves, summaries, their correlation with prevalence, and FCD.

    Args:
        sweep: a sweep directory, a :class:`Sweep` or ``{(seed, level): Predictions}``.
        train_labels: training labels (``[N, K]`` array, ``[N]`` class indices, Predictions or a
            dataset) for prevalence and co-occurrence; ``None`` uses the evaluated split.
        out: when given, :meth:`ForgettabilityResult.save` writes JSON and figures there.
        method: the sweep method to read when the directory holds several.
        drop_threshold: relative AP drop defining ``first_drop`` (PruneCXR: 0.2).
        n_boot: bootstrap resamples for the correlation CIs.
        n_perm: Mantel permutations for the FCD correlations.
        seed: seed of the bootstrap / permutations.

    Example:
        >>> import numpy as np
        >>> from medscalpel.engine.predictions import Predictions
        >>> rng = np.random.default_rng(0)
        >>> y = (rng.random((200, 3)) < [0.5, 0.2, 0.05]).astype(np.float32)
        >>> cells = {}
        >>> for lv, noise in [(0.0, 0.0), (0.5, 1.0), (0.9, 4.0)]:
        ...     z = 3 * y - 1.5 + noise * rng.normal(size=y.shape)
        ...     cells[("s0", lv)] = Predictions(z, y, ids=[str(i) for i in range(200)],
        ...                                     class_names=("a", "b", "c"), task="multilabel")
        >>> res = audit_forgettability(cells, n_boot=0, n_perm=10)
        >>> res.levels.tolist()
        [0.0, 0.5, 0.9]
    """
    check_fraction(drop_threshold, "drop_threshold", "audit_forgettability")
    check_range(n_boot, "n_boot", "audit_forgettability", 0, integer=True)
    sw = as_sweep(sweep, method=method)
    if len(sw.levels) < 2:
        raise DataError(f"Sweep {sw.source} has only the level {sw.levels[0]:g}; forgettability "
                        "needs the reference level and at least one compressed level.")
    ref = int(np.flatnonzero(sw.levels == sw.reference_level)[0])
    ap, au = per_class_metrics(sw, progress=progress)
    rel_ap, rel_au = relative_change(ap, ref), relative_change(au, ref)
    med_ap, q25_ap, q75_ap = (_nanquantile(rel_ap, q) for q in (0.5, 0.25, 0.75))
    med_au, q25_au, q75_au = (_nanquantile(rel_au, q) for q in (0.5, 0.25, 0.75))
    top = int(np.argmax(sw.levels))
    first = first_crossing(sw.levels, med_ap, drop_threshold, ref)
    delta_max = med_ap[top]
    abs_delta = _nanquantile(ap[:, top, :] - ap[:, ref, :], 0.5)
    comp = _compared_levels(sw, ref)
    mean_rel = _mean_rel_change(med_ap, comp)
    eval_targets = sw.targets().astype(np.float64)
    label_mat, source = _prevalence_labels(train_labels, sw.class_names, eval_targets)
    prev = prevalence_of(label_mat)
    corr = _prevalence_correlations({"first_drop": first, "delta_at_max": delta_max,
                                     "mean_rel_change": mean_rel}, prev, n_boot, seed)
    n_never = _never_dropping(first, delta_max, drop_threshold)
    fcd = fcd_analysis(med_ap[comp].T, sw.class_names, prev, label_mat,
                       levels=sw.levels[comp], label_source=source, n_boot=n_boot,
                       n_perm=n_perm, seed=seed)
    known = np.isfinite(eval_targets)
    n_pos = ((np.nan_to_num(eval_targets) > 0.5) & known).sum(0)
    result = ForgettabilityResult(
        class_names=sw.class_names, levels=sw.levels.copy(), reference_level=sw.reference_level,
        seeds=sw.seeds, method=sw.method, level_name=sw.level_name, task=sw.task,
        n_images=sw.n, n_pos_eval=n_pos, ap=ap, auroc=au, rel_ap=rel_ap, rel_auroc=rel_au,
        median_rel_ap=med_ap, q25_rel_ap=q25_ap, q75_rel_ap=q75_ap, median_rel_auroc=med_au,
        q25_rel_auroc=q25_au, q75_rel_auroc=q75_au, drop_threshold=drop_threshold,
        first_drop=first, delta_at_max=delta_max, abs_delta_ap_at_max=abs_delta,
        mean_rel_change=mean_rel, prevalence=prev, prevalence_source=source, correlations=corr,
        fcd=fcd, sweep_info={**sw.to_dict(), "n_classes_never_dropping": n_never})
    if out is not None:
        result.save(out)
    return result
