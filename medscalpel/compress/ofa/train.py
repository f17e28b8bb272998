"""Progressive shrinking of an :class:`~medscalpel.compress.ofa.supernet.OFASupernet` with
knowledge distillation from a medscalpel teacher (Cai et al. 2020, section 3.2).

Phases, in order (each continues from the weights the previous one ended with):

1. ``largest``: the full network (largest kernel, depth and width) only;
2. ``kernel``: every step a random kernel size per block (depth and width at maximum);
3. ``depth``: random kernels and a random depth per stage;
4. ``width``: the middle channels are first sorted by importance, then random kernels, depths
   and expand ratios.

Every step trains one random subnet of the phase's space against the frozen teacher with the one
distillation loss of medscalpel (:class:`~medscalpel.compress.distill.DistillLoss`: ground truth
and the teacher's soft targets). The loop is the engine's (:func:`~medscalpel.engine.train.
run_epochs`): AdamW, warm-up/cosine schedule, per-epoch validation (macro AUROC of the FULL
network on the validation split), per-epoch checkpoints. Each phase keeps its own checkpoint
folder (``<checkpoint_dir>/<phase>``), so an interrupted training resumes at the last finished
epoch of the phase it was in; finished phases are read back, not retrained. A phase ends with its
LAST weights (early stopping would favour the full network over the small subnets). At the end
of each phase the smallest and the largest subnet are evaluated on the validation split after
BatchNorm re-calibration (logged and kept in the history).

Example:
    >>> res = train_supernet(teacher, train_ds, val_ds,
    ...                      OFATrainConfig(phase_epochs=(2, 1, 1, 1)))  # doctest: +SKIP
    >>> res.supernet.set_active(res.supernet.space.min_config())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medscalpel.compress.distill import DistillLoss, TeacherObjective, resolve_model
from medscalpel.compress.ofa.supernet import (OFASpace, OFASupernet, SubnetConfig, SupernetInfo,
                                              extract_subnet, recalibrate_bn)
from medscalpel.data.base import CXRDataset
from medscalpel.engine.device import resolve_device
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import check_compatible, collect_images, predict
from medscalpel.engine.train import TrainConfig, run_epochs, seed_everything, train_identity
from medscalpel.errors import CheckpointError, ConfigError, ModelError
from medscalpel.models.classifier import MedClassifier
from medscalpel.runs import atomic_path, read_json, write_json
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

PHASES = ("largest", "kernel", "depth", "width")
#: which elastic dimensions (kernel, depth, width) each phase samples
PHASE_DIMS = {"largest": (False, False, False), "kernel": (True, False, False),
              "depth": (True, True, False), "width": (True, True, True)}
WEIGHTS = "supernet.safetensors"
INFO = "supernet.json"


@dataclass
class OFATrainConfig:
    """Settings of :func:`train_supernet`.

    Attributes:
        space: the supernet's elastic space and skeleton.
        phase_epochs: epochs of the phases ``largest, kernel, depth, width`` (the largest >= 1;
            0 skips a shrinking phase, e.g. ``(3, 0, 0, 0)`` trains only the full network).
        lr: learning rate of the largest phase; shrink_lr: of the shrinking phases (lower, as
            in OFA, so that the full network is not forgotten).
        soft_weight, temperature: the distillation loss (see DistillLoss).
        bn_images: training images for the BatchNorm re-calibration of evaluated subnets.
    """

    space: OFASpace = field(default_factory=OFASpace)
    phase_epochs: tuple[int, int, int, int] = (4, 2, 2, 2)
    lr: float = 3e-3
    shrink_lr: float = 1.5e-3
    batch_size: int = 32
    soft_weight: float = 0.5
    temperature: float = 4.0
    seed: int = 0
    max_steps_per_epoch: int | None = None
    bn_images: int = 256
    device: str = "auto"

    def validate(self) -> "OFATrainConfig":
        o = "OFATrainConfig"
        pe = tuple(int(e) for e in self.phase_epochs)
        if len(pe) != len(PHASES) or pe[0] < 1 or min(pe) < 0:
            raise ConfigError(f"The 'phase_epochs' parameter of {o} must give the epochs of "
                              f"{PHASES} (largest >= 1, others >= 0). Got "
                              f"{self.phase_epochs!r} instead.")
        self.phase_epochs = pe  # type: ignore[assignment]
        check_range(self.lr, "lr", o, 0, low_inclusive=False)
        check_range(self.shrink_lr, "shrink_lr", o, 0, low_inclusive=False)
        check_range(self.batch_size, "batch_size", o, 1, integer=True)
        check_range(self.soft_weight, "soft_weight", o, 0.0, 1.0)
        check_range(self.temperature, "temperature", o, 0.0, low_inclusive=False)
        check_range(self.bn_images, "bn_images", o, 1, integer=True)
        if self.max_steps_per_epoch is not None:
            check_range(self.max_steps_per_epoch, "max_steps_per_epoch", o, 1, integer=True)
        return self

    @property
    def total_epochs(self) -> int:
        return int(sum(self.phase_epochs))

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.space.to_dict(), "phase_epochs": list(self.phase_epochs),
                "lr": self.lr, "shrink_lr": self.shrink_lr, "batch_size": self.batch_size,
                "soft_weight": self.soft_weight, "temperature": self.temperature,
                "seed": self.seed, "max_steps_per_epoch": self.max_steps_per_epoch,
                "bn_images": self.bn_images, "device": self.device}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OFATrainConfig":
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["space"] = OFASpace.from_dict(d["space"])
        kw["phase_epochs"] = tuple(d["phase_epochs"])
        return cls(**kw).validate()

    def phase_train_config(self, phase: str) -> TrainConfig:
        """The engine's settings for one phase (no early stopping: patience = epochs)."""
        i = PHASES.index(phase)
        epochs = self.phase_epochs[i]
        return TrainConfig(epochs=epochs, batch_size=self.batch_size,
                           lr=self.lr if phase == "largest" else self.shrink_lr,
                           warmup_epochs=0.5 if phase == "largest" else 0.0, patience=epochs,
                           seed=self.seed + i, device=self.device,
                           max_steps_per_epoch=self.max_steps_per_epoch).validate()


class _PhaseSampler(nn.Module):
    """What the engine's batches go through: in training mode each forward first activates a
    random subnet of the phase's space (numpy's global generator, which the engine seeds per
    epoch: resumed runs sample alike), then restores the full network (so validation and
    checkpoints see the full network; the backward pass uses the graph already built)."""

    def __init__(self, supernet: OFASupernet, dims: tuple[bool, bool, bool]):
        super().__init__()
        self.supernet = supernet
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.supernet
        if not self.training or not any(self.dims):
            return net(x)
        k, d, w = self.dims
        net.set_active(net.space.sample(np.random, kernel=k, depth=d, width=w))
        try:
            return net(x)
        finally:
            net.set_active(net.space.max_config())


@dataclass
class SupernetTrainResult:
    """The trained supernet (full network active, eval mode, CPU) and how it was trained."""

    supernet: OFASupernet
    history: dict[str, Any]
    seconds: float
    config: OFATrainConfig
    teacher_id: str

    def info(self) -> SupernetInfo:
        s = self.supernet
        return SupernetInfo(supernet_id=s.fingerprint(), space=s.space.to_dict(),
                            num_classes=s.num_classes, in_chans=s.in_chans, img_size=s.img_size,
                            parameters=s.num_parameters(),
                            history={"phases": self.history, "seconds": self.seconds,
                                     "config": self.config.to_dict(),
                                     "teacher_id": self.teacher_id})


def teacher_id(teacher: MedClassifier) -> str:
    card = getattr(teacher, "card", None)
    return card.model_id if card is not None and card.model_id else teacher.arch


def subnet_val_auroc(supernet: OFASupernet, cfg: SubnetConfig, bn_images: torch.Tensor,
                     val_ds: CXRDataset) -> tuple[float, MedClassifier]:
    """Validation macro AUROC of subnet ``cfg`` (extracted, BatchNorm re-calibrated on
    ``bn_images``) and that subnet."""
    sub = recalibrate_bn(extract_subnet(supernet, cfg), bn_images)
    ev = evaluate(predict(sub, val_ds, progress=False), n_boot=0)
    return float(ev.macro["auroc"]), sub


def _run_phase(net: OFASupernet, phase: str, cfg: OFATrainConfig, objective: TeacherObjective,
               train_ds: CXRDataset, val_ds: CXRDataset | None, dev: torch.device,
               ck: Path | None, t_id: str, progress: bool | None) -> dict[str, Any]:
    tcfg = cfg.phase_train_config(phase)
    identity = train_identity(net, train_ds, val_ds, tcfg, phase=phase,
                              space=cfg.space.to_dict(), teacher=t_id,
                              distill={"soft_weight": cfg.soft_weight,
                                       "temperature": cfg.temperature})
    sampler = _PhaseSampler(net, PHASE_DIMS[phase])
    net.to(dev)
    out = run_epochs(net, sampler, list(net.parameters()), train_ds, val_ds, tcfg, objective,
                     dev, ck / phase if ck else None, identity, progress=progress)
    net.set_active(net.space.max_config())
    net.eval().cpu()
    return {"epochs": tcfg.epochs, "lr": tcfg.lr, "history": out.history,
            "resumed_from_epoch": out.start_epoch, "seconds": out.seconds}


def train_supernet(teacher: MedClassifier | str | os.PathLike, train_ds: CXRDataset,
                   val_ds: CXRDataset | None, config: OFATrainConfig | None = None,
                   checkpoint_dir: str | os.PathLike | None = None,
                   progress: bool | None = None) -> SupernetTrainResult:
    """Train a supernet for ``train_ds`` by progressive shrinking, distilled from ``teacher``.

    Args:
        teacher: a trained :class:`MedClassifier` or model directory (left unchanged).
        train_ds, val_ds: the training data and the (patient-wise) validation split; the latter
            is monitored per epoch and scores the smallest / largest subnet after each phase.
        config: see :class:`OFATrainConfig`.
        checkpoint_dir: per-phase, per-epoch state; running again with the same folder resumes.

    Returns:
        A :class:`SupernetTrainResult` (``info()`` gives the supernet id for lineage).

    Raises:
        ModelError: the teacher does not fit the data or is not a trained model.
        ConfigError: invalid settings.
    """
    cfg = (config or OFATrainConfig()).validate()
    t_model = resolve_teacher(teacher, train_ds)
    t_id = teacher_id(t_model)
    seed_everything(cfg.seed)
    pre = train_ds.preprocess
    net = OFASupernet(cfg.space, train_ds.num_classes, pre.channels, pre.size)
    dev = resolve_device(cfg.device)
    ck = Path(checkpoint_dir) if checkpoint_dir else None
    bn_images = collect_images(train_ds, min(cfg.bn_images, len(train_ds)), seed=cfg.seed)[0] \
        if val_ds is not None else None
    loss = DistillLoss(cfg.soft_weight, cfg.temperature, train_ds.task)
    history: dict[str, Any] = {}
    t0 = time.perf_counter()
    with TeacherObjective(copy.deepcopy(t_model), net, loss) as objective:
        for phase, epochs in zip(PHASES, cfg.phase_epochs):
            if epochs == 0:
                history[phase] = {"epochs": 0, "skipped": True}
                continue
            if phase == "width":
                net.sort_channels()  # the phase's checkpoint (if any) overwrites these weights
            logger.info("supernet phase %s: %d epoch(s)", phase, epochs)
            history[phase] = _run_phase(net, phase, cfg, objective, train_ds, val_ds, dev, ck,
                                        t_id, progress)
            if val_ds is not None:
                for name, sub_cfg in (("min", cfg.space.min_config()),
                                      ("max", cfg.space.max_config())):
                    history[phase][f"val_auroc_{name}_subnet"] = subnet_val_auroc(
                        net, sub_cfg, bn_images, val_ds)[0]
            logger.info("supernet phase %s done: %s", phase,
                        {k: v for k, v in history[phase].items() if k != "history"})
    net.set_active(cfg.space.max_config())
    net.eval().cpu()
    return SupernetTrainResult(net, history, round(time.perf_counter() - t0, 2), cfg, t_id)


def resolve_teacher(teacher: MedClassifier | str | os.PathLike, train_ds: CXRDataset
                    ) -> MedClassifier:
    """A copy of a trained teacher (model or model directory) that fits ``train_ds``."""
    if isinstance(teacher, str) and not Path(teacher).exists():
        raise ModelError(f"train_supernet needs a TRAINED teacher (a MedClassifier or a model "
                         f"directory); got {teacher!r}. Train it first (medscalpel train, or "
                         "compress distill --teacher ARCH, which trains it).")
    t_model = resolve_model(teacher, train_ds, "teacher")
    try:
        check_compatible(t_model, train_ds)
    except ModelError as exc:
        raise ModelError(f"The teacher ({t_model.arch}) does not fit the data: {exc}") from exc
    return t_model


# ----------------------------------------------------------------------------- save / load
def save_supernet(result: SupernetTrainResult, directory: str | os.PathLike) -> Path:
    """``supernet.safetensors`` + ``supernet.json`` (:class:`SupernetInfo`) in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in result.supernet.state_dict().items()}
    with atomic_path(d / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(d / INFO, result.info().to_dict())
    return d


def load_supernet(directory: str | os.PathLike) -> tuple[OFASupernet, SupernetInfo]:
    """A supernet saved by :func:`save_supernet` (full network active, eval mode)."""
    d = Path(directory)
    if not (d / INFO).is_file() or not (d / WEIGHTS).is_file():
        raise CheckpointError(f"{d} is not a saved supernet ({INFO} + {WEIGHTS}).")
    info = SupernetInfo.from_dict(read_json(d / INFO))
    net = OFASupernet(OFASpace.from_dict(info.space), info.num_classes, info.in_chans,
                      info.img_size)
    try:
        net.load_state_dict(load_file(str(d / WEIGHTS)))
    except RuntimeError as exc:
        raise CheckpointError(f"{d / WEIGHTS} does not match {d / INFO}: {exc}") from exc
    net.eval()
    return net, info


__all__ = ["OFATrainConfig", "PHASES", "PHASE_DIMS", "SupernetTrainResult", "load_supernet",
           "resolve_teacher",
           "save_supernet", "subnet_val_auroc", "teacher_id", "train_supernet"]
