"""Cost-aware treatment router: diagnose each class, try treatments cheapest-first, keep what
helps on held-out data, and learn what each treatment really costs.

**Diagnosis** (on the fit / validation split, at the current thresholds; limits in
:class:`DiagnosisCriteria`, all user-settable):

================  ==========================================================================
``low_recall``     recall < ``min_recall`` (0.5)
``low_precision``  precision < ``min_precision`` (0.3) with at least ``min_fp`` false positives
``miscalibrated``  expected calibration error (10 equal-width bins) > ``max_ece`` (0.1)
``fp_cluster``     >= ``min_fp`` (5) false positives, and one channel is among the top-3
                   contributors to logit k for >= ``cluster_share`` (50 %) of them but for at
                   most half as large a share of the true positives
``confounder``     a named per-image flag (e.g. ``chest_tube``) multiplies the false-positive
                   rate of k's negatives by >= ``confounder_ratio`` (2) with >= ``min_fp``
                   flagged false positives
``low_auroc``      AUROC < ``min_auroc`` (0.75)
================  ==========================================================================

**Treatment** (per class with issues): the treatments that treat one of its open issues are
tried in order of current cost (:class:`CostMatrix`); each is fitted on the fit split and its
effect measured on the **held-out** split, with its wall time. An attempt **helped** when its
paired verdict (:mod:`medscalpel.repair.helped`; pass / fail / undecided, Holm, minimum
evidence) shows on the held-out images that the metric of the issue it is tried for improved by
at least its ``min_gain`` (recall issue: Youden's J; precision: F1; miscalibration: ECE;
false-positive cluster / confounder: specificity; low AUROC: AUROC), that the class's AUROC fell
by at most ``max_auroc_drop`` (0.01) and (false-positive issues) its recall by at most
``max_recall_drop`` (0.05). A point estimate decides nothing: an attempt the images cannot judge
is ``undecided`` and not kept (the other open issues' metrics are side effects: only a loss
shown there blocks). The held-out data is split once (seeded) into a **selection** part, on
which "helped" is judged, and an untouched **report** part (``report_fraction``, default half),
on which the before/after numbers of every class are reported: judging and reporting on the
same images would overstate the gains (selection bias).
A helpful attempt is kept (the next one starts from it) and the
class is re-diagnosed on the fit split; the router escalates to the next treatment while issues
remain. Treatments that need images (augmentation, full retraining) or whose current cost
exceeds ``budget`` are listed as proposals with their estimated cost and time, not run.

**Costs**: :class:`CostMatrix` starts from seed 000's units and updates from measured seconds:
``units(s) = 1 + 2 log10(1 + s)`` (0 s -> 1, 5 s -> 2.6, 85 s -> 4.9, 1 h -> 8.1, 10 h -> 10.1),
an exponential moving average (``alpha``) of measured seconds per treatment, and a shrinkage
toward the initial cost: ``cost = (k0 * initial + n * units(ema)) / (k0 + n)`` after ``n``
measurements (``k0 = prior_strength``). It is saved to / loaded from a JSON file, so the costs
persist between runs.

The package holds one concept a module: :mod:`.costs` (:class:`CostMatrix`), :mod:`.diagnosis`
(:class:`DiagnosisCriteria`, :func:`diagnose_class`), :mod:`.result` (the decision log,
:class:`TriageResult`) and :mod:`.router` (:class:`TreatmentRouter`, :func:`triage`).
"""

from medscalpel.repair.triage.costs import SCHEMA, CostMatrix, seconds_to_units, units_to_seconds
from medscalpel.repair.triage.diagnosis import (DiagnosisCriteria, class_metrics, diagnose_class,
                                                ece_binary)
from medscalpel.repair.triage.result import ClassDecision, TriageResult
from medscalpel.repair.triage.router import TreatmentRouter, triage

__all__ = ["SCHEMA", "ClassDecision", "CostMatrix", "DiagnosisCriteria", "TreatmentRouter",
           "TriageResult", "class_metrics", "diagnose_class", "ece_binary", "seconds_to_units",
           "triage", "units_to_seconds"]
