"""Building the clinical reports: inputs, CAM resolution, the named steps (validate -> gather
-> plan -> operating points -> CAMs -> render), the main entry point and the index page."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscalpel.data.cooccurrence import CooccurrenceEvidence, ExclusionRule
from medscalpel.data.io import read_image
from medscalpel.errors import DataError, ModelError
from medscalpel.explain.cams import compute_cam, preserved_model_state
from medscalpel.explain.channels import channel_contributions_from_model
from medscalpel.explain.regions import ZONE_PHRASES, describe_location, estimate_lung_field
from medscalpel.layout import write_artifact_at
from medscalpel.models.operating_point import OperatingPoint
from medscalpel.progress import track
from medscalpel.report.clinical.evidence import exclusion_plan, resolve_evidence, signed_channel
from medscalpel.report.clinical.operating import model_operating_point, operating_points
from medscalpel.report.clinical.results import (COARSE, CONFLICT_MODES, MIN_CAM_SIZE, RANK_BY,
                                                SCHEMA, ClassOperatingPoint, ClinicalReport,
                                                Conflict, ExcludedFinding, ReportedFinding, _j)
from medscalpel.report.figures import clinical_overlay_png
from medscalpel.report.html import DECISION_SUPPORT, render, safe_filename, write_html
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- resolution
def cam_resolution(model: Any, x: torch.Tensor, min_cam_size: int = MIN_CAM_SIZE
                   ) -> dict[str, Any]:
    """Model input size, CAM map size (the CAM layer's own grid, before upsampling) and whether
    that map can support lung-zone words (``min(h, w) >= min_cam_size``)."""

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


def _operating(s: _Setup, calibration: Any) -> tuple[list[ClassOperatingPoint],
                                                      dict[str, Any]]:
    """Step 4: each class's operating point (with its calibration evidence) and the report's
    operating block; a softmax model's block says what its channel evidence decomposes."""
    ops, operating = operating_points(s.card, s.names, None, calibration)
    if s.op.task != "multilabel":
        operating["notes"].append(
            "softmax model: the channel evidence below decomposes the finding's own class "
            "logit; its log-odds (the margin's scale) is that logit minus the "
            + ("other class's logit" if s.op.task == "binary" else "log-sum-exp of the others"))
    return ops, operating


def _shared(model: Any, s: _Setup, operating: dict[str, Any], resolution: dict[str, Any],
            exclusion: dict[str, Any], cam_method: str) -> dict[str, Any]:
    """What every image's report shares: CAM resolution, operating and exclusion blocks, the
    CAM method, the creation time, the shared warnings and the model block."""
    return {"resolution": resolution, "operating": operating, "exclusion": exclusion,
            "cam_method": cam_method, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "warnings": _shared_warnings(operating, exclusion, resolution),
            "model": {"arch": getattr(model, "arch", type(model).__name__),
                      "model_id": getattr(s.card, "model_id", "") if s.card is not None
                      else "", "task": s.task, "class_names": s.names,
                      "thresholds": [_j(t) for t in s.thresholds],
                      "thresholds_calibrated": operating["calibrated"],
                      "operating_point": s.op.describe(),
                      "input_size": resolution["input_size"], **_served_block(model)}}


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
    ops, operating = _operating(s, calibration)
    resolution = cam_resolution(model, s.x, min_cam_size)
    cams = _cams(model, s, plans, cam_method, progress)
    shared = _shared(model, s, operating, resolution, _exclusion_info(s), cam_method)
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
    write_artifact_at(out, "clinical_index", {
        "schema_version": SCHEMA, "kind": "clinical_index", "disclaimer": DECISION_SUPPORT,
        "operating_notice": notice, "conflicts": mode, "identifiers_kept": kept,
        "reports": rows})
    return write_html(out / "index.html", render("clinical_index.html.j2", title=title,
                                                 rows=rows, disclaimer=DECISION_SUPPORT,
                                                 notice=notice, mode=mode,
                                                 identifiers_kept=kept))
