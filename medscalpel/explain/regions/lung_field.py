"""Estimating the lung fields of a real chest X-ray (no ground-truth masks).

An elliptic atlas prior (:func:`atlas_lungs`), an Otsu threshold of the dark (air-filled)
pixels inside it, morphology with disk-shaped elements (:func:`disk`) and area / border checks:
:func:`estimate_lung_field` returns a :class:`LungFieldEstimate` whose ``zones()`` are
:class:`~medscalpel.explain.regions.zones.LungZones`, falling back to the atlas (stated in
its method, source and quality warnings) for a side where the threshold finds no plausible lung.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from medscalpel.errors import ConfigError, DataError
from medscalpel.explain.regions.zones import LungZones, zones_from_masks
from medscalpel.validation import check_fraction, check_range


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



__all__ = ["ATLAS_LEFT", "ATLAS_RIGHT", "LungFieldEstimate", "atlas_lungs", "disk",
           "estimate_lung_field"]
