"""The foundation's public workflows, one function per CLI command: train a zoo model on a
dataset spec, predict, evaluate. Each returns a dataclass with ``to_dict()``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medscalpel.data.spec import open_dataset
from medscalpel.data.transforms import Augment, Preprocess
from medscalpel.engine.metrics import EvalResult, evaluate
from medscalpel.engine.predict import predict
from medscalpel.engine.predictions import Predictions
from medscalpel.engine.train import TrainConfig, TrainResult, seed_everything, train
from medscalpel.models.checkpoint import load_model, make_card, save_model
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.zoo import create_model

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """A trained model saved with its card, plus training history and test metrics."""

    model_dir: Path
    train: TrainResult
    test: EvalResult | None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model_dir": str(self.model_dir), "train": self.train.to_dict(),
                "test": self.test.to_dict() if self.test is not None else None, "data": self.data}


def fit(
    data: str,
    arch: str,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    size: int = 64,
    channels: int = 1,
    augment: bool = True,
    pretrained: bool = False,
    eval_split: str | None = "test",
    n_boot: int = 200,
    progress: bool | None = None,
    model: MedClassifier | None = None,
) -> FitResult:
    """Train ``arch`` on the ``train`` split of ``data``, early-stop on ``val``, evaluate on
    ``eval_split`` and save the model directory (``out_dir/model``) with its card.

    Example:
        >>> fit("phantom?n=400&size=32", "densenet_tiny", "/tmp/run", size=32)  # doctest: +SKIP
    """
    cfg = (config or TrainConfig()).validate()
    pp = Preprocess(size=size, channels=channels)
    train_ds = open_dataset(data, split="train", preprocess=pp.with_augment(Augment() if augment
                                                                            else None))
    val_ds = open_dataset(data, split="val", preprocess=pp)
    if model is None:
        seed_everything(cfg.seed)  # the initial weights are part of what the seed fixes
        model = create_model(arch, num_classes=train_ds.num_classes, in_chans=channels,
                             img_size=size, pretrained=pretrained)
    model.card = make_card(model, train_ds.class_names, train_ds.task, pp)
    out_dir = Path(out_dir)
    result = train(model, train_ds, val_ds, cfg, checkpoint_dir=out_dir / "checkpoint",
                   progress=progress)
    test = None
    if eval_split:
        test_ds = open_dataset(data, split=eval_split, preprocess=pp)
        trained = result.model
        trained.card = model.card
        test = evaluate(predict(trained, test_ds, progress=progress), n_boot=n_boot, seed=cfg.seed)
    card = make_card(result.model, train_ds.class_names, train_ds.task, pp,
                     training={**cfg.to_dict(), "data": data, "best_epoch": result.best_epoch,
                               "seconds": result.seconds, "pretrained": pretrained},
                     metrics={"val_" + cfg.monitor: result.best_metric,
                              **({f"{eval_split}_macro_auroc": test.macro["auroc"]} if test else {})},
                     lineage=({"method": "train", "parent": None, "data": data,
                               "data_hash": train_ds.content_hash()},))
    save_model(result.model, out_dir / "model", card)
    return FitResult(model_dir=out_dir / "model", train=result, test=test,
                     data={"train": train_ds.describe(), "val": val_ds.describe()})


def predict_spec(model_dir: str | os.PathLike, data: str, split: str = "test",
                 batch_size: int = 64, progress: bool | None = None) -> Predictions:
    """Load a model directory and predict a split of a dataset spec with the model's own
    preprocessing (size, channels, normalisation from model.json)."""
    model = load_model(model_dir)
    ds = open_dataset(data, split=split, preprocess=model.card.preprocess)
    preds = predict(model, ds, batch_size=batch_size, progress=progress)
    return preds


def evaluate_file(predictions: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                  n_boot: int = 1000, seed: int = 0) -> EvalResult:
    """Evaluate a saved Predictions file; per-class thresholds come from ``model_dir``'s card
    when given (else 0.5)."""
    preds = Predictions.load(predictions)
    thresholds = None
    if model_dir is not None:
        from medscalpel.models.checkpoint import ModelCard, _resolve
        from medscalpel.runs import read_json

        _, card_path = _resolve(model_dir)
        card = ModelCard.from_dict(read_json(card_path), source=str(card_path))
        thresholds = card.effective_thresholds()
    return evaluate(preds, thresholds=thresholds, n_boot=n_boot, seed=seed)
