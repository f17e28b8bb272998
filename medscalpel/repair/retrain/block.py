"""Fine-tune of the last backbone block plus the classifier on images
(:func:`finetune_last_block`), and how that block is found (:func:`last_block_parameters`)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medscalpel.engine.device import resolve_device
from medscalpel.engine.predict import check_compatible, make_loader, predict
from medscalpel.engine.train import default_loss, seed_everything
from medscalpel.errors import ConfigError, ModelError
from medscalpel.models.classifier import MedClassifier
from medscalpel.progress import track
from medscalpel.repair.retrain.result import RetrainResult, per_class_auroc
from medscalpel.validation import check_range


# ----------------------------------------------------------------------------- the block
def _named_block(model: MedClassifier, names: list[str], block: str | Sequence[str]) -> list[str]:
    """The parameters under the named module(s), and the classifier's, in model order."""
    prefixes = [block] if isinstance(block, str) else list(block)
    out = []
    for p in prefixes:
        hit = [n for n in names if n == p or n.startswith(p + ".")]
        if not hit:
            raise ModelError(f"last_block_parameters: no parameter under {p!r} in "
                             f"{model.arch}; e.g. {names[:3]}...")
        out += hit
    return sorted(set(out) | {n for n in names if n.startswith("classifier.")}, key=names.index)


def _block_sequence(model: MedClassifier) -> tuple[str, int]:
    """The backbone's longest ``nn.Sequential`` / ``nn.ModuleList`` of parametrised children:
    its qualified name and length."""
    best_name, best_len = None, 0
    for qn, mod in model.backbone.named_modules():
        if isinstance(mod, (nn.Sequential, nn.ModuleList)):
            kids = [c for c in mod.children() if any(True for _ in c.parameters())]
            if len(kids) >= best_len:
                best_name, best_len = qn, len(kids)
    if best_name is None or best_len == 0:
        raise ModelError(f"last_block_parameters: cannot find a block sequence in {model.arch}; "
                         "name the block with block='backbone.<module>'.")
    return best_name, best_len


def last_block_parameters(model: MedClassifier, block: str | Sequence[str] | None = None
                          ) -> list[str]:
    """Names of the parameters a last-block fine-tune trains (classifier included).

    With ``block`` (a qualified module name or several), its parameters. Otherwise the backbone's
    longest ``nn.Sequential`` / ``nn.ModuleList`` of parametrised children is found (DenseNet's
    ``features``, a ResNet's stage list, a ViT's ``blocks``), and its last child holding at least
    5 % of the backbone's parameters is the last block; it and every backbone parameter registered
    after it (e.g. DenseNet's ``norm5``, a ViT's final norm) are trained.
    """
    names = [n for n, _ in model.named_parameters()]
    if block is not None:
        return _named_block(model, names, block)
    total = sum(p.numel() for p in model.backbone.parameters())
    best_name, _ = _block_sequence(model)
    seq = model.backbone.get_submodule(best_name) if best_name else model.backbone
    start = None
    for cname, child in reversed(list(seq.named_children())):
        if sum(p.numel() for p in child.parameters()) >= 0.05 * total:
            start = f"backbone.{best_name + '.' if best_name else ''}{cname}"
            break
    if start is None:
        raise ModelError(f"last_block_parameters: no block of {model.arch} holds 5% of the "
                         "backbone's parameters; name it with block=.")
    first = next(i for i, n in enumerate(names) if n.startswith(start + "."))
    return [n for i, n in enumerate(names)
            if (i >= first and n.startswith("backbone.")) or n.startswith("classifier.")]


# ----------------------------------------------------------------------------- fine-tune
def _trainable_copy(model: MedClassifier, names_tr: set[str], device: str | None, seed: int
                    ) -> tuple[MedClassifier, Any, list[torch.nn.Parameter]]:
    """A seeded copy of ``model`` on the device with only ``names_tr`` requiring gradients:
    the copy, the device and the trained parameters."""
    new = copy.deepcopy(model)
    dev = resolve_device(device)
    seed_everything(seed)
    new.to(dev)
    params = []
    for n, p in new.named_parameters():
        p.requires_grad_(n in names_tr)
        if n in names_tr:
            params.append(p)
    return new, dev, params


def _train_block(new: MedClassifier, opt: torch.optim.Optimizer, loss_f, train_ds,
                 trained_mods: set[str], dev: Any, *, epochs: int, batch_size: int,
                 steps_per_epoch: int, seed: int, owner: str, progress: bool | None
                 ) -> list[dict[str, Any]]:
    """The epochs: frozen modules in eval mode, the trained ones in train mode. Returns the
    per-epoch mean training loss."""
    history = []
    for epoch in range(epochs):
        new.eval()
        for qn, mod in new.named_modules():
            if qn in trained_mods:
                mod.train()
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        loader = make_loader(train_ds, batch_size, shuffle=True, generator=gen)
        losses = []
        for step, (x, y) in enumerate(track(loader, f"last block {epoch + 1}/{epochs}",
                                            progress=progress)):
            if step >= steps_per_epoch:
                break
            loss = loss_f(new(x.to(dev)).float(), y.to(dev), x)
            if not torch.isfinite(loss):
                raise ConfigError(f"{owner}: the loss is not finite (epoch {epoch + 1}, step "
                                  f"{step}); lower lr.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses))})
    return history


def finetune_last_block(
    model: MedClassifier,
    train_ds,
    held_out_ds=None,
    *,
    block: str | Sequence[str] | None = None,
    epochs: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    max_steps: int | None = None,
    seed: int = 0,
    device: str | None = "auto",
    progress: bool | None = None,
) -> RetrainResult:
    """Fine-tune the last backbone block and the classifier on images; the rest stays frozen.

    A small loop rather than :func:`medscalpel.engine.train.train`, whose ``trainable`` setting
    knows only ``all`` and ``classifier``. Frozen modules stay in eval mode (their BatchNorm
    statistics are kept); the trained block is in train mode. The caller's model is not changed.
    Per-class AUROC before / after is measured on ``held_out_ds`` (or ``train_ds``).
    """

    owner = "finetune_last_block"
    check_range(epochs, "epochs", owner, 1, integer=True)
    check_range(lr, "lr", owner, 0, low_inclusive=False)
    check_range(batch_size, "batch_size", owner, 1, integer=True)
    check_compatible(model, train_ds)
    train_ds.require_nonempty()
    t0 = time.perf_counter()
    names_tr = set(last_block_parameters(model, block))
    new, dev, params = _trainable_copy(model, names_tr, device, seed)
    trained_mods = {n.rsplit(".", 1)[0] for n in names_tr}
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    loss_f = default_loss(train_ds.task, None)
    ref = held_out_ds if held_out_ds is not None else train_ds
    before = predict(model, ref, batch_size=max(batch_size, 64), device=dev, progress=False)
    steps_per_epoch = math.ceil(len(train_ds) / batch_size)
    if max_steps:
        steps_per_epoch = min(steps_per_epoch, max_steps)
    try:
        history = _train_block(new, opt, loss_f, train_ds, trained_mods, dev, epochs=epochs,
                               batch_size=batch_size, steps_per_epoch=steps_per_epoch, seed=seed,
                               owner=owner, progress=progress)
    finally:
        for p in new.parameters():
            p.requires_grad_(True)
        new.eval()
        new.cpu()
    after = predict(new, ref, batch_size=max(batch_size, 64), device="cpu", progress=False)
    cn = tuple(ref.class_names)
    w = new.classifier.weight.detach().numpy().copy()
    b = new.classifier.bias.detach().numpy().copy()
    return RetrainResult("last_block_finetune", w, b, list(cn), n_trainable,
                         model.num_parameters(), round(time.perf_counter() - t0, 3),
                         per_class_auroc(before.logits, before.labels, before.task, cn),
                         per_class_auroc(after.logits, after.labels, after.task, cn),
                         ref.split, history,
                         {"block": sorted(trained_mods), "epochs": epochs, "lr": lr,
                          "batch_size": batch_size, "max_steps": max_steps, "seed": seed},
                         new)
