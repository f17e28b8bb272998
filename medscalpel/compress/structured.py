"""Structured (channel) pruning with real speedup, on Torch-Pruning dependency graphs.

Torch-Pruning traces the model once and groups every layer whose channels are coupled (DenseNet
concatenations, ResNet residual additions, BN after conv, the classifier's input), so removing a
channel removes it consistently everywhere and the result is a physically smaller model that
reloads from medscalpel's own files (``save_model`` / ``load_model`` conform the layer shapes).

Criteria come from :mod:`medscalpel.compress.importance` (``l1``, ``l2``, ``bn_scale``,
``taylor``, ``lrp``, ``ig``; ``backtrace`` (native DL-Backtrace)). The classifier's outputs are
never pruned. Pruning can be per layer (local) or global, one-shot or iterative with a recovery
fine-tune after each step (optionally distilling from the unpruned model).

Example:
    >>> import torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("resnet_tiny", num_classes=2, img_size=32)
    >>> r = prune_structured(m, torch.randn(4, 1, 32, 32), "l1", ratio=0.5,
    ...                      measure_latency=False, progress=False)
    >>> r.params_after < r.params_before and r.model(torch.zeros(1, 1, 32, 32)).shape[1] == 2
    True
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from medscalpel.compress.distill import teacher_loss
from medscalpel.compress.importance import (Criterion, L1Criterion, RelevanceCriterion,
                                            ScoresCriterion, make_criterion)
from medscalpel.compress.measure import (count_macs, count_parameters, latency_pair,
                                         max_abs_logit_delta)
from medscalpel.deploy.runtimes import RUNTIMES, runtime_latency, vector_width
from medscalpel.engine.train import TrainConfig, train
from medscalpel.errors import ConfigError, ModelError
from medscalpel.models.checkpoint import save_model
from medscalpel.progress import track
from medscalpel.runs import write_json
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

OWNER = "prune_structured"


# ----------------------------------------------------------------------------- settings
@dataclass
class RecoveryConfig:
    """Recovery fine-tune after pruning (through :func:`medscalpel.engine.train.train`).

    Attributes:
        epochs: total fine-tune epochs, spread over the iterative steps (the last step gets the
            remainder); 0 disables recovery.
        lr: learning rate (AdamW, cosine schedule).
        distill_from_dense: add a distillation term from the unpruned model's logits.
        soft_weight: weight of the teacher (the unpruned model) in the one distillation loss
            :class:`~medscalpel.compress.distill.DistillLoss`:
            ``(1 - soft_weight) * task + soft_weight * T^2 * soft``.
        T: distillation temperature.
    """

    epochs: int = 0
    lr: float = 5e-4
    distill_from_dense: bool = False
    soft_weight: float = 0.5
    T: float = 2.0
    batch_size: int = 32
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    max_steps_per_epoch: int | None = None

    def validate(self) -> "RecoveryConfig":
        o = "RecoveryConfig"
        check_range(self.epochs, "epochs", o, 0, integer=True)
        check_range(self.lr, "lr", o, 0, low_inclusive=False)
        check_range(self.soft_weight, "soft_weight", o, 0.0, 1.0)
        check_range(self.T, "T", o, 0, low_inclusive=False)
        check_range(self.batch_size, "batch_size", o, 1, integer=True)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- result
@dataclass
class PruneResult:
    """What :func:`prune_structured` did.

    Attributes:
        model: the pruned model (``None`` for a dry run); its ``card`` carries the lineage.
        layers: per layer (qualified name) ``{"before": channels, "after": channels,
            "removed": n}`` for every Conv/Linear/BatchNorm whose width changed.
        steps: one record per iterative step (channels removed per root layer, params, MACs,
            recovery history).
        speedup_macs: MACs before / after (theoretical speedup).
        latency: CPU latency of the dense and pruned model measured alternately in this run
            (``a_ms`` dense, ``b_ms`` pruned, ``ratio`` = measured speedup), or ``None``.
        max_abs_logit_delta: max |logit(pruned) - logit(dense)| on the calibration images.
    """

    model: nn.Module | None
    criterion: dict[str, Any]
    ratio: float
    target_speedup: float | None
    global_pruning: bool
    iterative_steps: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: dict[str, dict[str, int]]
    steps: list[dict[str, Any]]
    recovery: dict[str, Any] | None
    latency: dict[str, float] | None
    max_abs_logit_delta: float
    dry_run: bool
    seconds: float
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup_macs(self) -> float:
        return self.macs_before / self.macs_after if self.macs_after else float("nan")

    @property
    def param_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "criterion": self.criterion, "ratio": self.ratio,
                "target_speedup": self.target_speedup, "global_pruning": self.global_pruning,
                "iterative_steps": self.iterative_steps, "params_before": self.params_before,
                "params_after": self.params_after, "param_reduction": self.param_reduction,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "speedup_macs": self.speedup_macs, "latency": self.latency,
                "max_abs_logit_delta": self.max_abs_logit_delta, "dry_run": self.dry_run,
                "layers": self.layers, "steps": self.steps, "recovery": self.recovery,
                "seconds": self.seconds, "lineage": self.lineage}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the pruned model (``model.safetensors`` + ``model.json`` with lineage) and
        ``prune.json`` into ``directory``."""

        if self.model is None:
            raise ModelError("This PruneResult is a dry run: there is no pruned model to save. "
                             "Run prune_structured with dry_run=False.")
        if getattr(self.model, "card", None) is None:
            raise ModelError("The pruned model has no ModelCard (the input model had none); "
                             "set model.card (make_card) before pruning to save it.")
        directory = Path(directory)
        save_model(self.model, directory)
        write_json(directory / "prune.json", self.to_dict())
        return directory


# ----------------------------------------------------------------------------- helpers
def _widths(model: nn.Module) -> dict[str, int]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = int(m.num_features)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            out[name] = int(m.weight.shape[0])
    return out


def _layer_diff(before: dict[str, int], after: dict[str, int]) -> dict[str, dict[str, int]]:
    return {n: {"before": before[n], "after": after.get(n, 0), "removed": before[n] - after.get(n, 0)}
            for n in before if after.get(n, 0) != before[n]}


def _check_images(images: Any) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"The 'calib_images' parameter of {OWNER} must be a non-empty image "
                          f"tensor [N, C, H, W] (e.g. from engine.predict.collect_images). Got "
                          f"{shape} instead.")
    return images.detach().float().cpu()


def _task_of(model: nn.Module) -> str:
    card = getattr(model, "card", None)
    return card.task if card is not None else "multilabel"


def _ignored(model: nn.Module, ignored_layers: Sequence[str | nn.Module] | None) -> list[nn.Module]:
    out: list[nn.Module] = []
    clf = getattr(model, "classifier", None)
    if isinstance(clf, nn.Module):
        out.append(clf)  # never prune the classifier's outputs
    for item in ignored_layers or ():
        if isinstance(item, nn.Module):
            out.append(item)
            continue
        try:
            out.append(model.get_submodule(item))
        except AttributeError as exc:
            raise ConfigError(f"The 'ignored_layers' entry {item!r} of {OWNER} is not a layer of "
                              f"{getattr(model, 'arch', type(model).__name__)}. Use qualified names "
                              "as in model.named_modules().") from exc
    return out


def _ignored_names(model: nn.Module, ignored_layers: Sequence[str | nn.Module] | None) -> list[str]:
    names = {m: n for n, m in model.named_modules()}
    out = []
    for item in ignored_layers or ():
        if isinstance(item, nn.Module):
            if item not in names:
                raise ConfigError(f"An 'ignored_layers' module of {OWNER} ({type(item).__name__}) "
                                  "is not part of the model being pruned.")
            out.append(names[item])
        else:
            out.append(str(item))
    _ignored(model, out)  # validates the names
    return out


def _rounded_pruned(n_pruned: int, current: int, round_to: int) -> int:
    """Channels to prune so that the kept width is a multiple of ``round_to`` and at least
    ``round_to`` (nearest multiple; never all channels). Torch-Pruning's own rounding floors
    the kept width, which reaches 0 for narrow groups (DenseNet's bottlenecks at high ratios),
    and the group is then skipped entirely: ``round_to=16`` left densenet121 almost unpruned."""
    if current <= round_to:
        return 0
    keep = current - n_pruned
    keep = max(round_to, int(round(keep / round_to)) * round_to)
    return max(0, current - min(keep, current))


def _rounding_pruner_class():

    class RoundingPruner(tp.pruner.BasePruner):
        def _round_to(self, n_pruned, current_channels, round_to):  # noqa: D401 - TP hook
            return _rounded_pruned(int(n_pruned), int(current_channels), int(round_to))

    return RoundingPruner


def _make_pruner(model: nn.Module, example: torch.Tensor, importance, ratio: float,
                 global_pruning: bool, steps: int, max_layer_ratio: float,
                 ignored: list[nn.Module], round_to: int | None):

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # Torch-Pruning traces through autograd
            cls = _rounding_pruner_class() if round_to else tp.pruner.BasePruner
            return cls(
                model, example, importance=importance, global_pruning=global_pruning,
                pruning_ratio=ratio, iterative_steps=steps, max_pruning_ratio=max_layer_ratio,
                ignored_layers=ignored, round_to=round_to)
    except Exception as exc:  # Torch-Pruning raises plain errors on untraceable graphs
        raise ModelError(f"Torch-Pruning could not trace {getattr(model, 'arch', '?')} for "
                         f"structured pruning: {type(exc).__name__}: {exc}. Structured pruning "
                         "supports the zoo's DenseNet, ResNet and VGG models.") from exc
    finally:
        model.train(was_training)


def _prune_step(pruner, names: dict[nn.Module, str]) -> dict[str, int]:
    removed: dict[str, int] = {}
    for group in pruner.step(interactive=True):
        root = group[0].dep.target.module
        name = names.get(root, type(root).__name__)
        removed[name] = removed.get(name, 0) + len(group[0].idxs)
        group.prune()
    return removed


def _one_shot(model: nn.Module, images: torch.Tensor, targets, crit: Criterion, ratio: float,
              global_pruning: bool, max_layer_ratio: float, ignored_names: Sequence[str],
              round_to: int | None, task: str, batch_size: int) -> nn.Module:
    """Prune a copy of ``model`` in one step (used to search the ratio of a target speedup)."""
    m = copy.deepcopy(model)
    crit.prepare(m, images, targets, task=task, batch_size=batch_size, progress=False)
    try:
        pruner = _make_pruner(m, images[:1], crit.importance(), ratio, global_pruning, 1,
                              max_layer_ratio, _ignored(m, ignored_names), round_to)
        _prune_step(pruner, {mod: n for n, mod in m.named_modules()})
    finally:
        crit.finish(m)
    return m


#: ratio searches of local pruning, by (architecture, input, target, settings): see _solve_ratio
_RATIO_CACHE: dict[tuple, tuple[float, list[dict[str, float]]]] = {}


def _solve_ratio(model: nn.Module, images: torch.Tensor, targets, crit: Criterion,
                 target_speedup: float, global_pruning: bool, max_layer_ratio: float,
                 ignored_names: Sequence[str], round_to: int | None, task: str, batch_size: int,
                 macs_before: int, progress: bool | None) -> tuple[float, list[dict[str, float]]]:
    """False position on the channel ratio until MACs_before / MACs_after reaches ``target_speedup``.

    With local pruning the channel counts do not depend on the scores, so L1 is used for the
    search; with global pruning the criterion itself is used (attribution scores computed once).
    """
    key = None
    if not global_pruning:
        search_crit: Criterion = L1Criterion()
        # local pruning: the channel counts, hence the MACs, depend on the architecture and the
        # ratio only, not on the weights or the criterion: one search serves every criterion
        key = (tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
               tuple(images.shape[1:]), float(target_speedup), float(max_layer_ratio),
               tuple(ignored_names), round_to)
        if key in _RATIO_CACHE:
            r, trace = _RATIO_CACHE[key]
            return r, [dict(t, cached=True) for t in trace]
    elif isinstance(crit, RelevanceCriterion):
        crit.prepare(model, images, targets, task=task, batch_size=batch_size, progress=progress)
        search_crit = ScoresCriterion(crit.scores)
        crit.finish(model)
    else:
        search_crit = crit
    trace: list[dict[str, float]] = []

    def speedup(r: float) -> float:
        m = _one_shot(model, images, targets, search_crit, r, global_pruning, max_layer_ratio,
                      ignored_names, round_to, task, batch_size)
        s = macs_before / max(1, count_macs(m, images[:1]))
        trace.append({"ratio": round(r, 5), "speedup_macs": s})
        return s

    lo, hi = 0.0, max_layer_ratio
    s_hi = speedup(hi)
    if s_hi < target_speedup:
        raise ConfigError(
            f"The 'target_speedup' of {OWNER} ({target_speedup:g}x) cannot be reached: pruning "
            f"{hi:.0%} of the channels of every group gives only {s_hi:.2f}x fewer MACs. Ask for "
            "a smaller speedup, or raise max_layer_ratio.")
    # false position (Illinois) on log(speedup) against u = -log(1 - ratio): MACs of a layer
    # pruned on both sides fall like (1 - r)^2, so log(speedup) is close to linear in u and the
    # search needs ~3 prunings instead of ~10 bisection steps (each one traces the graph)
    u = lambda r: -math.log1p(-min(r, 0.999999))  # noqa: E731
    lt = math.log(target_speedup)
    f_lo, f_hi = -lt, math.log(s_hi) - lt          # speedup(0) = 1
    side = 0
    if math.exp(f_hi) - 1 < 0.01:
        return hi, trace
    for _ in track(range(14), "search ratio", progress=progress):
        u_lo, u_hi = u(lo), u(hi)
        um = u_hi - f_hi * (u_hi - u_lo) / (f_hi - f_lo) if f_hi != f_lo else 0.5 * (u_lo + u_hi)
        mid = min(max(1.0 - math.exp(-um), lo + 0.02 * (hi - lo)), hi - 0.02 * (hi - lo))
        fm = math.log(speedup(mid)) - lt
        if fm >= 0:
            hi, f_hi = mid, fm
            if side == 1:
                f_lo /= 2  # Illinois: the stale end point's value is halved
            side = 1
            if math.exp(fm) - 1 < 0.01:
                break
        else:
            lo, f_lo = mid, fm
            if side == -1:
                f_hi /= 2
            side = -1
        if hi - lo < 0.01:  # 1% of the channels: MACs move in channel-sized steps anyway
            break
    if key is not None:
        if len(_RATIO_CACHE) > 32:
            _RATIO_CACHE.clear()
        _RATIO_CACHE[key] = (hi, trace)
    return hi, trace


# ----------------------------------------------------------------------------- public API
def remove_channels(model: nn.Module, removals: Mapping[str, Sequence[int]],
                    example_inputs: torch.Tensor, inplace: bool = False) -> nn.Module:
    """Remove the given output channels of Conv/Linear layers and everything coupled to them
    (concatenations, residual additions, BN, consumers' input channels).

    This is the "apply" half of plan-then-apply: ``removals`` maps qualified layer names to the
    output-channel indices to delete (e.g. a plan you computed yourself).

    Raises:
        ModelError: a layer is unknown, is the classifier, or would lose every channel.
    """

    model = model if inplace else copy.deepcopy(model)
    clf = getattr(model, "classifier", None)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # Torch-Pruning traces through autograd
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs[:1])
        for name, idxs in removals.items():
            try:
                layer = model.get_submodule(name)
            except AttributeError as exc:
                raise ModelError(f"remove_channels: no layer '{name}' in "
                                 f"{getattr(model, 'arch', type(model).__name__)}.") from exc
            if layer is clf:
                raise ModelError(f"remove_channels: '{name}' is the classifier; its outputs (the "
                                 "classes) are never pruned.")
            if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                fn, width = tp.prune_conv_out_channels, layer.out_channels
            elif isinstance(layer, nn.Linear):
                fn, width = tp.prune_linear_out_channels, layer.out_features
            else:
                raise ModelError(f"remove_channels: '{name}' is a {type(layer).__name__}; give "
                                 "Conv or Linear layers (their coupled BN/consumers follow).")
            idxs = sorted({int(i) for i in idxs})
            bad = [i for i in idxs if i < 0 or i >= width]
            if bad:
                raise ModelError(f"remove_channels: channel(s) {bad[:5]} out of range for "
                                 f"'{name}' with {width} output channels.")
            if not idxs:
                continue
            group = dg.get_pruning_group(layer, fn, idxs)
            if not dg.check_pruning_group(group):
                raise ModelError(f"remove_channels: removing {len(idxs)} of {width} channels of "
                                 f"'{name}' would leave a coupled layer without channels.")
            group.prune()
    finally:
        model.train(was_training)
    return model


@dataclass
class _Job:
    """The validated inputs of one :func:`prune_structured` call (internal)."""

    images: torch.Tensor
    crit: Criterion
    rec: RecoveryConfig
    ratio: float | None
    task: str
    ignored_names: list[str]
    round_to: int | None
    measured: dict[str, Any] | None  # target_latency_ms / target_speedup_measured + runtime


def _validate(model, calib_images, criterion, ratio, target_speedup, iterative_steps, recovery,
              train_ds, calib_targets, max_layer_ratio, round_to, dry_run, batch_size,
              ignored_layers, target_latency_ms, target_speedup_measured, runtime,
              latency_batch) -> _Job:
    """Step 1: check every argument; one error per mistake, naming the fix."""
    images = _check_images(calib_images)
    targets = [n for n, v in (("ratio", ratio), ("target_speedup", target_speedup),
                              ("target_latency_ms", target_latency_ms),
                              ("target_speedup_measured", target_speedup_measured))
               if v is not None]
    if len(targets) > 1:
        raise ConfigError(f"{OWNER}: give one of 'ratio', 'target_speedup', 'target_latency_ms'"
                          f", 'target_speedup_measured', not both; got {targets}.")
    if not targets:
        ratio = 0.5
    if ratio is not None:
        check_range(ratio, "ratio", OWNER, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    if target_speedup is not None:
        check_range(target_speedup, "target_speedup", OWNER, 1.0, low_inclusive=False)
    if target_speedup_measured is not None:
        check_range(target_speedup_measured, "target_speedup_measured", OWNER, 1.0,
                    low_inclusive=False)
    if target_latency_ms is not None:
        check_range(target_latency_ms, "target_latency_ms", OWNER, 0.0, low_inclusive=False)
    check_range(iterative_steps, "iterative_steps", OWNER, 1, integer=True)
    check_range(max_layer_ratio, "max_layer_ratio", OWNER, 0.0, 1.0, low_inclusive=False,
                high_inclusive=False)
    check_range(batch_size, "batch_size", OWNER, 1, integer=True)
    check_range(latency_batch, "latency_batch", OWNER, 1, integer=True)
    if round_to is not None:
        check_range(round_to, "round_to", OWNER, 1, integer=True)
    measured = None
    if target_latency_ms is not None or target_speedup_measured is not None:
        RUNTIMES.get(runtime)  # unknown runtime names list the valid ones
        measured = {"target_latency_ms": target_latency_ms, "runtime": runtime,
                    "target_speedup_measured": target_speedup_measured,
                    "batch": latency_batch}
        round_to = vector_width() if round_to is None else round_to
    if not isinstance(getattr(model, "classifier", None), nn.Linear):
        raise ModelError(f"{OWNER} needs a MedClassifier (a model with a Linear 'classifier'); "
                         f"got {type(model).__name__}.")
    rec = (recovery or RecoveryConfig()).validate()
    if rec.epochs and not dry_run and train_ds is None:
        raise ConfigError(f"{OWNER}: recovery.epochs={rec.epochs} needs a 'train_ds' to "
                          "fine-tune on; pass train_ds or set recovery epochs to 0.")
    if calib_targets is not None and len(calib_targets) != images.shape[0]:
        raise ConfigError(f"{OWNER}: {len(calib_targets)} calib_targets for "
                          f"{images.shape[0]} calib_images.")
    crit = make_criterion(criterion)  # raises for unknown names
    if ratio is not None and isinstance(crit, ScoresCriterion) and not isinstance(
            crit, RelevanceCriterion) and iterative_steps > 1:
        raise ConfigError(f"{OWNER}: fixed channel scores fit the unpruned model only; use "
                          "iterative_steps=1 or a criterion that re-scores (lrp, ig, taylor).")
    return _Job(images, crit, rec, ratio, _task_of(model), _ignored_names(model, ignored_layers),
                round_to, measured)


def _solve_ratio_measured(model: nn.Module, job: _Job, calib_targets, global_pruning: bool,
                          max_layer_ratio: float, batch_size: int, progress: bool | None,
                          search_steps: int = 6) -> tuple[float, list[dict[str, float]]]:
    """Bisection on the ratio until the MEASURED latency in ``job.measured['runtime']`` reaches
    the target (an absolute ms or a speedup over the dense model timed right before each
    candidate, so that machine load affects both alike)."""
    spec = job.measured
    rt, b, example = spec["runtime"], spec["batch"], job.images[:1]
    threads = torch.get_num_threads()
    search_crit = L1Criterion() if not global_pruning else job.crit
    trace: list[dict[str, float]] = []

    def meets(r: float) -> bool:
        m = _one_shot(model, job.images, calib_targets, search_crit, r, global_pruning,
                      max_layer_ratio, job.ignored_names, job.round_to, job.task, batch_size)
        ms = runtime_latency(m, rt, example, b, threads)
        rec = {"ratio": round(r, 5), "ms": ms}
        if spec["target_latency_ms"] is not None:
            ok = ms <= spec["target_latency_ms"]
        else:
            dense_ms = runtime_latency(model, rt, example, b, threads)
            rec.update({"dense_ms": dense_ms, "speedup_measured": dense_ms / ms})
            ok = dense_ms / ms >= spec["target_speedup_measured"]
        trace.append(rec)
        return ok

    lo, hi = 0.0, max_layer_ratio
    if not meets(hi):
        goal = (f"{spec['target_latency_ms']:g} ms" if spec["target_latency_ms"] is not None
                else f"{spec['target_speedup_measured']:g}x measured")
        raise ConfigError(
            f"The latency target of {OWNER} ({goal} in {rt}, batch {b}) cannot be reached: "
            f"pruning {hi:.0%} of every group measures {trace[-1]['ms']:.3g} ms. Ask for less, "
            "raise max_layer_ratio, or try a faster runtime (compress deploy).")
    for _ in track(range(search_steps), "search ratio (measured)", progress=progress):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return hi, trace


def _plan(work: nn.Module, job: _Job, calib_targets, target_speedup, global_pruning,
          max_layer_ratio, batch_size, macs_before, progress) -> tuple[float, list[dict]]:
    """Step 2: the ratio to prune (given, searched on MACs, or searched on measured latency)."""
    if job.measured is not None:
        return _solve_ratio_measured(work, job, calib_targets, global_pruning, max_layer_ratio,
                                     batch_size, progress)
    if target_speedup is not None:
        return _solve_ratio(work, job.images, calib_targets, job.crit, target_speedup,
                            global_pruning, max_layer_ratio, job.ignored_names, job.round_to,
                            job.task, batch_size, macs_before, progress)
    return float(job.ratio), []


def _apply(work: nn.Module, dense: nn.Module, job: _Job, ratio: float, calib_targets,
           global_pruning, iterative_steps, max_layer_ratio, train_ds, val_ds, dry_run,
           batch_size, progress) -> list[dict[str, Any]]:
    """Steps 3-4: prune in ``iterative_steps`` steps, re-scoring, with a recovery fine-tune
    after each step when asked."""
    crit, rec, example = job.crit, job.rec, job.images[:1]
    names = {m: n for n, m in work.named_modules()}
    ignored = _ignored(work, job.ignored_names)
    pruner = None
    steps: list[dict[str, Any]] = []
    teacher = copy.deepcopy(dense).eval() if (rec.distill_from_dense and rec.epochs) else None
    for step in track(range(iterative_steps), f"prune {crit.name or 'scores'}", progress=progress):
        crit.prepare(work, job.images, calib_targets, task=job.task, batch_size=batch_size,
                     progress=progress)
        try:
            if pruner is None:
                pruner = _make_pruner(work, example, crit.importance(), ratio, global_pruning,
                                      iterative_steps, max_layer_ratio, ignored, job.round_to)
            else:
                pruner.importance = crit.importance()
            work.eval()
            removed = _prune_step(pruner, names)
        finally:
            crit.finish(work)
        record: dict[str, Any] = {"step": step + 1, "removed": removed,
                                  "channels_removed": int(sum(removed.values())),
                                  "params": count_parameters(work),
                                  "macs": count_macs(work, example)}
        share = rec.epochs // iterative_steps + (rec.epochs % iterative_steps
                                                 if step == iterative_steps - 1 else 0)
        if share and not dry_run:
            record["recovery"] = _recover(work, train_ds, val_ds, rec, share, teacher, job.task,
                                          step, progress)
        steps.append(record)
    return steps


def _verify(dense: nn.Module, work: nn.Module, job: _Job, measure_latency: bool,
            dry_run: bool) -> tuple[float, dict[str, float] | None]:
    """Step 5: max |delta logit| on the calibration images and the measured speedup (torch
    eager, and the search runtime in measured mode), alternated in this run."""
    delta = max_abs_logit_delta(dense, work, job.images)
    latency = None
    if measure_latency and not dry_run:
        latency = latency_pair(dense, work, job.images[:1], batch_size=1, warmup=3, repeats=10,
                               rounds=3)
        if job.measured is not None:
            rt, b, ex = job.measured["runtime"], job.measured["batch"], job.images[:1]
            t = torch.get_num_threads()
            pairs = [(runtime_latency(dense, rt, ex, b, t), runtime_latency(work, rt, ex, b, t))
                     for _ in range(3)]
            d_ms = float(np.median([p[0] for p in pairs]))
            p_ms = float(np.median([p[1] for p in pairs]))
            latency.update({"runtime": rt, "runtime_batch": b, "runtime_dense_ms": d_ms,
                            "runtime_pruned_ms": p_ms, "runtime_ratio": d_ms / p_ms})
    return delta, latency


def prune_structured(
    model: nn.Module,
    calib_images: torch.Tensor,
    criterion: str | Criterion | Mapping[str, torch.Tensor] = "l1",
    ratio: float | None = None,
    target_speedup: float | None = None,
    global_pruning: bool = False,
    iterative_steps: int = 1,
    recovery: RecoveryConfig | None = None,
    train_ds=None,
    val_ds=None,
    ignored_layers: Sequence[str | nn.Module] | None = None,
    calib_targets: torch.Tensor | None = None,
    max_layer_ratio: float = 0.9,
    round_to: int | None = None,
    dry_run: bool = False,
    measure_latency: bool = True,
    batch_size: int = 16,
    inplace: bool = False,
    progress: bool | None = None,
    target_latency_ms: float | None = None,
    target_speedup_measured: float | None = None,
    runtime: str = "onnxruntime:fp32",
    latency_batch: int = 1,
) -> PruneResult:
    """Prune output channels on the Torch-Pruning dependency graph and return a smaller model.

    Reads as its steps: validate -> plan (the ratio) -> apply (prune, recover) -> verify.

    Args:
        model: a :class:`~medscalpel.models.classifier.MedClassifier` (DenseNet, ResNet, VGG).
        calib_images: calibration images ``[N, C, H, W]`` (scores for data-driven criteria,
            tracing, MACs, latency and the logit check).
        criterion: a name of :data:`~medscalpel.compress.importance.IMPORTANCE`, a
            :class:`~medscalpel.compress.importance.Criterion`, or a mapping layer name ->
            per-channel scores (e.g. ``channel_relevance(...).scores``).
        ratio: fraction of the channels of each coupled group to remove (local), or of all
            channels (global). Default 0.5 when no target is given.
        target_speedup: instead of ``ratio``: the ratio is searched (bisection on one-shot
            copies) so that MACs drop by this factor.
        global_pruning: rank channels across all groups instead of within each group.
        iterative_steps: prune in this many equal steps, re-scoring (and recovering) in between.
        recovery: fine-tune after each step (needs ``train_ds``); see :class:`RecoveryConfig`.
        train_ds, val_ds: datasets for the recovery fine-tune (val for early stopping).
        ignored_layers: layers (names or modules) never pruned; the classifier always is.
        calib_targets: labels of ``calib_images``: the Taylor criterion's loss targets
            (default: the model's own hard predictions) and, for the attribution criteria
            (lrp, ig, backtrace), the classes scored per image (its positive classes; default:
            every class of every image, K times the work).
        max_layer_ratio: no layer loses more than this fraction of its channels.
        round_to: keep channel counts multiples of this and at least this (hardware-friendly
            widths; also on DenseNet concatenation groups). Default in the measured modes: the
            CPU's fp32 vector width (8 with AVX2, 16 with AVX-512).
        dry_run: only plan: prune a copy without recovery and report the per-layer channel
            counts that would be removed; ``result.model`` is ``None``.
        measure_latency: measure dense vs pruned CPU latency (batch 1) in this run.
        batch_size: batch size for scoring.
        inplace: prune ``model`` itself instead of a copy.
        target_latency_ms: instead of ``ratio``: search the ratio whose MEASURED latency in
            ``runtime`` at ``latency_batch`` is at most this.
        target_speedup_measured: instead of ``ratio``: search the ratio whose measured latency
            in ``runtime`` is this many times lower than the dense model's (timed alternately).
        runtime: a :data:`~medscalpel.deploy.runtimes.RUNTIMES` variant for the measured
            modes (default ``onnxruntime:fp32``).

    Returns:
        A :class:`PruneResult`; ``result.model.card`` (when the input had a card) records the
        lineage (parent id, criterion, ratio, params / MACs before-after, measured speedup).
    """
    t0 = time.perf_counter()
    job = _validate(model, calib_images, criterion, ratio, target_speedup, iterative_steps,
                    recovery, train_ds, calib_targets, max_layer_ratio, round_to, dry_run,
                    batch_size, ignored_layers, target_latency_ms, target_speedup_measured,
                    runtime, latency_batch)
    dense, was_training = model, model.training
    work = copy.deepcopy(model) if (dry_run or not inplace) else model
    work.eval()
    example = job.images[:1]
    params_before, macs_before = count_parameters(work), count_macs(work, example)
    widths_before = _widths(work)
    ratio, search_trace = _plan(work, job, calib_targets, target_speedup, global_pruning,
                                max_layer_ratio, batch_size, macs_before, progress)
    steps = _apply(work, dense, job, ratio, calib_targets, global_pruning, iterative_steps,
                   max_layer_ratio, train_ds, val_ds, dry_run, batch_size, progress)
    params_after, macs_after = count_parameters(work), count_macs(work, example)
    delta, latency = _verify(dense, work, job, measure_latency, dry_run)
    rec, crit = job.rec, job.crit
    lineage = {
        "criterion": crit.name or "scores", "ratio": float(ratio),
        "target_speedup": target_speedup, "global_pruning": bool(global_pruning),
        "iterative_steps": int(iterative_steps), "max_layer_ratio": max_layer_ratio,
        "round_to": job.round_to, "recovery": rec.to_dict() if rec.epochs else None,
        "calibration_images": int(job.images.shape[0]),
        "params_before": params_before, "params_after": params_after,
        "macs_before": macs_before, "macs_after": macs_after,
        "speedup_macs": macs_before / macs_after if macs_after else float("nan"),
        "latency_speedup_cpu_b1": latency["ratio"] if latency else None,
        "max_abs_logit_delta_calib": delta,
    }
    if job.measured is not None:
        lineage["measured_target"] = job.measured
        lineage["latency_speedup_runtime"] = latency.get("runtime_ratio") if latency else None
    if search_trace:
        lineage["ratio_search"] = search_trace
    parent_card = getattr(dense, "card", None)
    if parent_card is not None and not dry_run:
        work.card = parent_card.with_lineage("prune_structured", parent=parent_card.model_id,
                                             **lineage)
    dense.train(was_training)
    return PruneResult(
        model=None if dry_run else work, criterion=crit.to_dict(), ratio=float(ratio),
        target_speedup=target_speedup, global_pruning=bool(global_pruning),
        iterative_steps=int(iterative_steps), params_before=params_before,
        params_after=params_after, macs_before=macs_before, macs_after=macs_after,
        layers=_layer_diff(widths_before, _widths(work)), steps=steps,
        recovery=rec.to_dict() if rec.epochs else None, latency=latency,
        max_abs_logit_delta=delta, dry_run=bool(dry_run),
        seconds=round(time.perf_counter() - t0, 3), lineage=lineage)


def _recover(model: nn.Module, train_ds, val_ds, rec: RecoveryConfig, epochs: int,
             teacher: nn.Module | None, task: str, step: int,
             progress: bool | None) -> dict[str, Any]:

    cfg = TrainConfig(epochs=epochs, batch_size=rec.batch_size, lr=rec.lr,
                      weight_decay=rec.weight_decay, seed=rec.seed + step, device=rec.device,
                      max_steps_per_epoch=rec.max_steps_per_epoch, patience=max(3, epochs),
                      warmup_epochs=min(0.5, epochs / 4))
    loss_fn = (teacher_loss(teacher, task, rec.soft_weight, rec.T) if teacher is not None
               else None)
    res = train(model, train_ds, val_ds, config=cfg, loss_fn=loss_fn, progress=progress,
                inplace=True)
    model.eval()
    return {"epochs": epochs, "best_epoch": res.best_epoch, "best_metric": res.best_metric,
            "seconds": res.seconds, "history": res.history,
            "distilled": teacher is not None}


__all__ = ["PruneResult", "RecoveryConfig", "prune_structured",
           "remove_channels"]
