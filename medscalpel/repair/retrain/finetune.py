"""Gradient fine-tune of the classifier ``nn.Linear`` on cached penultimate features
(:func:`finetune_classifier`): AdamW steps on an ``[N, C]`` matrix, untrained rows restored after
every step, the weights with the best validation macro AUROC kept."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medscalpel.engine.predict import Features
from medscalpel.errors import ConfigError
from medscalpel.models.classifier import MedClassifier
from medscalpel.progress import track
from medscalpel.repair.retrain.result import (RetrainResult, _check_feats, _finish, _logits,
                                              _macro, _rows, per_class_auroc)
from medscalpel.validation import check_in, check_range


def _loss_fn(task: str, pos_weight: torch.Tensor | None):
    if task == "multilabel":
        bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")

        def loss(z, y):
            known = torch.isfinite(y)
            per = bce(z, torch.where(known, y, torch.zeros_like(y))) * known
            return per.sum() / known.sum().clamp(min=1)

        return loss
    ce = nn.CrossEntropyLoss()
    return lambda z, y: ce(z, y)


def _check_settings(owner: str, steps: int, lr: float, weight_decay: float, batch_size: int,
                    eval_every: int, pos_weight: str) -> None:
    check_range(steps, "steps", owner, 1, integer=True)
    check_range(lr, "lr", owner, 0, low_inclusive=False)
    check_range(weight_decay, "weight_decay", owner, 0)
    check_range(batch_size, "batch_size", owner, 1, integer=True)
    check_range(eval_every, "eval_every", owner, 1, integer=True)
    check_in(pos_weight, "pos_weight", owner, ("none", "balanced"))


def _tensors(train: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels as tensors (float labels for multi-label, class indices otherwise)."""
    x = torch.from_numpy(np.ascontiguousarray(train.features, np.float32))
    y = torch.from_numpy(np.asarray(train.labels, np.float32 if train.task == "multilabel"
                                    else np.int64))
    return x, y


def _start_layer(train: Features, n_in: int, n_out: int
                 ) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A linear layer holding the features' own classifier, and copies of its weight / bias."""
    lin = nn.Linear(n_in, n_out)
    w0 = torch.from_numpy(np.asarray(train.weight, np.float32)).clone()
    b0 = torch.from_numpy(np.asarray(train.bias, np.float32)).clone()
    with torch.no_grad():
        lin.weight.copy_(w0)
        lin.bias.copy_(b0)
    return lin, w0, b0


def _pos_weight(train: Features, pos_weight: str) -> torch.Tensor | None:
    """``balanced``: neg/pos per class, clipped to [1, 10] (multi-label only); else ``None``."""
    if pos_weight == "balanced" and train.task == "multilabel":
        lab = np.asarray(train.labels, np.float64)
        pos = np.nansum(lab, 0)
        neg = np.isfinite(lab).sum(0) - pos
        return torch.tensor(np.clip(neg / np.maximum(pos, 1), 1.0, 10.0), dtype=torch.float32)
    return None


def _val_score(lin: nn.Linear, val: Features | None, names: Sequence[str],
               train_names: Sequence[str]) -> float:
    """Validation macro AUROC of the trained classes under ``lin`` (NaN without ``val``)."""
    if val is None:
        return float("nan")
    with torch.no_grad():
        w, b = lin.weight.double().numpy(), lin.bias.double().numpy()
    return _macro(per_class_auroc(_logits(val, w, b), val.labels, val.task, names), train_names)


def _train_steps(lin: nn.Linear, x: torch.Tensor, y: torch.Tensor, *, loss_f: Callable,
                 g: torch.Generator, frozen: list[int], w0: torch.Tensor, b0: torch.Tensor,
                 score: Callable[[], float], has_val: bool, steps: int, lr: float,
                 weight_decay: float, batch_size: int, eval_every: int, owner: str,
                 progress: bool | None) -> tuple[list[dict[str, Any]], tuple, list[float]]:
    """The AdamW / cosine loop: frozen rows restored after each step, ``score`` checked every
    ``eval_every`` steps. Returns the history, the best ``(score, W, b, step)`` and the losses."""
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    best = (score(), w0.clone(), b0.clone(), 0)
    history: list[dict[str, Any]] = [{"step": 0, "val_macro_auroc": best[0]}]
    n = x.shape[0]
    losses: list[float] = []
    for step in track(range(1, steps + 1), "fine-tune classifier", progress=progress):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        loss = loss_f(lin(x[idx]), y[idx])
        if not torch.isfinite(loss):
            raise ConfigError(f"{owner}: the loss is not finite at step {step}; lower lr "
                              f"(now {lr}) or check the features for NaN.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if frozen:
            with torch.no_grad():
                lin.weight[frozen] = w0[frozen]
                lin.bias[frozen] = b0[frozen]
        losses.append(float(loss.detach()))
        if has_val and (step % eval_every == 0 or step == steps):
            s = score()
            history.append({"step": step, "train_loss": float(np.mean(losses[-eval_every:])),
                            "val_macro_auroc": s})
            if np.isfinite(s) and (not np.isfinite(best[0]) or s > best[0]):
                best = (s, lin.weight.detach().clone(), lin.bias.detach().clone(), step)
    return history, best, losses


def finetune_classifier(
    train: Features,
    val: Features | None = None,
    held_out: Features | None = None,
    *,
    model: MedClassifier | None = None,
    classes: Sequence[int | str] | None = None,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    pos_weight: str = "none",
    eval_every: int = 25,
    seed: int = 0,
    progress: bool | None = None,
) -> RetrainResult:
    """Fine-tune the classifier on cached features (AdamW, BCE / CE).

    Starts from the features' own classifier (``train.weight``, ``train.bias``). With ``val``,
    the weights with the best validation macro AUROC over the trained classes are kept
    (checked every ``eval_every`` steps, the starting point included), so a fine-tune that does
    not help returns the original layer.

    Args:
        train, val, held_out: cached features (``held_out`` only for the before/after report).
        model: optional model; the result then carries a copy with the new classifier.
        classes: rows to train (others are restored after each step: bit-identical).
        steps, lr, weight_decay, batch_size: optimisation settings.
        pos_weight: ``none`` or ``balanced`` (neg/pos per class, capped at 10; multi-label).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> f = rng.normal(size=(64, 4)).astype(np.float32)
        >>> y = (f[:, :1] > 0).astype(np.float32)
        >>> feats = Features(f, np.zeros((1, 4), np.float32), np.zeros(1, np.float32), y,
        ...                  tuple(map(str, range(64))), ("a",), "multilabel")
        >>> r = finetune_classifier(feats, feats, steps=50, progress=False)
        >>> r.auroc_after["a"] > 0.9
        True
    """
    owner = "finetune_classifier"
    _check_feats(train, [val, held_out], owner)
    _check_settings(owner, steps, lr, weight_decay, batch_size, eval_every, pos_weight)
    names = tuple(train.class_names)
    rows = _rows(classes, names, owner)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = _tensors(train)
    lin, w0, b0 = _start_layer(train, x.shape[1], len(names))
    frozen = [j for j in range(len(names)) if j not in rows]
    train_names = [names[r] for r in rows]
    history, best, losses = _train_steps(
        lin, x, y, loss_f=_loss_fn(train.task, _pos_weight(train, pos_weight)), g=g,
        frozen=frozen, w0=w0, b0=b0, score=lambda: _val_score(lin, val, names, train_names),
        has_val=val is not None, steps=steps, lr=lr, weight_decay=weight_decay,
        batch_size=batch_size, eval_every=eval_every, owner=owner, progress=progress)
    if val is None:
        w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
        history.append({"step": steps, "train_loss": float(np.mean(losses[-eval_every:]))})
        best_step = steps
    else:
        w, b, best_step = best[1].numpy(), best[2].numpy(), best[3]
    settings = {"steps": steps, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                "pos_weight": pos_weight, "seed": seed, "best_step": best_step,
                "selected_on": val.split if val is not None else None}
    total = model.num_parameters() if model is not None else x.shape[1] * len(names) + len(names)
    return _finish("classifier_finetune", w, b, rows, names, len(rows) * (x.shape[1] + 1), total,
                   t0, train, held_out, history, settings, model)
