"""Repair under site shift: k-shot recalibration, a label-free shift check, an OOD score.

A model moved to another hospital usually keeps much of its ranking (AUROC) but loses its
operating point: the stored thresholds no longer give the sensitivity / specificity they gave
internally. Three tools:

* :class:`SiteRecalibrator` (estimator contract): re-fit on a small LABELLED sample of the new
  site (``k`` images per class, default 20):

  - ``threshold``: per class, the threshold whose sensitivity and specificity on the sample are
    closest (least squares) to the INTERNAL operating point;
  - ``youden``: per class, Youden's J on the sample (a new operating point);
  - ``temperature``: one temperature on all logits (NLL on the sample), thresholds kept;
  - ``platt``: per class ``a * logit + b`` (logistic regression on the sample), thresholds kept;
  - ``offset``: per class ``logit + b`` (Platt with the internal slope held: one parameter per
    class, the low-variance choice for k = 20), thresholds kept;
  - ``quantile`` (LABEL-FREE): per class the threshold that flags the same share of the site's
    UNLABELLED images as the stored threshold flags internally. No k-shot noise (it uses every
    site image's score, never a label) but it assumes the site has the internal prevalence and
    ranking; the labelled sample is then only the check.

  The logit maps are fitted on the sample AND on the internal set and compose to
  ``g_int^-1(g_ext(z))``: the new site's scores go onto the internal score scale, on which the
  stored thresholds were tuned; the class-balanced sample is reweighted to the internal
  prevalence (:func:`prevalence_weights`).

  :func:`recalibrate_site` draws the sample (:func:`sample_k_shot`), fits, and reports the
  operating point before / after with bootstrap CIs on the REST of the external set (never on
  the images used to fit), next to the internal one. Too few labelled images -> an error with
  the minimum.
* :func:`shift_check` (no labels): per class the mean predicted probability and a two-sample
  Kolmogorov-Smirnov test of the scores, and a feature-space distance on penultimate features
  (:func:`medscalpel.engine.predict.extract_features`).
* :class:`OODScorer`: per-image Mahalanobis distance to the training features (Ledoit-Wolf
  covariance), thresholds at the internal 95th / 99th percentile; ``flags`` for the clinical
  report.

The package is split by concept: :mod:`.sampling` (k-shot draws by patient), :mod:`.estimator`
(operating points and the SiteRecalibrator), :mod:`.workflow` (recalibrate_site and its
verdict), :mod:`.check` (the label-free shift check, OOD scores) and :mod:`.model` (the
recalibrated model and its operating point).
"""

from medscalpel.repair.shift.check import OODScorer, ShiftCheck, shift_check
from medscalpel.repair.shift.estimator import (AFFINE, METHODS, SCHEMA, SiteRecalibrator,
                                               operating_point, prevalence_weights)
from medscalpel.repair.shift.model import recalibrated_model, site_operating_point
from medscalpel.repair.shift.sampling import k_shot_draws, patient_ids_of, sample_k_shot
from medscalpel.repair.shift.workflow import (SiteRecalibration, best_possible_gap, macro_gap,
                                              recalibrate_site)

__all__ = ["AFFINE", "METHODS", "OODScorer", "SCHEMA", "ShiftCheck", "SiteRecalibration",
           "SiteRecalibrator", "best_possible_gap", "k_shot_draws", "macro_gap", "operating_point",
           "patient_ids_of", "prevalence_weights", "recalibrate_site", "recalibrated_model",
           "sample_k_shot", "shift_check", "site_operating_point"]
