"""The surgery plan (which weights of one classifier row change, and by how much) and the search
that finds it."""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medscalpel.engine.predict import Features
from medscalpel.errors import ModelError
from medscalpel.models.classifier import MedClassifier
from medscalpel.runs import read_json, write_json
from medscalpel.repair.surgery.helpers import _logit, sigmoid

logger = logging.getLogger(__name__)

SCHEMA = 1
_EPS = 1e-6  # logit safety margin of the float64 search against float32 rounding


# ----------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class SurgeryPlan:
    """What to change in classifier row ``class_index`` (data; apply with :meth:`apply`)."""

    class_index: int
    class_name: str
    channels: tuple[int, ...]
    old_weights: tuple[float, ...]
    old_bias: float
    new_bias: float
    feature_dim: int
    scores: tuple[float, ...] = ()

    @property
    def n_weights(self) -> int:
        return len(self.channels)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "class_index": self.class_index,
                "class": self.class_name, "channels": list(self.channels),
                "old_weights": list(self.old_weights), "old_bias": self.old_bias,
                "new_bias": self.new_bias, "feature_dim": self.feature_dim,
                "scores": list(self.scores)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SurgeryPlan":
        return cls(int(d["class_index"]), str(d["class"]), tuple(int(c) for c in d["channels"]),
                   tuple(float(w) for w in d["old_weights"]), float(d["old_bias"]),
                   float(d["new_bias"]), int(d["feature_dim"]),
                   tuple(float(s) for s in d.get("scores", ())))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SurgeryPlan":
        return cls.from_dict(read_json(path))

    def _check(self, weight: torch.Tensor, where: str) -> None:
        if tuple(weight.shape)[1] != self.feature_dim or weight.shape[0] <= self.class_index:
            raise ModelError(f"{where}: the classifier is {tuple(weight.shape)} but the plan was "
                             f"made for row {self.class_index} of a [K, {self.feature_dim}] one.")
        if self.channels:
            cur = weight[self.class_index, list(self.channels)].detach().cpu().double().numpy()
            if not np.allclose(cur, np.asarray(self.old_weights), rtol=0, atol=1e-7):
                raise ModelError(f"{where}: the weights of row {self.class_index} differ from the "
                                 "plan's old weights: the plan was made for another model (or "
                                 "already applied).")

    def apply_linear(self, linear: nn.Linear, inplace: bool = False) -> nn.Linear:
        """Zero ``W[k, channels]`` and set ``b[k]``; returns the (copied) layer."""
        self._check(linear.weight, "SurgeryPlan.apply")
        lin = linear if inplace else copy.deepcopy(linear)
        with torch.no_grad():
            if self.channels:
                lin.weight[self.class_index, list(self.channels)] = 0.0
            if lin.bias is None:
                raise ModelError("SurgeryPlan.apply: the classifier has no bias.")
            lin.bias[self.class_index] = float(self.new_bias)
        return lin

    def apply(self, target: MedClassifier | Features, inplace: bool = False
              ) -> MedClassifier | Features:
        """Apply to a model (its ``classifier``) or to a :class:`Features` (its weight/bias)."""
        if isinstance(target, Features):
            w = target.weight.copy()
            b = target.bias.copy()
            self._check(torch.from_numpy(np.asarray(w, np.float64)), "SurgeryPlan.apply")
            w[self.class_index, list(self.channels)] = 0.0
            b[self.class_index] = np.float32(self.new_bias)
            return replace(target, weight=w, bias=b)
        model = target if inplace else copy.deepcopy(target)
        self.apply_linear(model.classifier, inplace=True)
        return model


# ----------------------------------------------------------------------------- search
@dataclass
class _Problem:
    """Everything the exact feasibility check needs (float64)."""

    ct: np.ndarray  # [nt, C] contributions on targets
    cv: np.ndarray  # [nv, C] contributions on validation true positives
    mt: np.ndarray  # target probability margins
    dt: np.ndarray  # target decision margins
    dv: np.ndarray  # validation TP decision margins
    goal: str  # mean | each | below
    delta: float
    budget: int
    adjust_bias: bool

    def bias_range(self, drop_t: np.ndarray, drop_v: np.ndarray) -> tuple[float, float]:
        """Feasible bias shifts [lo, hi] for the given drops (lo > hi: infeasible)."""
        # TP constraint: at most `budget` TPs with dv - drop_v + s < 0
        need = drop_v - self.dv + _EPS  # s >= need_n keeps TP n
        if need.size > self.budget:
            lo = float(np.sort(need)[::-1][self.budget])
        else:
            lo = -math.inf
        m = self.mt - drop_t
        p0 = sigmoid(self.mt)
        if self.goal == "below":
            hi = float(np.min(-(self.dt - drop_t))) - _EPS
        elif self.goal == "each":
            tgt = p0 - self.delta
            if np.any(tgt <= 0):
                return lo, -math.inf
            hi = float(np.min(_logit(tgt) - m)) - _EPS
        else:
            tgt = float(p0.mean() - self.delta)
            if tgt <= 0:
                return lo, -math.inf

            def g(s: float) -> float:
                return float(sigmoid(m + s).mean()) - tgt

            a, b = -60.0, 60.0
            if g(a) > 0:
                return lo, -math.inf
            if g(b) <= 0:
                hi = b
            else:
                for _ in range(100):
                    mid = 0.5 * (a + b)
                    if g(mid) <= 0:
                        a = mid
                    else:
                        b = mid
                hi = a - _EPS
        return lo, hi

    def check(self, drop_t: np.ndarray, drop_v: np.ndarray) -> tuple[bool, bool, float]:
        """(goal met, TP constraint met, bias shift) for a set with these drops."""
        lo, hi = self.bias_range(drop_t, drop_v)
        if self.adjust_bias:
            if lo <= hi:
                return True, True, float(min(max(0.0, lo), hi))
            return False, lo <= 0.0, 0.0
        return hi >= 0.0, lo <= 0.0, 0.0

    def drops(self, s: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        idx = list(s)
        return self.ct[:, idx].sum(1), self.cv[:, idx].sum(1)


def _search(p: _Problem, ranked: np.ndarray, max_weights: int, pool: int, max_subsets: int
            ) -> tuple[list[int] | None, float, dict[str, Any]]:
    info: dict[str, Any] = {"skipped_for_tp": [], "pruned": [], "exhaustive": None}
    chosen: list[int] = []
    drop_t = np.zeros(p.ct.shape[0])
    drop_v = np.zeros(p.cv.shape[0])
    goal, tp_ok, shift = p.check(drop_t, drop_v)
    found = goal and tp_ok
    if not found:
        for c in ranked:
            if len(chosen) >= max_weights:
                break
            nt, nv = drop_t + p.ct[:, c], drop_v + p.cv[:, c]
            goal, tp_ok, shift = p.check(nt, nv)
            if not tp_ok:
                info["skipped_for_tp"].append(int(c))
                continue
            chosen.append(int(c))
            drop_t, drop_v = nt, nv
            if goal:
                found = True
                break
    if not found:
        return None, 0.0, info
    # pruning pass: least important first
    for c in list(reversed(chosen)):
        trial = [x for x in chosen if x != c]
        goal, tp_ok, _ = p.check(*p.drops(trial))
        if goal and tp_ok:
            chosen = trial
            info["pruned"].append(c)
    # exhaustive pass for a smaller set among the top `pool` candidates
    cand = list(dict.fromkeys([int(c) for c in ranked[:pool]] + chosen))
    checked_sizes = []
    proved = len(chosen) <= 1  # the empty set was checked first
    size = len(chosen) - 1
    while size >= 1:
        if math.comb(len(cand), size) > max_subsets:
            break
        better = None
        for sub in itertools.combinations(cand, size):
            goal, tp_ok, _ = p.check(*p.drops(sub))
            if goal and tp_ok:
                better = list(sub)
                break
        checked_sizes.append(size)
        if better is None:
            proved = True
            break
        chosen = better
        size -= 1
        proved = size < 1
    info["exhaustive"] = {"pool": len(cand), "sizes_checked": checked_sizes,
                          "minimal_within_pool": bool(proved)}
    goal, tp_ok, shift = p.check(*p.drops(chosen))
    return chosen, shift, info
