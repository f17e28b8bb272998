"""The evidence a clinical report gives: logit margins, signed channel contributions, conflict
flags from co-occurrence evidence and the exclusion plan."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medscalpel.data.cooccurrence import CooccurrenceEvidence, ExclusionRule
from medscalpel.data.stats import LabelStats
from medscalpel.errors import DataError
from medscalpel.layout import artifact
from medscalpel.runs import read_json
from medscalpel.validation import check_in
from medscalpel.report.clinical.results import CONFLICT_MODES, Conflict

logger = logging.getLogger(__name__)

#: the label statistics file 'data stats' writes (declared in medscalpel/layout.py)
_STATS_FILE = artifact("label_stats").filename


# ----------------------------------------------------------------------------- evidence
def logit_margin(logit: float, threshold: float) -> float:
    """``logit - log(t / (1 - t))``: how far a logit lies above the threshold, in log-odds."""
    t = min(max(float(threshold), 1e-7), 1 - 1e-7)
    return float(logit) - math.log(t / (1 - t))


def signed_channel(row: Mapping[str, Any], logit_minus_bias: float) -> dict[str, Any]:
    """A channel row with its direction: ``for`` (its contribution has the sign of the class
    logit minus bias, which is positive) or ``against``. ``share`` (of logit minus bias) is kept
    only for a channel ``for`` a positive total; otherwise None, because a share of a negative
    or opposite total reads as support it is not. The signed ``mean_contribution`` stays."""
    out = dict(row)
    c = float(out.get("mean_contribution", float("nan")))
    total = float(logit_minus_bias)
    out["direction"] = "for" if c > 0 else "against" if c < 0 else "none"
    if not (math.isfinite(total) and total > 0 and c > 0):
        out["share"] = None
    return out


def resolve_evidence(label_stats: Any, class_names: Sequence[str],
                     rule: ExclusionRule | None = None
                     ) -> CooccurrenceEvidence | None:
    """The training labels' co-occurrence evidence for the model's classes.

    ``label_stats`` is a :class:`~medscalpel.data.stats.LabelStats`, a
    :class:`~medscalpel.data.cooccurrence.CooccurrenceEvidence`, the dict of either, a path to
    their JSON (``stats.json`` of ``medscalpel data stats``), or ``None`` (no check). Statistics
    of an older schema are read (their counts give the evidence); a bare Jaccard matrix is
    refused: it is no evidence of exclusivity.

    Raises:
        DataError: another label set than the model's, a Jaccard matrix, an unknown type.
    """
    if label_stats is None:
        return None
    where = "the label statistics"
    if isinstance(label_stats, (str, os.PathLike)):
        where = str(label_stats)
        label_stats = read_json(label_stats)
    if isinstance(label_stats, Mapping):
        label_stats = CooccurrenceEvidence.from_dict(label_stats) \
            if label_stats.get("kind") == "cooccurrence_evidence" \
            else LabelStats.from_dict(dict(label_stats))
    if isinstance(label_stats, LabelStats):
        ev = label_stats.cooccurrence_evidence(rule)
    elif isinstance(label_stats, CooccurrenceEvidence):
        ev = label_stats if rule is None else label_stats.with_rule(rule)
    elif isinstance(label_stats, (np.ndarray, list, tuple)):
        raise DataError("clinical_report: label_stats is a matrix (a Jaccard matrix?); a low "
                        "Jaccard index only says that one finding is rare and is no evidence of "
                        "mutual exclusivity. Pass the training labels' LabelStats or "
                        f"{_STATS_FILE} ('medscalpel data stats').")
    else:
        raise DataError(f"clinical_report: label_stats is a {type(label_stats).__name__}; give a "
                        f"LabelStats, a CooccurrenceEvidence, their dict or a {_STATS_FILE} "
                        "path.")
    names = [str(c) for c in class_names]
    missing = [n for n in names if n not in ev.class_names]
    extra = [n for n in ev.class_names if n not in names]
    if missing or extra:
        raise DataError(f"The label statistics ({where}, {ev.source or 'unknown source'}) are of "
                        f"another label set than the model's: missing {missing[:5]}, extra "
                        f"{extra[:5]}. Compute them on the labels the model was trained with "
                        "('medscalpel data stats').")
    return ev


def _conflict_message(a: str, b: str, ev: Any, hidden: str | None) -> str:
    tail = (f"'{hidden}' was hidden (hide option)." if hidden else
            "Both are reported: read the image with this conflict in mind.")
    return (f"'{a}' and '{b}' are mutually exclusive in the training labels by the evidence "
            f"rule: {ev.summary()}. {tail}")


def exclusion_plan(candidates: Sequence[int], strength: Sequence[float],
                   evidence: CooccurrenceEvidence | None, class_names: Sequence[str],
                   mode: str = "flag") -> tuple[list[int], list[dict[str, Any]],
                                                 dict[int, list[Conflict]]]:
    """Which findings above threshold are listed, hidden and flagged.

    Every pair of candidates that the evidence calls mutually exclusive is a conflict, flagged
    on both findings. With ``mode="flag"`` (the default) every candidate is listed. With
    ``mode="hide"`` candidates are visited strongest first and one in conflict with an already
    listed finding is hidden in favour of it. Without evidence nothing is flagged or hidden.

    Args:
        candidates: class indices above their thresholds.
        strength: one number per candidate (larger = stronger), e.g. the log-odds margin.
        evidence: the training labels' :class:`CooccurrenceEvidence` (model class names).
        class_names: the model's class names.
        mode: ``flag`` or ``hide``.

    Returns:
        (listed class indices, strongest first; one dict per hidden class with ``index``,
        ``excluded_by`` (index), ``evidence`` (dict) and ``reason``; conflicts per listed index).

    Example:
        >>> import numpy as np
        >>> from medscalpel.data.cooccurrence import cooccurrence_evidence
        >>> y = np.array([[1, 0], [0, 1]] * 2900 + [[0, 0]] * 200, float)
        >>> ev = cooccurrence_evidence(y, ["a", "b"])
        >>> listed, hidden, flags = exclusion_plan([0, 1], [2.0, 1.0], ev, ["a", "b"])
        >>> listed, hidden, [c.other for c in flags[1]]
        ([0, 1], [], ['a'])
        >>> exclusion_plan([0, 1], [2.0, 1.0], ev, ["a", "b"], mode="hide")[1][0]["excluded_by"]
        0
    """
    check_in(mode, "conflicts", "exclusion_plan", CONFLICT_MODES)
    cand = [int(c) for c in candidates]
    st = [float(s) for s in strength]
    if len(cand) != len(st) or len(set(cand)) != len(cand):
        raise DataError(f"exclusion_plan: {len(cand)} candidates {cand} need as many distinct "
                        f"entries as strengths ({len(st)}).")
    order = [cand[i] for i in sorted(range(len(cand)), key=lambda i: (-st[i], cand[i]))]
    names = [str(c) for c in class_names]
    pair = {}
    if evidence is not None:
        for a in order:
            for b in order:
                if a < b:
                    pe = evidence.pair(names[a], names[b])
                    if pe.exclusive:
                        pair[(a, b)] = pair[(b, a)] = pe
    listed: list[int] = []
    hidden: list[dict[str, Any]] = []
    for c in order:
        clash = next((k for k in listed if (c, k) in pair), None) if mode == "hide" else None
        if clash is None:
            listed.append(c)
            continue
        pe = pair[(c, clash)]
        hidden.append({"index": c, "excluded_by": clash, "evidence": pe.to_dict(),
                       "reason": f"hidden (hide option): '{names[c]}' and '{names[clash]}' are "
                                 f"mutually exclusive by the evidence rule ({pe.summary()}); "
                                 f"'{names[clash]}' has the stronger evidence on this image."})
    hidden_idx = {h["index"] for h in hidden}
    flags: dict[int, list[Conflict]] = {c: [] for c in listed}
    for c in listed:
        for o in order:
            if o != c and (c, o) in pair:
                hid = names[o] if o in hidden_idx else None
                flags[c].append(Conflict(names[o], o, pair[(c, o)].to_dict(),
                                         _conflict_message(names[c], names[o], pair[(c, o)], hid),
                                         hidden_other=hid is not None))
    return listed, hidden, flags
