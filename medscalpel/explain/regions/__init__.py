"""Where a saliency map points: lung zones, lung-field estimation and localization metrics.

Zones follow the radiological reading of a frontal chest X-ray: each lung's vertical extent is
split into thirds (upper, middle, lower zone), plus the cardiac region and the rest of the
mediastinum between the lungs. Sides are the PATIENT's: on a PA/AP image displayed in the usual
way the patient's right lung is on the image's LEFT.

Masks come from ground truth (the phantom draws lung fields and the heart) or, on real images,
from :func:`estimate_lung_field` (intensity threshold inside an atlas prior plus morphology;
see docs/explain.md for its failure modes). Localization metrics compare a saliency map with a
target mask or box (NIH ``BBox_List_2017``: :func:`read_nih_bboxes`).

The package: :mod:`.zones` (lung zones, location phrases), :mod:`.lung_field` (lung-field
estimation on real images), :mod:`.localization` (localization metrics, NIH boxes); this module
maps a CAM result to zones (:func:`zone_report`) and gives a dataset item's zones
(:func:`zones_for_item`).

Example:
    >>> import numpy as np
    >>> lung = np.zeros((30, 30), bool); lung[3:27, 2:12] = True; lung[3:27, 18:28] = True
    >>> zones = zones_from_masks(lung)
    >>> sal = np.zeros((30, 30)); sal[24, 5] = 1.0
    >>> describe_location(sal, zones)
    'right lower zone'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medscalpel.errors import ConfigError, DataError
from medscalpel.explain.regions.localization import (NIH_BBOX_ALIASES, LocalizationResult,
                                                     bbox_localization, box_mask, iou,
                                                     localization_metrics, mask_localization,
                                                     pointing_hit, read_nih_bboxes, topk_iou,
                                                     topk_mask)
from medscalpel.explain.regions.lung_field import (ATLAS_LEFT, ATLAS_RIGHT, LungFieldEstimate,
                                                   atlas_lungs, disk, estimate_lung_field)
from medscalpel.explain.regions.zones import (OUTSIDE, ZONE_NAMES, ZONE_PHRASES, LungZones,
                                              describe_location, split_lungs, zones_from_masks)


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


__all__ = ["ATLAS_LEFT", "ATLAS_RIGHT", "NIH_BBOX_ALIASES", "OUTSIDE", "ZONE_NAMES",
           "ZONE_PHRASES", "LocalizationResult", "LungFieldEstimate", "LungZones", "ZoneReport",
           "atlas_lungs", "bbox_localization", "box_mask", "describe_location", "disk",
           "estimate_lung_field", "iou", "localization_metrics", "mask_localization",
           "pointing_hit", "read_nih_bboxes", "split_lungs", "topk_iou", "topk_mask",
           "zone_report", "zones_for_item", "zones_from_masks"]
