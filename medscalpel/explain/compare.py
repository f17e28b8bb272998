"""Teacher-student saliency comparison (seed 004): do the two models look at the same place?

For every class in ``classes`` both models' CAMs (Score-CAM by default, as in seed 004) are
computed on the same images, and per image the Pearson correlation of the two maps and the IoU
of their top-k% pixels are measured.

Example:
    >>> import torch
    >>> from medscalpel.models.zoo import create_model
    >>> t = create_model("vgg_tiny", num_classes=2, img_size=32)
    >>> s = create_model("resnet_tiny", num_classes=2, img_size=32)
    >>> cmp = compare_saliency(t, s, torch.randn(2, 1, 32, 32), [0, 1], method="gradcam",
    ...                        progress=False)
    >>> sorted(cmp.to_dict()["classes"])
    ['class0', 'class1']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medscalpel.errors import ConfigError, DataError
from medscalpel.explain.cams import CamResult, compute_cam
from medscalpel.explain.regions import iou, topk_mask
from medscalpel.validation import check_fraction

SCHEMA = 1


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps (NaN when either is constant)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise DataError(f"pearson: maps of different sizes ({a.size} vs {b.size}).")
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


@dataclass(frozen=True)
class SaliencyComparison:
    """Per-class similarity of two models' saliency maps on the same images.

    Attributes:
        classes: explained class indices.
        class_names: names of all classes.
        pearson: ``[n_classes, N]`` per-image Pearson correlation.
        iou: ``[n_classes, N]`` per-image IoU of the top-``frac`` pixels.
        teacher, student: ``{class index: CamResult}`` (kept for figures).
        frac: the top-k share.
        method: the CAM method.
    """

    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    pearson: np.ndarray
    iou: np.ndarray
    teacher: dict[int, CamResult]
    student: dict[int, CamResult]
    frac: float
    method: str
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for i, k in enumerate(self.classes):
            p, q = self.pearson[i], self.iou[i]
            out[self.class_names[k]] = {
                "pearson_mean": float(np.nanmean(p)) if np.isfinite(p).any() else float("nan"),
                "pearson_median": float(np.nanmedian(p)) if np.isfinite(p).any() else float("nan"),
                "iou_mean": float(np.nanmean(q)) if np.isfinite(q).any() else float("nan"),
                "n_images": int(p.size), "n_undefined": int(np.isnan(p).sum())}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "method": self.method, "top_fraction": self.frac,
                "classes": self.summary(),
                "overall": {"pearson_mean": float(np.nanmean(self.pearson))
                            if np.isfinite(self.pearson).any() else float("nan"),
                            "iou_mean": float(np.nanmean(self.iou))
                            if np.isfinite(self.iou).any() else float("nan")},
                "meta": self.meta,
                "per_image": {self.class_names[k]: {"pearson": self.pearson[i].tolist(),
                                                   "iou": self.iou[i].tolist()}
                              for i, k in enumerate(self.classes)}}


def compare_saliency(teacher: nn.Module, student: nn.Module, images: torch.Tensor,
                     classes: Sequence[int], method: str = "scorecam", frac: float = 0.1,
                     batch_size: int = 16, progress: bool | None = None,
                     student_images: torch.Tensor | None = None,
                     ids: Sequence[str] | None = None) -> SaliencyComparison:
    """Compare where ``teacher`` and ``student`` look, class by class.

    Args:
        teacher, student: two :class:`MedClassifier` with the same classes (left unchanged).
        images: ``[N, C, H, W]`` input for the teacher (and the student unless
            ``student_images`` is given, e.g. for a student with another input size).
        classes: class indices to explain (each explained on every image).
        method: CAM method name (``scorecam``, ``gradcam``, ``gradcam++``).
        frac: share of top pixels for the IoU.
        student_images: the same images preprocessed for the student; its maps are resized to
            the teacher's resolution before comparing.
    """
    check_fraction(frac, "frac", "compare_saliency", allow_one=True)
    if frac <= 0:
        raise ConfigError(f"The 'frac' parameter of compare_saliency must be in (0, 1]. Got "
                          f"{frac!r} instead.")
    if not classes:
        raise ConfigError("The 'classes' parameter of compare_saliency must name at least one "
                          "class index.")
    kt, ks = teacher.classifier.out_features, student.classifier.out_features
    if kt != ks:
        raise DataError(f"compare_saliency: the teacher has {kt} classes and the student {ks}; "
                        "both must explain the same label set.")
    simg = images if student_images is None else student_images
    if simg.shape[0] != images.shape[0]:
        raise DataError(f"compare_saliency: {images.shape[0]} teacher images but "
                        f"{simg.shape[0]} student images.")
    t_maps: dict[int, CamResult] = {}
    s_maps: dict[int, CamResult] = {}
    n = int(images.shape[0])
    pear = np.full((len(classes), n), np.nan)
    ious = np.full((len(classes), n), np.nan)
    for i, k in enumerate(classes):
        t = compute_cam(teacher, images, int(k), method=method, batch_size=batch_size,
                        progress=progress, ids=ids)
        s = compute_cam(student, simg, int(k), method=method, batch_size=batch_size,
                        progress=progress, ids=ids)
        smaps = s.maps
        if smaps.shape[1:] != t.maps.shape[1:]:
            smaps = torch.nn.functional.interpolate(
                torch.from_numpy(smaps)[:, None], size=t.maps.shape[1:], mode="bilinear",
                align_corners=False)[:, 0].numpy()
        t_maps[int(k)], s_maps[int(k)] = t, s
        for j in range(n):
            pear[i, j] = pearson(t.maps[j], smaps[j])
            if t.maps[j].max() > 0 and smaps[j].max() > 0:
                ious[i, j] = iou(topk_mask(t.maps[j], frac), topk_mask(smaps[j], frac))
    names = t_maps[int(classes[0])].class_names
    return SaliencyComparison(tuple(int(k) for k in classes), names, pear, ious, t_maps, s_maps,
                              float(frac), method,
                              {"teacher": getattr(teacher, "arch", type(teacher).__name__),
                               "student": getattr(student, "arch", type(student).__name__),
                               "teacher_params": sum(p.numel() for p in teacher.parameters()),
                               "student_params": sum(p.numel() for p in student.parameters()),
                               "n_images": n})
