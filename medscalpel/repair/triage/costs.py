"""What each treatment costs: cost units of a measured wall time and the :class:`CostMatrix`
that learns a treatment's cost from its measured seconds and persists between runs.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medscalpel.errors import ConfigError
from medscalpel.repair.treatments import TREATMENTS, initial_costs
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_fraction, check_range

#: schema of the cost matrix and of the decision log (:class:`~medscalpel.repair.triage.
#: result.TriageResult`)
SCHEMA = 1


def seconds_to_units(seconds: float) -> float:
    """Cost units of a measured wall time: ``1 + 2 log10(1 + s)``."""
    return 1.0 + 2.0 * math.log10(1.0 + max(0.0, float(seconds)))


def units_to_seconds(units: float) -> float:
    """Inverse of :func:`seconds_to_units` (an estimate of wall time for a cost)."""
    return max(0.0, 10 ** ((float(units) - 1.0) / 2.0) - 1.0)


@dataclass
class CostMatrix:
    """Empirical cost per treatment, learned from measured wall times.

    Example:
        >>> cm = CostMatrix()
        >>> cm.cost("threshold")
        1.0
        >>> cm.update("retrain_partial", 85.0)
        >>> round(cm.cost("retrain_partial"), 2)
        2.96
    """

    initial: dict[str, float] = field(default_factory=initial_costs)
    seconds_ema: dict[str, float] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    alpha: float = 0.3
    prior_strength: float = 2.0

    def __post_init__(self):
        check_fraction(self.alpha, "alpha", "CostMatrix", allow_one=True)
        check_range(self.prior_strength, "prior_strength", "CostMatrix", 0)

    def cost(self, name: str) -> float:
        if name not in self.initial:
            raise ConfigError(f"CostMatrix: no cost for treatment {name!r}. Known: "
                              f"{', '.join(sorted(self.initial))}.")
        n = self.runs.get(name, 0)
        if n == 0 or name == "none":
            return float(self.initial[name])
        k0 = self.prior_strength
        return float((k0 * self.initial[name] + n * seconds_to_units(self.seconds_ema[name]))
                     / (k0 + n))

    def estimated_seconds(self, name: str) -> float:
        if self.runs.get(name, 0):
            return float(self.seconds_ema[name])
        tr = TREATMENTS.get(name) if name in TREATMENTS else None
        return float(tr.typical_seconds) if tr is not None and tr.typical_seconds else \
            units_to_seconds(self.cost(name))

    def update(self, name: str, seconds: float) -> None:
        """Fold one measured wall time into the moving average."""
        check_range(float(seconds), "seconds", "CostMatrix.update", 0)
        if name not in self.initial:
            self.initial[name] = seconds_to_units(seconds)
        prev = self.seconds_ema.get(name)
        self.seconds_ema[name] = float(seconds) if prev is None else \
            float(self.alpha * seconds + (1 - self.alpha) * prev)
        self.runs[name] = self.runs.get(name, 0) + 1

    def table(self) -> list[dict[str, Any]]:
        return [{"treatment": n, "initial": self.initial[n], "cost": self.cost(n),
                 "runs": self.runs.get(n, 0), "seconds_ema": self.seconds_ema.get(n)}
                for n in sorted(self.initial, key=lambda x: (self.initial[x], x))]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, **asdict(self),
                "current": {n: self.cost(n) for n in self.initial}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostMatrix":
        base = initial_costs()
        base.update({k: float(v) for k, v in d.get("initial", {}).items()})
        return cls(initial=base, seconds_ema={k: float(v) for k, v in
                                               d.get("seconds_ema", {}).items()},
                   runs={k: int(v) for k, v in d.get("runs", {}).items()},
                   alpha=float(d.get("alpha", 0.3)),
                   prior_strength=float(d.get("prior_strength", 2.0)))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CostMatrix":
        return cls.from_dict(read_json(path))
