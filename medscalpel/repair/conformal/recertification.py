"""Re-checking a stored guarantee on new labelled predictions (another model, runtime or
site): :func:`recertify` (a pass / fail / undecided :class:`Recertification`) and
:func:`recertification_plan` (the fewest labelled images a re-check needs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medscalpel.engine.decision import Verdict
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import DataError
from medscalpel.repair import one_sample
from medscalpel.repair.conformal.certify import _as_multilabel, _counts, _set_fnr
from medscalpel.repair.conformal.patients import _n_patients, _pids
from medscalpel.repair.conformal.result import ClassGuarantee, GuaranteeResult
from medscalpel.repair.conformal.spec import KINDS
from medscalpel.repair.one_sample import (EXACT, HOEFFDING, RateUnit, decide_one_sample,
                                          min_trials_to_pass, rate_interval)
from medscalpel.validation import check_range

#: schema of :class:`Recertification` (2: the outcome is a :class:`Verdict`, with the minimum k)
RECERT_SCHEMA = 2
#: the chance of a pass the planning number ``k for 80%`` aims at
PLAN_POWER = 0.8


def _unit_of(kind: str) -> tuple[str, str, bool]:
    """(what a trial is, the bound, higher is better) of a guarantee kind."""
    if kind == "precision":
        return "flagged images", EXACT, True
    if kind == "fnr":
        return "images with a finding", HOEFFDING, False
    return "positives", EXACT, True


def recertification_plan(result: GuaranteeResult, alpha: float | None = None,
                         prevalence: Sequence[float | None] | None = None,
                         power: float = PLAN_POWER) -> dict[str, Any]:
    """How many labelled images a new model or site needs to re-certify ``result``.

    Per certified row: ``k_pass``, the fewest trials (positives for recall; flagged images for
    precision; images with a finding for the set FNR) with which a pass is possible AT ALL,
    i.e. when none is missed (``T**k < alpha/2/m``: the first Holm step of the one-sided test
    with ``m`` certified rows); ``k_likely``, the trials with which a pass has probability
    ``>= power`` if the new rate equals the calibration rate (exact binomial power; None when
    the calibration rate is not above the level, or for the set FNR); both also as labelled
    images per class at ``prevalence`` (default: the calibration prevalence / flagged share),
    an estimate. ``k_images`` is the largest ``k_pass`` in images over the rows: a new site with
    fewer labelled images cannot re-certify the guarantee whatever its model does.
    """
    a = alpha if alpha is not None else (result.alpha if result.alpha is not None else 0.1)
    check_range(a, "alpha", "recertification_plan", 0.0, 1.0, low_inclusive=False,
                high_inclusive=False)
    rows = [c for c in result.classes if c.certified]
    tail = a / 2.0 / max(len(rows), 1)
    per: dict[str, dict[str, Any]] = {}
    for c in rows:
        what, bound, higher = _unit_of(c.kind)
        k = min_trials_to_pass(c.target, tail, bound, higher)
        r = c.calibration.get("rate")
        r = None if r is None else (1.0 - r if c.kind == "fnr" else r)
        # looked up on one_sample at call time: a patched search (tests, benchmarks) is used
        likely = (one_sample.trials_for_power(c.target, r, tail, power)
                  if bound == EXACT and r is not None and r > c.target else None)
        j = result.class_names.index(c.name) if c.name in result.class_names else None
        prev = None if prevalence is None or j is None else prevalence[j]
        src = "the new data" if prev is not None else "the calibration data"
        if prev is None:
            prev = (c.calibration.get("flagged_share") if c.kind == "precision" else
                    c.n_positives / c.n_images if c.n_images else None)
        img = (lambda t: None if t is None or not prev else int(math.ceil(t / prev)))
        per[c.name] = {"trials": what, "k_pass": k, "k_likely": likely,
                       "assumed_rate": c.calibration.get("rate") if likely else None,
                       "share": prev, "share_from": src, "images_pass": img(k),
                       "images_likely": img(likely)}
    k_img = max((v["images_pass"] for v in per.values() if v["images_pass"] is not None),
                default=None)
    k_lik = [v["images_likely"] for v in per.values()]
    likely_img = max(k_lik) if k_lik and all(v is not None for v in k_lik) else None
    if not per:
        text = "nothing was certified: there is no guarantee to re-certify"
    else:
        text = (f"re-certifying {result.spec} (alpha {a:g}, {len(per)} certified row(s), Holm) "
                f"needs at least {max(v['k_pass'] for v in per.values())} "
                f"{next(iter(per.values()))['trials']} per row for a pass to be possible at all"
                + (f" (about {k_img} labelled images per class at the prevalence of "
                   f"{next(iter(per.values()))['share_from']}, an estimate)" if k_img else "")
                + (f"; about {likely_img} labelled images for a {power:.0%} chance of a pass if "
                   "the rates stay at their calibration values" if likely_img else ""))
    return {"alpha": a, "one_sided_tail_first_holm_step": tail, "power": power, "rows": per,
            "k_images": k_img, "k_images_likely": likely_img, "statement": text}


@dataclass(frozen=True)
class Recertification:
    """Does a stored guarantee hold for new predictions (another model, runtime or site)?

    ``verdict`` is a :class:`~medscalpel.engine.decision.Verdict` (pass / fail / undecided per
    certified row and overall; exact one-sample binomial tests, Hoeffding for the set FNR, Holm
    over the rows, both families at one-sided ``alpha / 2``; rows that were never certified
    are named unscorable and accepted: there is nothing to re-check). ``outcome`` is its
    outcome; ``rows`` hold the observed rate, its interval at the row's Holm level, the counts
    and the margin observed - level; ``min_k`` is :func:`recertification_plan` (the fewest
    positives / labelled images per class with which the guarantee can be re-certified).
    """

    spec: str
    outcome: str
    alpha: float
    correction: str
    confidence: float
    rows: tuple[dict[str, Any], ...]
    n_images: int
    n_patients: int | None
    model_id: str
    certified_model_id: str
    verdict: Verdict
    min_k: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    schema_version: int = RECERT_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "kind_of_result": "recertification",
                "spec": self.spec, "outcome": self.outcome, "alpha": self.alpha,
                "correction": self.correction, "confidence": self.confidence,
                "rows": [dict(r) for r in self.rows], "n_images": self.n_images,
                "n_patients": self.n_patients, "model_id": self.model_id,
                "certified_model_id": self.certified_model_id,
                "verdict": self.verdict.to_dict(), "min_k": dict(self.min_k),
                "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recertification":
        if d.get("schema_version") != RECERT_SCHEMA or d.get("kind_of_result") != \
                "recertification":
            raise DataError(f"Not a recertification result of schema {RECERT_SCHEMA} "
                            f"(schema_version={d.get('schema_version')!r}): recompute it with "
                            "'repair calibrate --recertify'.")
        return cls(spec=d["spec"], outcome=d["outcome"], alpha=float(d["alpha"]),
                   correction=d["correction"], confidence=float(d["confidence"]),
                   rows=tuple(d["rows"]), n_images=int(d["n_images"]),
                   n_patients=d["n_patients"], model_id=d["model_id"],
                   certified_model_id=d["certified_model_id"],
                   verdict=Verdict.from_dict(d["verdict"]), min_k=dict(d.get("min_k") or {}),
                   notes=tuple(d.get("notes", ())))

    def summary(self) -> str:
        """One line: the outcome, why, and the minimum k."""
        return f"{self.spec}: {self.verdict.summary()}; {self.min_k.get('statement', '')}"

    def table(self) -> list[dict[str, Any]]:
        return [{"class": r["name"], "outcome": r["outcome"], "observed": r.get("observed"),
                 "CI": tuple(r["ci"]) if r.get("ci") else None, "n": r.get("n"),
                 "level": r["level"], "margin": r.get("margin"), "k to pass": r.get("k_pass")}
                for r in self.rows]


def _rate_unit(c: ClassGuarantee, j: int | None, z_all: np.ndarray, lab: np.ndarray
               ) -> tuple[RateUnit, dict[str, Any]]:
    """The new data's evidence on one certified row, and its row record."""
    rate, _, _ = KINDS[c.kind]
    if c.kind == "fnr":
        pos = np.nan_to_num(lab, nan=0.0) > 0.5
        img = pos.sum(1) > 0
        n = int(img.sum())
        obs = _set_fnr(z_all[img], pos[img], c.threshold_logit) if n else None
        u = RateUnit(c.name, c.target, None, n, obs, False, HOEFFDING, int(z_all.shape[0]),
                     n, int(z_all.shape[0]) - n, rate)
        return u, {"successes": None, "n_positives": n}
    known = np.isfinite(lab[:, j])
    y = lab[known, j] > 0.5
    cnt = _counts(y, z_all[known, j], c.threshold_logit)
    x, n = (cnt["tp"], cnt["tp"] + cnt["fp"]) if c.kind == "precision" else (cnt["tp"],
                                                                             int(y.sum()))
    u = RateUnit(c.name, c.target, x, n, None, True, EXACT, int(known.sum()), int(y.sum()),
                 int((~y).sum()), rate)
    return u, {"successes": x, "n_positives": int(y.sum()),
               "flagged_share": cnt["flagged_share"]}


def _rate_units(result: GuaranteeResult, z_all: np.ndarray, lab: np.ndarray
                ) -> tuple[list[RateUnit], dict[str, dict[str, Any]]]:
    """One :class:`RateUnit` per row of ``result`` (uncertified rows are unscorable) and the
    row records of the certified ones, by class name."""
    units, extra = [], {}
    for c in result.classes:
        if not c.certified:
            units.append(RateUnit(c.name, c.target, rate=KINDS[c.kind][0],
                                  unscorable="not certified: " + c.reason))
            continue
        j = None if c.kind == "fnr" else result.class_names.index(c.name)
        u, extra[c.name] = _rate_unit(c, j, z_all, lab)
        units.append(u)
    return units, extra


def _new_shares(result: GuaranteeResult, extra: dict[str, dict[str, Any]], lab: np.ndarray
                ) -> list[float | None]:
    """Per class, the new data's share that turns trials into labelled images (prevalence
    for recall, flagged share for precision; None where unknown or for the set FNR)."""
    prev: list[float | None] = [None] * len(result.class_names)
    for c in result.classes:
        e = extra.get(c.name)
        if e is not None and c.kind != "fnr":
            j = result.class_names.index(c.name)
            known = int(np.isfinite(lab[:, j]).sum())
            share = e["flagged_share"] if c.kind == "precision" else (
                e["n_positives"] / known if known else None)
            prev[j] = share or None
    return prev


def _row_record(c: ClassGuarantee, u: RateUnit, verdict: Verdict,
                extra: dict[str, dict[str, Any]], plan: dict[str, Any]) -> dict[str, Any]:
    """The stored row of one guarantee row: its outcome and, when certified, the observed
    rate, its interval at the row's Holm level, the counts, the margin and ``k_pass``."""
    v = verdict.unit(c.name)
    row: dict[str, Any] = {"name": c.name, "level": c.target,
                           "threshold_logit": c.threshold_logit, "outcome": v.outcome,
                           "reason": v.reason}
    if c.certified:
        obs = u.value
        lo, hi = rate_interval(u, v.level_adj)  # the unit's interval, as a rate
        row.update(observed=obs if math.isfinite(obs) else None,
                   ci=[lo, hi] if math.isfinite(lo) else None, level_adj=v.level_adj,
                   n=u.trials, successes=extra[c.name]["successes"],
                   n_images=u.n_images, n_positives=extra[c.name]["n_positives"],
                   margin=(obs - c.target) if math.isfinite(obs) else None,
                   more_images=v.more_images, k_pass=plan["rows"][c.name]["k_pass"])
    return row


def _recertify_notes(result: GuaranteeResult, n_images: int, n_pat: int | None) -> list[str]:
    """What the reader of a re-certification must know (nothing certified, an
    in-expectation guarantee, images counted as independent draws)."""
    notes = [] if any(c.certified for c in result.classes) else [
        "nothing was certified: nothing to re-certify"]
    if result.kind == "recall_mean":
        notes.append("an in-expectation guarantee: the recall at the stored threshold is "
                     "tested against the level")
    if n_pat is not None and n_pat < n_images:
        notes.append(f"{n_images} images from {n_pat} patients: the tests count images as "
                     "independent draws (approximate)")
    return notes


def recertify(result: GuaranteeResult, new_preds: Predictions, alpha: float | None = None,
              patient_ids: Sequence[str | None] | None = None) -> Recertification:
    """Check a stored guarantee on held-out labelled predictions of a (new) model or site.

    Each certified row's threshold is applied to ``new_preds``; the observed recall
    (precision; set FNR) is tested against the certified level with the exact one-sided
    binomial test (Hoeffding for the set FNR, a mean of [0, 1] losses), Holm over the certified
    rows, both families at one-sided ``alpha / 2`` (:func:`medscalpel.repair.one_sample.
    decide_one_sample`, a :class:`~medscalpel.engine.decision.Verdict`). Per row: ``pass`` when
    the exact lower bound at its Holm level lies above the level, ``fail`` when the upper bound
    lies below it, else ``undecided`` (with the images that would likely decide it, an
    estimate). Overall: ``fail`` if any row fails, ``pass`` if every certified row passes,
    else ``undecided``. For an in-expectation guarantee this tests the recall / FNR at the
    stored threshold (the quantity whose mean CRC bounds). The result states the minimum k
    (:func:`recertification_plan`) at the new data's prevalence.

    Args:
        alpha: the error allowed for the whole family, two-sided (default: the guarantee's
            alpha, 0.1 for in-expectation kinds).
        patient_ids: of ``new_preds``, to report the patient count.
    """
    new_preds = _as_multilabel(new_preds, "recertify")
    if tuple(new_preds.class_names) != tuple(result.class_names):
        raise DataError(f"recertify: the new predictions' classes {new_preds.class_names[:3]}"
                        f"... are not the certified ones {result.class_names[:3]}...")
    a = alpha if alpha is not None else (result.alpha if result.alpha is not None else 0.1)
    check_range(a, "alpha", "recertify", 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    pids = _pids(patient_ids, new_preds.n)
    lab = new_preds.targets()
    units, extra = _rate_units(result, new_preds.logits.astype(np.float64), lab)
    uncertified = [u.name for u in units if u.unscorable]
    verdict = decide_one_sample(
        units, level=1.0 - a, metric=KINDS[result.kind][0], accepted_unscorable=uncertified,
        method="exact one-sample binomial test (Clopper-Pearson)" if result.kind != "fnr"
        else "Hoeffding one-sample test of a mean of [0, 1] losses",
        meta={"spec": result.spec, "certified_on": result.split,
              "certified_model_id": result.model_id})
    plan = recertification_plan(result, a, _new_shares(result, extra, lab))
    rows = [_row_record(c, u, verdict, extra, plan) for c, u in zip(result.classes, units)]
    n_pat = _n_patients(pids, range(new_preds.n))
    notes = _recertify_notes(result, new_preds.n, n_pat)
    m = verdict.n_tests
    return Recertification(spec=result.spec, outcome=verdict.outcome, alpha=a,
                           correction=f"holm over {m} certified row(s), one-sided alpha "
                                      f"{a / 2:g} per family",
                           confidence=1.0 - a, rows=tuple(rows), n_images=new_preds.n,
                           n_patients=n_pat, model_id=new_preds.model_id,
                           certified_model_id=result.model_id, verdict=verdict, min_k=plan,
                           notes=tuple(notes))
