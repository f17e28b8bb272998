"""The site recalibrator: the operating point of a prediction set, and the estimators that move
thresholds / logit maps to a new site (threshold, youden, temperature, platt, offset,
quantile)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LogisticRegression

from medscalpel.engine.external import decisions
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.repair.calibrate import best_cut, cut_table, fit_temperature
from medscalpel.repair.shift.sampling import _class_index, _class_rows
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
METHODS = ("threshold", "youden", "temperature", "platt", "offset", "quantile")
AFFINE = ("temperature", "platt", "offset")  # logit maps; the thresholds are kept


# ----------------------------------------------------------------------------- operating point
def operating_point(preds: Predictions, thresholds: np.ndarray, n_boot: int = 0, seed: int = 0,
                    confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per class sensitivity and specificity at ``thresholds`` (decision rule of
    :func:`medscalpel.engine.external.decisions`) with bootstrap CIs (images resampled)."""
    d, _ = decisions(preds, np.asarray(thresholds, float))
    t = preds.targets()
    rng = np.random.default_rng(seed)
    w = rng.multinomial(preds.n, np.full(preds.n, 1.0 / preds.n), size=n_boot).astype(float) \
        if n_boot else np.zeros((0, preds.n))
    out = []
    a = (1 - confidence) / 2
    for j, name in enumerate(preds.class_names):
        known = np.isfinite(t[:, j])
        y, dj = t[:, j] > 0.5, d[:, j]
        row: dict[str, Any] = {"name": name, "n_pos": int((y & known).sum()),
                               "n_neg": int((~y & known).sum())}
        for m, hit, mask in (("sensitivity", dj, y & known), ("specificity", ~dj, ~y & known)):
            row[m] = float((hit & mask).sum() / mask.sum()) if mask.sum() else float("nan")
            if n_boot and mask.sum():
                den = w @ mask
                with np.errstate(invalid="ignore", divide="ignore"):
                    v = (w @ (hit & mask)) / den
                v = v[np.isfinite(v)]
                row[f"{m}_ci"] = [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]
            else:
                row[f"{m}_ci"] = [float("nan"), float("nan")]
        out.append(row)
    return out


# ----------------------------------------------------------------------------- estimator
def prevalence_weights(t: np.ndarray, prevalence: np.ndarray | None, task: str) -> np.ndarray:
    """Weights that give a labelled sample the class prevalence ``prevalence`` ([K]).

    A k-shot sample holds k positives and k negatives per class, so its prevalence (~50%) is
    not the site's; a probability fitted on it is too high for a rare class, and a stored
    threshold then flags nearly everyone. Weighting positives by ``pi / p_sample`` and negatives
    by ``(1 - pi) / (1 - p_sample)`` (the prior-shift correction of Saerens et al. 2002) fits
    the calibration map at prevalence ``pi``. Multi-label: ``[N, K]`` weights per cell;
    multi-class: ``[N]`` weights per row by its class. ``None`` -> all ones.

    >>> t = np.array([[1.], [1.], [0.], [0.]])
    >>> prevalence_weights(t, np.array([0.1]), "multilabel").ravel().tolist()
    [0.2, 0.2, 1.8, 1.8]
    """
    if prevalence is None:
        return np.ones(t.shape[0] if task != "multilabel" else t.shape)
    pi = np.clip(np.asarray(prevalence, float), 1e-6, 1 - 1e-6)
    if task == "multilabel":
        known = np.isfinite(t)
        y = np.where(known, t, 0.0) > 0.5
        ps = np.clip((y & known).sum(0) / np.maximum(known.sum(0), 1), 1e-6, 1 - 1e-6)
        w = np.where(y, pi / ps, (1 - pi) / (1 - ps))
        return np.where(known, w, 0.0)
    c = t.argmax(1)
    ps = np.clip(np.bincount(c, minlength=t.shape[1]) / max(len(c), 1), 1e-6, None)
    return (pi / ps)[c]


def _nll_temperature(z: np.ndarray, t: np.ndarray, task: str,
                     w: np.ndarray | None = None) -> float:
    return fit_temperature(z, t, float(np.exp(-3.0)), float(np.exp(3.0)), task=task, weights=w)


def _above(score: float) -> float:
    """A cut that calls nothing at or below ``score`` positive (``p >= cut`` is False) in float32
    AND float64: the next float32 above it. Probabilities are stored as float32
    (:meth:`Predictions.probs`), so a score that rounds to exactly 1.0 must not meet a
    "nothing positive" cut; the cut may therefore exceed 1 (a cut of 1.0 would call p = 1.0
    positive)."""
    return float(np.nextafter(np.float32(score), np.float32(np.inf)))


def _match_cut(y: np.ndarray, p: np.ndarray, sens: float, spec: float) -> float:
    """The threshold whose (sensitivity, specificity) on ``(y, p)`` is closest to the target."""

    tab = cut_table(y, p)
    se, sp = tab.sensitivity, tab.specificity
    cost = (se - sens) ** 2 + (sp - spec) ** 2
    i = int(np.argmin(cost))
    cuts = tab.cuts
    if i == 0:
        return _above(cuts[1]) if cuts.size > 1 else 0.5
    if i + 1 < cuts.size:
        return float(0.5 * (cuts[i] + cuts[i + 1]))
    return float(0.5 * cuts[i])


def _rate_cut(p: np.ndarray, rate: float) -> float:
    """A threshold that calls ``rate`` of the scores ``p`` positive (``p >= cut``): midway
    between the ``m``-th and ``m+1``-th highest scores, ``m = round(rate * n)``."""
    s = np.sort(np.asarray(p, np.float64))[::-1]
    m = int(round(rate * s.size))
    if m <= 0:
        return _above(s[0]) if s.size else 0.5
    if m >= s.size:
        return float(s[-1])
    return float(0.5 * (s[m - 1] + s[m]))


class SiteRecalibrator:
    """Re-fit a model's operating point on a labelled sample of a new site (estimator contract).

    Args:
        method: ``threshold`` (match the internal sensitivity/specificity), ``youden``,
            ``temperature`` or ``platt`` (see the module docstring).
        classes: class names to recalibrate (default all); the others keep their threshold.
        min_per_class: positives AND negatives each recalibrated class needs in the sample.
        prevalence: ``[K]`` class prevalence the recalibrated probabilities should reflect
            (``temperature`` / ``platt``; the sample is reweighted to it, see
            :func:`prevalence_weights`). :func:`recalibrate_site` passes the INTERNAL prevalence
            (the stored thresholds were tuned at it; assumes no label shift between sites).
            ``None``: the sample's own prevalence (k positives and k negatives: ~50%).

    Attributes (after :meth:`fit`): ``thresholds_`` ``[K]``, ``temperature_`` (float),
    ``scale_`` / ``bias_`` ``[K]`` (logit transform, identity unless ``platt``),
    ``recalibrated_`` (class names changed), ``target_`` (the internal operating point per class
    for ``threshold``), ``n_fit_``.
    """

    def __init__(self, method: str = "threshold", classes: Sequence[str] | None = None,
                 min_per_class: int = 5, prevalence: Sequence[float] | None = None):
        self.method = method
        self.classes = classes
        self.min_per_class = min_per_class
        self.prevalence = None if prevalence is None else [float(p) for p in prevalence]

    def fit(self, sample: Predictions, thresholds: Sequence[float] | np.ndarray,
            target: Sequence[dict[str, Any]] | None = None,
            reference: Predictions | None = None,
            unlabeled: Predictions | None = None) -> "SiteRecalibrator":
        """Fit on the labelled ``sample`` of the new site.

        Args:
            thresholds: the stored per-class thresholds (the starting point).
            target: per class ``{"sensitivity", "specificity"}`` to restore (``threshold``
                method; e.g. :func:`operating_point` on the internal set).
            reference: labelled INTERNAL predictions (``temperature`` / ``platt``). Given, the
                same map is fitted on them and the new site's scores are mapped onto the
                internal score scale (``g_int^-1(g_ext(z))``), on which the stored thresholds
                were tuned; without it the scores become calibrated probabilities of the
                sample, which only suits thresholds chosen on calibrated probabilities.
            unlabeled: the new site's predictions whose LABELS are not used (``quantile``: the
                site's score distribution); needs ``reference`` too.
        """
        check_in(self.method, "method", "SiteRecalibrator", METHODS)
        check_range(self.min_per_class, "min_per_class", "SiteRecalibrator", 1, integer=True)
        thr = np.asarray(thresholds, float).copy()
        k = sample.num_classes
        if thr.shape != (k,):
            raise ConfigError(f"SiteRecalibrator.fit: {thr.size} thresholds for {k} classes.")
        idx = _class_index(sample, self.classes)
        self._check_sample(sample, idx, target, reference, unlabeled)
        z = sample.logits.astype(np.float64)
        t = sample.targets().astype(np.float64)
        if self.prevalence is not None and len(self.prevalence) != k:
            raise ConfigError(f"SiteRecalibrator: {len(self.prevalence)} prevalences for {k} "
                              "classes.")
        w = prevalence_weights(t, None if self.prevalence is None
                               else np.asarray(self.prevalence), sample.task)
        self.temperature_ = 1.0
        self.scale_, self.bias_ = np.ones(k), np.zeros(k)
        self.reference_ = None
        if self.method in AFFINE:
            self._fit_affine(sample, z, t, w, idx, reference)
        elif self.method == "quantile":
            _quantile_cuts(sample, reference, unlabeled, thr, idx)
            self.reference_ = {"n": reference.n, "n_unlabeled": unlabeled.n}
        elif self.method in ("threshold", "youden"):
            self._sample_cuts(sample, t, thr, target, idx)
        self.thresholds_ = thr
        self.recalibrated_ = tuple(sample.class_names[j] for j in idx)
        self.target_ = None if target is None else [
            {"sensitivity": float(r["sensitivity"]), "specificity": float(r["specificity"])}
            for r in target]
        self.n_fit_ = sample.n
        return self

    def _check_sample(self, sample: Predictions, idx: list[int],
                      target: Sequence[dict[str, Any]] | None, reference: Predictions | None,
                      unlabeled: Predictions | None) -> None:
        """Refuse a sample with too few positives / negatives in a class, or inputs the method
        needs but was not given."""
        for j in idx:
            pos, neg = _class_rows(sample, j)
            if min(pos.size, neg.size) < self.min_per_class:
                raise DataError(
                    f"SiteRecalibrator: class {sample.class_names[j]!r} has {pos.size} positive / "
                    f"{neg.size} negative labelled images in the sample; at least "
                    f"{self.min_per_class} of each are needed. Label more images or drop the "
                    "class from classes=.")
        if self.method == "threshold" and target is None:
            raise ConfigError("SiteRecalibrator(method='threshold').fit needs target= (the "
                              "internal operating point, e.g. operating_point(internal, thr)).")
        if self.method == "quantile" and (reference is None or unlabeled is None):
            raise ConfigError("SiteRecalibrator(method='quantile').fit needs reference= (the "
                              "internal predictions) and unlabeled= (the new site's scores).")
        if self.method == "quantile" and sample.task != "multilabel" and \
                _positive_column(sample) is None:
            raise ConfigError("SiteRecalibrator(method='quantile') needs per-class decisions "
                              "(multi-label or binary); this multi-class model decides by argmax: "
                              "use 'temperature'.")

    def _fit_affine(self, sample: Predictions, z: np.ndarray, t: np.ndarray, w: np.ndarray,
                    idx: list[int], reference: Predictions | None) -> None:
        """Set ``scale_`` / ``bias_`` / ``temperature_`` of a logit map: fitted on the sample, or
        (``reference`` given) composed onto the internal score scale ``g_int^-1(g_ext(z))``,
        both at one prevalence."""
        if self.method in ("platt", "offset") and sample.task != "multilabel":
            raise ConfigError(f"SiteRecalibrator(method={self.method!r}) applies per-class "
                              "sigmoid outputs (multi-label); use 'temperature' or "
                              "'threshold'.")
        if reference is None:
            a_e, b_e, t_e = self._affine(z, t, w, sample.task, idx)
            self.scale_[idx], self.bias_[idx], self.temperature_ = a_e[idx], b_e[idx], t_e
            return
        if tuple(reference.class_names) != tuple(sample.class_names):
            raise DataError("SiteRecalibrator.fit: reference classes "
                            f"{list(reference.class_names)} differ from the sample's.")
        zr = reference.logits.astype(np.float64)
        tr = reference.targets().astype(np.float64)
        wr = prevalence_weights(tr, None if self.prevalence is None
                                else np.asarray(self.prevalence), reference.task)
        a_i, b_i, t_i = self._affine(zr, tr, wr, reference.task, idx,
                                     method="platt" if self.method == "offset" else None)
        a_e, b_e, t_e = self._affine(z, t, w, sample.task, idx,
                                     slope=a_i if self.method == "offset" else None)
        self.scale_[idx] = a_e[idx] / a_i[idx]
        self.bias_[idx] = (b_e[idx] - b_i[idx]) / a_i[idx]
        self.temperature_ = t_e / t_i
        self.reference_ = {"n": reference.n, "scale": a_i.tolist(),
                           "bias": b_i.tolist(), "temperature": t_i}

    def _sample_cuts(self, sample: Predictions, t: np.ndarray, thr: np.ndarray,
                     target: Sequence[dict[str, Any]] | None, idx: list[int]) -> None:
        """``threshold`` / ``youden``: set ``thr[j]`` of each class from the labelled sample (a
        binary multi-class model: one decision, on the second class)."""
        p = sample.probs().astype(np.float64)
        pos_col = _positive_column(sample)
        for j in idx:
            known = np.isfinite(t[:, j])
            y = t[known, j] > 0.5
            if pos_col is not None and j != pos_col:
                continue  # binary multi-class: one decision, on the second class
            if self.method == "youden":
                thr[j] = best_cut(y, p[known, j], "youden")[0]
            else:
                thr[j] = _match_cut(y, p[known, j], target[j]["sensitivity"],
                                    target[j]["specificity"])

    def _affine(self, z: np.ndarray, t: np.ndarray, w: np.ndarray, task: str,
                idx: list[int], method: str | None = None, slope: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-class ``a * logit + b`` fitted by weighted NLL: one temperature (``a = 1 / T``,
        ``b = 0``), Platt (a logistic regression per class) or ``offset`` (``b`` only, the
        slope held at ``slope``, default 1)."""
        method = method or self.method
        k = z.shape[1]
        a, b = np.ones(k), np.zeros(k)
        if method == "temperature":
            temp = _nll_temperature(z, t, task, w)
            return np.full(k, 1.0 / temp), b, temp
        if method == "offset":
            a = np.ones(k) if slope is None else np.asarray(slope, float).copy()
            for j in idx:
                known = np.isfinite(t[:, j])
                s, y, ww = a[j] * z[known, j], t[known, j], w[known, j]
                nll = lambda c, s=s, y=y, ww=ww: float(np.sum(  # noqa: E731
                    ww * (np.logaddexp(0, s + c) - y * (s + c))))
                b[j] = float(minimize_scalar(nll, bounds=(-50.0, 50.0), method="bounded").x)
            return a, b, 1.0

        for j in idx:
            known = np.isfinite(t[:, j])
            # C=100: nearly unpenalized (a default C=1 shrinks the slope of a 40-image sample)
            lr = LogisticRegression(C=100.0).fit(z[known, j:j + 1], t[known, j] > 0.5,
                                                 sample_weight=w[known, j])
            a[j], b[j] = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        return a, b, 1.0

    def _check_fitted(self) -> None:
        if not hasattr(self, "thresholds_"):
            raise ConfigError("This SiteRecalibrator is not fitted yet: call fit() first.")

    def transform(self, preds: Predictions) -> Predictions:
        """``preds`` with recalibrated logits (``scale_ * logit + bias_``; identity for the
        threshold methods) and ``meta["site_recalibration"]``."""
        self._check_fitted()
        z = preds.logits.astype(np.float64) * self.scale_[None, :] + self.bias_[None, :]
        return replace(preds, logits=z.astype(np.float32),
                       meta={**preds.meta, "site_recalibration": self.get_params()})

    def decide(self, preds: Predictions) -> np.ndarray:
        """Boolean ``[N, K]`` decisions after recalibration."""
        return decisions(self.transform(preds), self.thresholds_)[0]

    def get_params(self) -> dict[str, Any]:
        return {"method": self.method, "classes": None if self.classes is None else
                list(self.classes), "min_per_class": self.min_per_class,
                "prevalence": self.prevalence}

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"schema_version": SCHEMA, "params": self.get_params(),
                "thresholds": self.thresholds_.tolist(), "temperature": self.temperature_,
                "scale": self.scale_.tolist(), "bias": self.bias_.tolist(),
                "recalibrated": list(self.recalibrated_), "target": self.target_,
                "n_fit": self.n_fit_, "reference": self.reference_}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SiteRecalibrator":
        r = cls(**d["params"])
        r.thresholds_ = np.asarray(d["thresholds"], float)
        r.temperature_ = float(d["temperature"])
        r.scale_, r.bias_ = np.asarray(d["scale"], float), np.asarray(d["bias"], float)
        r.recalibrated_ = tuple(d["recalibrated"])
        r.target_ = d.get("target")
        r.n_fit_ = int(d["n_fit"])
        r.reference_ = d.get("reference")
        return r


def _quantile_cuts(sample: Predictions, reference: Predictions, unlabeled: Predictions,
                   thr: np.ndarray, idx: list[int]) -> None:
    """``quantile`` (label-free): set ``thr[j]`` so that the site's unlabelled scores are called
    positive at the internal positive-call rate of the stored threshold."""
    p_int = reference.probs().astype(np.float64)
    p_new = unlabeled.probs().astype(np.float64)
    pos_col = _positive_column(sample)
    for j in idx:
        if pos_col is not None and j != pos_col:
            continue
        q = float(np.mean(p_int[:, j] >= thr[j]))  # the internal positive-call rate
        thr[j] = _rate_cut(p_new[:, j], q)


def _positive_column(preds: Predictions) -> int | None:
    return 1 if preds.task == "multiclass" and preds.num_classes == 2 else None
