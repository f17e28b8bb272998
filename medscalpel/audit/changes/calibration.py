"""Calibration drift: what compression did to the meaning of a probability.

Per class, for the dense (reference) and the compressed (candidate) model on the same images:
expected calibration error (ECE, equal-width bins, absolute gap weighted by bin mass:
:func:`medscalpel.engine.metrics.weighted_ece`) and the Brier score, each with a bootstrap CI,
and their paired deltas (candidate - reference) with CIs and bootstrap p-values; one resample
of images is applied to both models. Sensitivity and specificity are re-measured AT THE DENSE
MODEL'S STORED THRESHOLDS (a compressed model dropped into a deployed pipeline keeps them) through
:func:`medscalpel.engine.compare.compare_predictions`. Re-calibration is recommended when a
class's ECE rises significantly (CI of the delta above 0) or its sensitivity / specificity at the
stored threshold moves significantly (CI of the delta excludes 0).

Example:
    >>> import numpy as np
    >>> from medscalpel.engine.predictions import Predictions
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(0, 2, (400, 1))
    >>> y = (rng.random((400, 1)) < 1 / (1 + np.exp(-z))).astype(np.float32)
    >>> a = Predictions(z, y, ids=tuple(map(str, range(400))), class_names=("x",), task="multilabel")
    >>> b = Predictions(3 * z, y, ids=a.ids, class_names=("x",), task="multilabel")
    >>> r = calibration_change(a, b, n_boot=200)
    >>> r.classes[0].delta_ece > 0, r.recommend_recalibration
    (True, True)
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medscalpel.audit.changes._util import NAN, boot_weights, ci, ci_excludes_zero, num, p_two_sided
from medscalpel.engine.compare import ClassDelta, compare_predictions
from medscalpel.engine.metrics import calibration_bins, weighted_ece
from medscalpel.engine.predictions import Predictions
from medscalpel.plotting import pyplot, save_figure
from medscalpel.validation import check_fraction, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1


@dataclass(frozen=True)
class ClassCalibration:
    """One class: ECE and Brier of both models with CIs, paired deltas, and the change of the
    decision at the stored threshold."""

    name: str
    n: int
    n_pos: int
    threshold: float
    ece_ref: float
    ece_ref_ci: tuple[float, float]
    ece_new: float
    ece_new_ci: tuple[float, float]
    delta_ece: float
    delta_ece_ci: tuple[float, float]
    delta_ece_p: float
    brier_ref: float
    brier_ref_ci: tuple[float, float]
    brier_new: float
    brier_new_ci: tuple[float, float]
    delta_brier: float
    delta_brier_ci: tuple[float, float]
    delta_brier_p: float
    sens_ref: float
    sens_new: float
    delta_sens: float
    delta_sens_ci: tuple[float, float]
    spec_ref: float
    spec_new: float
    delta_spec: float
    delta_spec_ci: tuple[float, float]
    delta_auroc: float
    delta_auroc_ci: tuple[float, float]
    recalibrate: bool
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassCalibration":
        out = {}
        for k, v in d.items():
            if k.endswith("_ci"):
                out[k] = tuple(num(x) for x in v)
            elif k == "reasons":
                out[k] = tuple(v)
            elif k in ("name", "recalibrate", "n", "n_pos"):
                out[k] = v
            else:
                out[k] = num(v)
        return cls(**out)


@dataclass(frozen=True)
class CalibrationChange:
    """Per-class calibration of both models, the paired changes and the verdict.

    Attributes:
        classes: one :class:`ClassCalibration` per class.
        macro: mean ECE / Brier of both models and the macro deltas with CIs.
        recommend_recalibration: a class's ECE rose significantly or its sensitivity /
            specificity at the stored threshold moved significantly.
        reasons: why (one line per class and statistic).
        reliability: per class the reliability-diagram bins of both models
            (``{"ref": {"conf": [...], "acc": [...], "count": [...]}, "new": {...}}``).
        threshold_source: where the thresholds came from (the dense model card, or 0.5).
    """

    classes: tuple[ClassCalibration, ...]
    macro: dict[str, Any]
    recommend_recalibration: bool
    reasons: tuple[str, ...]
    reliability: dict[str, dict[str, dict[str, list[float]]]]
    n: int
    n_bins: int
    n_boot: int
    seed: int
    confidence: float
    threshold_source: str
    schema_version: int = SCHEMA
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "classes"}
        d["classes"] = [c.to_dict() for c in self.classes]
        d["reasons"] = list(self.reasons)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CalibrationChange":
        return cls(classes=tuple(ClassCalibration.from_dict(c) for c in d["classes"]),
                   macro=dict(d["macro"]), recommend_recalibration=bool(d["recommend_recalibration"]),
                   reasons=tuple(d.get("reasons", ())), reliability=dict(d.get("reliability", {})),
                   n=int(d["n"]), n_bins=int(d["n_bins"]), n_boot=int(d["n_boot"]),
                   seed=int(d["seed"]), confidence=float(d["confidence"]),
                   threshold_source=str(d["threshold_source"]),
                   meta=dict(d.get("meta", {})))

    def table(self) -> list[dict[str, Any]]:
        return [{"class": c.name, "ECE ref": c.ece_ref, "ECE new": c.ece_new,
                 "dECE": c.delta_ece, "dECE CI": c.delta_ece_ci, "dBrier": c.delta_brier,
                 "dSens@thr": c.delta_sens, "dSpec@thr": c.delta_spec,
                 "recalibrate": c.recalibrate} for c in self.classes]


# ----------------------------------------------------------------------------- kernels
def weighted_brier(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ ((p - y) ** 2)) / w.sum(1)


def reliability_bins(p: np.ndarray, y: np.ndarray, n_bins: int) -> dict[str, list[float]]:
    """Mean confidence, observed frequency and count per non-empty bin of
    :func:`~medscalpel.engine.metrics.calibration_bins`."""
    b = calibration_bins(p, n_bins)
    conf, acc, count = [], [], []
    for k in range(n_bins):
        m = b == k
        if m.any():
            conf.append(float(p[m].mean()))
            acc.append(float(y[m].mean()))
            count.append(int(m.sum()))
    return {"conf": conf, "acc": acc, "count": count}


# ----------------------------------------------------------------------------- API
def calibration_change(
    reference: Predictions,
    candidate: Predictions,
    *,
    thresholds: Sequence[float] | None = None,
    threshold_source: str | None = None,
    n_bins: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> CalibrationChange:
    """Calibration drift of ``candidate`` against ``reference`` on the same images.

    Args:
        reference, candidate: predictions of the dense and compressed model (aligned by id by
            :func:`~medscalpel.engine.compare.compare_predictions`; class lists must match).
        thresholds: the dense model's stored per-class thresholds (``card.thresholds``); None:
            0.5 (multi-class: argmax).
        threshold_source: a label for where the thresholds came from (stored in the result).
        n_bins: equal-width probability bins of the ECE and the reliability diagrams.
        n_boot: paired bootstrap replicates (0: no CIs).
        confidence: CI level.

    Raises:
        DataError: different class lists or tasks, no common image.
    """
    check_range(n_bins, "n_bins", "calibration_change", 2, 100, integer=True)
    check_range(n_boot, "n_boot", "calibration_change", 0, integer=True)
    check_fraction(confidence, "confidence", "calibration_change")
    cmp = compare_predictions(reference, candidate, n_boot=n_boot, seed=seed,
                              thresholds=thresholds, confidence=confidence)
    ref, new = reference.align(candidate) if reference.ids != candidate.ids else (reference,
                                                                                 candidate)
    pr, pn, t = ref.probs().astype(np.float64), new.probs().astype(np.float64), ref.targets()
    w_all = boot_weights(ref.n, n_boot, seed + 1)
    classes, reasons, rel = [], [], {}
    reps_macro: dict[str, list[np.ndarray]] = {"ece_ref": [], "ece_new": [], "brier_ref": [],
                                               "brier_new": []}
    for j, name in enumerate(ref.class_names):
        known = np.isfinite(t[:, j])
        y, a, b = t[known, j].astype(np.float64), pr[known, j], pn[known, j]
        c = _class_calibration(name, y, a, b, w_all[:, known], cmp.classes[j], n_bins,
                               confidence, reps_macro)
        reasons += c.reasons
        classes.append(c)
        rel[name] = {"ref": reliability_bins(a, y, n_bins), "new": reliability_bins(b, y, n_bins)}
    macro = _macro(classes, reps_macro, confidence)
    macro["delta_auroc"] = cmp.macro.get("delta_auroc")
    macro["delta_auroc_ci"] = list(cmp.macro.get("delta_auroc_ci", (NAN, NAN)))
    return CalibrationChange(
        classes=tuple(classes), macro=macro, recommend_recalibration=bool(reasons),
        reasons=tuple(reasons), reliability=rel, n=ref.n, n_bins=n_bins, n_boot=n_boot,
        seed=seed, confidence=confidence,
        threshold_source=threshold_source or cmp.threshold_source,
        meta={"reference_id": ref.model_id, "candidate_id": new.model_id, "split": ref.split})


def _class_calibration(name: str, y: np.ndarray, a: np.ndarray, b: np.ndarray, w: np.ndarray,
                       cd: ClassDelta, n_bins: int, confidence: float,
                       reps_macro: dict[str, list[np.ndarray]]) -> ClassCalibration:
    """One class's ECE / Brier of both models (point values and bootstrap replicates, which are
    appended to ``reps_macro`` for the macro CIs) merged with its paired-comparison row ``cd``;
    its ``reasons`` say why re-calibration is recommended (empty: not recommended)."""
    ones = np.ones((1, y.size))
    e_r, e_n = weighted_ece(y, a, ones, n_bins)[0], weighted_ece(y, b, ones, n_bins)[0]
    b_r, b_n = weighted_brier(a, y, ones)[0], weighted_brier(b, y, ones)[0]
    er, en = weighted_ece(y, a, w, n_bins), weighted_ece(y, b, w, n_bins)
    br, bn = weighted_brier(a, y, w), weighted_brier(b, y, w)
    for k, v in (("ece_ref", er), ("ece_new", en), ("brier_ref", br), ("brier_new", bn)):
        reps_macro[k].append(v)
    why = _recalibration_reasons(name, e_r, e_n, en - er, cd, confidence)
    thr = cd.threshold if cd.threshold is not None else NAN
    return ClassCalibration(
        name=name, n=int(y.size), n_pos=int(y.sum()), threshold=num(thr),
        ece_ref=float(e_r), ece_ref_ci=ci(er, confidence), ece_new=float(e_n),
        ece_new_ci=ci(en, confidence), delta_ece=float(e_n - e_r),
        delta_ece_ci=ci(en - er, confidence), delta_ece_p=p_two_sided(en - er),
        brier_ref=float(b_r), brier_ref_ci=ci(br, confidence), brier_new=float(b_n),
        brier_new_ci=ci(bn, confidence), delta_brier=float(b_n - b_r),
        delta_brier_ci=ci(bn - br, confidence), delta_brier_p=p_two_sided(bn - br),
        sens_ref=cd.sens_ref, sens_new=cd.sens_new, delta_sens=cd.delta_sens,
        delta_sens_ci=tuple(cd.delta_sens_ci), spec_ref=cd.spec_ref, spec_new=cd.spec_new,
        delta_spec=cd.delta_spec, delta_spec_ci=tuple(cd.delta_spec_ci),
        delta_auroc=cd.delta_auroc, delta_auroc_ci=tuple(cd.delta_auroc_ci),
        recalibrate=bool(why), reasons=tuple(why))


def _recalibration_reasons(name: str, e_r: float, e_n: float, d_ece_reps: np.ndarray,
                           cd: ClassDelta, confidence: float) -> list[str]:
    """Why one class needs re-calibration: a significant ECE rise, or a significant move of
    sensitivity / specificity at the stored threshold (empty: none)."""
    why = []
    if ci_excludes_zero(ci(d_ece_reps, confidence)) > 0:
        why.append(f"{name}: ECE {e_r:.3f} -> {e_n:.3f} (significant rise)")
    for metric in ("sens", "spec"):
        d, dci = getattr(cd, f"delta_{metric}"), getattr(cd, f"delta_{metric}_ci")
        if ci_excludes_zero(dci) != 0:
            why.append(f"{name}: {metric} at the stored threshold {d:+.3f} "
                       f"[{dci[0]:+.3f}, {dci[1]:+.3f}]")
    return why


def _macro(classes: list[ClassCalibration], reps: dict[str, list[np.ndarray]],
           confidence: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("ece", "brier"):
        r = np.nanmean(np.stack(reps[f"{key}_ref"]), 0) if reps[f"{key}_ref"] else np.zeros(0)
        n = np.nanmean(np.stack(reps[f"{key}_new"]), 0) if reps[f"{key}_new"] else np.zeros(0)
        out[f"{key}_ref"] = float(np.nanmean([getattr(c, f"{key}_ref") for c in classes]))
        out[f"{key}_new"] = float(np.nanmean([getattr(c, f"{key}_new") for c in classes]))
        out[f"delta_{key}"] = out[f"{key}_new"] - out[f"{key}_ref"]
        out[f"delta_{key}_ci"] = list(ci(n - r, confidence))
        out[f"delta_{key}_p"] = p_two_sided(n - r)
    return out


# ----------------------------------------------------------------------------- figure
def plot_reliability(res: CalibrationChange, path: str | os.PathLike, max_classes: int = 15
                     ) -> Path:
    """Reliability diagrams, one panel per class: dense (blue) and compressed (red) observed
    frequency against mean confidence per bin, the diagonal = perfect calibration."""

    plt = pyplot()
    names = [c.name for c in res.classes][:max_classes]
    cols = min(5, max(1, len(names)))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols, 2.5 * rows), squeeze=False)
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        c = res.classes[i]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.7, ls="--")
        for key, color in (("ref", "tab:blue"), ("new", "tab:red")):
            b = res.reliability[name][key]
            ax.plot(b["conf"], b["acc"], "o-", color=color, ms=3, lw=1.2,
                    label=f"{'dense' if key == 'ref' else 'compressed'} ECE "
                          f"{getattr(c, 'ece_' + key):.3f}")
        ax.set_title(name[:18] + (" *" if c.recalibrate else ""), fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5, loc="upper left")
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.supxlabel("mean predicted probability", fontsize=8)
    fig.supylabel("observed frequency", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
