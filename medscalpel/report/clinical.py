"""Per-image clinical decision-support reports (seed 000, point 5; issue 21).

For every image the report gives

* every finding the model's **operating point** calls
  (:class:`~medscalpel.models.operating_point.OperatingPoint`, ``card.decision_point()``):
  multi-label, each class whose probability reaches its threshold; two-class, the positive class
  only when its probability reaches the cut (below it: no finding, the decision is the other
  class); multi-class, the argmax. Each with the probability, the cut, the margin
  ``log-odds(p) - log-odds(cut)`` (multi-class: ``log(p) - log(p of the runner-up)``), where the
  cut came from (fitted on which split / site, by which method, or "0.5 (not calibrated)") and
  its sensitivity / specificity with CIs (measured with the operating point, or from a given
  calibration result). A model without a calibrated operating point is announced at the top;
* **conflict flags**: when two reported findings are mutually exclusive *by evidence* in the
  training labels (:mod:`medscalpel.data.cooccurrence`: co-occurrence significantly below
  independence, with enough expected co-occurrences and enough images), both findings carry a
  flag with the numbers (observed / expected, lift with its CI, exact p, n). Nothing is hidden
  by default; ``conflicts="hide"`` hides the weaker of a conflicting pair, and the page says so
  at the top and lists what was hidden. A low Jaccard index is never used: it only says that
  one finding is rare;
* channel-level evidence: the penultimate channels that contribute most to each finding's logit
  on this image (``W[k, c] * f_c(x)``, signed), and which other findings each of them pushes
  (+W) or pulls (-W) (:mod:`medscalpel.explain.channels`); a share of the logit is given only
  for a channel that pushes the same way as the total, the others are marked "against";
* where the model looked: the CAM of each finding as an overlay, and in lung-zone words ("right
  lower zone"; the patient's right is the image's left) only when the CAM's own resolution (the
  CAM layer's map, before upsampling) is at least ``min_cam_size`` x ``min_cam_size``
  (default 7: a map coarser than that has fewer cells than a lung has zones across its height
  and width, so "right lower zone" would be an artefact of bilinear upsampling). Otherwise the
  report says "map too coarse to localise". The page names the model input size and the CAM
  map size;
* a plain statement that this is decision support, not a diagnosis.

The work is split into named steps: :func:`_validate` -> :func:`_gather` ->
:func:`exclusion_plan` -> :func:`operating_points` -> :func:`cam_resolution` / :func:`_localise`
-> :func:`_render`.

Example:
    >>> from medscalpel.models import load_model  # doctest: +SKIP
    >>> reps = clinical_report(load_model("runs/model"), ["cxr1.png"], "runs/clinical",
    ...                        label_stats="runs/stats/stats.json")  # doctest: +SKIP
    >>> reps[0].findings[0].operating_point.origin  # doctest: +SKIP
    'calibrated'
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscalpel.data.cooccurrence import CooccurrenceEvidence, ExclusionRule
from medscalpel.data.stats import LabelStats
from medscalpel.errors import DataError, ModelError
from medscalpel.models.operating_point import STORED_METHOD, OperatingPoint
from medscalpel.progress import track
from medscalpel.report.html import DECISION_SUPPORT, png_data_uri, render, safe_filename, write_html
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 2  # 2: conflict flags (evidence), operating points, resolution; no Jaccard exclusion
#: how the JSON names the per-finding margin of an operating point
MARGIN_FIELD = "margin_logodds"
RANK_BY = ("margin", "probability")
CONFLICT_MODES = ("flag", "hide")
#: smallest CAM map side (cells) at which lung-zone words are given
MIN_CAM_SIZE = 7
COARSE = "map too coarse to localise"
NOT_CALIBRATED = ("No calibrated thresholds: every finding uses the default threshold 0.5, which "
                  "was not chosen for this model or for any clinical operating point. Calibrate "
                  "the thresholds on a validation split ('medscalpel repair calibrate') before "
                  "relying on these findings.")
#: the notice of a multi-class model without a calibrated operating point
NOT_CALIBRATED_ARGMAX = ("No calibrated operating point: the finding is the argmax class of "
                         "uncalibrated softmax probabilities. Calibrate the model on a "
                         "validation split ('medscalpel repair calibrate --model') before "
                         "relying on these probabilities.")


def _f(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _j(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ClassOperatingPoint:
    """One class's view of the model's operating point in a report: its cut, where it came
    from and how it performs.

    Attributes:
        threshold: the probability cut (NaN where the class has none: the other class of a
            two-class model, decided by the positive class's cut; a multi-class argmax).
        origin: ``calibrated``, ``calibration_fallback`` (calibration kept the default because
            the fitting split had no positive or no negative) or ``default``.
        description: the origin in words, e.g. ``calibrated on split 'val' (youden)`` or
            ``0.5 (not calibrated)``.
        fit_split, method: the calibration's fitting split and method ("" when unknown).
        sensitivity, specificity: at this operating point on ``split`` (NaN when unavailable),
            with their CIs (``sensitivity_ci`` / ``specificity_ci``; NaN when not given).
        split: the split those were measured on; n_pos / n_neg: its positives / negatives.
        note: e.g. that the measurement split is the fitting split (optimistic).
    """

    threshold: float
    origin: str
    description: str
    fit_split: str = ""
    method: str = ""
    sensitivity: float = float("nan")
    specificity: float = float("nan")
    split: str = ""
    n_pos: int = 0
    n_neg: int = 0
    note: str = ""
    sensitivity_ci: tuple[float, float] = (float("nan"), float("nan"))
    specificity_ci: tuple[float, float] = (float("nan"), float("nan"))

    @property
    def measured(self) -> bool:
        return math.isfinite(self.sensitivity) or math.isfinite(self.specificity)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": _j(self.threshold), "origin": self.origin,
                "description": self.description, "fit_split": self.fit_split,
                "method": self.method, "sensitivity": _j(self.sensitivity),
                "sensitivity_ci": [_j(float(v)) for v in self.sensitivity_ci],
                "specificity": _j(self.specificity),
                "specificity_ci": [_j(float(v)) for v in self.specificity_ci],
                "split": self.split, "n_pos": self.n_pos, "n_neg": self.n_neg, "note": self.note}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClassOperatingPoint":
        nan2 = (None, None)
        return cls(threshold=_f(d.get("threshold")), origin=str(d["origin"]),
                   description=str(d.get("description", "")),
                   fit_split=str(d.get("fit_split", "")), method=str(d.get("method", "")),
                   sensitivity=_f(d.get("sensitivity")), specificity=_f(d.get("specificity")),
                   split=str(d.get("split", "")), n_pos=int(d.get("n_pos", 0)),
                   n_neg=int(d.get("n_neg", 0)), note=str(d.get("note", "")),
                   sensitivity_ci=tuple(_f(v) for v in (d.get("sensitivity_ci") or nan2)),
                   specificity_ci=tuple(_f(v) for v in (d.get("specificity_ci") or nan2)))


@dataclass(frozen=True)
class Conflict:
    """An evidence-based mutual-exclusivity conflict of a finding with another one.

    Attributes:
        other, other_index: the other finding.
        evidence: :meth:`PairEvidence.to_dict` of the pair (n, observed, expected, lift,
            lift_ci, p_value, ...).
        message: the flag in words, with the numbers.
        hidden_other: the other finding was hidden because of this conflict (``hide`` mode).
    """

    other: str
    other_index: int
    evidence: dict[str, Any]
    message: str
    hidden_other: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"with": self.other, "with_index": self.other_index, "evidence": self.evidence,
                "message": self.message, "hidden_other": self.hidden_other}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Conflict":
        return cls(other=str(d["with"]), other_index=int(d["with_index"]),
                   evidence=dict(d["evidence"]), message=str(d["message"]),
                   hidden_other=bool(d.get("hidden_other", False)))


@dataclass(frozen=True)
class ReportedFinding:
    """A finding at or above its threshold, listed in the report.

    Attributes:
        class_index, name: the class.
        probability, threshold: the probability (by the operating point: after its temperature)
            and the cut (NaN for a multi-class argmax).
        margin: ``log-odds(probability) - log-odds(threshold)``: how far above the cut, in
            log-odds (multi-class: ``log(p) - log(p of the runner-up class)``).
        location: where the CAM points, in words (``"right lower zone"``), or
            ``"map too coarse to localise"``.
        zone_fractions: share of the CAM mass per zone (largest first, at most four; empty when
            the map is too coarse).
        logit_minus_bias: sum of all channel contributions (``logit - b[k]``).
        channels: the top channels (``ChannelRow.to_dict()``).
        conflicts: evidence-based exclusivity flags with other findings above threshold.
        operating_point: the threshold's origin and sensitivity / specificity.
        localised: whether zone words were given (CAM resolution sufficient).
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
    conflicts: tuple[Conflict, ...] = ()
    operating_point: ClassOperatingPoint | None = None
    localised: bool = True

    @property
    def flagged(self) -> bool:
        return bool(self.conflicts)

    def to_dict(self) -> dict[str, Any]:
        return {"class_index": self.class_index, "class": self.name,
                "probability": self.probability, "threshold": _j(self.threshold),
                "margin_logodds": _j(self.margin), "location": self.location,
                "localised": self.localised, "zone_fractions": dict(self.zone_fractions),
                "logit_minus_bias": _j(self.logit_minus_bias), "channels": list(self.channels),
                "flagged": self.flagged, "conflicts": [c.to_dict() for c in self.conflicts],
                "operating_point": None if self.operating_point is None
                else self.operating_point.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ReportedFinding":
        op = d.get("operating_point")
        return cls(class_index=int(d["class_index"]), name=str(d["class"]),
                   probability=float(d["probability"]), threshold=_f(d.get("threshold")),
                   margin=_f(d.get("margin_logodds")), location=str(d.get("location", "")),
                   zone_fractions=dict(d.get("zone_fractions", {})),
                   logit_minus_bias=_f(d.get("logit_minus_bias")),
                   channels=tuple(d.get("channels", ())),
                   conflicts=tuple(Conflict.from_dict(c) for c in d.get("conflicts", ())),
                   operating_point=None if op is None else ClassOperatingPoint.from_dict(op),
                   localised=bool(d.get("localised", True)))


@dataclass(frozen=True)
class ExcludedFinding:
    """A finding above its threshold that was hidden (only with ``conflicts="hide"``) because
    the evidence says it is mutually exclusive with a stronger reported finding."""

    class_index: int
    name: str
    probability: float
    threshold: float
    margin: float
    excluded_by: str
    evidence: dict[str, Any]
    reason: str
    operating_point: ClassOperatingPoint | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"class_index": self.class_index, "class": self.name,
                "probability": self.probability, "threshold": _j(self.threshold),
                "margin_logodds": _j(self.margin), "hidden": True, "excluded_by": self.excluded_by,
                "evidence": self.evidence, "lift": self.evidence.get("lift"),
                "jaccard": self.evidence.get("jaccard"), "reason": self.reason,
                "operating_point": None if self.operating_point is None
                else self.operating_point.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExcludedFinding":
        op = d.get("operating_point")
        return cls(class_index=int(d["class_index"]), name=str(d["class"]),
                   probability=float(d["probability"]), threshold=_f(d.get("threshold")),
                   margin=_f(d.get("margin_logodds")), excluded_by=str(d["excluded_by"]),
                   evidence=dict(d.get("evidence", {})), reason=str(d.get("reason", "")),
                   operating_point=None if op is None else ClassOperatingPoint.from_dict(op))


@dataclass
class ClinicalReport:
    """The report of one image (``to_dict()`` is the JSON; :meth:`html` the page).

    ``exclusion`` says how conflicts were handled (mode, rule, statistics source and size,
    whether exclusion could apply at all); ``operating`` whether the thresholds are calibrated
    (with the notice shown at the top when they are not); ``resolution`` the model input size,
    the CAM map size and whether it supports zone words.
    """

    image_id: str
    source: str
    findings: list[ReportedFinding]
    excluded: list[ExcludedFinding]
    probabilities: list[dict[str, Any]]
    model: dict[str, Any]
    cam_method: str
    zones_source: str
    exclusion: dict[str, Any]
    operating: dict[str, Any]
    resolution: dict[str, Any]
    rank_by: str
    warnings: list[str] = field(default_factory=list)
    disclaimer: str = DECISION_SUPPORT
    #: the class the operating point decides for (two-class and multi-class models; "" for
    #: multi-label, whose decisions are the findings)
    decision: str = ""
    created: str = ""
    #: the report names the images by their own file names / patient identifiers because the
    #: user asked for it (``--keep-identifiers``): marked at the top of the page
    identifiers_kept: bool = False
    overlay_png: bytes | None = field(default=None, repr=False)
    html_path: str | None = None
    json_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "kind": "clinical_report", "id": self.image_id,
                "source": self.source, "disclaimer": self.disclaimer,
                "operating": self.operating, "exclusion": self.exclusion,
                "resolution": self.resolution,
                "findings": [f.to_dict() for f in self.findings],
                "excluded": [e.to_dict() for e in self.excluded],
                "probabilities": self.probabilities, "model": self.model,
                "cam_method": self.cam_method, "zones_source": self.zones_source,
                "rank_by": self.rank_by, "warnings": list(self.warnings),
                "decision": self.decision, "created": self.created, "html": self.html_path,
                "identifiers_kept": self.identifiers_kept}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClinicalReport":
        """A report from its JSON (schema 2; the overlay is not stored in the JSON)."""
        if int(d.get("schema_version", 1)) != SCHEMA:
            raise DataError(f"Clinical report schema {d.get('schema_version')} is not the one "
                            f"this medscalpel reads ({SCHEMA}); rebuild the report.")
        return cls(image_id=str(d["id"]), source=str(d.get("source", "")),
                   findings=[ReportedFinding.from_dict(f) for f in d.get("findings", [])],
                   excluded=[ExcludedFinding.from_dict(e) for e in d.get("excluded", [])],
                   probabilities=list(d.get("probabilities", [])), model=dict(d["model"]),
                   cam_method=str(d.get("cam_method", "")),
                   zones_source=str(d.get("zones_source", "")),
                   exclusion=dict(d["exclusion"]), operating=dict(d["operating"]),
                   resolution=dict(d["resolution"]), rank_by=str(d.get("rank_by", "margin")),
                   warnings=list(d.get("warnings", [])),
                   disclaimer=str(d.get("disclaimer", DECISION_SUPPORT)),
                   decision=str(d.get("decision", "")),
                   created=str(d.get("created", "")), html_path=d.get("html"),
                   identifiers_kept=bool(d.get("identifiers_kept", False)))

    def summary(self) -> str:
        """One line: findings with probability, location and flags, or "no finding"."""
        if not self.findings:
            return "no finding above its threshold" + (f" (decision: {self.decision})"
                                                       if self.decision else "")
        parts = []
        for f in self.findings:
            s = f"{f.name} ({f.probability:.2f}, {f.location or 'location n/a'})"
            if f.conflicts:
                s += " [conflict: " + ", ".join(c.other for c in f.conflicts) + "]"
            parts.append(s)
        return "; ".join(parts)

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


# ----------------------------------------------------------------------------- evidence
def logit_margin(logit: float, threshold: float) -> float:
    """``logit - log(t / (1 - t))``: how far a logit lies above the threshold, in log-odds."""
    t = min(max(float(threshold), 1e-7), 1 - 1e-7)
    return float(logit) - math.log(t / (1 - t))


def signed_channel(row: Mapping[str, Any], logit_minus_bias: float) -> dict[str, Any]:
    """A channel row with its direction: ``for`` (its contribution has the sign of the class
    logit minus bias, which is positive) or ``against``. ``share`` (of logit minus bias) is kept
    only for a channel ``for`` a positive total; otherwise None, because a share of a negative
    or opposite total reads as support it is not. The signed ``mean_contribution`` stays."""
    out = dict(row)
    c = float(out.get("mean_contribution", float("nan")))
    total = float(logit_minus_bias)
    out["direction"] = "for" if c > 0 else "against" if c < 0 else "none"
    if not (math.isfinite(total) and total > 0 and c > 0):
        out["share"] = None
    return out


def resolve_evidence(label_stats: Any, class_names: Sequence[str],
                     rule: ExclusionRule | None = None
                     ) -> CooccurrenceEvidence | None:
    """The training labels' co-occurrence evidence for the model's classes.

    ``label_stats`` is a :class:`~medscalpel.data.stats.LabelStats`, a
    :class:`~medscalpel.data.cooccurrence.CooccurrenceEvidence`, the dict of either, a path to
    their JSON (``stats.json`` of ``medscalpel data stats``), or ``None`` (no check). Statistics
    of an older schema are read (their counts give the evidence); a bare Jaccard matrix is
    refused: it is no evidence of exclusivity.

    Raises:
        DataError: another label set than the model's, a Jaccard matrix, an unknown type.
    """
    if label_stats is None:
        return None
    where = "the label statistics"
    if isinstance(label_stats, (str, os.PathLike)):
        where = str(label_stats)
        label_stats = read_json(label_stats)
    if isinstance(label_stats, Mapping):
        label_stats = CooccurrenceEvidence.from_dict(label_stats) \
            if label_stats.get("kind") == "cooccurrence_evidence" \
            else LabelStats.from_dict(dict(label_stats))
    if isinstance(label_stats, LabelStats):
        ev = label_stats.cooccurrence_evidence(rule)
    elif isinstance(label_stats, CooccurrenceEvidence):
        ev = label_stats if rule is None else label_stats.with_rule(rule)
    elif isinstance(label_stats, (np.ndarray, list, tuple)):
        raise DataError("clinical_report: label_stats is a matrix (a Jaccard matrix?); a low "
                        "Jaccard index only says that one finding is rare and is no evidence of "
                        "mutual exclusivity. Pass the training labels' LabelStats or stats.json "
                        "('medscalpel data stats').")
    else:
        raise DataError(f"clinical_report: label_stats is a {type(label_stats).__name__}; give a "
                        "LabelStats, a CooccurrenceEvidence, their dict or a stats.json path.")
    names = [str(c) for c in class_names]
    missing = [n for n in names if n not in ev.class_names]
    extra = [n for n in ev.class_names if n not in names]
    if missing or extra:
        raise DataError(f"The label statistics ({where}, {ev.source or 'unknown source'}) are of "
                        f"another label set than the model's: missing {missing[:5]}, extra "
                        f"{extra[:5]}. Compute them on the labels the model was trained with "
                        "('medscalpel data stats').")
    return ev


def _conflict_message(a: str, b: str, ev: Any, hidden: str | None) -> str:
    tail = (f"'{hidden}' was hidden (hide option)." if hidden else
            "Both are reported: read the image with this conflict in mind.")
    return (f"'{a}' and '{b}' are mutually exclusive in the training labels by the evidence "
            f"rule: {ev.summary()}. {tail}")


def exclusion_plan(candidates: Sequence[int], strength: Sequence[float],
                   evidence: CooccurrenceEvidence | None, class_names: Sequence[str],
                   mode: str = "flag") -> tuple[list[int], list[dict[str, Any]],
                                                 dict[int, list[Conflict]]]:
    """Which findings above threshold are listed, hidden and flagged.

    Every pair of candidates that the evidence calls mutually exclusive is a conflict, flagged
    on both findings. With ``mode="flag"`` (the default) every candidate is listed. With
    ``mode="hide"`` candidates are visited strongest first and one in conflict with an already
    listed finding is hidden in favour of it. Without evidence nothing is flagged or hidden.

    Args:
        candidates: class indices above their thresholds.
        strength: one number per candidate (larger = stronger), e.g. the log-odds margin.
        evidence: the training labels' :class:`CooccurrenceEvidence` (model class names).
        class_names: the model's class names.
        mode: ``flag`` or ``hide``.

    Returns:
        (listed class indices, strongest first; one dict per hidden class with ``index``,
        ``excluded_by`` (index), ``evidence`` (dict) and ``reason``; conflicts per listed index).

    Example:
        >>> import numpy as np
        >>> from medscalpel.data.cooccurrence import cooccurrence_evidence
        >>> y = np.array([[1, 0], [0, 1]] * 2900 + [[0, 0]] * 200, float)
        >>> ev = cooccurrence_evidence(y, ["a", "b"])
        >>> listed, hidden, flags = exclusion_plan([0, 1], [2.0, 1.0], ev, ["a", "b"])
        >>> listed, hidden, [c.other for c in flags[1]]
        ([0, 1], [], ['a'])
        >>> exclusion_plan([0, 1], [2.0, 1.0], ev, ["a", "b"], mode="hide")[1][0]["excluded_by"]
        0
    """
    check_in(mode, "conflicts", "exclusion_plan", CONFLICT_MODES)
    cand = [int(c) for c in candidates]
    st = [float(s) for s in strength]
    if len(cand) != len(st) or len(set(cand)) != len(cand):
        raise DataError(f"exclusion_plan: {len(cand)} candidates {cand} need as many distinct "
                        f"entries as strengths ({len(st)}).")
    order = [cand[i] for i in sorted(range(len(cand)), key=lambda i: (-st[i], cand[i]))]
    names = [str(c) for c in class_names]
    pair = {}
    if evidence is not None:
        for a in order:
            for b in order:
                if a < b:
                    pe = evidence.pair(names[a], names[b])
                    if pe.exclusive:
                        pair[(a, b)] = pair[(b, a)] = pe
    listed: list[int] = []
    hidden: list[dict[str, Any]] = []
    for c in order:
        clash = next((k for k in listed if (c, k) in pair), None) if mode == "hide" else None
        if clash is None:
            listed.append(c)
            continue
        pe = pair[(c, clash)]
        hidden.append({"index": c, "excluded_by": clash, "evidence": pe.to_dict(),
                       "reason": f"hidden (hide option): '{names[c]}' and '{names[clash]}' are "
                                 f"mutually exclusive by the evidence rule ({pe.summary()}); "
                                 f"'{names[clash]}' has the stronger evidence on this image."})
    hidden_idx = {h["index"] for h in hidden}
    flags: dict[int, list[Conflict]] = {c: [] for c in listed}
    for c in listed:
        for o in order:
            if o != c and (c, o) in pair:
                hid = names[o] if o in hidden_idx else None
                flags[c].append(Conflict(names[o], o, pair[(c, o)].to_dict(),
                                         _conflict_message(names[c], names[o], pair[(c, o)], hid),
                                         hidden_other=hid is not None))
    return listed, hidden, flags


# ----------------------------------------------------------------------------- operating points
#: what a calibration file must hold to be one
_CALIBRATION_KEYS = ("calibrator", "operating_point", "temperature")


def _calibration_dict(calibration: Any) -> dict[str, Any] | None:
    """The calibration as a dict: a CalibrationResult / TemperatureResult, their dict or the
    ``calibration.json`` that ``repair calibrate`` writes; anything else is one DataError."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)):
        try:
            d = read_json(calibration)
        except UnicodeDecodeError as exc:
            raise DataError(f"{calibration} is not a JSON file (binary content); give the "
                            "calibration.json written by 'medscalpel repair calibrate'.") from exc
        where = str(calibration)
    elif isinstance(calibration, Mapping):
        d, where = dict(calibration), "the calibration"
    elif hasattr(calibration, "to_dict"):
        d, where = calibration.to_dict(), type(calibration).__name__
    else:
        raise DataError(f"clinical_report: calibration is a {type(calibration).__name__}; give a "
                        "CalibrationResult, its dict or a calibration.json path.")
    if not isinstance(d, Mapping) or not any(k in d for k in _CALIBRATION_KEYS):
        raise DataError(f"{where} is not a calibration result (it has none of "
                        f"{list(_CALIBRATION_KEYS)}); give the calibration.json written by "
                        "'medscalpel repair calibrate'.")
    return dict(d)


def _same_rule(a: OperatingPoint, b: OperatingPoint) -> bool:
    """Whether two operating points make the same decisions (same classes, task, cuts and
    temperature)."""
    def close(x: Any, y: Any) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and (
            x == y or abs(float(x) - float(y)) <= 1e-9))

    return (a.task == b.task and a.class_names == b.class_names and a.positive == b.positive
            and close(a.cut, b.cut) and close(a.temperature, b.temperature)
            and len(a.thresholds) == len(b.thresholds)
            and all(close(x, y) for x, y in zip(a.thresholds, b.thresholds)))


def _calibration_classes(cal: Mapping[str, Any], names: list[str]) -> None:
    """Refuse a calibration of other classes than the model's (a two-class calibration names
    only its positive class: it must be one of the model's two)."""
    calr = cal.get("calibrator") or {}
    cal_names = list(calr.get("class_names") or cal.get("class_names") or names)
    binary = cal.get("binary") or {}
    if binary and len(cal_names) == 1:
        ok = cal_names[0] in names and len(names) == 2
    else:
        ok = cal_names == names
    op = cal.get("operating_point")
    if op and list(op.get("class_names") or []) != names:
        ok = False
        cal_names = list(op.get("class_names") or [])
    if not ok:
        raise DataError(f"clinical_report: the calibration is of other classes "
                        f"({cal_names[:3]}...) than the model's ({names[:3]}...); pass the "
                        "calibration.json written for this model.")


def _describe_origin(op: OperatingPoint, j: int) -> tuple[str, str]:
    """(origin, description) of class ``j``'s cut."""
    name = op.class_names[j]
    cut = op.cut_of(j)
    if op.task == "binary" and j != op.positive:
        pos = op.class_names[op.positive]
        rule = f"decided when p({pos}) < {float(op.cut):.4g}"
    else:
        rule = ""
    if not op.calibrated:
        if op.task == "multiclass":
            return "default", "argmax (not calibrated)"
        return "default", rule + " (not calibrated)" if rule else f"{cut:g} (not calibrated)"
    if name in op.fallback:
        return "calibration_fallback", (f"default {cut:g}: calibration could not fit this class "
                                        "(no positive or no negative)")
    f = op.fitted_on or {}
    method = "" if op.method == STORED_METHOD else op.method
    if f.get("site"):
        n = f.get("n_images")
        desc = f"calibrated at site {f['site']}" + (f" ({method}" + (f", {n} images" if n else "")
                                                    + (f", {f['n_patients']} patients"
                                                       if f.get("n_patients") else "") + ")"
                                                    if method else "")
    elif f.get("split"):
        desc = f"calibrated on split '{f['split']}'" + (f" ({method})" if method else "")
    else:
        desc = "calibrated (split not recorded)" + (f" ({method})" if method else "")
    if op.task == "multiclass":
        desc = "argmax" + (f" after temperature {op.temperature:.3g}" if op.temperature != 1.0
                           else "") + f", {desc}"
    elif rule:
        desc = f"{rule}, {desc}"
    return "calibrated", desc


def _from_measured(cop: ClassOperatingPoint, row: Mapping[str, Any], on: Mapping[str, Any],
                   fit_split: str) -> ClassOperatingPoint:

    split = str(on.get("split", ""))
    note = "" if on.get("held_out", True) and not (split and split == fit_split) else \
        "measured on the images the operating point was fitted on (optimistic)"
    return replace(cop, sensitivity=_f(row.get("sensitivity")),
                   specificity=_f(row.get("specificity")),
                   sensitivity_ci=tuple(_f(v) for v in row.get("sensitivity_ci") or (None, None)),
                   specificity_ci=tuple(_f(v) for v in row.get("specificity_ci") or (None, None)),
                   split=split, n_pos=int(row.get("n_pos", 0) or 0),
                   n_neg=int(row.get("n_neg", 0) or 0), note=note)


def model_operating_point(card: Any, class_names: Sequence[str], task: str = "multilabel"
                          ) -> OperatingPoint:
    """The operating point the report decides by: the card's (``decision_point()``: stored, or
    derived from its thresholds), the uncalibrated default without a card."""
    if card is not None and hasattr(card, "decision_point"):
        return card.decision_point()
    return OperatingPoint.default(task, list(class_names))


def operating_points(card: Any, class_names: Sequence[str], thresholds: Sequence[float] | None
                     = None, calibration: Any = None
                     ) -> tuple[list[ClassOperatingPoint], dict[str, Any]]:
    """Per class: the cut's origin and its sensitivity / specificity; plus the report-level
    summary (``calibrated``, ``notice``, ``rule``, ...).

    The cut and its origin come from the model's operating point (``card.decision_point()``).
    The sensitivity / specificity come, in this order, from the operating point's own
    measurement, from ``calibration``'s operating point when it makes the same decisions, or
    from ``calibration``'s evaluation rows at a threshold equal to the class's cut (the
    calibrated one or the 0.5 baseline); otherwise they are not shown and a note says why.

    Args:
        card: the model's card (``None``: defaults).
        class_names: the model's classes.
        thresholds: unused (kept for callers of the older signature: the cuts are the
            operating point's).
        calibration: a :class:`~medscalpel.repair.calibrate.CalibrationResult`, its dict or a
            ``calibration.json`` path (multi-label, two-class or temperature).

    Raises:
        DataError: a calibration of other classes than the model's; a file that is not a
            calibration result.
    """
    names = [str(c) for c in class_names]
    op = model_operating_point(card, names, getattr(card, "task", "multilabel"))
    cal = _calibration_dict(calibration)
    notes: list[str] = []
    cal_op = None
    if cal is not None:
        _calibration_classes(cal, names)
        if cal.get("operating_point"):
            cal_op = OperatingPoint.from_dict(cal["operating_point"])
        if not (cal.get("evaluation") or (cal_op is not None and cal_op.measured)):
            notes.append("the calibration result has no evaluation: sensitivity and "
                         "specificity are not shown")
    fit_split = str((op.fitted_on or {}).get("split") or (cal or {}).get("fit_split") or "")
    ev = (cal or {}).get("evaluation") or None
    rows = {r.get("class"): r for r in (ev or {}).get("classes", [])}
    same = cal_op is not None and _same_rule(cal_op, op) and bool(cal_op.measured)
    ops = []
    for j, name in enumerate(names):
        origin, desc = _describe_origin(op, j)
        cut = op.cut_of(j)
        cop = ClassOperatingPoint(float("nan") if cut is None else float(cut), origin, desc,
                                  fit_split, "" if op.method in (STORED_METHOD, "default")
                                  else op.method)
        if op.measured_row(j) is not None:
            cop = _from_measured(cop, op.measured_row(j), op.measured_on, fit_split)
        elif same and cal_op.measured_row(j) is not None:
            cop = _from_measured(cop, cal_op.measured_row(j), cal_op.measured_on, fit_split)
        elif cut is not None:
            cop = _measured(cop, rows.get(name), ev, fit_split, notes)
        ops.append(cop)
    notice = None
    if not op.calibrated:
        notice = NOT_CALIBRATED_ARGMAX if op.task == "multiclass" else NOT_CALIBRATED
    summary = {"calibrated": op.calibrated, "notice": notice, "fit_split": fit_split,
               "method": op.method, "rule": op.describe(), "task": op.task,
               "margin_definition": op.margin_name,
               "operating_point": op.to_dict(),
               "evaluation_split": str((ev or {}).get("split", "") or
                                       (op.measured_on or {}).get("split", "")),
               "evaluation_n": int((ev or {}).get("n", 0) or
                                   (op.measured_on or {}).get("n_images", 0) or 0),
               "measured": any(o.measured for o in ops), "notes": notes}
    return ops, summary


def _measured(op: ClassOperatingPoint, row: Mapping[str, Any] | None,
              ev: Mapping[str, Any] | None, fit_split: str,
              notes: list[str]) -> ClassOperatingPoint:

    if row is None or ev is None:
        return op
    pick = None
    if row.get("threshold") is not None and abs(float(row["threshold"]) - op.threshold) < 1e-9:
        pick = row.get("calibrated")
    else:
        base = dict(zip((ev.get("class_names") or []), ev.get("baseline_thresholds") or []))
        if op.threshold == base.get(row.get("class")):
            pick = row.get("default")
    if not pick:
        msg = (f"the calibration's threshold for {row.get('class')} differs from the model's: "
               "its sensitivity/specificity are not shown")
        if msg not in notes:
            notes.append(msg)
        return op
    split = str(ev.get("split", ""))
    note = "measured on the split the thresholds were fitted on (optimistic)" \
        if split and split == fit_split else ""
    tp, fn, tn, fp = (int(pick.get(k, 0) or 0) for k in ("tp", "fn", "tn", "fp"))
    return replace(op, sensitivity=_f(pick.get("recall")), specificity=_f(pick.get("specificity")),
                   split=split, n_pos=tp + fn, n_neg=tn + fp, note=note)


# ----------------------------------------------------------------------------- resolution
def cam_resolution(model: Any, x: torch.Tensor, min_cam_size: int = MIN_CAM_SIZE
                   ) -> dict[str, Any]:
    """Model input size, CAM map size (the CAM layer's own grid, before upsampling) and whether
    that map can support lung-zone words (``min(h, w) >= min_cam_size``)."""
    from medscalpel.explain.cams import preserved_model_state

    h_in, w_in = (int(v) for v in x.shape[-2:])
    if _served(model):   # the served artifact's own CAM output: its grid
        h, w = (int(v) for v in model.cams(x[:1]).shape[-2:])
    else:
        with preserved_model_state(model), torch.no_grad():
            model.eval()
            fm = model.feature_map(x[:1])
        h, w = (int(v) for v in fm.shape[-2:])
    ok = min(h, w) >= min_cam_size
    note = "" if ok else (f"the CAM map is {h}x{w} cells (input {h_in}x{w_in}): {COARSE}; "
                          f"lung-zone words need at least {min_cam_size}x{min_cam_size}. The "
                          "overlay shows the upsampled map, whose detail is interpolation.")
    return {"input_size": [h_in, w_in], "cam_size": [h, w], "min_cam_size": int(min_cam_size),
            "localisable": bool(ok), "note": note}


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
        x, iid, src = _load_one(card, i, it)
        xs.append(x)
        ids.append(iid)
        sources.append(src)
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise DataError(f"clinical_report: the images have different shapes {sorted(shapes)}.")
    if image_ids is not None:
        if len(image_ids) != len(xs):
            raise DataError(f"clinical_report: {len(xs)} images but {len(image_ids)} image_ids.")
        ids = [str(s) for s in image_ids]
    return torch.stack(xs), ids, sources


def _load_one(card: Any, i: int, it: Any) -> tuple[torch.Tensor, str, str]:
    if isinstance(it, (str, os.PathLike)):
        from medscalpel.data.io import read_image

        if card is None:
            raise ModelError("clinical_report: reading image files needs the model's card "
                             "(its preprocessing); load the model with load_model.")
        pp = card.preprocess
        return pp(read_image(it, colour=pp.colour)), Path(it).name, str(it)
    if isinstance(it, np.ndarray):
        if card is None:
            raise ModelError("clinical_report: raw arrays need the model's card "
                             "(its preprocessing); load the model with load_model.")
        return card.preprocess(it), f"image{i}", "array"
    if isinstance(it, torch.Tensor) and it.ndim == 3:
        return it.detach().float().cpu(), f"image{i}", "tensor"
    raise DataError(f"clinical_report: image {i} is a {type(it).__name__}"
                    f"{tuple(getattr(it, 'shape', ()))}; give file paths, raw grey "
                    "arrays [H, W] or preprocessed tensors [C, H, W].")


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


# ----------------------------------------------------------------------------- steps
@dataclass
class _Setup:
    """What :func:`_validate` checked and prepared."""

    x: torch.Tensor
    ids: list[str]
    sources: list[str]
    card: Any
    names: list[str]
    task: str
    thresholds: list[float]
    evidence: CooccurrenceEvidence | None
    mode: str
    rank_by: str
    op: OperatingPoint


@dataclass
class _Scores:
    """What :func:`_gather` computed: channel contributions, logits, probabilities, margins."""

    cc: Any
    logits: np.ndarray
    probs: np.ndarray
    margins: np.ndarray
    decided: np.ndarray


def _validate(model: Any, images: Any, image_ids: Sequence[str] | None, zones: Any,
              label_stats: Any, jaccard_exclusion: Any, conflicts: str, rank_by: str,
              top_channels: int, min_cam_size: int, exclusion_rule: ExclusionRule | None
              ) -> _Setup:
    """Step 1: parameters, model, images, thresholds and the label statistics."""
    if jaccard_exclusion is not None:
        warnings.warn("clinical_report: 'jaccard_exclusion' is deprecated and ignored: a low "
                      "Jaccard index only says that one finding is rare, so findings are never "
                      "excluded on it. Conflicts now come from the co-occurrence evidence "
                      "(exclusion_rule=ExclusionRule(...)) and are flagged; pass "
                      "conflicts='hide' to hide the weaker finding.", DeprecationWarning,
                      stacklevel=3)
    check_in(conflicts, "conflicts", "clinical_report", CONFLICT_MODES)
    check_in(rank_by, "rank_by", "clinical_report", RANK_BY)
    check_range(top_channels, "top_channels", "clinical_report", 1, integer=True)
    check_range(min_cam_size, "min_cam_size", "clinical_report", 1, integer=True)
    if _served(model):
        refusal = model.cam_refusal()
        if refusal is not None:
            raise ModelError(f"clinical_report: {refusal}.")
    elif not isinstance(getattr(model, "classifier", None), torch.nn.Linear):
        raise ModelError(f"clinical_report needs a MedClassifier; got {type(model).__name__}. "
                         "Load it with medscalpel.models.load_model.")
    x, ids, sources = _load_inputs(model, images, image_ids)
    if zones is not None and len(zones) != x.shape[0]:
        raise DataError(f"clinical_report: {x.shape[0]} images but {len(zones)} zone maps.")
    card = getattr(model, "card", None)
    k = int(model.num_classes) if _served(model) else int(model.classifier.out_features)
    names = list(card.class_names) if card is not None else [f"class{i}" for i in range(k)]
    if len(names) != k:
        raise ModelError(f"clinical_report: the card has {len(names)} class names but the "
                         f"model has {k} outputs.")
    op = model_operating_point(card, names)
    # the per-class cut (NaN where a class has none: binary's other class, argmax)
    thresholds = [float("nan") if op.cut_of(j) is None else float(op.cut_of(j))
                  for j in range(k)]
    evidence = resolve_evidence(label_stats, names, exclusion_rule)
    return _Setup(x=x, ids=ids, sources=sources, card=card, names=names,
                  task=card.task if card is not None else "multilabel",
                  thresholds=thresholds, evidence=evidence, mode=conflicts,
                  rank_by=rank_by, op=op)


def _gather(model: Any, s: _Setup) -> _Scores:
    """Step 2: one forward pass: channel contributions, logits, and by the operating point the
    probabilities (float64, after its temperature), decisions and margins (log-odds of the
    probability minus log-odds of the cut)."""
    from medscalpel.explain.channels import channel_contributions_from_model

    if _served(model):   # no penultimate features leave the served graph: logits only
        cc = None
        with torch.no_grad():
            logits = model(s.x).numpy().astype(np.float64)
    else:
        cc = channel_contributions_from_model(model, s.x, ids=s.ids, progress=False)
        logits = np.asarray(cc.logits(), np.float64)
    probs = s.op.probabilities(logits)
    return _Scores(cc=cc, logits=logits, probs=probs, margins=s.op.margin(probs),
                   decided=s.op.decide(probs))


def _plans(s: _Setup, sc: _Scores) -> list[tuple[list[int], list[dict[str, Any]],
                                                  dict[int, list[Conflict]]]]:
    """Step 3: per image, the findings the operating point calls, their conflict flags and
    (hide mode) the hidden ones. Two-class: the positive class only when its probability
    reaches the cut (else no finding: the decision is the other class); multi-class: the argmax
    class; neither has conflicts."""
    out = []
    for i in range(len(s.ids)):
        if s.op.task == "binary":
            cands = [s.op.positive] if sc.decided[i, s.op.positive] else []
        else:
            cands = [int(j) for j in np.flatnonzero(sc.decided[i])]
        strength = [sc.margins[i, j] if s.rank_by == "margin" else sc.probs[i, j] for j in cands]
        ev = s.evidence if s.task != "multiclass" else None
        out.append(exclusion_plan(cands, strength, ev, s.names, s.mode))
    return out


def _exclusion_info(s: _Setup) -> dict[str, Any]:
    ev = s.evidence
    info: dict[str, Any] = {"mode": s.mode, "checked": ev is not None and s.task != "multiclass",
                            "rule": None if ev is None else ev.rule.to_dict(),
                            "rule_text": None if ev is None else ev.rule.describe(),
                            "source": "none" if ev is None else ev.source,
                            "n_images": None if ev is None else ev.n,
                            "enough_images": None if ev is None else ev.enough_images,
                            "n_exclusive_pairs": None if ev is None
                            else len(ev.exclusive_pairs()),
                            "warnings": [] if ev is None else list(ev.warnings)}
    if s.task == "multiclass":
        info["warnings"].append("multi-class model: one finding per image, no conflicts")
    elif ev is None:
        info["warnings"].append("no training-label statistics given: mutual exclusivity not "
                                "checked")
    return info


def _localise(cam: np.ndarray, zi: Any, res: Mapping[str, Any]) -> tuple[str, dict[str, float]]:
    """Step 5: zone words for one CAM, only when its resolution supports them."""
    from medscalpel.explain.regions import ZONE_PHRASES, describe_location

    if not res["localisable"]:
        h, w = res["cam_size"]
        return f"{COARSE} (CAM map {h}x{w})", {}
    if zi is None:
        return "", {}
    zr = zi.resized(cam.shape)
    f = zr.fractions(cam)
    top = sorted(((v, nm) for nm, v in f.items() if np.isfinite(v) and v > 0), reverse=True)[:4]
    return describe_location(cam, zr), {ZONE_PHRASES[nm]: float(v) for v, nm in top}


def _cams(model: Any, s: _Setup, plans: list, cam_method: str,
          progress: bool | None) -> dict[tuple[int, int], np.ndarray]:
    """One CAM pass for every (image, listed finding)."""
    from medscalpel.explain.cams import compute_cam

    pairs = [(i, j) for i, (listed, _, _) in enumerate(plans) for j in listed]
    if not pairs:
        return {}
    res = compute_cam(model, s.x[[p[0] for p in pairs]], [p[1] for p in pairs],
                      method=cam_method, progress=progress)
    return {p: res.maps[t] for t, p in enumerate(pairs)}


def _render(model: Any, s: _Setup, sc: _Scores, i: int, plan: tuple, cams: Mapping,
            ops: list[ClassOperatingPoint], shared: Mapping[str, Any], zone: Any,
            top_channels: int) -> ClinicalReport:
    """Step 6: one image's report (findings, hidden findings, table, overlay)."""
    from medscalpel.report.figures import clinical_overlay_png

    listed, hidden, flags = plan
    zi, zsource, warns = _zones_for(model, s.x[i], zone)
    decision = "" if s.op.task == "multilabel" else \
        s.names[int(np.flatnonzero(sc.decided[i])[0])]
    res = shared["resolution"]
    warns = list(shared["warnings"]) + warns
    findings = []
    for j in listed:
        loc, fr = _localise(cams[(i, j)], zi, res)
        if sc.cc is not None:
            tc = sc.cc.top_channels(j, n=top_channels, rows=[i], rows_desc=s.ids[i])
            lmb = float(tc.mean_logit_minus_bias)
            chans = tuple(signed_channel(r.to_dict(), lmb) for r in tc.rows)
        else:   # a served artifact: no channel evidence (stated in the report's model block)
            lmb, chans = float("nan"), ()
        findings.append(ReportedFinding(
            class_index=j, name=s.names[j], probability=float(sc.probs[i, j]),
            threshold=s.thresholds[j], margin=float(sc.margins[i, j]), location=loc,
            zone_fractions=fr, logit_minus_bias=lmb,
            channels=chans, conflicts=tuple(flags.get(j, ())),
            operating_point=ops[j], localised=bool(res["localisable"])))
    excluded = [ExcludedFinding(
        class_index=h["index"], name=s.names[h["index"]],
        probability=float(sc.probs[i, h["index"]]), threshold=s.thresholds[h["index"]],
        margin=float(sc.margins[i, h["index"]]), excluded_by=s.names[h["excluded_by"]],
        evidence=h["evidence"], reason=h["reason"], operating_point=ops[h["index"]])
        for h in hidden]
    status = {f.class_index: "reported, flagged" if f.conflicts else "reported"
              for f in findings}
    status.update({e.class_index: "hidden (hide option)" for e in excluded})
    if decision and s.op.task == "binary" and not findings:
        status[s.names.index(decision)] = f"decided (p({s.names[s.op.positive]}) below its cut)"
    below = "not the argmax" if s.op.task == "multiclass" else "below threshold"
    table = [{"class_index": j, "class": s.names[j], "probability": float(sc.probs[i, j]),
              "threshold": _j(s.thresholds[j]), "margin_logodds": _j(float(sc.margins[i, j])),
              "threshold_origin": ops[j].origin, "threshold_description": ops[j].description,
              "status": status.get(j, "not called" if s.op.task == "binary" else below)}
             for j in range(len(s.names))]
    table.sort(key=lambda r: -r["probability"])
    overlay = None
    if findings:
        overlay = clinical_overlay_png(
            _display(model, s.x[i]), [cams[(i, f.class_index)] for f in findings],
            [f"{f.name} ({f.probability:.2f})\n{f.location or 'location n/a'}"
             for f in findings], zones=zi if res["localisable"] else None)
    return ClinicalReport(
        image_id=s.ids[i], source=s.sources[i], findings=findings, excluded=excluded,
        probabilities=table, model=shared["model"], cam_method=shared["cam_method"],
        zones_source=zsource if res["localisable"] else f"not used ({COARSE})",
        exclusion=shared["exclusion"], operating=shared["operating"], resolution=res,
        rank_by=s.rank_by, warnings=warns, created=shared["created"], overlay_png=overlay,
        decision=decision)


# ----------------------------------------------------------------------------- main
def clinical_report(
    model: Any,
    images: Any,
    out_dir: str | os.PathLike | None = None,
    label_stats: Any = None,
    jaccard_exclusion: float | None = None,
    cam_method: str = "gradcam",
    image_ids: Sequence[str] | None = None,
    zones: Sequence[Any] | None = None,
    top_channels: int = 5,
    rank_by: str = "margin",
    progress: bool | None = None,
    *,
    conflicts: str = "flag",
    exclusion_rule: ExclusionRule | None = None,
    calibration: Any = None,
    min_cam_size: int = MIN_CAM_SIZE,
    identifiers_kept: bool = False,
) -> list[ClinicalReport]:
    """Decision-support reports of ``images`` by ``model``.

    Args:
        model: a :class:`~medscalpel.models.classifier.MedClassifier` with a card (thresholds,
            class names, preprocessing); it is not changed.
        images: image file paths, raw grey arrays, preprocessed ``[C, H, W]`` tensors or one
            ``[N, C, H, W]`` tensor.
        out_dir: where to write ``<id>.html``, ``<id>.json`` per image and ``index.html``
            (``None``: nothing is written).
        label_stats: the training labels' statistics: a
            :class:`~medscalpel.data.stats.LabelStats`, a
            :class:`~medscalpel.data.cooccurrence.CooccurrenceEvidence`, their dict or a JSON
            path. They must have the model's label set. ``None`` skips the conflict check (the
            report says so).
        jaccard_exclusion: deprecated and ignored (a ``DeprecationWarning``): findings are never
            excluded on a Jaccard index.
        cam_method: ``gradcam``, ``gradcam++`` or ``scorecam``.
        image_ids: ids shown in the reports (default: file names, or ``image<i>``).
        zones: ground-truth :class:`~medscalpel.explain.regions.LungZones` per image (e.g. the
            phantom's masks); default: estimated lung fields.
        top_channels: channels listed per finding.
        rank_by: which of two conflicting findings is stronger (for ``conflicts="hide"``):
            ``margin`` (log-odds above the threshold) or ``probability``.
        progress: progress bar (``None``: follow ``MEDSCALPEL_PROGRESS``).
        conflicts: ``flag`` (default: every finding above its threshold is listed, conflicts
            are flags on both) or ``hide`` (the weaker finding of a conflict is hidden; the
            report marks it).
        exclusion_rule: the :class:`~medscalpel.data.cooccurrence.ExclusionRule` (default:
            upper 95% bound of the lift < 0.1, >= 10 expected co-occurrences, >= 5000 images).
        calibration: a ``CalibrationResult``, its dict or ``calibration.json``: sensitivity /
            specificity at each threshold on its evaluation split.
        min_cam_size: smallest CAM map side (cells) for lung-zone words.

    Returns:
        One :class:`ClinicalReport` per image, in input order.
    """
    s = _validate(model, images, image_ids, zones, label_stats, jaccard_exclusion, conflicts,
                  rank_by, top_channels, min_cam_size, exclusion_rule)
    sc = _gather(model, s)
    plans = _plans(s, sc)
    ops, operating = operating_points(s.card, s.names, None, calibration)
    if s.op.task != "multilabel":
        operating["notes"].append(
            "softmax model: the channel evidence below decomposes the finding's own class "
            "logit; its log-odds (the margin's scale) is that logit minus the "
            + ("other class's logit" if s.op.task == "binary" else "log-sum-exp of the others"))
    resolution = cam_resolution(model, s.x, min_cam_size)
    cams = _cams(model, s, plans, cam_method, progress)
    exclusion = _exclusion_info(s)
    shared = {"resolution": resolution, "operating": operating, "exclusion": exclusion,
              "cam_method": cam_method, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "warnings": _shared_warnings(operating, exclusion, resolution),
              "model": {"arch": getattr(model, "arch", type(model).__name__),
                        "model_id": getattr(s.card, "model_id", "") if s.card is not None
                        else "", "task": s.task, "class_names": s.names,
                        "thresholds": [_j(t) for t in s.thresholds],
                        "thresholds_calibrated": operating["calibrated"],
                        "operating_point": s.op.describe(),
                        "input_size": resolution["input_size"], **_served_block(model)}}
    reports = [_render(model, s, sc, i, plans[i], cams, ops, shared,
                       zones[i] if zones is not None else None, top_channels)
               for i in track(range(len(s.ids)), "clinical reports", progress=progress)]
    if identifiers_kept:
        reports = [replace(r, identifiers_kept=True) for r in reports]
    if out_dir is not None:
        write_clinical_reports(reports, out_dir)
    return reports


def _served(model: Any) -> bool:
    """A served runtime artifact (no gradients, no weights; maybe its own CAM output)."""
    return not getattr(model, "supports_gradients", True) and hasattr(model, "cam_refusal")


def _served_block(model: Any) -> dict[str, Any]:
    """What a report made by a served artifact says about it: the artifact (runtime,
    precision, file sha256, CPU), the label of its maps, and why channel evidence is absent."""
    if not _served(model):   # a served torch model names its weights (load_served)
        art = getattr(model, "artifact", None)
        return {"artifact": dict(art)} if isinstance(art, dict) else {}
    return {"artifact": model.provenance(), "cam_label": model.label(),
            "channel_evidence": "not available: the served graph returns logits and class "
                                "activation maps only, no penultimate features or classifier "
                                "weights; run the report on the torch model for channels"}


def _shared_warnings(operating: Mapping[str, Any], exclusion: Mapping[str, Any],
                     resolution: Mapping[str, Any]) -> list[str]:
    out = []
    if operating["notice"]:
        out.append(operating["notice"])
    out += list(operating["notes"]) + list(exclusion["warnings"])
    if resolution["note"]:
        out.append(resolution["note"])
    return out


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
                     "n_flagged": sum(1 for f in r.findings if f.conflicts),
                     "n_excluded": len(r.excluded),
                     "findings": [{"class": f.name, "probability": f.probability,
                                   "location": f.location,
                                   "conflicts_with": [c.other for c in f.conflicts]}
                                  for f in r.findings],
                     "excluded": [{"class": e.name, "excluded_by": e.excluded_by,
                                   "lift": e.evidence.get("lift")} for e in r.excluded]})
    first = reports[0] if reports else None
    notice = first.operating.get("notice") if first is not None else None
    mode = first.exclusion.get("mode") if first is not None else "flag"
    kept = any(r.identifiers_kept for r in reports)
    write_json(out / "index.json", {"schema_version": SCHEMA, "kind": "clinical_index",
                                    "disclaimer": DECISION_SUPPORT, "operating_notice": notice,
                                    "conflicts": mode, "identifiers_kept": kept,
                                    "reports": rows})
    return write_html(out / "index.html", render("clinical_index.html.j2", title=title,
                                                 rows=rows, disclaimer=DECISION_SUPPORT,
                                                 notice=notice, mode=mode,
                                                 identifiers_kept=kept))
