"""The operating point of every reported finding: where each cut came from and what it measured
(sensitivity / specificity with CIs), from the model card or a given calibration result."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any


from medscalpel.errors import DataError
from medscalpel.layout import artifact
from medscalpel.models.operating_point import STORED_METHOD, OperatingPoint
from medscalpel.runs import read_json
from medscalpel.report.clinical.results import (
    ClassOperatingPoint, NOT_CALIBRATED, NOT_CALIBRATED_ARGMAX, _f)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- operating points
#: what a calibration file must hold to be one
_CALIBRATION_KEYS = ("calibrator", "operating_point", "temperature")
#: the name of the file 'repair calibrate' writes (declared in medscalpel/layout.py)
_CALIBRATION_FILE = artifact("calibration").filename


def _calibration_dict(calibration: Any) -> dict[str, Any] | None:
    """The calibration as a dict: a CalibrationResult / TemperatureResult, their dict or the
    ``calibration.json`` that ``repair calibrate`` writes; anything else is one DataError."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)):
        try:
            d = read_json(calibration)
        except UnicodeDecodeError as exc:
            raise DataError(f"{calibration} is not a JSON file (binary content); give the "
                            f"{_CALIBRATION_FILE} written by 'medscalpel repair calibrate'."
                            ) from exc
        where = str(calibration)
    elif isinstance(calibration, Mapping):
        d, where = dict(calibration), "the calibration"
    elif hasattr(calibration, "to_dict"):
        d, where = calibration.to_dict(), type(calibration).__name__
    else:
        raise DataError(f"clinical_report: calibration is a {type(calibration).__name__}; give a "
                        f"CalibrationResult, its dict or a {_CALIBRATION_FILE} path.")
    if not isinstance(d, Mapping) or not any(k in d for k in _CALIBRATION_KEYS):
        raise DataError(f"{where} is not a calibration result (it has none of "
                        f"{list(_CALIBRATION_KEYS)}); give the {_CALIBRATION_FILE} written by "
                        "'medscalpel repair calibrate'.")
    return dict(d)


def _same_rule(a: OperatingPoint, b: OperatingPoint) -> bool:
    """Whether two operating points make the same decisions (same classes, task, cuts and
    temperature)."""
    def close(x: Any, y: Any) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and (
            x == y or abs(float(x) - float(y)) <= 1e-9))

    return (a.task == b.task and a.class_names == b.class_names and a.positive == b.positive
            and close(a.cut, b.cut) and close(a.temperature, b.temperature)
            and len(a.thresholds) == len(b.thresholds)
            and all(close(x, y) for x, y in zip(a.thresholds, b.thresholds)))


def _calibration_classes(cal: Mapping[str, Any], names: list[str]) -> None:
    """Refuse a calibration of other classes than the model's (a two-class calibration names
    only its positive class: it must be one of the model's two)."""
    calr = cal.get("calibrator") or {}
    cal_names = list(calr.get("class_names") or cal.get("class_names") or names)
    binary = cal.get("binary") or {}
    if binary and len(cal_names) == 1:
        ok = cal_names[0] in names and len(names) == 2
    else:
        ok = cal_names == names
    op = cal.get("operating_point")
    if op and list(op.get("class_names") or []) != names:
        ok = False
        cal_names = list(op.get("class_names") or [])
    if not ok:
        raise DataError(f"clinical_report: the calibration is of other classes "
                        f"({cal_names[:3]}...) than the model's ({names[:3]}...); pass the "
                        f"{_CALIBRATION_FILE} written for this model.")


def _describe_origin(op: OperatingPoint, j: int) -> tuple[str, str]:
    """(origin, description) of class ``j``'s cut."""
    name = op.class_names[j]
    cut = op.cut_of(j)
    if op.task == "binary" and j != op.positive:
        pos = op.class_names[op.positive]
        rule = f"decided when p({pos}) < {float(op.cut):.4g}"
    else:
        rule = ""
    if not op.calibrated:
        if op.task == "multiclass":
            return "default", "argmax (not calibrated)"
        return "default", rule + " (not calibrated)" if rule else f"{cut:g} (not calibrated)"
    if name in op.fallback:
        return "calibration_fallback", (f"default {cut:g}: calibration could not fit this class "
                                        "(no positive or no negative)")
    f = op.fitted_on or {}
    method = "" if op.method == STORED_METHOD else op.method
    if f.get("site"):
        n = f.get("n_images")
        desc = f"calibrated at site {f['site']}" + (f" ({method}" + (f", {n} images" if n else "")
                                                    + (f", {f['n_patients']} patients"
                                                       if f.get("n_patients") else "") + ")"
                                                    if method else "")
    elif f.get("split"):
        desc = f"calibrated on split '{f['split']}'" + (f" ({method})" if method else "")
    else:
        desc = "calibrated (split not recorded)" + (f" ({method})" if method else "")
    if op.task == "multiclass":
        desc = "argmax" + (f" after temperature {op.temperature:.3g}" if op.temperature != 1.0
                           else "") + f", {desc}"
    elif rule:
        desc = f"{rule}, {desc}"
    return "calibrated", desc


def _from_measured(cop: ClassOperatingPoint, row: Mapping[str, Any], on: Mapping[str, Any],
                   fit_split: str) -> ClassOperatingPoint:

    split = str(on.get("split", ""))
    note = "" if on.get("held_out", True) and not (split and split == fit_split) else \
        "measured on the images the operating point was fitted on (optimistic)"
    return replace(cop, sensitivity=_f(row.get("sensitivity")),
                   specificity=_f(row.get("specificity")),
                   sensitivity_ci=tuple(_f(v) for v in row.get("sensitivity_ci") or (None, None)),
                   specificity_ci=tuple(_f(v) for v in row.get("specificity_ci") or (None, None)),
                   split=split, n_pos=int(row.get("n_pos", 0) or 0),
                   n_neg=int(row.get("n_neg", 0) or 0), note=note)


def model_operating_point(card: Any, class_names: Sequence[str], task: str = "multilabel"
                          ) -> OperatingPoint:
    """The operating point the report decides by: the card's (``decision_point()``: stored, or
    derived from its thresholds), the uncalibrated default without a card."""
    if card is not None and hasattr(card, "decision_point"):
        return card.decision_point()
    return OperatingPoint.default(task, list(class_names))


def operating_points(card: Any, class_names: Sequence[str], thresholds: Sequence[float] | None
                     = None, calibration: Any = None
                     ) -> tuple[list[ClassOperatingPoint], dict[str, Any]]:
    """Per class: the cut's origin and its sensitivity / specificity; plus the report-level
    summary (``calibrated``, ``notice``, ``rule``, ...).

    The cut and its origin come from the model's operating point (``card.decision_point()``).
    The sensitivity / specificity come, in this order, from the operating point's own
    measurement, from ``calibration``'s operating point when it makes the same decisions, or
    from ``calibration``'s evaluation rows at a threshold equal to the class's cut (the
    calibrated one or the 0.5 baseline); otherwise they are not shown and a note says why.

    Args:
        card: the model's card (``None``: defaults).
        class_names: the model's classes.
        thresholds: unused (kept for callers of the older signature: the cuts are the
            operating point's).
        calibration: a :class:`~medscalpel.repair.calibrate.CalibrationResult`, its dict or a
            ``calibration.json`` path (multi-label, two-class or temperature).

    Raises:
        DataError: a calibration of other classes than the model's; a file that is not a
            calibration result.
    """
    names = [str(c) for c in class_names]
    op = model_operating_point(card, names, getattr(card, "task", "multilabel"))
    cal = _calibration_dict(calibration)
    notes: list[str] = []
    cal_op = None
    if cal is not None:
        _calibration_classes(cal, names)
        if cal.get("operating_point"):
            cal_op = OperatingPoint.from_dict(cal["operating_point"])
        if not (cal.get("evaluation") or (cal_op is not None and cal_op.measured)):
            notes.append("the calibration result has no evaluation: sensitivity and "
                         "specificity are not shown")
    fit_split = str((op.fitted_on or {}).get("split") or (cal or {}).get("fit_split") or "")
    ev = (cal or {}).get("evaluation") or None
    rows = {r.get("class"): r for r in (ev or {}).get("classes", [])}
    same = cal_op is not None and _same_rule(cal_op, op) and bool(cal_op.measured)
    ops = []
    for j, name in enumerate(names):
        origin, desc = _describe_origin(op, j)
        cut = op.cut_of(j)
        cop = ClassOperatingPoint(float("nan") if cut is None else float(cut), origin, desc,
                                  fit_split, "" if op.method in (STORED_METHOD, "default")
                                  else op.method)
        if op.measured_row(j) is not None:
            cop = _from_measured(cop, op.measured_row(j), op.measured_on, fit_split)
        elif same and cal_op.measured_row(j) is not None:
            cop = _from_measured(cop, cal_op.measured_row(j), cal_op.measured_on, fit_split)
        elif cut is not None:
            cop = _measured(cop, rows.get(name), ev, fit_split, notes)
        ops.append(cop)
    notice = None
    if not op.calibrated:
        notice = NOT_CALIBRATED_ARGMAX if op.task == "multiclass" else NOT_CALIBRATED
    summary = {"calibrated": op.calibrated, "notice": notice, "fit_split": fit_split,
               "method": op.method, "rule": op.describe(), "task": op.task,
               "margin_definition": op.margin_name,
               "operating_point": op.to_dict(),
               "evaluation_split": str((ev or {}).get("split", "") or
                                       (op.measured_on or {}).get("split", "")),
               "evaluation_n": int((ev or {}).get("n", 0) or
                                   (op.measured_on or {}).get("n_images", 0) or 0),
               "measured": any(o.measured for o in ops), "notes": notes}
    return ops, summary


def _measured(op: ClassOperatingPoint, row: Mapping[str, Any] | None,
              ev: Mapping[str, Any] | None, fit_split: str,
              notes: list[str]) -> ClassOperatingPoint:

    if row is None or ev is None:
        return op
    pick = None
    if row.get("threshold") is not None and abs(float(row["threshold"]) - op.threshold) < 1e-9:
        pick = row.get("calibrated")
    else:
        base = dict(zip((ev.get("class_names") or []), ev.get("baseline_thresholds") or []))
        if op.threshold == base.get(row.get("class")):
            pick = row.get("default")
    if not pick:
        msg = (f"the calibration's threshold for {row.get('class')} differs from the model's: "
               "its sensitivity/specificity are not shown")
        if msg not in notes:
            notes.append(msg)
        return op
    split = str(ev.get("split", ""))
    note = "measured on the split the thresholds were fitted on (optimistic)" \
        if split and split == fit_split else ""
    tp, fn, tn, fp = (int(pick.get(k, 0) or 0) for k in ("tp", "fn", "tn", "fp"))
    return replace(op, sensitivity=_f(pick.get("recall")), specificity=_f(pick.get("specificity")),
                   split=split, n_pos=tp + fn, n_neg=tn + fp, note=note)
