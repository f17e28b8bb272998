"""Checkpoints: ``model.safetensors`` + ``model.json`` (the model card).

The card carries the model's input contract (architecture, class names, task type, input size,
channels, normalisation, thresholds) and its lineage (parent model and what was done to it), so
every later stage can use a model without being told how it was trained. Structurally changed
models (pruned, folded) reload because the loader conforms the freshly built architecture's
layers to the tensor shapes stored in the file.

Foreign ``.pt/.pth/.pth.tar`` state dicts are read with ``torch.load(weights_only=True)``: a file
that holds pickled code is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from medscalpel import __version__
from medscalpel.data.transforms import Preprocess
from medscalpel.errors import CheckpointError, ModelError
from medscalpel.layout import artifact, write_artifact_at
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.operating_point import OperatingPoint, derive_operating_point, task_of
from medscalpel.models.zoo import ARCHS, create_model
from medscalpel.runs import atomic_path, read_json

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
#: the declaration of a model directory's card in medscalpel/layout.py (a single command's
#: ``model/``); every stage's model (``baseline_card``, ``calibrated_card``) has the same file
#: name and type (ModelCard)
_CARD_ARTIFACT = "model"
CARD = artifact(_CARD_ARTIFACT).filename
CARD_SCHEMA = 1


@dataclass(frozen=True)
class ModelCard:
    """What a model is and how to feed it (``model.json``).

    ``operating_point`` (:class:`~medscalpel.models.operating_point.OperatingPoint`) is how its
    outputs become decisions; ``thresholds`` is that point's per-class view (kept for older
    readers): the two never disagree. Set both with :meth:`with_operating_point`; a card whose
    ``thresholds`` were changed without it (``replace(card, thresholds=...)``) re-derives its
    operating point from the new thresholds (the thresholds are what the model decides by), with
    a note, and a card without an operating point derives one on :meth:`decision_point`.
    """

    arch: str
    class_names: tuple[str, ...]
    task: str
    input: dict[str, Any]
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    thresholds: tuple[float, ...] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: tuple[dict[str, Any], ...] = ()
    model_id: str = ""
    num_parameters: int = 0
    created: str = ""
    medscalpel_version: str = __version__
    schema_version: int = CARD_SCHEMA
    operating_point: OperatingPoint | None = None

    def __post_init__(self) -> None:
        op = self.operating_point
        if op is None:
            return
        if tuple(op.class_names) != tuple(self.class_names):
            raise CheckpointError(f"The operating point is of classes {list(op.class_names)[:4]} "
                                  f"but the model's are {list(self.class_names)[:4]}.")
        expected = task_of(self.task, len(self.class_names))
        if op.task != expected and not (expected == "binary" and op.task == "multiclass"):
            raise CheckpointError(f"A {op.task} operating point does not fit a {self.task} "
                                  f"model with {len(self.class_names)} classes ({expected}).")
        view = op.class_thresholds()
        if view is None:
            return
        if self.thresholds is None:
            object.__setattr__(self, "thresholds", tuple(view))
        elif len(self.thresholds) != len(view) or not all(
                abs(float(a) - float(b)) <= 1e-12 for a, b in zip(self.thresholds, view)):
            object.__setattr__(self, "operating_point", derive_operating_point(
                self.task, self.class_names, self.thresholds, self.lineage,
                note=f"the card's thresholds were changed after its operating point "
                     f"({op.method}) was set; this one is derived from the new thresholds"))

    def decision_point(self) -> OperatingPoint:
        """The operating point the model decides by: the stored one, else derived from the
        card's thresholds and lineage (the default 0.5 / argmax when it has none)."""
        if self.operating_point is not None:
            return self.operating_point
        return derive_operating_point(self.task, self.class_names, self.thresholds,
                                      self.lineage)

    def with_operating_point(self, op: OperatingPoint) -> "ModelCard":
        """A copy deciding by ``op`` (``thresholds`` set to its per-class view)."""
        view = op.class_thresholds()
        return replace(self, operating_point=op,
                       thresholds=tuple(view) if view is not None else self.thresholds)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.input)

    def effective_thresholds(self) -> list[float]:
        """Per-class decision thresholds (0.5 when none were calibrated)."""
        if self.thresholds is None:
            return [0.5] * len(self.class_names)
        return [float(t) for t in self.thresholds]

    def with_lineage(self, method: str, parent: str, **details: Any) -> "ModelCard":
        step = {"method": method, "parent": parent,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details}
        return replace(self, lineage=tuple(self.lineage) + (step,))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        d["thresholds"] = None if self.thresholds is None else list(self.thresholds)
        d["lineage"] = list(self.lineage)
        d["operating_point"] = None if self.operating_point is None \
            else self.operating_point.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = CARD) -> "ModelCard":
        missing = [k for k in ("arch", "class_names", "task", "input") if k not in d]
        if missing:
            raise CheckpointError(f"{source} lacks required field(s) {missing}; it was not written "
                                  "by medscalpel or is damaged.")
        if d.get("schema_version", 1) > CARD_SCHEMA:
            raise CheckpointError(f"{source} has schema version {d['schema_version']}, newer than "
                                  f"this medscalpel ({CARD_SCHEMA}); upgrade medscalpel.")
        _check_card_fields(d, source)
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["class_names"] = tuple(kw["class_names"])
        if kw.get("thresholds") is not None:
            kw["thresholds"] = tuple(float(t) for t in kw["thresholds"])
        kw["lineage"] = tuple(kw.get("lineage", ()))
        if kw.get("operating_point") is not None:
            try:
                kw["operating_point"] = OperatingPoint.from_dict(kw["operating_point"])
            except (KeyError, TypeError, ValueError, ModelError) as exc:
                raise CheckpointError(f"{source}: its operating_point cannot be read ({exc}); "
                                      "the card is damaged.") from exc
        return cls(**kw)


def _check_card_fields(d: dict[str, Any], source: str) -> None:
    """The fields a model is rebuilt from, with types that build it (a hand-edited card fails
    here with the field named, not later inside the model constructor)."""

    def bad(field: str, what: str, got: Any) -> CheckpointError:
        return CheckpointError(f"{source}: '{field}' must be {what}; got {got!r}. Fix the field "
                               "or re-save the model with medscalpel (save_model).")

    if not isinstance(d.get("arch"), str) or d["arch"] not in ARCHS:
        raise bad("arch", f"one of the zoo's architectures ({', '.join(ARCHS.names())})",
                  d.get("arch"))
    names = d.get("class_names")
    if not isinstance(names, (list, tuple)) or not names or \
            not all(isinstance(n, str) for n in names):
        raise bad("class_names", "a non-empty list of strings", names)
    if d.get("task") not in ("multilabel", "multiclass"):
        raise bad("task", "'multilabel' or 'multiclass'", d.get("task"))
    inp = d.get("input")
    if not isinstance(inp, dict):
        raise bad("input", "an object (size, channels, mean, std)", inp)
    for k in ("size", "channels"):
        v = inp.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad(f"input.{k}", "a positive integer", v)
    for k in ("mean", "std"):
        v = inp.get(k)
        if v is not None and not (isinstance(v, (int, float)) or (
                isinstance(v, list) and all(isinstance(x, (int, float)) for x in v))):
            raise bad(f"input.{k}", "a number or a list of numbers", v)
    th = d.get("thresholds")
    if th is not None and (not isinstance(th, list) or len(th) != len(names) or
                           not all(isinstance(t, (int, float)) for t in th)):
        raise bad("thresholds", f"null or {len(names)} numbers (one per class)", th)


def make_card(model: MedClassifier, class_names: list[str] | tuple[str, ...], task: str,
              preprocess: Preprocess, **kw: Any) -> ModelCard:
    if len(class_names) != model.num_classes:
        raise ModelError(f"The model has {model.num_classes} outputs but {len(class_names)} class "
                         "names were given.")
    return ModelCard(arch=model.arch, class_names=tuple(class_names), task=task,
                     input=preprocess.to_dict(), arch_kwargs=dict(model.arch_kwargs),
                     num_parameters=model.num_parameters(), **kw)


# ----------------------------------------------------------------------------- save
def save_model(model: MedClassifier, directory: str | os.PathLike,
               card: ModelCard | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` (atomically).

    Returns the directory. The card's ``model_id`` becomes a hash of the weights.
    """

    card = card or model.card
    if card is None:
        raise ModelError("save_model needs a ModelCard (model.card is not set).")
    check_finite(model, "save_model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = st_save(state, metadata={"format": "pt", "medscalpel": __version__})
    card = replace(card, model_id=weights_id(state), num_parameters=model.num_parameters(),
                   arch_kwargs=dict(model.arch_kwargs),
                   created=card.created or time.strftime("%Y-%m-%dT%H:%M:%S"))
    with atomic_path(directory / WEIGHTS) as tmp:
        tmp.write_bytes(blob)
    write_artifact_at(directory, _CARD_ARTIFACT, card)
    model.card = card
    return directory


def weights_id(state: dict[str, torch.Tensor]) -> str:
    """The ``model_id`` of a state dict: a hash of its tensors (sorted names, dtypes, shapes and
    bytes), so equal weights get equal ids. (Not the hash of the safetensors file: its header's
    metadata is written in a per-process hash order, so one state gave two different files.)"""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def check_finite(model: nn.Module, where: str) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ModelError(f"{where}: parameter '{name}' contains NaN or Inf values; the model is "
                             "broken (diverged training or a damaged file). Retrain or reload it.")


# ----------------------------------------------------------------------------- load
def _resolve(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        w, c = p / WEIGHTS, p / CARD
    elif p.name == CARD:
        w, c = p.with_name(WEIGHTS), p
    else:
        w, c = p, p.with_name(CARD)
    if not w.is_file():
        raise CheckpointError(f"No weights at {w}. Point to a medscalpel model directory "
                              f"(with {WEIGHTS} and {CARD}) or use 'medscalpel models import' for "
                              ".pt/.pth files.")
    if not c.is_file():
        raise CheckpointError(f"No model card at {c}: a medscalpel model directory holds "
                              f"{WEIGHTS} and {CARD} side by side.")
    return w, c


def load_model(path: str | os.PathLike, map_location: str = "cpu") -> MedClassifier:
    """Load a medscalpel model directory (or its ``model.json``/``model.safetensors``)."""

    w, c = _resolve(path)
    card = ModelCard.from_dict(read_json(c), source=str(c))
    try:
        state = load_file(str(w), device=map_location)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"Cannot read {w}: {exc}. The file is damaged or not safetensors."
                              ) from exc
    model = build_from_card(card)
    load_state_conformed(model, state, source=str(w))
    check_finite(model, str(w))
    model.card = card
    model.eval()
    return model


def build_from_card(card: ModelCard) -> MedClassifier:

    kw = dict(card.arch_kwargs)
    in_chans = int(kw.pop("in_chans", card.input.get("channels", 1)))
    img_size = int(kw.pop("img_size", card.input.get("size", 224)))
    for k in ("block_config", "widths", "cfg"):
        if k in kw and isinstance(kw[k], list):
            kw[k] = tuple(kw[k])
    return create_model(card.arch, num_classes=len(card.class_names), in_chans=in_chans,
                        img_size=img_size, **kw)


def load_state_conformed(model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> None:
    """Load ``state`` into ``model``, first resizing Conv/Linear/BatchNorm layers whose stored
    shapes differ (structured pruning, lossless folding) and adding biases the file has."""
    modules = dict(model.named_modules())
    for name, module in modules.items():
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            wk = prefix + "weight"
            if wk in state and tuple(state[wk].shape) != tuple(module.weight.shape):
                _resize_weighted(module, state[wk].shape)
            bk = prefix + "bias"
            if bk in state and module.bias is None:
                module.bias = nn.Parameter(torch.zeros(state[bk].shape))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            wk = prefix + "running_mean"
            if wk in state and state[wk].shape[0] != module.num_features:
                n = int(state[wk].shape[0])
                module.num_features = n
                for attr in ("weight", "bias"):
                    if getattr(module, attr) is not None:
                        setattr(module, attr, nn.Parameter(torch.empty(n)))
                module.running_mean = torch.zeros(n)
                module.running_var = torch.ones(n)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the weights do not fit architecture '{getattr(model, 'arch', '?')}': "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Check {CARD}'s 'arch'."
        )


def _resize_weighted(module: nn.Module, shape: torch.Size) -> None:
    shape = tuple(shape)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = shape
    else:
        depthwise = module.groups > 1 and module.groups == module.in_channels
        module.out_channels = shape[0]
        if depthwise:
            module.groups = shape[0]
            module.in_channels = shape[0]
        else:
            module.in_channels = shape[1] * module.groups
    module.weight = nn.Parameter(torch.empty(shape))
    if module.bias is not None:
        module.bias = nn.Parameter(torch.empty(shape[0]))


# ----------------------------------------------------------------------------- foreign files
_OLD_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def read_foreign_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pt/.pth/.pth.tar`` state dict without unpickling code."""

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}.")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as exc:
        msg = str(exc)
        if "weights_only" in msg or "Unsupported global" in msg or isinstance(
                exc, pickle.UnpicklingError):
            raise CheckpointError(
                f"{path} contains pickled Python objects beyond tensors (e.g. a whole model "
                "object or custom classes). medscalpel never unpickles code from user files. "
                "Re-save only the state dict: torch.save(model.state_dict(), 'weights.pt') in the "
                "environment that made it, or convert it to safetensors."
            ) from exc
        raise CheckpointError(f"Cannot read checkpoint {path}: {exc}") from exc
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (found "
                              f"{type(obj).__name__}).")
    return obj


def map_foreign_keys(state: dict[str, torch.Tensor], model: MedClassifier) -> dict[str, torch.Tensor]:
    """Map common key layouts onto medscalpel's: ``module.`` (DataParallel), CheXNet's
    ``densenet121.*`` with ``classifier.0``, torchvision's old DenseNet names (``norm.1``),
    torchvision model keys (``features.*``, ``conv1``, ``fc``, VGG ``classifier.N``), timm keys."""
    out: dict[str, torch.Tensor] = {}
    own = model.state_dict()
    head_keys = {"fc", "classifier", "classifier.0", "classifier.6", "head", "last_linear"}
    for k, v in state.items():
        k2 = k
        for pre in ("module.", "densenet121.", "model.", "backbone."):
            while k2.startswith(pre) and pre != "backbone.":
                k2 = k2[len(pre):]
        k2 = _OLD_DENSENET.sub(lambda m: m.group(1) + m.group(2), k2)
        base, _, leaf = k2.rpartition(".")
        if base in head_keys and leaf in ("weight", "bias"):
            out[f"classifier.{leaf}"] = v
            continue
        if model.arch == "vgg19_bn" and base in ("classifier.0", "classifier.3"):
            out[f"backbone.head.{base.split('.')[1]}.{leaf}"] = v
            continue
        for cand in (k2, f"backbone.{k2}", f"backbone.model.{k2}"):
            if cand in own:
                out[cand] = v
                break
        else:
            out[k2] = v
    return out


def foreign_input(path: str | os.PathLike) -> dict[str, Any]:
    """What a foreign checkpoint says about its input: ``channels`` (input channels of its first
    4-D convolution weight, or None), ``first_conv`` (that key) and ``size`` (from a ViT
    position embedding when there is one, else None: a CNN's weights do not fix the size)."""
    state = read_foreign_state_dict(path)
    first = next((k for k, v in state.items() if getattr(v, "ndim", 0) == 4), None)
    channels = int(state[first].shape[1]) if first is not None else None
    size = None
    pos = next((v for k, v in state.items() if k.endswith("pos_embed") and v.ndim == 3), None)
    patch = state.get(first) if first is not None else None
    if pos is not None and patch is not None:
        n = pos.shape[1] - 1  # the class token
        side = int(round(n ** 0.5))
        if side * side == n:
            size = side * int(patch.shape[-1])
    return {"channels": channels, "first_conv": first, "size": size}


def import_foreign(path: str | os.PathLike, arch: str, class_names: list[str], task: str,
                   preprocess: Preprocess, adapt_channels: bool = False,
                   **arch_kwargs: Any) -> MedClassifier:
    """Build ``arch`` and load a foreign state dict into it (keys mapped, shapes checked).

    A first convolution made for another number of input channels than
    ``preprocess.channels`` is refused unless ``adapt_channels`` (then 3 -> 1 sums the filters'
    channels and 1 -> 3 spreads them evenly, which changes what the model computes on colour
    input: say so where you use it)."""

    state = read_foreign_state_dict(path)
    model = create_model(arch, num_classes=len(class_names), in_chans=preprocess.channels,
                         img_size=preprocess.size, **arch_kwargs)
    mapped = map_foreign_keys(state, model)
    conv_keys = [k for k, v in mapped.items() if v.ndim == 4]
    if conv_keys:
        first = conv_keys[0]
        own = model.state_dict().get(first)
        if own is not None and own.shape[1] != mapped[first].shape[1]:
            if not adapt_channels:
                raise CheckpointError(
                    f"{path}: the first convolution ({first}) takes {mapped[first].shape[1]} "
                    f"input channel(s) but the model is built for {own.shape[1]}; pass "
                    f"--channels {mapped[first].shape[1]} (what the checkpoint was trained on), "
                    "or --adapt-channels to convert the filters explicitly.")
            w = mapped[first]
            mapped[first] = w.sum(1, keepdim=True) if own.shape[1] == 1 else w.mean(
                1, keepdim=True).repeat(1, own.shape[1], 1, 1)
    clf = mapped.get("classifier.weight")
    if clf is not None and clf.shape[0] != len(class_names):
        raise CheckpointError(f"{path}: the classifier has {clf.shape[0]} outputs but "
                              f"{len(class_names)} class names were given ({class_names[:4]}...).")
    own = model.state_dict()
    bad = [k for k, v in mapped.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{path}: tensor shapes differ from '{arch}' at {bad[:3]}; is it "
                              "the right architecture?")
    load_state_conformed(model, {k: v for k, v in mapped.items() if k in own} | {
        k: v for k, v in own.items() if k not in mapped and k.endswith("num_batches_tracked")},
        source=str(path))
    unknown = [k for k in mapped if k not in own]
    if unknown:
        raise CheckpointError(f"{path}: keys that fit no layer of '{arch}': {unknown[:5]}.")
    model.card = make_card(model, class_names, task, preprocess,
                           lineage=({"method": "import", "parent": str(path)},))
    model.eval()
    return model

