"""The site-shift flow in one call: validate a model on a second site, check the shift without
labels, recalibrate with k labelled images per class, and report.

:func:`run_site_shift` is what the demo runs on the phantom (train on site A, external site B),
and works on any pair of dataset specs with the same classes.

Example:
    >>> rep = run_site_shift(model, "phantom?n=2000&size=64", "phantom?n=2000&size=64&site=B",
    ...                      k=20)  # doctest: +SKIP
    >>> rep.recalibration.verdict  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.data.spec import open_dataset
from medscalpel.engine.external import ExternalValidation, external_validation, plot_reliability
from medscalpel.engine.predict import Features, extract_features
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import DataError
from medscalpel.layout import write_artifact_at
from medscalpel.models.classifier import MedClassifier
from medscalpel.repair.shift import (OODScorer, ShiftCheck, SiteRecalibration, recalibrate_site,
                                     shift_check)
from medscalpel.repair.triage import triage

logger = logging.getLogger(__name__)

SCHEMA = 1


@dataclass(frozen=True)
class SiteShiftReport:
    """External validation + label-free shift check + k-shot recalibration of one model."""

    internal_data: str
    external_data: str
    validation: ExternalValidation
    shift: ShiftCheck
    recalibration: SiteRecalibration
    ood: dict[str, Any]
    classes: tuple[str, ...]
    seconds: float
    notes: tuple[str, ...]
    #: the treatment router on the new site (fit: the same k-shot sample; judged and reported on
    #: the rest): its per-class table (:meth:`TriageResult.table`), or None when not run
    router: tuple[dict[str, Any], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "kind": "site_shift",
                "internal_data": self.internal_data, "external_data": self.external_data,
                "validation": self.validation.to_dict(), "shift": self.shift.to_dict(),
                "recalibration": self.recalibration.to_dict(), "ood": self.ood,
                "classes": list(self.classes), "seconds": self.seconds, "notes": list(self.notes),
                "router": None if self.router is None else list(self.router)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SiteShiftReport":
        return cls(d["internal_data"], d["external_data"],
                   ExternalValidation.from_dict(d["validation"]), ShiftCheck.from_dict(d["shift"]),
                   SiteRecalibration.from_dict(d["recalibration"]), d["ood"],
                   tuple(d["classes"]), float(d["seconds"]), tuple(d["notes"]),
                   None if d.get("router") is None else tuple(d["router"]))


def auto_classes(preds: Predictions, k: int) -> list[str]:
    """Classes with at least ``2 k`` positive and ``2 k`` negative labelled images (``k`` to fit,
    at least ``k`` left to measure on)."""
    t = preds.targets()
    return [c for j, c in enumerate(preds.class_names)
            if (t[:, j] > 0.5).sum() >= 2 * k and (t[:, j] < 0.5).sum() >= 2 * k]


def run_site_shift(model: MedClassifier, internal_data: str, external_data: str, *,
                   internal_split: str = "test", external_split: str = "test",
                   train_split: str = "train", k: int = 20, method: str = "threshold",
                   classes: list[str] | str | None = "auto", n_boot: int = 200, seed: int = 0,
                   batch_size: int = 128, out_dir: str | os.PathLike | None = None,
                   progress: bool | None = False, route: bool = True,
                   route_budget: float = 3.0) -> SiteShiftReport:
    """Validate ``model`` on ``external_data``, check the shift, recalibrate with ``k`` labelled
    external images per class, and (``out_dir``) write ``site_shift.json`` and
    ``reliability.png``.

    Args:
        internal_data, external_data: dataset specs (same classes), e.g. the phantom's site A and
            ``...&site=B``.
        train_split: split of ``internal_data`` whose features fit the OOD reference.
        classes: classes to recalibrate: ``auto`` = those with ``2 k`` positives and negatives in
            the external set (listed in the notes), ``None`` = all (too few -> error).
        n_boot: bootstrap replicates of every CI.
        route: also run the treatment router on the new site: fitted on the SAME k-shot sample,
            judged and reported on the rest of the site (threshold calibration, Platt
            recalibration of a row, row retraining; cost budget ``route_budget``); with
            ``out_dir`` its result is saved under ``router/``.
    """
    t0 = time.perf_counter()
    pp = model.card.preprocess
    ds_int = open_dataset(internal_data, split=internal_split, preprocess=pp)
    ds_ext = open_dataset(external_data, split=external_split, preprocess=pp)
    ds_train = open_dataset(internal_data, split=train_split, preprocess=pp)
    f_int = extract_features(model, ds_int, batch_size, progress=progress)
    f_ext = extract_features(model, ds_ext, batch_size, progress=progress)
    f_train = extract_features(model, ds_train, batch_size, progress=progress)
    p_int, p_ext = _preds(f_int, ds_int), _preds(f_ext, ds_ext)
    notes = []
    if classes == "auto":
        classes = _auto_classes_or_error(p_ext, k, external_data, external_split)
        notes.append(f"recalibrated classes (>= {2 * k} external positives and negatives): "
                     f"{classes}; the others keep their stored thresholds")
    validation = external_validation(model, p_int, p_ext, n_boot=n_boot, seed=seed)
    check = shift_check(p_int, p_ext, f_int, f_ext, train_features=f_train)
    patients = dict(zip(ds_ext.ids, ds_ext.patient_ids))
    recal, _ = recalibrate_site(model, p_int, p_ext, k=k, method=method,
                                classes=classes or None, n_boot=n_boot, seed=seed,
                                patient_ids=patients)
    router = None
    if route:
        router, note = _route_site(model, f_ext, recal, patients, route_budget, seed, out_dir)
        notes.append(note)
    rep = SiteShiftReport(internal_data=f"{internal_data} [{internal_split}]",
                          external_data=f"{external_data} [{external_split}]",
                          validation=validation, shift=check, recalibration=recal,
                          ood=_ood_shares(f_train, f_int, f_ext),
                          classes=tuple(classes or ()), seconds=round(time.perf_counter() - t0, 2),
                          notes=tuple(notes), router=router)
    if out_dir is not None:
        out = Path(out_dir)
        write_artifact_at(out, "site_shift", rep)
        plot_reliability(validation, out / "reliability.png")
    return rep


def _auto_classes_or_error(p_ext: Predictions, k: int, external_data: str,
                           external_split: str) -> list[str]:
    """:func:`auto_classes`, or a :class:`DataError` saying why none qualifies."""
    classes = auto_classes(p_ext, k)
    if not classes:
        raise DataError(f"No class of {external_data!r} [{external_split}] has the {2 * k} "
                        f"positive and {2 * k} negative labelled images that {k}-shot "
                        "recalibration needs (k to fit, k to measure); use a larger external "
                        "set or a smaller k.")
    return classes


def _route_site(model: MedClassifier, f_ext: Features, recal: SiteRecalibration,
                patients: dict[str, Any], budget: float, seed: int,
                out_dir: str | os.PathLike | None) -> tuple[tuple[dict[str, Any], ...], str]:
    """The treatment router on the new site: fitted on the k-shot sample, judged on the rest
    (no image of a drawn patient); saved under ``router/`` with ``out_dir``. Returns its
    per-class table and the note that says so."""
    fit_mask = np.isin(np.asarray(f_ext.ids), np.asarray(recal.fit_ids))
    # the rest holds no image of a patient drawn into the sample (as in recalibrate_site)
    drawn = {patients.get(i) for i in recal.fit_ids} - {None}
    rest_mask = ~fit_mask & ~np.array([patients.get(i) in drawn for i in f_ext.ids], bool)
    stored = [float(t) for t in recal.thresholds_before]
    tri = triage(f_ext.select(np.flatnonzero(fit_mask)),
                 f_ext.select(np.flatnonzero(rest_mask)), thresholds=stored,
                 budget=budget, seed=seed)
    router = tuple(tri.table())
    if out_dir is not None:
        tri.save(Path(out_dir) / "router", model=model)
    return router, (f"treatment router on the new site: fitted on the {int(fit_mask.sum())} "
                    f"k-shot images, judged and reported on {int(rest_mask.sum())} images of "
                    "other patients")


def _ood_shares(f_train: Features, f_int: Features, f_ext: Features) -> dict[str, float]:
    """OOD thresholds fitted on the training features (calibrated internally) and the share of
    internal / external images above them."""
    scorer = OODScorer().fit(f_train, calibration=f_int)
    return {"threshold_95": scorer.threshold_95_, "threshold_99": scorer.threshold_99_,
            "share_internal_above_99": float(scorer.flags(f_int).mean()),
            "share_external_above_99": float(scorer.flags(f_ext).mean()),
            "share_external_above_95": float(scorer.flags(f_ext, 95).mean())}


def _preds(f, ds) -> Predictions:
    p = f.to_predictions()
    return Predictions(logits=p.logits, labels=p.labels, ids=p.ids, class_names=p.class_names,
                       task=p.task, split=ds.split, model_id=p.model_id,
                       meta={**p.meta, "dataset": ds.spec,
                             "split_unit": ds.meta.get("split_unit")})


def summary_lines(rep: SiteShiftReport) -> list[str]:
    """A few lines for a log / the CLI."""
    v = rep.validation.macro
    lines = [f"macro AUROC internal {v['internal']['auroc']:.3f} -> external "
             f"{v['external']['auroc']:.3f}; ECE {v['internal']['ece']:.3f} -> "
             f"{v['external']['ece']:.3f}",
             f"label-free shift check: {'SHIFTED' if rep.shift.shifted else 'no shift found'}"
             + (f" ({rep.shift.reasons[0]})" if rep.shift.reasons else ""),
             f"OOD (99th pct): {rep.ood['share_external_above_99']:.0%} of external vs "
             f"{rep.ood['share_internal_above_99']:.0%} of internal images",
             f"{rep.recalibration.method} recalibration (k={rep.recalibration.k}): "
             f"{rep.recalibration.verdict}"]
    return lines + [f"note: {n}" for n in rep.notes]

