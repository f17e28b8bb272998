"""Per-image findings of a Predictions artifact: each image's class probabilities and the
classes called positive, at stated thresholds.

The decisions are the model's operating point's
(:class:`~medscalpel.models.operating_point.OperatingPoint`, ``card.decision_point()``):
multi-label, a class whose probability reaches its threshold; two-class, the positive class when
its probability reaches the cut, else the other; multi-class, the argmax (after the stored
temperature). Without one: 0.5 per class / argmax, and
:attr:`FindingsTable.threshold_source` says so.

Example:
    >>> import numpy as np
    >>> from medscalpel.engine.predictions import Predictions
    >>> p = Predictions(np.array([[2.0, -2.0]]), np.array([[1.0, 0.0]]), ("a.png",),
    ...                 ("Effusion", "Mass"), "multilabel")
    >>> findings_table(p).rows[0]["findings"]
    'Effusion'
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError
from medscalpel.layout import artifact
from medscalpel.models.operating_point import OperatingPoint

SCHEMA = 1
#: the CSV written beside predictions.npz by 'medscalpel predict'
FILENAME = artifact("findings_csv").filename
NONE = "none"


@dataclass(frozen=True)
class FindingsTable:
    """One row per image: ``id``, one probability per class, ``findings`` ('A; B' or 'none').

    Attributes:
        class_names: the classes, in column order.
        task: ``multilabel`` or ``multiclass``.
        thresholds: the per-class thresholds applied (multi-label), else None.
        threshold_source: where the decision rule came from, e.g. ``'model card (calibrated)'``,
            ``'0.5 (the model card has no calibrated thresholds)'``, ``'argmax (multi-class)'``
            or the operating point's :meth:`~OperatingPoint.describe`.
        rows: the table.
        operating_point: the operating point's dict when the table was decided by one.
    """

    class_names: tuple[str, ...]
    task: str
    thresholds: tuple[float, ...] | None
    threshold_source: str
    rows: tuple[dict[str, Any], ...]
    operating_point: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "class_names": list(self.class_names), "task": self.task,
                "thresholds": None if self.thresholds is None else list(self.thresholds),
                "threshold_source": self.threshold_source, "rows": [dict(r) for r in self.rows],
                "operating_point": self.operating_point}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FindingsTable":
        return cls(tuple(d["class_names"]), d["task"],
                   None if d["thresholds"] is None else tuple(d["thresholds"]),
                   d["threshold_source"], tuple(d["rows"]), d.get("operating_point"))

    def save_csv(self, path: str | os.PathLike) -> Path:
        """Write the rows as CSV (probabilities with 6 decimals)."""
        path = Path(path)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", *self.class_names, "findings"])
            for r in self.rows:
                w.writerow([r["id"], *(f"{r[c]:.6f}" for c in self.class_names), r["findings"]])
        return path


def findings_table(preds: Predictions, thresholds: Sequence[float] | None = None,
                   operating_point: OperatingPoint | None = None) -> FindingsTable:
    """The per-image findings of ``preds``: decided by ``operating_point`` when given (its
    probabilities, e.g. after a temperature, and its rule), else at ``thresholds`` (the
    model's calibrated per-class thresholds; None: 0.5 for every class, stated as such)."""
    if operating_point is not None:
        return _by_operating_point(preds, operating_point)
    probs = preds.probs()
    names = preds.class_names
    if preds.task == "multiclass":
        thr, source = None, "argmax (multi-class)"
        called = np.zeros_like(probs, dtype=bool)
        called[np.arange(preds.n), probs.argmax(1)] = True
    else:
        if thresholds is None:
            thr = (0.5,) * len(names)
            source = "0.5 (the model card has no calibrated thresholds)"
        else:
            thr = tuple(float(t) for t in thresholds)
            if len(thr) != len(names):
                raise ConfigError(f"findings_table: {len(thr)} thresholds for {len(names)} "
                                  "classes.")
            source = "model card (calibrated)"
        called = probs >= np.asarray(thr, dtype=np.float32)[None, :]
    rows = []
    for i, image_id in enumerate(preds.ids):
        hits = [names[k] for k in np.flatnonzero(called[i])]
        rows.append({"id": image_id, **{c: float(probs[i, k]) for k, c in enumerate(names)},
                     "findings": "; ".join(hits) if hits else NONE})
    return FindingsTable(tuple(names), preds.task, thr, source, tuple(rows))


def _by_operating_point(preds: Predictions, op: OperatingPoint) -> FindingsTable:
    if tuple(op.class_names) != tuple(preds.class_names):
        raise ConfigError(f"findings_table: the operating point is of classes "
                          f"{list(op.class_names)[:4]}, the predictions of "
                          f"{list(preds.class_names)[:4]}.")
    probs = op.probabilities(preds.logits)
    called = op.decide(probs)
    names = preds.class_names
    source = op.describe() if op.calibrated else (
        "argmax (multi-class)" if op.task == "multiclass" else
        f"{op.describe()}: 0.5, not calibrated")
    rows = []
    for i, image_id in enumerate(preds.ids):
        hits = [names[k] for k in np.flatnonzero(called[i])]
        rows.append({"id": image_id, **{c: float(probs[i, k]) for k, c in enumerate(names)},
                     "findings": "; ".join(hits) if hits else NONE})
    return FindingsTable(tuple(names), preds.task, op.class_thresholds(), source, tuple(rows),
                         op.to_dict())
