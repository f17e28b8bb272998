"""Paired comparison of two Predictions on the same images: deltas with bootstrap CIs.

Every compression (pruning, folding, export, distillation, int8 deployment) answers one question:
what did the candidate lose against the reference *on the same images*? The deltas (candidate -
reference) of AUROC, AP, sensitivity and specificity come with paired bootstrap confidence
intervals: one resample of images is applied to both models at once, so the image-to-image
variation that both models share cancels and the interval is much narrower than two separate
CIs would suggest.

The bootstrap is vectorised: a replicate is a vector of multinomial image counts, and AUROC / AP
are computed from per-tie-group weight sums in score order, so 1,000 replicates over 22,000
images x 14 classes take seconds, not minutes. The kernels live in
:mod:`medscalpel.engine.weighted`; with unit weights they equal
:func:`medscalpel.engine.metrics.auroc` / ``average_precision`` (scikit-learn's definitions,
ties grouped); the tests check it.

Example:
    >>> import numpy as np
    >>> from medscalpel.engine.predictions import Predictions
    >>> y = np.array([[1.], [0.], [1.], [0.], [1.], [0.]])
    >>> a = Predictions(np.array([[2.], [-1.], [0.5], [-2.], [1.], [0.]]), y,
    ...                 ids=tuple("abcdef"), class_names=("x",), task="multilabel")
    >>> b = Predictions(np.array([[2.], [1.], [0.5], [-2.], [1.], [0.]]), y,
    ...                 ids=tuple("abcdef"), class_names=("x",), task="multilabel")
    >>> c = compare_predictions(a, b, n_boot=0)
    >>> round(c.macro["delta_auroc"], 4)
    -0.1667

Decisions go through :meth:`PairedComparison.verdict` (:mod:`medscalpel.engine.decision`):
pass / fail / undecided per class and macro, with Holm across them, from the bootstrap replicate
deltas that :func:`compare_predictions` keeps (in memory, not in the JSON) or from the paired
DeLong covariance of the AUROC deltas (stored in the JSON).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medscalpel.engine.decision import UnitInput, Verdict, decide, delong_covariance
from medscalpel.engine.predictions import Predictions
from medscalpel.engine.weighted import METRICS, class_metrics, weighted_ap, weighted_auroc
from medscalpel.errors import ConfigError, DataError
from medscalpel.layout import artifact, write_artifact_at
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
FILENAME = artifact("comparison").filename
_CHUNK = 64  # bootstrap replicates per vectorised block

__all__ = ["FILENAME", "METRICS", "SCHEMA", "ClassDelta", "PairedComparison", "compare_predictions",
           "weighted_ap", "weighted_auroc"]


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ClassDelta:
    """One class: reference and candidate metrics and the paired delta (candidate - reference)."""

    name: str
    n_pos: int
    n_neg: int
    auroc_ref: float
    auroc_new: float
    delta_auroc: float
    delta_auroc_ci: tuple[float, float]
    ap_ref: float
    ap_new: float
    delta_ap: float
    delta_ap_ci: tuple[float, float]
    sens_ref: float
    sens_new: float
    delta_sens: float
    delta_sens_ci: tuple[float, float]
    spec_ref: float
    spec_new: float
    delta_spec: float
    delta_spec_ci: tuple[float, float]
    threshold: float | None = None
    reason: str = ""
    #: bootstrap replicates whose AUROC delta is undefined (a resample without a positive or a
    #: negative image of the class): left out of the CIs above and counted here (AP / sens /
    #: spec lose a subset of them); :meth:`PairedComparison.verdict` counts them against a pass
    n_nan_replicates: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if k.endswith("_ci"):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassDelta":
        kw = {k: (tuple(_num(x) for x in v) if k.endswith("_ci") else
                  (_num(v) if isinstance(v, (int, float)) or v is None else v))
              for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["n_pos"], kw["n_neg"] = int(d["n_pos"]), int(d["n_neg"])
        kw["n_nan_replicates"] = int(d.get("n_nan_replicates", 0))
        return cls(**kw)


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


@dataclass(frozen=True)
class PairedComparison:
    """Candidate vs reference on the same images, per class and macro, with paired CIs.

    ``macro`` holds the same keys as a :class:`ClassDelta` (means over scored classes; the CIs
    are of the bootstrap distribution of the macro mean itself), plus ``accuracy_ref`` /
    ``accuracy_new`` / ``delta_accuracy`` / ``delta_accuracy_ci`` for multi-class tasks.
    """

    n: int
    task: str
    split: str
    reference_id: str
    candidate_id: str
    classes: tuple[ClassDelta, ...]
    macro: dict[str, Any]
    n_boot: int
    seed: int
    confidence: float
    threshold_source: str
    n_unmatched: int = 0
    schema_version: int = SCHEMA
    meta: dict[str, Any] = field(default_factory=dict)
    #: paired DeLong of the AUROC deltas: ``delta_auroc`` ``[k]`` and ``cov`` ``[k, k]`` (NaN for
    #: classes with < 2 positive or negative images); empty when not computed
    delong: dict[str, Any] = field(default_factory=dict)
    #: bootstrap replicate deltas (candidate - reference) per metric, ``[k, n_boot]``, NaN kept;
    #: in memory only (not written to the JSON): a loaded comparison decides by DeLong
    replicates: dict[str, np.ndarray] | None = field(default=None, compare=False, repr=False)

    # -- verdicts
    def meets_floor(self, macro: float = -0.005, per_class: float = -0.01,
                    metric: str = "auroc") -> tuple[bool | None, list[str]]:
        """The legacy point-estimate rule: macro delta >= ``macro`` and every class's delta >=
        ``per_class``. Prefer :meth:`verdict` (intervals, Holm, minimum evidence).

        Returns:
            ``(ok, reasons)``: ``ok`` is False when a checked delta is below its floor, None
            (falsy: not shown to meet it) when nothing failed but some classes could not be
            checked (undefined delta: no positive or negative image), True otherwise. Every
            unchecked class is named in ``reasons``.
        """
        reasons, unchecked = [], []
        dm = self.macro.get(f"delta_{metric}")
        if dm is None or not math.isfinite(dm):
            reasons.append(f"macro delta {metric.upper()} is undefined")
        elif dm < macro:
            reasons.append(f"macro delta {metric.upper()} {dm:+.4f} < floor {macro:+.4f}")
        for c in self.classes:
            d = getattr(c, f"delta_{metric}")
            if not math.isfinite(d):
                unchecked.append(f"{c.name}: not checked, delta {metric.upper()} undefined"
                                 f" ({c.reason or 'NaN'})")
            elif d < per_class:
                reasons.append(f"{c.name}: delta {metric.upper()} {d:+.4f} < floor "
                               f"{per_class:+.4f}")
        if reasons:
            return False, reasons + unchecked
        return (None if unchecked else True), unchecked

    def verdict(self, margin: float = 0.01, *, macro_margin: float | None = None,
                metric: str = "auroc", method: str = "bootstrap", level: float | None = None,
                correction: str = "holm", min_pos: int = 10, min_neg: int = 10,
                accepted_unscorable: Sequence[str] | bool = (), macro: bool = True) -> Verdict:
        """Non-inferiority verdict (pass / fail / undecided) per class and for the macro mean.

        Args:
            margin: per-class margin ``m`` (pass needs ``delta >= -m`` shown by the interval).
            macro_margin: margin of the macro unit (default ``margin``).
            metric: one of auroc / ap / sens / spec (``method="delong"``: auroc only).
            method: ``"bootstrap"`` (the kept paired replicates; intervals at any level) or
                ``"delong"`` (paired DeLong, normal approximation; also after :meth:`load`).
            level: two-sided confidence of the family (default: this comparison's).
            correction, min_pos, min_neg, accepted_unscorable: see
                :func:`medscalpel.engine.decision.decide`.
            macro: add the mean over the scorable classes as a unit (its replicates are the
                mean of the class replicates, so a NaN class replicate makes it NaN: counted).

        Raises:
            ConfigError: an unknown metric / method, or DeLong for another metric than AUROC.
            DataError: the evidence the method needs is not available.
        """
        check_in(metric, "metric", "PairedComparison.verdict", METRICS)
        check_in(method, "method", "PairedComparison.verdict", ("bootstrap", "delong"))
        level = self.confidence if level is None else level
        if method == "delong":
            units, how = self._delong_units(metric, min_pos, min_neg, macro, macro_margin)
        else:
            units, how = self._bootstrap_units(metric, min_pos, min_neg, macro, macro_margin)
        return decide(units, margin=margin, metric=metric, level=level, correction=correction,
                      min_pos=min_pos, min_neg=min_neg, accepted_unscorable=accepted_unscorable,
                      method=how, meta={"split": self.split, "reference_id": self.reference_id,
                                        "candidate_id": self.candidate_id})

    def _class_units(self, metric: str) -> list[dict[str, Any]]:
        return [dict(name=c.name, estimate=float(getattr(c, f"delta_{metric}")), n=self.n,
                     n_pos=c.n_pos, n_neg=c.n_neg, kind="class") for c in self.classes]

    def _scorable(self, min_pos: int, min_neg: int, ok: Sequence[bool]) -> list[int]:
        return [j for j, c in enumerate(self.classes)
                if c.n_pos >= min_pos and c.n_neg >= min_neg and ok[j]]

    def _bootstrap_units(self, metric: str, min_pos: int, min_neg: int, macro: bool,
                         macro_margin: float | None) -> tuple[list[UnitInput], str]:
        if self.replicates is None or metric not in self.replicates or not self.n_boot:
            raise DataError(f"PairedComparison.verdict: no bootstrap replicates of '{metric}' are "
                            "kept (a loaded comparison, n_boot=0, or the metric not in "
                            "boot_metrics); recompute it with compare_predictions(n_boot>=1000) "
                            "or use method='delong'.")
        reps = self.replicates[metric]
        kw = self._class_units(metric)
        units = [UnitInput(replicates=reps[j], **kw[j]) for j in range(len(kw))]
        sel = self._scorable(min_pos, min_neg, [math.isfinite(k["estimate"]) for k in kw])
        if macro and sel:
            with np.errstate(invalid="ignore"):
                mean_reps = reps[sel].mean(0)      # NaN in any class stays NaN (counted)
            units.append(UnitInput("macro", float(np.mean([kw[j]["estimate"] for j in sel])),
                                   self.n, replicates=mean_reps, kind="macro",
                                   margin=macro_margin, note=self._macro_note(sel)))
        return units, f"paired bootstrap, {self.n_boot} replicates (seed {self.seed})"

    def _delong_units(self, metric: str, min_pos: int, min_neg: int, macro: bool,
                      macro_margin: float | None) -> tuple[list[UnitInput], str]:
        if metric != "auroc":
            raise ConfigError(f"The 'method' parameter of PairedComparison.verdict must be "
                              f"'bootstrap' for metric '{metric}' (DeLong is for AUROC). Got "
                              "'delong' instead.")
        if not self.delong:
            raise DataError("PairedComparison.verdict: no DeLong statistics in this comparison "
                            "(an older file); use method='bootstrap' on a fresh comparison.")
        cov = np.asarray(self.delong["cov"], np.float64)
        kw = self._class_units(metric)
        se = np.sqrt(np.diag(cov))
        units = [UnitInput(se=float(se[j]), **kw[j]) for j in range(len(kw))]
        sel = self._scorable(min_pos, min_neg, np.isfinite(se))
        if macro and sel:
            var = float(cov[np.ix_(sel, sel)].sum()) / len(sel) ** 2
            units.append(UnitInput("macro", float(np.mean([kw[j]["estimate"] for j in sel])),
                                   self.n, se=math.sqrt(max(var, 0.0)), kind="macro",
                                   margin=macro_margin, note=self._macro_note(sel)))
        return units, "paired DeLong (normal approximation)"

    def _macro_note(self, sel: list[int]) -> str:
        return (f"mean over {len(sel)} of {len(self.classes)} classes (those with enough "
                "positive and negative images)")

    def table(self) -> list[dict[str, Any]]:
        """Rows for a CLI table: one per class, then the macro row."""
        rows = []
        for c in self.classes:
            rows.append({"class": c.name, "AUROC ref": c.auroc_ref, "AUROC new": c.auroc_new,
                         "dAUROC": c.delta_auroc, "dAUROC CI": c.delta_auroc_ci,
                         "dAP": c.delta_ap, "dSens": c.delta_sens, "dSpec": c.delta_spec})
        m = self.macro
        rows.append({"class": "macro", "AUROC ref": m["auroc_ref"], "AUROC new": m["auroc_new"],
                     "dAUROC": m["delta_auroc"], "dAUROC CI": tuple(m["delta_auroc_ci"]),
                     "dAP": m["delta_ap"], "dSens": m["delta_sens"], "dSpec": m["delta_spec"]})
        return rows

    def summary(self) -> str:
        m = self.macro
        lo, hi = m["delta_auroc_ci"]
        s = (f"macro AUROC {m['auroc_ref']:.4f} -> {m['auroc_new']:.4f} "
             f"(delta {m['delta_auroc']:+.4f} [{lo:+.4f}, {hi:+.4f}], paired bootstrap "
             f"{self.n_boot}x, {self.n} images of split '{self.split}')")
        if "delta_accuracy" in m:
            s += f"; accuracy delta {m['delta_accuracy']:+.4f}"
        return s

    # -- io
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("classes", "replicates")}
        d["meta"], d["delong"] = dict(self.meta), dict(self.delong)
        d["classes"] = [c.to_dict() for c in self.classes]
        d["macro"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.macro.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PairedComparison":
        if int(d.get("schema_version", 0)) != SCHEMA:
            raise DataError(f"PairedComparison: schema_version {d.get('schema_version')} is not "
                            f"{SCHEMA}; recompute it with compare_predictions.")
        macro = {k: (tuple(_num(x) for x in v) if k.endswith("_ci") else v)
                 for k, v in d["macro"].items()}
        return cls(n=int(d["n"]), task=d["task"], split=d["split"],
                   reference_id=d["reference_id"], candidate_id=d["candidate_id"],
                   classes=tuple(ClassDelta.from_dict(c) for c in d["classes"]), macro=macro,
                   n_boot=int(d["n_boot"]), seed=int(d["seed"]),
                   confidence=float(d["confidence"]), threshold_source=d["threshold_source"],
                   n_unmatched=int(d.get("n_unmatched", 0)), meta=dict(d.get("meta", {})),
                   delong=dict(d.get("delong", {})))

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        if p.suffix != ".json":
            return write_artifact_at(p, "comparison", self)
        return write_json(p, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PairedComparison":
        p = Path(path)
        return cls.from_dict(read_json(p / FILENAME if p.is_dir() else p))


# ----------------------------------------------------------------------------- compare
def _align(reference: Predictions, candidate: Predictions) -> tuple[Predictions, Predictions, int]:
    if tuple(reference.class_names) != tuple(candidate.class_names):
        raise DataError(f"compare_predictions: the class lists differ: reference "
                        f"{list(reference.class_names)} vs candidate "
                        f"{list(candidate.class_names)}. Compare models trained on the same "
                        "label set.")
    if reference.task != candidate.task:
        raise DataError(f"compare_predictions: task '{reference.task}' vs '{candidate.task}'.")
    if list(reference.ids) == list(candidate.ids):
        return reference, candidate, 0
    ids_r, ids_c = set(reference.ids), set(candidate.ids)
    common = ids_r & ids_c
    if not common:
        raise DataError("compare_predictions: the two Predictions share no image id; predict "
                        "both models on the same dataset split (same --data and --split).")
    r, c = reference.align(candidate)
    return r, c, len(ids_r ^ ids_c)


def _thresholds(preds: Predictions, thresholds: Sequence[float] | None) -> tuple[np.ndarray, str]:
    k = preds.num_classes
    if thresholds is None:
        return np.full(k, 0.5), "default 0.5"
    thr = np.asarray(thresholds, dtype=float).reshape(-1)
    if thr.shape != (k,):
        raise ConfigError(f"The 'thresholds' parameter of compare_predictions must hold one "
                          f"probability per class ({k}). Got {thr.size} instead.")
    return thr, "given"


def _decisions(preds: Predictions, thr: np.ndarray) -> np.ndarray:
    p = preds.probs()
    if preds.task == "multiclass":
        d = np.zeros_like(p, dtype=bool)
        d[np.arange(preds.n), p.argmax(1)] = True
        return d
    return p >= thr[None, :]


def _ci(v: np.ndarray, confidence: float) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if v.size < 10:
        return (float("nan"), float("nan"))
    a = (1.0 - confidence) / 2.0
    return (float(np.quantile(v, a)), float(np.quantile(v, 1.0 - a)))


def _replicate_weights(n: int, n_boot: int, rng: np.random.Generator):
    """Blocks of multinomial counts ``[b, n]`` (one row per bootstrap replicate)."""
    done = 0
    while done < n_boot:
        b = min(_CHUNK, n_boot - done)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)
        done += b


def compare_predictions(reference: Predictions, candidate: Predictions, *, n_boot: int = 1000,
                        seed: int = 0, thresholds: Sequence[float] | None = None,
                        confidence: float = 0.95,
                        boot_metrics: Sequence[str] = METRICS) -> PairedComparison:
    """Per-class and macro deltas (candidate - reference) with paired bootstrap CIs.

    Args:
        reference: predictions of the reference (e.g. dense) model.
        candidate: predictions of the candidate (compressed) model on the same images (aligned
            by image id; images present in only one are left out and counted).
        n_boot: bootstrap replicates (images resampled jointly for both models); 0: no CIs.
        seed: bootstrap seed.
        thresholds: per-class probability thresholds for sensitivity / specificity (default
            0.5; multi-class uses the argmax). Pass the reference model's stored thresholds to
            see what a deployed pipeline would do with the candidate.
        confidence: CI level.
        boot_metrics: the metrics that get bootstrap CIs (and replicates for
            :meth:`PairedComparison.verdict`); the others keep their point values and NaN CIs
            (recorded in ``meta["boot_metrics"]``). E.g. ``("auroc",)``: a third of the time.

    Raises:
        DataError: different class lists or tasks, or no common image.
        ConfigError: an unknown metric in ``boot_metrics``.
    """
    check_range(n_boot, "n_boot", "compare_predictions", 0, integer=True)
    check_range(confidence, "confidence", "compare_predictions", 0.5, 0.999)
    boot_metrics = tuple(boot_metrics)
    for m in boot_metrics:
        check_in(m, "boot_metrics", "compare_predictions", METRICS)
    ref, cand, unmatched = _align(reference, candidate)
    thr, thr_source = _thresholds(ref, thresholds)
    n, k = ref.n, ref.num_classes
    t = ref.targets()
    pr, pc = ref.probs().astype(np.float64), cand.probs().astype(np.float64)
    dr, dc = _decisions(ref, thr), _decisions(cand, thr)
    point = _point_metrics(t, pr, pc, dr, dc)
    boots = [{f"{side}_{m}": [] for side in ("ref", "new") for m in boot_metrics}
             for _ in range(k)]
    acc_boot: dict[str, list[np.ndarray]] = {"ref": [], "new": []}
    rng = np.random.default_rng(seed)
    if n_boot:
        _bootstrap(ref, point, (pr, pc), (dr, dc), n_boot, rng, boot_metrics, boots, acc_boot)
    reps = {m: np.full((k, n_boot), np.nan) for m in boot_metrics}
    classes = [_class_delta(name, point[j], boots[j], reps, j, n_boot, boot_metrics, confidence,
                            None if ref.task == "multiclass" else float(thr[j]))
               for j, name in enumerate(ref.class_names)]
    macro = _macro(classes, boots, n_boot, confidence)
    if ref.task == "multiclass":
        macro.update(_multiclass_accuracy(ref.labels, pr, pc, acc_boot, n_boot, confidence))
    if unmatched:
        logger.warning("compare_predictions: %d images are in only one of the two Predictions "
                       "and were left out", unmatched)
    return PairedComparison(n=n, task=ref.task, split=ref.split, reference_id=ref.model_id,
                            candidate_id=cand.model_id, classes=tuple(classes), macro=macro,
                            n_boot=n_boot, seed=seed, confidence=confidence,
                            threshold_source="argmax" if ref.task == "multiclass" else thr_source,
                            n_unmatched=unmatched, delong=_delong(t, pr, pc),
                            meta={"boot_metrics": list(boot_metrics)},
                            replicates=reps if n_boot else None)


def _point_metrics(t: np.ndarray, pr: np.ndarray, pc: np.ndarray, dr: np.ndarray,
                   dc: np.ndarray) -> list[dict[str, Any]]:
    """Per class: the images with a known label, their labels and both models' point metrics
    (every metric of :data:`METRICS`, unit weights)."""
    ones = np.ones((1, t.shape[0]))
    point: list[dict[str, Any]] = []
    for j in range(t.shape[1]):
        known = np.isfinite(t[:, j])
        y = t[known, j] > 0.5
        fr = class_metrics(y, pr[known, j], dr[known, j], ones[:, known])
        fc = class_metrics(y, pc[known, j], dc[known, j], ones[:, known])
        point.append({"known": known, "y": y, "ref": {m: float(fr[m][0]) for m in METRICS},
                      "new": {m: float(fc[m][0]) for m in METRICS}})
    return point


def _bootstrap(ref: Predictions, point: list[dict[str, Any]],
               probs: tuple[np.ndarray, np.ndarray], decided: tuple[np.ndarray, np.ndarray],
               n_boot: int, rng: np.random.Generator, boot_metrics: tuple[str, ...],
               boots: list[dict[str, list]], acc_boot: dict[str, list[np.ndarray]]) -> None:
    """Append the paired bootstrap replicates (one resample of images for both models) of each
    class's ``boot_metrics`` to ``boots`` and, multi-class, of the accuracy to ``acc_boot``."""
    (pr, pc), (dr, dc) = probs, decided
    n = ref.n
    y_mc = ref.labels if ref.task == "multiclass" else None
    for w in _replicate_weights(n, n_boot, rng):
        for j in range(len(point)):
            known, y = point[j]["known"], point[j]["y"]
            wk = w[:, known]
            for side, p, d in (("ref", pr, dr), ("new", pc, dc)):
                vals = class_metrics(y, p[known, j], d[known, j], wk, boot_metrics)
                for m in boot_metrics:
                    boots[j][f"{side}_{m}"].append(vals[m])
        if y_mc is not None:
            for side, p in (("ref", pr), ("new", pc)):
                acc_boot[side].append((w @ (p.argmax(1) == y_mc)) / n)


def _class_delta(name: str, point: dict[str, Any], boots: dict[str, list],
                 reps: dict[str, np.ndarray], j: int, n_boot: int, boot_metrics: tuple[str, ...],
                 confidence: float, threshold: float | None) -> ClassDelta:
    """One class's :class:`ClassDelta` from its point metrics and bootstrap replicates; stores
    the replicate deltas in row ``j`` of ``reps``."""
    y = point["y"]
    npos, nneg = int(y.sum()), int((~y).sum())
    reason = (f"no positive images of '{name}'" if npos == 0 else
              f"no negative images of '{name}'" if nneg == 0 else "")
    kw: dict[str, Any] = {}
    for m in METRICS:
        a, b = point["ref"][m], point["new"][m]
        kw[f"{m}_ref"], kw[f"{m}_new"], kw[f"delta_{m}"] = a, b, b - a
        if n_boot and m in boot_metrics:
            diff = np.concatenate(boots[f"new_{m}"]) - np.concatenate(boots[f"ref_{m}"])
            reps[m][j] = diff
            kw[f"delta_{m}_ci"] = _ci(diff, confidence)
        else:
            kw[f"delta_{m}_ci"] = (float("nan"), float("nan"))
    kw["n_nan_replicates"] = (int(np.isnan(reps["auroc"][j]).sum())
                              if n_boot and "auroc" in reps else 0)
    return ClassDelta(name=name, n_pos=npos, n_neg=nneg, threshold=threshold, reason=reason,
                      **kw)


def _multiclass_accuracy(labels: np.ndarray, pr: np.ndarray, pc: np.ndarray,
                         acc_boot: dict[str, list[np.ndarray]], n_boot: int,
                         confidence: float) -> dict[str, Any]:
    """The macro entries of a multi-class comparison: both accuracies, their delta and its CI."""
    a_ref = float(np.mean(pr.argmax(1) == labels))
    a_new = float(np.mean(pc.argmax(1) == labels))
    return dict(accuracy_ref=a_ref, accuracy_new=a_new, delta_accuracy=a_new - a_ref,
                delta_accuracy_ci=_ci(np.concatenate(acc_boot["new"]) -
                                      np.concatenate(acc_boot["ref"]), confidence)
                if n_boot else (float("nan"), float("nan")))


def _delong(t: np.ndarray, pr: np.ndarray, pc: np.ndarray) -> dict[str, Any]:
    """Paired DeLong deltas and covariance of the per-class AUROCs (for verdict(method=...))."""
    delta, cov = delong_covariance(t, pr, pc)
    return {"delta_auroc": delta.tolist(), "cov": cov.tolist()}


def _macro(classes: list[ClassDelta], boots: list[dict[str, list]], n_boot: int,
           confidence: float) -> dict[str, Any]:
    scored = [j for j, c in enumerate(classes) if not c.reason]
    out: dict[str, Any] = {"n_classes_scored": len(scored)}
    if n_boot and scored and boots[scored[0]].get("ref_auroc"):
        # replicates in which some scored class had no positive / negative image: the macro
        # CIs below average over the classes that were defined in each such replicate
        undefined = np.stack([np.isnan(np.concatenate(boots[j]["ref_auroc"])) for j in scored])
        out["n_replicates_with_undefined_class"] = int(undefined.any(0).sum())
    for m in METRICS:
        for side in ("ref", "new"):
            vals = [getattr(classes[j], f"{m}_{side}") for j in scored]
            out[f"{m}_{side}"] = float(np.nanmean(vals)) if scored and \
                np.isfinite(vals).any() else float("nan")
        out[f"delta_{m}"] = out[f"{m}_new"] - out[f"{m}_ref"]
        if n_boot and scored and f"ref_{m}" in boots[scored[0]]:
            with np.errstate(invalid="ignore"), \
                    warnings.catch_warnings(action="ignore", category=RuntimeWarning):
                ref = np.nanmean(np.stack([np.concatenate(boots[j][f"ref_{m}"])
                                           for j in scored]), axis=0)
                new = np.nanmean(np.stack([np.concatenate(boots[j][f"new_{m}"])
                                           for j in scored]), axis=0)
            out[f"delta_{m}_ci"] = _ci(new - ref, confidence)
            # each model's own macro CI from the same (paired) replicates
            out[f"{m}_ref_ci"], out[f"{m}_new_ci"] = _ci(ref, confidence), _ci(new, confidence)
        else:
            out[f"delta_{m}_ci"] = (float("nan"), float("nan"))
            out[f"{m}_ref_ci"] = out[f"{m}_new_ci"] = (float("nan"), float("nan"))
    return out
