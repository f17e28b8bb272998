"""The site recalibration workflow: fit on k labelled images, check on the rest, decide whether
the internal operating point is restored (:func:`recalibrate_site`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.engine.external import stored_thresholds
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import DataError
from medscalpel.repair.calibrate import cut_table
from medscalpel.repair.restored import class_outcomes, more_images_of, restored_verdict
from medscalpel.repair.shift.estimator import (AFFINE, SCHEMA, SiteRecalibrator, _positive_column,
                                               operating_point)
from medscalpel.repair.shift.sampling import _patient_keys, k_shot_draws, patient_ids_of
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- workflow
@dataclass(frozen=True)
class SiteRecalibration:
    """The k-shot recalibration of one model at one new site, measured on the rest.

    ``internal``: the internal operating point (per class, with CIs). ``before`` / ``after``:
    the external operating point on the REST (images not used to fit) at the stored / the
    recalibrated thresholds. ``restored_verdict``: the TOST verdict (two independent sets)
    (:mod:`medscalpel.repair.restored`) that |after - internal| <= ``tolerance`` for both
    sensitivity and specificity, Holm over every class; ``outcomes``: per class pass / fail /
    undecided; ``restored``: per class whether that outcome is pass (shown restored; False for
    fail AND undecided); ``verdict`` says it in words.
    """

    method: str
    k: int
    n_fit: int
    n_rest: int
    fit_ids: tuple[str, ...]
    thresholds_before: tuple[float, ...]
    recalibrator: dict[str, Any]
    internal: tuple[dict[str, Any], ...]
    before: tuple[dict[str, Any], ...]
    after: tuple[dict[str, Any], ...]
    restored: dict[str, bool]
    tolerance: float
    verdict: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    best_possible_gap: dict[str, float | None] = field(default_factory=dict)
    macro: dict[str, Any] = field(default_factory=dict)
    #: ``patient`` (the k-shot sample drawn by patient; the rest holds no image of a drawn
    #: patient) or ``image`` (no patient ids known: images drawn)
    split_unit: str = "image"
    n_fit_patients: int | None = None
    #: images left out of the rest because their patient was drawn into the sample
    n_excluded_same_patient: int = 0
    #: per class positives / negatives each class was fitted on (its own draws)
    fit_counts: dict[str, Any] = field(default_factory=dict)
    #: per recalibrated class the verdict's outcome: pass / fail / undecided
    outcomes: dict[str, str] = field(default_factory=dict)
    #: the TOST :class:`~medscalpel.engine.decision.Verdict` of "restored" (its dict; its
    #: units carry estimate, interval at the Holm level, n and positives / negatives)
    restored_verdict: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        return {"schema_version": SCHEMA, "kind": "site_recalibration", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SiteRecalibration":
        if d.get("kind") != "site_recalibration":
            raise DataError("Not a site-recalibration result (kind != 'site_recalibration').")
        kw = {k: v for k, v in d.items() if k not in ("schema_version", "kind")}
        for k in ("fit_ids", "thresholds_before", "internal", "before", "after", "notes"):
            kw[k] = tuple(kw[k])
        return cls(**kw)

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SiteRecalibration":
        return cls.from_dict(read_json(path))

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for i, b, a in zip(self.internal, self.before, self.after):
            if a["name"] not in self.restored:
                continue
            rows.append({"class": a["name"], "internal sens/spec":
                         f"{i['sensitivity']:.3f}/{i['specificity']:.3f}",
                         "external before": f"{b['sensitivity']:.3f}/{b['specificity']:.3f}",
                         "after": f"{a['sensitivity']:.3f}/{a['specificity']:.3f}",
                         "restored": self.outcomes.get(a["name"], "no verdict (older file)"),
                         "best possible gap": _fmt_gap(self.best_possible_gap.get(a["name"]))})
        return rows


def recalibrate_site(model: Any, internal: Predictions, external: Predictions, *, k: int = 20,
                     method: str = "threshold", classes: Sequence[str] | None = None,
                     thresholds: Sequence[float] | None = None, tolerance: float = 0.05,
                     n_boot: int = 1000, seed: int = 0, confidence: float = 0.95,
                     prevalence: str | Sequence[float] = "internal",
                     patient_ids: Sequence[str | None] | Mapping[str, str | None] | None = None
                     ) -> tuple[SiteRecalibration, SiteRecalibrator]:
    """Draw ``k`` labelled images per class of the external site, recalibrate on them and
    measure the operating point on the rest of the external set.

    Args:
        model: a model / ModelCard whose stored thresholds are the starting point (or None:
            ``thresholds``, else 0.5).
        internal: the model's internal (test) predictions: the operating point to restore.
        external: labelled predictions of the new site (the sample is drawn from them).
        k: labelled images per class (positives and negatives each, multi-label).
        classes: classes to recalibrate (default all; each needs ``k`` positives and negatives).
        tolerance: what "restored" means: |after - internal| <= tolerance for sens and spec,
            shown by a verdict (:mod:`medscalpel.repair.restored`: two one-sided tests per rate,
            Holm, >= 10 positives and negatives; pass / fail / undecided per class).
        confidence: level of the CIs and of the verdict.
        prevalence: what ``temperature`` / ``platt`` fit their probabilities at (the k-shot
            sample is class-balanced, not the site): ``internal`` (default: the internal set's
            prevalence; assumes no label shift) or ``[K]`` numbers (a known site prevalence).
            The internal reference fit is weighted to the same prevalence.
        patient_ids: the external images' patients (one per row, or image id -> patient id;
            default ``external.meta['patient_ids']``). Known, the sample is drawn BY PATIENT
            (:func:`k_shot_draws`) and no image of a drawn patient is measured on.

    Raises:
        DataError: too few labelled images (the message gives the minimum).
    """
    check_range(tolerance, "tolerance", "recalibrate_site", 0.0, 1.0)
    if tuple(internal.class_names) != tuple(external.class_names):
        raise DataError(f"recalibrate_site: internal classes {list(internal.class_names)} differ "
                        f"from external {list(external.class_names)}; map them first "
                        "(medscalpel.engine.external.map_class_names).")
    thr = (np.asarray(thresholds, float) if thresholds is not None
           else stored_thresholds(model, internal.num_classes)[0])
    pids = patient_ids_of(external, patient_ids)
    fit_rows, use = k_shot_draws(external, k, classes, seed, pids)
    rest_mask, n_fit_patients, n_same = _rest_mask(external, fit_rows, pids, k)
    sample, rest = external.select(fit_rows), external.select(rest_mask)
    if sample.task == "multilabel":  # each class fits on its own random draws only
        sample = replace(sample, labels=np.where(use, sample.labels, np.nan).astype(
            sample.labels.dtype))
    target = operating_point(internal, thr, n_boot, seed, confidence)
    prev, prev_label = _prevalence(internal, prevalence)
    rec = SiteRecalibrator(method, classes, min_per_class=min(k, 5),
                           prevalence=None if method not in AFFINE
                           else prev.tolist()).fit(sample, thr, target,
                                                   reference=internal,
                                                   unlabeled=external)
    before = operating_point(rest, thr, n_boot, seed + 1, confidence)
    after = operating_point(rec.transform(rest), rec.thresholds_, n_boot, seed + 1, confidence)
    names = [a["name"] for a in after if a["name"] in rec.recalibrated_]
    verdict_obj = restored_verdict(target, after, names, tolerance, level=confidence) \
        if names else None
    outcomes = class_outcomes(verdict_obj, names, tolerance) if verdict_obj else {}
    restored = {c: o == "pass" for c, o in outcomes.items()}
    best = best_possible_gap(rest, target, names)
    macro = macro_gap(target, after, names, tolerance)
    verdict = _restored_text(verdict_obj, outcomes, best, macro, method, k, tolerance)
    notes = _notes(method, len(fit_rows), rest.n, external.n, internal.n, pids is None,
                   n_fit_patients, n_same, prev_label)
    res = SiteRecalibration(
        method=method, k=k, n_fit=int(len(fit_rows)), n_rest=int(rest.n),
        fit_ids=tuple(sample.ids), thresholds_before=tuple(float(x) for x in thr),
        recalibrator=rec.to_dict(), internal=tuple(target), before=tuple(before),
        after=tuple(after), restored=restored, tolerance=tolerance, verdict=verdict, notes=notes,
        outcomes=outcomes,
        restored_verdict=verdict_obj.to_dict() if verdict_obj is not None else {},
        best_possible_gap=best, macro=macro,
        split_unit="image" if pids is None else "patient", n_fit_patients=n_fit_patients,
        n_excluded_same_patient=n_same, fit_counts=_fit_counts(sample))
    return res, rec


def _rest_mask(external: Predictions, fit_rows: np.ndarray, pids: Any, k: int
               ) -> tuple[np.ndarray, int | None, int]:
    """The images measured on: not drawn and (patients known) of no drawn patient. Returns the
    mask, the number of drawn patients (``None`` unknown) and the images left out for it."""
    rest_mask = np.ones(external.n, bool)
    rest_mask[fit_rows] = False
    n_fit_patients, n_same = None, 0
    if pids is not None:
        keys = _patient_keys(pids)
        drawn = set(keys[fit_rows])
        same = rest_mask & np.array([kk in drawn for kk in keys])
        n_same, n_fit_patients = int(same.sum()), len(drawn)
        rest_mask &= ~same
    if not rest_mask.any():
        raise DataError(f"recalibrate_site: the {k}-shot sample uses all {external.n} external "
                        "images; nothing is left to measure on. Use more images or lower k.")
    return rest_mask, n_fit_patients, n_same


def _prevalence(internal: Predictions, prevalence: str | Sequence[float]
                ) -> tuple[np.ndarray, str]:
    """The prevalence the logit maps fit at, and its label (``internal`` / ``given``)."""
    if isinstance(prevalence, str):
        check_in(prevalence, "prevalence", "recalibrate_site", ("internal",))
        return np.nanmean(internal.targets().astype(np.float64), axis=0), "internal"
    return np.asarray(prevalence, float), "given"


def _notes(method: str, n_fit: int, n_rest: int, n_external: int, n_internal: int,
           by_image: bool, n_fit_patients: int | None, n_same: int, prev_label: str
           ) -> tuple[str, ...]:
    """What the recalibration's numbers mean: where it was fitted and measured, what
    "restored" and the best possible gap are, and the method's assumptions."""
    notes = ((f"fitted on {n_fit} external images, measured on the other {n_rest}"
              if by_image else
              f"fitted on {n_fit} external images of {n_fit_patients} patients (drawn "
              f"by patient), measured on {n_rest} images of other patients ({n_same} more "
              "images of the drawn patients left out of both)"),
             "restored = a verdict (pass / fail / undecided): two one-sided tests per rate that "
             "sensitivity and specificity on the rest are within the tolerance of the internal "
             "ones, Holm over every test, >= 10 positives and negatives per class; the macro gap "
             "is a point estimate beside it",
             "best_possible_gap: per class the smallest max(|sens - internal|, |spec - "
             "internal|) ANY threshold reaches on the rest (its labels used: an upper bound on "
             "what any per-class recalibration can restore, not a method)")
    if method == "quantile":
        notes += (f"quantile: LABEL-FREE, thresholds set on the scores (not the labels) of all "
                  f"{n_external} site images, the rest included, so that each class flags the "
                  "share of images it flags internally; assumes the internal prevalence and "
                  "ranking at the site",)
    if method in AFFINE:
        notes += ((f"site scores mapped onto the internal score scale ({method} fitted on "
                   f"the sample and on the {n_internal} internal images, both at the "
                   f"{prev_label} prevalence"
                   + ("; the class-balanced k-shot sample reweighted, which assumes the new "
                      "site has the internal prevalence)" if prev_label == "internal" else ")")),)
    return notes


def _restored_text(v: Any, outcomes: dict[str, str], best: dict[str, float | None],
                   macro: dict[str, Any], method: str, k: int, tolerance: float) -> str:
    """The recalibration verdict in words: pass / fail / undecided per class, then advice."""
    if v is None:
        return "undecided: no class was recalibrated"
    by = {o: [c for c, x in outcomes.items() if x == o] for o in ("pass", "fail", "undecided")}
    head = (f"restored ({v.outcome}): " if v.outcome == "pass" else
            f"NOT restored ({v.outcome}): ")
    if v.outcome == "pass":
        return (head + f"all {len(by['pass'])} recalibrated classes shown within {tolerance} of "
                "the internal sensitivity and specificity (two one-sided tests per rate, Holm "
                f"over {v.n_tests})")
    parts = []
    if by["pass"]:
        parts.append(f"restored (pass) for {by['pass']}")
    if by["fail"]:
        parts.append(f"NOT restored (fail, shown) for {len(by['fail'])} of {len(outcomes)} "
                     f"classes ({by['fail']}): {method} recalibration with {k} labelled images "
                     f"per class did not bring them within {tolerance}")
    if by["undecided"]:
        more = [m for m in (more_images_of(v, c, tolerance) for c in by["undecided"])
                if m is not None]
        parts.append(f"undecided for {by['undecided']}: the rest of the site cannot show "
                     f"them within {tolerance} or outside it"
                     + (f" (~{max(more)} more images would likely decide, an estimate)"
                        if more else ""))
    open_ = by["fail"] + by["undecided"]
    lost = [c for c in open_ if best.get(c) is not None and best[c] > tolerance]
    txt = head + "; ".join(parts)
    if lost:
        txt += (f"; for {lost} NO threshold on this site would (the ranking itself is lost "
                "there: retrain, e.g. with the 'acquisition' augmentation profile or images of "
                "the site)")
    if by["fail"] and len(lost) < len(open_):
        txt += ("; the others are within reach of some threshold: label more images of the "
                "site (a larger k) or try another method")
    if macro:
        txt += (f"; macro over these classes (point estimates): sensitivity "
                f"{macro['sensitivity_gap']:+.3f}, specificity {macro['specificity_gap']:+.3f} "
                "vs internal (" + ("within" if macro["restored"] else "NOT within")
                + f" {tolerance})")
    return txt


def _fit_counts(sample: Predictions) -> dict[str, Any]:
    """Positives / negatives per class that each class was fitted on (its own draws)."""
    t = sample.targets()
    known = np.isfinite(t)
    return {"positives": {c: int(((t[:, j] > 0.5) & known[:, j]).sum())
                          for j, c in enumerate(sample.class_names)},
            "negatives": {c: int(((t[:, j] < 0.5) & known[:, j]).sum())
                          for j, c in enumerate(sample.class_names)}}


def macro_gap(internal: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]],
              classes: Sequence[str], tolerance: float = 0.05) -> dict[str, Any]:
    """Mean sensitivity and specificity over ``classes``, after minus internal, and whether both
    are within ``tolerance`` (the macro operating point; per-class gaps of opposite sign cancel,
    which is why the per-class verdict comes first).

    >>> i = [{"name": "a", "sensitivity": .8, "specificity": .9}]
    >>> macro_gap(i, [{"name": "a", "sensitivity": .76, "specificity": .93}], ["a"])["restored"]
    True
    """
    if not classes:
        return {}
    pick = lambda rows, key: float(np.mean([r[key] for r in rows  # noqa: E731
                                            if r["name"] in classes]))
    se = pick(after, "sensitivity") - pick(internal, "sensitivity")
    sp = pick(after, "specificity") - pick(internal, "specificity")
    return {"sensitivity_gap": se, "specificity_gap": sp, "n_classes": len(classes),
            "restored": bool(abs(se) <= tolerance and abs(sp) <= tolerance)}


def _fmt_gap(g: float | None) -> str:
    return "n/a" if g is None else f"{g:.3f}"


def best_possible_gap(preds: Predictions, target: Sequence[dict[str, Any]],
                      classes: Sequence[str]) -> dict[str, float | None]:
    """Per class, the smallest ``max(|sens - target sens|, |spec - target spec|)`` that ANY
    threshold reaches on the labelled ``preds``.

    Every recalibration here (a threshold, or a monotone logit map and the stored threshold) is
    one cut on the class's score, so this bounds them all: above the tolerance, the site's
    ranking no longer allows the internal operating point and only retraining can restore it.
    Multi-class with more than two classes decides by argmax (no per-class cut): ``None``.

    >>> p = Predictions(np.array([[-2.], [-1.], [1.], [2.]], np.float32),
    ...                 np.array([[0.], [0.], [1.], [1.]], np.float32), ids=tuple("abcd"),
    ...                 class_names=("c",), task="multilabel")
    >>> best_possible_gap(p, [{"name": "c", "sensitivity": 1.0, "specificity": 1.0}], ["c"])
    {'c': 0.0}
    """

    out: dict[str, float | None] = {}
    t, prob = preds.targets(), preds.probs().astype(np.float64)
    pos_col = _positive_column(preds)
    for c in classes:
        j = list(preds.class_names).index(c)
        if preds.task != "multilabel" and pos_col is None:
            out[c] = None
            continue
        col, mirror = (j, False) if pos_col is None else (pos_col, j != pos_col)
        known = np.isfinite(t[:, col])
        y = t[known, col] > 0.5
        if y.all() or not y.any():
            out[c] = None
            continue
        tab = cut_table(y, prob[known, col])
        se, sp = tab.sensitivity, tab.specificity
        if mirror:  # the other class of a binary decision: its sens is the positive's spec
            se, sp = sp, se
        row = next(r for r in target if r["name"] == c)
        out[c] = float(np.min(np.maximum(np.abs(se - row["sensitivity"]),
                                         np.abs(sp - row["specificity"]))))
    return out
