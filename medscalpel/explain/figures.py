"""Figures of the explain stage (matplotlib, Agg backend, PNG).

* :func:`cam_overlay_figure`: CAM over the image with the lung-zone grid and the location phrase;
* :func:`channel_bar_figure`: the top channels' contributions to one class (with what else each
  channel pushes / pulls);
* :func:`polarity_table_figure`: seed 000's category table next to its null-model expectations;
* :func:`comparison_figure`: teacher and student maps side by side (seed 004).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from medscalpel.errors import DataError
from medscalpel.explain.polarity import CATEGORIES
from medscalpel.explain.regions import ZONE_NAMES, describe_location
from medscalpel.plotting import pyplot as _plt  # noqa: E402
from medscalpel.plotting import save_figure as _save  # noqa: E402


def _grey(image: Any) -> np.ndarray:
    a = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image,
                   dtype=np.float64)
    if a.ndim == 3:
        a = a.mean(0) if a.shape[0] in (1, 3) else a.mean(-1)
    if a.ndim != 2:
        raise DataError(f"Figures need a grey image [H, W]; got shape {a.shape}.")
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(a)


def _draw_zones(ax, zones, shape) -> None:
    z = zones.resized(shape)
    ax.contour(z.label_map, levels=np.arange(len(ZONE_NAMES) - 1) + 0.5, colors="white",
               linewidths=0.7, alpha=0.9)
    short = {"right_upper": "RU", "right_middle": "RM", "right_lower": "RL", "left_upper": "LU",
             "left_middle": "LM", "left_lower": "LL", "cardiac": "C", "mediastinal": "M"}

    for name, tag in short.items():
        m = z.mask(name)
        if m.sum() >= 4:
            r, c = ndi.center_of_mass(m)
            ax.text(c, r, tag, color="white", fontsize=7, ha="center", va="center",
                    alpha=0.9, fontweight="bold")


def cam_overlay_figure(images: Any, cams: Any, path: str | os.PathLike, zones: Any = None,
                       max_images: int = 8, alpha: float = 0.45, title: str | None = None) -> Path:
    """Image, CAM overlay and (when ``zones`` is given) the lung-zone grid and location phrase.

    Args:
        images: ``[N, H, W]`` or ``[N, C, H, W]`` images (model input or raw; rescaled for display).
        cams: a :class:`~medscalpel.explain.cams.CamResult`.
        zones: optional list of :class:`~medscalpel.explain.regions.LungZones` (one per image).
        max_images: at most this many images (the first ones).
    """

    plt = _plt()
    n = min(max_images, cams.n)
    if len(images) < n:
        raise DataError(f"cam_overlay_figure: {cams.n} CAMs but {len(images)} images.")
    if zones is not None and len(zones) < n:
        raise DataError(f"cam_overlay_figure: {cams.n} CAMs but {len(zones)} zone maps.")
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n, 5.0), squeeze=False)
    for i in range(n):
        img = _grey(images[i])
        cam = cams.maps[i]
        if img.shape != cam.shape:
            img = torch.nn.functional.interpolate(torch.from_numpy(img)[None, None].float(),
                                                  size=cam.shape, mode="bilinear",
                                                  align_corners=False)[0, 0].numpy()
        label = cams.class_names[cams.targets[i]]
        ident = cams.ids[i] if cams.ids else str(i)
        axes[0, i].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(f"{ident}\n{label}", fontsize=7)
        axes[1, i].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[1, i].imshow(cam, cmap="jet", alpha=alpha, vmin=0, vmax=1)
        if zones is not None:
            _draw_zones(axes[1, i], zones[i], cam.shape)
            where = describe_location(cam, zones[i].resized(cam.shape))
            axes[1, i].set_title(where, fontsize=7)
        for a in axes[:, i]:
            a.set_xticks([])
            a.set_yticks([])
    axes[0, 0].set_ylabel("image  (patient's R = image left)", fontsize=7)
    axes[1, 0].set_ylabel(cams.method, fontsize=8)
    fig.suptitle(title or f"{cams.method} ({cams.layer})", fontsize=9)
    return _save(fig, path)


def channel_bar_figure(table: Any, path: str | os.PathLike, max_others: int = 3) -> Path:
    """Horizontal bars of the mean contributions in a
    :class:`~medscalpel.explain.channels.TopChannels` table, annotated with the other classes
    each channel pushes (+W) or pulls (-W)."""
    plt = _plt()
    rows = list(table.rows)
    if not rows:
        raise DataError("channel_bar_figure: the table has no rows.")
    vals = np.array([r.mean_contribution for r in rows])
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(rows) + 1.3))
    y = np.arange(len(rows))[::-1]
    ax.barh(y, vals, color=["#c0392b" if v > 0 else "#2471a3" for v in vals])
    ax.set_yticks(y)
    ax.set_yticklabels([f"ch {r.channel}  (w={r.weight:+.3f}, top in {r.top_fraction:.0%})"
                        for r in rows], fontsize=7)
    ax.axvline(0, color="k", linewidth=0.6)
    span = float(np.abs(vals).max()) or 1.0
    for yi, r, v in zip(y, rows, vals):
        push = ", ".join(f"+{c}" for c, _ in r.pushes[:max_others])
        pull = ", ".join(f"-{c}" for c, _ in r.pulls[:max_others])
        note = "; ".join(s for s in (push, pull) if s)
        if note:
            ax.text(v + (0.02 if v >= 0 else -0.02) * span, yi, note, fontsize=6,
                    va="center", ha="left" if v >= 0 else "right", color="#333333")
    ax.set_xlim(min(0, vals.min()) - 0.6 * span, max(0, vals.max()) + 0.6 * span)
    ax.set_xlabel(f"mean contribution W[k,c]·f_c(x) to the '{table.class_name}' logit")
    ax.set_title(f"Top channels of {table.class_name} over {table.n_images} image(s) "
                 f"({table.rows_desc}); mean logit - bias = {table.mean_logit_minus_bias:+.3f}",
                 fontsize=8)
    return _save(fig, path)


def polarity_table_figure(result: Any, path: str | os.PathLike, level: str = "channels") -> Path:
    """Seed 000's category table (observed) with each null model's expected counts, the share of
    perfect + legitimate pairs and its empirical p-value."""

    plt = _plt()
    df = result.table(level)
    cols = list(df.columns)
    cells = [[f"{df.loc[c, col]:.1f}" if col != "observed" else f"{int(df.loc[c, col])}"
              for col in cols] for c in CATEGORIES]
    excl = ["exclusive share"]
    pvals = ["p (obs >= null)"]
    for col in cols:
        if col == "observed":
            obs = result.counts(level)
            tot = sum(obs[c] for c in CATEGORIES[:4])
            excl.append(f"{(obs['perfect'] + obs['legitimate']) / tot:.2f}" if tot else "n/a")
            pvals.append("")
        else:
            s = result.nulls[(col.removeprefix("null_"), level)]
            excl.append(f"{s.exclusive_fraction_null:.2f}")
            pvals.append(f"{s.p_value:.3f}")
    labels = {"perfect": "perfect (J=0)", "legitimate": "legitimate (0<J<0.1)",
              "mixed": "mixed (0.1<=J<0.3)", "conflict": "conflict (J>=0.3)",
              "undefined": "undefined"}
    lo, hi = result.bounds
    labels.update({"legitimate": f"legitimate (0<J<{lo:g})",
                   "mixed": f"mixed ({lo:g}<=J<{hi:g})", "conflict": f"conflict (J>={hi:g})"})
    body = [[labels[c], *cells[i]] for i, c in enumerate(CATEGORIES)] + [excl, pvals]
    fig, ax = plt.subplots(figsize=(1.6 + 1.45 * len(cols), 0.34 * len(body) + 1.2))
    ax.axis("off")
    tab = ax.table(cellText=body, colLabels=["category", *cols], loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1, 1.3)
    tab.auto_set_column_width(list(range(len(cols) + 1)))
    rule = ", ".join(f"{k}={v}" for k, v in result.rule.items())
    ax.set_title(f"Polarized {level} ({rule}); null models: {result.n_null} draws each",
                 fontsize=8)
    return _save(fig, path)


def comparison_figure(comparison: Any, images: Any, path: str | os.PathLike, k: int | None = None,
                      max_images: int = 6) -> Path:
    """Teacher and student maps of one class side by side, with per-image Pearson / IoU."""
    plt = _plt()
    k = comparison.classes[0] if k is None else int(k)
    if k not in comparison.teacher:
        raise DataError(f"comparison_figure: class {k} was not compared; compared classes: "
                        f"{list(comparison.classes)}.")
    ci = comparison.classes.index(k)
    t, s = comparison.teacher[k], comparison.student[k]
    n = min(max_images, t.n)
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n, 5.0), squeeze=False)
    for i in range(n):
        img = _grey(images[i])
        for row, (res, who) in enumerate(((t, "teacher"), (s, "student"))):
            cam = res.maps[i]
            base = img
            if base.shape != cam.shape:
                base = torch.nn.functional.interpolate(
                    torch.from_numpy(img)[None, None].float(), size=cam.shape, mode="bilinear",
                    align_corners=False)[0, 0].numpy()
            axes[row, i].imshow(base, cmap="gray", vmin=0, vmax=1)
            axes[row, i].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
            if i == 0:
                axes[row, i].set_ylabel(f"{who}\n{comparison.meta.get(who, '')}", fontsize=8)
        axes[0, i].set_title(f"r={comparison.pearson[ci, i]:.2f}  "
                             f"IoU={comparison.iou[ci, i]:.2f}", fontsize=7)
    fig.suptitle(f"{comparison.method}: {comparison.class_names[k]} (top "
                 f"{comparison.frac:.0%} IoU)", fontsize=9)
    return _save(fig, path)
