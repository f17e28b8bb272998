"""Carry a conformal guarantee to a new site WITHOUT labels, under pure label shift.

:func:`~medscalpel.repair.conformal.recertify` re-checks a guarantee on ``k`` labelled images of
the new site. Under PURE LABEL SHIFT (per class: the images given the label, ``p(x | y)``,
are the same at both sites; only the prevalence ``P(y = 1)`` changes) some guarantees need no
new labels at all, some can be re-weighted from unlabelled images, and some cannot:

* ``recall>=T`` (Learn then Test) and ``E[recall]>=T`` (CRC): recall is ``P(score >= t | y =
  1)``, a property of ``p(x | y = 1)`` alone. The calibration positives are exchangeable with
  the new site's positives, so the certificate (threshold, confidence) carries over
  UNCHANGED; nothing is re-estimated.
* ``precision>=T``: precision at threshold ``t`` is ``pi' R(t) / (pi' R(t) + (1 - pi') F(t))``
  with the new prevalence ``pi'``, the recall ``R`` and the false-positive rate ``F``: it moves
  with the prevalence. It is RE-CERTIFIED at the new site's prevalence: ``pi'`` gets a lower
  confidence bound from the new site's unlabelled scores (black-box shift estimation, BBSE:
  Lipton, Wang, Smola, "Detecting and Correcting for Label Shift with Black Box Predictors",
  ICML 2018, arXiv:1802.03916, here with exact Clopper-Pearson bounds and a union bound, see
  :func:`bbse_prior`), ``R`` and ``F`` get Clopper-Pearson bounds on the calibration positives
  and negatives, and the fixed logit grid is tested from the top (fixed-sequence testing, as in
  :mod:`~medscalpel.repair.conformal`). ``P(precision >= T at the new site) >= 1 - alpha``
  (alpha split in halves: the prevalence bound, the tests), given pure label shift.
* ``fnr<=a`` (multi-label set FNR): the loss of an image is the share of ITS labels missed, a
  function of the whole label vector; re-weighting it needs the prior over label
  combinations, which per-class prevalences do not give. Not transferred: re-certify on
  labelled images.

The point estimate of the new prevalence is the EM of Saerens, Latinne, Decaestecker
("Adjusting the Outputs of a Classifier to New a Priori Probabilities: A Simple Procedure",
Neural Computation 14(1), 2002) on Platt-calibrated calibration-site posteriors (Alexandari,
Kundaje, Shrikumar, "Maximum Likelihood with Bias-Corrected Calibration is Hard-To-Beat at
Label Shift Adaptation", ICML 2020: calibrate first); it is reported, and sizes the labelled
sample a re-certification would need. Certificates use only the BBSE bound.

Whether the shift IS a pure label shift is checked without labels
(:func:`label_shift_check`): under label shift the new site's score distribution is a mixture
``pi' F1 + (1 - pi') F0`` of the calibration positives' and negatives' score distributions. The
statistic is the smallest Kolmogorov distance to such a mixture over ``pi'``; its p-value comes
from a parametric bootstrap of the fitted mixture (calibration samples redrawn too). A
rejection (Bonferroni over the certified classes) means a covariate or concept shift: the
guarantee is NOT transferable and needs ``k`` labelled images
(:func:`~medscalpel.repair.conformal.recertification_plan`, at the EM prevalence). So does a
feature-space shift found by :func:`~medscalpel.repair.shift.shift_check` when the caller passes
one with penultimate features (a prior change alone keeps the share of images beyond the
internal 95th percentile distance between the per-class shares, so a large excess points at
new kinds of images); its score KS tests are reported but do not decide, since a pure
prevalence change moves the score distribution too. Not rejecting is not proof: the check has
limited power, and a shift that keeps every class's score distribution (but changes which
images are hard) is invisible to it.

Example:
    >>> import numpy as np
    >>> from medscalpel.engine.predictions import Predictions
    >>> from medscalpel.repair.conformal import calibrate_guarantee
    >>> rng = np.random.default_rng(0)
    >>> def draw(n, prev, split):
    ...     y = (rng.random((n, 1)) < prev).astype(np.float32)
    ...     z = 2.5 * y + rng.normal(size=(n, 1))
    ...     return Predictions(z, y, ids=tuple(f"{split}{i}" for i in range(n)),
    ...                        class_names=("x",), task="multilabel", split=split)
    >>> cal, new = draw(1000, 0.3, "cal"), draw(2000, 0.6, "new")
    >>> g = calibrate_guarantee(cal, "recall>=0.9", 0.1)
    >>> t = transfer_guarantee(g, cal, new, n_boot=100)
    >>> t.transferable, t.rows[0]["status"]
    (True, 'carried over unchanged')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import beta as beta_dist
from sklearn.linear_model import LogisticRegression

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.repair.conformal import (DEFAULT_GRID, KINDS, ClassGuarantee, GuaranteeResult,
                                         recertification_plan)
from medscalpel.repair.conformal.certify import _as_multilabel
from medscalpel.repair.conformal.spec import _sigmoid
from medscalpel.repair.shift import ShiftCheck
from medscalpel.validation import check_range

SCHEMA = 1
#: the statuses of a row that holds at the new site
_CARRIED = ("carried over unchanged", "re-certified at the new prevalence")
#: the hard rules of the BBSE estimate: "present" when the logit is >= cut (fixed in advance)
BBSE_CUTS = (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0)


# ----------------------------------------------------------------------------- bounds
def _cp_lower(x: int, n: int, a: float) -> float:
    """One-sided Clopper-Pearson lower bound (``a`` in the tail) of ``x / n``."""
    return 0.0 if x <= 0 or n <= 0 else float(beta_dist.ppf(a, x, n - x + 1))


def _cp_upper(x: int, n: int, a: float) -> float:
    return 1.0 if n <= 0 or x >= n else float(beta_dist.ppf(1.0 - a, x + 1, n - x))


# ----------------------------------------------------------------------------- prevalence
def estimate_prior_em(probs: np.ndarray, prior: float, tol: float = 1e-10,
                      max_iter: int = 10_000) -> float:
    """The new site's prevalence by EM (Saerens et al. 2002): ``probs`` are calibrated
    posteriors ``P(y = 1 | x)`` at a site of prevalence ``prior``, evaluated on the NEW site's
    images; iterate ``pi' <- mean(w1 p / (w1 p + w0 (1 - p)))`` with ``w1 = pi'/prior``,
    ``w0 = (1 - pi')/(1 - prior)``. The fixed point maximises the likelihood of the new
    images under the re-weighted posteriors.

    >>> round(estimate_prior_em(np.array([0.9, 0.9, 0.1, 0.1]), 0.5), 3)
    0.5
    """
    check_range(prior, "prior", "estimate_prior_em", 0.0, 1.0, low_inclusive=False,
                high_inclusive=False)
    p = np.clip(np.asarray(probs, float), 1e-12, 1 - 1e-12)
    if p.size == 0:
        raise DataError("estimate_prior_em: no images to estimate the prevalence on.")
    pi = prior
    for _ in range(max_iter):
        w1, w0 = pi / prior, (1.0 - pi) / (1.0 - prior)
        new = float(np.mean(w1 * p / (w1 * p + w0 * (1.0 - p))))
        if abs(new - pi) < tol:
            return new
        pi = new
    return pi


def platt_posteriors(z_cal: np.ndarray, y_cal: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``P(y = 1 | logit)`` calibrated on the calibration site (Platt: a logistic regression on
    the logit, unpenalised), evaluated at ``z``."""
    lr = LogisticRegression(C=np.inf, max_iter=1000)
    lr.fit(np.asarray(z_cal, float)[:, None], np.asarray(y_cal, bool))
    return lr.predict_proba(np.asarray(z, float)[:, None])[:, 1]


def bbse_prior(z_cal: np.ndarray, y_cal: np.ndarray, z_new: np.ndarray, alpha: float,
               cuts: tuple[float, ...] = BBSE_CUTS) -> dict[str, Any]:
    """The new prevalence from the share flagged by FIXED rules ``logit >= cut`` (BBSE, Lipton
    et al. 2018, one class): under label shift ``q' = pi' R + (1 - pi') F`` (``R``, ``F`` the
    rule's true- and false-positive rates, equal at both sites), so ``pi' = (q' - F)/(R - F)``.

    ``lower`` / ``upper``: a two-sided ``1 - alpha`` interval. Per cut, one-sided
    Clopper-Pearson bounds on ``q'`` (new site), ``R`` (calibration positives) and ``F``
    (calibration negatives) give ``q'_lo <= pi' R + (1 - pi') F <= pi' R_hi + (1 - pi') F_hi``,
    so ``pi' >= (q'_lo - F_hi) / (R_hi - F_hi)`` (symmetrically for the upper bound); every
    bound of every cut at ``alpha / (6 * len(cuts))`` (union bound), so the largest lower and
    the smallest upper bound over the cuts hold together with ``1 - alpha``. Several cuts
    because the best rule depends on the prevalence (a rare class wants a high cut, where
    ``F`` is small and well known). ``point``: the estimate at the cut of the best lower
    bound. 0 / 1 where no cut separates the classes.
    """
    y = np.asarray(y_cal, bool)
    z_cal, z_new = np.asarray(z_cal, float), np.asarray(z_new, float)
    n1, n0, m = int(y.sum()), int((~y).sum()), int(z_new.size)
    if not (n1 and n0 and m):
        raise DataError(f"bbse_prior: needs calibration positives ({n1}), negatives ({n0}) "
                        f"and new images ({m}).")
    a = alpha / (6.0 * len(cuts))
    per = []
    for cut in cuts:
        tp, fp, fl = (int((z_cal[y] >= cut).sum()), int((z_cal[~y] >= cut).sum()),
                      int((z_new >= cut).sum()))
        r, f, q = tp / n1, fp / n0, fl / m
        r_lo, r_hi = _cp_lower(tp, n1, a), _cp_upper(tp, n1, a)
        f_lo, f_hi = _cp_lower(fp, n0, a), _cp_upper(fp, n0, a)
        q_lo, q_hi = _cp_lower(fl, m, a), _cp_upper(fl, m, a)
        per.append({
            "cut_logit": cut, "tpr": r, "fpr": f, "flagged_new": q,
            "point": float(np.clip((q - f) / (r - f), 0.0, 1.0)) if r > f else None,
            "lower": float(np.clip((q_lo - f_hi) / (r_hi - f_hi), 0.0, 1.0))
            if r_hi > f_hi else 0.0,
            "upper": float(np.clip((q_hi - f_lo) / (r_lo - f_lo), 0.0, 1.0))
            if r_lo > f_lo else 1.0})
    best = max(per, key=lambda d: d["lower"])
    return {"point": best["point"], "cut_logit": best["cut_logit"],
            "lower": best["lower"], "upper": min(d["upper"] for d in per),
            "confidence": 1.0 - alpha, "n_new": m, "cuts": per}


# ----------------------------------------------------------------------------- the check
def _mixture_distance(s1: np.ndarray, s0: np.ndarray, u: np.ndarray) -> tuple[float, float]:
    """``min over pi in [0, 1] of sup_s |G_u(s) - (pi F1(s) + (1 - pi) F0(s))|`` (empirical
    CDFs) and the minimising ``pi``. The distance is a maximum of ``|affine(pi)|``, so convex
    in ``pi``: bounded Brent search (to 1e-6), then the better of it and the two ends."""
    pts = np.sort(np.concatenate([s1, s0, u]))
    f1 = np.searchsorted(np.sort(s1), pts, side="right") / s1.size
    f0 = np.searchsorted(np.sort(s0), pts, side="right") / s0.size
    gu = np.searchsorted(np.sort(u), pts, side="right") / u.size
    a, b = gu - f0, f1 - f0

    def dist(pi: float) -> float:
        return float(np.abs(a - pi * b).max())

    opt = minimize_scalar(dist, bounds=(0.0, 1.0), method="bounded",
                          options={"xatol": 1e-6})
    return min((dist(p), p) for p in (float(opt.x), 0.0, 1.0))


def label_shift_check(s1: np.ndarray, s0: np.ndarray, u: np.ndarray, n_boot: int = 200,
                      seed: int = 0) -> dict[str, Any]:
    """Is the new site's score sample ``u`` a re-weighted mixture of the calibration positives'
    ``s1`` and negatives' ``s0`` scores (what pure label shift predicts)?

    Statistic: the smallest Kolmogorov distance between ``u``'s empirical CDF and ``pi F1 + (1 -
    pi) F0`` over ``pi`` (:func:`_mixture_distance`). p-value: parametric bootstrap under the
    fitted mixture, ``(1 + #{D* >= D}) / (n_boot + 1)``; each replicate redraws ``s1``, ``s0``
    from their empirical distributions (same sizes) and ``u`` from the mixture at the fitted
    ``pi``, then recomputes the statistic. Seeded.
    """
    s1, s0, u = (np.asarray(v, float) for v in (s1, s0, u))
    if min(s1.size, s0.size, u.size) == 0:
        raise DataError("label_shift_check: needs calibration positives, negatives and new "
                        "scores.")
    d, pi = _mixture_distance(s1, s0, u)
    rng = np.random.default_rng(seed)
    ge = 0
    for _ in range(n_boot):
        b1, b0 = rng.choice(s1, s1.size), rng.choice(s0, s0.size)
        pos = rng.random(u.size) < pi
        bu = np.where(pos, rng.choice(s1, u.size), rng.choice(s0, u.size))
        ge += _mixture_distance(b1, b0, bu)[0] >= d - 1e-12
    return {"statistic": d, "prior": pi, "p_value": (1 + ge) / (n_boot + 1),
            "n_boot": n_boot}


# ----------------------------------------------------------------------------- precision
def _precision_at_prior(y: np.ndarray, z: np.ndarray, target: float, alpha: float,
                        pi_lo: float, grid: np.ndarray) -> tuple[float | None, dict[str, Any]]:
    """The lowest grid threshold of the fixed-sequence test of ``precision' >= target`` at a
    prevalence of at least ``pi_lo``: per threshold, ``R_lo`` / ``F_hi`` one-sided
    Clopper-Pearson at ``alpha / 4`` each (each test at level ``alpha / 2``), rejection when
    ``pi_lo R_lo / (pi_lo R_lo + (1 - pi_lo) F_hi) >= target``. Leading grid points where even
    a perfect count (every flagged calibration image positive) could not reject are skipped
    (the precision test's start rule of :mod:`~medscalpel.repair.conformal`, with its
    assumption)."""
    n1, n0 = int(y.sum()), int((~y).sum())
    a = alpha / 4.0
    ps, ns = np.sort(z[y]), np.sort(z[~y])
    tp = n1 - np.searchsorted(ps, grid, side="left")
    fp = n0 - np.searchsorted(ns, grid, side="left")

    def lower(t, f):
        r_lo, f_hi = _cp_lower(int(t), n1, a), _cp_upper(int(f), n0, a)
        num = pi_lo * r_lo
        return num / (num + (1.0 - pi_lo) * f_hi) if num > 0 else 0.0

    could = np.array([lower(min(t + f, n1), 0) >= target for t, f in zip(tp, fp)])
    if pi_lo <= 0 or not could.any():
        return None, {"tests": 0, "reason": f"precision >= {target:.2f} cannot be shown at a "
                      f"prevalence of {pi_lo:.3f} (the lower bound of the new site's)"}
    start = int(np.argmax(could))
    last, tests = None, 0
    for i in range(start, grid.size):
        tests += 1
        lb = lower(tp[i], fp[i])
        if lb < target:
            break
        last = (i, lb)
    if last is None:
        return None, {"tests": tests, "reason": f"precision >= {target:.2f} is not supported "
                      f"at the first tested grid threshold (logit {grid[start]:g}) at a "
                      f"prevalence of {pi_lo:.3f}"}
    i, lb = last
    return float(grid[i]), {"tests": tests, "precision_lower_bound": lb,
                            "tp": int(tp[i]), "fp": int(fp[i])}


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True)
class LabelShiftTransfer:
    """A guarantee carried to a new site without labels (pure label shift), or why not.

    Attributes:
        spec: the guarantee (e.g. ``recall>=0.9``); ``alpha`` its error.
        transferable: True when no shift beyond label shift was found and at least one row
            carries over; then ``guarantee`` is the new site's :class:`GuaranteeResult`
            (recall rows unchanged, precision rows at the new prevalence, FNR not certified).
        rows: per class: ``status`` (``carried over unchanged``, ``re-certified at the new
            prevalence``, ``not transferable``, ``not certified``), the prevalence at
            calibration, EM and BBSE (with its interval), the check's statistic and p-value,
            and the thresholds.
        covariate_shift: the reasons a shift beyond label shift was found (empty: none found).
        min_k: :func:`~medscalpel.repair.conformal.recertification_plan` at the EM
            prevalence: the labelled images a re-certification would need instead.
        check_alpha: the level of the label-shift check (Bonferroni over the certified rows).
        assumption, notes: what the transfer rests on.
    """

    spec: str
    alpha: float | None
    transferable: bool
    rows: tuple[dict[str, Any], ...]
    covariate_shift: tuple[str, ...]
    guarantee: GuaranteeResult | None
    min_k: dict[str, Any]
    check_alpha: float
    n_new_images: int
    site: str = ""
    assumption: str = ("pure label shift: per class, p(image | label) is the same at the new "
                       "site; only the prevalence changes")
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA

    @property
    def outcome(self) -> str:
        return "transferred" if self.transferable else "not transferable"

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "kind_of_result": "label_shift_transfer",
                "spec": self.spec, "alpha": self.alpha, "outcome": self.outcome,
                "transferable": self.transferable, "rows": [dict(r) for r in self.rows],
                "covariate_shift": list(self.covariate_shift),
                "guarantee": None if self.guarantee is None else self.guarantee.to_dict(),
                "min_k": dict(self.min_k), "check_alpha": self.check_alpha,
                "n_new_images": self.n_new_images, "site": self.site,
                "assumption": self.assumption, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelShiftTransfer":
        if d.get("schema_version") != SCHEMA or d.get("kind_of_result") != \
                "label_shift_transfer":
            raise DataError(f"Not a label-shift transfer of schema {SCHEMA} (schema_version="
                            f"{d.get('schema_version')!r}).")
        g = d.get("guarantee")
        return cls(spec=d["spec"], alpha=d["alpha"], transferable=bool(d["transferable"]),
                   rows=tuple(d["rows"]), covariate_shift=tuple(d["covariate_shift"]),
                   guarantee=None if g is None else GuaranteeResult.from_dict(g),
                   min_k=dict(d["min_k"]), check_alpha=float(d["check_alpha"]),
                   n_new_images=int(d["n_new_images"]), site=d.get("site", ""),
                   assumption=d["assumption"], notes=tuple(d.get("notes", ())))

    def summary(self) -> str:
        if self.transferable:
            kept = [r["name"] for r in self.rows if r["status"] in _CARRIED]
            return (f"{self.spec}: transferred to {self.site or 'the new site'} without labels "
                    f"for {len(kept)} class(es), under {self.assumption}")
        why = "; ".join(self.covariate_shift) or "no row can be carried over"
        return (f"{self.spec}: NOT transferable without labels ({why}); "
                f"{self.min_k.get('statement', '')}")


# ----------------------------------------------------------------------------- transfer
def transfer_guarantee(result: GuaranteeResult, calibration: Predictions, new: Predictions,
                       *, check_alpha: float = 0.01, n_boot: int = 200, seed: int = 0,
                       shift: ShiftCheck | None = None, grid: np.ndarray | None = None,
                       site: str = "") -> LabelShiftTransfer:
    """Carry ``result`` (certified on ``calibration``) to a new site from its UNLABELLED
    predictions ``new`` (labels, if any, are ignored), under pure label shift; see the module
    docstring for what carries over, what is re-weighted and what is not.

    Args:
        calibration: the labelled predictions ``result`` was certified on (same model).
        check_alpha: level of the label-shift check, Bonferroni over the certified rows.
        n_boot: bootstrap replicates of the check (seeded by ``seed``).
        shift: a :func:`~medscalpel.repair.shift.shift_check` of calibration vs new, with
            penultimate features; its feature-space finding counts as covariate shift.
        grid: the fixed logit grid of the precision re-certification (default: the grid
            the original certification tested, ``result.grid``; :data:`~medscalpel.repair.
            conformal.DEFAULT_GRID` only for a result that recorded none, with a note).
    """
    calibration = _as_multilabel(calibration, "transfer_guarantee")
    new = _as_multilabel(new, "transfer_guarantee")
    for p, what in ((calibration, "calibration"), (new, "new")):
        if tuple(p.class_names) != tuple(result.class_names):
            raise DataError(f"transfer_guarantee: the {what} predictions' classes "
                            f"{list(p.class_names)[:3]}... are not the certified ones "
                            f"{list(result.class_names)[:3]}...")
    check_range(check_alpha, "check_alpha", "transfer_guarantee", 0.0, 1.0,
                low_inclusive=False, high_inclusive=False)
    if n_boot < 19:
        raise ConfigError(f"The 'n_boot' parameter of transfer_guarantee must be >= 19 (a "
                          f"p-value below 0.05 needs them). Got {n_boot} instead.")
    g, grid_note = _grid_of(result, grid)
    a = result.alpha if result.alpha is not None else 0.1
    zc, lab, zn = (calibration.logits.astype(np.float64), calibration.targets(),
                   new.logits.astype(np.float64))
    certified = [c for c in result.classes if c.certified]
    level = check_alpha / max(len(certified), 1)
    rows, new_rows, reasons, prev_em = [], [], [], [None] * len(result.class_names)
    for c in result.classes:
        j = None if c.kind == "fnr" else result.class_names.index(c.name)
        data = None if j is None else (zc[:, j], lab[:, j], zn[:, j])
        row, new_c, why = _class_transfer(c, data, a, level, n_boot, seed + (j or 0), g)
        rows.append(row)
        new_rows.append(new_c)
        reasons += why
        if j is not None:
            prev_em[j] = row.get("prior_em")
    if shift is not None and shift.feature is not None and \
            shift.feature.get("share_external_above_p95", 0.0) > 0.10:
        reasons.append(f"feature space: {shift.feature['share_external_above_p95']:.0%} of the "
                       "new images lie beyond the internal 95th percentile distance (expected "
                       "5%; a prevalence change alone keeps it between the classes' shares)")
    plan = recertification_plan(result, a, prev_em)
    carried = [r for r in rows if r["status"] in _CARRIED]
    ok = not reasons and bool(carried)
    if reasons:
        for r in rows:
            if r["status"] in _CARRIED:
                r["status"] = "not transferable"
                r["reason"] = "a shift beyond label shift was found: re-certify on labelled images"
    notes = [f"the new site's labels were not used ({new.n} images)",
             "the label-shift check cannot prove label shift: it finds departures from it "
             "that change the score distribution of a class, with limited power"]
    if grid_note:
        notes.append(grid_note)
    if shift is not None:
        notes.append("shift_check's score KS tests (reported there) are not used here: a "
                     "prevalence change alone moves the score distribution")
    new_g = None
    if ok:
        new_g = dataclasses.replace(
            result, classes=tuple(new_rows), split=site or new.split,
            grid=tuple(float(v) for v in g) if result.kind == "precision" else result.grid,
            notes=result.notes + (f"carried to {site or new.split or 'a new site'} without "
                                  "labels under pure label shift (medscalpel.repair."
                                  "label_shift)",))
    return LabelShiftTransfer(spec=result.spec, alpha=result.alpha, transferable=ok,
                              rows=tuple(rows), covariate_shift=tuple(reasons),
                              guarantee=new_g, min_k=plan, check_alpha=check_alpha,
                              n_new_images=new.n, site=site or new.split, notes=tuple(notes))


def _grid_of(result: GuaranteeResult, grid: np.ndarray | None) -> tuple[np.ndarray, str]:
    """The precision re-certification's logit grid and a note saying where it came from
    (empty when the result certifies no precision)."""
    if grid is not None:
        g, src = np.asarray(grid, float), "the grid given (not the certification's)"
        if g.ndim != 1 or g.size == 0 or np.any(np.diff(g) >= 0):
            raise ConfigError("transfer_guarantee: the 'grid' must be a non-empty strictly "
                              "DECREASING sequence of logit thresholds (tested from the top).")
    elif result.grid:
        g, src = np.asarray(result.grid, float), "the certification's grid"
    else:
        g, src = DEFAULT_GRID, ("the default grid (the certification recorded none: stored "
                                "before the grid was kept)")
    if result.kind != "precision":
        return g, ""
    return g, (f"precision re-certified over {src}: {g.size} logit thresholds from {g[0]:g} "
               f"to {g[-1]:g}")


def _class_transfer(c: ClassGuarantee, data: tuple[np.ndarray, ...] | None, alpha: float,
                    level: float, n_boot: int, seed: int, grid: np.ndarray
                    ) -> tuple[dict[str, Any], ClassGuarantee, list[str]]:
    """One row: ``(record, the row at the new site, covariate-shift reasons)``. ``data``:
    (calibration logits, calibration labels, new logits) of the class; None for the set FNR."""
    row: dict[str, Any] = {"name": c.name, "kind": c.kind, "threshold_logit": c.threshold_logit}
    dropped = dict(certified=False, threshold_logit=None, threshold_prob=None)
    if data is None:  # the set FNR
        row.update(status="not transferable" if c.certified else "not certified",
                   reason="the set FNR depends on the prior over label combinations, which "
                          "per-class prevalences do not give: re-certify on labelled images"
                          if c.certified else c.reason)
        return row, dataclasses.replace(
            c, **dropped, reason="not transferable under label shift without labels"), []
    zc, lab, zn = data
    known = np.isfinite(lab)
    y, z = lab[known] > 0.5, zc[known]
    if not (y.any() and (~y).any()):
        row.update(status="not certified" if not c.certified else "not transferable",
                   reason="the calibration data lack positives or negatives of this class")
        return row, dataclasses.replace(c, **dropped, reason=row["reason"]), []
    pi_cal = float(y.mean())
    bb = bbse_prior(z, y, zn, alpha)
    row.update(prior_calibration=pi_cal,
               prior_em=estimate_prior_em(platt_posteriors(z, y, zn), pi_cal),
               prior_bbse=bb["point"], prior_bbse_interval=[bb["lower"], bb["upper"]],
               prior_bbse_confidence=bb["confidence"])
    if not c.certified:
        row.update(status="not certified", reason=c.reason)
        return row, c, []
    chk = label_shift_check(z[y], z[~y], zn, n_boot, seed)
    row.update(check_statistic=chk["statistic"], check_prior=chk["prior"],
               check_p_value=chk["p_value"], check_level=level,
               check_rejected=chk["p_value"] <= level)
    why = [f"{c.name}: the new site's scores are not a re-weighted mix of the calibration "
           f"positives' and negatives' (distance {chk['statistic']:.3f}, bootstrap p "
           f"{chk['p_value']:.3g} <= {level:.3g})"] if row["check_rejected"] else []
    new_c, extra = _carry_row(c, y, z, alpha, bb["lower"], grid)
    row.update(extra)
    return row, new_c, why


def _carry_row(c: ClassGuarantee, y: np.ndarray, z: np.ndarray, alpha: float, pi_lo: float,
               grid: np.ndarray) -> tuple[ClassGuarantee, dict[str, Any]]:
    """One certified row at the new site: recall rows unchanged, precision re-certified at the
    new prevalence's lower bound."""
    if c.kind in ("recall", "recall_mean"):
        return c, {"status": "carried over unchanged", "new_threshold_logit": c.threshold_logit,
                   "reason": f"{KINDS[c.kind][0]} is conditional on the label: unchanged by a "
                             "prevalence change"}
    thr, info = _precision_at_prior(y, z, c.target, alpha, pi_lo, grid)
    if thr is None:
        return (dataclasses.replace(c, certified=False, threshold_logit=None,
                                    threshold_prob=None, reason=info["reason"]),
                {"status": "not transferable", "reason": info["reason"],
                 "new_threshold_logit": None})
    cal = {**c.calibration, "new_site": {**info, "prevalence_lower_bound": pi_lo}}
    new_c = dataclasses.replace(c, threshold_logit=thr, threshold_prob=_sigmoid(thr),
                                calibration=cal,
                                guarantee=c.guarantee + " at the new site's prevalence")
    return new_c, {"status": "re-certified at the new prevalence", "new_threshold_logit": thr,
                   "prevalence_lower_bound": pi_lo, "reason": (
                       f"precision depends on the prevalence: re-certified at >= {pi_lo:.3f} "
                       f"(BBSE lower bound), threshold logit {c.threshold_logit} -> {thr:g}")}


__all__ = ["LabelShiftTransfer", "bbse_prior", "estimate_prior_em", "label_shift_check",
           "platt_posteriors", "transfer_guarantee"]
