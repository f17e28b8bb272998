"""Partial retraining of the final layer (and optionally the last block).

Three ways to change less than the whole model, cheapest first:

* :func:`finetune_classifier` - gradient fine-tune of the classifier ``nn.Linear`` on cached
  penultimate :class:`~medscalpel.engine.predict.Features` (a few hundred AdamW steps on an
  ``[N, C]`` matrix: seconds, no image is read). ``classes=`` restricts training to some rows;
  the other rows are restored after every step, so they stay bit-identical.
* :func:`reoptimize_classifier` - "F re-optimization": refit the final layer by regularised
  logistic regression (scikit-learn ``LogisticRegression``; one binary model per class for
  multi-label, one multinomial model for multi-class) on standardised features, with ``C``
  chosen on validation, and the standardisation folded back into ``W`` and ``b`` exactly.
* :func:`finetune_last_block` - fine-tune the last backbone block plus the classifier on images
  (everything else frozen, frozen BatchNorm statistics kept). The block is found by
  :func:`last_block_parameters` (or named with ``block=``).

Each returns a :class:`RetrainResult` with trainable parameters, seconds, and per-class AUROC
before / after on held-out features (or images).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from torch import nn

from medscalpel.engine.device import resolve_device
from medscalpel.engine.metrics import auroc
from medscalpel.engine.predict import Features, check_compatible, make_loader, predict
from medscalpel.engine.train import default_loss, seed_everything
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.models.classifier import MedClassifier
from medscalpel.progress import track
from medscalpel.repair.surgery import class_index
from medscalpel.repair.surgery.helpers import class_probs, label_k
from medscalpel.runs import write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1


# ----------------------------------------------------------------------------- helpers
def per_class_auroc(logits: np.ndarray, labels: np.ndarray, task: str,
                    class_names: Sequence[str]) -> dict[str, float]:
    """AUROC of every class (NaN labels ignored; NaN when a class lacks positives/negatives)."""

    probs = class_probs(logits, task)
    out = {}
    for j, n in enumerate(class_names):
        y = label_k(labels, j, task)
        known = np.isfinite(y)
        out[n] = auroc(y[known] > 0.5, probs[known, j])
    return out


def _macro(d: dict[str, float], names: Sequence[str] | None = None) -> float:
    vals = [v for n, v in d.items() if (names is None or n in names) and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _rows(classes: Sequence[int | str] | None, names: Sequence[str], owner: str) -> list[int]:

    if classes is None:
        return list(range(len(names)))
    out = sorted({class_index(names, c, owner) for c in classes})
    if not out:
        raise ConfigError(f"{owner}: 'classes' is empty; give at least one class or None for all.")
    return out


def _check_feats(train: Features, others: Sequence[Features | None], owner: str) -> None:
    if not isinstance(train, Features):
        raise DataError(f"{owner}: 'train' must be a Features (cached penultimate features); got "
                        f"{type(train).__name__}. Use extract_features(model, dataset).")
    for f in others:
        if f is None:
            continue
        if tuple(f.class_names) != tuple(train.class_names) or \
                f.features.shape[1] != train.features.shape[1]:
            raise DataError(f"{owner}: the features of split {f.split!r} do not match the training "
                            f"features (classes or channel count differ).")
    if len(train.ids) == 0:
        raise DataError(f"{owner}: the training features are empty.")


def _logits(f: Features, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return f.features.astype(np.float64) @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)


# ----------------------------------------------------------------------------- result
@dataclass
class RetrainResult:
    """A new final layer (and model, when one was given) with its held-out report."""

    method: str
    weight: np.ndarray
    bias: np.ndarray
    classes: list[str]
    trainable_params: int
    total_params: int
    seconds: float
    auroc_before: dict[str, float]
    auroc_after: dict[str, float]
    held_out_split: str
    history: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    model: MedClassifier | None = field(default=None, repr=False)
    model_dir: str | None = None

    @property
    def macro_before(self) -> float:
        return _macro(self.auroc_before)

    @property
    def macro_after(self) -> float:
        return _macro(self.auroc_after)

    def apply(self, feats: Features) -> Features:
        """``feats`` with this result's classifier (features unchanged)."""
        return replace(feats, weight=self.weight.astype(np.float32),
                       bias=self.bias.astype(np.float32))

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "method": self.method, "classes": self.classes,
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "trainable_fraction": self.trainable_params / max(self.total_params, 1),
                "seconds": self.seconds, "held_out_split": self.held_out_split,
                "auroc_before": self.auroc_before, "auroc_after": self.auroc_after,
                "macro_auroc_before": self.macro_before, "macro_auroc_after": self.macro_after,
                "history": self.history, "settings": self.settings, "model_dir": self.model_dir}

    def save(self, out_dir: str | os.PathLike, model: MedClassifier | None = None) -> Path:
        """Write ``retrain.json`` and the retrained model directory (with lineage) when a model
        is held or given."""
        out = Path(out_dir)
        model = model if model is not None else self.model
        if model is not None:
            from medscalpel.models.checkpoint import save_model

            if model.card is None:
                raise ModelError("RetrainResult.save: the model has no ModelCard; load it with "
                                 "load_model or train it with medscalpel first.")
            new = model if self.model is model else with_classifier(model, self.weight, self.bias)
            card = model.card.with_lineage(
                self.method, parent=model.card.model_id, classes=self.classes,
                trainable_params=self.trainable_params, seconds=self.seconds,
                macro_auroc_before=self.macro_before, macro_auroc_after=self.macro_after,
                held_out_split=self.held_out_split, settings=self.settings)
            save_model(new, out, card)
            self.model_dir = str(out)
        write_json(out / "retrain.json", self.to_dict())
        return out


def with_classifier(model: MedClassifier, weight: np.ndarray, bias: np.ndarray) -> MedClassifier:
    """A copy of ``model`` whose classifier holds ``weight`` / ``bias``."""
    if tuple(weight.shape) != tuple(model.classifier.weight.shape):
        raise ModelError(f"with_classifier: weight {tuple(weight.shape)} does not fit the model's "
                         f"classifier {tuple(model.classifier.weight.shape)}.")
    new = copy.deepcopy(model)
    with torch.no_grad():
        new.classifier.weight.copy_(torch.from_numpy(np.asarray(weight, np.float32)))
        new.classifier.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))
    return new


def _finish(method, w, b, rows, names, n_trainable, total, t0, train, held, history, settings,
            model) -> RetrainResult:
    seconds = round(time.perf_counter() - t0, 3)
    ref = held if held is not None else train
    before = per_class_auroc(_logits(ref, train.weight, train.bias), ref.labels, ref.task, names)
    after = per_class_auroc(_logits(ref, w, b), ref.labels, ref.task, names)
    new_model = with_classifier(model, w, b) if model is not None else None
    return RetrainResult(method, np.asarray(w, np.float32), np.asarray(b, np.float32),
                         [names[r] for r in rows], int(n_trainable), int(total), seconds,
                         before, after, ref.split if held is not None else f"{ref.split} (train)",
                         history, settings, new_model)


# ----------------------------------------------------------------------------- fine-tune
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
    check_range(steps, "steps", owner, 1, integer=True)
    check_range(lr, "lr", owner, 0, low_inclusive=False)
    check_range(weight_decay, "weight_decay", owner, 0)
    check_range(batch_size, "batch_size", owner, 1, integer=True)
    check_range(eval_every, "eval_every", owner, 1, integer=True)
    check_in(pos_weight, "pos_weight", owner, ("none", "balanced"))
    names = tuple(train.class_names)
    rows = _rows(classes, names, owner)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(train.features, np.float32))
    y = torch.from_numpy(np.asarray(train.labels, np.float32 if train.task == "multilabel"
                                    else np.int64))
    lin = nn.Linear(x.shape[1], len(names))
    w0 = torch.from_numpy(np.asarray(train.weight, np.float32)).clone()
    b0 = torch.from_numpy(np.asarray(train.bias, np.float32)).clone()
    with torch.no_grad():
        lin.weight.copy_(w0)
        lin.bias.copy_(b0)
    frozen = [j for j in range(len(names)) if j not in rows]
    pw = None
    if pos_weight == "balanced" and train.task == "multilabel":
        lab = np.asarray(train.labels, np.float64)
        pos = np.nansum(lab, 0)
        neg = np.isfinite(lab).sum(0) - pos
        pw = torch.tensor(np.clip(neg / np.maximum(pos, 1), 1.0, 10.0), dtype=torch.float32)
    loss_f = _loss_fn(train.task, pw)
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    train_names = [names[r] for r in rows]

    def val_score() -> float:
        if val is None:
            return float("nan")
        with torch.no_grad():
            w, b = lin.weight.double().numpy(), lin.bias.double().numpy()
        return _macro(per_class_auroc(_logits(val, w, b), val.labels, val.task, names),
                      train_names)

    best = (val_score(), w0.clone(), b0.clone(), 0)
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
        if val is not None and (step % eval_every == 0 or step == steps):
            s = val_score()
            history.append({"step": step, "train_loss": float(np.mean(losses[-eval_every:])),
                            "val_macro_auroc": s})
            if np.isfinite(s) and (not np.isfinite(best[0]) or s > best[0]):
                best = (s, lin.weight.detach().clone(), lin.bias.detach().clone(), step)
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


# ----------------------------------------------------------------------------- F re-opt
def reoptimize_classifier(
    train: Features,
    val: Features | None = None,
    held_out: Features | None = None,
    *,
    model: MedClassifier | None = None,
    classes: Sequence[int | str] | None = None,
    Cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0, 10.0),  # noqa: N803 - scikit-learn's name
    select: str = "logloss",
    max_iter: int = 500,
    seed: int = 0,
    progress: bool | None = None,
) -> RetrainResult:
    """Refit the final layer by L2-regularised logistic regression on cached features.

    Multi-label: one binary ``LogisticRegression`` per class (rows with a NaN label skipped);
    multi-class: one multinomial model for all rows. Features are standardised (train mean/std)
    and the scaling is folded back: ``W = coef / std``, ``b = intercept - coef @ (mean / std)``.
    ``C`` is chosen per class (per model for multi-class) on ``val`` by log-loss
    (``select="logloss"``) or AUROC; without ``val`` a seeded 20 % of ``train`` is held out for
    the choice and the chosen ``C`` is refitted on all of ``train``. A class without both labels
    in the training rows keeps its old row.
    """

    owner = "reoptimize_classifier"
    _check_feats(train, [val, held_out], owner)
    check_in(select, "select", owner, ("logloss", "auroc"))
    check_range(max_iter, "max_iter", owner, 1, integer=True)
    Cs = [float(check_range(c, "Cs", owner, 0, low_inclusive=False)) for c in Cs]
    if not Cs:
        raise ConfigError(f"The 'Cs' parameter of {owner} must hold at least one value.")
    names = tuple(train.class_names)
    rows = _rows(classes, names, owner)
    t0 = time.perf_counter()
    x_all = train.features.astype(np.float64)
    mu = x_all.mean(0)
    sd = x_all.std(0)
    sd[sd < 1e-12] = 1.0
    if val is None:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(x_all.shape[0])
        n_hold = max(1, int(round(0.2 * x_all.shape[0])))
        fit_rows, sel_rows = perm[n_hold:], perm[:n_hold]
        xs_fit, xs_sel = (x_all[fit_rows] - mu) / sd, (x_all[sel_rows] - mu) / sd
        lab_fit, lab_sel = np.asarray(train.labels)[fit_rows], np.asarray(train.labels)[sel_rows]
    else:
        xs_fit = (x_all - mu) / sd
        xs_sel = (val.features.astype(np.float64) - mu) / sd
        lab_fit, lab_sel = np.asarray(train.labels), np.asarray(val.labels)
    w = np.asarray(train.weight, np.float64).copy()
    b = np.asarray(train.bias, np.float64).copy()
    history: list[dict[str, Any]] = []

    def fit(xf, yf, c):
        return LogisticRegression(C=c, max_iter=max_iter, tol=1e-4).fit(xf, yf)

    def score(clf, xs, ys) -> float:
        p = clf.predict_proba(xs)
        if select == "auroc":
            if p.shape[1] == 2:
                return auroc(ys == clf.classes_[1], p[:, 1])
            return float(np.nanmean([auroc(ys == c, p[:, i]) for i, c in enumerate(clf.classes_)]))
        return -float(log_loss(ys, p, labels=clf.classes_))

    if train.task == "multiclass":
        if classes is not None and len(rows) != len(names):
            raise ConfigError(f"{owner}: a multinomial refit changes every row; 'classes' must be "
                              "None for multi-class models.")
        yf, ys = lab_fit.astype(int), lab_sel.astype(int)
        if np.unique(yf).size != len(names):
            raise DataError(f"{owner}: every class needs training images for a multinomial refit; "
                            f"present: {sorted(np.unique(yf).tolist())} of {len(names)}.")
        best = None
        for c in track(Cs, "F re-optimization", progress=progress):
            clf = fit(xs_fit, yf, c)
            s = score(clf, xs_sel, ys)
            history.append({"C": c, "score": s})
            if best is None or s > best[0]:
                best = (s, c, clf)
        _, c_best, clf = best
        if val is None:
            clf = fit((x_all - mu) / sd, np.asarray(train.labels).astype(int), c_best)
        coef, icpt = clf.coef_, clf.intercept_
        if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2])[1]
            coef, icpt = np.vstack([-coef / 2, coef / 2]), np.r_[-icpt / 2, icpt / 2]
        w = coef / sd
        b = icpt - coef @ (mu / sd)
        chosen = {"all": c_best}
    else:
        chosen = {}
        for j in track(rows, "F re-optimization", progress=progress):
            kf, ks = np.isfinite(lab_fit[:, j]), np.isfinite(lab_sel[:, j])
            yf, ys = lab_fit[kf, j] > 0.5, lab_sel[ks, j] > 0.5
            if yf.all() or not yf.any() or ys.all() or not ys.any():
                history.append({"class": names[j], "skipped": "needs positives and negatives in "
                                "the fitting and selection rows"})
                continue
            best = None
            for c in Cs:
                clf = fit(xs_fit[kf], yf, c)
                s = score(clf, xs_sel[ks], ys)
                history.append({"class": names[j], "C": c, "score": s})
                if best is None or s > best[0]:
                    best = (s, c, clf)
            _, c_best, clf = best
            if val is None:
                kall = np.isfinite(np.asarray(train.labels)[:, j])
                clf = fit(((x_all - mu) / sd)[kall], np.asarray(train.labels)[kall, j] > 0.5,
                          c_best)
            w[j] = clf.coef_[0] / sd
            b[j] = clf.intercept_[0] - clf.coef_[0] @ (mu / sd)
            chosen[names[j]] = c_best
    settings = {"Cs": Cs, "select": select, "chosen_C": chosen, "max_iter": max_iter,
                "selected_on": val.split if val is not None else "20% of train"}
    total = model.num_parameters() if model is not None else w.size + b.size
    return _finish("f_reoptimization", w, b, rows, names, len(rows) * (w.shape[1] + 1), total,
                   t0, train, held_out, history, settings, model)


# ----------------------------------------------------------------------------- last block
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
        prefixes = [block] if isinstance(block, str) else list(block)
        out = []
        for p in prefixes:
            hit = [n for n in names if n == p or n.startswith(p + ".")]
            if not hit:
                raise ModelError(f"last_block_parameters: no parameter under {p!r} in "
                                 f"{model.arch}; e.g. {names[:3]}...")
            out += hit
        return sorted(set(out) | {n for n in names if n.startswith("classifier.")},
                      key=names.index)
    total = sum(p.numel() for p in model.backbone.parameters())
    best_name, best_len = None, 0
    for qn, mod in model.backbone.named_modules():
        if isinstance(mod, (nn.Sequential, nn.ModuleList)):
            kids = [c for c in mod.children() if any(True for _ in c.parameters())]
            if len(kids) >= best_len:
                best_name, best_len = qn, len(kids)
    if best_name is None or best_len == 0:
        raise ModelError(f"last_block_parameters: cannot find a block sequence in {model.arch}; "
                         "name the block with block='backbone.<module>'.")
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
    new = copy.deepcopy(model)
    dev = resolve_device(device)
    seed_everything(seed)
    new.to(dev)
    params = []
    for n, p in new.named_parameters():
        p.requires_grad_(n in names_tr)
        if n in names_tr:
            params.append(p)
    trained_mods = {n.rsplit(".", 1)[0] for n in names_tr}
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    loss_f = default_loss(train_ds.task, None)
    ref = held_out_ds if held_out_ds is not None else train_ds
    before = predict(model, ref, batch_size=max(batch_size, 64), device=dev, progress=False)
    history = []
    steps_per_epoch = math.ceil(len(train_ds) / batch_size)
    if max_steps:
        steps_per_epoch = min(steps_per_epoch, max_steps)
    try:
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
    finally:
        for p in new.parameters():
            p.requires_grad_(True)
        new.eval()
        new.cpu()
    after = predict(new, ref, batch_size=max(batch_size, 64), device="cpu", progress=False)
    cn = tuple(ref.class_names)
    w = new.classifier.weight.detach().numpy().copy()
    b = new.classifier.bias.detach().numpy().copy()
    res = RetrainResult("last_block_finetune", w, b, list(cn), n_trainable,
                        model.num_parameters(), round(time.perf_counter() - t0, 3),
                        per_class_auroc(before.logits, before.labels, before.task, cn),
                        per_class_auroc(after.logits, after.labels, after.task, cn),
                        ref.split, history,
                        {"block": sorted(trained_mods), "epochs": epochs, "lr": lr,
                         "batch_size": batch_size, "max_steps": max_steps, "seed": seed},
                        new)
    return res
