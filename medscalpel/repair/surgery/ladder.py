"""The goal ladder: try surgery goals from the strictest down, keep every attempt
(:class:`SurgeryLadder`, :func:`surgery_ladder`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


from medscalpel.errors import ConfigError
from medscalpel.repair.surgery.result import SurgeryResult

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- goal ladder
@dataclass
class SurgeryLadder:
    """Surgery tried from the strictest goal to relaxed ones; every attempt is recorded.

    ``status`` is ``"full"`` when the first (strictest) goal was met, ``"partial"`` when only a
    relaxed goal was (a fallback: say so wherever the result is shown), ``"failed"`` when none.
    ``result`` is the kept attempt (the first that met its goal, else the last).
    """

    attempts: list[dict[str, Any]]
    kept: int | None
    status: str
    result: SurgeryResult

    def to_dict(self) -> dict[str, Any]:
        d = self.result.to_dict()
        d["ladder"] = {"status": self.status, "kept": self.kept, "attempts": self.attempts,
                       "strictest_goal": self.attempts[0]["goal"] if self.attempts else None}
        return d


def _goal_text(goal: dict[str, Any]) -> str:
    if goal.get("below_threshold"):
        return "every target false positive below threshold"
    crit = goal.get("criterion", "mean")
    return f"{crit} probability drop >= {goal.get('delta_prob')}"


def surgery_ladder(run: Callable[..., SurgeryResult],
                   goals: Sequence[dict[str, Any]]) -> SurgeryLadder:
    """Call ``run(**goal)`` for each goal in order until one is met.

    Args:
        run: e.g. ``functools.partial(surgery_from_rule, model, dataset, rule, cls, val=...)``.
        goals: keyword sets for the goal, strictest first (e.g. ``{"below_threshold": True}``,
            ``{"delta_prob": 0.1}``, ``{"delta_prob": 0.02}``).
    """
    if not goals:
        raise ConfigError("surgery_ladder: give at least one goal.")
    attempts: list[dict[str, Any]] = []
    res = None
    for i, goal in enumerate(goals):
        res = run(**goal)
        d = res.to_dict()
        attempts.append({"goal": dict(goal), "goal_text": _goal_text(goal),
                         "success": bool(res.success), "goal_met": res.goal_met,
                         "false_positives_still_above_threshold":
                             d["false_positives_still_above_threshold"],
                         "n_weights_changed": d["n_weights_changed"],
                         "true_positives_lost": res.tp_lost, "message": res.message})
        if res.success:
            return SurgeryLadder(attempts, i, "full" if i == 0 else "partial", res)
    return SurgeryLadder(attempts, None, "failed", res)
