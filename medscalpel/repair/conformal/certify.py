"""Certifying thresholds on calibration predictions: :func:`calibrate_guarantee` and the
certificate of one class (recall order statistic, precision fixed-sequence test) or of the
whole label set (set false-negative rate, CRC).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binom

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.repair.conformal.patients import _n_patients, _pids, one_per_group
from medscalpel.repair.conformal.result import ClassGuarantee, GuaranteeResult
from medscalpel.repair.conformal.spec import (_EPS, DEFAULT_GRID, KINDS, GuaranteeSpec,
                                              _just_below, _sigmoid, min_positives,
                                              miss_rate_upper_bound, parse_guarantee,
                                              recall_order_statistic)
from medscalpel.validation import check_range


def _wording(kind: str, target: float, alpha: float | None) -> str:
    rate, op, hp = KINDS[kind]
    tail = f"with {100 * (1 - alpha):.0f}% confidence" if hp else "in expectation"
    return f"{rate} {op} {target:.2f} {tail}"


def _counts(y: np.ndarray, z: np.ndarray, thr: float) -> dict[str, Any]:
    d = z >= thr
    tp, fp = int(np.sum(y & d)), int(np.sum(~y & d))
    npos = int(y.sum())
    return {"tp": tp, "fp": fp, "misses": npos - tp, "recall": tp / npos if npos else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "flagged_share": float(d.mean()) if d.size else None}


def _recall_row(y, z, kind, target, alpha, pos=None
                ) -> tuple[float | None, dict[str, Any], str]:
    """The order-statistic threshold of the positive scores ``pos`` (default: ``z[y]``); the
    calibration counts are of every image."""
    pos = np.sort(z[y] if pos is None else np.asarray(pos, np.float64))
    n = pos.size
    k = recall_order_statistic(n, target, alpha if kind == "recall" else None)
    if k == 0:
        return None, {}, ""
    thr = _just_below(float(pos[k - 1]))
    cal = _counts(y, z, thr)
    cal["rate"] = cal["recall"]
    cal["order_statistic"] = k
    if kind == "recall":
        cal["miss_rate_upper_bound"] = miss_rate_upper_bound(k - 1, n, alpha)
        cal["binomial_p"] = float(binom.cdf(k - 1, n, 1.0 - target))
    else:
        cal["crc_bound"] = (int(np.sum(pos < thr)) + 1) / (n + 1)
    return thr, cal, ""


def _precision_row(y, z, target, alpha, grid) -> tuple[float | None, dict[str, Any], str]:
    zs = np.sort(z)
    n_flag = zs.size - np.searchsorted(zs, grid, side="left")
    ps = np.sort(z[y])
    tp = ps.size - np.searchsorted(ps, grid, side="left")
    # the top of the grid where fewer images are flagged than any test could reject with
    # (target**N > alpha even if all are positive) is skipped: it can only stop the sequence
    n_min = min_positives("precision", target, alpha)
    if not (n_flag >= n_min).any():
        return None, {"tests": 0}, (f"no grid threshold flags the {n_min} calibration images "
                                    "a precision test needs")
    start = int(np.argmax(n_flag >= n_min))
    pv = binom.sf(tp[start:] - 1, n_flag[start:], target)  # P(Binomial(N_t, T) >= TP_t)
    fails = np.flatnonzero(pv > alpha)
    n_rej = int(fails[0]) if fails.size else pv.size  # fixed sequence: stop at the first
    tested = min(n_rej + 1, pv.size)
    stopped = float(pv[n_rej]) if n_rej < pv.size else None
    if n_rej == 0:
        return None, {"tests": tested}, (
            f"precision >= {target:.2f} is not supported at the first tested grid threshold "
            f"(logit {grid[start]:g}: {tp[start]}/{n_flag[start]} "
            f"positive, p = {stopped:.3g} > alpha = {alpha:g})")
    i = start + n_rej - 1
    thr = float(grid[i])
    cal = _counts(y, z, thr)
    cal.update(rate=cal["precision"], p_value=float(pv[n_rej - 1]), tests=tested,
               stopped_p_value=stopped)
    return thr, cal, ""


def _as_multilabel(preds: Predictions, owner: str) -> Predictions:
    if not isinstance(preds, Predictions):
        raise DataError(f"{owner}: give a Predictions; got {type(preds).__name__}.")
    if preds.task != "multilabel":
        raise ConfigError(f"{owner}: per-class guarantees apply to multi-label predictions; "
                          f"these are {preds.task}. For a two-class model use "
                          "medscalpel.repair.calibrate.binary_view(preds) first.")
    return preds


def calibrate_guarantee(preds: Predictions, guarantee: str | GuaranteeSpec,
                        alpha: float = 0.1, patient_ids: Sequence[str | None] | None = None,
                        grid: Sequence[float] | None = None,
                        groups: Sequence[str | None] | None = None,
                        seed: int = 0) -> GuaranteeResult:
    """Certified per-class thresholds (or one shared threshold for ``fnr``) on calibration
    ``preds`` (see the module docstring for each guarantee and its assumptions).

    Args:
        preds: multi-label calibration Predictions (NaN labels are ignored per class).
        guarantee: ``'recall>=0.9'``, ``'E[recall]>=0.9'``, ``'precision>=0.8'``,
            ``'fnr<=0.1'`` or a :class:`GuaranteeSpec`.
        alpha: the allowed probability that the guarantee fails (high-probability kinds);
            recorded as None for the in-expectation kinds, which do not use it.
        patient_ids: one patient id per image (None where unknown): the patient counts.
        grid: the fixed logit grid of the precision test (default :data:`DEFAULT_GRID`),
            tested in the given order (highest threshold first); recorded in the result
            (``grid``), so a re-certification at a new site tests the same candidates.
        groups: patient ids, one per image (None: its own patient): certify on ONE image per
            patient (:func:`one_per_group`, drawn with ``seed``) among the images the
            certificate counts (a class's positives for recall; its labelled images for
            precision; the images with a finding for the set FNR), so the binomial / CRC
            argument counts independent patients instead of correlated images. The guarantee
            is then about a random such image of a random patient (patients weigh equally,
            whatever their number of images); the patients are also counted as with
            ``patient_ids`` (which defaults to ``groups``). Off by default.
        seed: the draw of the one image per patient (with ``groups``).

    A class with too few positives is returned with ``certified=False`` and the reason (the
    minimum number needed).
    """
    spec = parse_guarantee(guarantee)
    preds = _as_multilabel(preds, "calibrate_guarantee")
    check_range(alpha, "alpha", "calibrate_guarantee", 0.0, 1.0, low_inclusive=False,
                high_inclusive=False)
    pids = _pids(patient_ids if patient_ids is not None else groups, preds.n)
    gids = _pids(groups, preds.n)
    a = alpha if spec.high_probability else None
    g = DEFAULT_GRID if grid is None else np.asarray(grid, float)
    if g.ndim != 1 or g.size == 0 or np.any(np.diff(g) >= 0):
        raise ConfigError("calibrate_guarantee: the 'grid' must be a non-empty strictly "
                          "DECREASING sequence of logit thresholds (tested from the top).")
    z_all = preds.logits.astype(np.float64)
    lab = preds.targets()
    if spec.kind == "fnr":
        rows = (_fnr_row(z_all, lab, spec.target, pids, gids, seed),)
    else:
        rows = tuple(_class_row(name, z_all[:, j], lab[:, j], spec, a, g, pids,
                                None if gids is None else (gids, [seed, j]))
                     for j, name in enumerate(preds.class_names))
    n_pat = _n_patients(pids, range(preds.n))
    notes = _guarantee_notes(spec, g, preds.n, n_pat, pids, gids, seed)
    return GuaranteeResult(spec=spec.text, kind=spec.kind, target=spec.target, alpha=a,
                           class_names=tuple(preds.class_names), classes=rows,
                           n_images=preds.n, n_patients=n_pat, split=preds.split,
                           model_id=preds.model_id, notes=tuple(notes),
                           grid=tuple(float(v) for v in g) if spec.kind == "precision"
                           else ())


def _guarantee_notes(spec: GuaranteeSpec, g: np.ndarray, n: int, n_pat: int | None,
                     pids: list[str | None] | None, gids: list[str | None] | None,
                     seed: int) -> list[str]:
    """What a certificate's reader must know: how images and patients were counted, the
    precision test's grid and assumption, and the exchangeability every guarantee assumes."""
    notes = []
    if gids is not None:
        notes.append("certified on ONE image per patient (groups, seed "
                     f"{seed}): the certificate counts patients, independent draws; it is "
                     "about a random image of a random patient (patients weigh equally)")
    elif pids is None:
        notes.append("patients unknown: the calibration images are counted as independent "
                     "draws")
    elif n_pat is not None and n_pat < n:
        notes.append(f"{n} images from {n_pat} patients: images of one patient are "
                     "correlated, so the stated confidence treats them as independent "
                     "(approximate)")
    if spec.kind == "precision":
        notes.append("precision: fixed-sequence test over a fixed logit grid from "
                     f"{g[0]:g} to {g[-1]:g} ({g.size} points), started where enough images "
                     "are flagged to test; assumes P(present | score) non-decreasing in the "
                     "score")
    notes.append("assumes the calibration and future images are exchangeable draws from one "
                 "population (same site, same model); re-certify after any change "
                 "(medscalpel.repair.conformal.recertify)")
    return notes


def _class_row(name, z, lab, spec, alpha, grid, pids, per_patient=None) -> ClassGuarantee:
    """One class's certificate; ``per_patient = (groups, seed)``: on one image per patient
    among the positives (recall) or the labelled images (precision)."""
    known = np.isfinite(lab)
    rows = np.flatnonzero(known)
    y = lab[known] > 0.5
    z = z[known]
    npos = int(y.sum())
    nmin = min_positives(spec.kind, spec.target, alpha)
    use = None
    if per_patient is not None:  # positions (into the known rows) the certificate counts
        gids, seed = per_patient
        among = np.flatnonzero(y) if spec.kind != "precision" else np.arange(rows.size)
        use = np.searchsorted(rows, one_per_group(rows[among], gids, seed))
    n_used = npos if use is None else int(y[use].sum())
    wording = _wording(spec.kind, spec.target, alpha) + ("" if use is None else
                                                         ", counted by patient")
    base = dict(name=name, kind=spec.kind, target=spec.target, alpha=alpha,
                n_images=int(known.sum()), n_positives=n_used,
                n_patients=_n_patients(pids, rows),
                n_patients_positive=_n_patients(pids, rows[y]), min_positives=nmin,
                guarantee=wording)
    if n_used < nmin:
        unit = "positives" if use is None else "positive patients (one image each)"
        return ClassGuarantee(certified=False, threshold_logit=None, threshold_prob=None,
                              reason=f"too few {unit}: {n_used} < {nmin} needed for "
                                     f"{base['guarantee']}", **base)
    if spec.kind == "precision":
        yy, zz = (y, z) if use is None else (y[use], z[use])
        thr, cal, why = _precision_row(yy, zz, spec.target, alpha, grid)
    else:
        thr, cal, why = _recall_row(y, z, spec.kind, spec.target, alpha,
                                    None if use is None else z[use])
    if use is not None and cal:
        cal.update(unit="patient (one image each)", images_used=int(use.size),
                   positive_images=npos)
    if thr is None:
        return ClassGuarantee(certified=False, threshold_logit=None, threshold_prob=None,
                              reason=why or "not certifiable", calibration=cal, **base)
    return ClassGuarantee(certified=True, threshold_logit=thr, threshold_prob=_sigmoid(thr),
                          calibration=cal, **base)


def _fnr_row(z_all, lab, a, pids, gids=None, seed=0) -> ClassGuarantee:
    """One shared probability threshold: CRC on the per-image false-negative proportion
    (``gids``: on one image per patient among the images with a finding)."""
    pos = np.nan_to_num(lab, nan=0.0) > 0.5
    n_true = pos.sum(1)
    every = np.flatnonzero(n_true > 0)
    img = every if gids is None else one_per_group(every, gids, seed)
    n = img.size
    nmin = min_positives("fnr", a)
    base = dict(name="all classes", kind="fnr", target=a, alpha=None,
                n_images=int(z_all.shape[0]), n_positives=n,
                n_patients=_n_patients(pids, range(z_all.shape[0])),
                n_patients_positive=_n_patients(pids, every), min_positives=nmin,
                guarantee=_wording("fnr", a, None) + ("" if gids is None else
                                                      ", counted by patient"))
    if n < nmin:
        return ClassGuarantee(certified=False, threshold_logit=None, threshold_prob=None,
                              reason=f"too few images with a finding: {n} < {nmin} needed for "
                                     f"{base['guarantee']}", **base)
    ii, jj = np.nonzero(pos[img])
    s = z_all[img][ii, jj]  # logits of the true labels (the sigmoid keeps their order)
    w = 1.0 / n_true[img][ii]
    order = np.argsort(s, kind="mergesort")
    s, w = s[order], w[order]
    cum = np.r_[0.0, np.cumsum(w)]
    below = cum[np.searchsorted(s, s, side="left")]  # weight of labels strictly below s[m]
    ok = below <= a * (n + 1) - 1 + _EPS
    m = int(np.flatnonzero(ok).max())
    thr = _just_below(float(s[m]))
    risk = _set_fnr(z_all[img], pos[img], thr)
    cal = {"rate": risk, "fnr": risk, "crc_bound": (n * risk + 1) / (n + 1),
           "flagged_share": float((z_all >= thr).mean()), "labels": int(pos.sum())}
    return ClassGuarantee(certified=True, threshold_logit=thr, threshold_prob=_sigmoid(thr),
                          calibration=cal, **base)


def _set_fnr(z: np.ndarray, pos: np.ndarray, thr: float) -> float:
    """Mean over images (each with >= 1 true label) of missed / true labels."""
    missed = (pos & (z < thr)).sum(1)
    return float(np.mean(missed / pos.sum(1))) if z.shape[0] else float("nan")
