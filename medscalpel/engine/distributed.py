"""Data-parallel training on several processes (GPUs or CPU cores, one or many nodes) with
PyTorch DistributedDataParallel, on :mod:`medscalpel.engine.train`'s one training loop
(:func:`~medscalpel.engine.train.run_epochs`: configuration, loss, learning-rate schedule,
seeding, validation, early stopping and per-epoch checkpoints); this module supplies only the
data-parallel hooks (:class:`DDPHooks`) and the process launchers.

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
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import medscalpel.errors as errors
from medscalpel.data.base import CXRDataset
from medscalpel.data.spec import open_dataset
from medscalpel.data.transforms import Augment, Preprocess
from medscalpel.engine.api import FitResult
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import check_compatible, make_loader, predict
from medscalpel.engine.train import (LossFn, TrainConfig, TrainHooks, TrainResult, _pos_weight,
                                     _set_trainable, default_loss, lr_lambda_for, run_epochs,
                                     seed_everything, train_identity)
from medscalpel.errors import ConfigError, MedScalpelError, RunError
from medscalpel.models.checkpoint import make_card, save_model
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.zoo import create_model
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

OWNER = "train_ddp"
BN_MODES = ("auto", "sync", "local", "frozen")
_SYNC_ON_CPU = (f"The 'batch_norm' parameter of {OWNER} cannot be 'sync' on CPU (torch's "
                "SyncBatchNorm needs GPUs); use 'local' or 'frozen', or a model without "
                "BatchNorm.")


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


def _share(targets: torch.Tensor, task: str, custom_loss: bool) -> torch.Tensor:
    """What this rank's mean loss is averaged over: images, or known labels (masked BCE)."""
    if task == "multilabel" and not custom_loss:
        return torch.isfinite(targets).sum().to(torch.float64)
    return torch.tensor(float(len(targets)), dtype=torch.float64)


class DDPHooks(TrainHooks):
    """The data-parallel pieces of the one training loop
    (:func:`~medscalpel.engine.train.run_epochs`): this rank's shard of every global batch,
    the loss weighted by this rank's share of the global batch and all-reduced, gradients
    scaled by the world size (DDP averages them), the stop decision broadcast from rank 0."""

    def __init__(self, rank: int, world: int, task: str, custom_loss: bool, batch_norm: str,
                 device: torch.device):
        self.rank, self.world, self.task = rank, world, task
        self.custom_loss, self.batch_norm, self.device = custom_loss, batch_norm, device
        self.is_main = rank == 0
        self.backward_scale = float(world)

    def batches(self, train_ds, cfg, epoch, steps_per_epoch):
        mine = [shard(b, self.rank, self.world) for b in global_batches(len(train_ds), cfg, epoch)]
        mine = mine[:steps_per_epoch]
        loader = torch.utils.data.DataLoader(train_ds, batch_sampler=mine,
                                             num_workers=cfg.num_workers)
        return loader, len(mine)

    def train_mode(self, net, model, cfg):
        net.train()
        if cfg.trainable == "classifier" or self.batch_norm == "frozen":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def loss_weight(self, targets):
        share = _share(targets, self.task, self.custom_loss).to(self.device)
        total = share.clone()
        dist.all_reduce(total)
        return (share / total.clamp(min=1)).float()

    def step_loss(self, loss):
        dist.all_reduce(loss)  # the global-batch loss, identical on every rank
        return loss

    def stop(self, stop):
        flag = torch.tensor([int(stop)], dtype=torch.int64).to(self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def label(self, epoch, cfg):
        return f"epoch {epoch + 1}/{cfg.epochs} (rank {self.rank}/{self.world})"

    def show_progress(self, progress):
        return progress if self.is_main else False


# ----------------------------------------------------------------------------- the loop
def _ddp_loop(rank: int, world: int, model: MedClassifier, train_ds: CXRDataset,
              val_ds: CXRDataset | None, cfg: TrainConfig, ddp: DDPSettings,
              checkpoint_dir: str | None, loss_fn: LossFn | None,
              progress: bool | None) -> dict[str, Any] | None:
    """One rank's training (the process group is initialised): the one training loop with
    :class:`DDPHooks`. Rank 0 returns the outcome."""

    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
                       if dist.get_backend() == "nccl" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    bn = ddp.batch_norm
    if bn == "auto":
        bn = "sync" if dev.type == "cuda" else "local"
    if bn == "sync" and dev.type != "cuda":
        raise ConfigError(_SYNC_ON_CPU)
    seed_everything(cfg.seed)
    n_trainable = _set_trainable(model, cfg.trainable)
    if bn == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(dev)
    # buffers (BN running statistics) are synchronised from rank 0 at every forward (default)
    net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in net.parameters() if p.requires_grad]
    pw = _pos_weight(train_ds, cfg.pos_weight)
    loss_f = loss_fn or default_loss(train_ds.task, pw.to(dev) if pw is not None else None)
    identity = train_identity(model, train_ds, val_ds, cfg,
                              ddp={"world_size": world, "batch_norm": bn})
    hooks = DDPHooks(rank, world, train_ds.task, loss_fn is not None, bn, dev)
    out = run_epochs(model, net, params, train_ds, val_ds, cfg, loss_f, dev, checkpoint_dir,
                     identity, hooks=hooks, progress=progress, use_amp=False)
    if rank != 0:
        return None
    return {"best_state": {k: v.detach().cpu().contiguous() for k, v in out.best_state.items()},
            "history": out.history, "best_epoch": out.best_epoch,
            "best_metric": out.best_metric, "seconds": out.seconds,
            "trainable_params": n_trainable, "resumed_from": out.start_epoch,
            "step_losses": out.step_losses, "batch_norm": bn}


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

    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=ddp.timeout_s))
        try:
            out = _ddp_loop(rank, world, model, train_ds, val_ds, cfg, ddp, checkpoint_dir,
                            loss_fn, progress)
        finally:
            dist.destroy_process_group()
        if rank == 0 and out is not None:
            save_file(out.pop("best_state"), str(Path(result_dir) / "best.safetensors"))
            write_json(Path(result_dir) / "result.json", out)
    except BaseException as exc:
        write_json(_error_file(result_dir, rank), {"type": type(exc).__name__,
                                                   "medscalpel": isinstance(exc, MedScalpelError),
                                                   "message": str(exc)})
        raise


def _reraise(result_dir: str, world: int, exc: BaseException) -> None:

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
    if s.batch_norm == "sync" and backend != "nccl":
        raise ConfigError(_SYNC_ON_CPU)  # refused before any process starts
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


__all__ = ["DDPHooks", "DDPSettings", "fit_ddp", "global_batches", "lr_lambda_for", "shard", "train_ddp",
           "train_ddp_from_env"]
