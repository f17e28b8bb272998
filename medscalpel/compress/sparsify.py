"""Channel sparsification that provable lossless folding can then remove *exactly*.

Two steps, one lossy and one exact:

1. :func:`sparsify_channels` trains the model with proximal group sparsity on the BatchNorm
   parameters tied to each channel (network slimming, Liu et al. 2017, as a group lasso): after
   every optimiser step, each channel's group (the scales ``gamma`` of every BatchNorm that
   normalises it, and the positive part of their shifts ``beta`` where a consumer is a
   zero-padded conv) is shrunk towards zero (soft threshold ``lr * lam``), and on a schedule
   the channels with the smallest relative group norm are set to exactly zero and held there
   (``gamma = 0``, ``beta <= 0`` where needed) until the parameters they carry reach
   ``target_ratio``. Training continues with those channels held at zero, so that the rest of
   the network adapts (this step changes the outputs; its accuracy change is reported).
2. :func:`~medscalpel.compress.lossless.fold_lossless` in ``mode="provable"`` then proves, from
   the weights, that every zeroed channel is dead or constant for every input and removes it
   physically; the folded model equals the *sparsified* model to float32 rounding.

:func:`sparsify_and_fold` runs both and reports dense vs sparsified vs folded.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from medscalpel.compress.graph import ParamCounter, build_channel_graph
from medscalpel.compress.lossless import fold_lossless
from medscalpel.compress.measure import max_abs_logit_delta
from medscalpel.compress.provable import input_range_of
from medscalpel.compress.reconstruct import macro_auroc
from medscalpel.engine.predict import make_loader, predict
from medscalpel.engine.train import default_loss, seed_everything
from medscalpel.errors import ConfigError, ModelError
from medscalpel.progress import track
from medscalpel.runs import write_json
from medscalpel.validation import check_fraction, check_range


@dataclass
class _Channel:
    group: int
    ch: int
    gammas: list[tuple[nn.Parameter, int]]
    betas: list[tuple[nn.Parameter, int]]
    cost: int


def _channels(model: nn.Module, example: torch.Tensor) -> tuple[list[_Channel], ParamCounter,
                                                                  dict[int, int], dict[int, str]]:

    graph = build_channel_graph(model, example, ignored=[model.classifier])
    pc = ParamCounter(model, graph)
    out: list[_Channel] = []
    sizes, roots = {}, {}
    for g in graph.groups:
        if not g.supported:
            continue
        fn = tp.prune_conv_out_channels if isinstance(g.module, nn.Conv2d) \
            else tp.prune_linear_out_channels
        bns = []
        for item in graph.dg.get_pruning_group(g.module, fn, idxs=list(range(g.size))):
            mod = item.dep.target.module
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
                idxs = [int(i) for i in item.idxs]
                if len(idxs) == g.size and all(mod is not b for b, _ in bns):
                    bns.append((mod, idxs))
        if not bns:
            continue  # no BatchNorm scale to drive to zero (e.g. a bare Linear)
        needs_beta = not all(graph.sites[s].intercept_ok for s in g.sites)
        cost = pc.channel_cost(g.index)
        sizes[g.index], roots[g.index] = g.size, g.root
        for ch in range(g.size):
            gam = [(b.weight, ix[ch]) for b, ix in bns]
            bet = [(b.bias, ix[ch]) for b, ix in bns] if needs_beta else []
            out.append(_Channel(g.index, ch, gam, bet, cost))
    return out, pc, sizes, roots


@torch.no_grad()
def _norm(c: _Channel) -> float:
    s = sum(float(p[i]) ** 2 for p, i in c.gammas)
    s += sum(max(float(p[i]), 0.0) ** 2 for p, i in c.betas)
    return math.sqrt(s)


@torch.no_grad()
def _shrink(chans: list[_Channel], tau: float) -> None:
    """Group soft threshold (proximal step of ``tau * sum ||group||``) of every channel."""
    if tau <= 0:
        return
    for c in chans:
        n = _norm(c)
        f = 0.0 if n <= tau else 1.0 - tau / n
        for p, i in c.gammas:
            p[i] *= f
        for p, i in c.betas:
            if p[i] > 0:
                p[i] *= f


@torch.no_grad()
def _zero(c: _Channel) -> None:
    for p, i in c.gammas:
        p[i] = 0.0
    for p, i in c.betas:
        p[i] = min(float(p[i]), 0.0)


@dataclass
class SparsifyReport:
    """What sparsification did (metrics on ``val_ds``; the dense model measured in the same
    run)."""

    arch: str
    target_ratio: float
    params_before: int
    params_after_removal: int          # exact count after removing the zeroed channels
    removable_ratio: float
    channels_zeroed: int
    channels_total: int
    epochs: int
    steps: int
    lam: float
    lr: float
    layers: list[dict[str, Any]]
    metrics_dense: dict[str, float | None]
    metrics_sparse: dict[str, float | None]
    history: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())


@dataclass
class SparsifyResult:
    model: nn.Module
    report: SparsifyReport

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict()


@torch.no_grad()
def classification_metrics(model: nn.Module, dataset, batch_size: int = 64
                           ) -> dict[str, float | None]:
    """Accuracy (multi-class: argmax; multi-label: sigmoid > 0.5 over known labels) and macro
    AUROC of ``model`` on ``dataset``."""

    p = predict(model, dataset, batch_size=batch_size, device="cpu", progress=False)
    logits, labels = np.asarray(p.logits), np.asarray(p.labels)
    if p.task == "multiclass":
        acc = float(np.mean(logits.argmax(1) == labels.astype(int)))
    else:
        known = np.isfinite(labels)
        acc = float(np.mean(((logits > 0) == (labels > 0.5))[known])) if known.any() else None
    return {"accuracy": acc, "macro_auroc": macro_auroc(logits, labels), "n": int(len(labels))}


def sparsify_channels(model: nn.Module, train_ds, val_ds=None, target_ratio: float = 0.5,
                      epochs: int = 3, lr: float = 1e-3, lam: float = 1e-4,
                      batch_size: int = 64, ramp: float = 0.6, min_keep: float = 0.1,
                      max_steps_per_epoch: int | None = None, weight_decay: float = 1e-4,
                      seed: int = 0, progress: bool | None = None) -> SparsifyResult:
    """Train with proximal group sparsity until channels carrying ``target_ratio`` of the
    parameters are exactly zero (BatchNorm ``gamma = 0``, ``beta <= 0`` where a padded conv
    reads them).

    Args:
        model: a MedClassifier with BatchNorm after its convs (unchanged: a copy is trained).
        train_ds: training dataset (``CXRDataset``: ``(image, target)`` items, ``task``).
        val_ds: dataset for the reported accuracy / macro AUROC (dense and sparsified), or None.
        target_ratio: fraction of the model's parameters the zeroed channels must carry, in
            (0, 1). The channels are removed by provable folding afterwards.
        epochs: training epochs (the zeroed set grows during the first ``ramp`` of the steps;
            the rest fine-tunes with it held at zero).
        lr: AdamW learning rate.
        lam: group-lasso strength (soft threshold ``lr * lam`` per step).
        batch_size: training batch size.
        ramp: fraction of the steps over which the zeroed set grows to the target.
        min_keep: every layer keeps at least this fraction of its channels (and at least one).
        max_steps_per_epoch: cap on the steps per epoch.
        weight_decay: AdamW weight decay.
        seed: seed of the data order.
        progress: progress bars.
    """

    _check_sparsify_args(model, target_ratio, epochs, lr, lam, ramp, min_keep, batch_size)
    train_ds.require_nonempty()
    work = copy.deepcopy(model).cpu()
    example = train_ds[0][0].unsqueeze(0).float()
    work.eval()
    chans, pc, sizes, roots = _channels(work, example)
    if not chans:
        raise ModelError(f"sparsify_channels: {getattr(model, 'arch', type(model).__name__)} "
                         "has no BatchNorm-scaled channel groups to sparsify.")
    seed_everything(seed)
    opt = torch.optim.AdamW([p for p in work.parameters()], lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_ds) / batch_size)
    if max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    sched = _Schedule(goal=target_ratio * pc.total, tau=lr * lam,
                      ramp_steps=max(1, int(round(ramp * (steps_per_epoch * epochs)))),
                      keep=dict(sizes),
                      floor={g: max(1, math.ceil(min_keep * n)) for g, n in sizes.items()})
    loss_f = default_loss(train_ds.task, None)
    history: list[dict[str, Any]] = []
    metrics_dense = classification_metrics(model, val_ds) if val_ds is not None else {}
    try:
        for epoch in range(epochs):
            losses = _sparsify_epoch(work, train_ds, opt, loss_f, chans, pc, sched, epoch, epochs,
                                     batch_size, steps_per_epoch, seed, progress)
            history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                            "zeroed": len(sched.zeroed), "removable_params":
                                pc.total - pc.count(sched.keep)})
    finally:
        work.eval()
    for k in sched.zeroed:
        _zero(chans[k])
    after = pc.count(sched.keep)
    layers = [{"layer": roots[g], "size": n, "zeroed": n - sched.keep[g]}
              for g, n in sizes.items()]
    report = SparsifyReport(
        arch=getattr(model, "arch", type(model).__name__), target_ratio=target_ratio,
        params_before=pc.total, params_after_removal=after,
        removable_ratio=(pc.total - after) / pc.total, channels_zeroed=len(sched.zeroed),
        channels_total=len(chans), epochs=epochs, steps=sched.step, lam=lam, lr=lr,
        layers=layers, metrics_dense=metrics_dense,
        metrics_sparse=classification_metrics(work, val_ds) if val_ds is not None else {},
        history=history)
    return SparsifyResult(work, report)


def _check_sparsify_args(model: nn.Module, target_ratio: float, epochs: int, lr: float,
                         lam: float, ramp: float, min_keep: float, batch_size: int) -> None:
    """Validate step of :func:`sparsify_channels`."""
    o = "sparsify_channels"
    check_fraction(target_ratio, "target_ratio", o)
    if not 0 < target_ratio < 1:
        raise ConfigError(f"The 'target_ratio' parameter of {o} must be in the range (0, 1). "
                          f"Got {target_ratio!r} instead.")
    check_range(epochs, "epochs", o, 1, integer=True)
    check_range(lr, "lr", o, 0, low_inclusive=False)
    check_range(lam, "lam", o, 0)
    check_range(ramp, "ramp", o, 0, 1, low_inclusive=False)
    check_fraction(min_keep, "min_keep", o)
    check_range(batch_size, "batch_size", o, 1, integer=True)
    if not hasattr(model, "classifier"):
        raise ModelError(f"{o} needs a MedClassifier-like model with a 'classifier'.")


@dataclass
class _Schedule:
    """State of the sparsification schedule: the removable-parameter goal reached after
    ``ramp_steps`` steps, the soft threshold ``tau`` per step, the zeroed channels and the
    channels each group keeps (never below its ``floor``)."""

    goal: float
    tau: float
    ramp_steps: int
    keep: dict[int, int]
    floor: dict[int, int]
    zeroed: set[int] = field(default_factory=set)
    step: int = 0


def _sparsify_epoch(work: nn.Module, train_ds, opt: torch.optim.Optimizer, loss_f,
                    chans: list[_Channel], pc: ParamCounter, sched: _Schedule, epoch: int,
                    epochs: int, batch_size: int, steps_per_epoch: int, seed: int,
                    progress: bool | None) -> list[float]:
    """One training epoch: an optimiser step, the proximal shrink, the growing zeroed set held
    at zero, per batch. Returns the batch losses."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    loader = make_loader(train_ds, batch_size, shuffle=True, generator=gen,
                         drop_last=len(train_ds) > batch_size)
    work.train()
    losses = []
    for bi, (x, y) in enumerate(track(loader, f"sparsify epoch {epoch + 1}/{epochs}",
                                      total=steps_per_epoch, progress=progress)):
        if bi >= steps_per_epoch:
            break
        loss = loss_f(work(x.float()), y, x)
        if not torch.isfinite(loss):
            raise ConfigError(f"sparsify_channels: the loss is not finite at epoch {epoch + 1}; "
                              "lower 'lr'.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step += 1
        _shrink(chans, sched.tau)
        _grow(chans, sched.zeroed, sched.keep, sched.floor, pc,
              sched.goal * min(1.0, sched.step / sched.ramp_steps))
        for k in sched.zeroed:
            _zero(chans[k])
        losses.append(float(loss.detach()))
    return losses


def _grow(chans: list[_Channel], zeroed: set[int], keep: dict[int, int], floor: dict[int, int],
          pc: ParamCounter, goal: float) -> None:
    """Zero the channels with the smallest group norm (relative to their layer's mean) until
    the removable parameters reach ``goal``."""
    removed = pc.total - pc.count(keep)
    if removed >= goal:
        return
    norms = np.array([_norm(c) for c in chans])
    mean = {}
    for k, c in enumerate(chans):
        mean.setdefault(c.group, []).append(norms[k])
    rel = np.array([norms[k] / (np.mean(mean[c.group]) + 1e-12) for k, c in enumerate(chans)])
    for k in np.argsort(rel, kind="stable"):
        if removed >= goal:
            break
        c = chans[k]
        if k in zeroed or keep[c.group] <= floor[c.group]:
            continue
        zeroed.add(int(k))
        keep[c.group] -= 1
        removed = pc.total - pc.count(keep)


@dataclass
class SparseFoldReport:
    """Dense -> sparsified -> folded, with the exactness of the fold and the cost of the
    sparsification stated separately."""

    sparsify: SparsifyReport
    lossless: Any  # LosslessReport
    params_dense: int
    params_folded: int
    params_removed_pct: float
    max_abs_logit_delta_fold: float      # sparsified vs folded (the exact step)
    max_abs_logit_delta_vs_dense: float  # dense vs folded (the lossy step), on the held-out
    metrics_dense: dict[str, float | None]
    metrics_sparse: dict[str, float | None]
    metrics_folded: dict[str, float | None]
    schema_version: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("sparsify", "lossless")}
        d["sparsify"] = self.sparsify.to_dict()
        d["lossless"] = self.lossless.to_dict()
        return d

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())


@dataclass
class SparseFoldResult:
    model: nn.Module
    sparse_model: nn.Module
    report: SparseFoldReport

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict()


def sparsify_and_fold(model: nn.Module, train_ds, val_ds, heldout: torch.Tensor,
                      target_ratio: float = 0.5, epochs: int = 3, atol: float = 1e-5,
                      latency: bool = True, progress: bool | None = None,
                      **sparsify_kw: Any) -> SparseFoldResult:
    """:func:`sparsify_channels` then provable :func:`fold_lossless` of the sparsified model.

    Args:
        model: the dense model (unchanged).
        train_ds, val_ds: training data and the dataset the accuracy / AUROC are reported on.
        heldout: held-out image tensor ``[N, C, H, W]`` for the logit comparisons.
        target_ratio, epochs, sparsify_kw: see :func:`sparsify_channels`.
        atol: the fold's allowed max |delta logit| (sparsified vs folded).
        latency: measure CPU latency in the fold report.
        progress: progress bars.
    """

    sp = sparsify_channels(model, train_ds, val_ds, target_ratio, epochs, progress=progress,
                           **sparsify_kw)
    fold = fold_lossless(sp.model, None, heldout, atol=atol, mode="provable", latency=latency,
                         progress=progress, input_range=_range(model))
    folded = fold.model
    rep = SparseFoldReport(
        sparsify=sp.report, lossless=fold.report, params_dense=sp.report.params_before,
        params_folded=fold.report.params_after,
        params_removed_pct=100.0 * (sp.report.params_before - fold.report.params_after)
        / sp.report.params_before,
        max_abs_logit_delta_fold=fold.report.max_abs_logit_delta,
        max_abs_logit_delta_vs_dense=max_abs_logit_delta(model, folded, heldout),
        metrics_dense=sp.report.metrics_dense, metrics_sparse=sp.report.metrics_sparse,
        metrics_folded=classification_metrics(folded, val_ds) if val_ds is not None else {})
    return SparseFoldResult(folded, sp.model, rep)


def _range(model: nn.Module) -> tuple[float, float]:

    return input_range_of(model)
