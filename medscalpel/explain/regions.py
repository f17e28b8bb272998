"""Where a saliency map points: lung zones, lung-field estimation and localization metrics.

Zones follow the radiological reading of a frontal chest X-ray: each lung's vertical extent is
split into thirds (upper, middle, lower zone), plus the cardiac region and the rest of the
mediastinum between the lungs. Sides are the PATIENT's: on a PA/AP image displayed in the usual
way the patient's right lung is on the image's LEFT.

Masks come from ground truth (the phantom draws lung fields and the heart) or, on real images,
from :func:`estimate_lung_field` (intensity threshold inside an atlas prior plus morphology;
see docs/explain.md for its failure modes). Localization metrics compare a saliency map with a
target mask or box (NIH ``BBox_List_2017``: :func:`read_nih_bboxes`).

Example:
    >>> import numpy as np
    >>> lung = np.zeros((30, 30), bool); lung[3:27, 2:12] = True; lung[3:27, 18:28] = True
    >>> zones = zones_from_masks(lung)
    >>> sal = np.zeros((30, 30)); sal[24, 5] = 1.0
    >>> describe_location(sal, zones)
    'right lower zone'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from medscalpel.errors import ConfigError, DataError
from medscalpel.validation import check_fraction, check_range

logger = logging.getLogger(__name__)

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

#: NIH BBox_List_2017 finding names that differ from the Data_Entry label names
NIH_BBOX_ALIASES = {"Infiltrate": "Infiltration"}


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


# ----------------------------------------------------------------------------- lung fields
#: atlas prior (fractions of width/height): ellipse centre x, y and semi-axes rx, ry of the
#: patient's right lung (image left) and left lung (image right) on a PA chest X-ray framed as
#: in NIH ChestX-ray14 (set by eye from the mean of real frontal images).
ATLAS_RIGHT = (0.30, 0.45, 0.15, 0.29)
ATLAS_LEFT = (0.70, 0.45, 0.15, 0.29)


def atlas_lungs(shape: tuple[int, int], scale: float = 1.0,
                vertical_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) elliptic lung priors of the given shape (``scale`` grows the horizontal
    axes, ``vertical_scale`` the vertical ones; default the same)."""
    h, w = shape
    vs = scale if vertical_scale is None else vertical_scale
    yy, xx = np.mgrid[0:h, 0:w]
    yy = (yy + 0.5) / h
    xx = (xx + 0.5) / w
    out = []
    for cx, cy, rx, ry in (ATLAS_RIGHT, ATLAS_LEFT):
        out.append(((xx - cx) / (rx * scale)) ** 2 + ((yy - cy) / (ry * vs)) ** 2 <= 1.0)
    return out[0], out[1]


def disk(radius: int) -> np.ndarray:
    """A disk-shaped structuring element of the given radius (bool ``[2r+1, 2r+1]``)."""
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx * xx + yy * yy <= r * r


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximum between-class variance of a 256-bin histogram)."""
    if values.size == 0:
        return 0.5
    if np.ptp(values) == 0:
        return float(values.mean())
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _to_grey01(image: Any) -> np.ndarray:
    a = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if a.ndim == 3:
        a = a.mean(0) if a.shape[0] in (1, 3) else a.mean(-1)
    if a.ndim != 2:
        raise DataError(f"estimate_lung_field needs a grey image [H, W]; got shape {a.shape}.")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise DataError("estimate_lung_field: the image holds NaN/Inf values.")
    lo, hi = np.percentile(a, [1, 99])
    if hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0, 1)


@dataclass(frozen=True)
class LungFieldEstimate:
    """An estimated lung field.

    Attributes:
        right, left: bool ``[H, W]`` masks of the patient's right (image left) / left lung.
        method: per side, ``threshold`` or ``atlas`` (fallback).
        quality: area ratios vs the atlas, border contact, threshold, warnings.
    """

    right: np.ndarray
    left: np.ndarray
    method: dict[str, str]
    quality: dict[str, Any]

    @property
    def mask(self) -> np.ndarray:
        return self.right | self.left

    @property
    def source(self) -> str:
        kinds = sorted(set(self.method.values()))
        if kinds == ["atlas"]:
            return "atlas"
        return "estimated" if kinds == ["threshold"] else "estimated+atlas"

    def zones(self, heart_mask: np.ndarray | None = None) -> LungZones:
        return zones_from_masks(right_lung=self.right, left_lung=self.left,
                                heart_mask=heart_mask, source=self.source,
                                quality={"method": self.method, **self.quality})

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "source": self.source, "quality": self.quality,
                "area_right": int(self.right.sum()), "area_left": int(self.left.sum())}


def estimate_lung_field(image: Any, area_range: tuple[float, float] = (0.35, 1.9),
                        prior_scale: float = 1.3, max_border_contact: float = 0.25
                        ) -> LungFieldEstimate:
    """Estimate both lung fields of a frontal chest X-ray (no learned model).

    Method: percentile-normalise and smooth the image; inside an enlarged atlas prior of each
    lung, threshold dark (air-filled) pixels with Otsu's threshold computed on the prior region;
    keep the largest dark component on each side of the midline, fill holes, close and open
    with a disk; then check plausibility. A lung whose area is outside ``area_range`` times the
    atlas lung's, or whose component touches the image border along more than
    ``max_border_contact`` of its height (merged with the air outside the body), is replaced by
    the atlas ellipse and flagged (``method[side] == 'atlas'``).

    Args:
        image: grey ``[H, W]`` (uint8, float, or a ``[1|3, H, W]`` tensor; any scaling).
        area_range: plausible area relative to the atlas lung.
        prior_scale: enlargement of the atlas ellipses that bounds the search.
        max_border_contact: fraction of rows where the lung may touch the left/right border.

    Returns:
        :class:`LungFieldEstimate`. Failure modes (see docs/explain.md): inverted or
        unusually framed images, large effusions / consolidations / collapse (the opaque part of
        the lung is not found: the mask follows the aerated lung), lateral views.
    """
    check_range(prior_scale, "prior_scale", "estimate_lung_field", 1.0, 2.0)
    check_fraction(max_border_contact, "max_border_contact", "estimate_lung_field",
                   allow_one=True)
    lo_a, hi_a = area_range
    if not 0 < lo_a < 1 < hi_a:
        raise ConfigError(f"The 'area_range' parameter of estimate_lung_field must satisfy "
                          f"0 < low < 1 < high. Got {area_range!r} instead.")
    img = _to_grey01(image)
    h, w = img.shape
    if min(h, w) < 16:
        raise DataError(f"estimate_lung_field needs an image of at least 16x16; got {h}x{w}.")
    smooth = ndi.gaussian_filter(img, sigma=max(0.5, min(h, w) / 96))
    atlas_r, atlas_l = atlas_lungs((h, w))
    # the search region grows more sideways than vertically: above the lungs lie the dark
    # supraclavicular soft tissue and the air around the neck, below them the gastric bubble
    prior_r, prior_l = atlas_lungs((h, w), prior_scale, 1.0 + (prior_scale - 1.0) / 2)
    prior = prior_r | prior_l
    thr = _otsu(smooth[prior])
    dark = (smooth < thr) & prior
    rad = max(1, round(min(h, w) / 64))
    dark = ndi.binary_opening(dark, structure=disk(rad))
    lab, n = ndi.label(dark)
    cols = np.arange(w)[None, :]
    out: dict[str, np.ndarray] = {}
    method: dict[str, str] = {}
    quality: dict[str, Any] = {"threshold": thr, "warnings": []}
    for side, half, atlas in (("right", cols < w / 2, atlas_r), ("left", cols >= w / 2, atlas_l)):
        best, best_size = None, 0
        for i in range(1, n + 1):
            comp = lab == i
            size = int((comp & half).sum())
            if size > best_size:
                best, best_size = comp & half, size
        reason = None
        if best is None:
            reason = "no dark region found"
        else:
            m = ndi.binary_fill_holes(best)
            m = ndi.binary_closing(m, structure=disk(2 * rad), border_value=0)
            m = ndi.binary_fill_holes(m) & half
            area_ratio = float(m.sum() / max(1, atlas.sum()))
            edge = m[:, 0] if side == "right" else m[:, -1]
            contact = float(edge.sum() / max(1, m.any(1).sum()))
            quality[f"{side}_area_ratio"] = area_ratio
            quality[f"{side}_border_contact"] = contact
            if not lo_a <= area_ratio <= hi_a:
                reason = f"area {area_ratio:.2f}x the atlas lung"
            elif contact > max_border_contact:
                reason = f"touches the image border on {contact:.0%} of its rows"
            else:
                out[side], method[side] = m, "threshold"
        if reason is not None:
            out[side], method[side] = atlas.copy(), "atlas"
            quality["warnings"].append(f"{side} lung: {reason}; used the atlas prior")
    return LungFieldEstimate(out["right"], out["left"] & ~out["right"], method, quality)


# ----------------------------------------------------------------------------- metrics
def box_mask(box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """Bool mask of a box ``(x, y, w, h)`` in pixels (x = column, y = row of the top-left)."""
    if len(box) != 4:
        raise DataError(f"A box must be (x, y, w, h); got {box!r}.")
    x, y, bw, bh = (float(v) for v in box)
    if bw <= 0 or bh <= 0:
        raise DataError(f"A box must have positive width and height; got {box!r}.")
    m = np.zeros(shape, bool)
    r0, r1 = int(np.floor(y)), int(np.ceil(y + bh))
    c0, c1 = int(np.floor(x)), int(np.ceil(x + bw))
    m[max(r0, 0):max(min(r1, shape[0]), 0), max(c0, 0):max(min(c1, shape[1]), 0)] = True
    if not m.any():
        raise DataError(f"The box {box!r} lies outside an image of shape {shape}.")
    return m


def pointing_hit(saliency: np.ndarray, target: np.ndarray, tolerance: int = 0) -> bool:
    """Pointing game: is the saliency maximum inside the target mask (dilated by
    ``tolerance`` pixels)? Ties: any maximal pixel counts. An all-zero map is a miss."""
    s = _check_saliency(saliency)
    t = _as_mask(target, "target mask", s.shape)
    check_range(tolerance, "tolerance", "pointing_hit", 0, integer=True)
    if s.max() <= 0 or not t.any():
        return False
    if tolerance:
        t = ndi.binary_dilation(t, structure=disk(tolerance))
    return bool(t[s >= s.max()].any())


def topk_mask(saliency: np.ndarray, frac: float = 0.1) -> np.ndarray:
    """The ``frac`` share of pixels with the highest saliency (exactly ``round(frac * H * W)``
    pixels, at least one; ties broken by position)."""
    s = _check_saliency(saliency)
    check_fraction(frac, "frac", "topk_mask", allow_one=True)
    if frac <= 0:
        raise ConfigError(f"The 'frac' parameter of topk_mask must be in the range (0, 1]. Got "
                          f"{frac!r} instead.")
    k = max(1, int(round(frac * s.size)))
    idx = np.argsort(-s.ravel(), kind="stable")[:k]
    m = np.zeros(s.size, bool)
    m[idx] = True
    return m.reshape(s.shape)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else float("nan")


def topk_iou(saliency: np.ndarray, target: np.ndarray, frac: float = 0.1) -> float:
    """IoU between the top-``frac`` saliency pixels and the target mask."""
    m = topk_mask(saliency, frac)
    return iou(m, _as_mask(target, "target mask", m.shape))


@dataclass(frozen=True)
class LocalizationResult:
    """Pointing game and top-k% IoU over a set of (map, target) pairs."""

    hits: np.ndarray
    ious: np.ndarray
    frac: float
    tolerance: int
    ids: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    @property
    def hit_rate(self) -> float:
        return float(self.hits.mean()) if self.hits.size else float("nan")

    @property
    def mean_iou(self) -> float:
        return float(np.nanmean(self.ious)) if self.ious.size else float("nan")

    def hit_rate_ci(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson score interval of the hit rate."""
        n = self.hits.size
        if n == 0:
            return float("nan"), float("nan")
        p = self.hits.mean()
        den = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / den
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
        return float(centre - half), float(centre + half)

    def by_group(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for g in sorted(set(self.groups)):
            sel = np.array([x == g for x in self.groups])
            out[g] = {"n": int(sel.sum()), "hit_rate": float(self.hits[sel].mean()),
                      "mean_iou": float(np.nanmean(self.ious[sel]))}
        return out

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.hit_rate_ci()
        return {"n": int(self.hits.size), "hit_rate": self.hit_rate, "hit_rate_ci95": [lo, hi],
                "mean_iou": self.mean_iou, "top_fraction": self.frac,
                "tolerance_px": self.tolerance, "by_group": self.by_group(),
                "images": [{"id": self.ids[i] if self.ids else str(i),
                            "group": self.groups[i] if self.groups else None,
                            "hit": bool(self.hits[i]), "iou": float(self.ious[i])}
                           for i in range(self.hits.size)]}


def localization_metrics(maps: np.ndarray, targets: np.ndarray | Sequence[np.ndarray],
                         frac: float = 0.1, tolerance: int = 0, ids: Sequence[str] | None = None,
                         groups: Sequence[str] | None = None) -> LocalizationResult:
    """Pointing-game hits and top-``frac`` IoU of each map against its target mask.

    Args:
        maps: ``[N, H, W]`` saliency maps.
        targets: ``[N, H, W]`` bool masks (phantom lesion masks, or :func:`box_mask` of boxes).
        frac: share of top saliency pixels for the IoU.
        tolerance: pointing-game tolerance in pixels (15 px at 224 in the original paper).
        ids, groups: optional per-pair id and group (e.g. the finding) for the summary.
    """
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim != 3:
        raise DataError(f"localization_metrics needs maps [N, H, W]; got shape {m.shape}.")
    if len(targets) != m.shape[0]:
        raise DataError(f"localization_metrics: {m.shape[0]} maps but {len(targets)} targets.")
    for name, seq in (("ids", ids), ("groups", groups)):
        if seq is not None and len(seq) != m.shape[0]:
            raise DataError(f"localization_metrics: {m.shape[0]} maps but {len(seq)} {name}.")
    hits = np.array([pointing_hit(m[i], targets[i], tolerance) for i in range(m.shape[0])], bool)
    ious = np.array([topk_iou(m[i], targets[i], frac) for i in range(m.shape[0])])
    return LocalizationResult(hits, ious, float(frac), int(tolerance), tuple(ids or ()),
                              tuple(str(g) for g in (groups or ())))


# ----------------------------------------------------------------------------- NIH boxes
def read_nih_bboxes(path: str | os.PathLike, size: int | tuple[int, int] = 224,
                    original_size: int | tuple[int, int] = 1024):
    """Read NIH ``BBox_List_2017.csv(.gz)`` and scale the boxes to the model's input size.

    The file's header is ``Image Index,Finding Label,Bbox [x,y,w,h],,,`` (so pandas names the
    box columns ``'Bbox [x'``, ``'y'``, ``'w'``, ``'h]'``); boxes are in pixels of the
    1024x1024 released images. ``Infiltrate`` is renamed ``Infiltration`` (the label name).

    Returns:
        pandas DataFrame with columns ``id, finding, x, y, w, h`` in pixels of ``size``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"NIH bounding-box file not found: {path}. It is BBox_List_2017.csv from "
                        "the NIH ChestX-ray14 release.")
    try:
        df = pd.read_csv(path)
    except (ValueError, OSError) as exc:
        raise DataError(f"Cannot read {path} as CSV: {exc}.") from exc
    need = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {missing}; expected the NIH header "
                        "'Image Index,Finding Label,Bbox [x,y,w,h]'.")
    sh, sw = (size, size) if isinstance(size, int) else size
    oh, ow = (original_size, original_size) if isinstance(original_size, int) else original_size
    box = df[["Bbox [x", "y", "w", "h]"]].astype(float).to_numpy()
    bad = ~np.isfinite(box).all(1) | (box[:, 2] <= 0) | (box[:, 3] <= 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0]) + 2
        raise DataError(f"{path}, line {row}: the box is missing or has no area.")
    out = pd.DataFrame({
        "id": df["Image Index"].astype(str),
        "finding": df["Finding Label"].astype(str).map(lambda s: NIH_BBOX_ALIASES.get(s, s)),
        "x": box[:, 0] * sw / ow, "y": box[:, 1] * sh / oh,
        "w": box[:, 2] * sw / ow, "h": box[:, 3] * sh / oh,
    })
    return out


def bbox_localization(cams: Any, boxes: Any, frac: float = 0.1, tolerance: int = 0
                      ) -> LocalizationResult:
    """Localization of a :class:`~medscalpel.explain.cams.CamResult` against NIH boxes.

    Every (image, explained class) of the CAM result that has a box of the same finding in
    ``boxes`` (from :func:`read_nih_bboxes`, scaled to the CAM's resolution) is scored.
    """
    if not cams.ids:
        raise DataError("bbox_localization needs a CamResult with image ids (pass ids= to "
                        "compute_cam).")
    maps, targets, ids, groups = [], [], [], []
    shape = cams.maps.shape[1:]
    by_key = {}
    for row in boxes.itertuples(index=False):
        by_key.setdefault((row.id, row.finding), []).append((row.x, row.y, row.w, row.h))
    for i, (img_id, t) in enumerate(zip(cams.ids, cams.targets)):
        name = cams.class_names[t]
        for b in by_key.get((img_id, name), []):
            maps.append(cams.maps[i])
            targets.append(box_mask(b, shape))
            ids.append(img_id)
            groups.append(name)
    if not maps:
        raise DataError("bbox_localization: no (image, class) of the CAMs has a box; choose "
                        "images listed in BBox_List_2017 and explain their boxed findings.")
    return localization_metrics(np.stack(maps), targets, frac, tolerance, ids, groups)


# ----------------------------------------------------------------------------- report
@dataclass(frozen=True)
class ZoneReport:
    """Zone fractions and a location phrase per CAM."""

    fractions: np.ndarray
    descriptions: tuple[str, ...]
    sources: tuple[str, ...]
    ids: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        mean = np.nanmean(self.fractions, 0) if len(self.fractions) else []
        return {"zones": list(ZONE_NAMES),
                "mean_fractions": {n: float(mean[i]) for i, n in enumerate(ZONE_NAMES)}
                if len(self.fractions) else {},
                "n_atlas_fallback": int(sum("atlas" in s for s in self.sources)),
                "warnings": list(self.warnings),
                "images": [{"id": self.ids[i] if self.ids else str(i),
                            "class": self.targets[i] if self.targets else None,
                            "location": self.descriptions[i], "zones_from": self.sources[i],
                            "fractions": {n: float(self.fractions[i, j])
                                          for j, n in enumerate(ZONE_NAMES)}}
                           for i in range(len(self.descriptions))]}


def zone_report(cams: Any, images: Any = None, zones: Sequence[LungZones] | None = None,
                second_ratio: float = 0.8) -> ZoneReport:
    """Map every CAM of a :class:`CamResult` to lung zones.

    Args:
        cams: a :class:`~medscalpel.explain.cams.CamResult`.
        images: ``[N, H, W]`` grey images (or ``[N, C, H, W]``) to estimate lung fields from,
            when ``zones`` is not given.
        zones: ground-truth :class:`LungZones` per image (e.g. from the phantom's masks).
    """
    maps = cams.maps
    n = maps.shape[0]
    if zones is None:
        if images is None:
            raise ConfigError("zone_report needs ground-truth zones or the images to estimate "
                              "lung fields from.")
        if len(images) != n:
            raise DataError(f"zone_report: {n} CAMs but {len(images)} images.")
        est = [estimate_lung_field(images[i]) for i in range(n)]
        zones = [e.zones() for e in est]
    elif len(zones) != n:
        raise DataError(f"zone_report: {n} CAMs but {len(zones)} zone maps.")
    fr = np.zeros((n, len(ZONE_NAMES)))
    desc, src, warns = [], [], []
    for i in range(n):
        z = zones[i].resized(maps.shape[1:])
        f = z.fractions(maps[i])
        fr[i] = [f[k] for k in ZONE_NAMES]
        desc.append(describe_location(maps[i], z, second_ratio=second_ratio))
        src.append(z.source)
        for wmsg in z.quality.get("warnings", []):
            warns.append(f"{cams.ids[i] if cams.ids else i}: {wmsg}")
    return ZoneReport(fr, tuple(desc), tuple(src), tuple(cams.ids),
                      tuple(cams.target_names()), tuple(warns))


# ----------------------------------------------------------------------------- datasets
def zones_for_item(dataset: Any, index: int) -> LungZones:
    """Zones of one dataset item: ground truth when the dataset draws masks (the phantom's
    ``masks(i)`` with ``lung_right`` = patient's right = image left, ``lung_left``, ``heart``),
    otherwise estimated from the raw image with :func:`estimate_lung_field`."""
    if hasattr(dataset, "masks"):
        m = dataset.masks(int(index))
        if "lung_right" in m and "lung_left" in m:
            return zones_from_masks(right_lung=m["lung_right"], left_lung=m["lung_left"],
                                    heart_mask=m.get("heart"), source="ground_truth")
    return estimate_lung_field(dataset.load_raw(int(index))).zones()


def mask_localization(cams: Any, dataset: Any, indices: Sequence[int], frac: float = 0.1,
                      tolerance: int = 0) -> LocalizationResult:
    """Localization of CAMs against a dataset's ground-truth finding masks (the phantom's
    ``masks(i)[finding]``); pairs whose explained finding is not drawn in the image are skipped.
    ``indices[i]`` is the dataset index of ``cams.maps[i]``."""
    if not hasattr(dataset, "masks"):
        raise DataError("mask_localization needs a dataset with ground-truth masks (the "
                        "phantom); for NIH use read_nih_bboxes + bbox_localization.")
    if len(indices) != cams.n:
        raise DataError(f"mask_localization: {cams.n} CAMs but {len(indices)} indices.")
    maps, targets, ids, groups = [], [], [], []
    for i, di in enumerate(indices):
        name = cams.class_names[cams.targets[i]]
        m = dataset.masks(int(di)).get(name)
        if m is None or not np.asarray(m).any():
            continue
        m = np.asarray(m, bool)
        if m.shape != cams.maps.shape[1:]:
            m = LungZones(m.astype(np.int8)).resized(cams.maps.shape[1:]).label_map.astype(bool)
        maps.append(cams.maps[i])
        targets.append(m)
        ids.append(cams.ids[i] if cams.ids else str(di))
        groups.append(name)
    if not maps:
        raise DataError("mask_localization: none of the explained findings is drawn in its "
                        "image; explain positive images of the class.")
    return localization_metrics(np.stack(maps), targets, frac, tolerance, ids, groups)
