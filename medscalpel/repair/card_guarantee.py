"""The guarantee a model card's operating point carries, at the thresholds the card decides by.

``repair calibrate --guarantee ... --model DIR`` stores a
:class:`~medscalpel.repair.conformal.GuaranteeResult` in the card's operating point. To
re-certify it for a compressed model, a deploy variant or a new site (:func:`~medscalpel.repair.
conformal.recertify`) the rule must be the one the card applies: normally the certified
thresholds themselves; where the card's thresholds were changed later (or a temperature divides
the logits) the card's own thresholds are checked, and a note says so.

Example:
    >>> from medscalpel.models.operating_point import OperatingPoint
    >>> class Card:  # any object with decision_point()
    ...     def decision_point(self):
    ...         return OperatingPoint("multilabel", ("a",), thresholds=(0.5,))
    >>> guarantee_of_card(Card())
    (None, None, [])
"""

from __future__ import annotations

import dataclasses
from typing import Any

from medscalpel.errors import ConfigError
from medscalpel.models.operating_point import log_odds
from medscalpel.repair.conformal import GuaranteeResult


def guarantee_of_card(card: Any) -> tuple[GuaranteeResult | None, str | None, list[str]]:
    """``(guarantee, positive, notes)`` of a model card (``None, None, []`` without one).

    ``positive`` names the positive class of a two-class model (its guarantee was certified
    on :func:`~medscalpel.repair.calibrate.binary_view` predictions), else None. Certified rows
    whose card threshold differs from the certified one (or any row, under a temperature) get
    the card's threshold as ``threshold_logit = temperature * log-odds(threshold)``.

    Raises:
        ConfigError: a multi-class (argmax) operating point with a guarantee, or a guarantee of
            other classes than the operating point's.
    """
    op = card.decision_point() if card is not None else None
    if op is None or not op.guarantee:
        return None, None, []
    g = GuaranteeResult.from_dict(op.guarantee)
    positive = op.class_names[op.positive] if op.task == "binary" else None
    if op.task == "binary":
        cuts = {positive: float(op.cut)}
    elif op.task == "multilabel":
        cuts = dict(zip(op.class_names, map(float, op.thresholds)))
    else:
        raise ConfigError("A guarantee on a multi-class (argmax) operating point cannot be "
                          "re-certified: it has no per-class threshold.")
    if g.shared:
        if op.task != "multilabel" or tuple(g.class_names) != tuple(op.class_names):
            raise ConfigError(f"The card's guarantee ({g.spec}) is of classes "
                              f"{list(g.class_names)[:4]}, its operating point of "
                              f"{list(op.class_names)[:4]}.")
        return g, None, ["a shared (set FNR) threshold: re-certified at the certified "
                         "threshold"]
    if any(c.name not in cuts for c in g.classes):
        raise ConfigError(f"The card's guarantee ({g.spec}) is of classes "
                          f"{list(g.class_names)[:4]}, its operating point of "
                          f"{list(cuts)[:4]}.")
    rows, moved = [], []
    for c in g.classes:
        if c.certified and (op.temperature != 1.0 or c.threshold_prob != cuts[c.name]):
            z = float(op.temperature * log_odds(cuts[c.name]))
            rows.append(dataclasses.replace(c, threshold_logit=z, threshold_prob=cuts[c.name]))
            moved.append(c.name)
        else:
            rows.append(c)
    notes = ([f"the card decides {', '.join(moved)} by other thresholds than the certified "
              "ones: re-certified at the card's thresholds"] if moved else [])
    return dataclasses.replace(g, classes=tuple(rows)), positive, notes


__all__ = ["guarantee_of_card"]
