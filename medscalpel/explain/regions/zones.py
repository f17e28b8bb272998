"""Lung zones of a frontal chest X-ray and where a saliency map falls among them.

:class:`LungZones` (a label map: each lung's vertical extent in thirds, the cardiac region,
the rest of the mediastinum, outside), built from ground-truth masks
(:func:`zones_from_masks`; one mask of both lungs is split by :func:`split_lungs`), and
:func:`describe_location`: the zone phrase(s) of a saliency map. Sides are the PATIENT's: the
patient's right lung is on the image's LEFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from medscalpel.errors import ConfigError, DataError
from medscalpel.validation import check_fraction

ZONE_NAMES = ("right_upper", "right_middle", "right_lower", "left_upper", "left_middle",
              "left_lower", "cardiac", "mediastinal", "outside")
ZONE_PHRASES = {
    "right_upper": "right upper zone", "right_middle": "right middle zone",
    "right_lower": "right lower zone", "left_upper": "left upper zone",
    "left_middle": "left middle zone", "left_lower": "left lower zone",
    "cardiac": "cardiac region", "mediastinal": "mediastinum",
    "outside": "outside the lung fields",
}
OUTSIDE = ZONE_NAMES.index("outside")


# ----------------------------------------------------------------------------- zones
@dataclass(frozen=True)
class LungZones:
    """A zone label map of one image.

    Attributes:
        label_map: int8 ``[H, W]``; value ``i`` is ``ZONE_NAMES[i]``.
        source: ``ground_truth``, ``estimated`` or ``atlas`` (or a mix such as
            ``estimated+atlas`` when one lung fell back to the atlas).
        quality: flags and numbers from the estimation (empty for ground truth).
    """

    label_map: np.ndarray
    source: str = "ground_truth"
    quality: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.label_map.shape)  # type: ignore[return-value]

    def mask(self, name: str) -> np.ndarray:
        if name not in ZONE_NAMES:
            raise ConfigError(f"Unknown zone {name!r}. Valid zones: {', '.join(ZONE_NAMES)}.")
        return self.label_map == ZONE_NAMES.index(name)

    def lung_mask(self) -> np.ndarray:
        return self.label_map < ZONE_NAMES.index("cardiac")

    def resized(self, shape: tuple[int, int]) -> "LungZones":
        """Nearest-neighbour resize of the label map (e.g. to a CAM's resolution)."""
        if tuple(shape) == self.shape:
            return self
        h, w = self.shape
        rows = np.minimum((np.arange(shape[0]) + 0.5) * h / shape[0], h - 1).astype(int)
        cols = np.minimum((np.arange(shape[1]) + 0.5) * w / shape[1], w - 1).astype(int)
        return LungZones(self.label_map[rows][:, cols], self.source, dict(self.quality))

    def fractions(self, saliency: np.ndarray) -> dict[str, float]:
        """Share of the saliency mass (negative values clipped) in each zone; sums to 1."""
        s = _check_saliency(saliency, self.shape)
        total = float(s.sum())
        sums = np.bincount(self.label_map.ravel().astype(np.int64), weights=s.ravel(),
                           minlength=len(ZONE_NAMES))
        if total <= 0:
            return {n: float("nan") for n in ZONE_NAMES}
        return {n: float(sums[i] / total) for i, n in enumerate(ZONE_NAMES)}

    def areas(self) -> dict[str, int]:
        counts = np.bincount(self.label_map.ravel().astype(np.int64), minlength=len(ZONE_NAMES))
        return {n: int(counts[i]) for i, n in enumerate(ZONE_NAMES)}

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "shape": list(self.shape), "areas": self.areas(),
                "quality": self.quality}


def _check_saliency(saliency: Any, shape: tuple[int, int] | None = None) -> np.ndarray:
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim != 2:
        raise DataError(f"A saliency map must be 2-D [H, W]; got shape {s.shape}.")
    if shape is not None and s.shape != tuple(shape):
        raise DataError(f"Saliency map of shape {s.shape} does not match the zones / mask of shape "
                        f"{tuple(shape)}; resize one of them (LungZones.resized).")
    if not np.isfinite(s).all():
        raise DataError("The saliency map holds NaN/Inf values.")
    return np.clip(s, 0, None)


def _as_mask(m: Any, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    a = np.asarray(m)
    if a.ndim != 2:
        raise DataError(f"The {name} must be a 2-D [H, W] mask; got shape {a.shape}.")
    if shape is not None and a.shape != tuple(shape):
        raise DataError(f"The {name} has shape {a.shape}, expected {tuple(shape)}.")
    return a.astype(bool)


def split_lungs(lung_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(patient's right lung, patient's left lung) from a mask of both lung fields.

    The two largest connected components are the lungs; the one on the image's left is the
    patient's right. When the lungs touch (one component) the mask is cut at the image's
    vertical midline.
    """
    m = _as_mask(lung_mask, "lung-field mask")
    if not m.any():
        raise DataError("The lung-field mask is empty: no lung pixel to define zones from.")
    lab, n = ndi.label(m)
    if n >= 2:
        sizes = ndi.sum(m, lab, index=np.arange(1, n + 1))
        a, b = (np.argsort(-sizes)[:2] + 1)
        # the second component must be a lung, not a speck: >= 15% of the largest
        if sizes[b - 1] >= 0.15 * sizes[a - 1]:
            ca = ndi.center_of_mass(lab == a)[1]
            cb = ndi.center_of_mass(lab == b)[1]
            right, left = (lab == a, lab == b) if ca < cb else (lab == b, lab == a)
            return right, left
    cols = np.arange(m.shape[1])[None, :]
    mid = m.shape[1] / 2.0
    return m & (cols < mid), m & (cols >= mid)


def _thirds(lung: np.ndarray) -> np.ndarray:
    """0/1/2 (upper/middle/lower) per lung pixel, -1 elsewhere."""
    out = np.full(lung.shape, -1, np.int8)
    rows = np.flatnonzero(lung.any(1))
    if rows.size == 0:
        return out
    r0, r1 = rows[0], rows[-1] + 1
    edges = r0 + (r1 - r0) * np.array([1 / 3, 2 / 3])
    rr = np.arange(lung.shape[0])[:, None] + 0.5
    third = (rr >= edges[0]).astype(np.int8) + (rr >= edges[1]).astype(np.int8)
    out[lung] = np.broadcast_to(third, lung.shape)[lung]
    return out


def _medial_edges(right: np.ndarray, left: np.ndarray,
                  rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the medial column of the right lung and of the left lung (interpolated over
    rows where a lung is absent)."""
    def edge(mask: np.ndarray, fn) -> np.ndarray:
        has = mask.any(1)
        vals = np.array([fn(np.flatnonzero(mask[r])) if has[r] else np.nan
                         for r in range(mask.shape[0])], dtype=np.float64)
        ok = ~np.isnan(vals)
        if not ok.any():
            return np.full(len(rows), np.nan)
        return np.interp(rows, np.flatnonzero(ok), vals[ok])

    return edge(right, np.max), edge(left, np.min)


def zones_from_masks(lung_mask: np.ndarray | None = None, heart_mask: np.ndarray | None = None,
                     right_lung: np.ndarray | None = None, left_lung: np.ndarray | None = None,
                     source: str = "ground_truth", quality: dict[str, Any] | None = None
                     ) -> LungZones:
    """Zones from a lung-field mask (both lungs) or from the two lungs given separately.

    Args:
        lung_mask: bool ``[H, W]`` of both lung fields (split by :func:`split_lungs`).
        heart_mask: optional bool ``[H, W]`` of the heart; without it the cardiac region is the
            between-lungs band in the lower half of the lungs' vertical extent (the rest of the
            band is the mediastinum).
        right_lung, left_lung: the patient's right (image left) and left lungs, instead of
            ``lung_mask``.
        source: recorded in the result.

    Returns:
        :class:`LungZones` (lung zones take precedence over cardiac, cardiac over mediastinal).
    """
    if right_lung is not None or left_lung is not None:
        if right_lung is None or left_lung is None:
            raise ConfigError("zones_from_masks: give both right_lung and left_lung, or "
                              "lung_mask alone.")
        right = _as_mask(right_lung, "right-lung mask")
        left = _as_mask(left_lung, "left-lung mask", right.shape)
    elif lung_mask is not None:
        right, left = split_lungs(lung_mask)
    else:
        raise ConfigError("zones_from_masks needs lung_mask (both lungs) or right_lung and "
                          "left_lung.")
    shape = right.shape
    if not right.any() or not left.any():
        raise DataError("zones_from_masks: one lung mask is empty; check the mask (a collapsed "
                        "or resected lung cannot be zoned automatically).")
    left = left & ~right
    lab = np.full(shape, OUTSIDE, np.int8)
    # between-lungs band: rows of the lungs' joint extent, columns between the medial edges
    rows_any = np.flatnonzero((right | left).any(1))
    rows = np.arange(rows_any[0], rows_any[-1] + 1)
    er, el = _medial_edges(right, left, rows)
    cols = np.arange(shape[1])[None, :]
    band = np.zeros(shape, bool)
    band[rows] = (cols > er[:, None]) & (cols < el[:, None])
    if heart_mask is not None:
        heart = _as_mask(heart_mask, "heart mask", shape)
        lab[band] = ZONE_NAMES.index("mediastinal")
        lab[heart] = ZONE_NAMES.index("cardiac")
    else:
        mid = rows[0] + 0.5 * (rows[-1] + 1 - rows[0])
        upper = np.arange(shape[0])[:, None] < mid
        lab[band & upper] = ZONE_NAMES.index("mediastinal")
        lab[band & ~upper] = ZONE_NAMES.index("cardiac")
    for side, lung in (("right", right), ("left", left)):
        t = _thirds(lung)
        for i, level in enumerate(("upper", "middle", "lower")):
            lab[t == i] = ZONE_NAMES.index(f"{side}_{level}")
    return LungZones(lab, source, dict(quality or {}))


def describe_location(saliency: np.ndarray, zones: LungZones, include_outside: bool = True,
                      second_ratio: float = 0.8) -> str:
    """A phrase naming the zone that holds most of the saliency, e.g. ``"right lower zone"``.

    Args:
        saliency: ``[H, W]`` map (resized to the zones if the shapes differ is NOT done: pass
            ``zones.resized(saliency.shape)``).
        zones: :class:`LungZones`.
        include_outside: when most saliency lies outside the lungs and mediastinum, say so
            (``"outside the lung fields"``); otherwise name the best anatomical zone.
        second_ratio: a second zone holding at least this fraction of the first's share is
            named too (``"right lower zone and right middle zone"``); 1.0 names one zone only.
    """
    check_fraction(second_ratio, "second_ratio", "describe_location", allow_one=True)
    fr = zones.fractions(saliency)
    if any(np.isnan(v) for v in fr.values()):
        return "no positive saliency"
    names = [n for n in ZONE_NAMES if include_outside or n != "outside"]
    ranked = sorted(names, key=lambda n: -fr[n])
    first = ranked[0]
    if fr[first] <= 0:
        return "no positive saliency"
    if first == "outside":
        return ZONE_PHRASES[first]
    second = next((n for n in ranked[1:] if n != "outside"), None)
    if second is not None and second_ratio < 1 and fr[second] >= second_ratio * fr[first] > 0:
        return f"{ZONE_PHRASES[first]} and {ZONE_PHRASES[second]}"
    return ZONE_PHRASES[first]


__all__ = ["OUTSIDE", "ZONE_NAMES", "ZONE_PHRASES", "LungZones", "describe_location",
           "split_lungs", "zones_from_masks"]
