"""External validation: the same model on another site's images, next to its internal numbers.

A model's own test split overstates how it does at the next hospital, above all at its
operating point. :func:`external_validation` puts the internal and the external predictions side
by side, per class:

* AUROC and AP with bootstrap CIs (ranking);
* calibration: expected calibration error (ECE, equal-width bins, one-vs-rest per class:
  :func:`medscalpel.engine.metrics.weighted_ece`) with bootstrap CIs and the reliability-diagram
  bins (:func:`plot_reliability` draws them);
* sensitivity, specificity and F1 AT THE STORED thresholds (the model card's; ``0.5`` labelled
  as the default when the card has none): what a deployed model would do. Multi-class: a binary
  model decides its second class when that probability reaches its threshold (0.5 = argmax);
  with more classes the decision is the argmax;
* the deltas external - internal with CIs. The two sets hold different images, so the bootstrap
  is UNPAIRED: each side is resampled on its own and the replicate differences give the CI.
  Every CI says how many replicates it dropped (``*_ci_dropped``, a delta's ``dropped``): a
  resample without a positive of a rare class leaves the class's AUROC / AP / sensitivity
  undefined, and the interval then describes only the resamples that had one.

:func:`compression_shift` asks whether compression loses more on the external set than on the
internal one (per class, paired CIs on each set from
:func:`medscalpel.engine.compare.compare_predictions`).

Example:
    >>> import numpy as np
    >>> y = np.array([[1.], [0.], [1.], [0.]])
    >>> a = Predictions(np.array([[2.], [-1.], [0.5], [-2.]]), y, ids=tuple("abcd"),
    ...                 class_names=("x",), task="multilabel", split="test")
    >>> b = Predictions(np.array([[2.], [1.], [-0.5], [-2.]]), y, ids=tuple("efgh"),
    ...                 class_names=("x",), task="multilabel", split="all")
    >>> r = external_validation(None, a, b, n_boot=0)
    >>> r.classes[0]["external"]["sensitivity"], r.classes[0]["delta"]["auroc"]["value"]
    (0.5, -0.25)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from medscalpel.data.base import CXRDataset, split_warning
from medscalpel.engine.compare import (PairedComparison, compare_predictions, weighted_ap,
                                       weighted_auroc)
from medscalpel.engine.metrics import bootstrap_ci, calibration_bins, weighted_ece
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.layout import artifact
from medscalpel.plotting import pyplot, save_figure
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
FILENAME = artifact("external").filename
#: per-class metrics of one site (all with bootstrap CIs)
SITE_METRICS = ("auroc", "ap", "ece", "sensitivity", "specificity", "f1")
_CHUNK = 64


# ----------------------------------------------------------------------------- classes
def map_class_names(external: Sequence[str], model: Sequence[str],
                    class_map: Mapping[str, str] | None = None, task: str = "multilabel",
                    where: str = "the external set") -> list[int | None]:
    """For each MODEL class, the column of ``external`` that holds it.

    Args:
        external: the external set's class names.
        model: the model's class names (the order of the result).
        class_map: external name -> model name for names that differ (``{"normal": "NORMAL"}``).
        task: ``multiclass`` refuses external classes that map to no model class (their images
            would have no label the model can predict); ``multilabel`` ignores such columns.

    Raises:
        DataError: a model class has no external column, or (multi-class) an external class has
            no model class; the message names them and how to map them.
    """
    cmap = dict(class_map or {})
    bad = [k for k in cmap if k not in external]
    if bad:
        raise ConfigError(f"The 'class_map' keys {bad} are not classes of {where} "
                          f"({list(external)}). Map external names to model names.")
    wrong = [v for v in cmap.values() if v not in model]
    if wrong:
        raise ConfigError(f"The 'class_map' values {wrong} are not classes of the model "
                          f"({list(model)}).")
    renamed = [cmap.get(c, c) for c in external]
    missing = [c for c in model if c not in renamed]
    extra = [c for c, r in zip(external, renamed) if r not in model]
    if missing or (task == "multiclass" and extra):
        raise DataError(
            f"The classes of {where} do not match the model's: model classes missing there "
            f"{missing}, classes there the model does not predict {extra} (model: {list(model)}; "
            f"external: {list(external)}). Pass class_map (e.g. "
            f"{{{extra[0] if extra else 'external_name'!r}: {missing[0] if missing else 'model_name'!r}}})"
            " to map names, or use a model trained on these classes.")
    if extra:
        logger.warning("%s: columns %s are not model classes and are ignored", where, extra)
    return [renamed.index(c) for c in model]


class RelabeledDataset(CXRDataset):
    """A dataset's images with its labels re-expressed in a model's class list (see
    :func:`map_class_names`)."""

    def __init__(self, parent: CXRDataset, model_classes: Sequence[str],
                 class_map: Mapping[str, str] | None = None):
        super().__init__(parent.preprocess, spec=parent.spec, split=parent.split)
        self.parent = parent
        self.name = parent.name
        cols = map_class_names(parent.class_names, model_classes, class_map, parent.task,
                               f"dataset {parent.spec!r}")
        if parent.task == "multilabel":
            labels = parent.labels[:, cols]
        else:
            lookup = np.full(parent.num_classes, -1, np.int64)
            for j, c in enumerate(cols):
                lookup[c] = j
            labels = lookup[parent.labels]
        self._set_tables(parent.ids, labels, model_classes, parent.task, parent.patient_ids)
        self.meta = {**parent.meta, "class_map": dict(class_map or {}),
                     "source_classes": list(parent.class_names)}
        self.skip_report = parent.skip_report

    def load_raw(self, index: int) -> np.ndarray:
        return self.parent.load_raw(index)


# ----------------------------------------------------------------------------- thresholds
def stored_thresholds(model_or_card: Any, k: int) -> tuple[np.ndarray, str]:
    """The card's per-class thresholds and where they came from (``model card`` or
    ``default 0.5`` when the card has none or there is no card)."""
    card = getattr(model_or_card, "card", model_or_card)
    thr = getattr(card, "thresholds", None)
    if thr is None:
        return np.full(k, 0.5), "default 0.5"
    arr = np.asarray(thr, dtype=float).reshape(-1)
    if arr.shape != (k,):
        raise ConfigError(f"The model card holds {arr.size} thresholds for {k} classes; "
                          "recalibrate the model (medscalpel repair calibrate).")
    return arr, "model card"


def decisions(preds: Predictions, thr: np.ndarray) -> tuple[np.ndarray, str]:
    """Boolean ``[N, K]`` decisions at ``thr`` and the rule used (``threshold`` /
    ``binary threshold`` / ``argmax``)."""
    p = preds.probs().astype(np.float64)
    if preds.task == "multilabel":
        return p >= thr[None, :], "threshold"
    if preds.num_classes == 2:
        pos = p[:, 1] >= thr[1]
        return np.stack([~pos, pos], axis=1), "binary threshold (second class)"
    d = np.zeros_like(p, dtype=bool)
    d[np.arange(preds.n), p.argmax(1)] = True
    return d, "argmax"


# ----------------------------------------------------------------------------- kernels
def _weights(n: int, n_boot: int, rng: np.random.Generator):
    done = 0
    while done < n_boot:
        b = min(_CHUNK, n_boot - done)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)
        done += b


def _rates(y: np.ndarray, d: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    tp = w @ (y & d).astype(np.float64)
    fp = w @ (~y & d).astype(np.float64)
    fn = w @ (y & ~d).astype(np.float64)
    tn = w @ (~y & ~d).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return {"sensitivity": sens, "specificity": spec, "f1": f1}


def _class_values(y, p, d, w, bins) -> dict[str, np.ndarray]:
    return {"auroc": weighted_auroc(y, p, w), "ap": weighted_ap(y, p, w),
            "ece": weighted_ece(y, p, w, bins), **_rates(y, d, w)}


def _ci(v: np.ndarray, confidence: float) -> list[float]:
    return list(bootstrap_ci(v, confidence)[0])


def _dropped(v: np.ndarray) -> int:
    """Bootstrap replicates left out of a CI because the statistic was undefined (NaN)."""
    return bootstrap_ci(v)[1]


def reliability_bins(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Per non-empty bin of :func:`~medscalpel.engine.metrics.calibration_bins`: ``{"lo", "hi",
    "n", "mean_pred", "observed"}``."""
    idx = calibration_bins(p, bins)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": int(m.sum()),
                        "mean_pred": float(p[m].mean()), "observed": float(y[m].mean())})
    return out


def _site(preds: Predictions, thr: np.ndarray, n_boot: int, seed: int, confidence: float,
          bins: int) -> tuple[dict[str, Any], list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Point values + CIs of one site, and its bootstrap replicates (per class, and macro)."""
    t = preds.targets()
    p = preds.probs().astype(np.float64)
    d, rule = decisions(preds, thr)
    n, k = preds.n, preds.num_classes
    known = [np.isfinite(t[:, j]) for j in range(k)]
    ys = [t[known[j], j] > 0.5 for j in range(k)]
    ones = np.ones((1, n))
    point = [{m: float(v[0]) for m, v in _class_values(ys[j], p[known[j], j], d[known[j], j],
                                                          ones[:, known[j]], bins).items()}
             for j in range(k)]
    reps: list[dict[str, list]] = [{m: [] for m in SITE_METRICS} for _ in range(k)]
    acc_reps: list[np.ndarray] = []
    correct = (p.argmax(1) == preds.labels) if preds.task == "multiclass" else None
    for w in (_weights(n, n_boot, np.random.default_rng(seed)) if n_boot else ()):
        for j in range(k):
            for m, v in _class_values(ys[j], p[known[j], j], d[known[j], j], w[:, known[j]],
                                      bins).items():
                reps[j][m].append(v)
        if correct is not None:
            acc_reps.append(w @ correct / n)
    boot = [{m: (np.concatenate(r[m]) if r[m] else np.zeros(0)) for m in SITE_METRICS}
            for r in reps]
    classes = []
    for j, name in enumerate(preds.class_names):
        npos, nneg = int(ys[j].sum()), int((~ys[j]).sum())
        row = {"name": name, "n_pos": npos, "n_neg": nneg,
               "threshold": float(thr[j]) if rule != "argmax" else None,
               "reason": (f"no positive images of '{name}'" if npos == 0 else
                          f"no negative images of '{name}'" if nneg == 0 else ""),
               "reliability": reliability_bins(ys[j], p[known[j], j], bins)}
        for m in SITE_METRICS:
            row[m] = point[j][m]
            row[f"{m}_ci"] = _ci(boot[j][m], confidence)
            row[f"{m}_ci_dropped"] = _dropped(boot[j][m])
        classes.append(row)
    macro_boot = {m: _nanmean_rows([b[m] for b in boot]) for m in SITE_METRICS}
    macro: dict[str, Any] = {}
    for m in SITE_METRICS:
        macro[m] = _nanmean([c[m] for c in classes])
        macro[f"{m}_ci"] = _ci(macro_boot[m], confidence)
        macro[f"{m}_ci_dropped"] = _dropped(macro_boot[m])
        macro[f"{m}_ci_replicates_missing_a_class"] = _missing_a_class(
            [b[m] for b, c in zip(boot, classes) if np.isfinite(c[m])])
    if correct is not None:
        macro["accuracy"] = float(correct.mean())
        macro_boot["accuracy"] = np.concatenate(acc_reps) if acc_reps else np.zeros(0)
        macro["accuracy_ci"] = _ci(macro_boot["accuracy"], confidence)
    site = {"n": n, "split": preds.split, "model_id": preds.model_id,
            "dataset": preds.meta.get("dataset"), "split_warning": split_warning(preds),
            "decision": rule, "classes": classes, "macro": macro, **usage(preds)}
    return site, boot, macro_boot


def usage(preds: Predictions) -> dict[str, int | None]:
    """How many images of the dataset the predictions cover and why the others are not there,
    from the Predictions' meta (:func:`medscalpel.engine.api.predict_spec`): ``n_used``,
    ``n_total`` (files before de-duplication; ``None`` when not recorded),
    ``duplicates_removed`` (byte-identical copies dropped) and ``skipped`` (unreadable)."""
    m = preds.meta
    total = m.get("n_total")
    return {"n_used": int(m.get("n_used", preds.n)),
            "n_total": int(total) if total is not None else None,
            "duplicates_removed": int(m.get("duplicates_removed") or 0),
            "skipped": int(m.get("skipped") or 0)}


def _nanmean(vals: Sequence[float]) -> float:
    a = np.asarray(vals, dtype=float)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def _nanmean_rows(arrs: list[np.ndarray]) -> np.ndarray:
    """Row-wise mean over classes of the replicate arrays, ignoring NaN (all-NaN -> NaN)."""
    if not arrs or arrs[0].size == 0:
        return np.zeros(0)
    stack = np.stack(arrs)
    ok = np.isfinite(stack)
    cnt = ok.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, np.where(ok, stack, 0.0).sum(0) / cnt, np.nan)


def _missing_a_class(arrs: list[np.ndarray]) -> int:
    """Replicates whose macro mean left out a class scored on the full set (that class
    undefined on the resample, e.g. no positive drawn)."""
    if not arrs or arrs[0].size == 0:
        return 0
    return int((~np.isfinite(np.stack(arrs))).any(0).sum())


def _delta(a: float, b: float, ra: np.ndarray, rb: np.ndarray, confidence: float
           ) -> dict[str, Any]:
    """external - internal, CI from independent replicates of each side (unpaired); ``dropped``:
    replicate pairs left out because either side was undefined (NaN)."""
    if ra.size and rb.size:
        ci, dropped = bootstrap_ci(rb - ra, confidence)
        return {"value": b - a, "ci": list(ci), "dropped": dropped}
    return {"value": b - a, "ci": [float("nan")] * 2, "dropped": 0}


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True)
class ExternalValidation:
    """Internal vs external numbers of one model (see the module docstring).

    Attributes:
        class_names, task: the model's classes and task.
        thresholds, threshold_source: the operating point used (``model card`` /
            ``default 0.5`` / ``given``) and ``decision`` (threshold / binary / argmax).
        internal, external: per site ``{"n", "split", "dataset", "split_warning", "decision",
            "classes": [per-class dicts: n_pos, n_neg, threshold, auroc, auroc_ci, ap, ap_ci, ece,
            ece_ci, sensitivity(_ci), specificity(_ci), f1(_ci), reliability bins], "macro"}``.
        classes: per class ``{"name", "internal": {...}, "external": {...}, "delta": {metric:
            {"value", "ci"}}}`` (the site entries without the reliability bins).
        macro: ``{"internal", "external", "delta"}`` of the macro averages.
        n_boot, seed, confidence, bins: the bootstrap and the ECE binning.
        notes: what the reader must know (unpaired CIs, the split unit, class mapping).
    """

    class_names: tuple[str, ...]
    task: str
    thresholds: tuple[float, ...]
    threshold_source: str
    decision: str
    internal: dict[str, Any]
    external: dict[str, Any]
    classes: tuple[dict[str, Any], ...]
    macro: dict[str, Any]
    n_boot: int
    seed: int
    confidence: float
    bins: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "kind": "external_validation",
                "class_names": list(self.class_names), "task": self.task,
                "thresholds": list(self.thresholds), "threshold_source": self.threshold_source,
                "decision": self.decision, "internal": self.internal, "external": self.external,
                "classes": list(self.classes), "macro": self.macro, "n_boot": self.n_boot,
                "seed": self.seed, "confidence": self.confidence, "bins": self.bins,
                "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExternalValidation":
        if d.get("schema_version") != SCHEMA or d.get("kind") != "external_validation":
            raise DataError(f"Not an external-validation result of schema {SCHEMA}: "
                            f"schema_version={d.get('schema_version')!r}, kind={d.get('kind')!r}.")
        return cls(class_names=tuple(d["class_names"]), task=d["task"],
                   thresholds=tuple(float(t) for t in d["thresholds"]),
                   threshold_source=d["threshold_source"], decision=d["decision"],
                   internal=d["internal"], external=d["external"], classes=tuple(d["classes"]),
                   macro=d["macro"], n_boot=int(d["n_boot"]), seed=int(d["seed"]),
                   confidence=float(d["confidence"]), bins=int(d["bins"]),
                   notes=tuple(d.get("notes", ())))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExternalValidation":
        path = Path(path)
        return cls.from_dict(read_json(path / FILENAME if path.is_dir() else path))

    def table(self) -> list[dict[str, Any]]:
        """One row per class and site, plus the delta row (for the CLI)."""
        rows = []
        for c in self.classes:
            for side in ("internal", "external"):
                s = c[side]
                rows.append({"class": c["name"], "set": side, "pos/neg": f"{s['n_pos']}/{s['n_neg']}",
                             "AUROC": s["auroc"], "AUROC CI": tuple(s["auroc_ci"]),
                             "ECE": s["ece"], "sens": s["sensitivity"],
                             "spec": s["specificity"], "F1": s["f1"]})
            dl = c["delta"]
            rows.append({"class": c["name"], "set": "delta (ext-int)", "pos/neg": "",
                         "AUROC": dl["auroc"]["value"], "AUROC CI": tuple(dl["auroc"]["ci"]),
                         "ECE": dl["ece"]["value"], "sens": dl["sensitivity"]["value"],
                         "spec": dl["specificity"]["value"], "F1": dl["f1"]["value"]})
        return rows


def external_validation(model: Any, internal: Predictions, external: Predictions, *,
                        thresholds: Sequence[float] | None = None,
                        class_map: Mapping[str, str] | None = None, n_boot: int = 1000,
                        seed: int = 0, confidence: float = 0.95, bins: int = 10
                        ) -> ExternalValidation:
    """Internal vs external metrics of one model with bootstrap CIs and unpaired deltas.

    Args:
        model: a :class:`~medscalpel.models.classifier.MedClassifier` or
            :class:`~medscalpel.models.checkpoint.ModelCard` whose stored thresholds set the
            operating point, or ``None`` (then ``thresholds``, else 0.5 labelled as default).
        internal: predictions on the model's own (test) split.
        external: predictions of the same model on the external set.
        thresholds: per-class probability thresholds overriding the card's.
        class_map: external class name -> model class name, for an external Predictions whose
            class names differ (its columns are re-ordered to the model's).
        n_boot: bootstrap replicates per site (0: no CIs).
        seed, confidence: bootstrap seed and CI level.
        bins: equal-width probability bins of the ECE and the reliability diagram.

    Raises:
        DataError: the classes do not match (named; see :func:`map_class_names`) or the tasks
            differ.
    """
    check_range(n_boot, "n_boot", "external_validation", 0, integer=True)
    check_range(confidence, "confidence", "external_validation", 0.5, 0.999)
    check_range(bins, "bins", "external_validation", 2, 100, integer=True)
    if internal.task != external.task:
        raise DataError(f"The internal predictions are {internal.task} but the external ones are "
                        f"{external.task}; they must come from the same model.")
    internal.require_labels("external validation", "the internal predictions")
    external.require_labels("external validation", "the external set")
    external = _conform(external, internal.class_names, class_map)
    k = internal.num_classes
    if thresholds is not None:
        thr = np.asarray(thresholds, dtype=float).reshape(-1)
        if thr.shape != (k,):
            raise ConfigError(f"The 'thresholds' parameter of external_validation must hold one "
                              f"probability per class ({k}). Got {thr.size} instead.")
        source = "given"
    else:
        thr, source = stored_thresholds(model, k)
    si, bi, mi = _site(internal, thr, n_boot, seed, confidence, bins)
    se, be, me = _site(external, thr, n_boot, seed + 1, confidence, bins)
    classes = []
    for j, name in enumerate(internal.class_names):
        ci_, ce_ = si["classes"][j], se["classes"][j]
        classes.append({
            "name": name,
            "internal": {m: v for m, v in ci_.items() if m != "reliability"},
            "external": {m: v for m, v in ce_.items() if m != "reliability"},
            "delta": {m: _delta(ci_[m], ce_[m], bi[j][m], be[j][m], confidence)
                      for m in SITE_METRICS}})
    mkeys = list(SITE_METRICS) + (["accuracy"] if internal.task == "multiclass" else [])
    macro = {"internal": si["macro"], "external": se["macro"],
             "delta": {m: _delta(si["macro"][m], se["macro"][m], mi[m], me[m], confidence)
                       for m in mkeys}}
    notes = ["deltas are external - internal; CIs come from independent bootstraps of the two "
             "sets (unpaired: different images)",
             f"operating point: {source} thresholds, decision by {si['decision']}"]
    for side, s in (("internal", si), ("external", se)):
        if s["split_warning"]:
            notes.append(f"{side} set: {s['split_warning']}")
        if s["duplicates_removed"]:
            notes.append(f"{side} set: {s['duplicates_removed']} byte-identical duplicate "
                         f"image file(s) dropped before prediction (used {s['n_used']} of "
                         f"{s['n_total']} files)")
    if class_map:
        notes.append(f"external classes mapped: {dict(class_map)}")
    return ExternalValidation(
        class_names=tuple(internal.class_names), task=internal.task,
        thresholds=tuple(float(t) for t in thr), threshold_source=source,
        decision=si["decision"], internal=si, external=se, classes=tuple(classes), macro=macro,
        n_boot=n_boot, seed=seed, confidence=confidence, bins=bins, notes=tuple(notes))


def _conform(external: Predictions, model_classes: Sequence[str],
             class_map: Mapping[str, str] | None) -> Predictions:
    if tuple(external.class_names) == tuple(model_classes) and not class_map:
        return external
    cols = map_class_names(external.class_names, model_classes, class_map, external.task,
                           "the external predictions")
    if external.num_classes != len(model_classes):
        raise DataError(f"The external predictions have {external.num_classes} output columns "
                        f"but the model predicts {len(model_classes)} classes; predict the "
                        "external set with the model (predict_external) instead.")
    if external.task == "multilabel":
        labels = external.labels[:, cols]
    else:
        lookup = np.empty(len(cols), np.int64)
        lookup[cols] = np.arange(len(cols))
        labels = lookup[external.labels]
    return replace(external, logits=external.logits[:, cols], labels=labels,
                   class_names=tuple(model_classes))


# ----------------------------------------------------------------------------- figure
def plot_reliability(result: ExternalValidation, path: str | os.PathLike,
                     max_classes: int = 6) -> Path:
    """Reliability diagrams (observed frequency vs mean predicted probability per bin) of the
    internal and the external set, one panel per class (the ``max_classes`` with the largest
    external ECE), the ECE in each legend."""

    plt = pyplot()
    order = sorted(range(len(result.class_names)),
                   key=lambda j: -np.nan_to_num(result.external["classes"][j]["ece"], nan=-1))
    order = order[:max_classes]
    fig, axes = plt.subplots(1, len(order), figsize=(3.2 * len(order), 3.2), squeeze=False)
    for ax, j in zip(axes[0], order):
        for side, colour in (("internal", "tab:blue"), ("external", "tab:red")):
            c = getattr(result, side)["classes"][j]
            pts = c["reliability"]
            ax.plot([b["mean_pred"] for b in pts], [b["observed"] for b in pts], "o-",
                    color=colour, ms=3, label=f"{side} ECE {c['ece']:.3f}")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=result.class_names[j][:22],
               xlabel="mean predicted probability")
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("observed frequency")
    fig.suptitle(f"reliability: internal (n={result.internal['n']}) vs external "
                 f"(n={result.external['n']})", fontsize=9)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- compression
@dataclass(frozen=True)
class CompressionShift:
    """Does compression lose more on the external set than on the internal one?

    ``internal`` / ``external``: the paired comparisons (compressed - dense) on each set.
    ``classes``: per class the two deltas and ``extra`` = external delta - internal delta for
    AUROC / sensitivity / specificity, with an approximate CI (normal approximation from the two
    paired CIs; the sets are independent) and ``loses_more_externally`` when that CI lies below 0.
    """

    internal: PairedComparison
    external: PairedComparison
    classes: tuple[dict[str, Any], ...]
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "kind": "compression_shift",
                "internal": self.internal.to_dict(), "external": self.external.to_dict(),
                "classes": list(self.classes), "confidence": self.confidence}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompressionShift":
        return cls(internal=PairedComparison.from_dict(d["internal"]),
                   external=PairedComparison.from_dict(d["external"]),
                   classes=tuple(d["classes"]), confidence=float(d["confidence"]))


def compression_shift(dense_internal: Predictions, compressed_internal: Predictions,
                      dense_external: Predictions, compressed_external: Predictions, *,
                      thresholds: Sequence[float] | None = None, n_boot: int = 1000,
                      seed: int = 0, confidence: float = 0.95) -> CompressionShift:
    """Compressed vs dense on the internal AND the external set (paired CIs on each via
    :func:`~medscalpel.engine.compare.compare_predictions`), and per class how much more the
    compressed model loses externally."""

    ci = compare_predictions(dense_internal, compressed_internal, n_boot=n_boot, seed=seed,
                             thresholds=thresholds, confidence=confidence)
    ce = compare_predictions(dense_external, compressed_external, n_boot=n_boot, seed=seed + 1,
                             thresholds=thresholds, confidence=confidence)
    if ci.task != ce.task or [c.name for c in ci.classes] != [c.name for c in ce.classes]:
        raise DataError("The internal and external comparisons have different classes or tasks.")
    z = float(norm.ppf(0.5 + confidence / 2))
    rows = []
    for a, b in zip(ci.classes, ce.classes):
        row: dict[str, Any] = {"name": a.name}
        for m in ("auroc", "sens", "spec"):
            da, db = getattr(a, f"delta_{m}"), getattr(b, f"delta_{m}")
            sa = _se(getattr(a, f"delta_{m}_ci"), z)
            sb = _se(getattr(b, f"delta_{m}_ci"), z)
            extra = db - da
            half = z * float(np.hypot(sa, sb))
            lo, hi = extra - half, extra + half
            row[m] = {"internal_delta": da, "external_delta": db, "extra": extra,
                      "extra_ci": [lo, hi], "loses_more_externally": bool(np.isfinite(hi) and hi < 0)}
        rows.append(row)
    return CompressionShift(internal=ci, external=ce, classes=tuple(rows), confidence=confidence)


def _se(ci: Sequence[float], z: float) -> float:
    lo, hi = float(ci[0]), float(ci[1])
    return (hi - lo) / (2 * z) if np.isfinite(lo) and np.isfinite(hi) else float("nan")
