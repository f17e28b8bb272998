"""Import stages: a foreign checkpoint, torchxrayvision's DenseNet121 and predictions made
elsewhere become medscalpel artifacts (``models import``, ``models import-xrv``,
``predictions import``).

An imported model's run directory is its model directory (``model.json`` +
``model.safetensors`` beside the manifest: give the folder to ``--model``); imported predictions
sit where ``predict`` writes its own (``predictions.npz`` + ``predictions.json``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from medscalpel.data.spec import open_dataset
from medscalpel.data.transforms import Preprocess
from medscalpel.engine.importer import import_predictions
from medscalpel.errors import DataError
from medscalpel.layout import ARTIFACTS, write_artifact
from medscalpel.models.checkpoint import foreign_input, import_foreign, save_model
from medscalpel.models.xrv import load_xrv_densenet
from medscalpel.pipeline.stage import Stage, StageContext, register_stage

SCHEMA = 1


@dataclass(frozen=True)
class ModelImport:
    """What ``models import`` made: the input the model was given (and where each value came
    from, ``notes``), whether its first convolution was adapted, its size and folder.

    Example:
        >>> r = ModelImport("w.pt", "vgg_tiny", "runs/m", 24, 1, 1, False, 10, ())
        >>> ModelImport.from_dict(r.to_dict()) == r
        True
    """

    checkpoint: str
    arch: str
    model_dir: str
    size: int
    channels: int
    checkpoint_channels: int | None  # input channels of the checkpoint's first convolution
    adapted_channels: bool  # --adapt-channels converted that convolution
    num_parameters: int
    notes: tuple[str, ...] = ()  # the input values read from the checkpoint or defaulted

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, **asdict(self), "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelImport:
        if d.get("schema_version", SCHEMA) > SCHEMA:
            raise DataError(f"ModelImport schema {d['schema_version']} is newer than this "
                            f"medscalpel reads ({SCHEMA}); upgrade medscalpel.")
        kw = {k: v for k, v in d.items() if k != "schema_version"}
        return cls(**{**kw, "notes": tuple(kw.get("notes", ()))})


@dataclass(frozen=True)
class ImportModelSettings:
    checkpoint: str  # a .pt/.pth/.pth.tar state dict or .safetensors
    arch: str  # the zoo architecture the weights belong to
    data: str  # dataset spec giving the class names and the task
    size: int | None = None  # None: from a ViT's position embedding, else 224
    channels: int | None = None  # None: those of the checkpoint's first convolution
    adapt_channels: bool = False


def resolve_input(found: dict[str, Any], size: int | None,
                  channels: int | None) -> tuple[int, int, tuple[str, ...]]:
    """The input size and channels (those given, else what the checkpoint says, else the
    defaults) and a note for each value not given."""
    notes = []
    if channels is None:
        channels = found["channels"] or 3
        notes.append(f"channels {channels} (from {found['first_conv']})" if found["channels"]
                     else "channels 3 (the checkpoint has no convolution to read them from)")
    if size is None:
        size = found["size"] or 224
        notes.append(f"size {size} (from the position embedding)" if found["size"] else
                     "size 224 (a CNN checkpoint does not record its input size: pass --size "
                     "if it was trained at another)")
    return size, channels, tuple(notes)


@register_stage
class ImportModelStage(Stage):
    """Import a foreign checkpoint (CheXNet, torchvision, timm key layouts) without unpickling
    code into a model directory (``models import``); input channels come from its first
    convolution."""

    name = "import_model"
    writes = ("imported_model",)
    Settings = ImportModelSettings

    def run(self, ctx: StageContext, s: ImportModelSettings) -> dict[str, Any]:
        found = foreign_input(s.checkpoint)
        size, channels, notes = resolve_input(found, s.size, s.channels)
        ds = open_dataset(s.data, split="all")
        model = import_foreign(s.checkpoint, s.arch, ds.class_names, ds.task,
                               Preprocess(size=size, channels=channels),
                               adapt_channels=s.adapt_channels)
        save_model(model, ctx.dir_of("imported_model"), model.card)
        adapted = (s.adapt_channels and found["channels"] is not None
                   and found["channels"] != channels)
        res = ModelImport(s.checkpoint, s.arch, str(ctx.final_dir_of("imported_model")), size,
                          channels, found["channels"], adapted, model.num_parameters(), notes)
        ctx.model = model
        ctx.results[self.name] = res
        return {"size": size, "channels": channels, "checkpoint_channels": found["channels"],
                "adapted_channels": adapted, "num_parameters": res.num_parameters}


@dataclass(frozen=True)
class ImportXrvSettings:
    weights: str | None = None  # a local state dict of xrv's DenseNet121; None: the xrv extra
    size: int = 224  # the input size recorded in the model card


@register_stage
class ImportXrvStage(Stage):
    """Import torchxrayvision's DenseNet121 into a model directory, op_threshs disabled so that
    its outputs are logits (``models import-xrv``)."""

    name = "import_xrv"
    writes = ("imported_model",)
    Settings = ImportXrvSettings

    def run(self, ctx: StageContext, s: ImportXrvSettings) -> dict[str, Any]:
        model = load_xrv_densenet(s.weights, size=s.size)
        save_model(model, ctx.dir_of("imported_model"), model.card)
        ctx.model = model
        ctx.results[self.name] = model
        return {"weights": s.weights or "torchxrayvision", "size": s.size,
                "classes": len(model.card.class_names)}


@dataclass(frozen=True)
class ImportPredictionsSettings:
    csv: str  # per-class probabilities (or logits) keyed by image id
    labels: str  # dataset spec giving the labels
    id_column: str = "Image Index"
    values: str = "probability"  # probability | logit
    split: str = "test"
    allow_missing: bool = False  # drop ids that have no label


@register_stage
class ImportPredictionsStage(Stage):
    """Import predictions made elsewhere (a CSV of per-class scores) with the labels of a
    dataset spec into a Predictions artifact (``predictions import``)."""

    name = "import_predictions"
    writes = ("predictions_file", "predictions_meta")
    Settings = ImportPredictionsSettings

    def run(self, ctx: StageContext, s: ImportPredictionsSettings) -> dict[str, Any]:
        preds = import_predictions(s.csv, s.labels, id_column=s.id_column, values=s.values,
                                   split=s.split, allow_missing=s.allow_missing)
        preds.save(ARTIFACTS["predictions_file"].path_in(ctx.out))
        write_artifact(ctx.out, "predictions_meta", preds)
        ctx.results[self.name] = preds
        return {"spec": s.labels, "n": preds.n, "classes": preds.num_classes,
                "split": s.split}
