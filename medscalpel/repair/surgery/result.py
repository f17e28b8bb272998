"""What a surgical correction did: :class:`SurgeryResult`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.engine.predict import Features
from medscalpel.models.classifier import MedClassifier
from medscalpel.runs import write_json
from medscalpel.repair.surgery.plan import SCHEMA, SurgeryPlan  # one schema: plan and result

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- result
@dataclass
class SurgeryResult:
    """Plan, predicted and verified effects of one surgical correction."""

    success: bool
    message: str
    plan: SurgeryPlan | None
    applied: bool
    target_ids: list[str]
    target_prob_before: list[float]
    target_prob_after: list[float]
    tp_total: int
    tp_lost: int
    tp_lost_ids: list[str]
    auroc_before: dict[str, float]
    auroc_after: dict[str, float]
    other_logits_identical: bool | None
    other_weights_identical: bool | None
    ranking: list[dict[str, Any]]
    search: dict[str, Any]
    settings: dict[str, Any]
    seconds: float = 0.0
    # verified in the model's own dtype (float32) through the live layer, not in float64
    goal_met: bool | None = None
    fp_above_threshold_after: int | None = None  # targets still decided positive after
    model: MedClassifier | None = field(default=None, repr=False)
    features: Features | None = field(default=None, repr=False)
    model_dir: str | None = None

    @property
    def delta_prob(self) -> np.ndarray:
        return np.asarray(self.target_prob_after) - np.asarray(self.target_prob_before)

    def to_dict(self) -> dict[str, Any]:
        d = self.delta_prob
        n_t = len(self.target_ids)
        return {"schema_version": SCHEMA, "success": self.success, "message": self.message,
                "goal": self.settings.get("goal"), "delta_prob": self.settings.get("delta_prob"),
                "goal_met": self.goal_met,
                "false_positives_still_above_threshold": (
                    None if self.fp_above_threshold_after is None else
                    {"k": self.fp_above_threshold_after, "n": n_t,
                     "text": f"{self.fp_above_threshold_after}/{n_t}"}),
                "applied": self.applied, "plan": None if self.plan is None else self.plan.to_dict(),
                "n_weights_changed": 0 if self.plan is None else self.plan.n_weights,
                "targets": {"n": len(self.target_ids), "ids": self.target_ids,
                            "prob_before": self.target_prob_before,
                            "prob_after": self.target_prob_after,
                            "delta_prob_mean": float(d.mean()) if d.size else float("nan"),
                            "delta_prob_max": float(d.max()) if d.size else float("nan"),
                            "delta_prob_min": float(d.min()) if d.size else float("nan")},
                "true_positives": {"n": self.tp_total, "lost": self.tp_lost,
                                   "lost_ids": self.tp_lost_ids},
                "auroc_before": self.auroc_before, "auroc_after": self.auroc_after,
                "other_logits_identical": self.other_logits_identical,
                "other_weights_identical": self.other_weights_identical,
                "ranking": self.ranking, "search": self.search, "settings": self.settings,
                "seconds": self.seconds, "model_dir": self.model_dir}

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())
