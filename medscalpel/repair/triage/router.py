"""The treatment router: :class:`TreatmentRouter` diagnoses every class on the fit split,
tries the treatments of its open issues cheapest-first, judges each attempt on the held-out
split and learns the treatments' costs; :func:`triage` is the one call.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.engine.predict import Features
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.repair.helped import (ISSUE_METRIC, boot_weights, class_arrays, evidence_text,
                                      helped_record, helped_verdict, needed_metrics, paired_deltas)
from medscalpel.repair.treatments import (ISSUES, TREATMENTS, Attempt, RepairState, Treatment,
                                          initial_costs)
from medscalpel.repair.triage.costs import CostMatrix
from medscalpel.repair.triage.diagnosis import DiagnosisCriteria, class_metrics, diagnose_class
from medscalpel.repair.triage.result import ClassDecision, TriageResult
from medscalpel.validation import check_fraction, check_range


@dataclass(frozen=True)
class _HeldOutParts:
    """The held-out split, cut once (seeded) into the selection part that judges "helped" and
    the untouched report part, with their confounder flags and the selection's bootstrap
    weights."""

    selection: Features | Predictions
    report: Features | Predictions
    weights: np.ndarray
    sel_flags: dict[str, np.ndarray]
    rep_flags: dict[str, np.ndarray]
    n_selection: int
    n_report: int


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

    def _check_held_out(self, held_out: Features | Predictions) -> None:
        """Refuse an unfitted router and a held-out split that cannot judge the fit split's
        treatments (other classes, shared images, Predictions for a Features fit)."""
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

    def _held_out_parts(self, held_out: Features | Predictions,
                        confounders: dict[str, np.ndarray] | None) -> _HeldOutParts:
        """The held-out split cut into its selection and report parts (:meth:`_split_held_out`)
        with their confounder flags and the selection's bootstrap weights."""
        sel_rows, rep_rows = self._split_held_out(held_out)
        flags = dict(confounders or {})
        return _HeldOutParts(
            selection=held_out.select(sel_rows), report=held_out.select(rep_rows),
            weights=boot_weights(len(sel_rows), self.n_boot, self.seed),
            sel_flags={k: np.asarray(v)[sel_rows] for k, v in flags.items()},
            rep_flags={k: np.asarray(v)[rep_rows] for k, v in flags.items()},
            n_selection=int(len(sel_rows)), n_report=int(len(rep_rows)))

    def _class_flags(self, cname: str, part_flags: dict[str, np.ndarray]) -> np.ndarray | None:
        """The flags of the confounder diagnosed for ``cname`` on the fit split, in one part."""
        conf = [i.get("confounder") for i in self.issues_[cname] if i["kind"] == "confounder"]
        return part_flags.get(conf[0]) if conf and conf[0] in part_flags else None

    def _metrics(self, st: RepairState, part: Features | Predictions, j: int,
                 flags: np.ndarray | None) -> dict[str, float]:
        """:func:`class_metrics` of class ``j`` under state ``st`` on one part."""
        return class_metrics(st.logits(part), part.labels, part.task, j,
                             float(st.thresholds[j]), self.criteria_.ece_bins, flags)

    def _next_treatment(self, open_kinds: list[str], tried: set[str]) -> str | None:
        """The cheapest untried treatment that treats one of ``open_kinds`` (None: none)."""
        cands = [n for n in self.treatment_names_ if n not in tried and n != "none"
                 and set(open_kinds) & TREATMENTS.get(n).treats]
        if not cands:
            return None
        cands.sort(key=lambda n: (self.costs_.cost(n), TREATMENTS.get(n).initial_cost))
        return cands[0]

    def _attempt(self, name: str, j: int, state: RepairState, cur: dict[str, float],
                 open_kinds: list[str], cur_issues: list[dict[str, Any]],
                 issues: list[dict[str, Any]], parts: _HeldOutParts,
                 flags: np.ndarray | None
                 ) -> tuple[dict[str, Any], tuple[RepairState, dict[str, float]] | None]:
        """Try treatment ``name`` on class ``j``: its record (proposed, not applicable, failed
        or judged on the selection part, with its wall time folded into the costs) and, when it
        helped, the new state with its selection metrics."""
        fit = self.fit_data_
        tr: Treatment = TREATMENTS.get(name)(**(self.treatment_params or {}).get(name, {}))
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
            return rec, None
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
            return rec, None
        after = self._metrics(att.state, parts.selection, j, flags)
        rec["gain"] = _gains(issues, cur, after)
        primary = next(kd for kd in open_kinds if kd in tr.treats)
        verdict = self._helped(open_kinds, primary, j, state, att.state, parts.selection,
                               flags, cur, after, parts.weights)
        rec.update(selection_after=after, **helped_record(verdict))
        rec["evidence"] = evidence_text(rec)
        return rec, ((att.state, after) if verdict["outcome"] == "pass" else None)

    def _treat_class(self, j: int, cname: str, state: RepairState, parts: _HeldOutParts
                     ) -> tuple[ClassDecision, RepairState]:
        """Escalate through the treatments of class ``j``'s open issues, cheapest first,
        keeping each attempt that helped (then re-diagnosing on the fit split): the class's
        decision and the state after it."""
        fit = self.fit_data_
        issues = self.issues_[cname]
        sel_f = self._class_flags(cname, parts.sel_flags)
        rep_f = self._class_flags(cname, parts.rep_flags)
        before = self._metrics(state, parts.selection, j, sel_f)
        rep_before = self._metrics(state, parts.report, j, rep_f)
        if not issues:
            return ClassDecision(cname, [], before, before, [], ["none"], [], rep_before,
                                 rep_before), state
        open_kinds = [i["kind"] for i in issues]
        cur_issues = list(issues)
        attempts, chosen, tried = [], [], set()
        cur = before
        while open_kinds:
            name = self._next_treatment(open_kinds, tried)
            if name is None:
                break
            tried.add(name)
            rec, kept = self._attempt(name, j, state, cur, open_kinds, cur_issues, issues,
                                      parts, sel_f)
            attempts.append(rec)
            if kept is not None:
                state, cur = kept
                chosen.append(name)
                cur_issues, _ = diagnose_class(state.logits(fit), fit, j,
                                               float(state.thresholds[j]), self.criteria_,
                                               state.weight, self.confounders_)
                open_kinds = [i["kind"] for i in cur_issues]
        return ClassDecision(cname, issues, before, cur, attempts, chosen or ["none"],
                             open_kinds, rep_before,
                             self._metrics(state, parts.report, j, rep_f)), state

    def _settings(self, held_out: Features | Predictions, parts: _HeldOutParts
                  ) -> dict[str, Any]:
        """The decision log's ``settings``: what was asked and how "helped" was judged."""
        return {"budget": self.budget, "criteria": self.criteria_.to_dict(),
                "treatments": self.treatment_names_, "fit_split": self.fit_data_.split,
                "held_out_split": held_out.split, "n_selection": parts.n_selection,
                "n_report": parts.n_report, "report_fraction": self.report_fraction,
                "judged_on": "selection part of the held-out split",
                "reported_on": "report part of the held-out split (untouched by the "
                               "choice)", "max_auroc_drop": self.max_auroc_drop,
                "max_recall_drop": self.max_recall_drop,
                "min_gain": {k: self._min_gain(k) for k in ISSUES},
                "helped_rule": "paired verdict on the selection part: improvement of the "
                               "treated issue's metric >= its min_gain shown, guards "
                               "non-inferior; Holm; undecided is not kept",
                "n_boot": self.n_boot, "level": self.level, "min_pos": self.min_pos,
                "min_neg": self.min_neg}

    def run(self, held_out: Features | Predictions,
            confounders: dict[str, np.ndarray] | None = None) -> TriageResult:
        """Treat every diagnosed class; measure each attempt on ``held_out``."""
        self._check_held_out(held_out)
        parts = self._held_out_parts(held_out, confounders)
        t_start = time.perf_counter()
        state = self.state_.copy()
        decisions = []
        for j, cname in enumerate(self.fit_data_.class_names):
            decision, state = self._treat_class(j, cname, state, parts)
            decisions.append(decision)
        if self.cost_path is not None:
            self.costs_.save(self.cost_path)
        self.result_state_ = state
        return TriageResult(
            classes=decisions, thresholds=[float(t) for t in state.thresholds],
            costs_before=self.costs_before_, costs_after=self.costs_.to_dict(),
            settings=self._settings(held_out, parts),
            seconds=round(time.perf_counter() - t_start, 3), state=state)


def _gains(issues: list[dict[str, Any]], cur: dict[str, float], after: dict[str, float]
           ) -> dict[str, float]:
    """The change of the metric of each diagnosed issue kind, and of AUROC."""
    kinds_all = sorted(set(i["kind"] for i in issues))
    gain = {ISSUE_METRIC[kd][0]: after[ISSUE_METRIC[kd][0]] - cur[ISSUE_METRIC[kd][0]]
            for kd in kinds_all}
    gain["auroc"] = after["auroc"] - cur["auroc"]
    return gain


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
