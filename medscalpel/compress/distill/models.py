"""Which model a distillation argument names: a model, a model directory or a zoo architecture,
and the check that teacher and student fit the data."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from medscalpel.data.base import CXRDataset
from medscalpel.engine.predict import check_compatible
from medscalpel.errors import ModelError
from medscalpel.models.checkpoint import CARD, WEIGHTS, load_model
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.zoo import ARCHS, create_model

ModelLike = MedClassifier | str | os.PathLike


def _is_model_dir(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike)) and (Path(x) / CARD).is_file()


def resolve_model(model: ModelLike, dataset: CXRDataset, role: str = "student") -> MedClassifier:
    """A copy of ``model`` (a :class:`MedClassifier`), the model in a medscalpel model directory,
    or a fresh zoo architecture sized for ``dataset`` (classes, channels, image size)."""
    if isinstance(model, MedClassifier):
        return copy.deepcopy(model)
    if _is_model_dir(model):
        return load_model(model)
    if isinstance(model, str) and model in ARCHS.names():
        return create_model(model, num_classes=dataset.num_classes,
                            in_chans=dataset.preprocess.channels,
                            img_size=dataset.preprocess.size)
    if isinstance(model, (str, os.PathLike)) and Path(model).exists():
        raise ModelError(f"The {role} {str(model)!r} is a path but not a medscalpel model "
                         f"directory ({WEIGHTS} + {CARD}); import foreign weights with "
                         "'medscalpel models import' first.")
    raise ModelError(f"Unknown {role} {model!r}: give a zoo architecture (one of "
                     f"{', '.join(ARCHS.names())}), a model directory or a MedClassifier.")


def _check_pair(teacher: MedClassifier, student: MedClassifier, dataset: CXRDataset) -> None:
    for role, m in (("teacher", teacher), ("student", student)):
        if not isinstance(m, MedClassifier):
            raise ModelError(f"The {role} must be a MedClassifier; got {type(m).__name__}.")
        try:
            check_compatible(m, dataset)
        except ModelError as exc:
            raise ModelError(f"The {role} ({m.arch}) does not fit the data: {exc}") from exc


__all__ = ["ModelLike", "resolve_model"]
