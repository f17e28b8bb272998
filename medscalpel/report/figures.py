"""Figures drawn by the reports (matplotlib, Agg backend, PNG bytes or files).

Figures that another stage already wrote as PNG (Jaccard heatmaps, forgettability curves, the
PIE gallery, CAM overlays, polarity tables) are embedded as they are; this module draws only
what exists as JSON alone:

* :func:`pareto_figure`: compressed models as points (parameters ratio and latency vs macro
  AUROC with its CI), the Pareto front joined;
* :func:`metrics_figure`: per-class AUROC with bootstrap CIs (forest plot);
* :func:`forgettability_figure`: median relative AP change per class vs sparsity, when the audit
  stage's own curves are absent;
* :func:`clinical_overlay_png`: one image with the CAM of each reported finding and the lung-zone
  outlines (radiological convention: the patient's right is on the image's left).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscalpel.errors import DataError
from medscalpel.layout import artifact
from medscalpel.plotting import pyplot
from medscalpel.report.html import figure_png, is_number
from medscalpel.runs import atomic_path


_plt = pyplot  # the headless pyplot of medscalpel.plotting


def _out(png: bytes, path: str | os.PathLike | None) -> bytes:
    if path is not None:
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(png)
    return png


def _short(name: str, n: int = 22) -> str:
    name = str(name)
    return name if len(name) <= n else name[: n - 1] + "\u2026"


# ----------------------------------------------------------------------------- Pareto
def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points when ``x`` is minimised and ``y`` maximised,
    ordered by ``x``. Points with a non-finite coordinate are ignored.

    Example:
        >>> pareto_front([1.0, 0.5, 0.5, 0.2], [0.90, 0.88, 0.80, 0.70])
        [3, 1, 0]
    """
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    if xa.shape != ya.shape:
        raise DataError(f"pareto_front: {xa.size} x values but {ya.size} y values.")
    ok = np.flatnonzero(np.isfinite(xa) & np.isfinite(ya))
    order = ok[np.lexsort((-ya[ok], xa[ok]))]  # by x, best y first among equal x
    front, best = [], -np.inf
    for i in order:
        if ya[i] > best:
            front.append(int(i))
            best = ya[i]
    return front


def _compress_points(rows: list[dict[str, Any]], dense: dict[str, Any] | None
                     ) -> list[dict[str, Any]]:
    pts = []
    if dense:
        pts.append({**dense, "method": dense.get("method") or "dense", "params_ratio": 1.0,
                    "latency_ratio": 1.0})
    dense_lat = (dense or {}).get("latency_ms")
    for r in rows:
        if not is_number(r.get("macro_auroc")):
            continue
        lat_ratio = None
        if is_number(r.get("speedup")) and r["speedup"] > 0:
            lat_ratio = 1.0 / r["speedup"]
        elif is_number(r.get("latency_ms")) and is_number(dense_lat) and dense_lat > 0:
            lat_ratio = r["latency_ms"] / dense_lat
        pts.append({**r, "latency_ratio": lat_ratio})
    return pts


def pareto_figure(rows: list[dict[str, Any]], dense: dict[str, Any] | None = None,
                  path: str | os.PathLike | None = None) -> bytes:
    """Macro AUROC (with its CI) against the parameters ratio and the latency ratio
    (compressed / dense) of every row of ``compress.json``; the Pareto front (fewer parameters or
    less latency, higher AUROC) is joined by a line. Returns the PNG bytes (and writes ``path``).

    Raises:
        DataError: no row has a macro AUROC.
    """
    pts = _compress_points(rows, dense)
    if not pts:
        raise DataError(f"pareto_figure: no row of {artifact('compress').filename} has a "
                        "macro_auroc to plot.")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0))
    panels = (("params_ratio", "parameters (compressed / dense)"),
              ("latency_ratio", "latency (compressed / dense)"))
    cmap = plt.get_cmap("tab10")
    methods = sorted({str(p["method"]) for p in pts}, key=lambda m: (m != "dense", m))
    colour = {m: cmap(i % 10) for i, m in enumerate(methods)}
    for ax, (key, label) in zip(axes, panels):
        have = [p for p in pts if is_number(p.get(key))]
        if not have:
            ax.text(0.5, 0.5, f"no {key} in {artifact('compress').filename}", ha="center",
                    va="center", transform=ax.transAxes, color="#777777")
            ax.set_axis_off()
            continue
        xs = [p[key] for p in have]
        ys = [p["macro_auroc"] for p in have]
        for p, x, y in zip(have, xs, ys):
            c = p.get("macro_auroc_ci")
            yerr = None
            if isinstance(c, (list, tuple)) and len(c) == 2 and all(is_number(v) for v in c):
                yerr = [[max(0.0, y - c[0])], [max(0.0, c[1] - y)]]
            m = str(p["method"])
            ax.errorbar([x], [y], yerr=yerr, fmt="*" if m == "dense" else "o",
                        ms=11 if m == "dense" else 7, color=colour[m], capsize=3, lw=1,
                        label=_short(m))
        front = pareto_front(xs, ys)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="#555555", lw=1,
                zorder=0, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("macro AUROC (95% CI)")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Compression: size and latency against macro AUROC", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _out(figure_png(fig), path)


# ----------------------------------------------------------------------------- metrics
def metrics_figure(metrics: dict[str, Any], path: str | os.PathLike | None = None,
                   metric: str = "auroc") -> bytes:
    """Forest plot of a per-class metric with its CI from ``EvalResult.to_dict()``; the macro
    value is the dashed line."""
    classes = [c for c in metrics.get("classes", []) if isinstance(c, dict)]
    if not classes:
        raise DataError("metrics_figure: the metrics have no 'classes'.")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 0.32 * len(classes) + 1.3))
    ys = np.arange(len(classes))[::-1]
    for y, c in zip(ys, classes):
        v = c.get(metric)
        if not is_number(v):
            ax.text(0.5, y, "n/a", va="center", ha="center", fontsize=7, color="#999999")
            continue
        ci = c.get(f"{metric}_ci")
        xerr = None
        if isinstance(ci, list) and len(ci) == 2 and all(is_number(t) for t in ci):
            xerr = [[max(0.0, v - ci[0])], [max(0.0, ci[1] - v)]]
        ax.errorbar([v], [y], xerr=xerr, fmt="o", color="#1f4e79", capsize=3, ms=5)
    macro = (metrics.get("macro") or {}).get(metric)
    if is_number(macro):
        ax.axvline(macro, ls="--", color="#c0392b", lw=1, label=f"macro {macro:.3f}")
        ax.legend(fontsize=8, loc="lower left")
    ax.axvline(0.5, color="#999999", lw=0.6)
    ax.set_yticks(ys, [_short(c.get("name", "?"), 28) for c in classes], fontsize=8)
    ax.set_xlim(0.0 if metric != "auroc" else 0.3, 1.0)
    ax.set_xlabel(f"{metric.upper()} (95% bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _out(figure_png(fig), path)


def forgettability_figure(fg: dict[str, Any], path: str | os.PathLike | None = None) -> bytes:
    """Median relative AP change of every class against the compression level (from
    ``forgettability.json``), with the drop threshold."""
    levels = fg.get("levels")
    curves = fg.get("median_rel_ap")
    names = fg.get("class_names") or []
    if not levels or not curves:
        raise DataError(f"forgettability_figure: {artifact('forgettability').filename} lacks "
                        "levels / median_rel_ap.")
    arr = np.array([[np.nan if v is None else v for v in row] for row in curves], float)
    if arr.shape[0] != len(levels):  # stored [L, K] (levels first) by the audit stage
        arr = arr.T
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    cmap = plt.get_cmap("viridis")
    k = arr.shape[1]
    for j in range(k):
        ax.plot(levels, arr[:, j], marker="o", ms=3, lw=1.2, color=cmap(j / max(1, k - 1)),
                label=_short(names[j]) if j < len(names) else f"class{j}")
    thr = fg.get("drop_threshold")
    if is_number(thr):
        ax.axhline(-thr, ls="--", color="#c0392b", lw=1, label=f"drop threshold -{thr:g}")
    ax.axhline(0, color="#555555", lw=0.6)
    ax.set_xlabel(fg.get("level_name") or "level")
    ax.set_ylabel("median relative change in AP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    return _out(figure_png(fig), path)


# ----------------------------------------------------------------------------- clinical
def _grey01(image: Any) -> np.ndarray:
    a = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image,
                   dtype=np.float64)
    if a.ndim == 3:
        a = a.mean(0) if a.shape[0] in (1, 3) else a.mean(-1)
    if a.ndim != 2:
        raise DataError(f"clinical_overlay_png needs a grey image [H, W]; got shape {a.shape}.")
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(a)


def clinical_overlay_png(image: Any, cams: Sequence[np.ndarray], titles: Sequence[str],
                         zones: Any = None, alpha: float = 0.45,
                         path: str | os.PathLike | None = None) -> bytes:
    """The image, then one CAM overlay per finding, with lung-zone outlines when ``zones`` (a
    :class:`~medscalpel.explain.regions.LungZones`) is given. "R" marks the patient's right
    (the image's left)."""
    img = _grey01(image)
    if len(cams) != len(titles):
        raise DataError(f"clinical_overlay_png: {len(cams)} maps but {len(titles)} titles.")
    plt = _plt()
    n = 1 + len(cams)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9), squeeze=False)
    axes = axes[0]
    z = None
    if zones is not None:
        z = zones.resized(img.shape)
    for i, ax in enumerate(axes):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        if i > 0:
            cam = np.asarray(cams[i - 1], float)
            if cam.shape != img.shape:
                cam = torch.nn.functional.interpolate(
                    torch.from_numpy(cam)[None, None].float(), size=img.shape, mode="bilinear",
                    align_corners=False)[0, 0].numpy()
            ax.imshow(cam, cmap="jet", alpha=alpha, vmin=0, vmax=1)
            ax.set_title("\n".join(_short(t, 34) for t in str(titles[i - 1]).split("\n")[:2]),
                         fontsize=8)
        else:
            ax.set_title("image", fontsize=8)
        if z is not None:
            ax.contour(z.label_map, levels=np.arange(8) + 0.5, colors="white", linewidths=0.5,
                       alpha=0.7)
        h, w = img.shape
        ax.text(0.03 * w, 0.06 * h, "R", color="yellow", fontsize=9, fontweight="bold",
                va="top", ha="left")
        ax.text(0.97 * w, 0.06 * h, "L", color="yellow", fontsize=9, fontweight="bold",
                va="top", ha="right")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _out(figure_png(fig), path)
