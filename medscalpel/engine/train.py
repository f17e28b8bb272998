"""Training: multi-label BCE (optional pos_weight) or multi-class CE; AdamW with a cosine
schedule and linear warm-up; early stopping on validation macro AUROC with the best weights
kept; deterministic seeding; resume from the last finished epoch; AMP on GPU."""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medscalpel.data.base import CXRDataset
from medscalpel.engine.device import resolve_device
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import check_compatible, make_loader, predict
from medscalpel.errors import ConfigError, RunError
from medscalpel.models.classifier import MedClassifier
from medscalpel.progress import LiveStatus
from medscalpel.runs import read_json, write_json
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
    import random

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
    """Per-epoch state for resume: weights (safetensors) + optimiser/scheduler (weights_only)."""

    def __init__(self, directory: Path | None):
        self.dir = directory

    def save(self, epoch: int, model, best_state, opt, sched, history, best_epoch, best_metric,
             bad_epochs, identity: dict[str, Any]) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp_w = self.dir / ".last.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp_w))
        tmp_b = self.dir / ".best.safetensors.tmp"
        save_file({k: v.cpu().contiguous() for k, v in best_state.items()}, str(tmp_b))
        tmp_o = self.dir / ".optim.pt.tmp"
        torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_o)
        os.replace(tmp_w, self.dir / "last.safetensors")
        os.replace(tmp_b, self.dir / "best.safetensors")
        os.replace(tmp_o, self.dir / "optim.pt")
        write_json(self.dir / "state.json", {"epoch": epoch, "history": history,
                                             "best_epoch": best_epoch, "best_metric": best_metric,
                                             "bad_epochs": bad_epochs, "identity": identity})

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
        from safetensors.torch import load_file

        state = read_json(self.dir / "state.json")
        if state.get("identity") != identity:
            raise RunError(f"Cannot resume training from {self.dir}: it was started with a different "
                           "model, dataset or configuration. Use a new output directory.")
        return (state, load_file(str(self.dir / "last.safetensors")),
                load_file(str(self.dir / "best.safetensors")),
                torch.load(self.dir / "optim.pt", map_location="cpu", weights_only=True))


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
            after the last finished epoch (and refuses a different model/data/config).
        loss_fn: replaces the default loss (BCE / CE), e.g. for distillation.
        inplace: train the given model object instead of a copy.

    Returns:
        A :class:`TrainResult` whose ``model`` has the best validation weights.
    """
    cfg = (config or TrainConfig()).validate()
    check_compatible(model, train_ds)
    train_ds.require_nonempty()
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
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_lambda, steps_per_epoch = lr_lambda_for(cfg, len(train_ds))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    pw = _pos_weight(train_ds, cfg.pos_weight)
    loss_f = loss_fn or default_loss(train_ds.task, pw.to(dev) if pw is not None else None)
    use_amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    identity = train_identity(model, train_ds, val_ds, cfg)
    ckpt = _Checkpointer(Path(checkpoint_dir) if checkpoint_dir else None)
    (history, best_state, best_metric, best_epoch, bad_epochs,
     start_epoch) = ckpt.restore(identity, model, opt, sched)
    if start_epoch:
        logger.info("resuming training at epoch %d", start_epoch)
    t0 = time.perf_counter()
    stopped = bad_epochs >= cfg.patience
    for epoch in range(start_epoch, cfg.epochs):
        if stopped:
            break
        te = time.perf_counter()
        seed_everything(cfg.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        loader = make_loader(train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                             generator=gen, drop_last=len(train_ds) > cfg.batch_size)
        model.train()
        if cfg.trainable == "classifier":
            model.backbone.eval()  # frozen BN statistics
        losses = []
        with LiveStatus(f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch, progress) as bar:
            for step, (x, y) in enumerate(loader):
                if step >= steps_per_epoch:
                    break
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                with torch.autocast(dev.type, enabled=use_amp):
                    logits = model(x)
                    loss = loss_f(logits.float(), y, x)
                if not torch.isfinite(loss):
                    raise ConfigError(f"Training diverged at epoch {epoch + 1}, step {step}: the "
                                      "loss is not finite. Lower --lr or check the data.")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                losses.append(float(loss.detach()))
                bar.advance(info=f"loss {np.mean(losses[-50:]):.4f}")
        rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                               "lr": float(sched.get_last_lr()[0])}
        metric = -rec["train_loss"]
        if val_ds is not None:
            vp = predict(model, val_ds, batch_size=max(cfg.batch_size, 64), device=dev,
                         progress=False)
            ev = evaluate(vp, n_boot=0)
            rec["val_auroc"] = ev.macro["auroc"]
            rec["val_ap"] = ev.macro["ap"]
            with torch.no_grad():
                vl = default_loss(val_ds.task, None)(torch.from_numpy(vp.logits),
                                                     torch.from_numpy(vp.labels), None)
            rec["val_loss"] = float(vl)
            metric = {"auroc": rec["val_auroc"], "ap": rec["val_ap"],
                      "loss": -rec["val_loss"]}[cfg.monitor]
            if not np.isfinite(metric):
                metric = -rec["val_loss"]
        rec["seconds"] = round(time.perf_counter() - te, 2)
        history.append(rec)
        logger.info("epoch %s", rec)
        if metric > best_metric:
            best_metric, best_epoch, bad_epochs = float(metric), epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        ckpt.save(epoch, model, best_state, opt, sched, history, best_epoch, best_metric,
                  bad_epochs, identity)
        if bad_epochs >= cfg.patience:
            stopped = True
    model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    model.cpu()
    return TrainResult(model=model, history=history, best_epoch=best_epoch,
                       best_metric=float(best_metric), seconds=round(time.perf_counter() - t0, 2),
                       config=cfg, trainable_params=n_trainable, resumed_from=start_epoch)
