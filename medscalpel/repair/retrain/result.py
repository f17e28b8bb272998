"""What a partial retraining did: :class:`RetrainResult`, the new-classifier copy of a model
(:func:`with_classifier`), and the feature-level helpers every retraining method shares
(per-class AUROC, argument checks, logits of a candidate layer)."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscalpel.engine.metrics import auroc
from medscalpel.engine.predict import Features
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.layout import write_artifact_at
from medscalpel.models.checkpoint import save_model
from medscalpel.models.classifier import MedClassifier
from medscalpel.repair.surgery import class_index
from medscalpel.repair.surgery.helpers import class_probs, label_k

SCHEMA = 1


# ----------------------------------------------------------------------------- helpers
def per_class_auroc(logits: np.ndarray, labels: np.ndarray, task: str,
                    class_names: Sequence[str]) -> dict[str, float]:
    """AUROC of every class (NaN labels ignored; NaN when a class lacks positives/negatives)."""

    probs = class_probs(logits, task)
    out = {}
    for j, n in enumerate(class_names):
        y = label_k(labels, j, task)
        known = np.isfinite(y)
        out[n] = auroc(y[known] > 0.5, probs[known, j])
    return out


def _macro(d: dict[str, float], names: Sequence[str] | None = None) -> float:
    vals = [v for n, v in d.items() if (names is None or n in names) and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _rows(classes: Sequence[int | str] | None, names: Sequence[str], owner: str) -> list[int]:

    if classes is None:
        return list(range(len(names)))
    out = sorted({class_index(names, c, owner) for c in classes})
    if not out:
        raise ConfigError(f"{owner}: 'classes' is empty; give at least one class or None for all.")
    return out


def _check_feats(train: Features, others: Sequence[Features | None], owner: str) -> None:
    if not isinstance(train, Features):
        raise DataError(f"{owner}: 'train' must be a Features (cached penultimate features); got "
                        f"{type(train).__name__}. Use extract_features(model, dataset).")
    for f in others:
        if f is None:
            continue
        if tuple(f.class_names) != tuple(train.class_names) or \
                f.features.shape[1] != train.features.shape[1]:
            raise DataError(f"{owner}: the features of split {f.split!r} do not match the training "
                            f"features (classes or channel count differ).")
    if len(train.ids) == 0:
        raise DataError(f"{owner}: the training features are empty.")


def _logits(f: Features, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return f.features.astype(np.float64) @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)


# ----------------------------------------------------------------------------- result
@dataclass
class RetrainResult:
    """A new final layer (and model, when one was given) with its held-out report."""

    method: str
    weight: np.ndarray
    bias: np.ndarray
    classes: list[str]
    trainable_params: int
    total_params: int
    seconds: float
    auroc_before: dict[str, float]
    auroc_after: dict[str, float]
    held_out_split: str
    history: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    model: MedClassifier | None = field(default=None, repr=False)
    model_dir: str | None = None

    @property
    def macro_before(self) -> float:
        return _macro(self.auroc_before)

    @property
    def macro_after(self) -> float:
        return _macro(self.auroc_after)

    def apply(self, feats: Features) -> Features:
        """``feats`` with this result's classifier (features unchanged)."""
        return replace(feats, weight=self.weight.astype(np.float32),
                       bias=self.bias.astype(np.float32))

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "method": self.method, "classes": self.classes,
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "trainable_fraction": self.trainable_params / max(self.total_params, 1),
                "seconds": self.seconds, "held_out_split": self.held_out_split,
                "auroc_before": self.auroc_before, "auroc_after": self.auroc_after,
                "macro_auroc_before": self.macro_before, "macro_auroc_after": self.macro_after,
                "history": self.history, "settings": self.settings, "model_dir": self.model_dir}

    def save(self, out_dir: str | os.PathLike, model: MedClassifier | None = None) -> Path:
        """Write ``retrain.json`` and the retrained model directory (with lineage) when a model
        is held or given."""
        out = Path(out_dir)
        model = model if model is not None else self.model
        if model is not None:
            if model.card is None:
                raise ModelError("RetrainResult.save: the model has no ModelCard; load it with "
                                 "load_model or train it with medscalpel first.")
            new = model if self.model is model else with_classifier(model, self.weight, self.bias)
            card = model.card.with_lineage(
                self.method, parent=model.card.model_id, classes=self.classes,
                trainable_params=self.trainable_params, seconds=self.seconds,
                macro_auroc_before=self.macro_before, macro_auroc_after=self.macro_after,
                held_out_split=self.held_out_split, settings=self.settings)
            save_model(new, out, card)
            self.model_dir = str(out)
        write_artifact_at(out, "retrain", self)
        return out


def with_classifier(model: MedClassifier, weight: np.ndarray, bias: np.ndarray) -> MedClassifier:
    """A copy of ``model`` whose classifier holds ``weight`` / ``bias``."""
    if tuple(weight.shape) != tuple(model.classifier.weight.shape):
        raise ModelError(f"with_classifier: weight {tuple(weight.shape)} does not fit the model's "
                         f"classifier {tuple(model.classifier.weight.shape)}.")
    new = copy.deepcopy(model)
    with torch.no_grad():
        new.classifier.weight.copy_(torch.from_numpy(np.asarray(weight, np.float32)))
        new.classifier.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))
    return new


def _finish(method, w, b, rows, names, n_trainable, total, t0, train, held, history, settings,
            model) -> RetrainResult:
    seconds = round(time.perf_counter() - t0, 3)
    ref = held if held is not None else train
    before = per_class_auroc(_logits(ref, train.weight, train.bias), ref.labels, ref.task, names)
    after = per_class_auroc(_logits(ref, w, b), ref.labels, ref.task, names)
    new_model = with_classifier(model, w, b) if model is not None else None
    return RetrainResult(method, np.asarray(w, np.float32), np.asarray(b, np.float32),
                         [names[r] for r in rows], int(n_trainable), int(total), seconds,
                         before, after, ref.split if held is not None else f"{ref.split} (train)",
                         history, settings, new_model)
