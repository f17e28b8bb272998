"""Localization metrics: how well saliency maps point at a target mask or box.

Per map: :func:`pointing_hit` (the maximum inside the target), :func:`topk_mask` /
:func:`topk_iou` (the top fraction of pixels against the target), :func:`iou`; over many maps
:func:`localization_metrics` (a :class:`LocalizationResult`). Targets come from NIH
``BBox_List_2017`` boxes (:func:`read_nih_bboxes`, :func:`bbox_localization`) or a dataset's
ground-truth finding masks (:func:`mask_localization`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from medscalpel.errors import ConfigError, DataError
from medscalpel.explain.regions.lung_field import disk
from medscalpel.explain.regions.zones import LungZones, _as_mask, _check_saliency
from medscalpel.validation import check_fraction, check_range

#: NIH BBox_List_2017 finding names that differ from the Data_Entry label names
NIH_BBOX_ALIASES = {"Infiltrate": "Infiltration"}


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


__all__ = ["NIH_BBOX_ALIASES", "LocalizationResult", "bbox_localization", "box_mask", "iou",
           "localization_metrics", "mask_localization", "pointing_hit", "read_nih_bboxes",
           "topk_iou", "topk_mask"]
