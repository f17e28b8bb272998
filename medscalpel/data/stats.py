"""Label statistics: prevalence, co-occurrence counts, Jaccard matrix, pairs that never co-occur.

These drive the long-tail analyses downstream (PruneCXR's forgettability is explained by
prevalence and co-occurrence; polarized-channel audits read the Jaccard index of label pairs).

Definitions, for a multi-hot matrix ``Y [N, K]`` (NaN = unknown, counted as not positive):

* ``counts[k]`` = number of images positive for class k; ``known[k]`` = images whose label k is
  known; ``prevalence[k] = counts[k] / known[k]``.
* ``cooccurrence[i, j]`` = images positive for both i and j (diagonal = ``counts``).
* ``jaccard[i, j] = |i and j| / |i or j|`` (1 on the diagonal of a class with positives; NaN
  when neither class has a positive).
* ``never_cooccur``: pairs ``i < j`` that both have positives but never share an image.
* ``findings_histogram[m]`` = images with exactly m positive labels; ``n_ge3`` = images with
  three or more.
* ``pair_known[i, j]`` = images whose labels i and j are both known; ``pos_known[i, j]`` = images
  positive for i whose label j is known (what the co-occurrence evidence needs when labels are
  unknown).
* ``evidence``: :class:`~medscalpel.data.cooccurrence.CooccurrenceEvidence` under the default
  :class:`~medscalpel.data.cooccurrence.ExclusionRule` (observed vs expected co-occurrences, lift
  with its CI, exact test, and which pairs are mutually exclusive by that rule);
  :meth:`LabelStats.cooccurrence_evidence` recomputes it under another rule. ``never_cooccur``
  and the Jaccard index are descriptive only: a pair that never co-occurs in a sample is not
  evidence of exclusivity.

Example:
    >>> import numpy as np
    >>> s = label_statistics(np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]]), ["a", "b", "c"])
    >>> s.counts, round(s.jaccard[0][1], 3)
    ([2, 1, 1], 0.5)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medscalpel.data.cooccurrence import (CooccurrenceEvidence, ExclusionRule, count_matrices,
                                          evidence_from_counts)
from medscalpel.data.spec import open_dataset
from medscalpel.errors import DataError
from medscalpel.layout import write_artifact_at
from medscalpel.runs import atomic_path, read_json, write_json
from medscalpel.validation import check_in

SCHEMA_VERSION = 2  # 2: pair_known, pos_known, evidence


@dataclass(frozen=True)
class LabelStats:
    """Label statistics of one dataset split (see the module docstring for the definitions)."""

    class_names: list[str]
    n: int
    counts: list[int]
    known: list[int]
    prevalence: list[float]
    cooccurrence: list[list[int]]
    jaccard: list[list[float]]
    never_cooccur: list[tuple[str, str]]
    findings_histogram: list[int]
    n_ge3: int
    task: str = "multilabel"
    spec: str = ""
    split: str = ""
    content_hash: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    pair_known: list[list[int]] | None = None
    pos_known: list[list[int]] | None = None
    evidence: dict[str, Any] | None = None

    # ------------------------------------------------------------------ views
    def cooccurrence_matrix(self) -> np.ndarray:
        return np.asarray(self.cooccurrence, dtype=np.int64)

    def jaccard_matrix(self) -> np.ndarray:
        return np.asarray(self.jaccard, dtype=np.float64)

    def prevalence_of(self, name: str) -> float:
        return self.prevalence[self.class_names.index(name)]

    def jaccard_of(self, a: str, b: str) -> float:
        return self.jaccard[self.class_names.index(a)][self.class_names.index(b)]

    def source(self) -> str:
        """``spec (split)`` for display."""
        return f"{self.spec or 'labels'} ({self.split or 'all'})"

    def cooccurrence_evidence(self, rule: ExclusionRule | None = None) -> CooccurrenceEvidence:
        """Evidence of mutual exclusivity for every pair under ``rule`` (default: the default
        :class:`~medscalpel.data.cooccurrence.ExclusionRule`; the stored ``evidence`` is reused
        when it was computed under the same rule).

        Statistics written before schema 2 lack ``pair_known``/``pos_known``; when no label was
        unknown (``known == n`` for every class) they follow from ``counts`` exactly, otherwise
        the evidence is computed treating unknown as negative, is marked ``approximate``,
        carries a warning and excludes nothing.
        """
        rule = ExclusionRule() if rule is None else rule
        if self.evidence is not None and \
                ExclusionRule.from_dict(self.evidence.get("rule", {})) == rule:
            return CooccurrenceEvidence.from_dict(self.evidence)
        k = len(self.class_names)
        co = self.cooccurrence_matrix()
        approximate = False
        if self.pair_known is not None and self.pos_known is not None:
            pair_n = np.asarray(self.pair_known, np.int64)
            pos_known = np.asarray(self.pos_known, np.int64)
        else:
            pair_n = np.full((k, k), int(self.n), np.int64)
            pos_known = np.repeat(np.asarray(self.counts, np.int64)[:, None], k, 1)
            approximate = any(int(c) < self.n for c in self.known)
        return evidence_from_counts(self.class_names, self.n, pair_n, pos_known, co, rule,
                                    source=self.source(), approximate=approximate)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["never_cooccur"] = [list(p) for p in self.never_cooccur]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelStats":
        if int(d.get("schema_version", 1)) > SCHEMA_VERSION:
            raise DataError(f"Label statistics schema {d.get('schema_version')} is newer than "
                            f"this medscalpel reads ({SCHEMA_VERSION}); upgrade medscalpel.")
        d = dict(d)
        d["jaccard"] = [[float("nan") if v is None else float(v) for v in row]
                        for row in d["jaccard"]]
        d["prevalence"] = [float("nan") if v is None else float(v) for v in d["prevalence"]]
        d["never_cooccur"] = [tuple(p) for p in d.get("never_cooccur", [])]
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON (NaN -> null) atomically."""

        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LabelStats":

        return cls.from_dict(read_json(path))

    # ------------------------------------------------------------------ figures
    def plot_heatmap(self, path: str | os.PathLike, which: str = "jaccard") -> Path:
        """Save a heatmap PNG of the ``jaccard`` or ``cooccurrence`` matrix."""

        check_in(which, "which", "LabelStats.plot_heatmap", ("jaccard", "cooccurrence"))

        mat = self.jaccard_matrix() if which == "jaccard" else self.cooccurrence_matrix()
        k = len(self.class_names)
        side = max(4.0, 0.45 * k + 2.5)
        fig = Figure(figsize=(side + 1.2, side))  # no pyplot: no global state, Agg canvas
        ax = fig.subplots()
        shown = np.ma.masked_invalid(mat.astype(float))
        if which == "cooccurrence":
            # log colour scale keeps rare pairs visible next to the big diagonal
            shown = np.ma.masked_invalid(np.log10(mat.astype(float) + 1.0))
            label = "log10(images with both + 1)"
        else:
            label = "Jaccard index"
        im = ax.imshow(shown, cmap="viridis", vmin=0.0,
                       vmax=1.0 if which == "jaccard" else None)
        ax.set_xticks(range(k), self.class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), self.class_names, fontsize=8)
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    v = mat[i, j]
                    if np.isfinite(v):
                        txt = f"{v:.2f}" if which == "jaccard" else f"{int(v)}"
                        ax.text(j, i, txt, ha="center", va="center", fontsize=5,
                                color="white" if shown[i, j] < (0.5 if which == "jaccard"
                                                                else shown.max() / 2)
                                else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
        title = f"{which} ({self.spec or 'labels'}, {self.split or 'all'}, n={self.n})"
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        return Path(path)


def label_statistics(labels: np.ndarray, class_names: Sequence[str], **info: Any) -> LabelStats:
    """Compute :class:`LabelStats` from a label matrix.

    Args:
        labels: multi-hot ``[N, K]`` (0/1, NaN = unknown) or multi-class indices ``[N]``.
        class_names: ``K`` names.
        **info: ``spec``, ``split``, ``content_hash``, ``task`` to record with the result.
    """
    y = np.asarray(labels)
    names = [str(c) for c in class_names]
    k = len(names)
    if y.ndim == 1:
        if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k):
            raise DataError(f"label_statistics: multi-class labels must be integers in [0, {k}); "
                            f"got dtype {y.dtype}, range [{y.min()}, {y.max()}].")
        onehot = np.zeros((len(y), k), np.float64)
        onehot[np.arange(len(y)), y.astype(np.int64)] = 1.0
        y = onehot
        info.setdefault("task", "multiclass")
    if y.ndim != 2 or y.shape[1] != k:
        raise DataError(f"label_statistics: labels of shape {y.shape} do not match the {k} class "
                        f"names {names}.")
    y = y.astype(np.float64)
    finite = np.isfinite(y)
    vals = y[finite]
    if vals.size and not np.isin(vals, (0.0, 1.0)).all():
        raise DataError("label_statistics: labels must be 0/1 (NaN = unknown); got values "
                        f"{sorted(set(vals.tolist()) - {0.0, 1.0})[:5]}.")
    pos = np.where(finite, y, 0.0)
    pair_known, pos_known, _ = count_matrices(y, k)
    counts = pos.sum(0).astype(np.int64)
    known = finite.sum(0).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        prevalence = np.where(known > 0, counts / np.maximum(known, 1), np.nan)
    co = (pos.T @ pos).astype(np.int64)
    union = counts[:, None] + counts[None, :] - co
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, co / np.maximum(union, 1), np.nan)
    never = [(names[i], names[j]) for i in range(k) for j in range(i + 1, k)
             if co[i, j] == 0 and counts[i] > 0 and counts[j] > 0]
    per_image = pos.sum(1).astype(np.int64)
    hist = np.bincount(per_image, minlength=1).tolist() if len(per_image) else [0]
    source = f"{info.get('spec') or 'labels'} ({info.get('split') or 'all'})"
    evidence = evidence_from_counts(names, int(len(y)), pair_known, pos_known, co,
                                    ExclusionRule(), source=source)
    return LabelStats(
        class_names=names, n=int(len(y)), counts=counts.tolist(), known=known.tolist(),
        prevalence=[float(v) for v in prevalence], cooccurrence=co.tolist(),
        jaccard=[[float(v) for v in row] for row in jac], never_cooccur=never,
        findings_histogram=[int(v) for v in hist], n_ge3=int((per_image >= 3).sum()),
        task=str(info.get("task", "multilabel")), spec=str(info.get("spec", "")),
        split=str(info.get("split", "")), content_hash=str(info.get("content_hash", "")),
        pair_known=pair_known.tolist(), pos_known=pos_known.tolist(),
        evidence=evidence.to_dict())


def dataset_statistics(spec: str, split: str = "all",
                       out_dir: str | os.PathLike | None = None) -> LabelStats:
    """Open a dataset's labels and compute their statistics.

    With ``out_dir`` it also writes ``stats.json``, ``jaccard.png`` and ``cooccurrence.png``
    there. Only labels are read (no pixels); for NIH label tables without images use
    ``nih:/path?labels_only=true``.

    Example:
        >>> s = dataset_statistics("nih:/data/nih?labels_only=true", "all", "runs/stats")  # doctest: +SKIP
    """

    ds = open_dataset(spec, split=split)
    stats = label_statistics(ds.labels, ds.class_names, spec=ds.spec, split=split,
                             content_hash=ds.content_hash(), task=ds.task)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_artifact_at(out, "label_stats", stats)
        stats.plot_heatmap(out / "jaccard.png", "jaccard")
        stats.plot_heatmap(out / "cooccurrence.png", "cooccurrence")
    return stats
