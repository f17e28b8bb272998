"""The typed results of a clinical report: per-class operating points, conflicts, reported and
excluded findings, the report of one image."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from medscalpel.errors import DataError
from medscalpel.report.html import DECISION_SUPPORT, png_data_uri, render, safe_filename, write_html
from medscalpel.runs import write_json

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
