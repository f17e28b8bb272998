"""Data-parallel training on several processes (GPUs or CPU cores, one or many nodes) with
PyTorch DistributedDataParallel, reusing :mod:`medscalpel.engine.train`'s configuration, loss,
learning-rate schedule, seeding, validation and per-epoch checkpoints.

Two ways in:

* :func:`train_ddp` starts ``world_size`` processes on this machine itself (``gloo`` on CPU,
  ``nccl`` on GPUs) and returns the :class:`~medscalpel.engine.train.TrainResult` of rank 0;
* :func:`train_ddp_from_env` is called in every process started by ``torchrun`` (it reads
  ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` from the environment): multi-node training.

Equal to one process at equal *global* batch: every optimisation step uses exactly the global
batch that :func:`~medscalpel.engine.train.train` would use at the same ``TrainConfig`` (the
batches are drawn by the same ``DataLoader``/``RandomSampler`` code with the same seeded
generator, then each rank takes every ``world_size``-th image of the batch), and each rank's loss
is weighted by its share of the batch (images, or known labels for the masked multi-label BCE),
so the all-reduced gradient is the gradient of the global-batch loss. Without batch-statistics
layers the loss trajectory therefore matches a single process up to float rounding (see
``docs/reliability.md`` for the measured tolerance). BatchNorm: ``batch_norm="sync"`` converts
to :class:`torch.nn.SyncBatchNorm` (GPU only: global-batch statistics), ``"local"`` keeps
per-process statistics (the usual DDP behaviour; close but not equal to one process),
``"frozen"`` uses the running statistics (BN in eval mode) during training.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medscalpel.data.base import CXRDataset
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import check_compatible, make_loader, predict
from medscalpel.engine.train import (LossFn, TrainConfig, TrainResult, default_loss,
                                     lr_lambda_for, seed_everything, train_identity, _Checkpointer,
                                     _pos_weight)
from medscalpel.errors import ConfigError, MedScalpelError, RunError
from medscalpel.models.classifier import MedClassifier
from medscalpel.progress import LiveStatus
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

OWNER = "train_ddp"
BN_MODES = ("auto", "sync", "local", "frozen")


@dataclass(frozen=True)
class DDPSettings:
    """How the processes are organised (not part of the optimisation: see ``TrainConfig``)."""

    world_size: int = 2
    backend: str = "auto"  # auto | gloo | nccl
    batch_norm: str = "auto"  # auto (sync on GPU, local on CPU) | sync | local | frozen
    threads_per_rank: int = 1
    timeout_s: float = 1800.0
    start_method: str | None = None  # fork on CPU, spawn once CUDA is initialised

    def validate(self) -> "DDPSettings":
        check_range(self.world_size, "world_size", OWNER, 1, integer=True)
        check_in(self.backend, "backend", OWNER, ("auto", "gloo", "nccl"))
        check_in(self.batch_norm, "batch_norm", OWNER, BN_MODES)
        check_range(self.threads_per_rank, "threads_per_rank", OWNER, 1, integer=True)
        check_range(self.timeout_s, "timeout_s", OWNER, 1)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------- pieces


def global_batches(n: int, cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """The index batches :func:`~medscalpel.engine.train.train` draws in ``epoch``: produced by
    the same ``make_loader`` call (shuffle, seeded generator, ``drop_last``) over the indices."""
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    idx = torch.utils.data.TensorDataset(torch.arange(n))
    loader = make_loader(idx, cfg.batch_size, shuffle=True, num_workers=0, generator=gen,
                         drop_last=n > cfg.batch_size)
    return [b[0].tolist() for b in loader]


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This rank's part of a global batch: every ``world``-th index starting at ``rank``."""
    return batch[rank::world]


def _set_trainable(model: nn.Module, which: str) -> int:
    for p in model.parameters():
        p.requires_grad_(which == "all")
    if which == "classifier":
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _share(targets: torch.Tensor, task: str, custom_loss: bool) -> torch.Tensor:
    """What this rank's mean loss is averaged over: images, or known labels (masked BCE)."""
    if task == "multilabel" and not custom_loss:
        return torch.isfinite(targets).sum().to(torch.float64)
    return torch.tensor(float(len(targets)), dtype=torch.float64)


def _validate(model: MedClassifier, val_ds: CXRDataset, cfg: TrainConfig, dev) -> dict[str, Any]:
    vp = predict(model, val_ds, batch_size=max(cfg.batch_size, 64), device=dev, progress=False)
    ev = evaluate(vp, n_boot=0)
    with torch.no_grad():
        vl = default_loss(val_ds.task, None)(torch.from_numpy(vp.logits),
                                             torch.from_numpy(vp.labels), None)
    return {"val_auroc": ev.macro["auroc"], "val_ap": ev.macro["ap"], "val_loss": float(vl)}


# ----------------------------------------------------------------------------- the loop
def _ddp_loop(rank: int, world: int, model: MedClassifier, train_ds: CXRDataset,
              val_ds: CXRDataset | None, cfg: TrainConfig, ddp: DDPSettings,
              checkpoint_dir: str | None, loss_fn: LossFn | None,
              progress: bool | None) -> dict[str, Any] | None:
    """One rank's training (the process group is initialised). Rank 0 returns the outcome."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
                       if dist.get_backend() == "nccl" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    bn = ddp.batch_norm
    if bn == "auto":
        bn = "sync" if dev.type == "cuda" else "local"
    if bn == "sync" and dev.type != "cuda":
        raise ConfigError(f"The 'batch_norm' parameter of {OWNER} cannot be 'sync' on CPU "
                          "(torch's SyncBatchNorm needs GPUs); use 'local' or 'frozen', or a model "
                          "without BatchNorm.")
    seed_everything(cfg.seed)
    n_trainable = _set_trainable(model, cfg.trainable)
    if bn == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(dev)
    # buffers (BN running statistics) are synchronised from rank 0 at every forward (default)
    net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_lambda, steps_per_epoch = lr_lambda_for(cfg, len(train_ds))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    pw = _pos_weight(train_ds, cfg.pos_weight)
    loss_f = loss_fn or default_loss(train_ds.task, pw.to(dev) if pw is not None else None)
    identity = train_identity(model, train_ds, val_ds, cfg,
                              ddp={"world_size": world, "batch_norm": bn})
    ckpt = _Checkpointer(Path(checkpoint_dir) if checkpoint_dir else None)
    (history, best_state, best_metric, best_epoch, bad_epochs,
     start_epoch) = ckpt.restore(identity, model, opt, sched)
    t0 = time.perf_counter()
    stopped = bad_epochs >= cfg.patience
    step_losses: list[list[float]] = []
    for epoch in range(start_epoch, cfg.epochs):
        if stopped:
            break
        te = time.perf_counter()
        seed_everything(cfg.seed * 1000 + epoch)
        mine = [shard(b, rank, world) for b in global_batches(len(train_ds), cfg, epoch)]
        mine = mine[:steps_per_epoch]
        loader = torch.utils.data.DataLoader(train_ds, batch_sampler=mine,
                                             num_workers=cfg.num_workers)
        net.train()
        if cfg.trainable == "classifier" or bn == "frozen":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        losses: list[float] = []
        with LiveStatus(f"epoch {epoch + 1}/{cfg.epochs} (rank {rank}/{world})", len(mine),
                        progress if rank == 0 else False) as bar:
            for step, (x, y) in enumerate(loader):
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                share = _share(y, train_ds.task, loss_fn is not None).to(dev)
                total = share.clone()
                dist.all_reduce(total)
                weight = (share / total.clamp(min=1)).float()
                logits = net(x)
                loss = loss_f(logits.float(), y, x) * weight
                glob = loss.detach().clone()
                dist.all_reduce(glob)  # the global-batch loss, identical on every rank
                if not torch.isfinite(glob):
                    raise ConfigError(f"Training diverged at epoch {epoch + 1}, step {step}: the "
                                      "loss is not finite. Lower --lr or check the data.")
                opt.zero_grad(set_to_none=True)
                (loss * world).backward()  # DDP averages gradients over the ranks
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                losses.append(float(glob))
                bar.advance(info=f"loss {np.mean(losses[-50:]):.4f}")
        step_losses.append(losses)
        rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                               "lr": float(sched.get_last_lr()[0])}
        flag = torch.zeros(1, dtype=torch.int64)
        if rank == 0:
            metric = -rec["train_loss"]
            if val_ds is not None:
                rec.update(_validate(model, val_ds, cfg, dev))
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
            flag[0] = int(bad_epochs >= cfg.patience)
        flag = flag.to(dev)
        dist.broadcast(flag, src=0)
        stopped = bool(flag.item())
    if rank != 0:
        return None
    return {"best_state": {k: v.detach().cpu().contiguous() for k, v in best_state.items()},
            "history": history, "best_epoch": best_epoch, "best_metric": float(best_metric),
            "seconds": round(time.perf_counter() - t0, 2), "trainable_params": n_trainable,
            "resumed_from": start_epoch, "step_losses": step_losses, "batch_norm": bn}


def _check(model: MedClassifier, train_ds: CXRDataset, val_ds: CXRDataset | None,
           cfg: TrainConfig, world: int) -> None:
    check_compatible(model, train_ds)
    train_ds.require_nonempty()
    if val_ds is not None:
        check_compatible(model, val_ds)
        val_ds.require_nonempty()
    if cfg.batch_size % world:
        raise ConfigError(f"The 'batch_size' of {OWNER} is the GLOBAL batch and must be a multiple "
                          f"of world_size={world}. Got {cfg.batch_size} instead.")
    if len(train_ds) < world:
        raise ConfigError(f"{OWNER}: {len(train_ds)} training images cannot feed {world} "
                          "processes; use fewer processes.")


def _to_result(model: MedClassifier, out: dict[str, Any], cfg: TrainConfig,
               ddp: DDPSettings, world: int) -> TrainResult:
    trained = copy.deepcopy(model)
    trained.load_state_dict(out["best_state"])
    for p in trained.parameters():
        p.requires_grad_(True)
    trained.eval().cpu()
    return TrainResult(model=trained, history=out["history"], best_epoch=out["best_epoch"],
                       best_metric=out["best_metric"], seconds=out["seconds"], config=cfg,
                       trainable_params=out["trainable_params"], resumed_from=out["resumed_from"],
                       extra={"ddp": {**ddp.to_dict(), "world_size": world,
                                      "batch_norm": out["batch_norm"]},
                              "step_losses": out["step_losses"]})


# ----------------------------------------------------------------------------- launchers
def _error_file(result_dir: str, rank: int) -> Path:
    return Path(result_dir) / f"error-{rank}.json"


def _worker(rank: int, world: int, init_file: str, result_dir: str, backend: str,
            model, train_ds, val_ds, cfg, ddp: DDPSettings, checkpoint_dir, loss_fn,
            progress) -> None:
    torch.set_num_threads(ddp.threads_per_rank)
    os.environ.setdefault("MEDSCALPEL_PROGRESS", "0")
    from datetime import timedelta

    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=ddp.timeout_s))
        try:
            out = _ddp_loop(rank, world, model, train_ds, val_ds, cfg, ddp, checkpoint_dir,
                            loss_fn, progress)
        finally:
            dist.destroy_process_group()
        if rank == 0 and out is not None:
            from safetensors.torch import save_file

            save_file(out.pop("best_state"), str(Path(result_dir) / "best.safetensors"))
            write_json(Path(result_dir) / "result.json", out)
    except BaseException as exc:
        write_json(_error_file(result_dir, rank), {"type": type(exc).__name__,
                                                   "medscalpel": isinstance(exc, MedScalpelError),
                                                   "message": str(exc)})
        raise


def _reraise(result_dir: str, world: int, exc: BaseException) -> None:
    import medscalpel.errors as errors

    first = getattr(exc, "error_index", None)  # the process that failed first: the cause
    order = ([first] if first is not None else []) + [r for r in range(world) if r != first]
    for r in order:
        f = _error_file(result_dir, r)
        if f.is_file():
            e = read_json(f)
            cls = getattr(errors, e["type"], None) if e.get("medscalpel") else None
            if cls is not None and isinstance(cls, type) and issubclass(cls, MedScalpelError):
                raise cls(e["message"]) from None
            raise RunError(f"DDP rank {r} failed: {e['type']}: {e['message']}") from exc
    raise RunError(f"A DDP process died without a Python error ({exc}); e.g. killed for "
                   "memory. The per-epoch checkpoint (if any) lets a rerun resume.") from exc


def train_ddp(
    model: MedClassifier,
    train_ds: CXRDataset,
    val_ds: CXRDataset | None = None,
    config: TrainConfig | None = None,
    world_size: int = 2,
    checkpoint_dir: str | os.PathLike | None = None,
    loss_fn: LossFn | None = None,
    progress: bool | None = None,
    settings: DDPSettings | None = None,
) -> TrainResult:
    """Train ``model`` with DistributedDataParallel on ``world_size`` local processes.

    ``config.batch_size`` is the GLOBAL batch (each process gets ``batch_size / world_size``),
    so the same ``TrainConfig`` gives the same optimisation as
    :func:`~medscalpel.engine.train.train`.

    Args:
        model: the model to train (a copy is trained; the caller's model is not changed).
        train_ds, val_ds: datasets (picklable when processes are spawned, i.e. with CUDA).
        config: the :class:`~medscalpel.engine.train.TrainConfig` (seed, lr, schedule, ...).
        world_size: number of processes (``settings.world_size`` is ignored when given here).
        checkpoint_dir: per-epoch state (written by rank 0); rerunning resumes after the last
            finished epoch and refuses a different model, data, config or world size.
        loss_fn: replaces the default loss; it must be a per-image mean.
        settings: backend (``auto``: nccl with one GPU per process when enough GPUs, else gloo
            on CPU), BatchNorm handling, threads per process, timeout.

    Returns:
        The :class:`~medscalpel.engine.train.TrainResult` (best weights), with
        ``extra["step_losses"]`` (global-batch loss of every step) and ``extra["ddp"]``.

    Example:
        >>> res = train_ddp(create_model("vit_test", 3, 1, 32), ds, None,
        ...                 TrainConfig(epochs=2, batch_size=16), world_size=2)  # doctest: +SKIP
    """
    cfg = (config or TrainConfig()).validate()
    s = (settings or DDPSettings()).validate()
    check_range(world_size, "world_size", OWNER, 1, integer=True)
    _check(model, train_ds, val_ds, cfg, world_size)
    backend = s.backend
    if backend == "auto":
        backend = "nccl" if (cfg.device in ("auto", "cuda") and torch.cuda.is_available()
                             and torch.cuda.device_count() >= world_size) else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ConfigError(f"{OWNER}: backend 'nccl' needs {world_size} GPUs; "
                          f"{torch.cuda.device_count()} found. Use backend='gloo' (CPU).")
    import torch.multiprocessing as tmp_mp

    start = s.start_method or ("spawn" if backend == "nccl" or torch.cuda.is_initialized()
                               else "fork")
    with tempfile.TemporaryDirectory(prefix="medscalpel-ddp-") as work:
        init_file = os.path.join(work, "rendezvous")
        args = (world_size, init_file, work, backend, copy.deepcopy(model), train_ds, val_ds, cfg,
                s, str(checkpoint_dir) if checkpoint_dir else None, loss_fn, progress)
        try:
            tmp_mp.start_processes(_worker, args=args, nprocs=world_size, join=True,
                                   start_method=start)
        except (tmp_mp.ProcessRaisedException, tmp_mp.ProcessExitedException) as exc:
            _reraise(work, world_size, exc)
        from safetensors.torch import load_file

        out = read_json(Path(work) / "result.json")
        out["best_state"] = load_file(str(Path(work) / "best.safetensors"))
    return _to_result(model, out, cfg, s, world_size)


def train_ddp_from_env(
    model: MedClassifier,
    train_ds: CXRDataset,
    val_ds: CXRDataset | None = None,
    config: TrainConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    loss_fn: LossFn | None = None,
    progress: bool | None = None,
    settings: DDPSettings | None = None,
) -> TrainResult | None:
    """The body of a ``torchrun`` script: joins the process group described by the
    environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``),
    trains, and returns the :class:`TrainResult` on rank 0 (``None`` on the other ranks).

    Example (2 nodes x 4 GPUs)::

        torchrun --nnodes 2 --nproc-per-node 4 --rdzv-endpoint head:29500 my_train.py
    """
    from datetime import timedelta

    cfg = (config or TrainConfig()).validate()
    s = (settings or DDPSettings()).validate()
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"train_ddp_from_env: the environment variable {var} is not set; "
                              "start the script with torchrun (or use train_ddp).")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _check(model, train_ds, val_ds, cfg, world)
    backend = s.backend if s.backend != "auto" else ("nccl" if torch.cuda.is_available()
                                                     else "gloo")
    torch.set_num_threads(s.threads_per_rank)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=s.timeout_s))
    try:
        out = _ddp_loop(rank, world, copy.deepcopy(model), train_ds, val_ds, cfg, s,
                        str(checkpoint_dir) if checkpoint_dir else None, loss_fn, progress)
    finally:
        dist.destroy_process_group()
    return None if out is None else _to_result(model, out, cfg, s, world)




def fit_ddp(data: str, arch: str, out_dir: str | os.PathLike, config: TrainConfig | None = None,
            world_size: int = 2, size: int = 64, channels: int = 1, augment: bool = False,
            eval_split: str | None = "test", n_boot: int = 200,
            settings: DDPSettings | None = None, progress: bool | None = None):
    """:func:`medscalpel.engine.api.fit` on ``world_size`` processes: train ``arch`` on the
    ``train`` split of ``data`` with :func:`train_ddp` (per-epoch checkpoints in
    ``out_dir/checkpoint``, so a killed run resumes), evaluate ``eval_split`` and save
    ``out_dir/model`` with its card.

    ``augment`` is off by default: random augmentation draws per process, so it is not equal to
    one process (the optimisation still is, batch for batch).
    """
    from medscalpel.data.spec import open_dataset
    from medscalpel.data.transforms import Augment, Preprocess
    from medscalpel.engine.api import FitResult
    from medscalpel.models.checkpoint import make_card, save_model
    from medscalpel.models.zoo import create_model

    cfg = (config or TrainConfig()).validate()
    pp = Preprocess(size=size, channels=channels)
    train_ds = open_dataset(data, split="train",
                            preprocess=pp.with_augment(Augment() if augment else None))
    val_ds = open_dataset(data, split="val", preprocess=pp)
    seed_everything(cfg.seed)
    model = create_model(arch, num_classes=train_ds.num_classes, in_chans=channels,
                         img_size=size)
    model.card = make_card(model, train_ds.class_names, train_ds.task, pp)
    out_dir = Path(out_dir)
    res = train_ddp(model, train_ds, val_ds, cfg, world_size=world_size,
                    checkpoint_dir=out_dir / "checkpoint", progress=progress, settings=settings)
    test = None
    if eval_split:
        test_ds = open_dataset(data, split=eval_split, preprocess=pp)
        res.model.card = model.card
        test = evaluate(predict(res.model, test_ds, progress=False), n_boot=n_boot,
                        seed=cfg.seed)
    card = make_card(res.model, train_ds.class_names, train_ds.task, pp,
                     training={**cfg.to_dict(), "data": data, "best_epoch": res.best_epoch,
                               "seconds": res.seconds, "ddp": res.extra["ddp"]},
                     metrics={"val_" + cfg.monitor: res.best_metric,
                              **({f"{eval_split}_macro_auroc": test.macro["auroc"]}
                                 if test else {})},
                     lineage=({"method": "train_ddp", "parent": None, "data": data,
                               "data_hash": train_ds.content_hash()},))
    save_model(res.model, out_dir / "model", card)
    return FitResult(model_dir=out_dir / "model", train=res, test=test,
                     data={"train": train_ds.describe(), "val": val_ds.describe()})


__all__ = ["DDPSettings", "fit_ddp", "global_batches", "lr_lambda_for", "shard", "train_ddp",
           "train_ddp_from_env"]
