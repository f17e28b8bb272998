"""The operating point: how a model's outputs become decisions, where that rule came from and
how it performed (one object for every task; issue Q, deliverable 5).

Three tasks:

* ``multilabel``: sigmoid per class (of ``logits / temperature``), a finding when
  ``p_k >= thresholds[k]``;
* ``binary`` (a two-class softmax model): softmax (of ``logits / temperature``), the
  ``positive`` class is called when ``p_positive >= cut``, else the other class;
* ``multiclass``: softmax (of ``logits / temperature``), the argmax class.

The object also says what the rule was fitted on (``fitted_on``: split, images, patients when
known, positives / negatives per class, source hash, site), its measured sensitivity /
specificity per class with confidence intervals (``measured``, ``measured_on``; empty when it
was never measured on labelled data), the classes that kept the default (``fallback``) and an
optional ``guarantee`` (a :class:`medscalpel.repair.conformal.GuaranteeResult` dict).

The model card carries it (``ModelCard.operating_point``); predict, evaluate, the clinical
report and ``serve.json`` read it. A card without one derives it from its ``thresholds`` and
lineage (:func:`derive_operating_point`).

Example:
    >>> import numpy as np
    >>> op = OperatingPoint("binary", ("NORMAL", "PNEUMONIA"), positive=1, cut=0.9,
    ...                     method="youden")
    >>> p = op.probabilities(np.array([[0.0, 0.405], [0.0, 3.0]]))
    >>> op.decide(p)[:, 1].tolist()
    [False, True]
    >>> round(float(op.margin(np.array([[0.4, 0.6]]))[0, 1]), 4)   # logit(0.6) - logit(0.9)
    -1.7918
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from medscalpel.errors import ModelError

SCHEMA = 1
TASKS = ("multilabel", "binary", "multiclass")
DEFAULT_CUT = 0.5
#: method of an operating point nobody fitted (0.5 / argmax)
DEFAULT_METHOD = "default"
#: method of thresholds found on a card whose origin was not recorded
STORED_METHOD = "stored thresholds"
#: probabilities are clipped to [EPS, 1 - EPS] before their log-odds are taken
EPS = 1e-15
MARGIN_LOGODDS = "log-odds(p) - log-odds(cut)"
MARGIN_RUNNER_UP = "log(p) - log(p of the runner-up class)"


def log_odds(p: Any) -> np.ndarray:
    """``log(p / (1 - p))`` in float64, ``p`` clipped to ``[EPS, 1 - EPS]``; a cut above 1 (a
    "nothing positive" cut) has log-odds ``+inf``, one at or below 0 ``-inf``.

    >>> [round(float(v), 4) for v in log_odds([0.5, 0.601])]
    [0.0, 0.4096]
    """
    p = np.asarray(p, np.float64)
    q = np.clip(p, EPS, 1.0 - EPS)
    out = np.log(q) - np.log1p(-q)
    out = np.where(p > 1.0, np.inf, out)
    return np.where(p <= 0.0, -np.inf, out)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _num(v: Any) -> Any:
    """JSON-safe float (None for NaN / inf)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _f(v: Any) -> float:
    return float("nan") if v is None else float(v)


def task_of(card_task: str, n_classes: int) -> str:
    """The operating-point task of a model: ``multilabel``, ``binary`` (two-class softmax) or
    ``multiclass``."""
    if card_task == "multilabel":
        return "multilabel"
    return "binary" if n_classes == 2 else "multiclass"


@dataclass(frozen=True)
class OperatingPoint:
    """How outputs become decisions, fitted on what, and measured how well.

    Attributes:
        task: ``multilabel``, ``binary`` or ``multiclass``.
        class_names: the model's classes, in output order.
        thresholds: multi-label: one probability threshold per class (empty otherwise).
        positive: binary: index of the positive class.
        cut: binary: the probability of the positive class at or above which it is called
            (it may exceed 1: nothing is called positive).
        temperature: logits are divided by it before the sigmoid / softmax (1: none).
        method: ``default`` (0.5 / argmax, not calibrated), ``youden``, ``f1``,
            ``sensitivity``, ``temperature``, ``site k-shot <method>``, ``guarantee <spec>``,
            ``stored thresholds`` (origin not recorded), ...
        fitted_on: ``split``, ``n_images``, ``n_patients`` (None when unknown), ``positives``
            / ``negatives`` per class, ``source`` (hash or id of the fitted predictions),
            ``site``, ``params`` (the method's parameters); empty for the default.
        measured: per class ``{"class", "sensitivity", "sensitivity_ci", "specificity",
            "specificity_ci", "n_pos", "n_neg", "tp", "fn", "tn", "fp"}`` at this operating
            point on ``measured_on`` (empty: never measured).
        measured_on: ``split``, ``n_images``, ``held_out`` (not the fitted images),
            ``ci`` (method) and ``confidence``.
        fallback: classes that kept the default because they could not be fitted.
        guarantee: a conformal guarantee's result dict (``repair calibrate --guarantee``).
        notes: anything a reader must know (e.g. "temperature folded into the weights").
    """

    task: str
    class_names: tuple[str, ...]
    thresholds: tuple[float, ...] = ()
    positive: int | None = None
    cut: float | None = None
    temperature: float = 1.0
    method: str = DEFAULT_METHOD
    fitted_on: dict[str, Any] = field(default_factory=dict)
    measured: tuple[dict[str, Any], ...] = ()
    measured_on: dict[str, Any] = field(default_factory=dict)
    fallback: tuple[str, ...] = ()
    guarantee: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA

    def __post_init__(self) -> None:
        k = len(self.class_names)
        if self.task not in TASKS:
            raise ModelError(f"OperatingPoint: task must be one of {list(TASKS)}; got "
                             f"{self.task!r}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ModelError(f"OperatingPoint: the temperature must be a positive number; got "
                             f"{self.temperature}.")
        if self.task == "multilabel":
            if len(self.thresholds) != k:
                raise ModelError(f"OperatingPoint: {len(self.thresholds)} thresholds for {k} "
                                 "classes (multi-label needs one per class).")
        elif self.thresholds:
            raise ModelError(f"OperatingPoint: a {self.task} operating point has no per-class "
                             "thresholds (binary: positive + cut; multi-class: argmax).")
        if self.task == "binary":
            if k != 2 or self.positive not in (0, 1) or self.cut is None:
                raise ModelError("OperatingPoint: a binary operating point needs two classes, "
                                 f"positive in (0, 1) and a cut; got {k} classes, positive "
                                 f"{self.positive!r}, cut {self.cut!r}.")
            if not self.cut > 0 or math.isnan(self.cut):
                raise ModelError(f"OperatingPoint: the cut must be > 0; got {self.cut}.")
        elif self.positive is not None or self.cut is not None:
            raise ModelError(f"OperatingPoint: positive / cut apply to binary operating points, "
                             f"not {self.task}.")
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "measured", tuple(dict(r) for r in self.measured))
        object.__setattr__(self, "fallback", tuple(self.fallback))
        object.__setattr__(self, "notes", tuple(self.notes))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def default(cls, task: str, class_names: Sequence[str]) -> "OperatingPoint":
        """0.5 per class (multi-label), 0.5 on the second class (binary: the argmax), argmax."""
        names = tuple(class_names)
        t = task_of(task, len(names)) if task not in TASKS else task
        if t == "multilabel":
            return cls(t, names, thresholds=(DEFAULT_CUT,) * len(names))
        if t == "binary":
            return cls(t, names, positive=1, cut=DEFAULT_CUT)
        return cls(t, names)

    # ------------------------------------------------------------------ views
    @property
    def calibrated(self) -> bool:
        """Whether the rule was chosen for this model (anything but the default)."""
        return self.method != DEFAULT_METHOD

    @property
    def margin_name(self) -> str:
        return MARGIN_RUNNER_UP if self.task == "multiclass" else MARGIN_LOGODDS

    def class_thresholds(self) -> tuple[float, ...] | None:
        """The per-class view a card's ``thresholds`` holds: multi-label: the thresholds;
        binary: ``cut`` at the positive class and ``1 - cut`` at the other (called when the
        positive is not); multi-class: None (argmax)."""
        if self.task == "multilabel":
            return self.thresholds
        if self.task == "binary":
            out = [1.0 - float(self.cut)] * 2
            out[int(self.positive)] = float(self.cut)
            return tuple(out)
        return None

    def cut_of(self, j: int) -> float | None:
        """The probability cut of class ``j``: its threshold (multi-label), the cut for the
        positive class (binary), None for the binary negative class and multi-class."""
        if self.task == "multilabel":
            return self.thresholds[j]
        if self.task == "binary" and j == self.positive:
            return float(self.cut)
        return None

    def measured_row(self, j: int) -> dict[str, Any] | None:
        name = self.class_names[j]
        return next((r for r in self.measured if r.get("class") == name), None)

    # ------------------------------------------------------------------ decisions
    def _check(self, a: np.ndarray, what: str) -> np.ndarray:
        a = np.asarray(a, np.float64)
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[1] != len(self.class_names):
            raise ModelError(f"OperatingPoint.{what}: expected [N, {len(self.class_names)}]; got "
                             f"{tuple(a.shape)}.")
        return a

    def probabilities(self, logits: Any) -> np.ndarray:
        """Probabilities ``[N, K]`` (float64) of ``logits / temperature``: sigmoid per class
        (multi-label) or softmax (binary, multi-class)."""
        z = self._check(logits, "probabilities") / self.temperature
        if self.task == "multilabel":
            return 1.0 / (1.0 + np.exp(-z))
        return _softmax(z)

    def decide(self, probs: Any) -> np.ndarray:
        """Boolean ``[N, K]`` findings: multi-label ``p >= thresholds``; binary: the positive
        class when ``p_positive >= cut``, else the other; multi-class: the argmax."""
        p = self._check(probs, "decide")
        if self.task == "multilabel":
            return p >= np.asarray(self.thresholds)[None, :]
        out = np.zeros(p.shape, bool)
        if self.task == "binary":
            pos = p[:, self.positive] >= float(self.cut)
            out[:, self.positive] = pos
            out[:, 1 - self.positive] = ~pos
            return out
        out[np.arange(p.shape[0]), p.argmax(1)] = True
        return out

    def margin(self, probs: Any) -> np.ndarray:
        """Per class how far the decision is from flipping (positive: called).

        Multi-label: ``log-odds(p_k) - log-odds(threshold_k)``. Binary: the positive class
        ``log-odds(p) - log-odds(cut)``, the other class its negative. Multi-class (no cut):
        ``log(p_k) - log(max_{i != k} p_i)``, the log-ratio to the runner-up class.
        """
        p = self._check(probs, "margin")
        if self.task == "multilabel":
            return log_odds(p) - log_odds(np.asarray(self.thresholds))[None, :]
        if self.task == "binary":
            m = log_odds(p[:, self.positive]) - log_odds(float(self.cut))
            out = np.empty(p.shape)
            out[:, self.positive] = m
            out[:, 1 - self.positive] = -m
            return out
        lp = np.log(np.clip(p, EPS, None))
        out = np.empty(p.shape)
        for j in range(p.shape[1]):
            out[:, j] = lp[:, j] - np.delete(lp, j, axis=1).max(1)
        return out

    # ------------------------------------------------------------------ words
    def origin(self) -> str:
        """Where the rule came from, in words (without the number)."""
        if not self.calibrated:
            return "not calibrated"
        f = self.fitted_on or {}
        split = f.get("split")
        bits = []
        if f.get("site"):
            bits.append(f"site {f['site']}")
        if split:
            bits.append(f"split '{split}'")
        n = f.get("n_images")
        if n:
            bits.append(f"{n} images" + (f", {f['n_patients']} patients"
                                         if f.get("n_patients") else ""))
        return self.method + (f" on {', '.join(bits)}" if bits else " (fit data not recorded)")

    def label(self, j: int) -> str:
        """The decision rule of class ``j`` with its origin, e.g. ``0.9974 (site k-shot
        threshold on site ..., 40 images)``, ``0.5 (not calibrated)``, ``argmax``."""
        name = self.class_names[j]
        if self.task == "multiclass":
            rule = "argmax" + (f" of softmax(logits / {self.temperature:.3g})"
                               if self.temperature != 1.0 else "")
            return f"{rule} ({self.origin()})"
        if self.task == "binary" and j != self.positive:
            pos = self.class_names[self.positive]
            return f"when p({pos}) < {float(self.cut):.4g} ({self.origin()})"
        t = float(self.cut_of(j))
        if name in self.fallback:
            return f"{t:.4g} (default: calibration could not fit this class)"
        return f"{t:.4g} ({self.origin()})"

    def describe(self) -> str:
        """The whole rule in one line."""
        if self.task == "binary":
            pos, neg = self.class_names[self.positive], self.class_names[1 - self.positive]
            rule = f"{pos} when p({pos}) >= {float(self.cut):.4g}, else {neg}"
        elif self.task == "multiclass":
            rule = "the argmax class"
        else:
            rule = "per class p >= " + ", ".join(f"{c} {t:.4g}" for c, t in
                                                 zip(self.class_names, self.thresholds))
        temp = f"; logits / {self.temperature:.4g}" if self.temperature != 1.0 else ""
        meas = ""
        if self.measured:
            m = self.measured_on or {}
            meas = (f"; measured on split '{m.get('split', '?')}' ({m.get('n_images', '?')} "
                    f"images{'' if m.get('held_out', True) else ', NOT held out'})")
        return f"{rule}{temp} ({self.origin()}{meas})"

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "kind": "operating_point",
                "task": self.task, "class_names": list(self.class_names),
                "thresholds": list(self.thresholds), "positive": self.positive,
                "cut": _num(self.cut), "temperature": self.temperature, "method": self.method,
                "calibrated": self.calibrated, "describe": self.describe(),
                "fitted_on": dict(self.fitted_on),
                "measured": [{k: (_num(v) if isinstance(v, float) else
                                  [_num(x) for x in v] if isinstance(v, (list, tuple)) else v)
                              for k, v in r.items()} for r in self.measured],
                "measured_on": dict(self.measured_on), "fallback": list(self.fallback),
                "guarantee": self.guarantee, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OperatingPoint":
        if int(d.get("schema_version", SCHEMA)) > SCHEMA:
            raise ModelError(f"operating point schema {d.get('schema_version')} is newer than "
                             f"this medscalpel's ({SCHEMA}); upgrade medscalpel.")
        measured = tuple({k: (_f(v) if k in ("sensitivity", "specificity") else
                              [_f(x) for x in v] if k.endswith("_ci") else v)
                          for k, v in r.items()} for r in d.get("measured", ()))
        cut = d.get("cut")
        if cut is None and d.get("task") == "binary":
            cut = float("inf")  # stored as null: a cut above every probability
        return cls(task=str(d["task"]), class_names=tuple(d["class_names"]),
                   thresholds=tuple(float(t) for t in d.get("thresholds") or ()),
                   positive=d.get("positive"), cut=None if cut is None else float(cut),
                   temperature=float(d.get("temperature", 1.0)),
                   method=str(d.get("method", DEFAULT_METHOD)),
                   fitted_on=dict(d.get("fitted_on") or {}), measured=measured,
                   measured_on=dict(d.get("measured_on") or {}),
                   fallback=tuple(d.get("fallback") or ()), guarantee=d.get("guarantee"),
                   notes=tuple(d.get("notes") or ()))

    def with_measurement(self, rows: Sequence[Mapping[str, Any]],
                         on: Mapping[str, Any]) -> "OperatingPoint":
        return replace(self, measured=tuple(dict(r) for r in rows), measured_on=dict(on))


# ----------------------------------------------------------------------------- from a card
_PROVENANCE = ("threshold_calibration", "site_recalibration", "operating_point")


def _provenance(lineage: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """(method, fitted_on) from the last calibration step of a card's lineage."""
    steps = [s for s in lineage or () if isinstance(s, Mapping) and s.get("method") in _PROVENANCE]
    if not steps:
        return STORED_METHOD, {}
    s = steps[-1]
    if s["method"] == "site_recalibration":
        rec = s.get("recalibration") or {}
        return (f"site k-shot {rec.get('method', '?')}",
                {"site": s.get("site", ""), "n_images": s.get("n_fit")})
    params = s.get("method_params") or {}
    return (str(params.get("method") or STORED_METHOD),
            {"split": s.get("fit_split", ""), "params": dict(params)})


def derive_operating_point(task: str, class_names: Sequence[str],
                           thresholds: Sequence[float] | None,
                           lineage: Sequence[Any] = (), note: str = "") -> OperatingPoint:
    """The operating point of a card that stores only ``thresholds`` (an older card, or
    thresholds changed by code that does not know operating points): per-class thresholds
    (multi-label), the second class's threshold as the binary cut (the rule
    :func:`medscalpel.engine.external.decisions` applies), argmax (multi-class); the method and
    fitting split from the lineage's last calibration step when there is one. No thresholds:
    the default."""
    names = tuple(class_names)
    t = task_of(task, len(names))
    if thresholds is None or t == "multiclass":
        return OperatingPoint.default(t, names)
    thr = [float(x) for x in thresholds]
    if len(thr) != len(names):
        raise ModelError(f"The model card holds {len(thr)} thresholds for {len(names)} classes.")
    method, fitted = _provenance(lineage)
    notes = (note,) if note else ()
    notes += ("derived from the card's stored thresholds: no sensitivity / specificity was "
              "recorded with them",)
    if t == "multilabel":
        fallback = ()
        steps = [s for s in lineage or () if isinstance(s, Mapping)
                 and s.get("method") == "threshold_calibration"]
        if steps and method != STORED_METHOD:
            fallback = tuple(steps[-1].get("fallback") or ())
        return OperatingPoint("multilabel", names, thresholds=tuple(thr), method=method,
                              fitted_on=fitted, fallback=fallback, notes=notes)
    if thr == [DEFAULT_CUT, DEFAULT_CUT] and method == STORED_METHOD:
        return OperatingPoint.default("binary", names)
    return OperatingPoint("binary", names, positive=1, cut=thr[1], method=method,
                          fitted_on=fitted, notes=notes)


__all__ = ["OperatingPoint", "derive_operating_point", "log_odds", "task_of",
           "MARGIN_LOGODDS", "MARGIN_RUNNER_UP", "DEFAULT_METHOD", "STORED_METHOD"]
