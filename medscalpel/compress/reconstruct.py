"""Tolerance mode of lossless compression: channel pruning by sparsity-constrained reconstruction.

He, Zhang & Sun (ICCV 2017), "Channel Pruning for Accelerating Very Deep Neural Networks": layer
by layer (here: channel group by channel group, in production order), choose the input channels
each consumer keeps by LASSO regression of the consumer's *original* output on the per-channel
contributions computed from the *current* (already pruned) model's input, then refit the
consumer's weights on the kept channels by least squares, so that errors of earlier layers are
corrected as one goes. The refit is a ridge regression shrunk toward the plain-removal weights,
its strength chosen on calibration images held out of the fit (:func:`ridge_to_prior`): late
layers can have about as many input columns as calibration rows, and an unregularised refit
there interpolates the calibration rows and diverges on new images. In DenseNet a channel group
feeds several consumers; their reconstruction problems are stacked (each normalised by its
target's norm) so that one LASSO picks the channels for all of them. How many channels each
layer keeps is allocated greedily (near-uniform kept fraction, :func:`allocate_keep`) with an
exact parameter counter, so that the achieved reduction is within one channel's parameters of
``target_ratio`` (reported as ``achieved_ratio`` beside ``target_ratio``).

This is lossy by design: the report states the achieved max |delta logit| and, given labels, the
change in macro AUROC on held-out data, whatever they are.
"""

from __future__ import annotations

import copy
import heapq
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from sklearn.linear_model import lasso_path
from sklearn.metrics import roc_auc_score
from torch import nn

from medscalpel.compress.graph import ParamCounter, add_output_offset, build_channel_graph
from medscalpel.compress.measure import (Images, collect_logits, count_macs, count_parameters,
                                         eval_mode, first_batch, iter_images, latency_pair)
from medscalpel.errors import ConfigError, ModelError
from medscalpel.progress import track
from medscalpel.runs import write_json
from medscalpel.validation import check_fraction, check_range


@dataclass
class ToleranceReport:
    """What tolerance-mode reconstruction achieved (same-run measurements, held-out data)."""

    arch: str
    target_ratio: float
    keep_fraction: float  # channels kept / channels of the prunable layers
    params_before: int
    params_after: int
    params_removed_pct: float
    macs_before: int
    macs_after: int
    latency_ms_before: float | None
    latency_ms_after: float | None
    latency_ratio: float | None
    max_abs_logit_delta: float
    macro_auroc_before: float | None
    macro_auroc_after: float | None
    delta_macro_auroc: float | None
    n_calib: int
    n_heldout: int
    layers: list[dict[str, Any]]
    achieved_ratio: float = 0.0      # params removed / params before (compare: target_ratio)
    predicted_params_after: int = 0  # the allocation's exact count before reconstruction
    refits: int = 0                  # consumer refits done (one per consumer per pruned group)
    refits_plain_removal: int = 0    # of which the held-out check kept plain removal
    schema_version: int = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())


@dataclass
class ToleranceResult:
    model: nn.Module
    report: ToleranceReport

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict()


def macro_auroc(logits: np.ndarray, labels: np.ndarray) -> float | None:
    """Macro AUROC over the classes that have both outcomes (NaN labels ignored); multi-class
    int labels are scored one-vs-rest on the logits."""

    labels = np.asarray(labels)
    if labels.ndim == 1:
        onehot = np.zeros_like(logits)
        onehot[np.arange(len(labels)), labels.astype(int)] = 1.0
        labels = onehot
    scores = []
    for k in range(labels.shape[1]):
        ok = ~np.isnan(labels[:, k])
        y = labels[ok, k]
        if len(np.unique(y)) == 2:
            scores.append(roc_auc_score(y, logits[ok, k]))
    return float(np.mean(scores)) if scores else None


def allocate_keep(model: nn.Module, example: torch.Tensor, target_ratio: float
                  ) -> tuple[dict[str, int], int, int]:
    """Channels to keep per producer layer so that the parameter count drops by as close to
    ``target_ratio`` as one channel allows.

    Greedy: repeatedly take one channel from the layer whose kept fraction is highest (the
    one with more parameters per channel first on ties), never emptying a layer, until the
    exact count (:class:`~medscalpel.compress.graph.ParamCounter`) reaches the goal; the last
    step is undone when stopping one channel earlier is closer to the goal. The result is a
    near-uniform keep fraction, finer than a single global fraction (which on narrow layers
    can only move in large steps).

    Returns:
        (layer -> channels kept, parameters before, predicted parameters after).
    """

    graph = build_channel_graph(model, example, ignored=[model.classifier])
    pc = ParamCounter(model, graph)
    groups = [g for g in graph.groups if g.supported]
    keep = {g.index: g.size for g in groups}
    cost = {g.index: pc.channel_cost(g.index) for g in groups}
    goal = (1.0 - target_ratio) * pc.total
    heap = [(-1.0, -cost[g.index], g.index, g.size) for g in groups if g.size > 1]
    heapq.heapify(heap)
    current = pc.total
    while current > goal and heap:
        _, _, gi, size = heapq.heappop(heap)
        before = current
        keep[gi] -= 1
        current = pc.count(keep)
        if current <= goal and goal - current > before - goal:
            keep[gi] += 1  # stopping one channel earlier is closer to the target
            current = before
            break
        if keep[gi] > 1:
            heapq.heappush(heap, (-keep[gi] / size, -cost[gi], gi, size))
    names = {g.index: g.root for g in groups}
    return {names[i]: k for i, k in keep.items()}, pc.total, current


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input of a conv as ``[N, C*kh*kw, L]`` patches aligned with its output positions."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ModelError(f"Tolerance mode supports zero-padded convs only ({module}).")
        return F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return x.flatten(2) if x.ndim == 4 else x.unsqueeze(2)


@torch.no_grad()
def _capture(work: nn.Module, ref: nn.Module, sites: list[str], sources: dict[str, str | None],
             images: Images, batch_size: int, limit: int | None, max_rows: int,
             seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per site: rows of current-model inputs (patches), reference outputs at the same positions
    and the calibration image each row comes from (for image-level validation splits)."""
    got: dict[str, list] = {s: [[], [], []] for s in sites}
    cur: dict[str, torch.Tensor] = {}
    handles = []

    def grab(store: dict, key: str):
        def hook(module, inputs):
            store[key] = inputs[0].detach()
        return hook

    refin: dict[str, torch.Tensor] = {}
    try:
        for s in sites:
            src = sources[s]
            handles.append((work.get_submodule(src) if src else work.get_submodule(s))
                           .register_forward_pre_hook(grab(cur, s)))
            handles.append((ref.get_submodule(src) if src else ref.get_submodule(s))
                           .register_forward_pre_hook(grab(refin, s)))
        batches = list(iter_images(images, batch_size, limit))
        per_batch = max(1, max_rows // max(1, len(batches)))
        base = 0
        for bi, x in enumerate(batches):
            work(x)
            ref(x)
            for si, s in enumerate(sites):
                wmod, rmod = work.get_submodule(s), ref.get_submodule(s)
                if sources[s]:  # classifier behind a global pool: per-position logits
                    xs = cur[s].flatten(2)                           # [N, C, L]
                    yr = torch.einsum("ncl,kc->nkl", refin[s].flatten(2), rmod.weight)
                else:
                    xs = _patches(wmod, cur[s])
                    yr = rmod(refin[s]).flatten(2) if refin[s].ndim == 4 else \
                        rmod(refin[s]).unsqueeze(2)
                    if getattr(rmod, "bias", None) is not None:
                        yr = yr - rmod.bias.view(1, -1, 1)
                rows_x = xs.permute(0, 2, 1).reshape(-1, xs.shape[1])
                rows_y = yr.permute(0, 2, 1).reshape(-1, yr.shape[1])
                g = torch.Generator().manual_seed(seed * 7919 + bi * 131 + si)
                take = torch.randperm(rows_x.shape[0], generator=g)[:per_batch]
                got[s][0].append(rows_x[take].double())
                got[s][1].append(rows_y[take].double())
                got[s][2].append(base + take // xs.shape[2])
            base += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    return {s: (torch.cat(v[0]), torch.cat(v[1]), torch.cat(v[2])) for s, v in got.items()}


def _lasso_order(blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], int]],
                 n: int, max_design: int = 200_000) -> list[int]:
    """Group channels ordered by their entry on the LASSO path (most useful first).

    Each block is one consumer: ``X`` input rows ``[R, C*k]``, ``W`` its weights ``[O, C*k]``,
    ``T`` the target that the group's channels must explain ``[R, O]``, ``idx`` the consumer's
    input channel of each group channel and ``k`` the kernel size (columns per channel).
    """

    cols, targets = [], []
    # ``max_design`` bounds the whole design matrix (rows x group channels), shared by the
    # consumers: a DenseNet transition's channels feed every layer of the next block (24
    # consumers in densenet121), and a per-consumer budget needed ~20 GB there.
    per_block = max(1, max_design // max(1, len(blocks)))
    for X, W, T, idx, ksz in blocks:
        stride = max(1, (X.shape[0] * W.shape[0]) // per_block + 1)
        Xs, Ts = X[::stride], T[::stride]
        z = [(Xs[:, ci * ksz:(ci + 1) * ksz] @ W[:, ci * ksz:(ci + 1) * ksz].T).reshape(-1)
             for ci in idx]
        norm = float(Ts.norm()) or 1.0
        cols.append(torch.stack(z, 1) / norm)
        targets.append(Ts.reshape(-1) / norm)
    A = torch.cat(cols).numpy()
    b = torch.cat(targets).numpy()
    _, coefs, _ = lasso_path(A, b, alphas=40, eps=1e-4)
    entry = np.full(n, coefs.shape[1], dtype=float)
    for c in range(n):
        nz = np.nonzero(coefs[c])[0]
        if len(nz):
            entry[c] = nz[0]
    final = np.abs(coefs[:, -1])
    return sorted(range(n), key=lambda c: (entry[c], -final[c]))


#: ridge strengths tried per consumer, relative to the unit-diagonal (column-scaled) Gram matrix;
#: the plain-removal weights (infinite strength) always compete too.
RIDGE_ALPHAS = (1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def ridge_to_prior(X: torch.Tensor, Y: torch.Tensor, prior: torch.Tensor, groups: torch.Tensor,
                   alphas: tuple[float, ...] = RIDGE_ALPHAS, val_every: int = 5
                   ) -> tuple[torch.Tensor, float | None, dict[str, float]]:
    """Least squares ``X w ~ Y`` shrunk toward ``prior`` (ridge ``alpha ||w - prior||^2`` on
    column-scaled ``X``), with ``alpha`` chosen on held-out groups.

    A refit can have nearly as many columns as rows (a 3x3 conv over 128 channels has 1,152
    columns; at 64 px the last DenseNet block has 2x2 maps, so 256 calibration images give
    1,024 rows): a near-unregularised solve then interpolates the calibration rows and extrapolates
    wildly elsewhere. Here every ``val_every``-th group (calibration image) is held out; each
    ``alpha`` of ``alphas`` is fitted on the rest through one eigendecomposition, and so is
    ``alpha = inf`` (keep ``prior``: plain removal). The best on the held-out rows is refitted on
    all rows. With too few groups to hold any out, rows are split instead.

    Args:
        X: ``[R, d]`` design rows. Y: ``[R, O]`` targets. prior: ``[d, O]`` fallback solution.
        groups: ``[R]`` group (image) id of each row.

    Returns:
        (``[d, O]`` solution, chosen alpha or None when the prior won, numbers: held-out mean
        squared error of the prior and of the chosen solution).
    """
    X, Y, prior = X.double(), Y.double(), prior.double()
    rows = X.shape[0]
    ids = torch.unique(groups)
    if len(ids) >= 2 * val_every:
        val = torch.isin(groups, ids[::val_every])
    else:
        val = torch.zeros(rows, dtype=torch.bool)
        val[::val_every] = True
    fit = ~val
    scale = (X.pow(2).mean(0)).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    Xs, P = X / scale, prior * scale[:, None]
    Xf, Yf, Xv, Yv = Xs[fit], Y[fit], Xs[val], Y[val]
    prior_err = float((Xv @ P - Yv).pow(2).mean()) if val.any() else float("inf")
    best, best_err = None, prior_err
    gram_f, rhs_f = Xf.T @ Xf, Xf.T @ Yf  # reused by the final fit on all rows
    if fit.sum() > 0 and val.any():
        e, V = torch.linalg.eigh(gram_f / Xf.shape[0])
        e = e.clamp_min(0)
        q, p0, XvV = V.T @ (rhs_f / Xf.shape[0]), V.T @ P, Xv @ V
        for a in alphas:
            err = float((XvV @ ((q + a * p0) / (e + a)[:, None]) - Yv).pow(2).mean())
            if err < best_err:
                best, best_err = a, err
    info = {"heldout_mse_prior": prior_err, "heldout_mse": best_err}
    if best is None:
        return prior.clone(), None, info
    G = (gram_f + Xv.T @ Xv) / rows
    sol = torch.linalg.solve(G + best * torch.eye(G.shape[0], dtype=G.dtype),
                             (rhs_f + Xv.T @ Yv) / rows + best * P)
    return sol / scale[:, None], best, info


@torch.no_grad()
def _refit(work: nn.Module, ref: nn.Module, graph, s: str, data, dropped_in: set[int],
           kept_out: list[int], offsets: dict[str, torch.Tensor]) -> float | None:
    """Refit consumer ``s`` on its kept input channels (with an intercept where a constant folds
    exactly) to match the reference model's output: :func:`ridge_to_prior` shrinking toward the
    current weights (plain removal). Returns the chosen ridge strength (None: plain removal)."""
    X, Y, img = data
    mod, rmod = work.get_submodule(s), ref.get_submodule(s)
    site = graph.sites[s]
    ksz = mod.weight[0].numel() // site.channels
    cols = [ci * ksz + t for ci in range(site.channels) if ci not in dropped_in
            for t in range(ksz)]
    Xk = X[:, cols]
    prior = mod.weight.detach().double().reshape(mod.weight.shape[0], -1)[:, cols].T
    ref_bias = rmod.bias.detach()[kept_out].double() if rmod.bias is not None else 0.0
    own_bias = mod.bias.detach().double() if mod.bias is not None else 0.0
    if site.source:  # the classifier: its bias is the constant
        current = own_bias + torch.zeros(prior.shape[1], dtype=torch.float64)
    else:
        full = offsets.get(s, torch.zeros(rmod.weight.shape[0], dtype=torch.float64))
        current = full[kept_out] + own_bias
    if site.intercept_ok:
        Xk = torch.cat([Xk, torch.ones(Xk.shape[0], 1, dtype=Xk.dtype)], 1)
        prior = torch.cat([prior, (current - ref_bias).reshape(1, -1)], 0)
    sol, alpha, _ = ridge_to_prior(Xk, Y, prior, img)
    if alpha is None:
        return None  # plain removal keeps the current weights and constants
    w = torch.zeros(mod.weight.shape[0], mod.weight[0].numel(), dtype=torch.float64)
    w[:, cols] = sol[:len(cols)].T
    mod.weight.copy_(w.reshape(mod.weight.shape).to(mod.weight.dtype))
    if not site.intercept_ok:
        return alpha
    target = sol[len(cols)] + ref_bias  # the full constant this layer's output must carry
    if site.source:
        mod.bias.copy_(target.to(mod.bias.dtype))
        return alpha
    full = offsets.setdefault(s, torch.zeros(rmod.weight.shape[0], dtype=torch.float64))
    delta = (target - current).to(mod.weight.dtype)
    where = add_output_offset(graph.dg, mod, delta)
    if where == "batchnorm":
        full[kept_out] += delta.double()
    return alpha


def compress_with_tolerance(model: nn.Module, calib: Images, heldout: Images,
                            target_ratio: float, heldout_labels: np.ndarray | None = None,
                            batch_size: int = 64, calib_images: int | None = None,
                            max_rows: int = 8192, latency: bool = True, seed: int = 0,
                            inplace: bool = False, progress: bool | None = None
                            ) -> ToleranceResult:
    """Prune channels to ``target_ratio`` parameter reduction by LASSO channel selection and
    least-squares refit of the consumers (He et al. 2017), group by group.

    Args:
        model: a MedClassifier (unchanged unless ``inplace=True``).
        calib: calibration images the reconstruction is fitted on.
        heldout: held-out images for the reported deltas.
        target_ratio: fraction of parameters to remove, in (0, 1).
        heldout_labels: labels of ``heldout`` (``[N, K]`` multi-label with NaN, or ``[N]``
            class indices) to report the change in macro AUROC.
        batch_size, calib_images: calibration batching and limit.
        max_rows: sampled positions per consumer for the regressions.
        latency: measure CPU latency before/after (same run).
        seed: seed of the position sampling.
        inplace: modify ``model`` itself.
        progress: progress bars.
    """

    _check_tolerance_args(target_ratio, max_rows)
    ref = copy.deepcopy(model).eval()
    work = model if inplace else copy.deepcopy(model)
    was_training = work.training
    work.eval()
    example = first_batch(calib, "compress_with_tolerance")
    p0 = count_parameters(ref)
    keep_counts, _, predicted = allocate_keep(work, example, target_ratio)
    total_size = sum(g.size for g in build_channel_graph(work, example,
                                                         ignored=[work.classifier]).groups
                     if g.root in keep_counts)
    frac = sum(keep_counts.values()) / max(1, total_size)
    layers = []
    kept_out: dict[str, list[int]] = {}   # original output channels still present per layer
    offsets: dict[str, torch.Tensor] = {}  # offsets folded into a following BN (original index)
    try:
        order = [cg.root for cg in build_channel_graph(work, example, ignored=[work.classifier])
                 .groups if cg.supported]
        for gi, root in enumerate(track(order, "reconstruct", progress=progress)):
            layers.append(_reconstruct_group(work, ref, example, root, keep_counts, kept_out,
                                             offsets, calib, batch_size, calib_images, max_rows,
                                             seed + gi))
    finally:
        work.train(was_training)
    report = _tolerance_report(model, ref, work, example, calib, heldout, heldout_labels,
                               batch_size, calib_images, latency, target_ratio, frac, p0,
                               predicted, layers)
    return ToleranceResult(work, report)


def _check_tolerance_args(target_ratio: float, max_rows: int) -> None:
    """Validate step of :func:`compress_with_tolerance`."""
    check_fraction(target_ratio, "target_ratio", "compress_with_tolerance")
    check_range(max_rows, "max_rows", "compress_with_tolerance", 16, integer=True)
    if target_ratio <= 0:
        raise ConfigError("The 'target_ratio' parameter of compress_with_tolerance must be in "
                          f"the range (0, 1). Got {target_ratio!r} instead.")


def _outs(kept_out: dict[str, list[int]], name: str, mod: nn.Module) -> list[int]:
    """The original output channels of layer ``name`` still present (all, until pruned)."""
    n = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
    return kept_out.setdefault(name, list(range(n)))


def _reconstruct_group(work: nn.Module, ref: nn.Module, example: torch.Tensor, root: str,
                       keep_counts: dict[str, int], kept_out: dict[str, list[int]],
                       offsets: dict[str, torch.Tensor], calib: Images, batch_size: int,
                       calib_images: int | None, max_rows: int, seed: int) -> dict[str, Any]:
    """One channel group, in production order: LASSO-select the channels it keeps, refit its
    consumers on them, and prune the others. Returns the group's row of the report."""
    graph = build_channel_graph(work, example, ignored=[work.classifier])
    cg = next(g for g in graph.groups if g.root == root)
    k = keep_counts.get(root, cg.size)
    if k >= cg.size:
        return {"layer": root, "size": cg.size, "kept": cg.size}
    snames = list(cg.sites)
    sources = {s: graph.sites[s].source for s in snames}
    data = _capture(work, ref, snames, sources, calib, batch_size, calib_images, max_rows, seed)
    blocks = _lasso_blocks(work, ref, graph, cg, data, kept_out)
    ranking = _lasso_order(blocks, cg.size)
    keep = sorted(ranking[:k])
    drop = sorted(set(range(cg.size)) - set(keep))
    alphas = [_refit(work, ref, graph, s, data[s], {cg.sites[s][c] for c in drop},
                     _outs(kept_out, s, ref.get_submodule(s)), offsets) for s in snames]
    _prune_group(graph, cg, drop, kept_out)
    return {"layer": root, "size": cg.size, "kept": k, "refit_alpha": dict(zip(snames, alphas))}


def _lasso_blocks(work: nn.Module, ref: nn.Module, graph, cg, data: dict[str, tuple],
                  kept_out: dict[str, list[int]]) -> list[tuple]:
    """The LASSO problem of each consumer of group ``cg`` (see :func:`_lasso_order`); the
    reference outputs in ``data`` are narrowed to the consumers' surviving output channels."""
    blocks = []
    for s in cg.sites:
        X, Y, img = data[s]
        mod = work.get_submodule(s)
        Y = Y[:, _outs(kept_out, s, ref.get_submodule(s))]
        data[s] = (X, Y, img)
        W = mod.weight.detach().double().reshape(mod.weight.shape[0], -1)
        ksz = W.shape[1] // graph.sites[s].channels
        own = torch.zeros(W.shape[1], dtype=torch.bool)
        for ci in cg.sites[s]:
            own[ci * ksz:(ci + 1) * ksz] = True
        blocks.append((X, W, Y - X[:, ~own] @ W[:, ~own].T, cg.sites[s], ksz))
    return blocks


def _prune_group(graph, cg, drop: list[int], kept_out: dict[str, list[int]]) -> None:
    """Remove channels ``drop`` of group ``cg`` physically, tracking which original output
    channels every pruned layer keeps."""
    fn = tp.prune_conv_out_channels if isinstance(cg.module, nn.Conv2d) \
        else tp.prune_linear_out_channels
    group = graph.dg.get_pruning_group(cg.module, fn, idxs=drop)
    for item in group:
        h = item.dep.handler
        if h == tp.prune_conv_out_channels or h == tp.prune_linear_out_channels:
            name = graph.names[item.dep.target.module]
            gone = {int(i) for i in item.idxs}
            kept_out[name] = [v for i, v in enumerate(_outs(kept_out, name,
                                                            item.dep.target.module))
                              if i not in gone]
    with torch.no_grad():
        group.prune()


def _tolerance_report(model: nn.Module, ref: nn.Module, work: nn.Module, example: torch.Tensor,
                      calib: Images, heldout: Images, heldout_labels: np.ndarray | None,
                      batch_size: int, calib_images: int | None, latency: bool,
                      target_ratio: float, frac: float, p0: int, predicted: int,
                      layers: list[dict[str, Any]]) -> ToleranceReport:
    """Verify step of :func:`compress_with_tolerance`: held-out logits, AUROC, sizes and latency
    of the reference and the reconstructed model, measured in this run."""
    with eval_mode(work, ref):
        la, lb = collect_logits(ref, heldout, batch_size), collect_logits(work, heldout, batch_size)
        delta = float((la - lb).abs().max())
        au0 = au1 = None
        if heldout_labels is not None:
            au0 = macro_auroc(la.numpy(), np.asarray(heldout_labels))
            au1 = macro_auroc(lb.numpy(), np.asarray(heldout_labels))
        p1 = count_parameters(work)
        ex = example[:1]
        lat = latency_pair(ref, work, ex) if latency else None
        m0, m1 = count_macs(ref, ex), count_macs(work, ex)
    n_cal = sum(x.shape[0] for x in iter_images(calib, batch_size, calib_images))
    return ToleranceReport(
        arch=getattr(model, "arch", type(model).__name__), target_ratio=target_ratio,
        keep_fraction=frac, params_before=p0, params_after=p1,
        params_removed_pct=100.0 * (p0 - p1) / p0, macs_before=m0, macs_after=m1,
        latency_ms_before=lat["a_ms"] if lat else None,
        latency_ms_after=lat["b_ms"] if lat else None,
        latency_ratio=lat["ratio"] if lat else None, max_abs_logit_delta=delta,
        macro_auroc_before=au0, macro_auroc_after=au1,
        delta_macro_auroc=(au1 - au0) if au0 is not None and au1 is not None else None,
        n_calib=n_cal, n_heldout=int(la.shape[0]), layers=layers,
        achieved_ratio=(p0 - p1) / p0, predicted_params_after=predicted,
        refits=sum(len(d.get("refit_alpha", {})) for d in layers),
        refits_plain_removal=sum(a is None for d in layers
                                 for a in d.get("refit_alpha", {}).values()))
