"""Training: multi-label BCE (optional pos_weight) or multi-class CE; AdamW with a cosine
schedule and linear warm-up; early stopping on validation macro AUROC with the best weights
kept; deterministic seeding; resume from the last finished epoch; AMP on GPU.

One epoch loop (:func:`run_epochs`) serves :func:`train` (one process) and
:func:`medscalpel.engine.distributed.train_ddp` (DistributedDataParallel), which supplies only
its :class:`TrainHooks` (its shard of each global batch, all-reduced loss weights, the stop
broadcast)."""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medscalpel.data.base import CXRDataset
from medscalpel.data.labels import require_known_labels
from medscalpel.engine.device import resolve_device
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import check_compatible, make_loader, predict
from medscalpel.errors import ConfigError, RunError
from medscalpel.models.classifier import MedClassifier
from medscalpel.progress import LiveStatus
from medscalpel.runs import atomic_path, read_json, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

#: loss_fn(logits, targets, images) -> scalar loss (e.g. distillation)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainConfig:
    """Training settings (saved in the model card and the run manifest)."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    patience: int = 3
    pos_weight: str = "none"  # none | balanced (neg/pos per class, capped at 10)
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    amp: bool = True  # only on CUDA
    max_steps_per_epoch: int | None = None
    grad_clip: float | None = 5.0
    monitor: str = "auroc"  # validation macro metric for early stopping: auroc | ap | loss
    trainable: str = "all"  # all | classifier

    def validate(self) -> "TrainConfig":
        o = "TrainConfig"
        check_range(self.epochs, "epochs", o, 1, integer=True)
        check_range(self.batch_size, "batch_size", o, 1, integer=True)
        check_range(self.lr, "lr", o, 0, low_inclusive=False)
        check_range(self.weight_decay, "weight_decay", o, 0)
        check_range(self.warmup_epochs, "warmup_epochs", o, 0)
        check_range(self.patience, "patience", o, 1, integer=True)
        check_in(self.pos_weight, "pos_weight", o, ("none", "balanced"))
        check_in(self.monitor, "monitor", o, ("auroc", "ap", "loss"))
        check_in(self.trainable, "trainable", o, ("all", "classifier"))
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """History and outcome of a training run; ``model`` holds the best weights."""

    model: MedClassifier
    history: list[dict[str, Any]]
    best_epoch: int
    best_metric: float
    seconds: float
    config: TrainConfig
    trainable_params: int
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best_epoch": self.best_epoch,
                "best_metric": self.best_metric, "seconds": self.seconds,
                "config": self.config.to_dict(), "trainable_params": self.trainable_params,
                "resumed_from": self.resumed_from, **self.extra}


def seed_everything(seed: int) -> None:

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _pos_weight(dataset: CXRDataset, how: str) -> torch.Tensor | None:
    if how == "none" or dataset.task != "multilabel":
        return None
    y = dataset.labels
    pos = np.nansum(y, 0)
    neg = np.sum(np.isfinite(y), 0) - pos
    w = np.clip(neg / np.maximum(pos, 1), 1.0, 10.0)
    return torch.tensor(w, dtype=torch.float32)


def default_loss(task: str, pos_weight: torch.Tensor | None) -> LossFn:
    if task == "multilabel":
        bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")

        def loss(logits, targets, images):
            known = torch.isfinite(targets)
            t = torch.where(known, targets, torch.zeros_like(targets))
            per = bce(logits, t) * known
            return per.sum() / known.sum().clamp(min=1)

        return loss
    ce = nn.CrossEntropyLoss()
    return lambda logits, targets, images: ce(logits, targets)


def _set_trainable(model: MedClassifier, which: str) -> int:
    for p in model.parameters():
        p.requires_grad_(which == "all")
    if which == "classifier":
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _Checkpointer:
    """Per-epoch state for resume: weights (safetensors) + optimiser/scheduler (weights_only).

    State is read from and written to ``directory`` (inside the run's private ``.partial``
    folder while a command runs: an interrupted run keeps it there and the next identical run
    adopts that folder, see :class:`~medscalpel.runs.RunDir`). Each epoch's files carry the
    epoch in their names and ``state.json`` (written last, atomically) names them, so a kill at
    any moment leaves a consistent last finished epoch.
    """

    def __init__(self, directory: Path | None):
        self.dir = directory
        self.write_dir = directory

    def save(self, epoch: int, model, best_state, opt, sched, history, best_epoch, best_metric,
             bad_epochs, identity: dict[str, Any]) -> None:
        if self.write_dir is None:
            return

        d = self.write_dir
        d.mkdir(parents=True, exist_ok=True)
        files = {"last": f"last.e{epoch}.safetensors", "best": f"best.e{epoch}.safetensors",
                 "optim": f"optim.e{epoch}.pt"}
        with atomic_path(d / files["last"]) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(tmp))
        with atomic_path(d / files["best"]) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in best_state.items()}, str(tmp))
        with atomic_path(d / files["optim"]) as tmp:
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp)
        write_json(d / "state.json", {"epoch": epoch, "files": files, "history": history,
                                      "best_epoch": best_epoch, "best_metric": best_metric,
                                      "bad_epochs": bad_epochs, "identity": identity})
        keep = set(files.values())
        for f in d.glob("*.e*.*"):
            if f.name not in keep and f.suffix in (".safetensors", ".pt"):
                f.unlink(missing_ok=True)

    def restore(self, identity: dict[str, Any], model: nn.Module, opt, sched):
        """Load the last finished epoch into ``model``/``opt``/``sched`` (when there is one) and
        return ``(history, best_state, best_metric, best_epoch, bad_epochs, start_epoch)``."""
        resumed = self.load(identity)
        if resumed is None:
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return [], best, -math.inf, -1, 0, 0
        state, last_w, best_w, optim = resumed
        model.load_state_dict(last_w)
        opt.load_state_dict(optim["opt"])
        sched.load_state_dict(optim["sched"])
        best_metric = state["best_metric"] if state["best_metric"] is not None else -math.inf
        return (state["history"], best_w, best_metric, state["best_epoch"], state["bad_epochs"],
                state["epoch"] + 1)

    def load(self, identity: dict[str, Any]):
        if self.dir is None or not (self.dir / "state.json").is_file():
            return None

        state = read_json(self.dir / "state.json")
        if state.get("identity") != identity:
            raise RunError(f"Cannot resume training from {self.dir}: it was started with a different "
                           "model, dataset or configuration. Use a new output directory.")
        files = state.get("files")
        if not isinstance(files, dict):
            raise RunError(f"Cannot resume training from {self.dir}: its state.json was written "
                           "by an older medscalpel. Delete that folder to start over.")
        return (state, load_file(str(self.dir / files["last"])),
                load_file(str(self.dir / files["best"])),
                torch.load(self.dir / files["optim"], map_location="cpu", weights_only=True))


def lr_lambda_for(cfg: TrainConfig, n_train: int) -> tuple[Callable[[int], float], int]:
    """The learning-rate schedule (linear warm-up, then cosine over every step) and the steps
    per epoch (``ceil(n / batch_size)``, capped by ``max_steps_per_epoch``)."""
    steps = math.ceil(n_train / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    total = max(1, steps * cfg.epochs)
    warm = int(round(cfg.warmup_epochs * steps))

    def lr_lambda(step: int) -> float:
        if step < warm:
            return (step + 1) / max(1, warm)
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return lr_lambda, steps


def train_identity(model: MedClassifier, train_ds: CXRDataset, val_ds: CXRDataset | None,
                   cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote its checkpoint (the epoch count
    included: the schedule depends on it)."""
    return {"arch": model.arch, "params": model.num_parameters(),
            "train": train_ds.content_hash(),
            "val": val_ds.content_hash() if val_ds is not None else None,
            "config": {k: v for k, v in cfg.to_dict().items()
                       if k not in ("device", "num_workers")}, **extra}


class TrainHooks:
    """How a run plugs into the one epoch loop (:func:`run_epochs`). The defaults are one
    process; :mod:`medscalpel.engine.distributed` overrides the batches (its shard of each
    global batch), the loss weight and reduction (all-reduce), the backward scale and the
    stop decision (broadcast from rank 0)."""

    #: this process validates, keeps the history and writes checkpoints
    is_main: bool = True
    #: multiplies the loss before ``backward`` (DDP averages gradients over the ranks)
    backward_scale: float = 1.0

    def batches(self, train_ds: CXRDataset, cfg: TrainConfig, epoch: int,
                steps_per_epoch: int) -> tuple[Any, int]:
        """The epoch's ``(x, y)`` batches and how many steps of them to take."""
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        loader = make_loader(train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                             generator=gen, drop_last=len(train_ds) > cfg.batch_size)
        return loader, steps_per_epoch

    def train_mode(self, net: nn.Module, model: MedClassifier, cfg: TrainConfig) -> None:
        net.train()
        if cfg.trainable == "classifier":
            model.backbone.eval()  # frozen BN statistics

    def loss_weight(self, targets: torch.Tensor) -> torch.Tensor | float:
        """Weight of this process's mean loss in the step's loss."""
        return 1.0

    def step_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss as reported (and checked for divergence) from this process's."""
        return loss

    def stop(self, stop: bool) -> bool:
        """Whether every process stops now, from the main process's decision."""
        return stop

    def label(self, epoch: int, cfg: TrainConfig) -> str:
        return f"epoch {epoch + 1}/{cfg.epochs}"

    def show_progress(self, progress: bool | None) -> bool | None:
        return progress


@dataclass
class EpochsOutcome:
    """What :func:`run_epochs` ends with (``best_state`` and ``history`` on the main process)."""

    history: list[dict[str, Any]]
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_metric: float
    start_epoch: int
    seconds: float
    step_losses: list[list[float]]


def _validate(model: MedClassifier, val_ds: CXRDataset, cfg: TrainConfig, dev) -> dict[str, Any]:
    vp = predict(model, val_ds, batch_size=max(cfg.batch_size, 64), device=dev, progress=False)
    ev = evaluate(vp, n_boot=0)
    with torch.no_grad():
        vl = default_loss(val_ds.task, None)(torch.from_numpy(vp.logits),
                                             torch.from_numpy(vp.labels), None)
    return {"val_auroc": ev.macro["auroc"], "val_ap": ev.macro["ap"], "val_loss": float(vl)}


def _train_steps(net: nn.Module, params: list[nn.Parameter], batches: Any, n_steps: int,
                 loss_f: LossFn, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler,
                 hooks: TrainHooks, cfg: TrainConfig, dev: torch.device, use_amp: bool,
                 epoch: int, bar: LiveStatus) -> list[float]:
    """One epoch's optimiser steps (at most ``n_steps`` batches); returns the reported loss of
    each step.

    Raises:
        ConfigError: the loss is not finite (training diverged).
    """
    losses: list[float] = []
    for step, (x, y) in enumerate(batches):
        if step >= n_steps:
            break
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        weight = hooks.loss_weight(y)
        with torch.autocast(dev.type, enabled=use_amp):
            logits = net(x)
            loss = loss_f(logits.float(), y, x) * weight
        reported = hooks.step_loss(loss.detach().clone())
        if not torch.isfinite(reported):
            raise ConfigError(f"Training diverged at epoch {epoch + 1}, step {step}: the "
                              "loss is not finite. Lower --lr or check the data.")
        opt.zero_grad(set_to_none=True)
        scale = hooks.backward_scale
        scaler.scale(loss * scale if scale != 1 else loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(float(reported))
        bar.advance(info=f"loss {np.mean(losses[-50:]):.4f}")
    return losses


def _epoch_record(model: MedClassifier, val_ds: CXRDataset | None, cfg: TrainConfig,
                  dev: torch.device, epoch: int, losses: list[float],
                  sched: torch.optim.lr_scheduler.LambdaLR, te: float
                  ) -> tuple[dict[str, Any], float]:
    """The history record of a finished epoch (train loss, lr, validation metrics, seconds
    since ``te``) and the value early stopping monitors (higher is better: ``cfg.monitor``,
    minus the validation loss when that is not finite, minus the train loss without
    validation)."""
    rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                           "lr": float(sched.get_last_lr()[0])}
    metric = -rec["train_loss"]
    if val_ds is not None:
        rec.update(_validate(model, val_ds, cfg, dev))
        metric = {"auroc": rec["val_auroc"], "ap": rec["val_ap"],
                  "loss": -rec["val_loss"]}[cfg.monitor]
        if not np.isfinite(metric):
            metric = -rec["val_loss"]
    rec["seconds"] = round(time.perf_counter() - te, 2)
    return rec, metric


def run_epochs(model: MedClassifier, net: nn.Module, params: list[nn.Parameter],
               train_ds: CXRDataset, val_ds: CXRDataset | None, cfg: TrainConfig,
               loss_f: LossFn, dev: torch.device, checkpoint_dir: str | os.PathLike | None,
               identity: dict[str, Any], hooks: TrainHooks | None = None,
               progress: bool | None = None, use_amp: bool = False) -> EpochsOutcome:
    """The one training loop of :func:`train` and
    :func:`~medscalpel.engine.distributed.train_ddp`: AdamW + warm-up/cosine schedule, resume
    from the last finished epoch, per-epoch validation, early stopping on ``cfg.monitor`` with
    the best weights kept, per-epoch checkpoints in ``checkpoint_dir``.

    Args:
        model: the model (its state is what is checkpointed and validated).
        net: what the batches go through (``model`` itself, or its DDP wrapper).
        params: the parameters the optimiser updates.
        loss_f: ``loss_f(logits, targets, images)``: this process's mean loss.
        identity: what a resumed run must share with the checkpoint (:func:`train_identity`).
        hooks: the data-parallel pieces (default: one process).
    """
    hooks = hooks or TrainHooks()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_lambda, steps_per_epoch = lr_lambda_for(cfg, len(train_ds))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ckpt = _Checkpointer(Path(checkpoint_dir) if checkpoint_dir else None)
    (history, best_state, best_metric, best_epoch, bad_epochs,
     start_epoch) = ckpt.restore(identity, model, opt, sched)
    if start_epoch:
        logger.info("resuming training at epoch %d", start_epoch)
    t0 = time.perf_counter()
    stopped = bad_epochs >= cfg.patience
    step_losses: list[list[float]] = []
    for epoch in range(start_epoch, cfg.epochs):
        if stopped:
            break
        te = time.perf_counter()
        seed_everything(cfg.seed * 1000 + epoch)
        batches, n_steps = hooks.batches(train_ds, cfg, epoch, steps_per_epoch)
        hooks.train_mode(net, model, cfg)
        with LiveStatus(hooks.label(epoch, cfg), n_steps, hooks.show_progress(progress)) as bar:
            losses = _train_steps(net, params, batches, n_steps, loss_f, opt, sched, scaler,
                                  hooks, cfg, dev, use_amp, epoch, bar)
        step_losses.append(losses)
        stop = False
        if hooks.is_main:
            rec, metric = _epoch_record(model, val_ds, cfg, dev, epoch, losses, sched, te)
            history.append(rec)
            logger.info("epoch %s", rec)
            if metric > best_metric:
                best_metric, best_epoch, bad_epochs = float(metric), epoch + 1, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
            ckpt.save(epoch, model, best_state, opt, sched, history, best_epoch, best_metric,
                      bad_epochs, identity)
            stop = bad_epochs >= cfg.patience
        stopped = hooks.stop(stop)
    return EpochsOutcome(history, best_state, best_epoch, float(best_metric), start_epoch,
                         round(time.perf_counter() - t0, 2), step_losses)


def train(
    model: MedClassifier,
    train_ds: CXRDataset,
    val_ds: CXRDataset | None = None,
    config: TrainConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    loss_fn: LossFn | None = None,
    progress: bool | None = None,
    inplace: bool = False,
) -> TrainResult:
    """Train ``model`` on ``train_ds``; early-stop on ``val_ds`` macro AUROC.

    Args:
        checkpoint_dir: where per-epoch state is kept; rerunning with the same directory resumes
            after the last finished epoch (and refuses a different model/data/config). In a
            command's run directory it lies in the private ``.partial`` folder, which a rerun of
            the same command adopts after an interruption (no flag needed).
        loss_fn: replaces the default loss (BCE / CE), e.g. for distillation.
        inplace: train the given model object instead of a copy.

    Returns:
        A :class:`TrainResult` whose ``model`` has the best validation weights.
    """
    cfg = (config or TrainConfig()).validate()
    check_compatible(model, train_ds)
    train_ds.require_nonempty()
    require_known_labels(train_ds, "training")
    if val_ds is not None:
        check_compatible(model, val_ds)
        val_ds.require_nonempty()
    model = model if inplace else copy.deepcopy(model)
    dev = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model.to(dev)
    n_trainable = _set_trainable(model, cfg.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(loss_fn, nn.Module):  # a loss with parameters of its own (e.g. a projection)
        loss_fn.to(dev)
        params += [p for p in loss_fn.parameters() if p.requires_grad]
    pw = _pos_weight(train_ds, cfg.pos_weight)
    loss_f = loss_fn or default_loss(train_ds.task, pw.to(dev) if pw is not None else None)
    out = run_epochs(model, model, params, train_ds, val_ds, cfg, loss_f, dev, checkpoint_dir,
                     train_identity(model, train_ds, val_ds, cfg), progress=progress,
                     use_amp=cfg.amp and dev.type == "cuda")
    model.load_state_dict(out.best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    model.cpu()
    return TrainResult(model=model, history=out.history, best_epoch=out.best_epoch,
                       best_metric=out.best_metric, seconds=out.seconds, config=cfg,
                       trainable_params=n_trainable, resumed_from=out.start_epoch)
