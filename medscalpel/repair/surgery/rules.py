"""Surgery from a rule: confounder flags of a dataset and :func:`surgery_from_rule`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from medscalpel.engine.predict import Features, extract_features
from medscalpel.errors import ConfigError, DataError
from medscalpel.models.classifier import MedClassifier
from medscalpel.repair.surgery.correct import surgical_correction
from medscalpel.repair.surgery.helpers import class_index, label_k, margins
from medscalpel.repair.surgery.result import SurgeryResult

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- rules
def confounder_flags(dataset, name: str) -> np.ndarray:
    """Per-image boolean flags of a named confounder (e.g. the phantom's ``chest_tube``).

    Looked up, in order, as ``dataset.confounder(name)``, ``dataset.confounders[name]``,
    ``dataset.meta['confounders'][name]``, a ``name`` column of ``dataset.gt`` /
    ``dataset.groundtruth``; a subset view asks its parent and keeps its own rows.
    """
    n = len(dataset)

    def done(arr) -> np.ndarray:
        a = np.asarray(arr).astype(bool).reshape(-1)
        if a.shape != (n,):
            raise DataError(f"confounder {name!r} of {dataset.spec!r} has {a.size} flags for "
                            f"{n} images.")
        return a

    fn = getattr(dataset, "confounder", None)
    if callable(fn):
        return done(fn(name))
    for holder in (getattr(dataset, "confounders", None),
                   getattr(dataset, "meta", {}).get("confounders")):
        if holder is not None and name in holder:
            return done(holder[name])
    for attr in ("gt", "groundtruth"):
        table = getattr(dataset, attr, None)
        if table is not None and hasattr(table, "columns") and name in table.columns:
            return done(table[name].to_numpy())
    parent, idx = getattr(dataset, "parent", None), getattr(dataset, "indices", None)
    if parent is not None and idx is not None:
        return confounder_flags(parent, name)[np.asarray(idx)]
    raise DataError(f"Dataset {getattr(dataset, 'spec', '?')!r} exposes no confounder {name!r}. "
                    "Pass a rule function rule(dataset, index) -> bool instead, or use a dataset "
                    "with per-image confounder flags (the phantom: 'chest_tube', 'ap_marker').")


def surgery_from_rule(
    model: MedClassifier,
    dataset,
    rule: Callable[[Any, int], bool] | str,
    target_class: int | str,
    val: Features | Any | None = None,
    *,
    batch_size: int = 64,
    device: str | None = "auto",
    progress: bool | None = None,
    **kwargs: Any,
) -> SurgeryResult:
    """Surgical correction of the false positives selected by a rule.

    The targets are the images of ``dataset`` for which ``rule`` holds (a function
    ``rule(dataset, index) -> bool`` or the name of a confounder flag, e.g. ``"chest_tube"``),
    that are labelled negative for ``target_class`` and that the model decides positive.

    Args:
        val: validation :class:`Features`, or a dataset whose features are extracted here
            (default: ``dataset`` itself).
        **kwargs: passed to :func:`surgical_correction` (``delta_prob``, ``below_threshold``,
            ``tp_loss_budget``, ``adjust_bias``, ``out_dir``...).

    Example (the phantom's chest-tube shortcut)::

        surgery_from_rule(model, phantom_shifted, "chest_tube", "Pneumothorax",
                          val=phantom_val, below_threshold=True, out_dir="runs/ptx-surgery")
    """
    feats = extract_features(model, dataset, batch_size=batch_size, device=device,
                             progress=progress)
    k = class_index(feats.class_names, target_class, "surgery_from_rule")
    if isinstance(rule, str):
        flags = confounder_flags(dataset, rule)
        rule_desc = f"confounder {rule!r}"
    elif callable(rule):
        flags = np.array([bool(rule(dataset, i)) for i in range(len(dataset))])
        rule_desc = getattr(rule, "__name__", "rule")
    else:
        raise ConfigError("surgery_from_rule: 'rule' must be a function rule(dataset, index) -> "
                          f"bool or a confounder name; got {type(rule).__name__}.")
    if isinstance(val, Features):
        valf = val
    elif val is not None:
        valf = extract_features(model, val, batch_size=batch_size, device=device,
                                progress=progress)
    else:
        valf = feats
    thresholds = kwargs.pop("thresholds", None)
    thr = np.asarray(thresholds if thresholds is not None else
                     (model.card.effective_thresholds() if model.card is not None
                      else [0.5] * len(feats.class_names)), np.float64)
    _, dec = margins(feats.logits(), k, feats.task, float(thr[k]) if feats.task == "multilabel"
                     else 0.5)
    y = label_k(feats.labels, k, feats.task)
    mask = flags & (y == 0) & (dec >= 0)
    if not mask.any():
        raise DataError(f"surgery_from_rule: no false positive of {feats.class_names[k]!r} in "
                        f"{getattr(dataset, 'spec', 'the dataset')!r} matches {rule_desc} "
                        f"({int(flags.sum())} images match the rule); nothing to correct.")
    res = surgical_correction(model, k, feats, fp_mask=mask, val=valf,
                              thresholds=thresholds, **kwargs)
    res.settings["rule"] = rule_desc
    res.settings["rule_matches"] = int(flags.sum())
    return res
