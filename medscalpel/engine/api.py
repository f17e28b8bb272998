"""The foundation's public workflows, one function per CLI command: train a zoo model on a
dataset spec, predict, evaluate. Each returns a dataclass with ``to_dict()``."""

from __future__ import annotations

import glob
import logging
import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

import medscalpel.data  # noqa: F401  (registers the adapters)
from medscalpel.data.base import CXRDataset, split_warning
from medscalpel.data.dicom_read import file_ids
from medscalpel.data.io import IMAGE_EXTENSIONS, read_image
from medscalpel.data.scan import readable_image_files, require_readable, split_file_query
from medscalpel.data.spec import DATASETS, DatasetSpec, open_dataset
from medscalpel.data.transforms import Augment, Preprocess
from medscalpel.engine.bulk import BulkSettings, bulk_predict
from medscalpel.engine.external import ExternalValidation, RelabeledDataset, external_validation
from medscalpel.engine.metrics import EvalResult, evaluate
from medscalpel.engine.predict import predict
from medscalpel.engine.predictions import Predictions
from medscalpel.layout import artifact
from medscalpel.engine.train import TrainConfig, TrainResult, seed_everything, train
from medscalpel.errors import DataError
from medscalpel.models.checkpoint import ModelCard, _resolve, load_model, make_card, save_model
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.zoo import create_model
from medscalpel.runs import read_json

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
    augment: bool | str | Augment = True,
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
    aug = as_augment(augment)
    train_ds = open_dataset(data, split="train", preprocess=pp.with_augment(aug))
    val_ds = open_dataset(data, split="val", preprocess=pp)
    test_ds = open_dataset(data, split=eval_split, preprocess=pp) if eval_split else None
    pixels = require_readable(train_ds, val_ds, test_ds, progress=progress)  # before training
    if model is None:
        seed_everything(cfg.seed)  # the initial weights are part of what the seed fixes
        model = create_model(arch, num_classes=train_ds.num_classes, in_chans=channels,
                             img_size=size, pretrained=pretrained)
    model.card = make_card(model, train_ds.class_names, train_ds.task, pp)
    out_dir = Path(out_dir)
    result = train(model, train_ds, val_ds, cfg, checkpoint_dir=out_dir / "checkpoint",
                   progress=progress)
    test = None
    if test_ds is not None:
        trained = result.model
        trained.card = model.card
        test = evaluate(predict(trained, test_ds, progress=progress), n_boot=n_boot, seed=cfg.seed)
        test.extra["split_unit"] = test_ds.meta.get("split_unit")
        if split_warning(test_ds):
            test.extra["split_warning"] = split_warning(test_ds)
    card = make_card(result.model, train_ds.class_names, train_ds.task, pp,
                     training={**cfg.to_dict(), "data": data, "best_epoch": result.best_epoch,
                               "augment": None if aug is None else aug.to_dict(),
                               "seconds": result.seconds, "pretrained": pretrained},
                     metrics={"val_" + cfg.monitor: result.best_metric,
                              **({f"{eval_split}_macro_auroc": test.macro["auroc"]} if test else {})},
                     lineage=({"method": "train", "parent": None, "data": data,
                               "data_hash": train_ds.content_hash()},))
    save_model(result.model, out_dir / "model", card)
    return FitResult(model_dir=out_dir / "model", train=result, test=test,
                     data={"train": train_ds.describe(), "val": val_ds.describe(),
                           "split_unit": train_ds.meta.get("split_unit"),
                           "split_warning": split_warning(train_ds),
                           "pixels": pixels.to_dict() if pixels is not None else None})


def as_augment(augment: bool | str | Augment | None) -> Augment | None:
    """``True`` -> the light profile, ``False`` / ``None`` -> none, a profile name (``light``,
    ``acquisition``; see :meth:`Augment.preset`) or an :class:`Augment` as is.

    >>> as_augment("acquisition").noise, as_augment(False)
    (0.05, None)
    """
    if augment is None or augment is False:
        return None
    if augment is True:
        return Augment()
    if isinstance(augment, Augment):
        return augment
    return Augment.preset(augment)


def choose_split(card: Any, data: str, split: str | None) -> tuple[str, str]:
    """The split to predict and why.

    ``split`` given: used as is. ``None`` / ``auto``: ``test`` when ``data`` is the dataset the
    model was trained on (its card's ``training["data"]``: the held-out test split is defined
    there), else ``all`` (the model never saw this dataset, so every image is held out).
    """
    if split == "all":
        return "all", "every image ('all')"
    if split not in (None, "", "auto"):
        return str(split), f"split '{split}' as requested"
    trained_on = (getattr(card, "training", None) or {}).get("data")
    if trained_on and _same_spec(trained_on, data):
        return "test", f"the model was trained on {data!r}: its held-out 'test' split"
    why = (f"the model was trained on {trained_on!r}, not on this dataset" if trained_on else
           "the model card does not name its training data")
    return "all", f"{why}: every image ('all')"


def _same_spec(a: str, b: str) -> bool:
    try:
        return str(DatasetSpec.parse(a)) == str(DatasetSpec.parse(b))
    except Exception:  # noqa: BLE001 - an unparsable recorded spec is simply not the same
        return a.strip() == b.strip()


def image_paths(data: str) -> list[Path] | None:
    """The image files ``data`` names when it is one image file, a folder holding image files
    or a glob (``/scans/*.png``), not a dataset spec; None for a dataset spec."""

    head = data.split("?", 1)[0].strip()
    adapter = head.split(":", 1)[0].strip().lower()
    if adapter in DATASETS.names() and (":" in head or not Path(head).exists()):
        return None  # a dataset spec such as 'folder:/x' or 'phantom?n=8'
    data = split_file_query(data)[0]  # 'scans/*.png?skip_corrupt=true': predict_spec reads it
    if any(ch in data for ch in "*?["):
        files = [Path(f) for f in sorted(glob.glob(data, recursive=True))
                 if f.lower().endswith(IMAGE_EXTENSIONS) and Path(f).is_file()]
        if not files:
            raise DataError(f"No image file ({', '.join(IMAGE_EXTENSIONS)}) matches {data!r}.")
        return files
    p = Path(data)
    if p.is_file():
        if not p.name.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"{p} is not an image file ({', '.join(IMAGE_EXTENSIONS)}); give "
                            "an image, a folder of images, a glob or a dataset spec.")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                       and f.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"{p} holds no image file directly; a labelled folder of class "
                            f"subfolders is the dataset spec 'folder:{p}'.")
        return files
    return None


class ImageFiles(CXRDataset):
    """Unlabelled image files (``predict`` on an image, a folder of images or a glob): the
    model's classes, labels unknown (NaN for multi-label; -1 in the Predictions of a
    multi-class model, whose labels are class indices)."""

    name = "images"

    def __init__(self, paths: list[Path], class_names: list[str], task: str,
                 preprocess: Preprocess | None = None, spec: str = "images"):

        super().__init__(preprocess, spec=spec, split="all")
        self.paths = [Path(p) for p in paths]
        names = file_ids(self.paths)  # DICOM files: pseudonyms (names can hold identifiers)
        labels = (np.full((len(names), len(class_names)), np.nan, np.float32)
                  if task == "multilabel" else np.zeros(len(names), np.int64))
        self._set_tables(names, labels, class_names, task)

    def load_raw(self, index: int):

        return read_image(self.paths[index], colour=self.preprocess.channels == 3)


def _predict_files(model: MedClassifier, paths: list[Path], data: str, batch_size: int,
                   progress: bool | None, bulk: BulkSettings | None = None) -> Predictions:

    card = model.card
    ds = ImageFiles(paths, list(card.class_names), card.task, card.preprocess, spec=data)
    preds = _run_predict(model, ds, batch_size, progress, bulk)
    labels = preds.labels if card.task == "multilabel" else np.full(preds.n, -1, np.int64)
    meta = {**preds.meta, "n_used": len(ds), "n_total": len(paths), "unlabelled": True,
            "split_reason": "image files: no labels (NaN), nothing to evaluate against"}
    return replace(preds, labels=labels, split="images", meta=meta)


def predict_spec(model_dir: str | os.PathLike | Any, data: str, split: str | None = "test",
                 batch_size: int = 64, progress: bool | None = None,
                 class_map: dict[str, str] | None = None,
                 bulk: BulkSettings | None = None) -> Predictions:
    """Load a model directory and predict a split of a dataset spec with the model's own
    preprocessing (size, channels, normalisation from model.json).

    Args:
        model_dir: a model directory, or a model already loaded (e.g. a served artifact from
            :func:`medscalpel.deploy.served.load_any`); a model that names its artifact
            (``model.provenance()``) has it recorded in the Predictions' ``meta["artifact"]``.
        split: the split; ``None`` / ``auto`` chooses (see :func:`choose_split`).
        class_map: dataset class name -> model class name when the names differ (an external
            set); see :func:`medscalpel.engine.external.map_class_names`.

    The Predictions' ``meta`` records ``split_unit`` (patient / image / mixed, see
    :func:`medscalpel.data.base.split_warning`), ``n_used`` / ``n_total`` (images predicted /
    images in the whole dataset) and ``split_reason``.
    """
    model = _as_model(model_dir)
    preds = _predict_spec(model, data, split, batch_size, progress, class_map, bulk)
    art = model_provenance(model)
    return replace(preds, meta={**preds.meta, "artifact": art}) if art is not None else preds


def _as_model(model: str | os.PathLike | Any) -> Any:
    return model if isinstance(model, nn.Module) else load_model(model)


def model_provenance(model: Any) -> dict[str, Any] | None:
    """The artifact a loaded model runs (runtime, precision, file sha256, CPU) when it names
    one (a served runtime artifact's ``provenance()``, a served torch model's ``artifact``),
    else None (a model directory)."""
    fn = getattr(model, "provenance", None)
    if callable(fn):
        return fn()
    art = getattr(model, "artifact", None)
    return dict(art) if isinstance(art, dict) else None


def _run_predict(model: Any, ds: CXRDataset, batch_size: int, progress: bool | None,
                 bulk: BulkSettings | None) -> Predictions:
    """The in-process loop, or the bulk path when ``bulk`` is given."""
    if bulk is None:
        return predict(model, ds, batch_size=batch_size, progress=progress)
    return bulk_predict(model, ds, bulk.batch_size, bulk.workers, bulk.threads, bulk.chunk,
                        progress=progress)


def _predict_spec(model: Any, data: str, split: str | None, batch_size: int,
                  progress: bool | None, class_map: dict[str, str] | None,
                  bulk: BulkSettings | None = None) -> Predictions:
    paths = image_paths(data)
    if paths is not None:
        if split not in (None, "", "auto", "all"):
            raise DataError(f"--split {split}: image files have no splits; drop --split (or "
                            "use a dataset spec).")
        paths, skipped = readable_image_files(paths, data, progress=progress)
        preds = _predict_files(model, paths, data, batch_size, progress, bulk)
        return replace(preds, meta={**preds.meta, "n_total": len(paths) + len(skipped),
                                    "skipped": len(skipped)})
    split, reason = choose_split(model.card, data, split)
    ds = open_dataset(data, split=split, preprocess=model.card.preprocess)
    n_total = len(ds) if split == "all" else len(open_dataset(data, split="all",
                                                              preprocess=model.card.preprocess))
    dups = _duplicates_removed(ds.meta)  # dropped before any split: part of the total
    n_total += dups
    unlabelled = bool(ds.meta.get("unlabelled"))  # e.g. a dicom: folder without a label CSV
    if unlabelled:
        ds = ds.with_classes(list(model.card.class_names), model.card.task)
    elif class_map or list(ds.class_names) != list(model.card.class_names):
        ds = RelabeledDataset(ds, model.card.class_names, class_map)
    preds = _run_predict(model, ds, batch_size, progress, bulk)
    meta = {**preds.meta, "split_unit": ds.meta.get("split_unit"), "n_used": len(ds),
            "n_total": n_total, "split_reason": reason,
            "skipped": ds.skip_report.count, "duplicates_removed": dups}
    if unlabelled:
        meta.update(unlabelled=True, split_reason=f"{reason}; no labels (unknown)")
        if ds.task != "multilabel":
            preds = replace(preds, labels=np.full(preds.n, -1, np.int64))
    if class_map:
        meta["class_map"] = dict(class_map)
    return replace(preds, meta=meta)


def _duplicates_removed(meta: dict) -> int:
    """Byte-identical copies an adapter dropped (folder: ``meta["dedup"]``; dicom: top level)."""
    dedup = meta.get("dedup")
    n = dedup.get("duplicates_removed") if isinstance(dedup, dict) else \
        meta.get("duplicates_removed")
    return int(n or 0)


def usage_line(preds: Predictions) -> str:
    """``"120 of 600 images of <spec> (split 'test': why)"`` from :func:`predict_spec`'s meta."""
    m = preds.meta
    used, total = m.get("n_used", preds.n), m.get("n_total")
    line = (f"{used} of {total} images" if total is not None else f"{used} images") + \
        f" of {m.get('dataset', '?')} ({m.get('split_reason', 'split ' + repr(preds.split))}"
    if m.get("duplicates_removed"):
        line += (f"; {m['duplicates_removed']} duplicate image file(s) dropped (byte-identical "
                 "copies)")
    if m.get("skipped"):
        line += f"; {m['skipped']} unreadable file(s) skipped"
    warn = split_warning(preds)
    return line + ")" + (f"; WARNING: {warn}" if warn else "")


def predictions_file(path: str | os.PathLike) -> Path:
    """The Predictions file ``path`` names: itself, or the ``predictions.npz`` of a run
    directory (the ``--out`` of 'predict' or 'predictions import')."""
    p = Path(path)
    return p / artifact("predictions_file").filename if p.is_dir() else p


def load_predictions(path: str | os.PathLike) -> Predictions:
    """:meth:`Predictions.load` whose every failure (missing file, a folder without
    predictions.npz, pickled or non-numeric arrays, missing entries) is one DataError naming
    the file."""

    p = Path(path)
    target = predictions_file(p)
    how = "give predictions.npz written by 'medscalpel predict' or 'predictions import'"
    if target.is_file():
        try:
            with np.load(target, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except ValueError as exc:
            if "pickle" in str(exc).lower() or "object arrays" in str(exc).lower():
                raise DataError(f"{target} holds Python objects (pickled data), which "
                                f"medscalpel never loads; {how}.") from exc
            raise DataError(f"{target} is not a medscalpel Predictions file ({exc}); "
                            f"{how}.") from exc
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{target} is not a readable .npz file ({type(exc).__name__}); "
                            f"{how}.") from exc
        for name in ("logits", "labels"):
            if name in arrays and not np.issubdtype(arrays[name].dtype, np.number):
                raise DataError(f"{target}: array '{name}' is not numeric "
                                f"({arrays[name].dtype}); {how}.")
    try:
        return Predictions.load(p)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{target} is not a medscalpel Predictions file (missing or bad entry "
                        f"{exc}); {how}.") from exc


def validate_external(predictions: str | os.PathLike, model_dir: str | os.PathLike | Any,
                      external: str, external_split: str = "all",
                      class_map: dict[str, str] | None = None, n_boot: int = 1000, seed: int = 0,
                      batch_size: int = 64, progress: bool | None = None,
                      bulk: BulkSettings | None = None
                      ) -> tuple[ExternalValidation, Predictions]:
    """Predict the external dataset ``external`` (split ``all`` by default) with the model and
    put its numbers next to the internal ``predictions`` file at the model's stored thresholds
    (see :func:`medscalpel.engine.external.external_validation`). ``bulk`` runs the external
    set through :func:`~medscalpel.engine.bulk.bulk_predict` (decoding workers, whole batches,
    logits streamed to disk), as ``predict`` does.

    Returns:
        ``(result, external_predictions)``.
    """
    internal = load_predictions(predictions)
    model_dir = _as_model(model_dir)
    model_card = model_dir.card
    ext = predict_spec(model_dir, external, external_split, batch_size=batch_size,
                       progress=progress, class_map=class_map, bulk=bulk)
    res = external_validation(model_card, internal, ext, n_boot=n_boot, seed=seed)
    return res, ext


def _card(model_dir: str | os.PathLike):
    _, card_path = _resolve(model_dir)
    return ModelCard.from_dict(read_json(card_path), source=str(card_path))


def evaluate_file(predictions: str | os.PathLike,
                  model_dir: str | os.PathLike | ModelCard | None = None,
                  n_boot: int = 1000, seed: int = 0) -> EvalResult:
    """Evaluate a saved Predictions file; per-class thresholds come from ``model_dir``'s card
    (a model directory, or a :class:`ModelCard` such as a served artifact's) when given (else
    0.5). The artifact that made the predictions (their ``meta["artifact"]``, when a served
    artifact predicted them) is named in the result's ``extra["artifact"]``."""
    preds = load_predictions(predictions)
    if preds.meta.get("unlabelled"):
        raise DataError(f"{predictions} holds predictions of unlabelled image files: there "
                        "are no labels to evaluate against (predict a labelled dataset spec).")
    thresholds = None
    if model_dir is not None:
        card = model_dir if isinstance(model_dir, ModelCard) else _card(model_dir)
        thresholds = card.effective_thresholds()
    res = evaluate(preds, thresholds=thresholds, n_boot=n_boot, seed=seed)
    if preds.meta.get("artifact"):
        res.extra["artifact"] = preds.meta["artifact"]
    warn = split_warning(preds)
    if warn:  # every report of test numbers states a leaky split
        res.extra["split_warning"] = warn
    res.extra["split_unit"] = preds.meta.get("split_unit")
    return res
