"""The plan types of lossless folding, shared by both analyses (:mod:`.lossless`, empirical, and
:mod:`.provable`, data-free): which channels of each producer layer go and how each consumer
absorbs them. One module, so that neither analysis imports the other for its types."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medscalpel.errors import ModelError
from medscalpel.runs import read_json, write_json

PLAN_SCHEMA = 1
#: why a channel can be removed without changing any output
KINDS = ("dead", "constant", "dependent")


@dataclass(frozen=True)
class SiteFold:
    """How one consumer absorbs one removed input channel: ``u[channel] = sum coefs * u[basis]
    + intercept`` (indices in the consumer's original input numbering)."""

    site: str
    channel: int
    kind: str
    basis: tuple[int, ...] = ()
    coefs: tuple[float, ...] = ()
    intercept: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "channel": self.channel, "kind": self.kind,
                "basis": list(self.basis), "coefs": list(self.coefs), "intercept": self.intercept}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SiteFold":
        return cls(d["site"], int(d["channel"]), d["kind"], tuple(int(i) for i in d["basis"]),
                   tuple(float(c) for c in d["coefs"]), float(d["intercept"]))


@dataclass(frozen=True)
class GroupPlan:
    """The channels of one producer layer (and everything tied to it) to remove."""

    layer: str
    size: int
    removed: tuple[int, ...] = ()
    kinds: tuple[str, ...] = ()
    supported: bool = True
    reason: str = ""
    consumers: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        return {k: sum(1 for x in self.kinds if x == k) for k in KINDS}

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "size": self.size, "removed": list(self.removed),
                "kinds": list(self.kinds), "supported": self.supported, "reason": self.reason,
                "consumers": list(self.consumers), **self.counts()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GroupPlan":
        return cls(d["layer"], int(d["size"]), tuple(int(i) for i in d["removed"]),
                   tuple(d["kinds"]), bool(d.get("supported", True)), d.get("reason", ""),
                   tuple(d.get("consumers", ())))


@dataclass(frozen=True)
class LosslessPlan:
    """What :func:`apply_plan` will do: per producer layer the channels to remove and, per
    consumer, the folding coefficients. JSON-serialisable (``save``/``load``)."""

    arch: str
    input_shape: tuple[int, ...]
    groups: tuple[GroupPlan, ...]
    folds: tuple[SiteFold, ...]
    sites: tuple[dict[str, Any], ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    n_calib: int = 0
    schema_version: int = PLAN_SCHEMA

    @property
    def removed_channels(self) -> int:
        return sum(len(g.removed) for g in self.groups)

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in KINDS}
        for g in self.groups:
            for k, v in g.counts().items():
                out[k] += v
        out["removed"] = self.removed_channels
        out["total"] = sum(g.size for g in self.groups)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "arch": self.arch,
                "input_shape": list(self.input_shape), "n_calib": self.n_calib,
                "settings": dict(self.settings), "counts": self.counts(),
                "groups": [g.to_dict() for g in self.groups],
                "folds": [f.to_dict() for f in self.folds], "sites": list(self.sites)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LosslessPlan":
        if d.get("schema_version", 1) > PLAN_SCHEMA:
            raise ModelError(f"Lossless plan schema {d['schema_version']} is newer than this "
                             f"medscalpel ({PLAN_SCHEMA}); upgrade medscalpel.")
        return cls(d["arch"], tuple(int(i) for i in d["input_shape"]),
                   tuple(GroupPlan.from_dict(g) for g in d["groups"]),
                   tuple(SiteFold.from_dict(f) for f in d["folds"]),
                   tuple(d.get("sites", ())), dict(d.get("settings", {})), int(d.get("n_calib", 0)))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LosslessPlan":
        return cls.from_dict(read_json(path))


__all__ = ["KINDS", "PLAN_SCHEMA", "GroupPlan", "LosslessPlan", "SiteFold"]
