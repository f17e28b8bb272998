"""Per-class decision thresholds with finite-sample guarantees (conformal risk control).

:mod:`medscalpel.repair.calibrate` picks point thresholds (Youden, F1, a target sensitivity) on
one split: a "sensitivity 0.90" threshold gives anything from about 0.8 to 0.97 on the next
patients and nothing says how often. The thresholds here come with a statement that holds for a
new draw of patients from the same population, given only that calibration and future images are
exchangeable (i.i.d.) draws from it:

``recall>=T`` (high probability; Learn then Test / RCPS)
    For one class, with ``n`` calibration positives, predict "present" when the logit reaches the
    ``k``-th smallest positive score, ``k`` the largest with ``P(Binomial(n, 1-T) <= k-1) <=
    alpha``. Equivalently: the largest threshold whose one-sided Clopper-Pearson upper
    confidence bound on the miss rate (``k-1`` misses of ``n``) is ``<= 1 - T``. Then
    ``P(recall >= T) >= 1 - alpha`` over the calibration draw (recall = the population recall
    at the chosen threshold). Ties in the scores only make it more conservative. References:
    Angelopoulos, Bates, Candes, Jordan, Lei, "Learn then Test: Calibrating Predictive
    Algorithms to Achieve Risk Control" (2021, arXiv:2110.01052); Bates, Angelopoulos, Lei,
    Malik, Jordan, "Distribution-Free, Risk-Controlling Prediction Sets" (RCPS, J. ACM 2021,
    arXiv:2101.02703). Certifiable at all only when ``T**n <= alpha`` (no miss allowed), i.e.
    ``n >= ceil(log(alpha) / log(T))`` positives: 22 for ``T = 0.9, alpha = 0.1``.

``E[recall]>=T`` (in expectation; Conformal Risk Control)
    The miss indicator of a positive is a loss bounded by 1, monotone in the threshold; CRC
    (Angelopoulos, Bates, Fisch, Lei, Schuster, "Conformal Risk Control", 2022,
    arXiv:2208.02814) takes the largest threshold with ``(n R_n(t) + 1) / (n + 1) <= 1 - T``:
    the ``k``-th smallest positive score with ``k = floor((1-T)(n+1))`` (the (n+1)-corrected
    split-conformal quantile). Then ``E[recall] >= T`` where the expectation is over the
    calibration draw AND the new positive; a given calibration set may fall short. Needs
    ``n >= ceil(1/(1-T)) - 1`` positives (9 for ``T = 0.9``).

``precision>=T`` (high probability; Learn then Test, fixed-sequence testing)
    A FIXED, data-independent grid of logit thresholds (default ``12`` down to ``-12`` in steps
    of ``0.05``) is tested from the top: at threshold ``t`` the null is "population precision
    < T"; given the ``N_t`` calibration images flagged, the true positives among them are
    Binomial(``N_t``, precision(t)), so ``p_t = P(Binomial(N_t, T) >= TP_t)`` is a valid
    p-value. Fixed-sequence testing rejects while ``p_t <= alpha`` and returns the lowest
    rejected threshold: ``P(precision >= T) >= 1 - alpha``. Assumptions: i.i.d. images from one
    population; the grid is fixed in advance; the leading grid points that flag fewer than
    ``n_min = ceil(log(alpha) / log(T))`` calibration images are skipped (no count there could
    reject, they would only stop the sequence). That data-dependent start keeps the error rate
    when P(present | score) is non-decreasing in the score (a score that ranks, so precision
    falls as the threshold falls); if the top of the score range held mostly negatives it could
    be optimistic. Needs at least ``n_min`` positives (all flagged images positive).

``fnr<=a`` (multi-label set false-negative rate, in expectation; CRC)
    One shared probability threshold ``lambda`` for every class; the set of an image is
    ``{classes with probability >= lambda}``; its loss is the share of its TRUE labels missed.
    Over the ``n`` calibration images with at least one (known) positive label, CRC takes the
    largest ``lambda`` with ``(n R_n(lambda) + 1)/(n + 1) <= a``: ``E[missed / true labels] <=
    a`` for a new image with at least one finding (CRC paper, section on multi-label FNR).
    Needs ``n >= ceil(1/a) - 1`` such images.

Thresholds act on LOGITS (``logit >= threshold_logit``; the probability threshold is its
sigmoid, stored alongside). The stored logit is the largest float32 below the calibration score
chosen as the cut: the same decisions on float32 logits, and exactly the analysed rule.

Patients: the binomial arguments count images as independent draws. Pass ``patient_ids`` to
report how many patients the calibration images came from (several images of one patient are
correlated, so the stated confidence is then approximate) and use :func:`patient_split` (built
on :func:`medscalpel.data.base.split_by_patient`) to keep the calibration and the held-out
check apart by PATIENT. Pass ``groups=patient_ids`` to certify on ONE image per patient
(:func:`one_per_group`; a random positive image of each positive patient for recall): the
argument then counts independent patients, and the guarantee is about a random image of a
random patient. On real follow-up films this matters: on the NIH CheXNet predictions the
misses of one patient's images are strongly correlated (design effect 1.47 to 6.29 over the
classes, benchmarks/results/conformal_population.md), so an image-level certificate there
counts several times more independent draws than it has.

:func:`recertify` asks whether a stored guarantee still holds for another model (compressed,
int8) or another site on held-out labelled data: a :class:`~medscalpel.engine.decision.Verdict`
(pass / fail / undecided) from exact one-sample binomial tests of the observed rate against the
certified level, Holm over the certified rows, with the counts, the intervals and the minimum
number of labelled images per class a new site needs (:func:`recertification_plan`). Without
labels, under pure label shift, :func:`medscalpel.repair.label_shift.transfer_guarantee` carries
recall guarantees over unchanged and re-certifies precision at the new site's estimated
prevalence, after a label-free check that the shift is a label shift.

Example:
    >>> import numpy as np
    >>> from medscalpel.engine.predictions import Predictions
    >>> rng = np.random.default_rng(0)
    >>> y = (rng.random((400, 1)) < 0.3).astype(np.float32)
    >>> z = 2.0 * y + rng.normal(size=(400, 1))
    >>> p = Predictions(z, y, ids=tuple(map(str, range(400))), class_names=("x",),
    ...                 task="multilabel")
    >>> g = calibrate_guarantee(p, "recall>=0.9", alpha=0.1)
    >>> g.classes[0].certified, g.classes[0].guarantee
    (True, 'recall >= 0.90 with 90% confidence')
"""

from __future__ import annotations

# The package holds one concept a module: spec (what a guarantee asks, the certificate's
# arithmetic), result (ClassGuarantee / GuaranteeResult), patients (patient ids, one image per
# patient, the patient-wise split), certify (calibrate_guarantee), recertification
# (recertify, recertification_plan) and heldout (the test-half null of a certificate).
# clopper_pearson is re-exported from medscalpel.repair.one_sample for callers of this module.
from medscalpel.repair.conformal.certify import calibrate_guarantee
from medscalpel.repair.conformal.heldout import (HELDOUT_TOL, compare_test_share,
                                                 expected_test_share, heldout_max_misses,
                                                 heldout_miss_pmf, poisson_binomial_pmf)
from medscalpel.repair.conformal.patients import PatientSplit, one_per_group, patient_split
from medscalpel.repair.conformal.recertification import (PLAN_POWER, RECERT_SCHEMA,
                                                         Recertification,
                                                         recertification_plan, recertify)
from medscalpel.repair.conformal.result import FILENAME, SCHEMA, ClassGuarantee, GuaranteeResult
from medscalpel.repair.conformal.spec import (DEFAULT_GRID, KINDS, GuaranteeSpec,
                                              GuaranteeSpecError, min_positives,
                                              miss_rate_upper_bound, parse_guarantee,
                                              recall_order_statistic)
from medscalpel.repair.one_sample import clopper_pearson

__all__ = ["DEFAULT_GRID", "FILENAME", "HELDOUT_TOL", "KINDS", "PLAN_POWER", "RECERT_SCHEMA",
           "SCHEMA", "ClassGuarantee", "GuaranteeResult", "GuaranteeSpec", "GuaranteeSpecError",
           "PatientSplit", "Recertification", "calibrate_guarantee", "clopper_pearson",
           "compare_test_share", "expected_test_share", "heldout_max_misses", "heldout_miss_pmf",
           "min_positives", "miss_rate_upper_bound", "one_per_group", "parse_guarantee",
           "patient_split", "poisson_binomial_pmf", "recall_order_statistic",
           "recertification_plan", "recertify"]
