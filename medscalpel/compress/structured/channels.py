"""Channels on the Torch-Pruning dependency graph: layer widths, ignored layers, width rounding,
the pruner, one pruning step, a one-shot pruned copy, and :func:`remove_channels` (apply a
plan of channels you computed yourself)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from medscalpel.compress.importance import Criterion
from medscalpel.errors import ConfigError, ModelError

OWNER = "prune_structured"


def _widths(model: nn.Module) -> dict[str, int]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = int(m.num_features)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            out[name] = int(m.weight.shape[0])
    return out


def _layer_diff(before: dict[str, int], after: dict[str, int]) -> dict[str, dict[str, int]]:
    return {n: {"before": before[n], "after": after.get(n, 0),
                "removed": before[n] - after.get(n, 0)}
            for n in before if after.get(n, 0) != before[n]}

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
            arch = getattr(model, 'arch', type(model).__name__)
            raise ConfigError(f"The 'ignored_layers' entry {item!r} of {OWNER} is not a layer of "
                              f"{arch}. Use qualified names as in model.named_modules().") from exc
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


__all__ = ["OWNER", "remove_channels"]
