"""Channel-dependency analysis shared by lossless folding and tolerance-mode reconstruction.

A *channel group* is a set of channels that can only be removed together (Torch-Pruning's
``DependencyGraph`` builds them: a producer conv's output channels with the BatchNorms that follow
it, through DenseNet concatenations and ResNet residual additions). A *consumer site* is a
Conv2d/Linear that reads some of those channels as input: DenseNet's ``conv1`` of every later
dense layer (behind its own BN + ReLU), the transition convs, the classifier (behind norm5, ReLU
and global average pooling), ResNet's block convs and downsample convs, VGG's next conv. What a
consumer *actually sees* (its input, after its BN and ReLU) is what the analysis measures.

For the classifier of a :class:`~medscalpel.models.MedClassifier` whose input is a global average
pool of a feature map, the site measures the feature map itself (every spatial position is a
sample; pooling and the linear layer are both linear, so a relation that holds at every position
holds for the pooled features too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from medscalpel.errors import ModelError


@dataclass
class Site:
    """One consumer of removable channels.

    Attributes:
        name: qualified name of the consumer module (Conv2d or Linear).
        module: the module (in the analysed copy).
        intercept_ok: a constant input channel folds exactly into this consumer's bias (Linear,
            or a conv without zero padding); False for padded kxk convs.
        source: module whose *input* is measured instead of the consumer's (the global pool in
            front of a classifier), or None.
        owners: input channel index -> (group index, root channel index).
        channels: number of input channels of the consumer.
    """

    name: str
    module: nn.Module
    intercept_ok: bool
    source: str | None = None
    owners: dict[int, tuple[int, int]] = field(default_factory=dict)
    channels: int = 0

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": type(self.module).__name__,
                "intercept_ok": self.intercept_ok, "source": self.source,
                "channels": self.channels}


@dataclass
class ChannelGroup:
    """A producer's output channels and every consumer site that reads them."""

    index: int
    root: str
    module: nn.Module
    size: int
    sites: dict[str, list[int]] = field(default_factory=dict)  # site name -> input idx per channel
    supported: bool = True
    reason: str = ""


@dataclass
class ChannelGraph:
    groups: list[ChannelGroup]
    sites: dict[str, Site]
    names: dict[nn.Module, str]
    dg: Any


def _handler_is(handler, fn) -> bool:
    return getattr(handler, "__func__", None) is getattr(fn, "__func__", object()) and \
        getattr(handler, "__self__", None) is getattr(fn, "__self__", object())


def _find_global_pool(model: nn.Module, linear: nn.Linear, example: torch.Tensor,
                      names: dict[nn.Module, str]) -> str | None:
    """Name of an AdaptiveAvgPool2d(1) whose flattened output is exactly ``linear``'s input."""
    pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)
             and m.output_size in (1, (1, 1))]
    if not pools:
        return None
    seen: dict[nn.Module, torch.Tensor] = {}
    handles = [p.register_forward_hook(lambda m, i, o: seen.__setitem__(m, o.detach()))
               for p in pools]
    lin_in: list[torch.Tensor] = []
    handles.append(linear.register_forward_pre_hook(lambda m, i: lin_in.append(i[0].detach())))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    if not lin_in:
        return None
    for p, out in seen.items():
        flat = out.flatten(1)
        if flat.shape == lin_in[0].shape and torch.equal(flat, lin_in[0]):
            return names[p]
    return None


def build_channel_graph(model: nn.Module, example: torch.Tensor,
                        ignored: list[nn.Module] | None = None) -> ChannelGraph:
    """Discover the removable channel groups of ``model`` and their consumer sites.

    Args:
        model: the model to analyse (not modified; Torch-Pruning runs one traced forward pass).
        example: one example input batch.
        ignored: layers whose *output* channels must not be removed (the classifier).
    """

    names = {m: n for n, m in model.named_modules()}
    order = {m: i for i, m in enumerate(names)}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    ignored = list(ignored or [])
    raw_groups = dg.get_all_groups(ignored_layers=ignored,
                                   root_module_types=[nn.Conv2d, nn.Linear])
    roots = []
    for g in raw_groups:
        root = g[0].dep.target.module
        if isinstance(root, (nn.Conv2d, nn.Linear)) and root not in ignored:
            roots.append(root)
    roots.sort(key=lambda m: order.get(m, 1 << 30))
    groups: list[ChannelGroup] = []
    sites: dict[str, Site] = {}
    pool_cache: dict[nn.Module, str | None] = {}
    for gi, root in enumerate(roots):
        conv = isinstance(root, nn.Conv2d)
        n = root.out_channels if conv else root.out_features
        fn = tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels
        group = dg.get_pruning_group(root, fn, idxs=list(range(n)))
        cg = ChannelGroup(index=gi, root=names[root], module=root, size=n)
        for item in group:
            dep, idxs = item.dep, list(item.idxs)
            mod = dep.target.module
            idxs = [int(i) for i in idxs]
            if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                cg.supported = False
                cg.reason = f"grouped/depthwise conv {names.get(mod, '?')} in the group"
            if isinstance(mod, (nn.Conv1d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm,
                                nn.MultiheadAttention, nn.Embedding)):
                cg.supported = False
                cg.reason = f"unsupported layer {type(mod).__name__} {names.get(mod, '?')}"
            is_in = _handler_is(dep.handler, tp.prune_conv_in_channels) or \
                _handler_is(dep.handler, tp.prune_linear_in_channels)
            if not is_in:
                continue
            if len(idxs) != n:
                cg.supported = False
                cg.reason = f"index mapping to {names.get(mod, '?')} is not one-to-one"
                continue
            sname = names[mod]
            if sname not in sites:
                if isinstance(mod, nn.Linear):
                    if mod not in pool_cache:
                        pool_cache[mod] = _find_global_pool(model, mod, example, names)
                    source = pool_cache[mod]
                    intercept = True
                    channels = mod.in_features
                else:
                    source = None
                    pads = mod.padding if isinstance(mod.padding, tuple) else (mod.padding,)
                    intercept = mod.padding != "same" and all(int(p) == 0 for p in pads)
                    channels = mod.in_channels
                sites[sname] = Site(sname, mod, intercept, source, channels=channels)
            site = sites[sname]
            for ch, j in enumerate(idxs):
                site.owners[j] = (gi, ch)
            cg.sites[sname] = idxs
        if not cg.sites:
            cg.supported = False
            cg.reason = cg.reason or "no consumer layer reads these channels"
        groups.append(cg)
    return ChannelGraph(groups=groups, sites=sites, names=names, dg=dg)


def following_batchnorm(dg: Any, module: nn.Module) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm that is the only reader of ``module``'s output, if any."""
    node = dg.module2node.get(module)
    if node is None or len(node.outputs) != 1:
        return None
    nxt = node.outputs[0].module
    if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and len(node.outputs[0].inputs) == 1:
        return nxt
    return None


@torch.no_grad()
def add_output_offset(dg: Any, module: nn.Module, delta: torch.Tensor) -> str:
    """Add a constant ``delta`` (per output channel) to ``module``'s output exactly: into the
    running mean of a BatchNorm that alone reads it (no new parameters), else into the bias
    (creating a bias Parameter when the layer has none, so that it is saved).

    Returns where the offset went: ``"none"``, ``"batchnorm"`` or ``"bias"``."""
    if not torch.any(delta != 0):
        return "none"
    bn = following_batchnorm(dg, module)
    if bn is not None and bn.running_mean is not None:
        bn.running_mean.sub_(delta.to(bn.running_mean.dtype))
        return "batchnorm"
    if module.bias is None:
        out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        module.bias = nn.Parameter(torch.zeros(out, dtype=module.weight.dtype,
                                               device=module.weight.device))
    module.bias.add_(delta.to(module.bias.dtype))
    return "bias"


def site_rows(t: torch.Tensor) -> torch.Tensor:
    """A site input as rows of samples ``[samples, channels]`` (spatial positions are samples)."""
    if t.ndim == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    if t.ndim == 2:
        return t
    raise ModelError(f"Cannot analyse a layer input of shape {tuple(t.shape)}.")


class ParamCounter:
    """Exact parameter count of a model after removing ``size - keep`` channels of each group,
    without pruning anything (the dimensions each group controls, read from Torch-Pruning's
    groups once).

    ``count(keep)`` with ``keep = {group index: channels kept}`` (missing groups: all kept)
    equals the parameter count of the physically pruned model (which channels go does not
    matter for the count).
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph):

        self.sizes = {g.index: g.size for g in graph.groups}
        self.mods: dict[nn.Module, dict[str, set[int]]] = {}
        for g in graph.groups:
            if not g.supported:
                continue
            fn = tp.prune_conv_out_channels if isinstance(g.module, nn.Conv2d) \
                else tp.prune_linear_out_channels
            group = graph.dg.get_pruning_group(g.module, fn, idxs=list(range(g.size)))
            for item in group:
                mod, h = item.dep.target.module, item.dep.handler
                if not isinstance(mod, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                    continue
                roles = self.mods.setdefault(mod, {"out": set(), "in": set()})
                if _handler_is(h, tp.prune_conv_in_channels) or \
                        _handler_is(h, tp.prune_linear_in_channels):
                    roles["in"].add(g.index)
                elif isinstance(mod, nn.modules.batchnorm._BatchNorm) or \
                        _handler_is(h, tp.prune_conv_out_channels) or \
                        _handler_is(h, tp.prune_linear_out_channels):
                    roles["out"].add(g.index)
        self.total = int(sum(p.numel() for p in model.parameters()))
        self.fixed = self.total - sum(self._params(m, {}) for m in self.mods)

    def _dims(self, mod: nn.Module, keep: dict[int, int]) -> tuple[int, int]:
        roles = self.mods[mod]
        cut = lambda gs: sum(self.sizes[g] - keep.get(g, self.sizes[g]) for g in gs)  # noqa: E731
        if isinstance(mod, nn.Conv2d):
            return mod.out_channels - cut(roles["out"]), mod.in_channels - cut(roles["in"])
        if isinstance(mod, nn.Linear):
            return mod.out_features - cut(roles["out"]), mod.in_features - cut(roles["in"])
        return mod.num_features - cut(roles["out"]), 0

    def _params(self, mod: nn.Module, keep: dict[int, int]) -> int:
        o, i = self._dims(mod, keep)
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            return o * (i // mod.groups) * k + (o if mod.bias is not None else 0)
        if isinstance(mod, nn.Linear):
            return o * i + (o if mod.bias is not None else 0)
        return 2 * o if mod.affine else 0

    def count(self, keep: dict[int, int]) -> int:
        return self.fixed + sum(self._params(m, keep) for m in self.mods)

    def channel_cost(self, group: int) -> int:
        """Parameters removed by taking one channel out of ``group`` (others full)."""
        return self.total - self.count({group: self.sizes[group] - 1})
