"""Cost-aware treatment router: diagnose each class, try treatments cheapest-first, keep what
helps on held-out data, and learn what each treatment really costs.

**Diagnosis** (on the fit / validation split, at the current thresholds; limits in
:class:`DiagnosisCriteria`, all user-settable):

================  ==========================================================================
``low_recall``     recall < ``min_recall`` (0.5)
``low_precision``  precision < ``min_precision`` (0.3) with at least ``min_fp`` false positives
``miscalibrated``  expected calibration error (10 equal-width bins) > ``max_ece`` (0.1)
``fp_cluster``     >= ``min_fp`` (5) false positives, and one channel is among the top-3
                   contributors to logit k for >= ``cluster_share`` (50 %) of them but for at
                   most half as large a share of the true positives
``confounder``     a named per-image flag (e.g. ``chest_tube``) multiplies the false-positive
                   rate of k's negatives by >= ``confounder_ratio`` (2) with >= ``min_fp``
                   flagged false positives
``low_auroc``      AUROC < ``min_auroc`` (0.75)
================  ==========================================================================

**Treatment** (per class with issues): the treatments that treat one of its open issues are
tried in order of current cost (:class:`CostMatrix`); each is fitted on the fit split and its
effect measured on the **held-out** split, with its wall time. An attempt **helped** when its
paired verdict (:mod:`medscalpel.repair.helped`; pass / fail / undecided, Holm, minimum
evidence) shows on the held-out images that the metric of the issue it is tried for improved by
at least its ``min_gain`` (recall issue: Youden's J; precision: F1; miscalibration: ECE;
false-positive cluster / confounder: specificity; low AUROC: AUROC), that the class's AUROC fell
by at most ``max_auroc_drop`` (0.01) and (false-positive issues) its recall by at most
``max_recall_drop`` (0.05). A point estimate decides nothing: an attempt the images cannot judge
is ``undecided`` and not kept (the other open issues' metrics are side effects: only a loss
shown there blocks). The held-out data is split once (seeded) into a **selection** part, on
which "helped" is judged, and an untouched **report** part (``report_fraction``, default half),
on which the before/after numbers of every class are reported: judging and reporting on the
same images would overstate the gains (selection bias).
A helpful attempt is kept (the next one starts from it) and the
class is re-diagnosed on the fit split; the router escalates to the next treatment while issues
remain. Treatments that need images (augmentation, full retraining) or whose current cost
exceeds ``budget`` are listed as proposals with their estimated cost and time, not run.

**Costs**: :class:`CostMatrix` starts from seed 000's units and updates from measured seconds:
``units(s) = 1 + 2 log10(1 + s)`` (0 s -> 1, 5 s -> 2.6, 85 s -> 4.9, 1 h -> 8.1, 10 h -> 10.1),
an exponential moving average (``alpha``) of measured seconds per treatment, and a shrinkage
toward the initial cost: ``cost = (k0 * initial + n * units(ema)) / (k0 + n)`` after ``n``
measurements (``k0 = prior_strength``). It is saved to / loaded from a JSON file, so the costs
persist between runs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.engine.metrics import auroc, expected_calibration_error
from medscalpel.engine.predict import Features
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.repair.helped import (ISSUE_METRIC, boot_weights, class_arrays, evidence_text,
                                      helped_record, helped_verdict, needed_metrics, paired_deltas)
from medscalpel.repair.surgery.helpers import label_k, margins, sigmoid
from medscalpel.repair.treatments import (ISSUES, TREATMENTS, Attempt, RepairState, Treatment,
                                          initial_costs)
from medscalpel.runs import read_json, write_json, write_text
from medscalpel.validation import check_fraction, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1


# ----------------------------------------------------------------------------- costs
def seconds_to_units(seconds: float) -> float:
    """Cost units of a measured wall time: ``1 + 2 log10(1 + s)``."""
    return 1.0 + 2.0 * math.log10(1.0 + max(0.0, float(seconds)))


def units_to_seconds(units: float) -> float:
    """Inverse of :func:`seconds_to_units` (an estimate of wall time for a cost)."""
    return max(0.0, 10 ** ((float(units) - 1.0) / 2.0) - 1.0)


@dataclass
class CostMatrix:
    """Empirical cost per treatment, learned from measured wall times.

    Example:
        >>> cm = CostMatrix()
        >>> cm.cost("threshold")
        1.0
        >>> cm.update("retrain_partial", 85.0)
        >>> round(cm.cost("retrain_partial"), 2)
        2.96
    """

    initial: dict[str, float] = field(default_factory=initial_costs)
    seconds_ema: dict[str, float] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    alpha: float = 0.3
    prior_strength: float = 2.0

    def __post_init__(self):
        check_fraction(self.alpha, "alpha", "CostMatrix", allow_one=True)
        check_range(self.prior_strength, "prior_strength", "CostMatrix", 0)

    def cost(self, name: str) -> float:
        if name not in self.initial:
            raise ConfigError(f"CostMatrix: no cost for treatment {name!r}. Known: "
                              f"{', '.join(sorted(self.initial))}.")
        n = self.runs.get(name, 0)
        if n == 0 or name == "none":
            return float(self.initial[name])
        k0 = self.prior_strength
        return float((k0 * self.initial[name] + n * seconds_to_units(self.seconds_ema[name]))
                     / (k0 + n))

    def estimated_seconds(self, name: str) -> float:
        if self.runs.get(name, 0):
            return float(self.seconds_ema[name])
        tr = TREATMENTS.get(name) if name in TREATMENTS else None
        return float(tr.typical_seconds) if tr is not None and tr.typical_seconds else \
            units_to_seconds(self.cost(name))

    def update(self, name: str, seconds: float) -> None:
        """Fold one measured wall time into the moving average."""
        check_range(float(seconds), "seconds", "CostMatrix.update", 0)
        if name not in self.initial:
            self.initial[name] = seconds_to_units(seconds)
        prev = self.seconds_ema.get(name)
        self.seconds_ema[name] = float(seconds) if prev is None else \
            float(self.alpha * seconds + (1 - self.alpha) * prev)
        self.runs[name] = self.runs.get(name, 0) + 1

    def table(self) -> list[dict[str, Any]]:
        return [{"treatment": n, "initial": self.initial[n], "cost": self.cost(n),
                 "runs": self.runs.get(n, 0), "seconds_ema": self.seconds_ema.get(n)}
                for n in sorted(self.initial, key=lambda x: (self.initial[x], x))]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, **asdict(self),
                "current": {n: self.cost(n) for n in self.initial}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostMatrix":
        base = initial_costs()
        base.update({k: float(v) for k, v in d.get("initial", {}).items()})
        return cls(initial=base, seconds_ema={k: float(v) for k, v in
                                               d.get("seconds_ema", {}).items()},
                   runs={k: int(v) for k, v in d.get("runs", {}).items()},
                   alpha=float(d.get("alpha", 0.3)),
                   prior_strength=float(d.get("prior_strength", 2.0)))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CostMatrix":
        return cls.from_dict(read_json(path))


# ----------------------------------------------------------------------------- diagnosis
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


# ----------------------------------------------------------------------------- results
@dataclass
class ClassDecision:
    """What the router did for one class."""

    name: str
    issues: list[dict[str, Any]]
    before: dict[str, float]
    after: dict[str, float]
    attempts: list[dict[str, Any]]
    chosen: list[str]
    remaining: list[str]
    report_before: dict[str, float] = field(default_factory=dict)
    report_after: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        issues = [{k: v for k, v in i.items() if k != "rows"} | {"n_rows": len(i.get("rows", []))}
                  for i in self.issues]
        gain = {k: self.report_after[k] - v for k, v in self.report_before.items()
                if k in self.report_after and isinstance(v, (int, float))
                and isinstance(self.report_after[k], (int, float))}
        return {"class": self.name, "issues": issues, "selection_before": self.before,
                "selection_after": self.after, "report_before": self.report_before,
                "report_after": self.report_after, "report_gain": gain,
                "attempts": self.attempts, "chosen": self.chosen,
                "remaining_issues": self.remaining}


@dataclass
class TriageResult:
    """The decision log: per class, what was tried, what it cost, what it gained, what was
    chosen; plus the final state and the cost matrix before and after."""

    classes: list[ClassDecision]
    thresholds: list[float]
    costs_before: dict[str, Any]
    costs_after: dict[str, Any]
    settings: dict[str, Any]
    seconds: float
    state: RepairState | None = field(default=None, repr=False)
    model_dir: str | None = None

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for c in self.classes:
            for a in c.attempts or [{"treatment": "none", "status": "no issue", "cost": 0.0,
                                     "seconds": 0.0, "gain": {}}]:
                rows.append({"class": c.name,
                             "issues": ",".join(i["kind"] for i in c.issues) or "-",
                             "treatment": a["treatment"], "status": a["status"],
                             "cost": a.get("cost"), "seconds": a.get("seconds"),
                             "gain": "; ".join(f"{k} {v:+.3f}" for k, v in a.get("gain", {}).items()
                                               if v is not None and np.isfinite(v)) or "-",
                             "evidence": evidence_text(a),
                             "chosen": "yes" if a["treatment"] in c.chosen else ""})
        return rows

    def markdown(self) -> str:
        rows = self.table()
        if not rows:
            return "(no classes)\n"
        cols = list(rows[0])

        def f(v):
            if isinstance(v, float):
                return f"{v:.3g}"
            return "" if v is None else str(v)

        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(f(r[c]) for c in cols) + " |" for r in rows]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "classes": [c.to_dict() for c in self.classes],
                "thresholds": self.thresholds, "costs_before": self.costs_before,
                "costs_after": self.costs_after, "settings": self.settings,
                "seconds": self.seconds, "model_dir": self.model_dir}

    def save(self, out_dir: str | os.PathLike, model=None) -> Path:
        """``decision_log.json`` + ``decision_log.md``; with a model, the repaired model directory
        (new classifier + thresholds in ``model.json``, a ``triage`` lineage step)."""
        out = Path(out_dir)
        if model is not None and self.state is not None:
            from dataclasses import replace

            from medscalpel.models.checkpoint import save_model
            from medscalpel.repair.retrain import with_classifier

            if model.card is None:
                raise ConfigError("TriageResult.save: the model has no ModelCard.")
            new = with_classifier(model, self.state.weight, self.state.bias) \
                if self.state.weight is not None else __import__("copy").deepcopy(model)
            card = replace(model.card, thresholds=tuple(float(t) for t in self.thresholds))
            card = card.with_lineage("triage", parent=model.card.model_id,
                                     chosen={c.name: c.chosen for c in self.classes if c.chosen})
            save_model(new, out / "model", card)
            self.model_dir = "model"  # relative to the decision log's directory
        write_json(out / "decision_log.json", self.to_dict())
        write_text(out / "decision_log.md", self.markdown())
        return out


# ----------------------------------------------------------------------------- router
class TreatmentRouter:
    """Route each class's issues to the cheapest treatment that helps on held-out data.

    Args:
        costs: a :class:`CostMatrix`, a dict of initial costs, a path to a saved matrix, or None
            (seed 000's).
        budget: largest current cost a treatment may have to be run; dearer ones are proposed
            with their estimated cost and time.
        criteria: :class:`DiagnosisCriteria`.
        cost_path: JSON file the cost matrix is loaded from (when it exists) at :meth:`fit` and
            saved to after :meth:`run`.
        treatments: names to consider (default: all registered), with optional parameters in
            ``treatment_params`` (``{"surgery": {"delta_prob": 0.2}}``).
        max_auroc_drop, max_recall_drop: guards of "helped" (see the module docstring).
        min_gain: overrides of the per-issue minimal gains (:data:`ISSUE_METRIC`).
        report_fraction: share of the held-out images kept untouched for the reported
            numbers (the rest judges "helped"); seeded by ``seed``.
        n_boot, level, min_pos, min_neg: the paired verdict of "helped" (bootstrap replicates
            of the selection images, two-sided confidence of the family, minimum positive /
            negative selection images of the class; see :mod:`medscalpel.repair.helped`).

    Attributes (after :meth:`fit`): ``costs_`` (CostMatrix), ``state_`` (RepairState),
    ``issues_`` (class -> issues on the fit split), ``fit_metrics_``.

    Example:
        >>> router = TreatmentRouter(budget=5)  # doctest: +SKIP
        >>> log = router.fit(val_features).run(test_features)  # doctest: +SKIP
    """

    def __init__(self, costs: CostMatrix | dict[str, float] | str | os.PathLike | None = None,
                 budget: float = 5.0, criteria: DiagnosisCriteria | None = None,
                 cost_path: str | os.PathLike | None = None,
                 treatments: list[str] | None = None,
                 treatment_params: dict[str, dict[str, Any]] | None = None,
                 max_auroc_drop: float = 0.01, max_recall_drop: float = 0.05,
                 min_gain: dict[str, float] | None = None, report_fraction: float = 0.5,
                 seed: int = 0, n_boot: int = 1000, level: float = 0.95, min_pos: int = 10,
                 min_neg: int = 10):
        self.costs = costs
        self.budget = budget
        self.criteria = criteria
        self.cost_path = cost_path
        self.treatments = treatments
        self.treatment_params = treatment_params
        self.max_auroc_drop = max_auroc_drop
        self.max_recall_drop = max_recall_drop
        self.min_gain = min_gain
        self.report_fraction = report_fraction
        self.seed = seed
        self.n_boot = n_boot
        self.level = level
        self.min_pos = min_pos
        self.min_neg = min_neg

    # ------------------------------------------------------------------ fit
    def _cost_matrix(self) -> CostMatrix:
        if self.cost_path is not None and Path(self.cost_path).is_file():
            return CostMatrix.load(self.cost_path)
        c = self.costs
        if c is None:
            return CostMatrix()
        if isinstance(c, CostMatrix):
            return CostMatrix.from_dict(c.to_dict())
        if isinstance(c, dict):
            base = initial_costs()
            unknown = set(c) - set(base)
            if unknown:
                raise ConfigError(f"TreatmentRouter: unknown treatment(s) {sorted(unknown)} in "
                                  f"costs. Known: {', '.join(sorted(base))}.")
            base.update({k: float(v) for k, v in c.items()})
            return CostMatrix(initial=base)
        return CostMatrix.load(c)

    def fit(self, data: Features | Predictions, thresholds: list[float] | None = None,
            confounders: dict[str, np.ndarray] | None = None) -> "TreatmentRouter":
        """Diagnose every class on ``data`` (the split treatments are fitted on)."""
        o = "TreatmentRouter"
        check_range(self.budget, "budget", o, 0)
        check_fraction(self.max_auroc_drop, "max_auroc_drop", o, allow_one=True)
        check_fraction(self.max_recall_drop, "max_recall_drop", o, allow_one=True)
        check_range(self.n_boot, "n_boot", o, 10, integer=True)
        check_range(self.level, "level", o, 0.5, 1.0, low_inclusive=False, high_inclusive=False)
        check_range(self.min_pos, "min_pos", o, 0, integer=True)
        check_range(self.min_neg, "min_neg", o, 0, integer=True)
        if not isinstance(data, (Features, Predictions)):
            raise DataError(f"{o}.fit: data must be Features or Predictions; got "
                            f"{type(data).__name__}.")
        names = TREATMENTS.names() if self.treatments is None else list(self.treatments)
        for n in names:
            TREATMENTS.get(n)
        self.criteria_ = self.criteria or DiagnosisCriteria()
        self.costs_ = self._cost_matrix()
        self.costs_before_ = self.costs_.to_dict()
        k = len(data.class_names)
        thr = np.full(k, 0.5) if thresholds is None else np.asarray(thresholds, np.float64)
        if thr.shape != (k,):
            raise ConfigError(f"{o}.fit: {thr.size} thresholds for {k} classes.")
        if isinstance(data, Features):
            self.state_ = RepairState(thr.copy(), data.weight.astype(np.float64).copy(),
                                      data.bias.astype(np.float64).copy())
        else:
            self.state_ = RepairState(thr.copy())
        self.fit_data_ = data
        self.confounders_ = dict(confounders or {})
        self.treatment_names_ = names
        self.issues_, self.fit_metrics_ = {}, {}
        logits = self.state_.logits(data)
        for j, cname in enumerate(data.class_names):
            issues, m = diagnose_class(logits, data, j, float(thr[j]), self.criteria_,
                                       self.state_.weight, self.confounders_)
            self.issues_[cname], self.fit_metrics_[cname] = issues, m
        return self

    # ------------------------------------------------------------------ run
    def _min_gain(self, kind: str) -> float:
        return float((self.min_gain or {}).get(kind, ISSUE_METRIC[kind][2]))

    def _helped(self, kinds: list[str], primary: str, j: int, cur_state: RepairState,
                new_state: RepairState, part: Features | Predictions,
                flags: np.ndarray | None, before: dict, after: dict,
                weights: np.ndarray) -> dict[str, Any]:
        """The paired verdicts of one attempt on the selection images (:func:`helped_verdict`)."""
        bins = self.criteria_.ece_bins
        ab = class_arrays(cur_state.logits(part), part.labels, part.task, j,
                          float(cur_state.thresholds[j]), flags)
        aa = class_arrays(new_state.logits(part), part.labels, part.task, j,
                          float(new_state.thresholds[j]), flags)
        deltas = paired_deltas(ab, aa, weights, needed_metrics(kinds, primary), bins)
        return helped_verdict(kinds, primary, before, after, deltas, self._min_gain,
                              max_auroc_drop=self.max_auroc_drop,
                              max_recall_drop=self.max_recall_drop, n=len(part.ids),
                              n_boot=self.n_boot, seed=self.seed, level=self.level,
                              min_pos=self.min_pos, min_neg=self.min_neg)

    def _split_held_out(self, held_out: Features | Predictions) -> tuple[np.ndarray, np.ndarray]:
        """Seeded split of the held-out rows into (selection, report) parts."""
        check_range(self.report_fraction, "report_fraction", "TreatmentRouter", 0.0, 1.0,
                    low_inclusive=False, high_inclusive=False)
        n = len(held_out.ids)
        n_rep = int(round(n * self.report_fraction))
        if n_rep < 1 or n - n_rep < 1:
            raise DataError(f"TreatmentRouter.run: {n} held-out images cannot be split into a "
                            f"selection and a report part (report_fraction "
                            f"{self.report_fraction}); give at least 2 held-out images.")
        perm = np.random.default_rng(self.seed).permutation(n)
        return np.sort(perm[n_rep:]), np.sort(perm[:n_rep])

    def run(self, held_out: Features | Predictions,
            confounders: dict[str, np.ndarray] | None = None) -> TriageResult:
        """Treat every diagnosed class; measure each attempt on ``held_out``."""
        if not hasattr(self, "state_"):
            raise ConfigError("This TreatmentRouter is not fitted yet: call fit() first.")
        fit = self.fit_data_
        if tuple(held_out.class_names) != tuple(fit.class_names):
            raise DataError("TreatmentRouter.run: the held-out split has other classes than the "
                            "fit split.")
        overlap = set(held_out.ids) & set(fit.ids)
        if overlap:
            raise DataError(f"TreatmentRouter.run: {len(overlap)} images are in both the fit and "
                            f"the held-out split (e.g. {sorted(overlap)[0]!r}); the effect must be "
                            "measured on images the treatments were not fitted on.")
        if isinstance(held_out, Predictions) and isinstance(fit, Features):
            raise DataError("TreatmentRouter.run: the fit split is Features, so the held-out "
                            "split must be Features too (changed weights need features).")
        sel_rows, rep_rows = self._split_held_out(held_out)
        selection, report = held_out.select(sel_rows), held_out.select(rep_rows)
        weights = boot_weights(len(sel_rows), self.n_boot, self.seed)
        flags = dict(confounders or {})
        sel_flags = {k: np.asarray(v)[sel_rows] for k, v in flags.items()}
        rep_flags = {k: np.asarray(v)[rep_rows] for k, v in flags.items()}
        t_start = time.perf_counter()
        params = self.treatment_params or {}
        state = self.state_.copy()
        decisions = []
        for j, cname in enumerate(fit.class_names):
            issues = self.issues_[cname]

            def part_flags_of(part_flags=sel_flags) -> np.ndarray | None:
                conf = [i.get("confounder") for i in self.issues_[cname]
                        if i["kind"] == "confounder"]
                return part_flags.get(conf[0]) if conf and conf[0] in part_flags else None

            def held_metrics(st: RepairState, kinds: list[str], part=selection,
                             part_flags=sel_flags) -> dict[str, float]:
                return class_metrics(st.logits(part), part.labels, part.task, j,
                                     float(st.thresholds[j]), self.criteria_.ece_bins,
                                     part_flags_of(part_flags))

            before = held_metrics(state, [])
            rep_before = held_metrics(state, [], report, rep_flags)
            if not issues:
                decisions.append(ClassDecision(cname, [], before, before, [], ["none"], [],
                                               rep_before, rep_before))
                continue
            open_kinds = [i["kind"] for i in issues]
            cur_issues = list(issues)
            attempts, chosen, tried = [], [], set()
            cur = before
            while open_kinds:
                cands = [n for n in self.treatment_names_ if n not in tried and n != "none"
                         and set(open_kinds) & TREATMENTS.get(n).treats]
                if not cands:
                    break
                cands.sort(key=lambda n: (self.costs_.cost(n), TREATMENTS.get(n).initial_cost))
                name = cands[0]
                tried.add(name)
                tr: Treatment = TREATMENTS.get(name)(**params.get(name, {}))
                cost = self.costs_.cost(name)
                rec: dict[str, Any] = {"treatment": name, "cost": cost,
                                       "for": sorted(set(open_kinds) & tr.treats)}
                why_not = tr.can_run(fit, state)
                if why_not or cost > self.budget:
                    rec.update(status="proposed" if not why_not or not tr.runnable
                               else "not applicable",
                               reason=why_not or f"cost {cost:.2f} > budget {self.budget}",
                               estimated_seconds=self.costs_.estimated_seconds(name),
                               seconds=None, gain={})
                    if not tr.runnable:
                        rec["detail"] = tr.apply(state, j, fit, cur_issues).detail
                    attempts.append(rec)
                    continue
                t0 = time.perf_counter()
                try:
                    att: Attempt = tr.apply(state, j, fit, cur_issues)
                finally:
                    secs = time.perf_counter() - t0
                self.costs_.update(name, secs)
                rec["seconds"] = round(secs, 4)
                rec["detail"] = att.detail
                if att.state is None:
                    rec.update(status="failed", reason=att.reason, gain={})
                    attempts.append(rec)
                    continue
                after = held_metrics(att.state, open_kinds)
                kinds_all = sorted(set(i["kind"] for i in issues))
                rec["gain"] = {ISSUE_METRIC[kd][0]: after[ISSUE_METRIC[kd][0]] -
                               cur[ISSUE_METRIC[kd][0]] for kd in kinds_all}
                rec["gain"]["auroc"] = after["auroc"] - cur["auroc"]
                primary = next(kd for kd in open_kinds if kd in tr.treats)
                verdict = self._helped(open_kinds, primary, j, state, att.state, selection,
                                       part_flags_of(), cur, after, weights)
                rec.update(selection_after=after, **helped_record(verdict))
                rec["evidence"] = evidence_text(rec)
                attempts.append(rec)
                if verdict["outcome"] == "pass":
                    state, cur = att.state, after
                    chosen.append(name)
                    cur_issues, _ = diagnose_class(state.logits(fit), fit, j,
                                                   float(state.thresholds[j]), self.criteria_,
                                                   state.weight, self.confounders_)
                    open_kinds = [i["kind"] for i in cur_issues]
            decisions.append(ClassDecision(cname, issues, before, cur, attempts,
                                           chosen or ["none"], open_kinds, rep_before,
                                           held_metrics(state, [], report, rep_flags)))
        if self.cost_path is not None:
            self.costs_.save(self.cost_path)
        self.result_state_ = state
        return TriageResult(
            classes=decisions, thresholds=[float(t) for t in state.thresholds],
            costs_before=self.costs_before_, costs_after=self.costs_.to_dict(),
            settings={"budget": self.budget, "criteria": self.criteria_.to_dict(),
                      "treatments": self.treatment_names_, "fit_split": fit.split,
                      "held_out_split": held_out.split, "n_selection": int(len(sel_rows)),
                      "n_report": int(len(rep_rows)), "report_fraction": self.report_fraction,
                      "judged_on": "selection part of the held-out split",
                      "reported_on": "report part of the held-out split (untouched by the "
                                     "choice)", "max_auroc_drop": self.max_auroc_drop,
                      "max_recall_drop": self.max_recall_drop,
                      "min_gain": {k: self._min_gain(k) for k in ISSUES},
                      "helped_rule": "paired verdict on the selection part: improvement of the "
                                     "treated issue's metric >= its min_gain shown, guards "
                                     "non-inferior; Holm; undecided is not kept",
                      "n_boot": self.n_boot, "level": self.level, "min_pos": self.min_pos,
                      "min_neg": self.min_neg},
            seconds=round(time.perf_counter() - t_start, 3), state=state)


def triage(fit: Features | Predictions, held_out: Features | Predictions,
           thresholds: list[float] | None = None, budget: float = 5.0,
           cost_path: str | os.PathLike | None = None,
           criteria: DiagnosisCriteria | None = None,
           confounders: dict[str, np.ndarray] | None = None,
           held_out_confounders: dict[str, np.ndarray] | None = None,
           **router_kw: Any) -> TriageResult:
    """One call: ``TreatmentRouter(...).fit(fit, thresholds, confounders).run(held_out)``."""
    router = TreatmentRouter(budget=budget, cost_path=cost_path, criteria=criteria, **router_kw)
    return router.fit(fit, thresholds, confounders).run(held_out, held_out_confounders)
