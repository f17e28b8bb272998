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

The package is split by concept: :mod:`.results` (the typed results), :mod:`.evidence`
(margins, channel evidence, conflict flags, the exclusion plan), :mod:`.operating` (where each
cut came from and what it measured) and :mod:`.build` (the named steps :func:`_validate` ->
:func:`_gather` -> :func:`exclusion_plan` -> :func:`operating_points` -> :func:`cam_resolution`
/ :func:`_localise` -> :func:`_render`, and :func:`clinical_report`).

Example:
    >>> from medscalpel.models import load_model  # doctest: +SKIP
    >>> reps = clinical_report(load_model("runs/model"), ["cxr1.png"], "runs/clinical",
    ...                        label_stats="runs/stats/stats.json")  # doctest: +SKIP
    >>> reps[0].findings[0].operating_point.origin  # doctest: +SKIP
    'calibrated'
"""

from medscalpel.report.clinical.build import (cam_resolution, clinical_report,
                                              write_clinical_reports)
from medscalpel.report.clinical.evidence import (exclusion_plan, logit_margin, resolve_evidence,
                                                 signed_channel)
from medscalpel.report.clinical.operating import model_operating_point, operating_points
from medscalpel.report.clinical.results import (COARSE, CONFLICT_MODES, MARGIN_FIELD,
                                                MIN_CAM_SIZE, NOT_CALIBRATED,
                                                NOT_CALIBRATED_ARGMAX, RANK_BY, SCHEMA,
                                                ClassOperatingPoint, ClinicalReport, Conflict,
                                                ExcludedFinding, ReportedFinding)

__all__ = ["COARSE", "CONFLICT_MODES", "MARGIN_FIELD", "MIN_CAM_SIZE", "NOT_CALIBRATED",
           "NOT_CALIBRATED_ARGMAX", "RANK_BY", "SCHEMA", "ClassOperatingPoint", "ClinicalReport",
           "Conflict", "ExcludedFinding", "ReportedFinding", "cam_resolution", "clinical_report",
           "exclusion_plan", "logit_margin", "model_operating_point", "operating_points",
           "resolve_evidence", "signed_channel", "write_clinical_reports"]
