"""F re-optimization (:func:`reoptimize_classifier`): refit the final layer by L2-regularised
logistic regression on standardised cached features, ``C`` chosen on a selection set, the
standardisation folded back into ``W`` and ``b`` exactly."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from medscalpel.engine.metrics import auroc
from medscalpel.engine.predict import Features
from medscalpel.errors import ConfigError, DataError
from medscalpel.models.classifier import MedClassifier
from medscalpel.progress import track
from medscalpel.repair.retrain.result import RetrainResult, _check_feats, _finish, _rows
from medscalpel.validation import check_in, check_range


@dataclass(frozen=True)
class _Scaled:
    """Standardised features: all training rows (``x_all``, its ``mu`` / ``sd``), the rows
    fitted on and the rows ``C`` is selected on, with their labels."""

    x_all: np.ndarray
    mu: np.ndarray
    sd: np.ndarray
    xs_fit: np.ndarray
    xs_sel: np.ndarray
    lab_fit: np.ndarray
    lab_sel: np.ndarray

    @property
    def xs_all(self) -> np.ndarray:
        return (self.x_all - self.mu) / self.sd


def _scaled(train: Features, val: Features | None, seed: int) -> _Scaled:
    """Standardise on the training mean / std; without ``val`` a seeded 20 % of ``train`` is
    held out for the selection."""
    x_all = train.features.astype(np.float64)
    mu = x_all.mean(0)
    sd = x_all.std(0)
    sd[sd < 1e-12] = 1.0
    if val is None:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(x_all.shape[0])
        n_hold = max(1, int(round(0.2 * x_all.shape[0])))
        fit_rows, sel_rows = perm[n_hold:], perm[:n_hold]
        xs_fit, xs_sel = (x_all[fit_rows] - mu) / sd, (x_all[sel_rows] - mu) / sd
        lab_fit, lab_sel = np.asarray(train.labels)[fit_rows], np.asarray(train.labels)[sel_rows]
    else:
        xs_fit = (x_all - mu) / sd
        xs_sel = (val.features.astype(np.float64) - mu) / sd
        lab_fit, lab_sel = np.asarray(train.labels), np.asarray(val.labels)
    return _Scaled(x_all, mu, sd, xs_fit, xs_sel, lab_fit, lab_sel)


def _fit_lr(xf: np.ndarray, yf: np.ndarray, c: float, max_iter: int) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=max_iter, tol=1e-4).fit(xf, yf)


def _score(clf: LogisticRegression, xs: np.ndarray, ys: np.ndarray, select: str) -> float:
    """Selection score (higher is better): AUROC (macro for multinomial) or minus log-loss."""
    p = clf.predict_proba(xs)
    if select == "auroc":
        if p.shape[1] == 2:
            return auroc(ys == clf.classes_[1], p[:, 1])
        return float(np.nanmean([auroc(ys == c, p[:, i]) for i, c in enumerate(clf.classes_)]))
    return -float(log_loss(ys, p, labels=clf.classes_))


def _refit_multiclass(train: Features, s: _Scaled, names: Sequence[str], cs: Sequence[float],
                      select: str, max_iter: int, refit_all: bool, history: list[dict[str, Any]],
                      owner: str, progress: bool | None
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """One multinomial model for every row; ``C`` chosen on the selection rows (refitted on all
    of ``train`` when ``refit_all``). Returns ``W``, ``b`` on the raw features and the C."""
    yf, ys = s.lab_fit.astype(int), s.lab_sel.astype(int)
    if np.unique(yf).size != len(names):
        raise DataError(f"{owner}: every class needs training images for a multinomial refit; "
                        f"present: {sorted(np.unique(yf).tolist())} of {len(names)}.")
    best = None
    for c in track(cs, "F re-optimization", progress=progress):
        clf = _fit_lr(s.xs_fit, yf, c, max_iter)
        sc = _score(clf, s.xs_sel, ys, select)
        history.append({"C": c, "score": sc})
        if best is None or sc > best[0]:
            best = (sc, c, clf)
    _, c_best, clf = best
    if refit_all:
        clf = _fit_lr(s.xs_all, np.asarray(train.labels).astype(int), c_best, max_iter)
    coef, icpt = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2])[1]
        coef, icpt = np.vstack([-coef / 2, coef / 2]), np.r_[-icpt / 2, icpt / 2]
    return coef / s.sd, icpt - coef @ (s.mu / s.sd), {"all": c_best}


def _refit_multilabel(train: Features, s: _Scaled, names: Sequence[str], rows: Sequence[int],
                      w: np.ndarray, b: np.ndarray, cs: Sequence[float],
                      select: str, max_iter: int, refit_all: bool,
                      history: list[dict[str, Any]], progress: bool | None) -> dict[str, float]:
    """One binary model per class of ``rows`` (NaN labels skipped), written into ``w`` / ``b``;
    a class without both labels in the fitting and selection rows keeps its row. Returns the
    C chosen per class."""
    chosen = {}
    for j in track(rows, "F re-optimization", progress=progress):
        kf, ks = np.isfinite(s.lab_fit[:, j]), np.isfinite(s.lab_sel[:, j])
        yf, ys = s.lab_fit[kf, j] > 0.5, s.lab_sel[ks, j] > 0.5
        if yf.all() or not yf.any() or ys.all() or not ys.any():
            history.append({"class": names[j], "skipped": "needs positives and negatives in "
                            "the fitting and selection rows"})
            continue
        best = None
        for c in cs:
            clf = _fit_lr(s.xs_fit[kf], yf, c, max_iter)
            sc = _score(clf, s.xs_sel[ks], ys, select)
            history.append({"class": names[j], "C": c, "score": sc})
            if best is None or sc > best[0]:
                best = (sc, c, clf)
        _, c_best, clf = best
        if refit_all:
            kall = np.isfinite(np.asarray(train.labels)[:, j])
            clf = _fit_lr(s.xs_all[kall], np.asarray(train.labels)[kall, j] > 0.5, c_best,
                          max_iter)
        w[j] = clf.coef_[0] / s.sd
        b[j] = clf.intercept_[0] - clf.coef_[0] @ (s.mu / s.sd)
        chosen[names[j]] = c_best
    return chosen


def reoptimize_classifier(
    train: Features,
    val: Features | None = None,
    held_out: Features | None = None,
    *,
    model: MedClassifier | None = None,
    classes: Sequence[int | str] | None = None,
    Cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0, 10.0),  # noqa: N803 - scikit-learn's name
    select: str = "logloss",
    max_iter: int = 500,
    seed: int = 0,
    progress: bool | None = None,
) -> RetrainResult:
    """Refit the final layer by L2-regularised logistic regression on cached features.

    Multi-label: one binary ``LogisticRegression`` per class (rows with a NaN label skipped);
    multi-class: one multinomial model for all rows. Features are standardised (train mean/std)
    and the scaling is folded back: ``W = coef / std``, ``b = intercept - coef @ (mean / std)``.
    ``C`` is chosen per class (per model for multi-class) on ``val`` by log-loss
    (``select="logloss"``) or AUROC; without ``val`` a seeded 20 % of ``train`` is held out for
    the choice and the chosen ``C`` is refitted on all of ``train``. A class without both labels
    in the training rows keeps its old row.
    """

    owner = "reoptimize_classifier"
    _check_feats(train, [val, held_out], owner)
    check_in(select, "select", owner, ("logloss", "auroc"))
    check_range(max_iter, "max_iter", owner, 1, integer=True)
    Cs = [float(check_range(c, "Cs", owner, 0, low_inclusive=False)) for c in Cs]
    if not Cs:
        raise ConfigError(f"The 'Cs' parameter of {owner} must hold at least one value.")
    names = tuple(train.class_names)
    rows = _rows(classes, names, owner)
    t0 = time.perf_counter()
    s = _scaled(train, val, seed)
    w = np.asarray(train.weight, np.float64).copy()
    b = np.asarray(train.bias, np.float64).copy()
    history: list[dict[str, Any]] = []
    if train.task == "multiclass":
        if classes is not None and len(rows) != len(names):
            raise ConfigError(f"{owner}: a multinomial refit changes every row; 'classes' must be "
                              "None for multi-class models.")
        w, b, chosen = _refit_multiclass(train, s, names, Cs, select, max_iter, val is None,
                                         history, owner, progress)
    else:
        chosen = _refit_multilabel(train, s, names, rows, w, b, Cs, select, max_iter,
                                   val is None, history, progress)
    settings = {"Cs": Cs, "select": select, "chosen_C": chosen, "max_iter": max_iter,
                "selected_on": val.split if val is not None else "20% of train"}
    total = model.num_parameters() if model is not None else w.size + b.size
    return _finish("f_reoptimization", w, b, rows, names, len(rows) * (w.shape[1] + 1), total,
                   t0, train, held_out, history, settings, model)
