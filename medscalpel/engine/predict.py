"""Run a model over a dataset: :class:`Predictions` and cached penultimate :class:`Features`."""

from __future__ import annotations

import json
import os
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medscalpel.data.base import CXRDataset
from medscalpel.engine.device import resolve_device
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import DataError, ModelError
from medscalpel.models.classifier import MedClassifier
from medscalpel.progress import track
from medscalpel.runs import atomic_path, dumps_json
from medscalpel.validation import check_range


def check_compatible(model: MedClassifier, dataset: CXRDataset) -> None:
    """Refuse a model whose classes / input channels / task do not match the dataset."""
    card = model.card
    if model.num_classes != dataset.num_classes:
        raise ModelError(
            f"The model predicts {model.num_classes} classes but dataset {dataset.spec!r} has "
            f"{dataset.num_classes} ({dataset.class_names[:5]}...). Use a model trained on these "
            "classes, or the matching dataset."
        )
    if card is not None:
        if list(card.class_names) != list(dataset.class_names):
            diff = [(a, b) for a, b in zip(card.class_names, dataset.class_names) if a != b]
            raise ModelError(
                f"The model's classes differ from dataset {dataset.spec!r}: first mismatches "
                f"{diff[:3]} (model vs data). Class order must match."
            )
        if card.task != dataset.task:
            raise ModelError(f"The model is {card.task} but dataset {dataset.spec!r} is "
                             f"{dataset.task}.")
    if model.in_chans != dataset.preprocess.channels:
        raise ModelError(f"The model takes {model.in_chans} input channel(s) but the dataset is "
                         f"preprocessed to {dataset.preprocess.channels}; open the data with the "
                         "model's preprocessing (model.card.preprocess).")


def make_loader(dataset: CXRDataset, batch_size: int, shuffle: bool = False,
                num_workers: int = 0, generator: torch.Generator | None = None,
                drop_last: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=generator, drop_last=drop_last,
                      persistent_workers=False)


@torch.no_grad()
def _run(model: MedClassifier, dataset: CXRDataset, batch_size: int, device, progress: bool | None,
         want_features: bool, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    dev = resolve_device(device)
    was_training = model.training
    model.eval()
    model.to(dev)
    logits, feats = [], []
    try:
        loader = make_loader(dataset, batch_size, num_workers=num_workers)
        for x, _ in track(loader, f"predict {dataset.split}", progress=progress):
            x = x.to(dev)
            if want_features:
                f = model.features(x)
                feats.append(f.float().cpu().numpy())
                logits.append(model.classifier(f).float().cpu().numpy())
            else:
                logits.append(model(x).float().cpu().numpy())
    finally:
        model.train(was_training)
    k = model.num_classes
    out = np.concatenate(logits) if logits else np.zeros((0, k), np.float32)
    f = (np.concatenate(feats) if feats else np.zeros((0, model.feature_dim), np.float32)
         ) if want_features else None
    return out, f


def predict(model: MedClassifier, dataset: CXRDataset, batch_size: int = 64,
            device: str | None = "auto", progress: bool | None = None,
            num_workers: int = 0) -> Predictions:
    """Logits of ``model`` on every image of ``dataset`` as a :class:`Predictions`."""
    check_range(batch_size, "batch_size", "predict", 1, 2**20, integer=True)
    check_compatible(model, dataset)
    dataset.require_nonempty()
    t0 = time.perf_counter()
    logits, _ = _run(model, dataset, batch_size, device, progress, False, num_workers)
    return Predictions(logits=logits, labels=dataset.labels, ids=tuple(dataset.ids),
                       class_names=tuple(dataset.class_names), task=dataset.task,
                       split=dataset.split, model_id=_model_id(model),
                       meta={"dataset": dataset.spec, "dataset_hash": dataset.content_hash(),
                             "seconds": round(time.perf_counter() - t0, 3)})


def _model_id(model: MedClassifier) -> str:
    return model.card.model_id if model.card is not None and model.card.model_id else model.arch


@dataclass(frozen=True)
class Features:
    """Cached penultimate features ``f(x)`` with the classifier they feed.

    ``logits == features @ weight.T + bias`` (float32 rounding aside).
    """

    features: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    labels: np.ndarray
    ids: tuple[str, ...]
    class_names: tuple[str, ...]
    task: str
    split: str = ""
    model_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def logits(self) -> np.ndarray:
        return (self.features.astype(np.float64) @ self.weight.T.astype(np.float64)
                + self.bias.astype(np.float64)).astype(np.float32)

    def to_predictions(self) -> Predictions:
        return Predictions(self.logits(), self.labels, self.ids, self.class_names, self.task,
                           self.split, self.model_id, dict(self.meta))

    def select(self, rows) -> "Features":
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return replace(self, features=self.features[rows], labels=self.labels[rows],
                       ids=tuple(self.ids[i] for i in rows))

    def to_dict(self) -> dict[str, Any]:
        return {"n": len(self.ids), "dim": int(self.features.shape[1]), "task": self.task,
                "split": self.split, "model_id": self.model_id, "class_names": list(self.class_names)}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        meta = {"ids": list(self.ids), "class_names": list(self.class_names), "task": self.task,
                "split": self.split, "model_id": self.model_id, "meta": self.meta}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, features=self.features, weight=self.weight, bias=self.bias,
                                    labels=self.labels,
                                    meta=np.frombuffer(dumps_json(meta).encode(), np.uint8))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Features":
        path = Path(path)
        if path.is_dir():
            raise DataError(f"{path} is a folder; give the Features .npz file written by "
                            "'medscalpel features --model M --data SPEC --split S --out F.npz'.")
        if not path.is_file():
            raise DataError(f"Features file not found: {path}.")
        how = ("write one with 'medscalpel features --model M --data SPEC --split S "
               "--out F.npz'")
        try:
            with np.load(path, allow_pickle=False) as z:
                names = set(z.files)
                if "features" not in names:
                    what = ("a Predictions file (logits only)" if "logits" in names
                            else "not a medscalpel Features file")
                    raise DataError(f"{path} is {what}: this needs penultimate Features; "
                                    f"{how}.")
                meta = json.loads(bytes(z["meta"]).decode())
                arrays = [np.asarray(z[k]) for k in ("features", "weight", "bias", "labels")]
            for name, arr in zip(("features", "weight", "bias", "labels"), arrays):
                if not np.issubdtype(arr.dtype, np.number):
                    raise DataError(f"{path}: array '{name}' is not numeric ({arr.dtype}); "
                                    f"{how}.")
            return cls(*arrays, tuple(meta["ids"]), tuple(meta["class_names"]), meta["task"],
                       meta.get("split", ""), meta.get("model_id", ""), meta.get("meta", {}))
        except DataError:
            raise
        except ValueError as exc:
            if "pickle" in str(exc).lower() or "object arrays" in str(exc).lower():
                raise DataError(f"{path} holds Python objects (pickled data), which medscalpel "
                                f"never loads; {how}.") from exc
            raise DataError(f"{path} is not a medscalpel Features file ({exc}); {how}.") from exc
        except (KeyError, TypeError, OSError, UnicodeDecodeError, json.JSONDecodeError,
                zipfile.BadZipFile) as exc:
            raise DataError(f"{path} is not a medscalpel Features file ({type(exc).__name__}: "
                            f"{exc}); {how}.") from exc


def extract_features(model: MedClassifier, dataset: CXRDataset, batch_size: int = 64,
                     device: str | None = "auto", progress: bool | None = None) -> Features:
    """Penultimate features of every image plus the classifier weights (for surgery,
    partial retraining and polarity analysis)."""
    check_range(batch_size, "batch_size", "extract_features", 1, 2**20, integer=True)
    check_compatible(model, dataset)
    dataset.require_nonempty()
    _, f = _run(model, dataset, batch_size, device, progress, True)
    w = model.classifier.weight.detach().cpu().numpy().copy()
    b = model.classifier.bias.detach().cpu().numpy().copy()
    return Features(features=f, weight=w, bias=b, labels=dataset.labels, ids=tuple(dataset.ids),
                    class_names=tuple(dataset.class_names), task=dataset.task,
                    split=dataset.split, model_id=_model_id(model),
                    meta={"dataset": dataset.spec, "dataset_hash": dataset.content_hash()})


def collect_images(dataset: CXRDataset, n: int | None = None, seed: int = 0,
                   indices: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Stack ``n`` images (seeded choice) or the given indices into one tensor."""
    if indices is None:
        rng = np.random.default_rng(seed)
        count = len(dataset) if n is None else min(n, len(dataset))
        indices = sorted(rng.choice(len(dataset), count, replace=False).tolist())
    return torch.stack([dataset.image(i) for i in indices]), list(indices)
