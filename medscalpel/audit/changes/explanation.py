"""Explanation drift and faithfulness: does the compressed model still look where the dense one
looked, and do its maps still explain its outputs?

* Similarity, per class, of the dense and compressed Grad-CAM of the same image: Spearman rank
  correlation of the pixels, IoU of the top-``frac`` pixels and pointing-game agreement (the
  compressed map's peak inside the dense map's top-``frac`` region).
* Faithfulness of each model's own maps (explained class = the dense model's most probable
  class of the image): deletion and insertion AUC (the class's log-odds as the top pixels are
  replaced by the mean image / inserted into a blurred image, each image's curve min-max
  normalised over its own span; deletion lower = more faithful, insertion higher) and a
  ROAD-style remove-and-debias score (pixels removed by noisy linear imputation so the removal
  itself leaks no shape; ``road = mean over fractions of s(LeRF) - s(MoRF)`` over the span of
  the image's deletion curve, higher = more faithful). The log-odds
  scale makes the scores invariant to the model's confidence (a temperature-scaled copy scores
  the same; see :mod:`medscalpel.audit.changes.faithfulness`).
* With ground-truth masks (the phantom): energy of the map inside the finding's mask and the
  pointing game, and the share of energy on the chest tube (a shortcut), per model.

Every per-image score is summarised as a mean with a bootstrap CI; dense-vs-compressed as the
mean paired difference with a CI and a bootstrap p-value. The maps come from
:func:`medscalpel.audit.changes.cams.class_cams` (Grad-CAM for ALL classes in one forward pass
per batch; re-exported here).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from medscalpel.audit.changes._util import NAN, boot_weights, fast_copy, logits_of, mean_with_ci
from medscalpel.audit.changes.cams import cam_grid, class_cams, map_source, n_outputs, served_cams
from medscalpel.audit.changes.faithfulness import (FLAT, MEASURES, ROAD_FRACTIONS,
                                                   deletion_insertion, flat_images, road_scores,
                                                   top_mask)
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.plotting import pyplot, save_figure
from medscalpel.progress import track
from medscalpel.validation import check_fraction, check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 2   # 2: faithfulness on the normalised log-odds scale (1: raw probabilities)

__all__ = ["SCHEMA", "ExplanationChange", "class_cams", "explanation_change", "plot_explanation",
           "served_cams", "similarity"]


# ----------------------------------------------------------------------------- similarity
def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, NAN)


def similarity(ref: np.ndarray, new: np.ndarray, frac: float) -> dict[str, np.ndarray]:
    """Per-map Spearman rho, top-``frac`` IoU and pointing agreement of two ``[M, H, W]``
    stacks (NaN where either map is empty)."""
    m = ref.shape[0]
    a, b = ref.reshape(m, -1).astype(np.float64), new.reshape(m, -1).astype(np.float64)
    empty = (a.max(1) <= 0) | (b.max(1) <= 0)
    ta, tb = top_mask(a, frac), top_mask(b, frac)
    inter, union = (ta & tb).sum(1), (ta | tb).sum(1)
    iou = inter / np.maximum(union, 1)
    point = ta[np.arange(m), b.argmax(1)].astype(np.float64)
    rho = _spearman_rows(a, b)
    for v in (iou, point, rho):
        v[empty] = NAN
    return {"spearman": rho, "iou": iou, "pointing": point}


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True)
class ExplanationChange:
    """Explanation similarity per class, faithfulness per model, ground-truth agreement.

    Each statistic is ``{"mean", "n", "ci", "p"}`` (mean over images with a bootstrap CI; for
    a ``delta`` the paired difference compressed - dense and its bootstrap p-value).

    Attributes:
        classes: per class name: ``spearman``, ``iou``, ``pointing`` (similarity) and, with
            masks, ``mask_energy`` / ``mask_pointing`` / ``tube_energy`` as
            ``{"ref": stat, "new": stat, "delta": stat}``.
        faithfulness: ``deletion``, ``insertion``, ``road`` as ``{"ref", "new", "delta"}``
            (plus ``empty_maps`` and ``flat_images`` counts per model); the scale they are on
            is ``meta["faithfulness_measure"]``.
    """

    classes: dict[str, dict[str, Any]]
    faithfulness: dict[str, dict[str, Any]]
    n_similarity: int
    n_faithfulness: int
    frac: float
    steps: int
    road_fractions: tuple[float, ...]
    n_boot: int
    seed: int
    confidence: float
    has_masks: bool
    schema_version: int = SCHEMA
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["road_fractions"] = list(self.road_fractions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExplanationChange":
        d = dict(d)
        d["road_fractions"] = tuple(d["road_fractions"])
        d["classes"] = _nan_from_null(d["classes"])
        d["faithfulness"] = _nan_from_null(d["faithfulness"])
        return cls(**d)

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for name, c in self.classes.items():
            row = {"class": name, "spearman": c["spearman"]["mean"], "top-k IoU": c["iou"]["mean"],
                   "pointing agree": c["pointing"]["mean"]}
            if "mask_energy" in c:
                row["in-mask dense"] = c["mask_energy"]["ref"]["mean"]
                row["in-mask compressed"] = c["mask_energy"]["new"]["mean"]
            if "tube_energy" in c:
                row["tube delta"] = c["tube_energy"]["delta"]["mean"]
            rows.append(row)
        return rows


def _nan_from_null(obj: Any) -> Any:
    """JSON null (a NaN written by ``write_json``) back to NaN inside the statistic dicts."""
    if isinstance(obj, dict):
        return {k: (NAN if v is None and k in ("mean", "p") else _nan_from_null(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [NAN if v is None else _nan_from_null(v) for v in obj]
    return obj


def _paired(a: np.ndarray, b: np.ndarray, w: np.ndarray, confidence: float) -> dict[str, Any]:
    return {"ref": mean_with_ci(a, w, confidence), "new": mean_with_ci(b, w, confidence),
            "delta": mean_with_ci(b - a, w, confidence)}


def _mask_scores(maps: np.ndarray, masks: Sequence[np.ndarray | None]) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
    """Energy inside each mask and pointing (peak inside), NaN where no mask / empty map."""
    n = maps.shape[0]
    energy, point = np.full(n, NAN), np.full(n, NAN)
    for i, m in enumerate(masks):
        if m is None or not np.asarray(m).any() or maps[i].max() <= 0:
            continue
        m = _fit(np.asarray(m, bool), maps.shape[1:])
        energy[i] = float((maps[i] * m).sum() / maps[i].sum())
        point[i] = float(m.reshape(-1)[maps[i].argmax()])
    return energy, point


def _fit(m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if m.shape == tuple(shape):
        return m
    t = torch.from_numpy(m.astype(np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy() > 0.5


def _dilate(m: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(m.astype(np.float32))[None, None]
    return F.max_pool2d(t, 3, stride=1, padding=1)[0, 0].numpy() > 0.5


# ----------------------------------------------------------------------------- API
def explanation_change(
    dense: nn.Module,
    compressed: nn.Module,
    images: torch.Tensor,
    *,
    class_names: Sequence[str],
    classes: Sequence[int] | None = None,
    masks: Sequence[dict[str, np.ndarray]] | None = None,
    frac: float = 0.1,
    n_faithfulness: int = 100,
    steps: int = 8,
    road_fractions: Sequence[float] = ROAD_FRACTIONS,
    faithfulness_measure: str = "normalised",
    multiclass: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    batch_size: int = 32,
    progress: bool | None = None,
) -> ExplanationChange:
    """Dense vs compressed explanations on the same images.

    Args:
        dense, compressed: two MedClassifiers with the same classes (left unchanged).
        images: normalised input ``[N, C, H, W]``.
        class_names: names of the K classes.
        classes: class indices to compare (default: all).
        masks: per image a dict of ground-truth masks (the phantom's ``masks(i)``: finding
            name -> mask, ``chest_tube``) for the agreement scores; None: skipped.
        frac: top-pixel share of the IoU and the pointing region.
        n_faithfulness: images (the first ones) for deletion / insertion / ROAD.
        steps: deletion / insertion steps.
        road_fractions: removed fractions of the ROAD score.
        faithfulness_measure: ``normalised`` (log-odds, per image between the clean and the
            fully perturbed image: invariant to the model's confidence) or ``probability``
            (raw RISE probability AUCs: confidence-dependent, for comparison only).

    Raises:
        ModelError: the models explain different numbers of classes.
        DataError: masks do not match the images.
    """
    check_fraction(frac, "frac", "explanation_change")
    check_range(n_faithfulness, "n_faithfulness", "explanation_change", 0, integer=True)
    check_range(steps, "steps", "explanation_change", 2, 100, integer=True)
    check_in(faithfulness_measure, "faithfulness_measure", "explanation_change", MEASURES)
    cls = _checked_classes(dense, compressed, class_names, classes)
    n = int(images.shape[0])
    if masks is not None and len(masks) != n:
        raise DataError(f"explanation_change: {n} images but {len(masks)} mask sets.")
    w = boot_weights(n, n_boot, seed + 4)
    nf = min(n, n_faithfulness)
    stats, empty, keep_ref, keep_new = _map_statistics(
        dense, compressed, images, cls, class_names, masks, frac, nf, batch_size, progress)
    per_class = {class_names[c]: _class_row(stats[c], empty[c], n, w, confidence,
                                            masks is not None) for c in cls}
    grid = {"ref": cam_grid(dense, images[:1]), "new": cam_grid(compressed, images[:1])}
    pre = None
    if nf and keep_ref:
        pre = (np.concatenate(keep_ref), np.concatenate(keep_new), cls)
    faith = _faithfulness(dense, compressed, images[:nf], steps, tuple(road_fractions),
                          multiclass, seed, confidence, n_boot, batch_size, pre,
                          faithfulness_measure)
    meta = _explanation_meta(dense, compressed, images, grid, [class_names[c] for c in cls],
                             faithfulness_measure)
    return ExplanationChange(
        classes=per_class, faithfulness=faith, n_similarity=n,
        n_faithfulness=nf, frac=float(frac), steps=steps,
        road_fractions=tuple(float(f) for f in road_fractions), n_boot=n_boot, seed=seed,
        confidence=confidence, has_masks=masks is not None, meta=meta)


def _checked_classes(dense: nn.Module, compressed: nn.Module, class_names: Sequence[str],
                     classes: Sequence[int] | None) -> list[int]:
    """The class indices to compare, after checking that both models can be explained and
    agree with ``class_names``.

    Raises:
        ModelError: a model without gradients or CAMs, or different numbers of outputs.
        ConfigError: a class index out of range.
    """
    for m in (dense, compressed):
        if not getattr(m, "supports_gradients", True) and not served_cams(m):
            why = m.cam_refusal() if hasattr(m, "cam_refusal") else "no gradients"
            raise ModelError(f"explanation_change: {why}.")
    k_ref, k_new = n_outputs(dense), n_outputs(compressed)
    if k_ref != k_new or k_ref != len(class_names):
        raise ModelError(f"explanation_change: the dense model has {k_ref} outputs, the "
                         f"compressed {k_new}, the data {len(class_names)} classes; they must "
                         "agree.")
    cls = list(range(k_ref)) if classes is None else [int(c) for c in classes]
    if not cls or any(not 0 <= c < k_ref for c in cls):
        raise ConfigError(f"The 'classes' parameter of explanation_change must be indices in "
                          f"[0, {k_ref - 1}]. Got {cls} instead.")
    return cls


def _map_statistics(dense: nn.Module, compressed: nn.Module, images: torch.Tensor,
                    cls: list[int], class_names: Sequence[str],
                    masks: Sequence[dict[str, np.ndarray]] | None, frac: float, nf: int,
                    batch_size: int, progress: bool | None
                    ) -> tuple[dict[int, dict[str, list[np.ndarray]]], dict[int, list[int]],
                               list[np.ndarray], list[np.ndarray]]:
    """Both models' Grad-CAMs batch by batch: per class the per-image similarity (and, with
    masks, ground-truth agreement) scores, the counts of empty maps ``[dense, compressed]``,
    and the maps of the first ``nf`` images (kept for the faithfulness scores)."""
    stats: dict[int, dict[str, list[np.ndarray]]] = {c: {} for c in cls}
    keep_ref: list[np.ndarray] = []
    keep_new: list[np.ndarray] = []
    empty = {c: [0, 0] for c in cls}
    n = int(images.shape[0])
    for s in track(list(range(0, n, batch_size)), "explanation maps", progress=progress):
        x = images[s:s + batch_size]
        a, b = class_cams(dense, x, cls, batch_size), class_cams(compressed, x, cls, batch_size)
        if s < nf:     # the faithfulness images are the first ones: their maps are reused
            keep_ref.append(a[:nf - s])
            keep_new.append(b[:nf - s])
        for j, c in enumerate(cls):
            st = stats[c]
            empty[c][0] += int((a[:, j].reshape(len(x), -1).max(1) <= 0).sum())
            empty[c][1] += int((b[:, j].reshape(len(x), -1).max(1) <= 0).sum())
            for key, v in similarity(a[:, j], b[:, j], frac).items():
                st.setdefault(key, []).append(v)
            if masks is not None:
                _add_mask_scores(st, a[:, j], b[:, j], masks[s:s + len(x)], class_names[c])
    return stats, empty, keep_ref, keep_new


def _add_mask_scores(st: dict[str, list[np.ndarray]], a: np.ndarray, b: np.ndarray,
                     masks: Sequence[dict[str, np.ndarray]], name: str) -> None:
    """Append one batch's in-mask energy and pointing of both models' maps ``a`` / ``b`` of
    class ``name`` (its finding mask, and the dilated chest-tube mask) to ``st``."""
    mk = [m.get(name) for m in masks]
    tube = [_dilate(m["chest_tube"]) if "chest_tube" in m else None for m in masks]
    for tag, ms in (("mask", mk), ("tube", tube)):
        ea, pa = _mask_scores(a, ms)
        eb, pb = _mask_scores(b, ms)
        st.setdefault(f"{tag}_energy_ref", []).append(ea)
        st.setdefault(f"{tag}_energy_new", []).append(eb)
        st.setdefault(f"{tag}_pointing_ref", []).append(pa)
        st.setdefault(f"{tag}_pointing_new", []).append(pb)


def _class_row(stats: dict[str, list[np.ndarray]], empty: list[int], n: int, w: np.ndarray,
               confidence: float, has_masks: bool) -> dict[str, Any]:
    """One class's summary: similarity means with CIs, paired ground-truth agreement (with
    masks), empty-map counts, and why nothing was scored when no pair of maps was non-empty."""
    st = {k: np.concatenate(v) for k, v in stats.items()}
    row: dict[str, Any] = {k: mean_with_ci(st[k], w, confidence)
                           for k in ("spearman", "iou", "pointing")}
    if has_masks:
        row["mask_energy"] = _paired(st["mask_energy_ref"], st["mask_energy_new"], w, confidence)
        row["mask_pointing"] = _paired(st["mask_pointing_ref"], st["mask_pointing_new"], w,
                                       confidence)
        row["tube_energy"] = _paired(st["tube_energy_ref"], st["tube_energy_new"], w, confidence)
    row["empty_maps"] = {"ref": empty[0], "new": empty[1]}
    if row["spearman"]["n"] == 0:
        row["reason"] = (f"no image where both Grad-CAM maps are non-empty (empty: dense "
                         f"{empty[0]}/{n}, compressed {empty[1]}/{n}); Grad-CAM is "
                         "ReLU(sum_c weight_c A_c), all zero where the weighted evidence "
                         "for the class is negative everywhere (the class logit is low)")
    return row


def _explanation_meta(dense: nn.Module, compressed: nn.Module, images: torch.Tensor,
                      grid: dict[str, list[int]], names: list[str],
                      faithfulness_measure: str) -> dict[str, Any]:
    """The result's ``meta``: method, classes, scales, map sources and, when a CAM layer is
    coarser than 4x4, a note (also logged) that the similarity compares a few blobs."""
    meta = {"method": "gradcam", "classes": names,
            "explained_class_for_faithfulness": "the dense model's most probable class",
            "faithfulness_measure": _MEASURE_NOTE[faithfulness_measure],
            "cam_grid": grid,
            "map_source": {"ref": map_source(dense), "new": map_source(compressed)},
            "empty_maps": "a Grad-CAM map that is zero everywhere is excluded (NaN) from "
                          "every score; counts per class in classes[...]['empty_maps']"}
    coarse = [k for k, g in grid.items() if min(g) < 4]
    if coarse:
        meta["cam_note"] = (
            "coarse CAM layer: " + ", ".join(f"{'dense' if k == 'ref' else 'compressed'} "
                                              f"{grid[k][0]}x{grid[k][1]}" for k in coarse)
            + f" at {int(images.shape[-2])}x{int(images.shape[-1])} px input; the maps are "
              "bilinear upsamplings of so few cells that rank correlation and top-k IoU "
              "compare a handful of blobs, not anatomy")
        logger.warning("explanation_change: %s", meta["cam_note"])
    return meta


_MEASURE_NOTE = {
    "normalised": "normalised: the explained class's log-odds (sigmoid: logit; softmax: margin "
                  "over the best other class), each image's curve min-max normalised over its "
                  "own span (ROAD: divided by the span of the image's deletion curve); "
                  "invariant to a scale / shift of the logits; an image whose span is <= "
                  f"{FLAT:g} x the median span is 'flat' and not scored",
    "probability": "probability: raw class probability AUCs (RISE); NOT comparable between "
                   "models of different confidence (a logit-scaled copy scores differently)",
}


def _faithfulness(dense, compressed, x, steps, fractions, multiclass, seed, confidence, n_boot,
                  batch_size, pre=None, measure="normalised") -> dict[str, Any]:
    """Deletion / insertion / ROAD of each model's own map of the explained class. Images whose
    map is empty (all zero) get NaN for that model: a ranking of equal pixels is no
    explanation, so it is not scored; so do (normalised measure) images whose clean and fully
    perturbed outputs do not differ (:func:`flat_images`). ``pre``: (dense maps, compressed
    maps, classes) already computed for these images."""
    m = int(x.shape[0])
    if m == 0:
        return {}
    z = logits_of(dense, x, batch_size)
    target = z.argmax(1)
    w = boot_weights(m, n_boot, seed + 5)
    scores: dict[str, dict[str, np.ndarray]] = {"deletion": {}, "insertion": {}, "road": {}}
    empty: dict[str, int] = {}
    flat: dict[str, dict[str, int]] = {"deletion": {}, "insertion": {}, "road": {}}
    fast = {"ref": fast_copy(dense), "new": fast_copy(compressed)}
    for key, model in (("ref", dense), ("new", compressed)):
        if pre is not None and set(int(t) for t in target) <= set(pre[2]):
            pos = {c: j for j, c in enumerate(pre[2])}
            cams = pre[0] if key == "ref" else pre[1]
            maps = np.stack([cams[i, pos[int(t)]] for i, t in enumerate(target)])
        else:
            maps = _target_maps(model, x, target, batch_size)
        blank = maps.reshape(m, -1).max(1) <= 0
        empty[key] = int(blank.sum())
        clean = logits_of(fast[key], x, batch_size)
        d, ins, cd, ci_ = deletion_insertion(fast[key], x, maps, target, steps=steps,
                                             multiclass=multiclass, batch_size=batch_size,
                                             clean_logits=clean, measure=measure,
                                             return_curves=True)
        ranges = cd.max(1) - cd.min(1)
        r = road_scores(fast[key], x, maps, target, fractions=fractions,
                        multiclass=multiclass, seed=seed, batch_size=batch_size,
                        measure=measure, ranges=ranges)
        ends = {"deletion": ranges, "insertion": ci_.max(1) - ci_.min(1), "road": ranges}
        for name, v in (("deletion", d), ("insertion", ins), ("road", r)):
            v = v.astype(np.float64)
            v[blank] = NAN
            scores[name][key] = v
            flat[name][key] = (int((flat_images(ends[name]) & ~blank).sum())
                               if measure == "normalised" else 0)
    out = {k: _paired(v["ref"], v["new"], w, confidence) for k, v in scores.items()}
    for k in out:
        out[k]["empty_maps"] = dict(empty)
        out[k]["flat_images"] = dict(flat[k])
        if out[k]["delta"]["n"] == 0:
            out[k]["reason"] = (f"every explained image has an empty Grad-CAM map in one model "
                                f"(dense {empty['ref']}/{m}, compressed {empty['new']}/{m}) "
                                f"or a flat output (dense {flat[k]['ref']}/{m}, compressed "
                                f"{flat[k]['new']}/{m}); nothing to delete or insert in order")
    return out


def _target_maps(model: nn.Module, x: torch.Tensor, target: np.ndarray, batch_size: int
                 ) -> np.ndarray:
    """Each image's map for its own target class (all target classes in one pass)."""
    uniq = sorted(set(int(t) for t in target))
    cams = class_cams(model, x, uniq, batch_size)
    pos = {c: j for j, c in enumerate(uniq)}
    return np.stack([cams[i, pos[int(t)]] for i, t in enumerate(target)])


# ----------------------------------------------------------------------------- figure
def plot_explanation(res: ExplanationChange, path: str | os.PathLike) -> Path:
    """Left: per-class similarity (Spearman, IoU, pointing) with CIs. Right: faithfulness of
    both models (deletion, insertion, ROAD) with CIs."""

    plt = pyplot()
    names = list(res.classes)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 0.3 * len(names) + 2.5),
                                 gridspec_kw={"width_ratios": [2, 1]})
    y = np.arange(len(names))
    for off, key, color in ((-0.25, "spearman", "tab:blue"), (0.0, "iou", "tab:orange"),
                            (0.25, "pointing", "tab:green")):
        m = np.array([res.classes[c][key]["mean"] for c in names], float)
        lo = np.array([res.classes[c][key]["ci"][0] for c in names], float)
        hi = np.array([res.classes[c][key]["ci"][1] for c in names], float)
        err = np.vstack([np.nan_to_num(m - lo), np.nan_to_num(hi - m)])
        ax.errorbar(m, y + off, xerr=err, fmt="o", ms=3, color=color, label=key, lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([n[:18] for n in names], fontsize=7)
    ax.set_xlim(-0.2, 1.05)
    ax.set_xlabel("dense vs compressed Grad-CAM (mean, 95% CI)", fontsize=8)
    ax.legend(fontsize=7)
    keys = list(res.faithfulness)
    for i, k in enumerate(keys):
        for off, who, color in ((-0.15, "ref", "tab:blue"), (0.15, "new", "tab:red")):
            s = res.faithfulness[k][who]
            lo, hi = s["ci"]
            bx.errorbar([i + off], [s["mean"]], yerr=[[np.nan_to_num(s["mean"] - (lo or 0))],
                                                      [np.nan_to_num((hi or 0) - s["mean"])]],
                        fmt="o", color=color, ms=4,
                        label=("dense" if who == "ref" else "compressed") if i == 0 else None)
    bx.set_xticks(range(len(keys)))
    bx.set_xticklabels(keys, fontsize=8)
    bx.set_title(f"faithfulness ({res.n_faithfulness} images)", fontsize=8)
    if keys:
        bx.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
