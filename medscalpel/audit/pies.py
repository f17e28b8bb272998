"""Pruning-identified exemplars (PIEs): the images a compressed model changes its mind about.

PruneCXR (Holste et al., MICCAI 2023), after Hooker et al. (2019): predictions are averaged over
the seeds at the reference (dense) level and at one compressed level; per image, the agreement is
the Spearman correlation between the two K-class probability vectors; PIEs are the images in the
bottom ``quantile`` (5%) of agreement. They are then characterised by which classes and how many
findings are over-represented among them (share among PIEs / share overall, with bootstrap CIs,
the PIE:non-PIE ratio PruneCXR plots, and Fisher's exact test), and, on data with ground truth
(the phantom), by label noise, image quality and severity (:func:`pie_ground_truth_tests`).

Disagreement scores (``score=``):

* ``spearman`` (multi-label default): Spearman rho between the dense and compressed
  probability vectors; low = disagreement. A constant vector has no ranking (rho undefined);
  it is scored 0 (no agreement) and counted in ``n_undefined``.
* ``tvd`` (multi-class and binary default): total variation distance
  ``0.5 * sum_k |p_dense - p_comp|``; high = disagreement. For two classes it equals
  ``|delta p|`` of either class. (A rank correlation of a 2-vector is only ever +-1.)
* ``true_class``: ``|p_dense[y] - p_comp[y]|`` for the labelled class ``y`` (multi-class only).

Prediction flips are reported alongside: the argmax changes (multi-class) or any class crosses
0.5 (multi-label).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medscalpel.audit import figures as figs
from medscalpel.audit.figures import plot_pie_gallery
from medscalpel.audit.stats import fisher_2x2, mann_whitney, rowwise_spearman, share_ratio
from medscalpel.audit.sweepio import Sweep, SweepLike, as_sweep
from medscalpel.errors import ConfigError, DataError
from medscalpel.layout import write_artifact_at
from medscalpel.runs import atomic_path, write_json
from medscalpel.validation import check_fraction, check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
SCORES = ("auto", "spearman", "tvd", "true_class")


# ----------------------------------------------------------------------------- scores
def agreement_scores(dense: np.ndarray, comp: np.ndarray, score: str = "spearman",
                     labels: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Per-image score between two ``[N, K]`` probability arrays and the number of undefined
    (constant-vector) Spearman scores set to 0."""
    check_in(score, "score", "agreement_scores", SCORES[1:])
    dense = np.asarray(dense, dtype=np.float64)
    comp = np.asarray(comp, dtype=np.float64)
    if dense.shape != comp.shape:
        raise DataError(f"agreement_scores: {dense.shape} vs {comp.shape}.")
    if score == "spearman":
        if dense.shape[1] < 3:
            raise ConfigError(f"score='spearman' needs at least 3 classes to rank (got "
                              f"{dense.shape[1]}); use score='tvd' or 'true_class'.")
        rho = rowwise_spearman(dense, comp)
        undefined = ~np.isfinite(rho)
        return np.where(undefined, 0.0, rho), int(undefined.sum())
    if score == "tvd":
        return 0.5 * np.abs(dense - comp).sum(1), 0
    if labels is None or np.asarray(labels).ndim != 1:
        raise ConfigError("score='true_class' needs multi-class labels (one class index per "
                          "image); use score='tvd' for multi-label tasks.")
    y = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(y))
    return np.abs(dense[rows, y] - comp[rows, y]), 0


def select_pies(scores: np.ndarray, quantile: float, higher_is_worse: bool) -> np.ndarray:
    """Boolean mask of the ``max(1, floor(quantile * N))`` worst images (ties by position)."""
    n = len(scores)
    k = max(1, int(np.floor(quantile * n + 1e-9)))
    key = -scores if higher_is_worse else scores
    order = np.argsort(key, kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    return mask


# ----------------------------------------------------------------------------- result
@dataclass
class PieResult:
    """PIEs of one compressed level.

    Attributes:
        ids: every evaluated image id (length N).
        scores: ``[N]`` agreement (``spearman``) or disagreement (``tvd``, ``true_class``).
        is_pie: ``[N]`` mask of the PIEs; ``threshold`` is the score of the last PIE.
        dense_probs, comp_probs: ``[N, K]`` seed-averaged probabilities.
        flips: ``[N]`` prediction flips.
        class_overrep, findings_overrep: one dict per class / per number of findings.
    """

    ids: tuple[str, ...]
    class_names: tuple[str, ...]
    task: str
    level: float
    reference_level: float
    level_name: str
    method: str
    seeds: tuple[str, ...]
    score_name: str
    higher_is_worse: bool
    quantile: float
    threshold: float
    scores: np.ndarray
    is_pie: np.ndarray
    dense_probs: np.ndarray
    comp_probs: np.ndarray
    targets: np.ndarray
    flips: np.ndarray
    n_undefined: int
    class_overrep: list[dict[str, Any]]
    findings_overrep: list[dict[str, Any]]
    n_boot: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pie_ids(self) -> list[str]:
        """PIE ids, worst first."""
        idx = np.flatnonzero(self.is_pie)
        key = -self.scores[idx] if self.higher_is_worse else self.scores[idx]
        return [self.ids[i] for i in idx[np.argsort(key, kind="stable")]]

    def image_rows(self, ids: list[str] | None = None, top: int = 3) -> list[dict[str, Any]]:
        """Per-image details: score, labels, flip, dense vs compressed top probabilities."""
        pos = {i: k for k, i in enumerate(self.ids)}
        out = []
        for i in (ids if ids is not None else self.pie_ids):
            r = pos[i]
            t = self.targets[r]
            labels = [self.class_names[j] for j in np.flatnonzero(np.nan_to_num(t) > 0.5)]

            def topk(p):
                o = np.argsort(-p, kind="stable")[:top]
                return [[self.class_names[j], float(p[j])] for j in o]

            out.append({"id": i, "score": float(self.scores[r]), "pie": bool(self.is_pie[r]),
                        "labels": labels, "flip": bool(self.flips[r]),
                        "dense_top": topk(self.dense_probs[r]),
                        "compressed_top": topk(self.comp_probs[r])})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA, "kind": "pies", "task": self.task, "method": self.method,
            "level": self.level, "reference_level": self.reference_level,
            "level_name": self.level_name, "seeds_averaged": list(self.seeds),
            "score": self.score_name, "higher_is_worse": self.higher_is_worse,
            "quantile": self.quantile, "threshold": self.threshold, "n_images": len(self.ids),
            "n_pies": int(self.is_pie.sum()), "n_undefined_scores_set_to_0": self.n_undefined,
            "n_flips": int(self.flips.sum()), "n_flips_among_pies": int(self.flips[self.is_pie].sum()),
            "class_names": list(self.class_names), "n_boot": self.n_boot,
            "class_overrepresentation": self.class_overrep,
            "findings_overrepresentation": self.findings_overrep,
            "pies": self.image_rows(),
            "scores": {"ids": list(self.ids), "values": self.scores.tolist()},
            **self.extra,
        }

    def save(self, out_dir: str | os.PathLike, figures: bool = True) -> dict[str, Path]:
        """Write ``pies.json``, ``pies.csv`` (every image's score) and the figures."""

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {"json": write_artifact_at(out, "pies", self)}
        df = pd.DataFrame({"id": self.ids, "score": self.scores, "pie": self.is_pie,
                           "flip": self.flips})
        with atomic_path(out / "pies.csv") as tmp:
            df.to_csv(tmp, index=False)
        written["csv"] = out / "pies.csv"
        if figures:
            written["scores"] = figs.plot_pie_scores(self, out / "audit_pie_scores.png")
            written["overrep"] = figs.plot_pie_overrepresentation(self,
                                                                  out / "audit_pie_overrep.png")
        return written


def _overrep_rows(names: list[str], subset: np.ndarray, has: np.ndarray, n_boot: int,
                  seed: int) -> list[dict[str, Any]]:
    r = share_ratio(subset, has, n_boot=n_boot, seed=seed)
    rows = []
    for j, name in enumerate(names):
        rows.append({"name": name, "n_pie_with": int(r["n_subset_with"][j]),
                     "n_with": int(r["n_with"][j]), "share_pie": float(r["share_subset"][j]),
                     "share_overall": float(r["share_overall"][j]), "ratio": float(r["ratio"][j]),
                     "ratio_ci": [float(r["ratio_lo"][j]), float(r["ratio_hi"][j])],
                     "ratio_vs_non_pie": float(r["ratio_vs_rest"][j]),
                     "odds_ratio": float(r["odds_ratio"][j]),
                     "odds_ratio_ci": [float(r["odds_ratio_lo"][j]), float(r["odds_ratio_hi"][j])],
                     "fisher_p": float(r["fisher_p"][j])})
    return rows


def _compressed_level(sw: Sweep, ratio: float) -> float:
    """The sweep level of ``ratio``.

    Raises:
        ConfigError: it is the reference level (nothing compressed to compare).
    """
    level = sw.level(ratio)
    if level == sw.reference_level:
        raise ConfigError(f"ratio={ratio:g} is the sweep's reference level; choose a compressed "
                          f"level: {', '.join(f'{v:g}' for v in sw.levels if v != level)}.")
    return level


def _decision_flips(task: str, dense: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """Per image: whether the compressed model decides differently (multi-class: another
    argmax; multi-label: some class crosses 0.5)."""
    if task == "multiclass":
        return dense.argmax(1) != comp.argmax(1)
    return ((dense >= 0.5) != (comp >= 0.5)).any(1)


def _composition(sw: Sweep, is_pie: np.ndarray, pos: np.ndarray, dense: np.ndarray,
                 comp: np.ndarray, flips: np.ndarray, n_boot: int, seed: int
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What sets the PIEs apart beyond their classes: multi-label, the over-representation of
    0 / 1 / 2 / >=3 findings and the mean number of findings; multi-class, the true class's
    probability change and the decision flip rates. Returns ``(findings_rows, extra)``."""
    findings_rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if sw.task == "multilabel":
        n_find = pos.sum(1)
        bins = np.stack([n_find == 0, n_find == 1, n_find == 2, n_find >= 3], 1)
        findings_rows = _overrep_rows(["0 findings", "1 finding", "2 findings", ">=3 findings"],
                                      is_pie, bins, n_boot, seed + 1)
        extra["mean_findings_pie"] = float(n_find[is_pie].mean())
        extra["mean_findings_non_pie"] = float(n_find[~is_pie].mean())
    else:
        rows = np.arange(sw.n)
        extra["mean_abs_delta_true_class_pie"] = float(
            np.abs(dense[rows, sw.labels] - comp[rows, sw.labels])[is_pie].mean())
        extra["flip_rate_pie"] = float(flips[is_pie].mean())
        extra["flip_rate_non_pie"] = float(flips[~is_pie].mean())
    return findings_rows, extra


def find_pies(
    sweep: SweepLike,
    ratio: float = 0.9,
    quantile: float = 0.05,
    *,
    score: str = "auto",
    method: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    out: str | os.PathLike | None = None,
) -> PieResult:
    """Find the PIEs of one compression level and characterise them.

    Args:
        sweep: a sweep directory, a :class:`~medscalpel.audit.sweepio.Sweep` or
            ``{(seed, level): Predictions}``.
        ratio: the compressed level to compare with the reference (PruneCXR: 0.9).
        quantile: the fraction of images flagged (PruneCXR: 0.05).
        score: ``auto`` (``spearman`` for multi-label, ``tvd`` for multi-class), ``spearman``,
            ``tvd`` or ``true_class``.
        method: the sweep method to read when the directory holds several.
        n_boot: bootstrap resamples for the over-representation CIs.
        out: when given, :meth:`PieResult.save` writes there.

    Example:
        >>> import numpy as np
        >>> from medscalpel.engine.predictions import Predictions
        >>> rng = np.random.default_rng(0)
        >>> y = (rng.random((100, 4)) < 0.3).astype(np.float32)
        >>> z = rng.normal(size=(100, 4)).astype(np.float32)
        >>> zc = z.copy(); zc[:5] = zc[:5, ::-1]  # five images whose ranking is reversed
        >>> mk = lambda l: Predictions(l, y, ids=[f"i{i}" for i in range(100)],
        ...                            class_names=("a", "b", "c", "d"), task="multilabel")
        >>> res = find_pies({0.0: mk(z), 0.9: mk(zc)}, n_boot=0)
        >>> sorted(res.pie_ids) == [f"i{i}" for i in range(5)]
        True
    """
    check_fraction(quantile, "quantile", "find_pies")
    if quantile <= 0:
        raise ConfigError(f"The 'quantile' parameter of find_pies must be in (0, 1). Got "
                          f"{quantile!r} instead.")
    check_in(score, "score", "find_pies", SCORES)
    check_range(n_boot, "n_boot", "find_pies", 0, integer=True)
    sw = as_sweep(sweep, method=method)
    level = _compressed_level(sw, ratio)
    seeds = tuple(s for s in sw.seeds_at(level) if (s, sw.reference_level) in sw.cells)
    dense = sw.mean_probs(sw.reference_level, seeds)
    comp = sw.mean_probs(level, seeds)
    if score == "auto":
        score = "spearman" if sw.task == "multilabel" and sw.num_classes >= 3 else "tvd"
    labels = sw.labels if sw.task == "multiclass" else None
    scores, n_undef = agreement_scores(dense, comp, score, labels)
    higher_is_worse = score != "spearman"
    is_pie = select_pies(scores, quantile, higher_is_worse)
    if is_pie.all():
        raise DataError(f"find_pies: with {sw.n} images and quantile={quantile} every image is a "
                        "PIE; use more images or a smaller quantile.")
    pie_scores = scores[is_pie]
    threshold = float(pie_scores.max() if not higher_is_worse else pie_scores.min())
    flips = _decision_flips(sw.task, dense, comp)
    targets = sw.targets()
    pos = (np.nan_to_num(targets) > 0.5)
    class_rows = _overrep_rows(list(sw.class_names), is_pie, pos, n_boot, seed)
    findings_rows, extra = _composition(sw, is_pie, pos, dense, comp, flips, n_boot, seed)
    if n_undef:
        logger.info("%d images have a constant probability vector; their Spearman score is "
                    "undefined and set to 0.", n_undef)
    result = PieResult(
        ids=sw.ids, class_names=sw.class_names, task=sw.task, level=level,
        reference_level=sw.reference_level, level_name=sw.level_name, method=sw.method,
        seeds=seeds, score_name=score, higher_is_worse=higher_is_worse, quantile=quantile,
        threshold=threshold, scores=scores, is_pie=is_pie, dense_probs=dense, comp_probs=comp,
        targets=targets, flips=flips, n_undefined=n_undef, class_overrep=class_rows,
        findings_overrep=findings_rows, n_boot=n_boot,
        extra={**extra, "sweep": sw.to_dict()})
    if out is not None:
        result.save(out)
    return result


# ----------------------------------------------------------------------------- gallery
def _raw_image(dataset: Any, index: int) -> np.ndarray:
    if hasattr(dataset, "load_raw"):
        img = np.asarray(dataset.load_raw(index))
    else:
        item = dataset[index]
        img = item[0] if isinstance(item, (tuple, list)) else item
        img = np.asarray(img.detach().cpu() if hasattr(img, "detach") else img)
        if img.ndim == 3 and img.shape[0] in (1, 3):
            img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    img = img.astype(np.float64)
    lo, hi = np.nanmin(img), np.nanmax(img)
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def pie_gallery(dataset: Any, pie_result: PieResult, path: str | os.PathLike,
                ids: list[str] | None = None, max_images: int = 16, cols: int = 4,
                top: int = 3) -> Path:
    """A PNG grid of PIEs (worst first): each image with its labels, score, and the dense vs
    compressed top probabilities.

    Args:
        dataset: anything with ``ids`` and ``load_raw(i)`` (a :class:`CXRDataset`) or
            ``ids`` and ``__getitem__`` returning ``(image, target)``.
        pie_result: from :func:`find_pies`.
        ids: which images (default: the PIEs, worst first).
        max_images: at most this many.
    """

    check_range(max_images, "max_images", "pie_gallery", 1, integer=True)
    if not hasattr(dataset, "ids"):
        raise DataError("pie_gallery: the dataset has no 'ids'; pass a medscalpel CXRDataset "
                        "(e.g. open_dataset('phantom:DIR', split='test')).")
    want = list(ids if ids is not None else pie_result.pie_ids)[:max_images]
    if not want:
        raise DataError("pie_gallery: no image ids to show (the PIE list is empty).")
    pos = {str(i): k for k, i in enumerate(dataset.ids)}
    missing = [i for i in want if i not in pos]
    if missing:
        raise DataError(f"pie_gallery: {len(missing)} PIE ids are not in the dataset (e.g. "
                        f"{missing[:3]}); pass the split the sweep was evaluated on.")
    rows = pie_result.image_rows(want, top=top)
    images, titles = [], []
    for r in rows:
        images.append(_raw_image(dataset, pos[r["id"]]))
        dense = " ".join(f"{n[:10]}:{p:.2f}" for n, p in r["dense_top"])
        comp = " ".join(f"{n[:10]}:{p:.2f}" for n, p in r["compressed_top"])
        labels = ", ".join(x[:12] for x in r["labels"]) or "(none)"
        titles.append(f"{r['id']}  {pie_result.score_name}={r['score']:.2f}"
                      f"{'  FLIP' if r['flip'] else ''}\nlabels: {labels}\n"
                      f"dense: {dense}\n{pie_result.level:g}: {comp}")
    return plot_pie_gallery(images, titles, path, cols=cols)


# ----------------------------------------------------------------------------- ground truth
GT_COLUMNS = ("id", "label_noise", "quality", "severity")


@dataclass
class PieGroundTruthResult:
    """Are PIEs enriched for label noise, low quality and low severity?

    Attributes:
        label_noise: Fisher's exact test (PIE x noisy); ``odds_ratio > 1`` = enriched.
        quality, severity: Mann-Whitney U of PIEs vs non-PIEs; ``rank_biserial < 0`` = PIEs lower.
        supports: per finding, whether the data support PruneCXR's direction at ``alpha``.
    """

    n_matched: int
    n_pies: int
    alpha: float
    label_noise: dict[str, Any]
    quality: dict[str, Any]
    severity: dict[str, Any]
    supports: dict[str, bool]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "kind": "pie_ground_truth", "n_matched": self.n_matched,
                "n_pies": self.n_pies, "alpha": self.alpha, "label_noise": self.label_noise,
                "quality": self.quality, "severity": self.severity, "supports": self.supports,
                "reading": {"label_noise": "odds_ratio > 1: PIEs carry more flipped labels",
                            "quality": "rank_biserial < 0: PIEs have lower image quality",
                            "severity": "rank_biserial < 0: PIEs' findings are less severe "
                                        "(subtler, harder)"}}

    def save(self, out_dir: str | os.PathLike) -> Path:

        return write_json(Path(out_dir) / "pie_ground_truth.json", self.to_dict())


def pie_ground_truth_tests(pie_result: PieResult, ground_truth_table: pd.DataFrame,
                           alpha: float = 0.05) -> PieGroundTruthResult:
    """Test PruneCXR's reader-study findings against per-image ground truth.

    Args:
        pie_result: from :func:`find_pies`.
        ground_truth_table: a DataFrame with columns ``id`` (image id), ``label_noise`` (bool:
            at least one label of the image is wrong), ``quality`` (float, higher = better) and
            ``severity`` (float, e.g. the mean severity of the image's findings; NaN for images
            without findings, which are left out of that test).
        alpha: significance level for ``supports``.
    """
    check_fraction(alpha, "alpha", "pie_ground_truth_tests")
    if not isinstance(ground_truth_table, pd.DataFrame):
        raise DataError("pie_ground_truth_tests: ground_truth_table must be a pandas DataFrame "
                        f"with columns {list(GT_COLUMNS)}; got {type(ground_truth_table).__name__}.")
    missing = [c for c in GT_COLUMNS if c not in ground_truth_table.columns]
    if missing:
        raise DataError(f"pie_ground_truth_tests: the ground-truth table lacks column(s) {missing};"
                        f" it has {list(ground_truth_table.columns)}. Needed: {list(GT_COLUMNS)}.")
    gt = ground_truth_table.assign(id=ground_truth_table["id"].astype(str))
    if gt["id"].duplicated().any():
        dup = gt.loc[gt["id"].duplicated(), "id"].iloc[0]
        raise DataError(f"pie_ground_truth_tests: image id {dup!r} appears more than once in the "
                        "ground-truth table.")
    res = pd.DataFrame({"id": list(pie_result.ids), "pie": pie_result.is_pie})
    df = res.merge(gt, on="id", how="inner")
    if df.empty:
        raise DataError(f"pie_ground_truth_tests: no image id of the PIE result (e.g. "
                        f"{list(pie_result.ids[:2])}) is in the ground-truth table (e.g. "
                        f"{gt['id'].head(2).tolist()}); pass the table of the evaluated split.")
    if len(df) < len(res):
        logger.warning("pie_ground_truth_tests: %d of %d evaluated images have no ground truth.",
                       len(res) - len(df), len(res))
    pie = df["pie"].to_numpy(bool)
    if not pie.any() or pie.all():
        raise DataError("pie_ground_truth_tests: the matched images are all PIEs or none are; "
                        "the tests need both groups.")
    noise = df["label_noise"].astype(bool).to_numpy()
    table = np.array([[np.sum(pie & noise), np.sum(pie & ~noise)],
                      [np.sum(~pie & noise), np.sum(~pie & ~noise)]])
    ln = fisher_2x2(table)
    ln["rate_pie"] = float(noise[pie].mean())
    ln["rate_non_pie"] = float(noise[~pie].mean())
    q = df["quality"].to_numpy(float)
    s = df["severity"].to_numpy(float)
    qt = mann_whitney(q[pie], q[~pie], a_name="pie", b_name="non_pie")
    st = mann_whitney(s[pie], s[~pie], a_name="pie", b_name="non_pie")

    def ok(v, cond):
        return bool(np.isfinite(v) and cond)

    supports = {
        "label_noise_enriched": ok(ln["p"], ln["p"] < alpha and ln["sample_odds_ratio"] > 1),
        "lower_quality": ok(qt["p"], qt["p"] < alpha and qt["rank_biserial"] < 0),
        "lower_severity": ok(st["p"], st["p"] < alpha and st["rank_biserial"] < 0),
    }
    return PieGroundTruthResult(n_matched=len(df), n_pies=int(pie.sum()), alpha=alpha,
                                label_noise=ln, quality=qt, severity=st, supports=supports)
