"""One decision primitive for paired non-inferiority verdicts: pass, fail or undecided.

Every verdict a user acts on (deploy go / no-go, "meets the floor", "less robust", "restored",
"helped") asks one question of a paired comparison on the same images: is the candidate's loss
``delta = candidate - reference`` no worse than a margin ``m``, i.e. ``delta >= -m``? Each unit (a
class, the macro mean, a corruption cell, a subgroup) is answered from its paired interval:

* **pass** when the interval's lower bound at the unit's Holm-adjusted level is ``>= -m``;
* **fail** when its upper bound is ``< -m`` (harm is certain at that level);
* **undecided** otherwise. A point estimate below ``-m`` whose interval straddles ``-m`` is
  *undecided*, not fail: the loss is likely but not shown; the verdict says so in its reason.

Two Holm families are tested, both at the one-sided level ``alpha = (1 - level) / 2`` (a 95%
two-sided interval per unit when there is one unit, the usual non-inferiority convention): the
claims "unit is non-inferior" and the claims "unit is inferior". Holm's step-down keeps the
chance of any false claim in a family below ``alpha``. The reported interval of a unit has
``level_adj`` in each tail, where ``level_adj`` is the Holm level at which the unit was decided
(or, when undecided, the smaller of the levels it met in the two families), so the interval always
agrees with the outcome. (For the overall *pass*, which needs every unit to pass, the
intersection-union principle would allow ``alpha`` per unit; Holm is the conservative choice the
project made so that every per-unit claim is also protected.)

Units with too little evidence (fewer than ``min_pos`` positive or ``min_neg`` negative images,
default 10 each, an undefined delta, or fewer than 10 finite bootstrap replicates) are not tested:
they are *named* as unscorable and make the verdict undecided unless the caller accepts them
explicitly (``accepted_unscorable``). Bootstrap replicates that are NaN (a resample without a
positive image) are counted and reported; they count against every decision (a NaN replicate is
read as below the margin for "pass" and above it for "fail"), never silently dropped.

Evidence comes either as bootstrap replicate deltas (:func:`medscalpel.engine.compare.
compare_predictions` keeps them) or as an estimate with a standard error (the paired DeLong
variance of an AUROC difference: :func:`paired_delong`). For an undecided unit the verdict
estimates how many images would likely decide it: ``n * ((z_a + z_b) * se / (est + m))**2``
images in all (``z_a`` at its Holm level, ``z_b`` for 80% power), assuming the point estimate,
the prevalence and the per-image variance stay as measured. It is an estimate, and labelled so.

Example:
    >>> import numpy as np
    >>> reps = np.random.default_rng(0).normal(0.002, 0.003, 2000)
    >>> v = decide([UnitInput("x", 0.002, n=500, n_pos=100, n_neg=400, replicates=reps)],
    ...            margin=0.01)
    >>> v.outcome
    'pass'
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.stats import norm, rankdata

from medscalpel.errors import ConfigError, DataError
from medscalpel.validation import check_in, check_range

SCHEMA = 1
OUTCOMES = ("pass", "fail", "undecided")
UNIT_OUTCOMES = OUTCOMES + ("unscorable",)
CORRECTIONS = ("holm", "none")
POWER = 0.8                      # power assumed by the more-images estimate
MIN_FINITE_REPLICATES = 10
NAN = float("nan")


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class UnitInput:
    """The evidence of one unit, given to :func:`decide` (not stored).

    Exactly one of ``replicates`` (bootstrap deltas, NaN kept) and ``se`` (standard error of a
    normal approximation, e.g. paired DeLong) must be given. ``n_pos`` / ``n_neg`` are ``None``
    for a unit without its own labels (the macro mean, a robustness cell's macro row).
    """

    name: str
    estimate: float
    n: int
    n_pos: int | None = None
    n_neg: int | None = None
    replicates: np.ndarray | None = None
    se: float | None = None
    kind: str = "class"
    margin: float | None = None   # overrides decide()'s margin for this unit
    note: str = ""                # what the unit is (e.g. "mean over 12 scorable classes")


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class UnitVerdict:
    """The evidence and outcome of one unit: estimate, interval at its adjusted level, counts."""

    name: str
    kind: str
    outcome: str                       # pass / fail / undecided / unscorable
    estimate: float
    ci_low: float
    ci_high: float
    level_adj: float                   # one-sided tail of each interval bound (Holm-adjusted)
    margin: float
    se: float
    p_pass: float                      # one-sided evidence against "delta < -margin"
    p_fail: float                      # one-sided evidence against "delta >= -margin"
    n: int
    n_pos: int | None
    n_neg: int | None
    n_replicates: int | None
    n_nan_replicates: int | None
    more_images: int | None            # estimated extra images that would likely decide
    reason: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UnitVerdict":
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("estimate", "ci_low", "ci_high", "level_adj", "margin", "se", "p_pass",
                  "p_fail"):
            kw[k] = NAN if kw.get(k) is None else float(kw[k])
        return cls(**kw)


@dataclass(frozen=True)
class Verdict:
    """A paired non-inferiority verdict: outcome, the question, every unit's evidence, the
    correction, what could not be checked and what was accepted unchecked."""

    outcome: str
    metric: str
    margin: float
    level: float                       # two-sided confidence asked for (e.g. 0.95)
    alpha: float                       # family-wise one-sided error: (1 - level) / 2
    method: str
    correction: str
    n_tests: int
    n: int
    units: tuple[UnitVerdict, ...]
    unscorable: tuple[str, ...]
    accepted_unscorable: tuple[str, ...]
    min_pos: int
    min_neg: int
    reason: str
    direction: str = "non-inferiority: delta = candidate - reference >= -margin"
    schema_version: int = SCHEMA
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.outcome == "pass"

    def unit(self, name: str) -> UnitVerdict:
        for u in self.units:
            if u.name == name:
                return u
        raise ConfigError(f"Verdict has no unit '{name}'; units: {[u.name for u in self.units]}.")

    def by_outcome(self, outcome: str) -> list[UnitVerdict]:
        check_in(outcome, "outcome", "Verdict.by_outcome", UNIT_OUTCOMES)
        return [u for u in self.units if u.outcome == outcome]

    def summary(self) -> str:
        """One line for the CLI: the outcome, why, and the question it answered."""
        name = self.metric.upper() if len(self.metric) <= 5 else self.metric
        q = (f"{name} delta >= -{self.margin:g}; {self.correction} over "
             f"{self.n_tests} test(s), one-sided alpha {self.alpha:g}; {self.method}; "
             f"{self.n} images")
        return f"{self.outcome}: {self.reason} ({q})"

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "units"}
        d["units"] = [u.to_dict() for u in self.units]
        d["unscorable"], d["accepted_unscorable"] = list(self.unscorable), \
            list(self.accepted_unscorable)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Verdict":
        if int(d.get("schema_version", 0)) != SCHEMA:
            raise DataError(f"Verdict: schema_version {d.get('schema_version')} is not {SCHEMA}; "
                            "recompute the verdict.")
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kw["units"] = tuple(UnitVerdict.from_dict(u) for u in d["units"])
        kw["unscorable"] = tuple(d["unscorable"])
        kw["accepted_unscorable"] = tuple(d["accepted_unscorable"])
        kw["meta"] = dict(d.get("meta", {}))
        return cls(**kw)


# ----------------------------------------------------------------------------- Holm
def holm(p: Sequence[float], alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down test of hypotheses with p-values ``p`` at family-wise level ``alpha``.

    A hypothesis is rejected when its p-value is strictly below its step's level
    ``alpha / (k - rank)`` and every hypothesis before it in ascending order was rejected.

    Returns:
        ``(rejected, levels)``: for a rejected hypothesis, the level it was rejected at; for one
        that was not, the level of the step at which the procedure stopped (its p-value is at or
        above that level, so an interval at it agrees with "not rejected"). NaN p-values are not
        tested (not rejected, level NaN) and do not count in ``k``.
    """
    p = np.asarray(p, np.float64)
    ok = np.flatnonzero(np.isfinite(p))
    rejected = np.zeros(p.shape, bool)
    levels = np.full(p.shape, NAN)
    order = ok[np.argsort(p[ok], kind="mergesort")]
    k = len(order)
    stopped = None
    for rank, j in enumerate(order):
        lvl = alpha / (k - rank)
        if stopped is None and p[j] < lvl:
            rejected[j], levels[j] = True, lvl
            continue
        stopped = lvl if stopped is None else stopped
        levels[j] = stopped
    return rejected, levels


# ----------------------------------------------------------------------------- DeLong
def delong_influence(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray]:
    """AUROC of scores ``s`` for binary labels ``y`` and its per-image DeLong influence.

    The influence of a positive image is ``(V10_i - mean V10) / sqrt(m (m - 1))`` and of a
    negative ``(V01_j - mean V01) / sqrt(n (n - 1))`` (DeLong's structural components, ties count
    1/2; midranks as in Sun & Xu 2014), so the sum of squares is DeLong's variance
    ``S10 / m + S01 / n`` and the influence of a difference of two AUROCs on the same images is
    the difference of the influences. Needs at least 2 positive and 2 negative images.
    """
    y = np.asarray(y, bool)
    s = np.asarray(s, np.float64)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise DataError(f"delong_influence: needs >= 2 positive and >= 2 negative images; got "
                        f"{m} and {n}.")
    r_all = rankdata(s)
    v10 = (r_all[y] - rankdata(s[y])) / n            # share of negatives below each positive
    v01 = 1.0 - (r_all[~y] - rankdata(s[~y])) / m    # share of positives above each negative
    auc = float(v10.mean())
    psi = np.zeros(y.size)
    psi[y] = (v10 - v10.mean()) / math.sqrt(m * (m - 1))
    psi[~y] = (v01 - v01.mean()) / math.sqrt(n * (n - 1))
    return auc, psi


def paired_delong(y: np.ndarray, s_ref: np.ndarray, s_new: np.ndarray) -> tuple[float, float]:
    """Paired DeLong: ``(AUROC(new) - AUROC(ref), its standard error)`` on the same images."""
    a_ref, p_ref = delong_influence(y, s_ref)
    a_new, p_new = delong_influence(y, s_new)
    return a_new - a_ref, float(np.sqrt(np.sum((p_new - p_ref) ** 2)))


def delong_covariance(t: np.ndarray, s_ref: np.ndarray, s_new: np.ndarray,
                      min_each: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per-class paired AUROC deltas ``[k]`` and their DeLong covariance ``[k, k]``.

    ``t`` holds 0/1 targets ``[n, k]`` (NaN: label unknown, the image leaves that class out);
    the covariance between two classes is the sum over images of the product of their influences
    (it equals DeLong's variance on the diagonal), so a macro mean over any subset ``S`` of
    classes has variance ``cov[S][:, S].sum() / |S|**2``. Classes with fewer than ``min_each``
    positive or negative images get NaN.
    """
    t = np.asarray(t, np.float64)
    n, k = t.shape
    phi = np.zeros((n, k))
    delta = np.full(k, NAN)
    bad = np.zeros(k, bool)
    for j in range(k):
        known = np.isfinite(t[:, j])
        y = t[known, j] > 0.5
        if y.sum() < min_each or (~y).sum() < min_each:
            bad[j] = True
            continue
        a_ref, p_ref = delong_influence(y, s_ref[known, j])
        a_new, p_new = delong_influence(y, s_new[known, j])
        delta[j] = a_new - a_ref
        phi[known, j] = p_new - p_ref
    cov = phi.T @ phi
    cov[bad, :] = NAN
    cov[:, bad] = NAN
    return delta, cov


# ----------------------------------------------------------------------------- decide
def _screen(u: UnitInput, min_pos: int, min_neg: int) -> str:
    """Why a unit cannot be tested ("" when it can)."""
    why = []
    if u.n_pos is not None and u.n_pos < min_pos:
        why.append(f"{u.n_pos} positive image(s) < {min_pos}")
    if u.n_neg is not None and u.n_neg < min_neg:
        why.append(f"{u.n_neg} negative image(s) < {min_neg}")
    if not math.isfinite(u.estimate):
        why.append("delta undefined (NaN)")
    if u.replicates is not None:
        finite = int(np.isfinite(np.asarray(u.replicates, np.float64)).sum())
        if finite < MIN_FINITE_REPLICATES:
            why.append(f"{finite} finite bootstrap replicate(s) < {MIN_FINITE_REPLICATES}")
    elif u.se is None or not math.isfinite(u.se) or u.se < 0:
        why.append("standard error undefined")
    return "; ".join(why)


def _tails(u: UnitInput, m: float) -> tuple[float, float]:
    """``(p_pass, p_fail)``: evidence against ``delta < -m`` and against ``delta >= -m``."""
    if u.replicates is not None:
        r = np.asarray(u.replicates, np.float64)
        nan = ~np.isfinite(r)
        below = np.sum(r[~nan] < -m)
        return float((below + nan.sum()) / r.size), float((r.size - below) / r.size)
    z = u.estimate + m
    if u.se == 0:
        return (0.0, 1.0) if z >= 0 else (1.0, 0.0)
    return float(norm.cdf(-z / u.se)), float(norm.cdf(z / u.se))


def _interval(u: UnitInput, level: float) -> tuple[float, float]:
    """Two-sided interval with ``level`` in each tail; NaN replicates count as -inf for the
    lower and +inf for the upper bound (so the interval agrees with :func:`_tails`)."""
    if not math.isfinite(level):
        return NAN, NAN
    if u.replicates is not None:
        r = np.asarray(u.replicates, np.float64)
        lo_r = np.where(np.isfinite(r), r, -np.inf)
        hi_r = np.where(np.isfinite(r), -r, -np.inf)
        lo = float(np.quantile(lo_r, level, method="inverted_cdf"))
        hi = -float(np.quantile(hi_r, level, method="inverted_cdf"))
        return (lo if math.isfinite(lo) else NAN), (hi if math.isfinite(hi) else NAN)
    z = float(norm.ppf(1.0 - level))
    return u.estimate - z * u.se, u.estimate + z * u.se


def _se(u: UnitInput) -> float:
    if u.replicates is None:
        return float(u.se)
    r = np.asarray(u.replicates, np.float64)
    r = r[np.isfinite(r)]
    return float(r.std(ddof=1)) if r.size > 1 else NAN


def more_images(n: int, estimate: float, se: float, margin: float, level: float,
                power: float = POWER) -> int | None:
    """Estimated extra images for a one-sided test at ``level`` to decide with ``power``, if the
    point estimate and the per-image variance stay as measured; ``None`` when the estimate sits
    on the margin or the standard error is undefined / zero."""
    gap = abs(estimate + margin)
    if not (math.isfinite(gap) and math.isfinite(se) and se > 0 and gap > 0 and 0 < level < 1):
        return None
    total = n * ((norm.ppf(1 - level) + norm.ppf(power)) * se / gap) ** 2
    return int(max(0, math.ceil(total - n)))


def decide(units: Sequence[UnitInput], *, margin: float, metric: str = "auroc",
           level: float = 0.95, correction: str = "holm", min_pos: int = 10, min_neg: int = 10,
           accepted_unscorable: Sequence[str] | bool = (), method: str = "",
           meta: dict[str, Any] | None = None) -> Verdict:
    """Decide pass / fail / undecided for a family of paired units (see the module docstring).

    Args:
        units: the evidence per unit (class, macro, cell, subgroup); names must be unique.
        margin: non-inferiority margin ``m >= 0`` (pass needs ``delta >= -m`` shown).
        metric: the measured quantity (for the record and the summary).
        level: two-sided confidence of the family; one-sided ``alpha = (1 - level) / 2``.
        correction: ``"holm"`` (default) or ``"none"`` (every unit at ``alpha``; stated).
        min_pos, min_neg: minimum positive / negative images for a unit with labels.
        accepted_unscorable: names of units the caller accepts unchecked, or ``True`` for all;
            unaccepted unscorable units make the verdict undecided.
        method: how the evidence was computed (e.g. "paired bootstrap, 1000 replicates").

    Raises:
        ConfigError: a bad parameter, duplicate unit names, an accepted name that is no unit, or
            a unit with both or neither of replicates / se.
    """
    owner = "decide"
    check_range(margin, "margin", owner, 0.0)
    check_range(level, "level", owner, 0.5, 1.0, low_inclusive=False, high_inclusive=False)
    check_in(correction, "correction", owner, CORRECTIONS)
    check_range(min_pos, "min_pos", owner, 0, integer=True)
    check_range(min_neg, "min_neg", owner, 0, integer=True)
    names = [u.name for u in units]
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"The 'units' parameter of decide must hold units with unique names. "
                          f"Got {names} instead.")
    for u in units:
        if (u.replicates is None) == (u.se is None):
            raise ConfigError(f"decide: unit '{u.name}' must carry exactly one of 'replicates' "
                              "(bootstrap deltas) and 'se' (normal approximation).")
        if u.margin is not None:
            check_range(u.margin, "margin", f"unit '{u.name}'", 0.0)
    accepted = _accepted(accepted_unscorable, names)
    alpha = (1.0 - level) / 2.0
    why = [_screen(u, min_pos, min_neg) for u in units]
    tested = [i for i, w in enumerate(why) if not w]
    mg = [margin if u.margin is None else float(u.margin) for u in units]
    tails = {i: _tails(units[i], mg[i]) for i in tested}
    if correction == "holm":
        ok_pass, lv_pass = holm([tails[i][0] for i in tested], alpha)
        ok_fail, lv_fail = holm([tails[i][1] for i in tested], alpha)
    else:
        ok_pass = np.array([tails[i][0] < alpha for i in tested], bool)
        ok_fail = np.array([tails[i][1] < alpha for i in tested], bool)
        lv_pass = lv_fail = np.full(len(tested), alpha)
    pos = {i: t for t, i in enumerate(tested)}
    out = []
    for i, u in enumerate(units):
        r = None if u.replicates is None else np.asarray(u.replicates, np.float64)
        counts = (None, None) if r is None else (int(r.size), int((~np.isfinite(r)).sum()))
        base = dict(name=u.name, kind=u.kind, estimate=float(u.estimate), margin=mg[i],
                    n=int(u.n), n_pos=u.n_pos, n_neg=u.n_neg, n_replicates=counts[0],
                    n_nan_replicates=counts[1], note=u.note)
        if i not in pos:
            out.append(UnitVerdict(outcome="unscorable", ci_low=NAN, ci_high=NAN, level_adj=NAN,
                                   se=_se(u) if math.isfinite(u.estimate) else NAN, p_pass=NAN,
                                   p_fail=NAN, more_images=None, reason=f"not tested: {why[i]}",
                                   **base))
            continue
        t = pos[i]
        out.append(_unit(u, base, tails[i], bool(ok_pass[t]), bool(ok_fail[t]),
                         float(lv_pass[t]), float(lv_fail[t])))
    return _verdict(out, accepted, metric=metric, margin=margin, level=level, alpha=alpha,
                    correction=correction, n_tests=len(tested), min_pos=min_pos, min_neg=min_neg,
                    n=max(int(u.n) for u in units),
                    method=method or ("paired bootstrap" if units[0].replicates is not None
                                      else "normal approximation"), meta=meta or {})


def _accepted(accepted: Sequence[str] | bool, names: list[str]) -> tuple[str, ...]:
    if accepted is True:
        return tuple(names)
    if accepted is False or accepted is None:
        return ()
    if isinstance(accepted, str):
        accepted = [accepted]
    unknown = [a for a in accepted if a not in names]
    if unknown:
        raise ConfigError(f"The 'accepted_unscorable' parameter of decide must name units of the "
                          f"verdict ({names}). Got {unknown} instead.")
    return tuple(accepted)


def unit_outcome(passed: bool, failed: bool, lv_pass: float, lv_fail: float
                 ) -> tuple[str, float]:
    """A tested unit's outcome and the (Holm-adjusted) level its interval is shown at."""
    if passed:
        return "pass", lv_pass
    if failed:
        return "fail", lv_fail
    return "undecided", min(lv_pass, lv_fail)


def _unit(u: UnitInput, base: dict[str, Any], tails: tuple[float, float], passed: bool,
          failed: bool, lv_pass: float, lv_fail: float) -> UnitVerdict:
    m = base["margin"]
    se = _se(u)
    outcome, lvl = unit_outcome(passed, failed, lv_pass, lv_fail)
    lo, hi = _interval(u, lvl)
    ci = f"[{lo:+.4f}, {hi:+.4f}] at {lvl:.3g} per tail"
    more = None
    if outcome == "pass":
        reason = f"lower bound {lo:+.4f} >= -{m:g} ({ci})"
    elif outcome == "fail":
        reason = f"upper bound {hi:+.4f} < -{m:g}: loss beyond the margin shown ({ci})"
    else:
        heading = lv_pass if u.estimate >= -m else lv_fail
        more = more_images(u.n, u.estimate, se, m, heading)
        lean = ("point estimate below -margin, interval straddles it: a loss is likely but not "
                "shown" if u.estimate < -m else "interval straddles -margin")
        more_txt = (f"; ~{more} more images would likely decide (estimate)" if more is not None
                    else "")
        reason = f"{lean} ({ci}){more_txt}"
    if base["n_nan_replicates"]:
        reason += (f"; {base['n_nan_replicates']} of {base['n_replicates']} bootstrap replicates "
                   "undefined (counted against the decision)")
    return UnitVerdict(outcome=outcome, ci_low=lo, ci_high=hi, level_adj=lvl, se=se,
                       p_pass=tails[0], p_fail=tails[1], more_images=more, reason=reason,
                       **base)


def _verdict(units: list[UnitVerdict], accepted: tuple[str, ...], **kw: Any) -> Verdict:
    unscorable = tuple(u.name for u in units if u.outcome == "unscorable")
    open_ = [name for name in unscorable if name not in accepted]
    fails = [u for u in units if u.outcome == "fail"]
    undecided = [u for u in units if u.outcome == "undecided"]
    tested = [u for u in units if u.outcome != "unscorable"]
    unsc_txt = ("; unscorable, not accepted: " + ", ".join(
        f"{u.name} ({u.reason.removeprefix('not tested: ')})" for u in units
        if u.name in open_)) if open_ else ""
    if fails:
        outcome = "fail"
        reason = "loss beyond the margin shown in " + ", ".join(
            f"{u.name} {u.estimate:+.4f} [{u.ci_low:+.4f}, {u.ci_high:+.4f}]" for u in fails)
    elif not tested:
        outcome, reason = "undecided", "no unit could be tested"
    elif undecided or open_:
        outcome = "undecided"
        more = [u.more_images for u in undecided if u.more_images is not None]
        reason = (f"{len(undecided)} of {len(tested)} tested unit(s) undecided: " + ", ".join(
            f"{u.name} {u.estimate:+.4f} [{u.ci_low:+.4f}, {u.ci_high:+.4f}]"
            for u in undecided[:4]) + (" ..." if len(undecided) > 4 else "") +
            (f" (~{max(more)} more images would likely decide them, an estimate)" if more
             else "")) if undecided else f"all {len(tested)} tested unit(s) pass"
    else:
        outcome = "pass"
        reason = f"all {len(tested)} tested unit(s) pass"
    if accepted and unscorable:
        acc = [n for n in unscorable if n in accepted]
        reason += f"; accepted unchecked: {', '.join(acc)}" if acc else ""
    return Verdict(outcome=outcome, units=tuple(units), unscorable=unscorable,
                   accepted_unscorable=tuple(a for a in accepted if a in unscorable),
                   reason=reason + unsc_txt, **kw)
