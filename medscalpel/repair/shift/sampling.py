"""Labelled images of a new site: k-shot draws per class, by patient."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sampling
def _class_rows(preds: Predictions, j: int) -> tuple[np.ndarray, np.ndarray]:
    t = preds.targets()[:, j]
    return np.flatnonzero(t > 0.5), np.flatnonzero(t < 0.5)


def sample_k_shot(preds: Predictions, k: int = 20, classes: Sequence[str] | None = None,
                  seed: int = 0, patient_ids: Sequence[str | None] | None = None) -> np.ndarray:
    """Rows of a labelled sample holding ``k`` random positives AND ``k`` random negatives of
    every class in ``classes`` (default: all), seeded; see :func:`k_shot_draws` (which also says
    which rows were drawn for which class, and how patients are drawn)."""
    return k_shot_draws(preds, k, classes, seed, patient_ids)[0]


def patient_ids_of(preds: Predictions,
                   patient_ids: Sequence[str | None] | Mapping[str, str | None] | None = None
                   ) -> list[str | None] | None:
    """Patient id per row of ``preds``: ``patient_ids`` (a list aligned with the rows, or image
    id -> patient id), else ``preds.meta['patient_ids']`` (either form); None when unknown or
    when no row has one."""
    src = patient_ids if patient_ids is not None else preds.meta.get("patient_ids")
    if src is None:
        return None
    if isinstance(src, Mapping):
        out = [src.get(i) for i in preds.ids]
    else:
        out = list(src)
        if len(out) != preds.n:
            raise DataError(f"{len(out)} patient ids for {preds.n} predictions; give one per "
                            "image (aligned with the predictions' ids) or an id -> patient map.")
    out = [None if p is None or str(p) == "" else str(p) for p in out]
    return out if any(p is not None for p in out) else None


def _patient_keys(pids: Sequence[str | None]) -> np.ndarray:
    """Patient key per row; a row without a patient id is its own patient."""
    return np.array([p if p is not None else f"__row{i}" for i, p in enumerate(pids)],
                    dtype=object)


def _draw_by_patient(rows: np.ndarray, keys: np.ndarray, k: int, taken: set,
                     rng: np.random.Generator) -> list[int]:
    """``k`` rows of ``rows`` from ``k`` distinct patients, drawn at random (patients in random
    order, one random image of each); patients already ``taken`` first (their other images are
    out of the rest anyway) only when they come up in that order, so the draw stays random."""
    by: dict[Any, list[int]] = {}
    for r in rows:
        by.setdefault(keys[r], []).append(int(r))
    order = list(by)
    rng.shuffle(order)
    picked = []
    for pk in order[:k]:
        cand = by[pk]
        picked.append(int(cand[int(rng.integers(len(cand)))]))
        taken.add(pk)
    return picked


def k_shot_draws(preds: Predictions, k: int = 20, classes: Sequence[str] | None = None,
                 seed: int = 0, patient_ids: Sequence[str | None] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A k-shot labelled sample and, per class, the rows drawn FOR it.

    With ``patient_ids`` (one per row; None where unknown: that row is its own patient) the
    draw is BY PATIENT: each side of each class draws ``k`` distinct patients at random and one
    random image of each, and :func:`recalibrate_site` then keeps every image of a drawn patient
    out of the rest it measures on. Without them, images are drawn.

    Multi-class: ``k`` random images of each class. Multi-label: per class, ``k`` images drawn
    uniformly from its positives and ``k`` from its negatives, independently of the other
    classes; the sample is the union (an image drawn twice is labelled once). A class is fitted
    on ITS draws only (``use[:, j]``): with correlated findings, the other classes' positives
    are sicker than a random negative of class ``j``, so reusing them as its negatives would
    bias its specificity (and a fitted threshold or offset) upwards.

    Returns:
        ``rows`` (sorted, unique) and ``use`` ``[len(rows), K]`` bool: row ``i`` of the sample
        counts for class ``j``'s fit.

    Raises:
        DataError: a class has fewer than ``k`` positive or negative labelled images; the message
            names them, the minimum, and the classes that have enough.
    """
    check_range(k, "k", "sample_k_shot", 1, integer=True)
    idx = _class_index(preds, classes)
    keys = None if patient_ids is None else _patient_keys(patient_ids)
    if keys is not None and len(keys) != preds.n:
        raise DataError(f"k_shot_draws: {len(keys)} patient ids for {preds.n} predictions.")

    def count(rows: np.ndarray) -> int:
        return rows.size if keys is None else len(set(keys[rows]))

    unit = "images" if keys is None else "patients"
    short = []
    for j in idx:
        pos, neg = _class_rows(preds, j)
        if count(pos) < k or count(neg) < k:
            short.append(f"{preds.class_names[j]} ({count(pos)} pos / {count(neg)} neg "
                         f"{unit})")
    if short:
        ok = [preds.class_names[j] for j in range(preds.num_classes)
              if min(count(s) for s in _class_rows(preds, j)) >= k]
        raise DataError(
            f"Too few labelled images for {k}-shot recalibration"
            f"{'' if keys is None else ' (drawn by patient)'}: each class needs at least {k} "
            f"positive and {k} negative {unit} (minimum {k} per side; more to keep a held-out "
            f"rest), but {', '.join(short)}. Label more images of the new site, lower k, or "
            f"restrict classes= to those with enough: {ok}.")
    rng = np.random.default_rng(seed)
    drawn: dict[int, set[int]] = {}
    taken: set = set()
    for j in idx:
        pos, neg = _class_rows(preds, j)
        if preds.task != "multilabel":
            neg = neg[:0]  # multi-class: k images of the class; the others come with theirs
        for side in (pos, neg):
            picks = (rng.choice(side, size=min(k, side.size), replace=False) if keys is None
                     else _draw_by_patient(side, keys, k, taken, rng))
            for r in picks:
                drawn.setdefault(int(r), set()).add(j)
    rows = np.array(sorted(drawn), dtype=np.int64)
    use = np.zeros((rows.size, preds.num_classes), bool)
    for i, r in enumerate(rows):
        if preds.task == "multilabel":
            use[i, sorted(drawn[r])] = True
        else:
            use[i, :] = True
    return rows, use


def _class_index(preds: Predictions, classes: Sequence[str] | None) -> list[int]:
    if classes is None:
        return list(range(preds.num_classes))
    bad = [c for c in classes if c not in preds.class_names]
    if bad:
        raise ConfigError(f"Unknown class(es) {bad}; the model's classes are "
                          f"{list(preds.class_names)}.")
    return [preds.class_names.index(c) for c in classes]
