"""Per-class decision thresholds with finite-sample guarantees (conformal risk control).

:mod:`medscalpel.repair.calibrate` picks point thresholds (Youden, F1, a target sensitivity) on
one split: a "sensitivity 0.90" threshold gives anything from about 0.8 to 0.97 on the next
patients and nothing says how often. The thresholds here come with a statement that holds for a
new draw of patients from the same population, given only that calibration and future images are
exchangeable (i.i.d.) draws from it:

``recall>=T`` (high probability; Learn then Test / RCPS)
    For one class, with ``n`` calibration positives, predict "present" when the logit reaches the
    ``k``-th smallest positive score, ``k`` the largest with ``P(Binomial(n, 1-T) <= k-1) <=
    alpha``. Equivalently: the largest threshold whose one-sided Clopper-Pearson upper
    confidence bound on the miss rate (``k-1`` misses of ``n``) is ``<= 1 - T``. Then
    ``P(recall >= T) >= 1 - alpha`` over the calibration draw (recall = the population recall
    at the chosen threshold). Ties in the scores only make it more conservative. References:
    Angelopoulos, Bates, Candes, Jordan, Lei, "Learn then Test: Calibrating Predictive
    Algorithms to Achieve Risk Control" (2021, arXiv:2110.01052); Bates, Angelopoulos, Lei,
    Malik, Jordan, "Distribution-Free, Risk-Controlling Prediction Sets" (RCPS, J. ACM 2021,
    arXiv:2101.02703). Certifiable at all only when ``T**n <= alpha`` (no miss allowed), i.e.
    ``n >= ceil(log(alpha) / log(T))`` positives: 22 for ``T = 0.9, alpha = 0.1``.

``E[recall]>=T`` (in expectation; Conformal Risk Control)
    The miss indicator of a positive is a loss bounded by 1, monotone in the threshold; CRC
    (Angelopoulos, Bates, Fisch, Lei, Schuster, "Conformal Risk Control", 2022,
    arXiv:2208.02814) takes the largest threshold with ``(n R_n(t) + 1) / (n + 1) <= 1 - T``:
    the ``k``-th smallest positive score with ``k = floor((1-T)(n+1))`` (the (n+1)-corrected
    split-conformal quantile). Then ``E[recall] >= T`` where the expectation is over the
    calibration draw AND the new positive; a given calibration set may fall short. Needs
    ``n >= ceil(1/(1-T)) - 1`` positives (9 for ``T = 0.9``).

``precision>=T`` (high probability; Learn then Test, fixed-sequence testing)
    A FIXED, data-independent grid of logit thresholds (default ``12`` down to ``-12`` in steps
    of ``0.05``) is tested from the top: at threshold ``t`` the null is "population precision
    < T"; given the ``N_t`` calibration images flagged, the true positives among them are
    Binomial(``N_t``, precision(t)), so ``p_t = P(Binomial(N_t, T) >= TP_t)`` is a valid
    p-value. Fixed-sequence testing rejects while ``p_t <= alpha`` and returns the lowest
    rejected threshold: ``P(precision >= T) >= 1 - alpha``. Assumptions: i.i.d. images from one
    population; the grid is fixed in advance; the leading grid points that flag fewer than
    ``n_min = ceil(log(alpha) / log(T))`` calibration images are skipped (no count there could
    reject, they would only stop the sequence). That data-dependent start keeps the error rate
    when P(present | score) is non-decreasing in the score (a score that ranks, so precision
    falls as the threshold falls); if the top of the score range held mostly negatives it could
    be optimistic. Needs at least ``n_min`` positives (all flagged images positive).

``fnr<=a`` (multi-label set false-negative rate, in expectation; CRC)
    One shared probability threshold ``lambda`` for every class; the set of an image is
    ``{classes with probability >= lambda}``; its loss is the share of its TRUE labels missed.
    Over the ``n`` calibration images with at least one (known) positive label, CRC takes the
    largest ``lambda`` with ``(n R_n(lambda) + 1)/(n + 1) <= a``: ``E[missed / true labels] <=
    a`` for a new image with at least one finding (CRC paper, section on multi-label FNR).
    Needs ``n >= ceil(1/a) - 1`` such images.

Thresholds act on LOGITS (``logit >= threshold_logit``; the probability threshold is its
sigmoid, stored alongside). The stored logit is the largest float32 below the calibration score
chosen as the cut: the same decisions on float32 logits, and exactly the analysed rule.

Patients: the binomial arguments count images as independent draws. Pass ``patient_ids`` to
report how many patients the calibration images came from (several images of one patient are
correlated, so the stated confidence is then approximate) and use :func:`patient_split` (built
on :func:`medscalpel.data.base.split_by_patient`) to keep the calibration and the held-out
check apart by PATIENT. Pass ``groups=patient_ids`` to certify on ONE image per patient
(:func:`one_per_group`; a random positive image of each positive patient for recall): the
argument then counts independent patients, and the guarantee is about a random image of a
random patient. On real follow-up films this matters: on the NIH CheXNet predictions the
misses of one patient's images are strongly correlated (design effect 1.47 to 6.29 over the
classes, benchmarks/results/conformal_population.md), so an image-level certificate there
counts several times more independent draws than it has.

:func:`recertify` asks whether a stored guarantee still holds for another model (compressed,
int8) or another site on held-out labelled data: a :class:`~medscalpel.engine.decision.Verdict`
(pass / fail / undecided) from exact one-sample binomial tests of the observed rate against the
certified level, Holm over the certified rows, with the counts, the intervals and the minimum
number of labelled images per class a new site needs (:func:`recertification_plan`). Without
labels, under pure label shift, :func:`medscalpel.repair.label_shift.transfer_guarantee` carries
recall guarantees over unchanged and re-certifies precision at the new site's estimated
prevalence, after a label-free check that the shift is a label shift.

Example:
    >>> import numpy as np
    >>> from medscalpel.engine.predictions import Predictions
    >>> rng = np.random.default_rng(0)
    >>> y = (rng.random((400, 1)) < 0.3).astype(np.float32)
    >>> z = 2.0 * y + rng.normal(size=(400, 1))
    >>> p = Predictions(z, y, ids=tuple(map(str, range(400))), class_names=("x",),
    ...                 task="multilabel")
    >>> g = calibrate_guarantee(p, "recall>=0.9", alpha=0.1)
    >>> g.classes[0].certified, g.classes[0].guarantee
    (True, 'recall >= 0.90 with 90% confidence')
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import gammaln
from scipy.stats import beta as beta_dist
from scipy.stats import binom

from medscalpel.data.base import split_by_patient
from medscalpel.engine.decision import Verdict
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
# clopper_pearson is re-exported: repair/calibrate.py and callers import it from here
from medscalpel.repair.one_sample import (EXACT, HOEFFDING, RateUnit, clopper_pearson,
                                          decide_one_sample, min_trials_to_pass,
                                          rate_interval, trials_for_power)
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
FILENAME = "guarantee.json"
#: guarantee kinds: (wording of the rate, comparison, high-probability?)
KINDS = {"recall": ("recall", ">=", True), "recall_mean": ("recall", ">=", False),
         "precision": ("precision", ">=", True), "fnr": ("set false-negative rate", "<=", False)}
#: the default fixed logit grid of the precision test (from the top)
DEFAULT_GRID = np.round(np.arange(12.0, -12.0 - 1e-9, -0.05), 10)
_SPEC = re.compile(r"^\s*(E\[\s*recall\s*\]|recall|precision|fnr)\s*(>=|<=)\s*"
                   r"([0-9]*\.?[0-9]+)\s*$", re.IGNORECASE)
_EPS = 1e-9


class GuaranteeSpecError(ConfigError):
    """A ``--guarantee`` text that cannot be parsed (one line naming the valid forms)."""


# ----------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class GuaranteeSpec:
    """What to guarantee: ``kind`` (``recall``, ``recall_mean``, ``precision``, ``fnr``) and the
    level (a recall / precision floor, or the FNR ceiling for ``fnr``)."""

    kind: str
    target: float

    @property
    def text(self) -> str:
        name = {"recall": "recall", "recall_mean": "E[recall]", "precision": "precision",
                "fnr": "fnr"}[self.kind]
        return f"{name}{KINDS[self.kind][1]}{self.target:g}"

    @property
    def high_probability(self) -> bool:
        return KINDS[self.kind][2]


def parse_guarantee(text: str | GuaranteeSpec) -> GuaranteeSpec:
    """``'recall>=0.90'`` (with probability 1 - alpha), ``'E[recall]>=0.90'`` (in expectation),
    ``'precision>=0.8'`` or ``'fnr<=0.1'`` (multi-label set, in expectation).

    Example:
        >>> parse_guarantee("recall>=0.9")
        GuaranteeSpec(kind='recall', target=0.9)
    """
    if isinstance(text, GuaranteeSpec):
        return text
    forms = "'recall>=0.90', 'E[recall]>=0.90', 'precision>=0.8' or 'fnr<=0.1'"
    m = _SPEC.match(str(text))
    if not m:
        raise GuaranteeSpecError(f"Cannot read the guarantee {text!r}: write one of {forms} "
                                 "(a level strictly between 0 and 1).")
    name, op, level = m.group(1).lower().replace(" ", ""), m.group(2), float(m.group(3))
    kind = {"e[recall]": "recall_mean"}.get(name, name)
    if op != KINDS[kind][1]:
        raise GuaranteeSpecError(f"Cannot read the guarantee {text!r}: {name} takes "
                                 f"'{KINDS[kind][1]}' (one of {forms}).")
    if not 0.0 < level < 1.0:
        raise GuaranteeSpecError(f"Cannot read the guarantee {text!r}: the level must be "
                                 f"strictly between 0 and 1; got {level:g}.")
    return GuaranteeSpec(kind, level)


# ----------------------------------------------------------------------------- minimum n
def min_positives(kind: str, target: float, alpha: float | None = None) -> int:
    """The fewest calibration positives (images with a finding, for ``fnr``) for which the
    guarantee can be certified at all.

    * ``recall`` / ``precision`` with probability ``1 - alpha``: zero errors allowed, so
      ``target**n <= alpha``: ``n >= ceil(log(alpha) / log(target))``.
    * ``recall_mean`` (CRC): ``floor((1 - target)(n + 1)) >= 1``: ``n >= ceil(1/(1-target)) - 1``.
    * ``fnr`` (CRC) with ceiling ``a = target``: ``n >= ceil(1/a) - 1``.

    Example:
        >>> min_positives("recall", 0.9, 0.1), min_positives("recall_mean", 0.9)
        (22, 9)
    """
    if kind in ("recall", "precision"):
        if alpha is None:
            raise ConfigError(f"min_positives: the '{kind}' guarantee needs alpha.")
        return int(math.ceil(math.log(alpha) / math.log(target) - _EPS))
    eps = 1.0 - target if kind == "recall_mean" else target
    return max(int(math.ceil(1.0 / eps - _EPS)) - 1, 1)


# ----------------------------------------------------------------------------- kernels
def recall_order_statistic(n_pos: int, target: float, alpha: float | None) -> int:
    """``k`` (1-based) such that the ``k``-th smallest positive score is the threshold; 0 when
    nothing can be certified. ``alpha=None``: CRC (in expectation); else the binomial /
    Clopper-Pearson rule with confidence ``1 - alpha``."""
    if n_pos <= 0:
        return 0
    eps = 1.0 - target
    if alpha is None:
        return int(min(math.floor(eps * (n_pos + 1) + _EPS), n_pos))
    ks = np.arange(1, n_pos + 1)
    ok = binom.cdf(ks - 1, n_pos, eps) <= alpha + 1e-12
    return int(ks[ok].max()) if ok.any() else 0


def miss_rate_upper_bound(misses: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound (confidence ``1 - alpha``) on a miss rate."""
    return 1.0 if misses >= n else float(beta_dist.ppf(1 - alpha, misses + 1, n - misses))


def _just_below(cut: float) -> float:
    """The largest float32 below ``cut`` (a float32 logit): ``logit >= threshold`` makes the
    same decisions as ``logit >= cut`` on float32 logits, and the guarantee is the one proved
    for the order statistic itself (a midpoint lower down would only waste recall budget)."""
    return float(np.nextafter(np.float32(cut), np.float32(-np.inf)))


def _sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + math.exp(-z))) if z > -700 else 0.0


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ClassGuarantee:
    """The certified threshold of one class (or of the whole label set, for ``fnr``).

    Attributes:
        name: the class name (``all classes`` for the set FNR).
        kind, target, alpha: what was asked (``alpha`` None for in-expectation kinds).
        certified: whether the guarantee could be given; ``reason`` says why not.
        threshold_logit, threshold_prob: the decision rule ``logit >= threshold_logit``
            (None when not certified).
        n_images, n_positives, n_patients, n_patients_positive: calibration data of this row
            (patients None when unknown).
        min_positives: the fewest positives for which the guarantee is certifiable at all.
        guarantee: the wording, e.g. ``recall >= 0.90 with 90% confidence``.
        calibration: what the threshold does on the calibration data (misses, recall,
            flagged share, precision, and the bound or p-value behind the certificate).
    """

    name: str
    kind: str
    target: float
    alpha: float | None
    certified: bool
    threshold_logit: float | None
    threshold_prob: float | None
    n_images: int
    n_positives: int
    n_patients: int | None
    n_patients_positive: int | None
    min_positives: int
    guarantee: str
    reason: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassGuarantee":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class GuaranteeResult:
    """Certified thresholds of every class for one guarantee, with their calibration data."""

    spec: str
    kind: str
    target: float
    alpha: float | None
    class_names: tuple[str, ...]
    classes: tuple[ClassGuarantee, ...]
    n_images: int
    n_patients: int | None
    split: str = ""
    model_id: str = ""
    notes: tuple[str, ...] = ()
    #: the fixed logit grid the precision test ran over, highest first (precision only; empty
    #: for the other kinds and for results stored before it was recorded)
    grid: tuple[float, ...] = ()
    schema_version: int = SCHEMA

    @property
    def shared(self) -> bool:
        """True for the set FNR: one threshold for every class."""
        return self.kind == "fnr"

    def thresholds_logit(self, fill: float = float("nan")) -> np.ndarray:
        """``[K]`` logit thresholds (``fill`` where not certified)."""
        if self.shared:
            t = self.classes[0].threshold_logit
            return np.full(len(self.class_names), fill if t is None else t, float)
        return np.array([fill if c.threshold_logit is None else c.threshold_logit
                         for c in self.classes], float)

    def thresholds_prob(self, fill: float = float("nan")) -> np.ndarray:
        z = self.thresholds_logit(np.nan)
        out = np.array([fill if not np.isfinite(v) else _sigmoid(v) for v in z], float)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "kind_of_result": "guarantee",
                "spec": self.spec, "kind": self.kind, "target": self.target,
                "alpha": self.alpha, "class_names": list(self.class_names),
                "classes": [c.to_dict() for c in self.classes], "n_images": self.n_images,
                "n_patients": self.n_patients, "split": self.split, "model_id": self.model_id,
                "notes": list(self.notes), **({"grid": list(self.grid)} if self.grid else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GuaranteeResult":
        if d.get("schema_version") != SCHEMA or d.get("kind_of_result") != "guarantee":
            raise DataError(f"Not a guarantee result of schema {SCHEMA}: schema_version="
                            f"{d.get('schema_version')!r}, kind_of_result="
                            f"{d.get('kind_of_result')!r}.")
        return cls(spec=d["spec"], kind=d["kind"], target=float(d["target"]),
                   alpha=None if d["alpha"] is None else float(d["alpha"]),
                   class_names=tuple(d["class_names"]),
                   classes=tuple(ClassGuarantee.from_dict(c) for c in d["classes"]),
                   n_images=int(d["n_images"]), n_patients=d["n_patients"],
                   split=d.get("split", ""), model_id=d.get("model_id", ""),
                   notes=tuple(d.get("notes", ())),
                   grid=tuple(float(v) for v in d.get("grid") or ()))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        return write_json(path / FILENAME if path.suffix != ".json" else path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GuaranteeResult":
        path = Path(path)
        return cls.from_dict(read_json(path / FILENAME if path.is_dir() else path))

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for c in self.classes:
            cal = c.calibration
            rows.append({"class": c.name, "certified": "yes" if c.certified else "NO",
                         "thr (prob)": c.threshold_prob, "thr (logit)": c.threshold_logit,
                         "positives": c.n_positives, "min": c.min_positives,
                         "cal rate": cal.get("rate"), "flagged": cal.get("flagged_share"),
                         "guarantee / reason": c.guarantee if c.certified else c.reason})
        return rows


# ----------------------------------------------------------------------------- per class
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


def _pids(patient_ids, n) -> list[str | None] | None:
    if patient_ids is None:
        return None
    pids = [None if p is None or str(p) == "" else str(p) for p in patient_ids]
    if len(pids) != n:
        raise DataError(f"patient_ids: {len(pids)} ids for {n} predictions; give one per "
                        "image, in the Predictions' order.")
    return pids


def _n_patients(pids, rows) -> int | None:
    if pids is None:
        return None
    return len({pids[i] if pids[i] is not None else f"__row{i}" for i in rows})


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
    notes = []
    if gids is not None:
        notes.append("certified on ONE image per patient (groups, seed "
                     f"{seed}): the certificate counts patients, independent draws; it is "
                     "about a random image of a random patient (patients weigh equally)")
    elif pids is None:
        notes.append("patients unknown: the calibration images are counted as independent "
                     "draws")
    elif n_pat is not None and n_pat < preds.n:
        notes.append(f"{preds.n} images from {n_pat} patients: images of one patient are "
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
    return GuaranteeResult(spec=spec.text, kind=spec.kind, target=spec.target, alpha=a,
                           class_names=tuple(preds.class_names), classes=rows,
                           n_images=preds.n, n_patients=n_pat, split=preds.split,
                           model_id=preds.model_id, notes=tuple(notes),
                           grid=tuple(float(v) for v in g) if spec.kind == "precision"
                           else ())


def one_per_group(rows: np.ndarray, groups: Sequence[str | None], seed: Any = 0
                  ) -> np.ndarray:
    """One uniformly random row of ``rows`` per group (``groups[row]``; None: the row is its own
    group), drawn with ``seed``; returned in increasing order.

    Example:
        >>> one_per_group(np.arange(5), ["a", "a", None, "b", "b"], seed=0).size
        3
    """
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return rows
    order = np.random.default_rng(seed).permutation(rows.size)
    keys = np.array([f"r{r}" if groups[r] is None else f"g{groups[r]}" for r in rows[order]])
    _, first = np.unique(keys, return_index=True)
    return np.sort(rows[order][first])


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


# ----------------------------------------------------------------------------- patient split
@dataclass(frozen=True)
class PatientSplit:
    """Rows of a calibration part and a held-out part, kept apart by patient."""

    calibration: np.ndarray
    held_out: np.ndarray
    unit: str  # patient / image / mixed
    n_patients: tuple[int | None, int | None]


def patient_split(n_or_preds: int | Predictions, patient_ids: Sequence[str | None] | None,
                  held_out: float = 0.5, seed: int = 0) -> PatientSplit:
    """Split rows into calibration and held-out by PATIENT (``held_out`` of the patients go to
    the held-out part) with :func:`medscalpel.data.base.split_by_patient`; rows without a
    patient id (or all rows, when ``patient_ids`` is None) are their own patient, and ``unit``
    says so (``image`` / ``mixed``)."""
    n = n_or_preds.n if isinstance(n_or_preds, Predictions) else int(n_or_preds)
    check_range(held_out, "held_out", "patient_split", 0.0, 1.0, low_inclusive=False,
                high_inclusive=False)
    pids = _pids(patient_ids, n) if patient_ids is not None else [None] * n
    cal, held = split_by_patient(pids, held_out, seed)
    known = sum(p is not None for p in pids)
    unit = "patient" if known == n and n else ("image" if known == 0 else "mixed")
    if patient_ids is None:
        return PatientSplit(cal, held, unit, (None, None))
    return PatientSplit(cal, held, unit, (_n_patients(pids, cal), _n_patients(pids, held)))


# ----------------------------------------------------------------------------- recertify
#: schema of :class:`Recertification` (2: the outcome is a :class:`Verdict`, with the minimum k)
RECERT_SCHEMA = 2
#: the chance of a pass the planning number ``k for 80%`` aims at
PLAN_POWER = 0.8


def _unit_of(kind: str) -> tuple[str, str, bool]:
    """(what a trial is, the bound, higher is better) of a guarantee kind."""
    if kind == "precision":
        return "flagged images", EXACT, True
    if kind == "fnr":
        return "images with a finding", HOEFFDING, False
    return "positives", EXACT, True


def recertification_plan(result: GuaranteeResult, alpha: float | None = None,
                         prevalence: Sequence[float | None] | None = None,
                         power: float = PLAN_POWER) -> dict[str, Any]:
    """How many labelled images a new model or site needs to re-certify ``result``.

    Per certified row: ``k_pass``, the fewest trials (positives for recall; flagged images for
    precision; images with a finding for the set FNR) with which a pass is possible AT ALL,
    i.e. when none is missed (``T**k < alpha/2/m``: the first Holm step of the one-sided test
    with ``m`` certified rows); ``k_likely``, the trials with which a pass has probability
    ``>= power`` if the new rate equals the calibration rate (exact binomial power; None when
    the calibration rate is not above the level, or for the set FNR); both also as labelled
    images per class at ``prevalence`` (default: the calibration prevalence / flagged share),
    an estimate. ``k_images`` is the largest ``k_pass`` in images over the rows: a new site with
    fewer labelled images cannot re-certify the guarantee whatever its model does.
    """
    a = alpha if alpha is not None else (result.alpha if result.alpha is not None else 0.1)
    check_range(a, "alpha", "recertification_plan", 0.0, 1.0, low_inclusive=False,
                high_inclusive=False)
    rows = [c for c in result.classes if c.certified]
    tail = a / 2.0 / max(len(rows), 1)
    per: dict[str, dict[str, Any]] = {}
    for c in rows:
        what, bound, higher = _unit_of(c.kind)
        k = min_trials_to_pass(c.target, tail, bound, higher)
        r = c.calibration.get("rate")
        r = None if r is None else (1.0 - r if c.kind == "fnr" else r)
        likely = (trials_for_power(c.target, r, tail, power) if bound == EXACT and r is not None
                  and r > c.target else None)
        j = result.class_names.index(c.name) if c.name in result.class_names else None
        prev = None if prevalence is None or j is None else prevalence[j]
        src = "the new data" if prev is not None else "the calibration data"
        if prev is None:
            prev = (c.calibration.get("flagged_share") if c.kind == "precision" else
                    c.n_positives / c.n_images if c.n_images else None)
        img = (lambda t: None if t is None or not prev else int(math.ceil(t / prev)))
        per[c.name] = {"trials": what, "k_pass": k, "k_likely": likely,
                       "assumed_rate": c.calibration.get("rate") if likely else None,
                       "share": prev, "share_from": src, "images_pass": img(k),
                       "images_likely": img(likely)}
    k_img = max((v["images_pass"] for v in per.values() if v["images_pass"] is not None),
                default=None)
    k_lik = [v["images_likely"] for v in per.values()]
    likely_img = max(k_lik) if k_lik and all(v is not None for v in k_lik) else None
    if not per:
        text = "nothing was certified: there is no guarantee to re-certify"
    else:
        text = (f"re-certifying {result.spec} (alpha {a:g}, {len(per)} certified row(s), Holm) "
                f"needs at least {max(v['k_pass'] for v in per.values())} "
                f"{next(iter(per.values()))['trials']} per row for a pass to be possible at all"
                + (f" (about {k_img} labelled images per class at the prevalence of "
                   f"{next(iter(per.values()))['share_from']}, an estimate)" if k_img else "")
                + (f"; about {likely_img} labelled images for a {power:.0%} chance of a pass if "
                   "the rates stay at their calibration values" if likely_img else ""))
    return {"alpha": a, "one_sided_tail_first_holm_step": tail, "power": power, "rows": per,
            "k_images": k_img, "k_images_likely": likely_img, "statement": text}


@dataclass(frozen=True)
class Recertification:
    """Does a stored guarantee hold for new predictions (another model, runtime or site)?

    ``verdict`` is a :class:`~medscalpel.engine.decision.Verdict` (pass / fail / undecided per
    certified row and overall; exact one-sample binomial tests, Hoeffding for the set FNR, Holm
    over the rows, both families at one-sided ``alpha / 2``; rows that were never certified
    are named unscorable and accepted: there is nothing to re-check). ``outcome`` is its
    outcome; ``rows`` hold the observed rate, its interval at the row's Holm level, the counts
    and the margin observed - level; ``min_k`` is :func:`recertification_plan` (the fewest
    positives / labelled images per class with which the guarantee can be re-certified).
    """

    spec: str
    outcome: str
    alpha: float
    correction: str
    confidence: float
    rows: tuple[dict[str, Any], ...]
    n_images: int
    n_patients: int | None
    model_id: str
    certified_model_id: str
    verdict: Verdict
    min_k: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    schema_version: int = RECERT_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "kind_of_result": "recertification",
                "spec": self.spec, "outcome": self.outcome, "alpha": self.alpha,
                "correction": self.correction, "confidence": self.confidence,
                "rows": [dict(r) for r in self.rows], "n_images": self.n_images,
                "n_patients": self.n_patients, "model_id": self.model_id,
                "certified_model_id": self.certified_model_id,
                "verdict": self.verdict.to_dict(), "min_k": dict(self.min_k),
                "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recertification":
        if d.get("schema_version") != RECERT_SCHEMA or d.get("kind_of_result") != \
                "recertification":
            raise DataError(f"Not a recertification result of schema {RECERT_SCHEMA} "
                            f"(schema_version={d.get('schema_version')!r}): recompute it with "
                            "'repair calibrate --recertify'.")
        return cls(spec=d["spec"], outcome=d["outcome"], alpha=float(d["alpha"]),
                   correction=d["correction"], confidence=float(d["confidence"]),
                   rows=tuple(d["rows"]), n_images=int(d["n_images"]),
                   n_patients=d["n_patients"], model_id=d["model_id"],
                   certified_model_id=d["certified_model_id"],
                   verdict=Verdict.from_dict(d["verdict"]), min_k=dict(d.get("min_k") or {}),
                   notes=tuple(d.get("notes", ())))

    def summary(self) -> str:
        """One line: the outcome, why, and the minimum k."""
        return f"{self.spec}: {self.verdict.summary()}; {self.min_k.get('statement', '')}"

    def table(self) -> list[dict[str, Any]]:
        return [{"class": r["name"], "outcome": r["outcome"], "observed": r.get("observed"),
                 "CI": tuple(r["ci"]) if r.get("ci") else None, "n": r.get("n"),
                 "level": r["level"], "margin": r.get("margin"), "k to pass": r.get("k_pass")}
                for r in self.rows]


def _rate_unit(c: ClassGuarantee, j: int | None, z_all: np.ndarray, lab: np.ndarray
               ) -> tuple[RateUnit, dict[str, Any]]:
    """The new data's evidence on one certified row, and its row record."""
    rate, _, _ = KINDS[c.kind]
    if c.kind == "fnr":
        pos = np.nan_to_num(lab, nan=0.0) > 0.5
        img = pos.sum(1) > 0
        n = int(img.sum())
        obs = _set_fnr(z_all[img], pos[img], c.threshold_logit) if n else None
        u = RateUnit(c.name, c.target, None, n, obs, False, HOEFFDING, int(z_all.shape[0]),
                     n, int(z_all.shape[0]) - n, rate)
        return u, {"successes": None, "n_positives": n}
    known = np.isfinite(lab[:, j])
    y = lab[known, j] > 0.5
    cnt = _counts(y, z_all[known, j], c.threshold_logit)
    x, n = (cnt["tp"], cnt["tp"] + cnt["fp"]) if c.kind == "precision" else (cnt["tp"],
                                                                             int(y.sum()))
    u = RateUnit(c.name, c.target, x, n, None, True, EXACT, int(known.sum()), int(y.sum()),
                 int((~y).sum()), rate)
    return u, {"successes": x, "n_positives": int(y.sum()),
               "flagged_share": cnt["flagged_share"]}


def recertify(result: GuaranteeResult, new_preds: Predictions, alpha: float | None = None,
              patient_ids: Sequence[str | None] | None = None) -> Recertification:
    """Check a stored guarantee on held-out labelled predictions of a (new) model or site.

    Each certified row's threshold is applied to ``new_preds``; the observed recall
    (precision; set FNR) is tested against the certified level with the exact one-sided
    binomial test (Hoeffding for the set FNR, a mean of [0, 1] losses), Holm over the certified
    rows, both families at one-sided ``alpha / 2`` (:func:`medscalpel.repair.one_sample.
    decide_one_sample`, a :class:`~medscalpel.engine.decision.Verdict`). Per row: ``pass`` when
    the exact lower bound at its Holm level lies above the level, ``fail`` when the upper bound
    lies below it, else ``undecided`` (with the images that would likely decide it, an
    estimate). Overall: ``fail`` if any row fails, ``pass`` if every certified row passes,
    else ``undecided``. For an in-expectation guarantee this tests the recall / FNR at the
    stored threshold (the quantity whose mean CRC bounds). The result states the minimum k
    (:func:`recertification_plan`) at the new data's prevalence.

    Args:
        alpha: the error allowed for the whole family, two-sided (default: the guarantee's
            alpha, 0.1 for in-expectation kinds).
        patient_ids: of ``new_preds``, to report the patient count.
    """
    new_preds = _as_multilabel(new_preds, "recertify")
    if tuple(new_preds.class_names) != tuple(result.class_names):
        raise DataError(f"recertify: the new predictions' classes {new_preds.class_names[:3]}"
                        f"... are not the certified ones {result.class_names[:3]}...")
    a = alpha if alpha is not None else (result.alpha if result.alpha is not None else 0.1)
    check_range(a, "alpha", "recertify", 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    pids = _pids(patient_ids, new_preds.n)
    z_all = new_preds.logits.astype(np.float64)
    lab = new_preds.targets()
    units, extra = [], {}
    for c in result.classes:
        if not c.certified:
            units.append(RateUnit(c.name, c.target, rate=KINDS[c.kind][0],
                                  unscorable="not certified: " + c.reason))
            continue
        j = None if c.kind == "fnr" else result.class_names.index(c.name)
        u, extra[c.name] = _rate_unit(c, j, z_all, lab)
        units.append(u)
    uncertified = [u.name for u in units if u.unscorable]
    verdict = decide_one_sample(
        units, level=1.0 - a, metric=KINDS[result.kind][0], accepted_unscorable=uncertified,
        method="exact one-sample binomial test (Clopper-Pearson)" if result.kind != "fnr"
        else "Hoeffding one-sample test of a mean of [0, 1] losses",
        meta={"spec": result.spec, "certified_on": result.split,
              "certified_model_id": result.model_id})
    prev = [None] * len(result.class_names)
    for c in result.classes:
        e = extra.get(c.name)
        if e is not None and c.kind != "fnr":
            j = result.class_names.index(c.name)
            known = int(np.isfinite(lab[:, j]).sum())
            share = e["flagged_share"] if c.kind == "precision" else (
                e["n_positives"] / known if known else None)
            prev[j] = share or None
    plan = recertification_plan(result, a, prev)
    rows = []
    for c, u in zip(result.classes, units):
        v = verdict.unit(c.name)
        row: dict[str, Any] = {"name": c.name, "level": c.target,
                               "threshold_logit": c.threshold_logit, "outcome": v.outcome,
                               "reason": v.reason}
        if c.certified:
            obs = u.value
            lo, hi = rate_interval(u, v.level_adj)  # the unit's interval, as a rate
            row.update(observed=obs if math.isfinite(obs) else None,
                       ci=[lo, hi] if math.isfinite(lo) else None, level_adj=v.level_adj,
                       n=u.trials, successes=extra[c.name]["successes"],
                       n_images=u.n_images, n_positives=extra[c.name]["n_positives"],
                       margin=(obs - c.target) if math.isfinite(obs) else None,
                       more_images=v.more_images, k_pass=plan["rows"][c.name]["k_pass"])
        rows.append(row)
    notes = [] if any(c.certified for c in result.classes) else [
        "nothing was certified: nothing to re-certify"]
    if result.kind == "recall_mean":
        notes.append("an in-expectation guarantee: the recall at the stored threshold is "
                     "tested against the level")
    n_pat = _n_patients(pids, range(new_preds.n))
    if n_pat is not None and n_pat < new_preds.n:
        notes.append(f"{new_preds.n} images from {n_pat} patients: the tests count images as "
                     "independent draws (approximate)")
    m = verdict.n_tests
    return Recertification(spec=result.spec, outcome=verdict.outcome, alpha=a,
                           correction=f"holm over {m} certified row(s), one-sided alpha "
                                      f"{a / 2:g} per family",
                           confidence=1.0 - a, rows=tuple(rows), n_images=new_preds.n,
                           n_patients=n_pat, model_id=new_preds.model_id,
                           certified_model_id=result.model_id, verdict=verdict, min_k=plan,
                           notes=tuple(notes))


# ----------------------------------------------------------------------------- test-half null
#: the tolerance of "test-half recall >= T" in :func:`heldout_max_misses`, the same as the
#: benchmarks' ``recall >= T - 1e-12``
HELDOUT_TOL = 1e-12


def heldout_max_misses(m_test: int, target: float) -> int:
    """The most misses among ``m_test`` test positives that still leave the test recall
    ``(m_test - misses) / m_test >= target`` (up to :data:`HELDOUT_TOL`, the benchmarks'
    convention, so e.g. ``m_test = 10, target = 0.9`` allows 1); -1 when ``m_test <= 0``.

    Example:
        >>> heldout_max_misses(10, 0.9), heldout_max_misses(769, 0.9)
        (1, 76)
    """
    m = int(m_test)
    if m <= 0:
        return -1
    j = np.arange(m + 1)
    return int(np.count_nonzero((m - j) / m >= target - HELDOUT_TOL)) - 1


def heldout_miss_pmf(n_cal: int, k: int, m_test: int) -> np.ndarray:
    """``P(J = j)``, ``j = 0..m_test``: the law of the number ``J`` of test positives that miss
    a threshold at the ``k``-th smallest of ``n_cal`` calibration positive scores.

    The rule is the library's (:func:`calibrate_guarantee`: ``logit >= `` just below the
    ``k``-th smallest calibration positive, so a test positive is missed iff its score is
    strictly below that order statistic). If the ``n_cal + m_test`` positive scores are
    exchangeable and have no ties, the ranks of the calibration scores among all of them are a
    uniformly random ``n_cal``-subset, and ``J`` (the test scores below the ``k``-th
    calibration score) is negative-hypergeometric:
    ``P(J=j) = C(j+k-1, j) C(m-j+n-k, m-j) / C(n+m, m)`` (scipy's ``nhypergeom(n+m, m, k)``).
    This holds for ANY fixed set of distinct scores split uniformly at random, so it is also
    the law over random image-wise splits of one fixed held-out set. Ties only lower ``J``.

    Example:
        >>> p = heldout_miss_pmf(4, 1, 2)  # 6 ways: J = 0, 1, 2 in 10, 4, 1 of 15
        >>> [round(float(v) * 15, 6) for v in p]
        [10.0, 4.0, 1.0]
    """
    n, k, m = int(n_cal), int(k), int(m_test)
    if not (n >= 1 and 1 <= k <= n and m >= 0):
        raise ConfigError(f"heldout_miss_pmf: need 1 <= k <= n_cal and m_test >= 0; got "
                          f"n_cal={n}, k={k}, m_test={m}.")
    j = np.arange(m + 1)
    logp = (gammaln(j + k) - gammaln(j + 1) - gammaln(k)
            + gammaln(m - j + n - k + 1) - gammaln(m - j + 1) - gammaln(n - k + 1)
            - (gammaln(n + m + 1) - gammaln(m + 1) - gammaln(n + 1)))
    p = np.exp(logp)
    return p / p.sum()  # removes the rounding of the log-gammas (the exact sum is 1)


def expected_test_share(n_cal: int, k: int, m_test: int, target: float) -> float:
    """The probability that a test half of ``m_test`` positives shows recall ``>= target`` at
    the ``k``-th smallest of ``n_cal`` calibration positive scores, if calibration and test
    positives are exchangeable (:func:`heldout_miss_pmf`; ``k`` as chosen by
    :func:`recall_order_statistic`). Averaged over splits, it is the share of test halves an
    exactly valid ``recall>=T`` certificate is expected to show meeting ``T``: below
    ``1 - alpha``, since the test half is itself a finite sample. NaN when ``k == 0`` (not
    certified) or ``m_test == 0``.

    Example:
        >>> n = 769
        >>> k = recall_order_statistic(n, 0.9, 0.1)
        >>> round(expected_test_share(n, k, 769, 0.9), 3)
        0.834
    """
    if int(k) <= 0 or int(m_test) <= 0:
        return float("nan")
    jmax = heldout_max_misses(m_test, target)
    return float(min(1.0, heldout_miss_pmf(n_cal, k, m_test)[: jmax + 1].sum()))


def poisson_binomial_pmf(probs: Sequence[float]) -> np.ndarray:
    """``P(S = s)``, ``s = 0..len(probs)``, for ``S`` a sum of independent Bernoulli(``p_i``)
    (exact convolution)."""
    pmf = np.ones(1)
    for p in np.asarray(probs, np.float64):
        pmf = np.convolve(pmf, [1.0 - p, p])
    return pmf


def compare_test_share(hits: Sequence[bool], probs: Sequence[float],
                       level: float = 0.95) -> dict[str, Any]:
    """Observed test-half hits against their exchangeable probabilities ``probs``
    (:func:`expected_test_share` per split).

    Returns ``n``, ``observed`` (share), ``expected`` (mean of ``probs``), ``range`` (the
    central ``level`` range of the share if the hits were independent Bernoulli(``p_i``)),
    ``p_low`` = P(S <= observed), ``p_high`` = P(S >= observed), ``p_two_sided`` (twice the
    smaller, capped at 1; Poisson-binomial) and ``consistent`` (``p_two_sided >= 1 - level``).
    Independence holds for splits drawn independently and uniformly by IMAGE from one fixed
    set (given that set); a patient-wise split keeps a patient's images together, which is not
    a uniform image-wise split, so there the test checks whether patient clustering matters.
    """
    h = np.asarray(hits, bool)
    p = np.asarray(probs, np.float64)
    if h.shape != p.shape:
        raise DataError(f"compare_test_share: {h.size} hits for {p.size} probabilities.")
    ok = np.isfinite(p)
    h, p = h[ok], p[ok]
    n = int(h.size)
    if n == 0:
        return {"n": 0, "observed": None, "expected": None, "range": None, "p_low": None,
                "p_high": None, "p_two_sided": None, "consistent": None}
    s = int(h.sum())
    pmf = poisson_binomial_pmf(p)
    cdf = np.cumsum(pmf)
    lo = int(np.searchsorted(cdf, (1 - level) / 2 - 1e-12))
    hi = int(np.searchsorted(cdf, 1 - (1 - level) / 2 - 1e-12))
    p_low, p_high = float(min(1.0, cdf[s])), float(min(1.0, pmf[s:].sum()))
    two = float(min(1.0, 2 * min(p_low, p_high)))
    return {"n": n, "observed": s / n, "expected": float(p.mean()),
            "range": [lo / n, hi / n], "p_low": p_low, "p_high": p_high, "p_two_sided": two,
            "consistent": bool(two >= 1 - level)}
