"""Per-image clinical decision-support reports (seed 000, point 5).

For every image the report gives

* the findings whose probability reaches their calibrated threshold (``model.card``), with the
  probability, the threshold and the margin above it in log-odds;
* mutual-exclusivity exclusion: when two reported findings (almost) never co-occur in the
  training labels (Jaccard index below ``jaccard_exclusion``), the stronger is kept and the
  other is listed as excluded, with the Jaccard value and the reason;
* channel-level evidence: the penultimate channels that contribute most to each finding's logit
  on this image (``W[k, c] * f_c(x)``), and which other findings each of them pushes (+W) or
  pulls (-W) (:mod:`medscalpel.explain.channels`);
* where the model looked: the Grad-CAM (or another CAM) of each finding mapped to lung zones in
  words ("right lower zone"; the patient's right is the image's left) and as an overlay;
* a plain statement that this is decision support, not a diagnosis.

Each report is a self-contained HTML page (the overlay is embedded) and a JSON file; a batch
writes one page per image and an ``index.html``.

Example:
    >>> from medscalpel.models import load_model  # doctest: +SKIP
    >>> reps = clinical_report(load_model("runs/model"), ["cxr1.png"], "runs/clinical",
    ...                        label_stats="runs/stats/stats.json")  # doctest: +SKIP
    >>> reps[0].findings[0].location  # doctest: +SKIP
    'right lower zone'
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.progress import track
from medscalpel.report.html import DECISION_SUPPORT, png_data_uri, render, safe_filename, write_html
from medscalpel.runs import write_json
from medscalpel.validation import check_fraction, check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
RANK_BY = ("margin", "probability")


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ReportedFinding:
    """A finding at or above its threshold that survived the exclusivity check.

    Attributes:
        class_index, name: the class.
        probability, threshold: the model's probability and the calibrated threshold.
        margin: ``logit - logit(threshold)`` (log-odds above the decision boundary).
        location: where the CAM points, in words (``"right lower zone"``).
        zone_fractions: share of the CAM mass per zone (largest first, at most four).
        logit_minus_bias: sum of all channel contributions (``logit - b[k]``).
        channels: the top channels (``ChannelRow.to_dict()``: channel, weight,
            mean_contribution = the contribution on this image, mean_activation, share,
            pushes, pulls).
    """

    class_index: int
    name: str
    probability: float
    threshold: float
    margin: float
    location: str = ""
    zone_fractions: dict[str, float] = field(default_factory=dict)
    logit_minus_bias: float = float("nan")
    channels: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"class_index": self.class_index, "class": self.name,
                "probability": self.probability, "threshold": self.threshold,
                "margin_logodds": self.margin, "location": self.location,
                "zone_fractions": dict(self.zone_fractions),
                "logit_minus_bias": self.logit_minus_bias, "channels": list(self.channels)}


@dataclass(frozen=True)
class ExcludedFinding:
    """A finding above its threshold that was excluded as mutually exclusive with a stronger
    one."""

    class_index: int
    name: str
    probability: float
    threshold: float
    margin: float
    excluded_by: str
    jaccard: float
    level: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"class_index": self.class_index, "class": self.name,
                "probability": self.probability, "threshold": self.threshold,
                "margin_logodds": self.margin, "excluded_by": self.excluded_by,
                "jaccard": self.jaccard, "jaccard_exclusion": self.level, "reason": self.reason}


@dataclass
class ClinicalReport:
    """The report of one image (``to_dict()`` is the JSON; :meth:`html` the page)."""

    image_id: str
    source: str
    findings: list[ReportedFinding]
    excluded: list[ExcludedFinding]
    probabilities: list[dict[str, Any]]
    model: dict[str, Any]
    cam_method: str
    zones_source: str
    jaccard_source: str
    jaccard_exclusion: float
    rank_by: str
    warnings: list[str] = field(default_factory=list)
    disclaimer: str = DECISION_SUPPORT
    created: str = ""
    overlay_png: bytes | None = field(default=None, repr=False)
    html_path: str | None = None
    json_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "kind": "clinical_report", "id": self.image_id,
                "source": self.source, "disclaimer": self.disclaimer,
                "findings": [f.to_dict() for f in self.findings],
                "excluded": [e.to_dict() for e in self.excluded],
                "probabilities": self.probabilities, "model": self.model,
                "cam_method": self.cam_method, "zones_source": self.zones_source,
                "jaccard_source": self.jaccard_source,
                "jaccard_exclusion": self.jaccard_exclusion, "rank_by": self.rank_by,
                "warnings": list(self.warnings), "created": self.created,
                "html": self.html_path}

    def summary(self) -> str:
        """One line: findings with probability and location, or "no finding"."""
        if not self.findings:
            return "no finding above its threshold"
        return "; ".join(f"{f.name} ({f.probability:.2f}, {f.location or 'location n/a'})"
                         for f in self.findings)

    def html(self) -> str:
        """The self-contained page (the overlay embedded as base64)."""
        overlay = png_data_uri(self.overlay_png) if self.overlay_png else None
        return render("clinical.html.j2", r=self.to_dict(), overlay=overlay,
                      title=f"Clinical report: {self.image_id}")

    def save(self, out_dir: str | os.PathLike, stem: str | None = None) -> tuple[Path, Path]:
        """Write ``<stem>.html`` and ``<stem>.json`` into ``out_dir``."""
        out = Path(out_dir)
        stem = stem or safe_filename(self.image_id)
        self.html_path = f"{stem}.html"
        self.json_path = f"{stem}.json"
        h = write_html(out / self.html_path, self.html())
        j = write_json(out / self.json_path, self.to_dict())
        return h, j


# ----------------------------------------------------------------------------- exclusivity
def logit_margin(logit: float, threshold: float) -> float:
    """``logit - log(t / (1 - t))``: how far a logit lies above the threshold, in log-odds."""
    t = min(max(float(threshold), 1e-7), 1 - 1e-7)
    return float(logit) - math.log(t / (1 - t))


def exclusivity_filter(candidates: Sequence[int], strength: Sequence[float],
                       jaccard: np.ndarray | None, level: float = 0.01,
                       class_names: Sequence[str] | None = None
                       ) -> tuple[list[int], list[dict[str, Any]]]:
    """Keep the strongest of mutually exclusive findings.

    Candidates are visited from strongest to weakest; one whose Jaccard index with an already
    kept finding is below ``level`` (the two almost never co-occur in the training labels) is
    excluded in favour of that stronger finding. A pair with an undefined Jaccard (NaN: neither
    class has a positive training label) is not evidence of exclusivity.

    Args:
        candidates: class indices above their thresholds.
        strength: one number per candidate (larger = stronger), e.g. the log-odds margin.
        jaccard: ``[K, K]`` training-label Jaccard matrix (``None``: nothing is excluded).
        level: Jaccard below which two findings count as mutually exclusive.
        class_names: names for the reasons.

    Returns:
        (kept class indices, strongest first; one dict per excluded class with ``index``,
        ``excluded_by`` (index), ``jaccard`` and ``reason``).

    Example:
        >>> J = np.array([[1.0, 0.0, 0.3], [0.0, 1.0, 0.2], [0.3, 0.2, 1.0]])
        >>> kept, excl = exclusivity_filter([0, 1, 2], [2.0, 1.0, 0.5], J, 0.01, "abc")
        >>> kept, [(e["index"], e["excluded_by"]) for e in excl]
        ([0, 2], [(1, 0)])
    """
    check_fraction(level, "jaccard_exclusion", "exclusivity_filter", allow_one=True)
    cand = [int(c) for c in candidates]
    st = [float(s) for s in strength]
    if len(cand) != len(st):
        raise ConfigError(f"exclusivity_filter: {len(cand)} candidates but {len(st)} strengths.")
    if len(set(cand)) != len(cand):
        raise ConfigError(f"exclusivity_filter: duplicate candidates in {cand}.")
    order = sorted(range(len(cand)), key=lambda i: (-st[i], cand[i]))
    kept: list[int] = []
    excluded: list[dict[str, Any]] = []
    j = None if jaccard is None else np.asarray(jaccard, float)
    if j is not None:
        k = max(cand) + 1 if cand else 0
        if j.ndim != 2 or j.shape[0] != j.shape[1] or j.shape[0] < k:
            raise DataError(f"exclusivity_filter: the Jaccard matrix has shape {j.shape}; it "
                            f"must be square and cover class index {k - 1}.")

    def name(i: int) -> str:
        return str(class_names[i]) if class_names is not None else f"class{i}"

    for i in order:
        c = cand[i]
        clash = None
        if j is not None:
            for kc in kept:
                v = j[c, kc]
                if np.isfinite(v) and v < level:
                    clash = (kc, float(v))
                    break
        if clash is None:
            kept.append(c)
            continue
        kc, v = clash
        how = "never co-occur" if v == 0 else "almost never co-occur"
        excluded.append({
            "index": c, "excluded_by": kc, "jaccard": v,
            "reason": (f"'{name(c)}' and '{name(kc)}' {how} in the training labels "
                       f"(Jaccard {v:.4f} < {level:g}); '{name(kc)}' has the stronger evidence, "
                       f"so '{name(c)}' is not reported."),
        })
    return kept, excluded


def resolve_jaccard(label_stats: Any, class_names: Sequence[str]) -> tuple[np.ndarray | None, str]:
    """The ``[K, K]`` training-label Jaccard matrix in the model's class order, and its source.

    ``label_stats`` is a :class:`~medscalpel.data.stats.LabelStats`, its ``to_dict()``, a path to
    ``stats.json``, a ``[K, K]`` array, or ``None`` (no exclusivity check).
    """
    from medscalpel.data.stats import LabelStats

    names = [str(c) for c in class_names]
    if label_stats is None:
        return None, "none"
    source = "matrix"
    if isinstance(label_stats, (str, os.PathLike)):
        source = str(label_stats)
        label_stats = LabelStats.load(label_stats)
    elif isinstance(label_stats, dict):
        source = "label statistics"
        label_stats = LabelStats.from_dict(label_stats)
    if isinstance(label_stats, LabelStats):
        source = source if source != "matrix" else "label statistics"
        if label_stats.spec or label_stats.split:
            source = f"{label_stats.spec or 'labels'} ({label_stats.split or 'all'})" \
                if source == "label statistics" else source
        missing = [n for n in names if n not in label_stats.class_names]
        if missing:
            raise DataError(f"The label statistics lack the model's class(es) {missing[:5]}; "
                            "compute them on the labels the model was trained with "
                            "('medscalpel data stats').")
        idx = [label_stats.class_names.index(n) for n in names]
        return label_stats.jaccard_matrix()[np.ix_(idx, idx)], source
    arr = np.asarray(label_stats, dtype=float)
    if arr.shape != (len(names), len(names)):
        raise DataError(f"The Jaccard matrix has shape {arr.shape}; the model has {len(names)} "
                        "classes, so it must be square of that size (in the model's class order).")
    return arr, source


# ----------------------------------------------------------------------------- inputs
def _load_inputs(model: Any, images: Any, image_ids: Sequence[str] | None
                 ) -> tuple[torch.Tensor, list[str], list[str]]:
    card = getattr(model, "card", None)
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise DataError(f"clinical_report: images as a tensor must be [N, C, H, W]; got "
                            f"shape {tuple(images.shape)}.")
        items: list[Any] = list(images)
    elif isinstance(images, (str, os.PathLike, np.ndarray)):
        items = [images]
    else:
        items = list(images)
    if not items:
        raise DataError("clinical_report got no images.")
    xs, ids, sources = [], [], []
    for i, it in enumerate(items):
        if isinstance(it, (str, os.PathLike)):
            from medscalpel.data.io import read_image

            if card is None:
                raise ModelError("clinical_report: reading image files needs the model's card "
                                 "(its preprocessing); load the model with load_model.")
            pp = card.preprocess
            xs.append(pp(read_image(it, colour=pp.colour)))
            ids.append(Path(it).name)
            sources.append(str(it))
        elif isinstance(it, np.ndarray):
            if card is None:
                raise ModelError("clinical_report: raw arrays need the model's card "
                                 "(its preprocessing); load the model with load_model.")
            xs.append(card.preprocess(it))
            ids.append(f"image{i}")
            sources.append("array")
        elif isinstance(it, torch.Tensor) and it.ndim == 3:
            xs.append(it.detach().float().cpu())
            ids.append(f"image{i}")
            sources.append("tensor")
        else:
            raise DataError(f"clinical_report: image {i} is a {type(it).__name__}"
                            f"{tuple(getattr(it, 'shape', ()))}; give file paths, raw grey "
                            "arrays [H, W] or preprocessed tensors [C, H, W].")
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise DataError(f"clinical_report: the images have different shapes {sorted(shapes)}.")
    if image_ids is not None:
        if len(image_ids) != len(xs):
            raise DataError(f"clinical_report: {len(xs)} images but {len(image_ids)} image_ids.")
        ids = [str(s) for s in image_ids]
    return torch.stack(xs), ids, sources


def _display(model: Any, x: torch.Tensor) -> np.ndarray:
    card = getattr(model, "card", None)
    if card is not None:
        try:
            return card.preprocess.denormalize(x).numpy()
        except Exception:  # a card whose mean/std do not fit the tensor: show it as is
            pass
    return x.mean(0).numpy()


def _zones_for(model: Any, x: torch.Tensor, given: Any) -> tuple[Any, str, list[str]]:
    from medscalpel.explain.regions import estimate_lung_field

    if given is not None:
        return given, getattr(given, "source", "given"), []
    try:
        est = estimate_lung_field(_display(model, x))
    except DataError as exc:
        return None, "unavailable", [f"lung zones unavailable: {exc}"]
    warns = [f"lung field: {w}" for w in est.quality.get("warnings", [])]
    return est.zones(), est.source, warns


# ----------------------------------------------------------------------------- main
def clinical_report(
    model: Any,
    images: Any,
    out_dir: str | os.PathLike | None = None,
    label_stats: Any = None,
    jaccard_exclusion: float = 0.01,
    cam_method: str = "gradcam",
    image_ids: Sequence[str] | None = None,
    zones: Sequence[Any] | None = None,
    top_channels: int = 5,
    rank_by: str = "margin",
    progress: bool | None = None,
) -> list[ClinicalReport]:
    """Decision-support reports of ``images`` by ``model``.

    Args:
        model: a :class:`~medscalpel.models.classifier.MedClassifier` with a card (thresholds,
            class names, preprocessing); it is not changed.
        images: image file paths, raw grey arrays, preprocessed ``[C, H, W]`` tensors or one
            ``[N, C, H, W]`` tensor.
        out_dir: where to write ``<id>.html``, ``<id>.json`` per image and ``index.html``
            (``None``: nothing is written).
        label_stats: the training labels' statistics for the exclusivity check: a
            :class:`~medscalpel.data.stats.LabelStats`, its dict, a ``stats.json`` path or a
            ``[K, K]`` Jaccard matrix (model class order). ``None`` skips the check (the report
            says so).
        jaccard_exclusion: Jaccard index below which two findings are mutually exclusive.
        cam_method: ``gradcam``, ``gradcam++`` or ``scorecam``.
        image_ids: ids shown in the reports (default: file names, or ``image<i>``).
        zones: ground-truth :class:`~medscalpel.explain.regions.LungZones` per image (e.g. the
            phantom's masks); default: estimated lung fields.
        top_channels: channels listed per finding.
        rank_by: which of two exclusive findings is stronger: ``margin`` (log-odds above the
            threshold) or ``probability``.
        progress: progress bar (``None``: follow ``MEDSCALPEL_PROGRESS``).

    Returns:
        One :class:`ClinicalReport` per image, in input order.
    """
    from medscalpel.explain.cams import compute_cam
    from medscalpel.explain.channels import channel_contributions_from_model
    from medscalpel.explain.regions import ZONE_PHRASES, describe_location
    from medscalpel.report.figures import clinical_overlay_png

    check_fraction(jaccard_exclusion, "jaccard_exclusion", "clinical_report", allow_one=True)
    check_range(top_channels, "top_channels", "clinical_report", 1, integer=True)
    check_in(rank_by, "rank_by", "clinical_report", RANK_BY)
    if not isinstance(getattr(model, "classifier", None), torch.nn.Linear):
        raise ModelError(f"clinical_report needs a MedClassifier; got {type(model).__name__}. "
                         "Load it with medscalpel.models.load_model.")
    x, ids, sources = _load_inputs(model, images, image_ids)
    n = int(x.shape[0])
    if zones is not None and len(zones) != n:
        raise DataError(f"clinical_report: {n} images but {len(zones)} zone maps.")
    card = getattr(model, "card", None)
    k = int(model.classifier.out_features)
    names = list(card.class_names) if card is not None else [f"class{i}" for i in range(k)]
    task = card.task if card is not None else "multilabel"
    thresholds = card.effective_thresholds() if card is not None else [0.5] * k
    if len(names) != k or len(thresholds) != k:
        raise ModelError(f"clinical_report: the card has {len(names)} class names and "
                         f"{len(thresholds)} thresholds but the model has {k} outputs.")
    jac, jac_source = resolve_jaccard(label_stats, names)

    cc = channel_contributions_from_model(model, x, ids=ids, progress=False)
    logits = cc.logits()
    if task == "multiclass":
        z = logits - logits.max(1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    else:
        probs = 1.0 / (1.0 + np.exp(-logits))

    # decide, per image, which findings are reported
    plans = []
    for i in range(n):
        if task == "multiclass":
            cands = [int(np.argmax(probs[i]))]
        else:
            cands = [j for j in range(k) if probs[i, j] >= thresholds[j]]
        margins = {j: logit_margin(logits[i, j], thresholds[j]) for j in range(k)}
        strength = [margins[j] if rank_by == "margin" else probs[i, j] for j in cands]
        kept, excl = exclusivity_filter(cands, strength, jac if task != "multiclass" else None,
                                        jaccard_exclusion, names)
        plans.append((kept, excl, margins))

    # one CAM pass for every (image, reported finding)
    pairs = [(i, j) for i, (kept, _, _) in enumerate(plans) for j in kept]
    cam_maps: dict[tuple[int, int], np.ndarray] = {}
    if pairs:
        res = compute_cam(model, x[[p[0] for p in pairs]], [p[1] for p in pairs],
                          method=cam_method, progress=progress)
        cam_maps = {p: res.maps[t] for t, p in enumerate(pairs)}

    model_info = {"arch": getattr(model, "arch", type(model).__name__),
                  "model_id": getattr(card, "model_id", "") if card is not None else "",
                  "task": task, "class_names": names, "thresholds": thresholds,
                  "thresholds_calibrated": bool(card is not None and card.thresholds is not None)}
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    reports: list[ClinicalReport] = []
    for i in track(range(n), "clinical reports", progress=progress):
        kept, excl, margins = plans[i]
        warns: list[str] = []
        zi, zsource, zw = _zones_for(model, x[i], zones[i] if zones is not None else None)
        warns += zw
        if jac is None:
            warns.append("no training-label statistics given: mutual exclusivity not checked")
        if card is None or card.thresholds is None:
            warns.append("the model has no calibrated thresholds: 0.5 is used for every class")
        findings = []
        for j in kept:
            cam = cam_maps[(i, j)]
            loc, fr = "", {}
            if zi is not None:
                zr = zi.resized(cam.shape)
                loc = describe_location(cam, zr)
                f = zr.fractions(cam)
                top = sorted(((v, nm) for nm, v in f.items() if np.isfinite(v) and v > 0),
                             reverse=True)[:4]
                fr = {ZONE_PHRASES[nm]: float(v) for v, nm in top}
            tc = cc.top_channels(j, n=top_channels, rows=[i], rows_desc=ids[i])
            findings.append(ReportedFinding(
                class_index=j, name=names[j], probability=float(probs[i, j]),
                threshold=float(thresholds[j]), margin=margins[j], location=loc,
                zone_fractions=fr, logit_minus_bias=float(tc.mean_logit_minus_bias),
                channels=tuple(r.to_dict() for r in tc.rows)))
        excluded = [ExcludedFinding(
            class_index=e["index"], name=names[e["index"]],
            probability=float(probs[i, e["index"]]), threshold=float(thresholds[e["index"]]),
            margin=margins[e["index"]], excluded_by=names[e["excluded_by"]],
            jaccard=e["jaccard"], level=float(jaccard_exclusion), reason=e["reason"])
            for e in excl]
        status = {f.class_index: "reported" for f in findings}
        status.update({e.class_index: "excluded" for e in excluded})
        table = [{"class_index": j, "class": names[j], "probability": float(probs[i, j]),
                  "threshold": float(thresholds[j]), "margin_logodds": margins[j],
                  "status": status.get(j, "below threshold")} for j in range(k)]
        table.sort(key=lambda r: -r["probability"])
        overlay = None
        if findings:
            overlay = clinical_overlay_png(
                _display(model, x[i]), [cam_maps[(i, f.class_index)] for f in findings],
                [f"{f.name} ({f.probability:.2f})\n{f.location or 'location n/a'}"
                 for f in findings],
                zones=zi)
        reports.append(ClinicalReport(
            image_id=ids[i], source=sources[i], findings=findings, excluded=excluded,
            probabilities=table, model=model_info, cam_method=cam_method, zones_source=zsource,
            jaccard_source=jac_source, jaccard_exclusion=float(jaccard_exclusion),
            rank_by=rank_by, warnings=warns, created=created, overlay_png=overlay))
    if out_dir is not None:
        write_clinical_reports(reports, out_dir)
    return reports


def write_clinical_reports(reports: Sequence[ClinicalReport], out_dir: str | os.PathLike,
                           title: str = "Clinical decision-support reports") -> Path:
    """Write every report (``<id>.html`` + ``<id>.json``) and ``index.html`` + ``index.json``
    into ``out_dir``; returns the index page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    rows = []
    for r in reports:
        r.save(out, safe_filename(r.image_id, used))
        rows.append({"id": r.image_id, "html": r.html_path, "json": r.json_path,
                     "summary": r.summary(), "n_findings": len(r.findings),
                     "n_excluded": len(r.excluded),
                     "findings": [{"class": f.name, "probability": f.probability,
                                   "location": f.location} for f in r.findings],
                     "excluded": [{"class": e.name, "excluded_by": e.excluded_by,
                                   "jaccard": e.jaccard} for e in r.excluded]})
    write_json(out / "index.json", {"schema_version": SCHEMA, "kind": "clinical_index",
                                    "disclaimer": DECISION_SUPPORT, "reports": rows})
    return write_html(out / "index.html", render("clinical_index.html.j2", title=title,
                                                 rows=rows, disclaimer=DECISION_SUPPORT))
