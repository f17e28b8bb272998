"""What lossless folding reports and how it verifies: the logit deltas of the folded model on
held-out, random and calibration images (:func:`_measure_deltas`), the refusal when they exceed
the tolerance, and the report types :class:`LosslessReport` / :class:`LosslessResult` of
:func:`~medscalpel.compress.lossless.fold_lossless`."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medscalpel.compress.measure import (Images, collect_logits, iter_images,
                                         max_abs_logit_delta)
from medscalpel.compress.plans import LosslessPlan
from medscalpel.errors import VerificationError
from medscalpel.runs import write_json

GUARANTEES = {
    "provable": "provable: the removed channels are dead, constant or duplicate/proportional "
                "for every finite input, derived from the weights alone (no data); the folded "
                "model equals the original up to float32 rounding (checked on held-out and on "
                "random wide-range inputs)",
    "empirical": "empirical: channels were found dead, constant or linearly dependent on the "
                 "calibration images only; the outputs were checked on the held-out images "
                 "listed (max |delta logit| below), which is evidence, not a proof, for other "
                 "inputs",
}


@dataclass
class LosslessReport:
    """What lossless folding found and what it achieved (same-run measurements)."""

    arch: str
    params_before: int
    params_after: int
    params_removed_pct: float
    macs_before: int
    macs_after: int
    latency_ms_before: float | None
    latency_ms_after: float | None
    latency_ratio: float | None
    latency_batch_size: int
    max_abs_logit_delta: float  # absolute, on held-out images (NaN when none were given)
    max_abs_logit_delta_calib: float | None
    atol: float
    verified: bool
    n_calib: int
    n_heldout: int
    channels: dict[str, int]
    layers: list[dict[str, Any]]
    sites_without_dependency_test: list[str]
    plan: LosslessPlan
    mode: str = "empirical"
    guarantee: str = GUARANTEES["empirical"]
    max_abs_logit_delta_heldout: float | None = None
    max_abs_logit_delta_random: float | None = None
    random_logit_scale: float | None = None
    n_random: int = 0
    random_range: tuple[float, float] | None = None  # the random inputs' value range
    # random inputs are gated RELATIVE to their logit scale: delta / scale <= random_rtol
    random_relative_delta: float | None = None
    random_rtol: float | None = None
    schema_version: int = 3

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "plan"}
        d["plan"] = self.plan.to_dict()
        if d["random_range"] is not None:
            d["random_range"] = list(d["random_range"])
        return d

    def summary(self) -> dict[str, Any]:
        """The headline numbers (no plan, no per-layer table)."""
        d = self.to_dict()
        for k in ("plan", "layers"):
            d.pop(k)
        return d

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())


@dataclass
class LosslessResult:
    model: nn.Module
    report: LosslessReport

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict()


@dataclass(frozen=True)
class _Deltas:
    """Max |delta logit| of the folded model on each input set (``None``: set not given)."""

    held: float | None
    rand: float | None
    rand_scale: float
    calib: float | None
    n_held: int

    @property
    def headline(self) -> float:
        """The ABSOLUTE delta on real (held-out) images; the random-input check is relative to
        its logit scale and is reported separately (never mixed in)."""
        return self.held if self.held is not None else math.nan


def _measure_deltas(reference: nn.Module, folded: nn.Module, heldout: Images | None,
                    rand: torch.Tensor | None, calib: Images | None, calib_images: int | None,
                    batch_size: int) -> _Deltas:
    """Verify step of :func:`fold_lossless`: compare the two models' logits (both in eval mode)."""
    d_held = max_abs_logit_delta(reference, folded, heldout, batch_size) \
        if heldout is not None else None
    d_rand = max_abs_logit_delta(reference, folded, rand, batch_size) \
        if rand is not None else None
    # random inputs span 3x the image range, so their logits can be large: float32 rounding
    # (a changed summation order) then scales with them. Gate them relative to that scale.
    rand_scale = max(1.0, float(collect_logits(reference, rand, batch_size).abs().max())) \
        if rand is not None else 1.0
    delta_calib = max_abs_logit_delta(reference, folded, _limited(calib, calib_images),
                                      batch_size) if calib is not None else None
    n_held = sum(x.shape[0] for x in iter_images(heldout, batch_size)) \
        if heldout is not None else 0
    return _Deltas(d_held, d_rand, rand_scale, delta_calib, n_held)


def _gating(d: _Deltas, mode: str, atol: float) -> list[tuple[float, float]]:
    """(delta, allowed) pairs that decide verification: the held-out delta against ``atol``
    and, in provable mode, the random-input delta against ``atol`` x their logit scale."""
    return [(x, tol) for x, tol in (((d.held, atol), (d.rand, atol * d.rand_scale))
                                    if mode == "provable" else ((d.held, atol),))
            if x is not None]


def _verification_error(plan: LosslessPlan, mode: str, d: _Deltas, atol: float,
                        random_inputs: int, counts: dict[str, int]) -> VerificationError:
    """The error of a fold whose logits moved more than allowed (nothing is saved)."""
    what = (f"{d.n_held} held-out images" if mode == "empirical" else
            f"{d.n_held} held-out images and {random_inputs} random inputs")
    hint = ("Use more and more varied calibration images (--calib-images), a stricter "
            "--rank-rtol, dependent=False (--no-dependent), mode='provable' (exact for "
            "every input), or --tolerance for lossy compression with a reported delta."
            if mode == "empirical" else
            "The provable analysis should never fail: report this as a bug with the "
            "model; meanwhile use a stricter weight_rtol (--weight-rtol 0) or "
            "dependent=False (--no-dependent).")
    return VerificationError(
        f"Lossless folding ({mode}) of {plan.arch} changed the logits by max |delta| = "
        f"{d.headline:.3g} on {what} (allowed atol = {atol:g}, on random inputs "
        f"{atol:g} x their max |logit| {d.rand_scale:.3g}; held-out: "
        f"{_fmt(d.held)}, random inputs: {_fmt(d.rand)}, calibration images: "
        f"{_fmt(d.calib)}). The {counts['removed']} channels found (dead "
        f"{counts['dead']}, constant {counts['constant']}, dependent "
        f"{counts['dependent']}) do not behave the same on these inputs. Nothing was "
        f"saved. {hint}")


def _layer_rows(plan: LosslessPlan) -> list[dict[str, Any]]:
    """One row per folded group for the report (the removed channels as a count)."""
    layers = []
    for g in plan.groups:
        d = g.to_dict()
        d.pop("removed")
        d.pop("kinds")
        d["removed"] = len(g.removed)
        layers.append(d)
    return layers


def _random_fields(d: _Deltas, rand: torch.Tensor | None, lo: float, hi: float, mode: str,
                   random_inputs: int, atol: float) -> dict[str, Any]:
    """The report's held-out and random-input fields (the latter relative to their scale)."""
    return dict(
        max_abs_logit_delta_heldout=d.held,
        max_abs_logit_delta_random=d.rand, random_logit_scale=d.rand_scale,
        n_random=random_inputs if rand is not None else 0,
        random_range=(lo - (hi - lo), hi + (hi - lo)) if rand is not None else None,
        random_relative_delta=d.rand / d.rand_scale if d.rand is not None else None,
        random_rtol=atol if (d.rand is not None and mode == "provable") else None)


def _fmt(d: float | None) -> str:
    return "n/a" if d is None else f"{d:.3g}"


def _limited(images: Images, limit: int | None) -> Images:
    if limit is None:
        return images
    return list(iter_images(images, 64, limit))


__all__ = ["GUARANTEES", "LosslessReport", "LosslessResult"]
