"""What compression changed beyond accuracy: calibration, explanations, subgroups, robustness.

:func:`audit_changes` audits one dense model against one or several compressed versions of it on
the same images and returns a frozen :class:`ChangesAudit` (``to_dict`` / ``from_dict`` /
``save`` / ``load``; figures are written next to the JSON by :meth:`ChangesAudit.save`).

Example:
    >>> from medscalpel.data import Preprocess, open_dataset  # doctest: +SKIP
    >>> data = open_dataset("phantom?n=400&size=64", split="test",
    ...                     preprocess=dense.card.preprocess)  # doctest: +SKIP
    >>> res = audit_changes(dense, {"x4": pruned}, data, n_images=200)  # doctest: +SKIP
    >>> res.save("runs/x/audit/changes")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medscalpel.audit.changes._util import logits_of
from medscalpel.audit.changes.calibration import (CalibrationChange, calibration_change,
                                                  plot_reliability)
from medscalpel.audit.changes.explanation import (ExplanationChange, explanation_change,
                                                  plot_explanation)
from medscalpel.audit.changes.robustness import (CORRUPTIONS, LEVELS, RobustnessChange,
                                                 plot_robustness, robustness_change)
from medscalpel.audit.changes.subgroups import (SubgroupChange, dataset_attributes,
                                                subgroup_change)
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.layout import artifact, write_artifact_at
from medscalpel.runs import read_json
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

__all__ = ["CORRUPTIONS", "LEVELS", "MEASURES", "CalibrationChange", "ChangesAudit",
           "ExplanationChange", "PairChanges", "RobustnessChange", "SubgroupChange",
           "audit_changes", "calibration_change", "dataset_attributes", "explanation_change",
           "robustness_change", "subgroup_change"]

SCHEMA = 1
FILENAME = artifact("changes").filename
MEASURES = ("calibration", "explanation", "subgroups", "robustness")


@dataclass(frozen=True)
class PairChanges:
    """One (dense, compressed) pair: each measure's result (None when not asked for)."""

    name: str
    candidate_id: str
    calibration: CalibrationChange | None = None
    explanation: ExplanationChange | None = None
    subgroups: SubgroupChange | None = None
    robustness: RobustnessChange | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)   # measure -> why it was not run

    def headline(self) -> list[str]:
        """One line per measure: what changed, with its CI."""
        out = []
        if self.calibration is not None:
            m = self.calibration.macro
            lo, hi = m["delta_ece_ci"]
            out.append(f"calibration: macro ECE {m['ece_ref']:.3f} -> {m['ece_new']:.3f} "
                       f"(delta {m['delta_ece']:+.3f} [{lo:+.3f}, {hi:+.3f}]); recalibrate: "
                       f"{'yes' if self.calibration.recommend_recalibration else 'no'}")
        if self.explanation is not None:
            e = self.explanation
            rho = [c["spearman"]["mean"] for c in e.classes.values()]
            scored = sum(int(c["spearman"]["n"]) for c in e.classes.values())
            total = e.n_similarity * len(e.classes)
            line = (f"explanations: median per-class Spearman {np.nanmedian(rho):.2f} "
                    f"(dense vs compressed Grad-CAM; {scored} of {total} image x class pairs "
                    "had two non-empty maps)" if np.isfinite(rho).any()
                    else f"explanations: not scored, no image x class pair of {total} had two "
                         "non-empty Grad-CAM maps (negative class evidence everywhere)")
            if e.meta.get("cam_note"):
                line += f"; {e.meta['cam_note']}"
            out.append(line)
        if self.subgroups is not None:
            fl = self.subgroups.flagged(holm_adjusted=False)
            out.append(f"subgroups: {len([r for r in fl if r.cls == 'macro'])} subgroup(s) lose "
                       f"significantly more than the whole (macro), {len(fl)} flag(s) in all")
        if self.robustness is not None:
            out.append(self.robustness.headline())
        out += [f"{k}: not measured ({why})" for k, why in sorted(self.skipped.items())]
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "candidate_id": self.candidate_id,
                             "seconds": dict(self.seconds), "figures": dict(self.figures),
                             "skipped": dict(self.skipped), "headline": self.headline()}
        for k in MEASURES:
            v = getattr(self, k)
            d[k] = None if v is None else v.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PairChanges":
        types = {"calibration": CalibrationChange, "explanation": ExplanationChange,
                 "subgroups": SubgroupChange, "robustness": RobustnessChange}
        kw = {k: (None if d.get(k) is None else t.from_dict(d[k])) for k, t in types.items()}
        return cls(name=d["name"], candidate_id=d.get("candidate_id", ""),
                   seconds=dict(d.get("seconds", {})), figures=dict(d.get("figures", {})),
                   skipped=dict(d.get("skipped", {})), **kw)


@dataclass(frozen=True)
class ChangesAudit:
    """The audit of one dense model against one or more compressed versions.

    Attributes:
        pairs: one :class:`PairChanges` per compressed model.
        reference_id: the dense model's id.
        class_names: the shared label set.
        data: the dataset spec and split; ``n`` the images audited (seeded choice).
        measures: what was measured.
    """

    pairs: tuple[PairChanges, ...]
    reference_id: str
    class_names: tuple[str, ...]
    data: dict[str, Any]
    n: int
    measures: tuple[str, ...]
    n_boot: int
    seed: int
    seconds: float
    schema_version: int = SCHEMA
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "reference_id": self.reference_id,
                "class_names": list(self.class_names), "data": dict(self.data), "n": self.n,
                "measures": list(self.measures), "n_boot": self.n_boot, "seed": self.seed,
                "seconds": self.seconds, "meta": dict(self.meta),
                "pairs": [p.to_dict() for p in self.pairs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChangesAudit":
        if int(d.get("schema_version", 0)) != SCHEMA:
            raise DataError(f"ChangesAudit: schema_version {d.get('schema_version')!r} is not "
                            f"{SCHEMA}; rerun `medscalpel audit changes`.")
        return cls(pairs=tuple(PairChanges.from_dict(p) for p in d["pairs"]),
                   reference_id=d["reference_id"], class_names=tuple(d["class_names"]),
                   data=dict(d["data"]), n=int(d["n"]), measures=tuple(d["measures"]),
                   n_boot=int(d["n_boot"]), seed=int(d["seed"]), seconds=float(d["seconds"]),
                   meta=dict(d.get("meta", {})))

    def save(self, out: str | os.PathLike) -> Path:
        """Write the figures, then ``changes.json`` (each file atomically) into directory
        ``out``; returns the JSON path. The JSON names its figures (relative paths)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        pairs = []
        for p in self.pairs:
            figs = {}
            slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in p.name)
            for key, res, fn in (("reliability", p.calibration, plot_reliability),
                                 ("explanation", p.explanation, plot_explanation),
                                 ("robustness", p.robustness, plot_robustness)):
                if res is not None:
                    rel = f"{slug}_{key}.png"
                    fn(res, out / rel)
                    figs[key] = rel
            pairs.append(PairChanges(**{**p.__dict__, "figures": figs}))
        done = ChangesAudit(**{**self.__dict__, "pairs": tuple(pairs)})
        return write_artifact_at(out, "changes", done)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ChangesAudit":
        p = Path(path)
        p = p / FILENAME if p.is_dir() else p
        if not p.is_file():
            raise DataError(f"No changes audit at {p}; run `medscalpel audit changes` first.")
        return cls.from_dict(read_json(p))


# ----------------------------------------------------------------------------- API
def _pairs(compressed: Any) -> list[tuple[str, nn.Module]]:
    if isinstance(compressed, nn.Module):
        return [(_name(compressed, "compressed"), compressed)]
    if isinstance(compressed, Mapping):
        return [(str(k), v) for k, v in compressed.items()]
    if isinstance(compressed, Sequence) and compressed:
        return [(_name(m, f"compressed{i}"), m) for i, m in enumerate(compressed)]
    raise ConfigError("The 'compressed' parameter of audit_changes must be a model, a list of "
                      f"models or a name -> model mapping. Got {type(compressed).__name__} "
                      "instead.")


def _name(model: nn.Module, default: str) -> str:
    card = getattr(model, "card", None)
    return (getattr(card, "model_id", "") or default) if card is not None else default


def _classes(model: nn.Module) -> tuple[str, ...] | None:
    card = getattr(model, "card", None)
    return tuple(card.class_names) if card is not None else None


def no_gradients(model: nn.Module) -> str | None:
    """Why gradient explanations cannot run on ``model`` (a deployed runtime artifact), or
    None."""
    if getattr(model, "supports_gradients", True) or getattr(model, "has_cams", False):
        return None  # a served artifact with a CAM output explains itself (issue T)
    refusal = getattr(model, "cam_refusal", None)
    if callable(refusal):
        return refusal()
    kind = getattr(model, "name", type(model).__name__)
    return (f"{kind} runtime artifact: no gradients, so no Grad-CAM; audit the torch model it "
            "was built from for explanation drift")


def check_same_classes(dense: nn.Module, pairs: list[tuple[str, nn.Module]], data: Any) -> None:
    """Refuse models whose class lists differ from each other or from the data."""
    want = tuple(data.class_names)
    for name, m in [("dense", dense), *pairs]:
        got = _classes(m)
        k = int(m.classifier.out_features) if hasattr(m, "classifier") else None
        if (got is not None and got != want) or (k is not None and k != len(want)):
            raise DataError(f"audit_changes: model '{name}' predicts {list(got or [])[:4] or k} "
                            f"... but the data has classes {list(want)[:4]}...; every model must "
                            "share the data's class list (same names, same order).")


def _attribute_table(data: Any, attributes: pd.DataFrame | None,
                     attribute_names: Sequence[str] | None, ids: tuple[str, ...]) -> pd.DataFrame:
    """The attribute table of the audited images (rows ``ids``, the asked-for columns).

    Raises:
        DataError: an audited image without attributes, or an attribute the table lacks.
    """
    table = dataset_attributes(data) if attributes is None else attributes
    table = table.copy()
    table.index = [str(i) for i in table.index]
    missing = [i for i in ids if i not in set(table.index)]
    if missing:
        raise DataError(f"audit_changes: {len(missing)} audited image(s) have no attributes "
                        f"(first: {missing[0]!r}); give a table covering every image.")
    names = list(table.columns) if attribute_names is None else list(attribute_names)
    absent = [a for a in names if a not in table.columns]
    if absent:
        raise DataError(f"audit_changes: the images carry no attribute {absent}; available: "
                        f"{list(table.columns)}.")
    return table.loc[list(ids), names]


def _card_thresholds(dense: nn.Module, k: int) -> list[float] | None:
    """The dense model card's ``k`` stored thresholds, or None (no card, none, wrong count)."""
    card = getattr(dense, "card", None)
    return list(card.thresholds) if card is not None and card.thresholds is not None \
        and len(card.thresholds) == k else None


@dataclass(frozen=True)
class _AuditInputs:
    """What every (dense, compressed) pair of one :func:`audit_changes` call is audited on."""

    dense: nn.Module
    data: Any
    images: torch.Tensor
    masks: list | None
    table: pd.DataFrame | None
    thr: list[float] | None
    n_boot: int
    seed: int
    min_subgroup: int
    n_faithfulness: int
    corruptions: Sequence[str] | None
    severities: Sequence[int]
    batch_size: int
    progress: bool | None


def _audit_pair(inp: _AuditInputs, name: str, model: nn.Module, ref: Predictions,
                new: Predictions, measures: Sequence[str]) -> PairChanges:
    """Run each of ``measures`` on one (dense, compressed) pair, timing each; explanations are
    skipped (with the reason) when either model has no gradients."""
    res: dict[str, Any] = {}
    sec: dict[str, float] = {}
    skipped: dict[str, str] = {}
    why_not = no_gradients(inp.dense) or no_gradients(model)
    for measure in measures:
        t0 = time.perf_counter()
        if measure == "explanation" and why_not:
            skipped[measure] = why_not
            logger.info("changes %s/%s skipped: %s", name, measure, skipped[measure])
            continue
        res[measure] = _measure(inp, measure, model, ref, new)
        sec[measure] = round(time.perf_counter() - t0, 2)
        logger.info("changes %s/%s: %.1f s", name, measure, sec[measure])
    return PairChanges(name=name, candidate_id=new.model_id, seconds=sec, skipped=skipped,
                       **res)


def _measure(inp: _AuditInputs, measure: str, model: nn.Module, ref: Predictions,
             new: Predictions) -> Any:
    """One measure of one pair: the result of its ``*_change`` function."""
    data = inp.data
    if measure == "calibration":
        return calibration_change(
            ref, new, thresholds=inp.thr, n_boot=inp.n_boot, seed=inp.seed,
            threshold_source="dense model card" if inp.thr else "default 0.5")
    if measure == "subgroups":
        return subgroup_change(ref, new, inp.table, min_size=inp.min_subgroup,
                               n_boot=inp.n_boot, seed=inp.seed)
    if measure == "explanation":
        return explanation_change(
            inp.dense, model, inp.images, class_names=data.class_names, masks=inp.masks,
            n_faithfulness=inp.n_faithfulness, multiclass=data.task == "multiclass",
            n_boot=inp.n_boot, seed=inp.seed, batch_size=min(inp.batch_size, 32),
            progress=inp.progress)
    return robustness_change(
        inp.dense, model, inp.images, ref, data.preprocess, corruptions=inp.corruptions,
        severities=inp.severities, n_boot=inp.n_boot, seed=inp.seed, batch_size=inp.batch_size,
        clean_logits=(ref.logits, new.logits), progress=inp.progress)


def audit_changes(
    dense: nn.Module,
    compressed: nn.Module | Sequence[nn.Module] | Mapping[str, nn.Module],
    data: Any,
    *,
    measures: Sequence[str] = MEASURES,
    n_images: int | None = 500,
    n_boot: int = 1000,
    seed: int = 0,
    attributes: pd.DataFrame | None = None,
    attribute_names: Sequence[str] | None = None,
    min_subgroup: int = 20,
    n_faithfulness: int = 100,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3),
    batch_size: int = 64,
    progress: bool | None = None,
) -> ChangesAudit:
    """Audit what compression changed: calibration, explanations, subgroups, robustness.

    Args:
        dense: the reference model (its card's thresholds are the deployed ones).
        compressed: one compressed model, a list, or ``{name: model}`` (a sweep).
        data: a CXRDataset preprocessed for the models (e.g. the test split).
        measures: any of :data:`MEASURES`.
        n_images: images audited (a seeded choice; None: all).
        n_boot: bootstrap replicates of every CI.
        attributes: per-image attribute table indexed by id (default:
            :func:`dataset_attributes` of ``data``); ``attribute_names`` picks columns.
        min_subgroup: smaller subgroups are skipped (stated in the result).
        n_faithfulness: images for deletion / insertion / ROAD.
        corruptions, severities: the robustness grid (default: every corruption, 1-3).

    Raises:
        DataError: different class lists, missing attributes, an empty dataset.
        ConfigError: an unknown measure.
    """
    t_all = time.perf_counter()
    bad = [m for m in measures if m not in MEASURES]
    if bad or not measures:
        raise ConfigError(f"The 'measures' parameter of audit_changes must be a non-empty subset "
                          f"of {list(MEASURES)}. Got {list(measures)} instead.")
    check_range(n_boot, "n_boot", "audit_changes", 0, integer=True)
    pairs = _pairs(compressed)
    check_same_classes(dense, pairs, data)
    if len(data) == 0:
        raise DataError(f"audit_changes: the dataset {getattr(data, 'spec', '')!r} is empty.")
    count = len(data) if n_images is None else min(int(n_images), len(data))
    rows = np.sort(np.random.default_rng(seed).choice(len(data), count, replace=False))
    ids = tuple(str(data.ids[i]) for i in rows)
    table = None
    if "subgroups" in measures:   # checked before any work so a bad request fails fast
        table = _attribute_table(data, attributes, attribute_names, ids)
    images = torch.stack([data.image(int(i)) for i in rows])
    labels = np.asarray(data.labels)[rows]
    masks = ([data.masks(int(i)) for i in rows] if "explanation" in measures
             and hasattr(data, "masks") else None)
    thr = _card_thresholds(dense, len(data.class_names))
    mk = lambda m: Predictions(logits_of(m, images, batch_size), labels, ids=ids,  # noqa: E731
                               class_names=tuple(data.class_names), task=data.task,
                               split=getattr(data, "split", ""), model_id=_name(m, "model"))
    ref = mk(dense)
    inp = _AuditInputs(dense=dense, data=data, images=images, masks=masks, table=table, thr=thr,
                       n_boot=n_boot, seed=seed, min_subgroup=min_subgroup,
                       n_faithfulness=n_faithfulness, corruptions=corruptions,
                       severities=severities, batch_size=batch_size, progress=progress)
    out = [_audit_pair(inp, name, model, ref, mk(model), measures) for name, model in pairs]
    return ChangesAudit(
        pairs=tuple(out), reference_id=ref.model_id, class_names=tuple(data.class_names),
        data={"spec": getattr(data, "spec", ""), "split": getattr(data, "split", ""),
              "n_available": len(data)},
        n=count, measures=tuple(measures), n_boot=n_boot, seed=seed,
        seconds=round(time.perf_counter() - t_all, 2),
        meta={"threads": torch.get_num_threads(), "masks": masks is not None,
              "thresholds": "dense model card" if thr else "default 0.5"})
