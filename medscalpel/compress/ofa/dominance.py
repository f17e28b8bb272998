"""Does one model dominate another on (latency, AUROC)? A verdict per pair, with evidence.

"An OFA subnet dominates a current student" is a claim about two noisy measurements: a latency
ratio from one alternated timing run and an AUROC difference on one test split. A front drawn
from point estimates cannot make it. This module decides it per pair ``(candidate, other)``:

* **dominates**: the candidate is *faster* AND its macro AUROC is *at most* ``margin`` *below*
  the other's, both shown;
* **dominated**: the other is faster AND the candidate's macro AUROC is at most ``margin``
  *above* the other's (the other is non-inferior), both shown;
* **undecided** otherwise (what was not shown is said in ``reason``); **unscorable** when the
  evidence is missing (too few rounds, too few positive / negative images, no replicates).

Evidence. Latency: the per-round ratios ``other_ms / candidate_ms`` of ONE alternated run (the
models timed in turns in every round, :func:`medscalpel.compress.ofa.search.alternated_latency`)
and the exact one-sided sign test of "the median ratio is <= 1" (resp. ">= 1"): ``p = P(Binom(R,
1/2) >= k)`` with ``k`` the rounds in which the candidate was faster (ties count against); the
same order statistics give :func:`medscalpel.deploy.timing.speed_ratio`'s interval. AUROC: the
paired bootstrap replicates of the macro delta ``candidate - other`` on the SAME test images
(:func:`medscalpel.engine.compare.compare_predictions` with the other model as reference; the
macro mean over the classes with at least ``min_pos`` / ``min_neg`` images, as
:meth:`~medscalpel.engine.compare.PairedComparison.verdict` takes it); ``p = (1 + #{replicates
beyond the margin} + #{NaN replicates}) / (1 + B)`` (the +1 keeps a finite bootstrap from
claiming p = 0; NaN replicates count against the claim, as in :mod:`medscalpel.engine.decision`).

A claim needs both of its parts (intersection-union test): its p-value is the larger of the two.
The ``dominates`` claims of all pairs form one family and the ``dominated`` claims another, each
tested at the one-sided level ``alpha = (1 - level) / 2`` with Holm's step-down
(:func:`medscalpel.engine.decision.holm`) or Bonferroni across the pairs; the AUROC interval of a
pair is reported at the level its claim was tested at, so it agrees with the outcome. The
sign test needs enough rounds: with ``R`` rounds the smallest p is ``2**-R`` (Holm over 9 pairs at
alpha 0.025 needs ``R >= 9``); a run with too few rounds leaves every pair undecided and says so.

Example:
    >>> import numpy as np
    >>> reps = np.random.default_rng(0).normal(0.02, 0.01, 2000)
    >>> p = PairInput("ofa", "student", auroc_delta=0.02, auroc_replicates=reps, n=500,
    ...               candidate_ms=[1.0] * 12, other_ms=[2.0] * 12)
    >>> decide_dominance([p], margin=0.01).pairs[0].outcome
    'dominates'
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.stats import binom

from medscalpel.deploy.timing import speed_ratio
from medscalpel.engine.compare import PairedComparison
from medscalpel.engine.decision import holm
from medscalpel.errors import ConfigError, DataError
from medscalpel.validation import check_in, check_range

SCHEMA = 1
OUTCOMES = ("dominates", "dominated", "undecided", "unscorable")
CORRECTIONS = ("holm", "bonferroni")
MIN_FINITE_REPLICATES = 10
NAN = float("nan")
DEFINITION = ("dominates: the candidate is faster (exact sign test on the per-round latency "
              "ratios of one alternated run) AND its macro AUROC is at most `margin` below the "
              "other's (paired bootstrap on the same test images); dominated: the other is "
              "faster AND the candidate's macro AUROC is at most `margin` above the other's; "
              "each claim's p is the larger of its two parts (intersection-union); the "
              "'dominates' claims of all pairs form one family and the 'dominated' claims "
              "another, each at one-sided alpha = (1 - level) / 2 with the stated correction")


@dataclass(frozen=True)
class PairInput:
    """The evidence of one pair, given to :func:`decide_dominance` (not stored).

    ``auroc_replicates`` are bootstrap replicates of ``candidate - other`` (NaN kept);
    ``candidate_ms`` / ``other_ms`` the two models' times in the SAME rounds of one run.
    """

    candidate: str
    other: str
    auroc_delta: float
    auroc_replicates: np.ndarray | None
    n: int
    candidate_ms: Sequence[float]
    other_ms: Sequence[float]
    note: str = ""


@dataclass(frozen=True)
class PairVerdict:
    """One pair's outcome and the evidence behind it."""

    candidate: str
    other: str
    outcome: str
    reason: str
    speed_ratio: float                # other_ms / candidate_ms, median over rounds (> 1: faster)
    speed_low: float                  # order-statistic interval of that median
    speed_high: float
    speed_confidence: float
    rounds: int
    rounds_candidate_faster: int
    p_faster: float                   # sign test against "candidate not faster"
    p_slower: float                   # sign test against "candidate not slower"
    auroc_delta: float                # macro AUROC, candidate - other
    auroc_ci_low: float               # at level_adj in each tail
    auroc_ci_high: float
    p_auroc_noninferior: float        # against "delta < -margin"
    p_auroc_nonsuperior: float        # against "delta > +margin"
    p_dominates: float                # max(p_faster, p_auroc_noninferior)
    p_dominated: float                # max(p_slower, p_auroc_nonsuperior)
    level_adj: float                  # one-sided level the pair was decided at (after correction)
    n: int
    n_replicates: int
    n_nan_replicates: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PairVerdict":
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k, f in cls.__dataclass_fields__.items():
            if f.type == "float" and kw.get(k) is None:
                kw[k] = NAN
        return cls(**kw)


@dataclass(frozen=True)
class DominanceVerdict:
    """Every pair's verdict, the question asked (margin, level, correction) and the counts."""

    pairs: tuple[PairVerdict, ...]
    margin: float
    level: float
    alpha: float
    correction: str
    n_tests: int
    definition: str = DEFINITION
    schema_version: int = SCHEMA
    meta: dict[str, Any] = field(default_factory=dict)

    def pair(self, candidate: str, other: str) -> PairVerdict:
        for p in self.pairs:
            if p.candidate == candidate and p.other == other:
                return p
        raise ConfigError(f"DominanceVerdict has no pair ({candidate!r}, {other!r}); pairs: "
                          f"{[(p.candidate, p.other) for p in self.pairs]}.")

    def count(self, outcome: str) -> int:
        check_in(outcome, "outcome", "DominanceVerdict.count", OUTCOMES)
        return sum(p.outcome == outcome for p in self.pairs)

    def summary(self) -> str:
        counts = ", ".join(f"{self.count(o)} {o}" for o in OUTCOMES if self.count(o))
        return (f"{counts} of {len(self.pairs)} pair(s) (AUROC margin {self.margin:g}, "
                f"{self.correction} over {self.n_tests} tested pair(s) per claim, one-sided "
                f"alpha {self.alpha:g})")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "pairs"}
        d["pairs"] = [p.to_dict() for p in self.pairs]
        d["summary"] = self.summary()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DominanceVerdict":
        if int(d.get("schema_version", 0)) != SCHEMA:
            raise DataError(f"DominanceVerdict: schema_version {d.get('schema_version')} is not "
                            f"{SCHEMA}; recompute the verdict.")
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kw["pairs"] = tuple(PairVerdict.from_dict(p) for p in d["pairs"])
        kw["meta"] = dict(d.get("meta", {}))
        return cls(**kw)


# ----------------------------------------------------------------------------- evidence
def macro_replicates(comparison: PairedComparison, min_pos: int = 10, min_neg: int = 10
                     ) -> tuple[float, np.ndarray, str]:
    """The macro AUROC delta of a comparison and its bootstrap replicates, over the classes with
    at least ``min_pos`` positive and ``min_neg`` negative images (a NaN class replicate makes
    the macro replicate NaN: counted against every claim). Returns ``(delta, replicates, note)``.

    Raises:
        DataError: no replicates kept (``n_boot=0`` or a loaded comparison), or no class with
            enough images.
    """
    reps = None if comparison.replicates is None else comparison.replicates.get("auroc")
    if reps is None or not comparison.n_boot:
        raise DataError("macro_replicates: the comparison keeps no AUROC bootstrap replicates; "
                        "compute it with compare_predictions(n_boot>=1000).")
    sel = [j for j, c in enumerate(comparison.classes)
           if c.n_pos >= min_pos and c.n_neg >= min_neg and math.isfinite(c.delta_auroc)]
    if not sel:
        raise DataError(f"macro_replicates: no class has >= {min_pos} positive and >= {min_neg} "
                        "negative images; the macro AUROC cannot be compared.")
    with np.errstate(invalid="ignore"):
        mean_reps = np.asarray(reps, np.float64)[sel].mean(0)
    delta = float(np.mean([comparison.classes[j].delta_auroc for j in sel]))
    return delta, mean_reps, f"macro over {len(sel)} of {len(comparison.classes)} classes"


def pair_input(candidate: str, other: str, comparison: PairedComparison,
               candidate_ms: Sequence[float], other_ms: Sequence[float],
               min_pos: int = 10, min_neg: int = 10) -> PairInput:
    """A pair's evidence from ``compare_predictions(other_preds, candidate_preds, n_boot=...)``
    (the OTHER model as reference, so deltas are candidate - other) and the two models' times
    in the same rounds."""
    delta, reps, note = macro_replicates(comparison, min_pos, min_neg)
    return PairInput(candidate, other, delta, reps, comparison.n, list(candidate_ms),
                     list(other_ms), note=f"{note}; split {comparison.split}")


def sign_test(ratios: Sequence[float]) -> tuple[int, float, float]:
    """``(k_faster, p_faster, p_slower)`` from per-round ratios ``other / candidate``: the exact
    one-sided sign tests of "median ratio <= 1" and of "median ratio >= 1" (ties count against
    both claims).

    Example:
        >>> sign_test([2.0] * 5)
        (5, 0.03125, 1.0)
    """
    r = np.asarray(ratios, np.float64)
    n = int(r.size)
    up, down = int(np.sum(r > 1.0)), int(np.sum(r < 1.0))
    return up, float(binom.sf(up - 1, n, 0.5)), float(binom.sf(down - 1, n, 0.5))


def _auroc_tails(reps: np.ndarray, margin: float) -> tuple[float, float, int]:
    r = np.asarray(reps, np.float64)
    nan = int((~np.isfinite(r)).sum())
    f = r[np.isfinite(r)]
    b = r.size
    p_ni = (1.0 + np.sum(f < -margin) + nan) / (1.0 + b)
    p_ns = (1.0 + np.sum(f > margin) + nan) / (1.0 + b)
    return float(p_ni), float(p_ns), nan


def _interval(reps: np.ndarray, level: float) -> tuple[float, float]:
    """Replicate quantiles with ``level`` in each tail; NaN replicates widen both ends."""
    if not (math.isfinite(level) and 0 < level < 0.5):
        return NAN, NAN
    r = np.asarray(reps, np.float64)
    lo = float(np.quantile(np.where(np.isfinite(r), r, -np.inf), level, method="inverted_cdf"))
    hi = -float(np.quantile(np.where(np.isfinite(r), -r, -np.inf), level,
                            method="inverted_cdf"))
    return (lo if math.isfinite(lo) else NAN), (hi if math.isfinite(hi) else NAN)


def _screen(p: PairInput) -> str:
    why = []
    if len(p.candidate_ms) != len(p.other_ms) or len(p.candidate_ms) < 1:
        why.append(f"latency rounds differ or are missing ({len(p.candidate_ms)} vs "
                   f"{len(p.other_ms)})")
    if p.auroc_replicates is None:
        why.append("no AUROC bootstrap replicates")
    elif int(np.isfinite(np.asarray(p.auroc_replicates, np.float64)).sum()) < \
            MIN_FINITE_REPLICATES:
        why.append(f"fewer than {MIN_FINITE_REPLICATES} finite AUROC replicates")
    if not math.isfinite(p.auroc_delta):
        why.append("AUROC delta undefined")
    return "; ".join(why)


def _correct(p: list[float], alpha: float, correction: str) -> tuple[np.ndarray, np.ndarray]:
    if correction == "holm":
        return holm(p, alpha)
    arr = np.asarray(p, np.float64)
    k = int(np.isfinite(arr).sum())
    lvl = alpha / max(k, 1)
    return np.isfinite(arr) & (arr < lvl), np.where(np.isfinite(arr), lvl, NAN)


# ----------------------------------------------------------------------------- decide
def decide_dominance(pairs: Sequence[PairInput], *, margin: float = 0.01, level: float = 0.95,
                     correction: str = "holm", meta: dict[str, Any] | None = None
                     ) -> DominanceVerdict:
    """Decide dominates / dominated / undecided for every pair (see the module docstring).

    Args:
        pairs: the evidence per pair (``candidate`` vs ``other``); (candidate, other) unique.
        margin: AUROC margin ``m >= 0``: "at least as accurate" is ``delta >= -m`` shown.
        level: two-sided confidence; each family is tested at one-sided ``(1 - level) / 2``.
        correction: ``"holm"`` (default) or ``"bonferroni"`` across the pairs.

    Raises:
        ConfigError: a bad parameter, no pairs, or a pair named twice.
    """
    owner = "decide_dominance"
    check_range(margin, "margin", owner, 0.0)
    check_range(level, "level", owner, 0.5, 1.0, low_inclusive=False, high_inclusive=False)
    check_in(correction, "correction", owner, CORRECTIONS)
    keys = [(p.candidate, p.other) for p in pairs]
    if not keys or len(set(keys)) != len(keys):
        raise ConfigError(f"The 'pairs' parameter of {owner} must hold pairs with unique "
                          f"(candidate, other) names. Got {keys} instead.")
    alpha = (1.0 - level) / 2.0
    why = [_screen(p) for p in pairs]
    tested = [i for i, w in enumerate(why) if not w]
    ev: dict[int, dict[str, Any]] = {}
    for i in tested:
        p = pairs[i]
        ratios = [o / c if c > 0 else math.inf for o, c in zip(p.other_ms, p.candidate_ms)]
        k, pf, ps = sign_test(ratios)
        pni, pns, nan = _auroc_tails(p.auroc_replicates, margin)
        ev[i] = dict(sr=speed_ratio(p.other_ms, p.candidate_ms), k=k, pf=pf, ps=ps, pni=pni,
                     pns=pns, nan=nan, pdom=max(pf, pni), pdomd=max(ps, pns))
    ok_d, lv_d = _correct([ev[i]["pdom"] for i in tested], alpha, correction)
    ok_r, lv_r = _correct([ev[i]["pdomd"] for i in tested], alpha, correction)
    pos = {i: t for t, i in enumerate(tested)}
    out = []
    for i, p in enumerate(pairs):
        reps = None if p.auroc_replicates is None else np.asarray(p.auroc_replicates, np.float64)
        base = dict(candidate=p.candidate, other=p.other, auroc_delta=float(p.auroc_delta),
                    n=int(p.n), n_replicates=0 if reps is None else int(reps.size),
                    rounds=len(p.candidate_ms), note=p.note)
        if i not in pos:
            out.append(PairVerdict(outcome="unscorable", reason=f"not tested: {why[i]}",
                                   speed_ratio=NAN, speed_low=NAN, speed_high=NAN,
                                   speed_confidence=NAN, rounds_candidate_faster=0,
                                   p_faster=NAN, p_slower=NAN, auroc_ci_low=NAN,
                                   auroc_ci_high=NAN, p_auroc_noninferior=NAN,
                                   p_auroc_nonsuperior=NAN, p_dominates=NAN, p_dominated=NAN,
                                   level_adj=NAN, n_nan_replicates=0, **base))
            continue
        t, e = pos[i], ev[i]
        if ok_d[t]:
            outcome, lvl = "dominates", float(lv_d[t])
        elif ok_r[t]:
            outcome, lvl = "dominated", float(lv_r[t])
        else:
            outcome, lvl = "undecided", float(min(lv_d[t], lv_r[t]))
        lo, hi = _interval(reps, lvl)
        out.append(PairVerdict(
            outcome=outcome, reason=_reason(outcome, e, margin, (float(lv_d[t]), float(lv_r[t])),
                                            lvl, lo, hi, len(p.candidate_ms)),
            speed_ratio=e["sr"].ratio, speed_low=e["sr"].low, speed_high=e["sr"].high,
            speed_confidence=e["sr"].confidence, rounds_candidate_faster=e["k"],
            p_faster=e["pf"], p_slower=e["ps"], auroc_ci_low=lo, auroc_ci_high=hi,
            p_auroc_noninferior=e["pni"], p_auroc_nonsuperior=e["pns"], p_dominates=e["pdom"],
            p_dominated=e["pdomd"], level_adj=lvl, n_nan_replicates=e["nan"], **base))
    return DominanceVerdict(pairs=tuple(out), margin=float(margin), level=float(level),
                            alpha=alpha, correction=correction, n_tests=len(tested),
                            meta=dict(meta or {}))


def _reason(outcome: str, e: dict[str, Any], m: float, levels: tuple[float, float], lvl: float,
            lo: float, hi: float, rounds: int) -> str:
    speed = (f"speed x{e['sr'].ratio:.2f} [{e['sr'].low:.2f}, {e['sr'].high:.2f}], faster in "
             f"{e['k']}/{rounds} rounds")
    auc = f"AUROC delta {lo:+.4f}..{hi:+.4f} at {lvl:.3g} per tail"
    if outcome == "dominates":
        return f"faster ({speed}) and AUROC >= -{m:g} shown ({auc})"
    if outcome == "dominated":
        return f"slower ({speed}) and AUROC <= +{m:g} shown ({auc})"
    gaps = []
    for claim, (pa, pb), (wa, wb), lv in (
            ("dominates", (e["pf"], e["pni"]), ("faster", f"AUROC >= -{m:g}"), levels[0]),
            ("dominated", (e["ps"], e["pns"]), ("slower", f"AUROC <= +{m:g}"), levels[1])):
        missing = [w for w, pv in ((wa, pa), (wb, pb)) if not pv < lv]
        gaps.append(f"{claim}: not shown {' / '.join(missing)}")
    small = (f"; {rounds} rounds cannot reach the level (sign test p >= {0.5 ** rounds:.2g})"
             if 0.5 ** rounds >= min(levels) else "")
    return f"undecided ({'; '.join(gaps)}; {speed}; {auc}){small}"


__all__ = ["CORRECTIONS", "DEFINITION", "DominanceVerdict", "OUTCOMES", "PairInput",
           "PairVerdict", "decide_dominance", "macro_replicates", "pair_input", "sign_test"]
