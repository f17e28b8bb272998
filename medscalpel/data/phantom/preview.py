"""Contact sheet of the phantom: examples per finding with their masks outlined."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medscalpel.data.phantom.store import PhantomData
from medscalpel.plotting import pyplot
from medscalpel.runs import atomic_path


def contact_sheet(data: PhantomData, path: str | os.PathLike, per_class: int = 4,
                  normals: int = 4, scale: float = 1.4) -> Path:
    """Write a PNG grid: one row per finding (the most severe clean positives first), a row of
    normal films, and one of shortcut examples; each finding's mask is outlined in red, the lung
    fields in faint green.

    Args:
        data: a generated phantom.
        path: output PNG path.
        per_class: examples per finding row.
        normals: examples in the "No finding" row.
        scale: inches per image tile.

    Returns:
        The PNG path.
    """
    plt = pyplot()
    names = data.class_names
    clean = data.clean_labels()
    sev = data.severity()
    rows: list[tuple[str, list[tuple[int, str | None]]]] = []
    for k, name in enumerate(names):
        pos = np.flatnonzero(clean[:, k] == 1)
        # a spread of severities: most severe first, then a typical one
        pos = pos[np.argsort(-sev[pos, k])]
        pick = list(pos[:max(per_class - 1, 1)]) + list(pos[len(pos) // 2:len(pos) // 2 + 1])
        rows.append((name, [(int(i), name) for i in dict.fromkeys(pick)][:per_class]))
    normal = np.flatnonzero(clean.sum(1) == 0)[:normals]
    rows.append(("No finding", [(int(i), None) for i in normal]))
    tube = np.flatnonzero(data.gt["chest_tube"].to_numpy().astype(bool)
                          & (clean[:, names.index("Pneumothorax")] == 0))[:2]
    ap = np.flatnonzero(data.gt["ap_marker"].to_numpy().astype(bool))[:2]
    rows.append(("Shortcuts: tube / AP", [(int(i), None) for i in [*tube, *ap]]))
    ncol = max(per_class, normals, 4)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(ncol * scale + 1.6, len(rows) * scale),
                             squeeze=False)
    for r, (title, items) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if c >= len(items):
                continue
            row, cls = items[c]
            ax.imshow(data.images[row], cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
            m = data.masks(row)
            for lung in ("lung_right", "lung_left"):
                ax.contour(m[lung], levels=[0.5], colors=["#4caf50"], linewidths=0.4,
                           alpha=0.5)
            if cls is not None and cls in m and m[cls].any():
                ax.contour(m[cls], levels=[0.5], colors=["#ff3030"], linewidths=0.9)
            if cls is not None:
                k = names.index(cls)
                noisy = " *" if data.labels[row, k] != clean[row, k] else ""
                ax.set_title(f"sev {sev[row, k]:.2f}{noisy}", fontsize=6, pad=2)
        axes[r, 0].set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"Phantom CXR-14 ({data.size}x{data.size}, seed {data.meta.get('seed')}): "
                 "red = finding mask, green = lung fields, * = label flipped", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
