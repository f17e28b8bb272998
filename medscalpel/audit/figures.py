"""Figures of the audit stage (matplotlib, Agg backend, PNG).

Every function takes a result object (or arrays), writes one PNG atomically and returns its path;
the numbers behind each figure are in the result's JSON.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import cm, colors
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

if TYPE_CHECKING:  # pragma: no cover  (annotations only: the result modules call these plots)
    from medscalpel.audit.fcd import FCDResult
    from medscalpel.audit.forgettability import ForgettabilityResult
    from medscalpel.audit.pies import PieResult
    from medscalpel.audit.stats import Correlation


from medscalpel.plotting import pyplot as _plt  # noqa: E402
from medscalpel.plotting import save_figure as _save  # noqa: E402


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


# ----------------------------------------------------------------------------- curves
def plot_forgettability_curves(res: "ForgettabilityResult", path: str | os.PathLike,
                               metric: str = "ap") -> Path:
    """Small multiples: one panel per class, median relative change (line) with IQR band,
    the -drop_threshold line and the first-drop level marked."""
    plt = _plt()
    med = getattr(res, f"median_rel_{metric}")
    lo, hi = getattr(res, f"q25_rel_{metric}"), getattr(res, f"q75_rel_{metric}")
    k = len(res.class_names)
    cols = min(5, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), sharex=True,
                             sharey=True, squeeze=False)
    x = res.levels
    finite = np.concatenate([v[np.isfinite(v)] for v in (lo, hi, med)] + [np.array([0.0])])
    ymin = max(-1.05, float(finite.min()) - 0.05)
    ymax = min(1.0, float(finite.max()) + 0.05)
    for i, name in enumerate(res.class_names):
        ax = axes[i // cols][i % cols]
        ax.fill_between(x, lo[:, i], hi[:, i], color="tab:blue", alpha=0.25, lw=0)
        ax.plot(x, med[:, i], color="tab:blue", lw=1.8)
        ax.axhline(-res.drop_threshold, color="grey", ls="--", lw=0.8)
        ax.axhline(0, color="black", lw=0.5)
        if metric == "ap" and np.isfinite(res.first_drop[i]):
            ax.axvline(res.first_drop[i], color="tab:red", ls=":", lw=1)
        ax.set_title(f"{_short(name)}\np={res.prevalence[i]:.3g}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(ymin, ymax)
    for j in range(k, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.supxlabel(f"{res.level_name} ({res.method or 'compression'})", fontsize=9)
    fig.supylabel(f"relative change in {metric.upper()}\n(median, IQR over {len(res.seeds)} "
                  "seeds)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_forgettability_overview(res: "ForgettabilityResult", path: str | os.PathLike) -> Path:
    """All median AP curves in one panel, coloured by log prevalence."""
    plt = _plt()

    logp = res.log_prevalence
    ok = np.isfinite(logp)
    norm = colors.Normalize(vmin=float(np.min(logp[ok])) if ok.any() else 0.0,
                            vmax=float(np.max(logp[ok])) if ok.any() else 1.0)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    order = np.argsort(np.where(ok, logp, np.inf))
    for i in order:
        color = cmap(norm(logp[i])) if ok[i] else "grey"
        ax.plot(res.levels, res.median_rel_ap[:, i], color=color, lw=1.6,
                label=_short(res.class_names[i], 22))
    ax.axhline(-res.drop_threshold, color="grey", ls="--", lw=0.8)
    ax.set_xlabel(f"{res.level_name} ({res.method or 'compression'})")
    ax.set_ylabel("median relative change in AP")
    ax.set_title(f"Forgettability curves ({len(res.seeds)} seeds)")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax,
                 label=f"log prevalence ({res.prevalence_source})")
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- scatters
def scatter_with_fit(ax, x: np.ndarray, y: np.ndarray, corr: "Correlation",
                     labels: list[str] | None = None, xlabel: str = "", ylabel: str = "") -> None:
    """Points, the least-squares line and ``r`` / ``rho`` with p-values on one axis."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    ax.scatter(x[ok], y[ok], s=30, color="tab:blue", alpha=0.8, zorder=3)
    if math.isfinite(corr.slope) and ok.sum() >= 2:
        xs = np.linspace(x[ok].min(), x[ok].max(), 50)
        ax.plot(xs, corr.slope * xs + corr.intercept, ls="--", color="tab:orange", lw=1.5)
    if labels is not None:
        for xi, yi, name, keep in zip(x, y, labels, ok):
            if keep:
                ax.annotate(_short(name, 14), (xi, yi), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    txt = corr.label()
    if math.isfinite(corr.pearson_r):
        txt += (f"\nr CI [{corr.pearson_ci[0]:.2f}, {corr.pearson_ci[1]:.2f}], "
                f"ρ CI [{corr.spearman_ci[0]:.2f}, {corr.spearman_ci[1]:.2f}]")
    ax.set_title(txt, fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)


def plot_summary_scatters(res: "ForgettabilityResult", path: str | os.PathLike) -> Path:
    """Forgettability summaries vs log prevalence (PruneCXR's Fig. 3 layout: summary on x,
    log prevalence on y)."""
    plt = _plt()
    names = [("first_drop", f"first {res.level_name} with a {res.drop_threshold:.0%} AP drop"),
             ("delta_at_max", f"relative change in AP at {res.levels.max():g}"),
             ("mean_rel_change", "mean relative change in AP")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (name, xlabel) in zip(axes, names):
        scatter_with_fit(ax, getattr(res, name), res.log_prevalence,
                         res.correlations[f"{name}_vs_log_prevalence"],
                         labels=list(res.class_names), xlabel=xlabel,
                         ylabel=f"log prevalence ({res.prevalence_source})")
    fig.tight_layout()
    return _save(fig, path)


def plot_fcd_heatmap(fcd: "FCDResult", path: str | os.PathLike, which: str = "euclidean") -> Path:
    """FCD matrix with classes ordered by hierarchical clustering of the matrix itself."""
    plt = _plt()
    mat = np.asarray(getattr(fcd, which), dtype=float)
    k = mat.shape[0]
    order = np.arange(k)
    finite = np.all(np.isfinite(mat), axis=1)
    if finite.sum() >= 3:
        idx = np.flatnonzero(finite)
        sub = mat[np.ix_(idx, idx)]
        sub = (sub + sub.T) / 2
        np.fill_diagonal(sub, 0)
        leaves = leaves_list(linkage(squareform(sub, checks=False), method="average"))
        order = np.concatenate([idx[leaves], np.flatnonzero(~finite)])
    m = mat[np.ix_(order, order)]
    names = [_short(fcd.class_names[i], 22) for i in order]
    fig, ax = plt.subplots(figsize=(0.42 * k + 3, 0.42 * k + 2))
    im = ax.imshow(m, cmap="magma_r")
    ax.set_xticks(range(k), names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    if k <= 20:
        vmax = np.nanmax(m) if np.isfinite(m).any() else 1.0
        for i in range(k):
            for j in range(k):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=5,
                            color="white" if m[i, j] > 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, label=f"FCD ({which})", shrink=0.8)
    ax.set_title("Forgettability curve distance")
    fig.tight_layout()
    return _save(fig, path)


def plot_fcd_scatters(fcd: "FCDResult", path: str | os.PathLike) -> Path:
    """FCD (Euclidean) vs |delta log prevalence| and vs co-occurrence IoU, one point per pair."""
    plt = _plt()
    iu = np.triu_indices(len(fcd.class_names), 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (xname, xlabel) in zip(axes, (("abs_delta_log_prevalence",
                                           f"|Δ log prevalence| ({fcd.label_source})"),
                                          ("iou", f"co-occurrence IoU ({fcd.label_source})"))):
        xmat = fcd.abs_dlogprev if xname == "abs_delta_log_prevalence" else fcd.iou
        key = f"fcd_euclidean_vs_{xname}"
        scatter_with_fit(ax, xmat[iu], fcd.euclidean[iu], fcd.correlations[key], xlabel=xlabel,
                         ylabel="FCD (Euclidean)")
        mp = fcd.mantel.get(key)
        if mp and math.isfinite(mp.get("p", float("nan"))):
            ax.text(0.02, 0.97, f"Mantel p={mp['p']:.3g} ({mp['n_perm']} perms)",
                    transform=ax.transAxes, va="top", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- PIEs
def plot_pie_scores(res: "PieResult", path: str | os.PathLike) -> Path:
    """Histogram of the agreement / disagreement score with the PIE cut-off."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    s = res.scores[np.isfinite(res.scores)]
    ax.hist(s, bins=50, color="tab:blue", alpha=0.8)
    ax.axvline(res.threshold, color="tab:red", ls="--",
               label=f"PIE cut-off ({res.quantile:.0%}, n={int(res.is_pie.sum())})")
    ax.set_xlabel(res.score_name)
    ax.set_ylabel("images")
    ax.set_title(f"dense vs {res.level_name} {res.level:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_pie_overrepresentation(res: "PieResult", path: str | os.PathLike) -> Path:
    """Share-among-PIEs / share-overall per class (and per number of findings) with CIs."""
    plt = _plt()
    groups: list[tuple[str, list[dict[str, Any]]]] = [("class", res.class_overrep)]
    if res.findings_overrep:
        groups.append(("findings per image", res.findings_overrep))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 + 0.35 * len(res.class_overrep), 3.8),
                             squeeze=False, gridspec_kw={"width_ratios": [
                                 max(1, len(g[1])) for g in groups]})
    for ax, (title, rows) in zip(axes[0], groups):
        names = [_short(r["name"], 16) for r in rows]
        ratio = np.array([r["ratio"] for r in rows], dtype=float)
        lo = np.array([r["ratio_ci"][0] for r in rows], dtype=float)
        hi = np.array([r["ratio_ci"][1] for r in rows], dtype=float)
        xs = np.arange(len(rows))
        ax.bar(xs, np.nan_to_num(ratio), color="tab:blue", alpha=0.8)
        err = np.vstack([np.clip(ratio - lo, 0, None), np.clip(hi - ratio, 0, None)])
        ok = np.isfinite(err).all(0)
        ax.errorbar(xs[ok], ratio[ok], yerr=err[:, ok], fmt="none", ecolor="black", lw=1,
                    capsize=2)
        ax.axhline(1, color="black", ls="--", lw=0.8)
        ax.set_xticks(xs, names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("share among PIEs / share overall", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_pie_gallery(images: list[np.ndarray], titles: list[str], path: str | os.PathLike,
                     cols: int = 4) -> Path:
    """A grid of grey (or RGB) images with multi-line captions."""
    plt = _plt()
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.9 * rows), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.axis("off")
        if i >= n:
            continue
        img = np.asarray(images[i])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.set_title(titles[i], fontsize=6.5, loc="left", family="monospace")
    fig.tight_layout()
    return _save(fig, path)
