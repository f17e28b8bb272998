"""The deploy decision: which measured variant may be served, and why the others may not.

Per variant: the accuracy non-inferiority verdict on the evaluation (and external) set, the
re-certification of the model card's guarantee on the variant's own logits, and the speed checks
against torch fp32 and the variant's own runtime's fp32 (:func:`_decide`); then the
recommendation among the ``go`` variants with its tie rule (:func:`_recommend`), and the error
that says why nothing could be served (:func:`_floor_error`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

from medscalpel.deploy.plan import OWNER, REFERENCE, _Variant
from medscalpel.deploy.timing import SpeedRatio, speed_ratio
from medscalpel.errors import VerificationError
from medscalpel.repair.calibrate import binary_view
from medscalpel.repair.conformal import GuaranteeResult, recertify


def accuracy_verdict(comparison, floor_macro: float, floor_class: float, n_boot: int,
                     accept_unscorable: bool | Sequence[str] = False, min_pos: int = 10):
    """The non-inferiority verdict of one variant on one set: every class's delta AUROC >=
    ``floor_class`` and the macro mean's >= ``floor_macro`` shown by the paired intervals, Holm
    across them (paired bootstrap, or paired DeLong without replicates)."""
    return comparison.verdict(margin=-floor_class, macro_margin=-floor_macro,
                              method="bootstrap" if n_boot else "delong",
                              min_pos=min_pos, min_neg=min_pos,
                              accepted_unscorable=accept_unscorable)


# ----------------------------------------------------------------------------- guarantee
def _recertify(v: _Variant, g: GuaranteeResult, positive: str | None,
               require: bool) -> None:
    """Re-certify ``g`` on the variant's own logits (evaluation set, and external set when
    measured): a fail is no-go, undecided blocks only when ``require``."""
    for where, preds in (("internal", v.preds), ("external", v.ext_preds)):
        if preds is None:
            continue
        view = binary_view(preds, positive) if positive is not None else preds
        rc = recertify(g, view)
        v.recert[where] = rc
        if rc.outcome == "fail":
            v.fail("no-go", f"guarantee {g.spec} FAILS ({where}): {rc.verdict.reason}")
        elif rc.outcome == "undecided" and require:
            v.fail("undecided", f"guarantee {g.spec} not re-certified ({where}, "
                                f"--require-guarantee): {rc.verdict.reason}; "
                                f"{rc.min_k.get('statement', '')}")


# ----------------------------------------------------------------------------- decide
_PRECISION_RANK = {"fp32": 0, "bf16": 1}  # int8 variants rank 2: most accuracy risk


def _speed(v: _Variant, other: _Variant, b: int) -> SpeedRatio | None:
    """How much faster ``v`` is than ``other`` at batch ``b``: per-round ratios of one
    alternated run (``None`` when either was not timed)."""
    if not v.times.get(b) or not other.times.get(b) or len(v.times[b]) != len(other.times[b]):
        return None
    return speed_ratio(other.times[b], v.times[b])


def _decide(vs: list[_Variant], batches, floor_macro, floor_class, vnni: bool, n_boot: int = 0,
            accept_unscorable: bool | Sequence[str] = False, min_pos: int = 10,
            guarantee: tuple[GuaranteeResult, str | None] | None = None,
            require_guarantee: bool = False) -> None:
    """Accuracy, then speed. Accuracy: the variant's non-inferiority verdict on the evaluation
    set (and on the external set when given) must PASS: a fail is no-go, an undecided verdict
    (intervals straddling the floor, or classes with too few positives to check) is
    ``undecided``, never served. Guarantee (when the card carries one): every variant that
    passes the floor is re-certified on its own logits; a fail is no-go, an undecided
    re-certification blocks only with ``require_guarantee``. Speed: no-go when DECISIVELY
    slower than torch fp32 (or a reduced precision than its own runtime's fp32): the whole
    interval of its per-round speed ratio below 1. Within timing noise it stays eligible and
    the tie rule of :func:`_recommend` decides."""
    b0 = batches[0]
    by_name = {v.rt.name: v for v in vs}
    ref = by_name.get(REFERENCE)
    for v in vs:
        if v.status != "go":
            continue
        # the reference IS the model: nothing to verify, so it stays servable whatever the
        # evaluation set can show (its comparison with itself is kept for the record)
        for where, cmp in (() if v is ref else
                           (("internal", v.comparison), ("external", v.ext_comparison))):
            if cmp is None:
                continue
            verdict = accuracy_verdict(cmp, floor_macro, floor_class, n_boot,
                                       accept_unscorable, min_pos)
            v.verdicts[where] = verdict
            if verdict.outcome == "fail":
                v.fail("no-go", f"failed floor ({where}): {verdict.reason}")
            elif verdict.outcome == "undecided":
                v.fail("undecided", f"floor not shown ({where}): {verdict.reason}")
        if guarantee is not None and v.status == "go":
            _recertify(v, guarantee[0], guarantee[1], require_guarantee)
        sr = _speed(v, ref, b0) if ref is not None and v is not ref else None
        if sr is not None and sr.outcome == "slower":
            v.fail("no-go", f"slower than torch fp32 at batch {b0}: {sr.describe()}")
        fp32 = by_name.get(f"{v.rt.runtime}:fp32")
        sf = _speed(v, fp32, b0) if fp32 is not None and v.rt.precision != "fp32" else None
        if sf is not None and sf.outcome == "slower":
            hw = "" if vnni or not v.rt.precision.startswith("int8") else \
                " (no VNNI on this CPU: int8 runs on the AVX2 path)"
            v.fail("no-go", f"{v.rt.precision} slower than {v.rt.runtime} fp32 at batch {b0}: "
                            f"{sf.describe()}{hw}")


def _noisy(live: list[_Variant], b0: int) -> list[str]:
    ref = next((v for v in live if v.rt.name == REFERENCE), None)
    if ref is None:
        return []
    out = []
    for v in live:
        sr = _speed(v, ref, b0) if v is not ref else None
        if sr is not None and sr.noisy:
            out.append(v.rt.name)
    return out


def _rank(v: _Variant) -> int:
    return _PRECISION_RANK.get(v.rt.precision, 2)


def _recommend(vs: list[_Variant], b0: int) -> tuple[_Variant | None, str]:
    """The fastest ``go`` variant, unless other ``go`` variants are indistinguishable from it
    within timing noise (the per-round ratio's interval holds 1 or the rounds are noisy):
    among those the highest precision is served (fp32 > bf16 > int8), so that a noisy run does
    not flip the recommendation to a riskier precision it has not shown to be faster."""
    go = [v for v in vs if v.status == "go" and v.times.get(b0)]
    if not go:
        return None, ""
    fastest = min(go, key=lambda v: statistics.median(v.times[b0]))
    ties = [v for v in go if v is fastest
            or (_speed(fastest, v, b0) is not None and _speed(fastest, v, b0).outcome != "faster")]
    best = min(ties, key=lambda v: (_rank(v), statistics.median(v.times[b0])))
    ref = next(v for v in vs if v.rt.name == REFERENCE)
    sr = _speed(best, ref, b0)
    m = best.comparison.macro["delta_auroc"] if best.comparison else 0.0
    speed = sr.describe() if sr is not None else "1.00x (it is the reference)"
    shown = (" and ".join(f"{k} {best.verdicts[k].outcome}" for k in best.verdicts)
             or "the reference itself")
    reason = (f"fastest variant shown to meet the floor at batch {b0}: {speed} torch fp32 "
              f"eager, macro dAUROC {m:+.4f} (verdict: {shown}), parity "
              f"{best.parity[1]:.2g} of the logit scale")
    if best is not fastest:
        reason += (f"; {fastest.rt.name} had the lowest median but is not decisively faster "
                   f"({_speed(fastest, best, b0).describe()}), so the higher precision is "
                   "served")
    elif len(ties) > 1:
        others = ", ".join(v.rt.name for v in ties if v is not best)
        reason += f"; within timing noise of: {others}"
    if best is ref:
        held = [v.rt.name for v in vs if v is not ref and v.status in ("undecided", "no-go")]
        if held:
            reason += (f"; no faster variant was shown to meet the floor ({', '.join(held)}: "
                       "see their verdicts), so the reference itself is served")
    return best, reason


def _floor_error(vs: list[_Variant], floor_macro, floor_class) -> VerificationError:
    broken = [v.rt.name for v in vs if any(r.outcome == "fail" for r in v.recert.values())]
    if broken:
        return VerificationError(f"{OWNER}: no variant can be served: the model card's guarantee "
                                 f"FAILS for {', '.join(broken)} (see each variant's "
                                 "recertification), and no other variant was shown to meet the "
                                 "floor and keep it.")
    unsure = [v.rt.name for v in vs if v.status == "undecided"
              and any(r.outcome == "undecided" for r in v.recert.values())]
    if unsure:
        return VerificationError(f"{OWNER}: no variant can be served with --require-guarantee: "
                                 f"the model card's guarantee could not be re-certified "
                                 f"(undecided) for {', '.join(unsure)}: "
                                 f"{next(v for v in vs if v.rt.name == unsure[0]).reasons[-1]}")
    judged = [v for v in vs if v.verdicts]
    if not judged:
        return VerificationError(f"{OWNER}: no variant could be measured; see the reasons.")
    undecided = [v for v in judged if v.status == "undecided"]
    best = max(judged, key=lambda v: v.comparison.macro["delta_auroc"]
               if v.comparison is not None else -np.inf)
    lines = "; ".join(f"{k}: {vd.outcome} ({vd.reason})" for k, vd in best.verdicts.items())
    hint = (" Classes with fewer than 10 positive or negative evaluation images cannot be "
            "checked: use more images (--n-images), or accept them unchecked "
            "(--accept-unscorable, stated in the result)." if undecided else
            " Lower the floor or compress less.")
    return VerificationError(
        f"{OWNER}: no variant was shown to meet the accuracy floor (macro dAUROC >= "
        f"{floor_macro:+g}, every class >= {floor_class:+g}, paired intervals, Holm); "
        f"{len(undecided)} undecided; best: {best.rt.name}: {lines[:600]}.{hint}")



__all__ = ["accuracy_verdict"]
