"""Subgroup audit: does compression cost some patients more than others?

For every attribute the data carries (sex, age band, view position: ``dataset.attributes()``
or :func:`dataset_attributes`) and every level of it, the paired delta AUROC (compressed -
dense) inside the subgroup comes from :func:`medscalpel.engine.compare.compare_predictions`;
the question "does this subgroup lose MORE than the whole?" is the contrast ``subgroup delta -
overall delta``, computed inside each bootstrap replicate (one multinomial resample of all images,
both models, subgroup and whole at once) so that its CI and p-value account for the overlap.
A subgroup is flagged when the CI of the contrast lies below 0; with many subgroups x classes a
few such intervals arise by chance, so Holm-adjusted p-values are reported beside the flags and
``flagged_holm`` keeps only those that survive the correction.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from medscalpel.audit.changes._util import (NAN, boot_weights, ci, holm, n_dropped, num,
                                            p_two_sided)
from medscalpel.engine.compare import compare_predictions, weighted_auroc
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import DataError
from medscalpel.validation import check_fraction, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1


def dataset_attributes(dataset: Any) -> pd.DataFrame:
    """Per-image attributes of a dataset as a DataFrame indexed by image id (``dataset.ids``).

    The one way any dataset exposes them: a method ``attributes() -> pandas.DataFrame`` indexed
    like ``ids`` (NIH: sex, age band, view position; the phantom: sex, age band, view). A
    :class:`~medscalpel.data.base.SubsetDataset` takes its parent's rows; a phantom split whose
    adapter predates ``attributes()`` reads them from its phantom's ground truth.

    Raises:
        DataError: the dataset carries no per-image attributes.
    """
    if hasattr(dataset, "attributes") and callable(dataset.attributes):
        df = dataset.attributes()
    elif hasattr(dataset, "parent") and hasattr(dataset, "indices"):
        df = dataset_attributes(dataset.parent).iloc[np.asarray(dataset.indices, np.int64)]
    elif hasattr(dataset, "phantom") and hasattr(dataset.phantom, "attributes"):
        df = dataset.phantom.attributes(dataset.rows)
    else:
        raise DataError(f"The dataset {getattr(dataset, 'spec', type(dataset).__name__)!r} "
                        "carries no per-image attributes (no attributes() method). Pass an "
                        "attribute table (a DataFrame indexed by image id) instead.")
    ids = [str(i) for i in dataset.ids]
    df = df.copy()
    df.index = pd.Index([str(i) for i in df.index], name="id")
    if list(df.index) != ids:
        df = df.reindex(ids)
    return df


@dataclass(frozen=True)
class SubgroupDelta:
    """One subgroup (attribute = level) and one class, or ``cls == "macro"``."""

    attribute: str
    level: str
    cls: str
    n: int
    n_pos: int
    auroc_ref: float
    auroc_new: float
    delta_auroc: float
    delta_auroc_ci: tuple[float, float]
    contrast: float                     # subgroup delta - overall delta
    contrast_ci: tuple[float, float]
    contrast_p: float
    contrast_p_holm: float = NAN
    flagged: bool = False               # contrast CI below 0
    flagged_holm: bool = False          # ... and Holm-adjusted p < 1 - confidence
    contrast_ci_dropped: int = 0        # replicates left out of contrast_ci (undefined: no
    #                                     positive or no negative of the class drawn)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubgroupDelta":
        out = {}
        for k, v in d.items():
            if k.endswith("_ci"):
                out[k] = tuple(num(x) for x in v)
            elif k in ("attribute", "level", "cls", "flagged", "flagged_holm", "n", "n_pos",
                       "contrast_ci_dropped"):
                out[k] = v
            else:
                out[k] = num(v)
        return cls(**out)


@dataclass(frozen=True)
class SubgroupChange:
    """Per-subgroup delta AUROC with paired CIs and the contrast against the whole.

    Attributes:
        rows: one :class:`SubgroupDelta` per (attribute, level, class) plus the macro rows.
        overall: the whole set's macro delta AUROC and CI.
        skipped: subgroups / attributes not audited and why (too small, no attribute value).
        n_tests: number of contrasts in the Holm family (macro and per-class rows).
        note: the multiple-comparison note.
    """

    rows: tuple[SubgroupDelta, ...]
    overall: dict[str, Any]
    skipped: tuple[str, ...]
    attributes: tuple[str, ...]
    n: int
    n_tests: int
    min_size: int
    n_boot: int
    seed: int
    confidence: float
    note: str
    schema_version: int = SCHEMA
    meta: dict[str, Any] = field(default_factory=dict)

    def flagged(self, holm_adjusted: bool = False) -> list[SubgroupDelta]:
        key = "flagged_holm" if holm_adjusted else "flagged"
        return [r for r in self.rows if getattr(r, key)]

    def macro_rows(self) -> list[SubgroupDelta]:
        return [r for r in self.rows if r.cls == "macro"]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "rows"}
        d["rows"] = [r.to_dict() for r in self.rows]
        d["skipped"], d["attributes"] = list(self.skipped), list(self.attributes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubgroupChange":
        return cls(rows=tuple(SubgroupDelta.from_dict(r) for r in d["rows"]),
                   overall=dict(d["overall"]), skipped=tuple(d.get("skipped", ())),
                   attributes=tuple(d.get("attributes", ())), n=int(d["n"]),
                   n_tests=int(d["n_tests"]), min_size=int(d["min_size"]),
                   n_boot=int(d["n_boot"]), seed=int(d["seed"]),
                   confidence=float(d["confidence"]), note=str(d.get("note", "")),
                   meta=dict(d.get("meta", {})))

    def table(self) -> list[dict[str, Any]]:
        return [{"subgroup": f"{r.attribute}={r.level}", "n": r.n, "dAUROC": r.delta_auroc,
                 "dAUROC CI": r.delta_auroc_ci, "vs whole": r.contrast,
                 "vs whole CI": r.contrast_ci, "p (Holm)": r.contrast_p_holm,
                 "flag": r.flagged} for r in self.macro_rows()]


def _check_attributes(table: pd.DataFrame, ids: Sequence[str], wanted: Sequence[str] | None
                      ) -> tuple[pd.DataFrame, list[str]]:
    if not isinstance(table, pd.DataFrame):
        raise DataError(f"subgroup_change: attributes must be a pandas DataFrame indexed by image "
                        f"id; got {type(table).__name__}.")
    names = list(table.columns) if wanted is None else list(wanted)
    missing = [a for a in names if a not in table.columns]
    if missing:
        raise DataError(f"subgroup_change: the images carry no attribute {missing}; available: "
                        f"{list(table.columns)}. Ask for one of those.")
    index = pd.Index([str(i) for i in table.index])
    absent = [i for i in ids if i not in set(index)]
    if absent:
        raise DataError(f"subgroup_change: {len(absent)} image(s) have no row in the attribute "
                        f"table (first: {absent[0]!r}); give attributes for every audited image.")
    return table.set_axis(index).loc[list(ids), names], names


def subgroup_change(
    reference: Predictions,
    candidate: Predictions,
    attributes: pd.DataFrame,
    *,
    names: Sequence[str] | None = None,
    min_size: int = 20,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> SubgroupChange:
    """Per-subgroup delta AUROC (paired CIs) and its contrast with the whole set.

    Args:
        reference, candidate: dense and compressed predictions on the same images.
        attributes: a DataFrame indexed by image id (e.g. :func:`dataset_attributes`); its
            values are treated as categories (missing values: those images are left out of that
            attribute, and the count is stated in ``skipped``).
        names: the attribute columns to audit (default: every column).
        min_size: subgroups with fewer images are skipped (stated in ``skipped``).
        n_boot: paired bootstrap replicates.
        confidence: CI level; a subgroup is flagged when the contrast CI is below 0.

    Raises:
        DataError: an asked-for attribute is absent, or an image has no attribute row.
    """
    check_range(min_size, "min_size", "subgroup_change", 1, integer=True)
    check_range(n_boot, "n_boot", "subgroup_change", 0, integer=True)
    check_fraction(confidence, "confidence", "subgroup_change")
    overall = compare_predictions(reference, candidate, n_boot=n_boot, seed=seed,
                                  confidence=confidence)
    ref, new = reference.align(candidate) if reference.ids != candidate.ids else (reference,
                                                                                 candidate)
    table, names = _check_attributes(attributes, ref.ids, names)
    pr, pn, t = ref.probs().astype(np.float64), new.probs().astype(np.float64), ref.targets()
    w = boot_weights(ref.n, n_boot, seed + 2)
    k = ref.num_classes
    known = np.isfinite(t)
    whole = np.stack([_delta_reps(t[:, j], pr[:, j], pn[:, j], w, known[:, j]) for j in range(k)])
    rows: list[SubgroupDelta] = []
    skipped: list[str] = []
    for attr in names:
        col = table[attr]
        missing = col.isna().to_numpy()
        if missing.any():
            skipped.append(f"{attr}: {int(missing.sum())} image(s) without a value left out")
        for level in sorted(col.dropna().astype(str).unique()):
            mask = (col.astype(str).to_numpy() == level) & ~missing
            if mask.sum() < min_size:
                skipped.append(f"{attr}={level}: {int(mask.sum())} image(s) < min_size {min_size}")
                continue
            rows += _subgroup_rows(attr, level, mask, ref, new, t, pr, pn, w, whole, n_boot,
                                   seed, confidence)
    if not names:
        skipped.append("no attribute to audit")
    p_adj = holm([r.contrast_p for r in rows])
    alpha = 1.0 - confidence
    rows = [SubgroupDelta(**{**asdict(r), "contrast_p_holm": p,
                             "flagged_holm": bool(r.flagged and np.isfinite(p) and p < alpha)})
            for r, p in zip(rows, p_adj)]
    m = sum(np.isfinite(r.contrast_p) for r in rows)
    note = (f"{m} contrasts tested (subgroups x classes and macro); at {confidence:.0%} about "
            f"{alpha * m:.1f} interval(s) would exclude 0 by chance alone. 'flagged' uses the "
            "unadjusted CI; 'flagged_holm' keeps those whose Holm-adjusted p-value < "
            f"{alpha:g}.")
    return SubgroupChange(rows=tuple(rows),
                          overall={"delta_auroc": overall.macro["delta_auroc"],
                                   "delta_auroc_ci": list(overall.macro["delta_auroc_ci"]),
                                   "auroc_ref": overall.macro["auroc_ref"],
                                   "auroc_new": overall.macro["auroc_new"]},
                          skipped=tuple(skipped), attributes=tuple(names), n=ref.n, n_tests=m,
                          min_size=min_size, n_boot=n_boot, seed=seed, confidence=confidence,
                          note=note, meta={"reference_id": ref.model_id,
                                           "candidate_id": new.model_id})


def _delta_reps(y: np.ndarray, a: np.ndarray, b: np.ndarray, w: np.ndarray,
                keep: np.ndarray) -> np.ndarray:
    """Bootstrap replicates of AUROC(b) - AUROC(a) over the rows in ``keep``."""
    if not len(w):
        return np.zeros(0)
    yk = y[keep] > 0.5
    if yk.all() or not yk.any():
        return np.full(len(w), NAN)
    return weighted_auroc(yk, b[keep], w[:, keep]) - weighted_auroc(yk, a[keep], w[:, keep])


def _subgroup_rows(attr, level, mask, ref, new, t, pr, pn, w, whole, n_boot, seed, confidence
                   ) -> list[SubgroupDelta]:
    rows_idx = np.flatnonzero(mask)
    cmp = compare_predictions(ref.select(rows_idx), new.select(rows_idx), n_boot=n_boot,
                              seed=seed, confidence=confidence)
    out, sub_reps, whole_reps = [], [], []
    for j, cd in enumerate(cmp.classes):
        keep = mask & np.isfinite(t[:, j])
        reps = _delta_reps(t[:, j], pr[:, j], pn[:, j], w, keep)
        sub_reps.append(reps)
        whole_reps.append(whole[j])
        contrast = cd.delta_auroc - _point_delta(t[:, j], pr[:, j], pn[:, j])
        diff = reps - whole[j]
        cint = ci(diff, confidence)
        out.append(SubgroupDelta(attr, str(level), cd.name, int(mask.sum()), cd.n_pos,
                                 cd.auroc_ref, cd.auroc_new, cd.delta_auroc,
                                 tuple(cd.delta_auroc_ci), float(contrast), cint,
                                 p_two_sided(diff), flagged=bool(cint[1] < 0),
                                 contrast_ci_dropped=n_dropped(diff)))
    m = cmp.macro
    scored = [i for i, cd in enumerate(cmp.classes) if np.isfinite(cd.delta_auroc)]
    with np.errstate(invalid="ignore"), \
            warnings.catch_warnings(action="ignore", category=RuntimeWarning):
        sub = np.nanmean(np.stack([sub_reps[i] for i in scored]), 0) if scored else np.zeros(0)
        wh = np.nanmean(np.stack([whole_reps[i] for i in scored]), 0) if scored else np.zeros(0)
    point_whole = np.nanmean([_point_delta(t[:, i], pr[:, i], pn[:, i]) for i in scored]
                             ) if scored else NAN
    diff = sub - wh
    cint = ci(diff, confidence)
    out.append(SubgroupDelta(attr, str(level), "macro", int(mask.sum()),
                             int(sum(cd.n_pos for cd in cmp.classes)), num(m["auroc_ref"]),
                             num(m["auroc_new"]), num(m["delta_auroc"]),
                             tuple(num(x) for x in m["delta_auroc_ci"]),
                             float(num(m["delta_auroc"]) - point_whole), cint, p_two_sided(diff),
                             flagged=bool(cint[1] < 0), contrast_ci_dropped=n_dropped(diff)))
    return out


def _point_delta(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    keep = np.isfinite(y)
    return float(_delta_reps(y, a, b, np.ones((1, y.size)), keep)[0])
