"""The router's decision log: what was done for each class (:class:`ClassDecision`) and the
whole log with the final state and costs (:class:`TriageResult`), saved as
``decision_log.json`` / ``.md`` with, optionally, the repaired model.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.errors import ConfigError
from medscalpel.layout import write_artifact_at
from medscalpel.models.checkpoint import save_model
from medscalpel.repair.helped import evidence_text
from medscalpel.repair.retrain import with_classifier
from medscalpel.repair.treatments import RepairState
from medscalpel.repair.triage.costs import SCHEMA
from medscalpel.runs import write_text


@dataclass
class ClassDecision:
    """What the router did for one class."""

    name: str
    issues: list[dict[str, Any]]
    before: dict[str, float]
    after: dict[str, float]
    attempts: list[dict[str, Any]]
    chosen: list[str]
    remaining: list[str]
    report_before: dict[str, float] = field(default_factory=dict)
    report_after: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        issues = [{k: v for k, v in i.items() if k != "rows"} | {"n_rows": len(i.get("rows", []))}
                  for i in self.issues]
        gain = {k: self.report_after[k] - v for k, v in self.report_before.items()
                if k in self.report_after and isinstance(v, (int, float))
                and isinstance(self.report_after[k], (int, float))}
        return {"class": self.name, "issues": issues, "selection_before": self.before,
                "selection_after": self.after, "report_before": self.report_before,
                "report_after": self.report_after, "report_gain": gain,
                "attempts": self.attempts, "chosen": self.chosen,
                "remaining_issues": self.remaining}


@dataclass
class TriageResult:
    """The decision log: per class, what was tried, what it cost, what it gained, what was
    chosen; plus the final state and the cost matrix before and after."""

    classes: list[ClassDecision]
    thresholds: list[float]
    costs_before: dict[str, Any]
    costs_after: dict[str, Any]
    settings: dict[str, Any]
    seconds: float
    state: RepairState | None = field(default=None, repr=False)
    model_dir: str | None = None

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for c in self.classes:
            for a in c.attempts or [{"treatment": "none", "status": "no issue", "cost": 0.0,
                                     "seconds": 0.0, "gain": {}}]:
                rows.append({"class": c.name,
                             "issues": ",".join(i["kind"] for i in c.issues) or "-",
                             "treatment": a["treatment"], "status": a["status"],
                             "cost": a.get("cost"), "seconds": a.get("seconds"),
                             "gain": "; ".join(f"{k} {v:+.3f}" for k, v in a.get("gain", {}).items()
                                               if v is not None and np.isfinite(v)) or "-",
                             "evidence": evidence_text(a),
                             "chosen": "yes" if a["treatment"] in c.chosen else ""})
        return rows

    def markdown(self) -> str:
        rows = self.table()
        if not rows:
            return "(no classes)\n"
        cols = list(rows[0])

        def f(v):
            if isinstance(v, float):
                return f"{v:.3g}"
            return "" if v is None else str(v)

        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(f(r[c]) for c in cols) + " |" for r in rows]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "classes": [c.to_dict() for c in self.classes],
                "thresholds": self.thresholds, "costs_before": self.costs_before,
                "costs_after": self.costs_after, "settings": self.settings,
                "seconds": self.seconds, "model_dir": self.model_dir}

    def save(self, out_dir: str | os.PathLike, model=None) -> Path:
        """``decision_log.json`` + ``decision_log.md``; with a model, the repaired model directory
        (new classifier + thresholds in ``model.json``, a ``triage`` lineage step)."""
        out = Path(out_dir)
        if model is not None and self.state is not None:
            if model.card is None:
                raise ConfigError("TriageResult.save: the model has no ModelCard.")
            new = with_classifier(model, self.state.weight, self.state.bias) \
                if self.state.weight is not None else copy.deepcopy(model)
            card = replace(model.card, thresholds=tuple(float(t) for t in self.thresholds))
            card = card.with_lineage("triage", parent=model.card.model_id,
                                     chosen={c.name: c.chosen for c in self.classes if c.chosen})
            save_model(new, out / "model", card)
            self.model_dir = "model"  # relative to the decision log's directory
        write_artifact_at(out, "triage", self)
        write_text(out / "decision_log.md", self.markdown())
        return out
