"""The plan of one ``deploy`` call: what it measures, on which images, with which settings.

:data:`DEFAULT_VARIANTS` and the torch fp32 :data:`REFERENCE`; the parameter checks
(:func:`_validate`) and the runtime / precision filters (:func:`_select`: an opt-in variant
joins when its own runtime or precision is named); the validated settings (:class:`_Plan`); the
evaluation, calibration and external images (:class:`_Inputs`, :func:`_collect`); and
:class:`_Variant`, the bookkeeping of one runtime being measured (status, no-go reasons,
timings, parity, comparisons, verdicts, re-certifications), filled in by
:mod:`~medscalpel.deploy.flow` and judged by :mod:`~medscalpel.deploy.decide`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medscalpel.data.base import split_warning
from medscalpel.deploy.runtimes import RUNTIMES, OpenVinoInt8AccuracyControl, Runtime
from medscalpel.engine.predict import collect_images
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError
from medscalpel.repair.conformal import Recertification
from medscalpel.validation import check_range

OWNER = "deploy"
#: every variant tried by default. Opt-in: ``openvino:int8-ac`` (re-validates many times) and
#: ``torch_compile:fp32`` (compiling densenet_tiny at 64 px took 77 s on this 2-core CPU).
DEFAULT_VARIANTS = ("torch:fp32", "torch_channels_last:fp32",
                    "onnxruntime:fp32", "onnxruntime:int8-u8s8", "onnxruntime:int8-s8s8",
                    "openvino:fp32", "openvino:bf16", "openvino:int8")
REFERENCE = "torch:fp32"


class _Variant:
    """A runtime being measured (mutable bookkeeping inside one ``deploy`` call)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.status = "go"
        self.reasons: list[str] = []
        self.times: dict[int, list[float]] = {}
        self.parity: tuple[float, float] | None = None
        self.comparison = None
        self.verdicts: dict[str, Any] = {}  # "internal" / "external": Verdict
        self.ext_comparison = None
        self.preds: Predictions | None = None        # its own logits on the evaluation images
        self.ext_preds: Predictions | None = None    # ... and on the external set
        self.recert: dict[str, Recertification] = {}  # "internal" / "external"
        self.prepare_s: float | None = None

    def fail(self, status: str, reason: str) -> None:
        self.status = status
        self.reasons.append(reason)


# ----------------------------------------------------------------------------- validate
def _validate(batches, rounds, repeats, warmup, n_images, n_calib, floor_macro, floor_class):
    if not batches:
        raise ConfigError(f"The 'batches' parameter of {OWNER} must not be empty.")
    for b in batches:
        check_range(b, "batches", OWNER, 1, integer=True)
    check_range(rounds, "rounds", OWNER, 1, integer=True)
    check_range(repeats, "repeats", OWNER, 1, integer=True)
    check_range(warmup, "warmup", OWNER, 0, integer=True)
    check_range(n_images, "n_images", OWNER, 2, integer=True)
    check_range(n_calib, "n_calib", OWNER, 1, integer=True)
    # a floor is a non-inferiority margin: a loss of at most |floor| (0 asks for no loss)
    check_range(floor_macro, "floor_macro", OWNER, -1.0, 0.0)
    check_range(floor_class, "floor_class", OWNER, -1.0, 0.0)


def _select(variants, runtimes, precisions, threads, extra_kwargs) -> list[Runtime]:
    """Registered names (filtered by runtime / precision) and Runtime instances, the torch
    fp32 reference first. Unknown names raise; an explicitly asked runtime whose extra is
    missing raises :class:`MissingExtraError`."""
    explicit = variants is not None or runtimes is not None
    names_or_rts = list(variants) if variants is not None else list(DEFAULT_VARIANTS)
    known_rt = {n.split(":")[0] for n in RUNTIMES.names()}
    known_pr = {n.split(":")[1] for n in RUNTIMES.names()}
    for r in runtimes or ():
        if r not in known_rt:
            raise ConfigError(f"Unknown runtime '{r}' for {OWNER}. Valid names: "
                              f"{', '.join(sorted(known_rt))}.")
    for p in precisions or ():
        if p not in known_pr:
            raise ConfigError(f"Unknown precision '{p}' for {OWNER}. Valid names: "
                              f"{', '.join(sorted(known_pr))}.")
    if variants is None:  # an opt-in variant joins when its own runtime / precision is named
        default_pr = {n.split(":")[1] for n in DEFAULT_VARIANTS}
        names_or_rts += [n for n in RUNTIMES.names() if n not in DEFAULT_VARIANTS and (
            n.split(":")[0] in (runtimes or ())
            or (n.split(":")[1] in (precisions or ()) and n.split(":")[1] not in default_pr))]
    if runtimes is not None:
        names_or_rts = [n for n in names_or_rts if not isinstance(n, str)
                        or n.split(":")[0] in runtimes]
    if precisions is not None:  # 'int8' names its family: int8, int8-u8s8, int8-s8s8
        names_or_rts = [n for n in names_or_rts if not isinstance(n, str)
                        or any(n.split(":")[1] == p or n.split(":")[1].startswith(p + "-")
                               for p in precisions)]
    out: list[Runtime] = []
    for item in names_or_rts:
        if isinstance(item, Runtime):
            out.append(item)
            continue
        RUNTIMES.get(item)  # unknown names list the valid ones
        kw = extra_kwargs if item == OpenVinoInt8AccuracyControl.runtime + ":" + \
            OpenVinoInt8AccuracyControl.precision else {}
        rt = RUNTIMES.create(item, threads=threads, **kw)
        rt._explicit = explicit  # type: ignore[attr-defined]
        out.append(rt)
    if not any(r.name == REFERENCE for r in out):
        out.insert(0, RUNTIMES.create(REFERENCE, threads=threads))
    out.sort(key=lambda r: r.name != REFERENCE)
    seen: set[str] = set()
    for r in out:
        if r.name in seen:
            raise ConfigError(f"{OWNER}: variant '{r.name}' is listed twice.")
        seen.add(r.name)
    return out


@dataclass(frozen=True)
class _Plan:
    """The validated settings of one ``deploy`` call (its keyword arguments, ``batches`` as
    ints and ``threads`` resolved)."""

    variants: Sequence[str | Runtime] | None
    runtimes: Sequence[str] | None
    precisions: Sequence[str] | None
    batches: tuple[int, ...]
    rounds: int
    repeats: int
    warmup: int
    threads: int
    n_boot: int
    seed: int
    progress: bool | None
    floor_macro: float
    floor_class: float
    accept_unscorable: bool | Sequence[str]
    min_positives: int
    require_guarantee: bool


@dataclass(frozen=True)
class _Inputs:
    """The images one ``deploy`` call measures on: evaluation, int8 calibration and (when
    given) external, with the dataset indices they came from."""

    shape: tuple[int, int, int]
    images: torch.Tensor
    idx: list[int]
    calib_src: Any
    calib: torch.Tensor
    cidx: list[int]
    external_data: Any = None
    ext_images: torch.Tensor | None = None
    ext_idx: list[int] | None = None


def _input_shape(model: nn.Module, data) -> tuple[int, int, int]:
    card = getattr(model, "card", None)
    if card is not None and card.input.get("size"):
        return (int(card.input.get("channels", 1)), int(card.input["size"]),
                int(card.input["size"]))
    return tuple(data.image(0).shape)  # type: ignore[return-value]


def _collect(model: nn.Module, data, calib_data, external_data, n_images: int, n_calib: int,
             seed: int) -> _Inputs:
    """The seeded evaluation, calibration (``calib_data``, else ``data``) and external images;
    an external set with other classes is refused."""
    shape = _input_shape(model, data)
    images, idx = collect_images(data, n_images, seed=seed)
    calib_src = calib_data if calib_data is not None else data
    calib, cidx = collect_images(calib_src, n_calib, seed=seed + 1)
    if external_data is None:
        return _Inputs(shape, images, idx, calib_src, calib, cidx)
    if list(external_data.class_names) != list(data.class_names):
        raise ConfigError(f"{OWNER}: the external set's classes {list(external_data.class_names)}"
                          f" differ from the evaluation set's {list(data.class_names)}; map "
                          "them first (see 'medscalpel evaluate --external').")
    ext_images, ext_idx = collect_images(external_data, n_images, seed=seed + 2)
    return _Inputs(shape, images, idx, calib_src, calib, cidx, external_data, ext_images,
                   ext_idx)


def _notes(data, notes: Sequence[str], accept_unscorable, calib_data) -> list[str]:
    """The result's notes: the split warning, the caller's notes, what was accepted unchecked
    and a leaky calibration source."""
    out = [n for n in (split_warning(data), *notes) if n]
    if accept_unscorable:
        out.append("classes with too few positive or negative evaluation images were accepted "
                   "unchecked (accept_unscorable): each verdict names them")
    if calib_data is None:
        out.append("int8 calibration images came from the evaluation split (leaky): pass "
                   "calib_data (the training split)")
    return out


__all__ = ["DEFAULT_VARIANTS", "OWNER", "REFERENCE"]
