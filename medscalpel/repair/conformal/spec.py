"""What a guarantee asks and the arithmetic of its certificate.

The guarantee kinds (:data:`KINDS`), their text form (:class:`GuaranteeSpec`,
:func:`parse_guarantee`), the fewest calibration positives a certificate needs
(:func:`min_positives`) and the order-statistic / Clopper-Pearson kernels behind the recall
certificates (:func:`recall_order_statistic`, :func:`miss_rate_upper_bound`). See
:mod:`medscalpel.repair.conformal` for each guarantee and its assumptions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import binom

from medscalpel.errors import ConfigError

#: guarantee kinds: (wording of the rate, comparison, high-probability?)
KINDS = {"recall": ("recall", ">=", True), "recall_mean": ("recall", ">=", False),
         "precision": ("precision", ">=", True), "fnr": ("set false-negative rate", "<=", False)}
#: the default fixed logit grid of the precision test (from the top)
DEFAULT_GRID = np.round(np.arange(12.0, -12.0 - 1e-9, -0.05), 10)
_SPEC = re.compile(r"^\s*(E\[\s*recall\s*\]|recall|precision|fnr)\s*(>=|<=)\s*"
                   r"([0-9]*\.?[0-9]+)\s*$", re.IGNORECASE)
_EPS = 1e-9


class GuaranteeSpecError(ConfigError):
    """A ``--guarantee`` text that cannot be parsed (one line naming the valid forms)."""


# ----------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class GuaranteeSpec:
    """What to guarantee: ``kind`` (``recall``, ``recall_mean``, ``precision``, ``fnr``) and the
    level (a recall / precision floor, or the FNR ceiling for ``fnr``)."""

    kind: str
    target: float

    @property
    def text(self) -> str:
        name = {"recall": "recall", "recall_mean": "E[recall]", "precision": "precision",
                "fnr": "fnr"}[self.kind]
        return f"{name}{KINDS[self.kind][1]}{self.target:g}"

    @property
    def high_probability(self) -> bool:
        return KINDS[self.kind][2]


def parse_guarantee(text: str | GuaranteeSpec) -> GuaranteeSpec:
    """``'recall>=0.90'`` (with probability 1 - alpha), ``'E[recall]>=0.90'`` (in expectation),
    ``'precision>=0.8'`` or ``'fnr<=0.1'`` (multi-label set, in expectation).

    Example:
        >>> parse_guarantee("recall>=0.9")
        GuaranteeSpec(kind='recall', target=0.9)
    """
    if isinstance(text, GuaranteeSpec):
        return text
    forms = "'recall>=0.90', 'E[recall]>=0.90', 'precision>=0.8' or 'fnr<=0.1'"
    m = _SPEC.match(str(text))
    if not m:
        raise GuaranteeSpecError(f"Cannot read the guarantee {text!r}: write one of {forms} "
                                 "(a level strictly between 0 and 1).")
    name, op, level = m.group(1).lower().replace(" ", ""), m.group(2), float(m.group(3))
    kind = {"e[recall]": "recall_mean"}.get(name, name)
    if op != KINDS[kind][1]:
        raise GuaranteeSpecError(f"Cannot read the guarantee {text!r}: {name} takes "
                                 f"'{KINDS[kind][1]}' (one of {forms}).")
    if not 0.0 < level < 1.0:
        raise GuaranteeSpecError(f"Cannot read the guarantee {text!r}: the level must be "
                                 f"strictly between 0 and 1; got {level:g}.")
    return GuaranteeSpec(kind, level)


# ----------------------------------------------------------------------------- minimum n
def min_positives(kind: str, target: float, alpha: float | None = None) -> int:
    """The fewest calibration positives (images with a finding, for ``fnr``) for which the
    guarantee can be certified at all.

    * ``recall`` / ``precision`` with probability ``1 - alpha``: zero errors allowed, so
      ``target**n <= alpha``: ``n >= ceil(log(alpha) / log(target))``.
    * ``recall_mean`` (CRC): ``floor((1 - target)(n + 1)) >= 1``: ``n >= ceil(1/(1-target)) - 1``.
    * ``fnr`` (CRC) with ceiling ``a = target``: ``n >= ceil(1/a) - 1``.

    Example:
        >>> min_positives("recall", 0.9, 0.1), min_positives("recall_mean", 0.9)
        (22, 9)
    """
    if kind in ("recall", "precision"):
        if alpha is None:
            raise ConfigError(f"min_positives: the '{kind}' guarantee needs alpha.")
        return int(math.ceil(math.log(alpha) / math.log(target) - _EPS))
    eps = 1.0 - target if kind == "recall_mean" else target
    return max(int(math.ceil(1.0 / eps - _EPS)) - 1, 1)


# ----------------------------------------------------------------------------- kernels
def recall_order_statistic(n_pos: int, target: float, alpha: float | None) -> int:
    """``k`` (1-based) such that the ``k``-th smallest positive score is the threshold; 0 when
    nothing can be certified. ``alpha=None``: CRC (in expectation); else the binomial /
    Clopper-Pearson rule with confidence ``1 - alpha``."""
    if n_pos <= 0:
        return 0
    eps = 1.0 - target
    if alpha is None:
        return int(min(math.floor(eps * (n_pos + 1) + _EPS), n_pos))
    ks = np.arange(1, n_pos + 1)
    ok = binom.cdf(ks - 1, n_pos, eps) <= alpha + 1e-12
    return int(ks[ok].max()) if ok.any() else 0


def miss_rate_upper_bound(misses: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound (confidence ``1 - alpha``) on a miss rate."""
    return 1.0 if misses >= n else float(beta_dist.ppf(1 - alpha, misses + 1, n - misses))


def _just_below(cut: float) -> float:
    """The largest float32 below ``cut`` (a float32 logit): ``logit >= threshold`` makes the
    same decisions as ``logit >= cut`` on float32 logits, and the guarantee is the one proved
    for the order statistic itself (a midpoint lower down would only waste recall budget)."""
    return float(np.nextafter(np.float32(cut), np.float32(-np.inf)))


def _sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + math.exp(-z))) if z > -700 else 0.0

