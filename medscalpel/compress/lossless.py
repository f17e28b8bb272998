"""Lossless mechanistic compression: fold dead, constant and linearly dependent channels away.

Two analyses produce the same kind of plan. ``mode="provable"`` (the default of
:func:`fold_lossless`; :mod:`medscalpel.compress.provable`) derives the facts from the weights
alone and they hold for every input. ``mode="empirical"`` (:func:`plan_lossless`, below) finds
them in activation statistics on calibration images; they hold on the data they were checked
on, which the report states ("empirical").

Empirical analysis: from the activations that each consumer layer *actually sees* on
calibration images (after its own BatchNorm and ReLU), a channel is removable when, at every
consumer that reads it, it is

* **dead**: always exactly zero (contributes nothing);
* **constant**: the same value everywhere, and the consumer is a Linear / unpadded conv (the
  value times the consumer's weights folds exactly into its bias, or into the running mean of the
  BatchNorm right after it). A constant channel does *not* fold through a zero-padded kxk conv
  (the borders see the padding zeros), so it is kept there unless another rule applies;
* **linearly dependent** on channels that stay (``u_c = sum_j a_j u_j (+ b)`` at every sample):
  the consumer's weights absorb it, ``W[:, j] += a_j W[:, c]`` (and ``b * W[:, c]`` into the bias
  where an intercept is exact). Without an intercept the relation also holds through zero padding.

Dependence is tested with an incremental (rank-revealing, in a fixed production order) Cholesky
factorisation of each consumer's input covariance (or Gram matrix, without intercept) in float64:
a channel whose relative least-squares residual on the channels kept before it is below
``rank_rtol`` is dependent, otherwise it joins that consumer's basis. The decision is global: in
DenseNet a concatenated channel feeds every later layer through its own BN + ReLU, and a ResNet
residual channel is tied across the whole addition group, so a channel goes only when *every*
consumer can absorb it. Channels are then removed physically with Torch-Pruning (producer conv
outputs and their BNs, every consumer's input), through concatenations and additions.

Plan, then apply: :func:`plan_lossless` returns a :class:`LosslessPlan` (which channels, why, the
folding coefficients), :func:`apply_plan` builds the smaller model, :func:`fold_lossless` does
both and verifies max |delta logit| on held-out images, refusing (``VerificationError``) when it
exceeds ``atol``.

Example:
    >>> import torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("vgg_tiny", num_classes=2, img_size=32).eval()
    >>> with torch.no_grad():
    ...     m.backbone.features[1].weight[3] = 0.0   # channel 3 of the first conv: constant
    ...     m.backbone.features[1].bias[3] = -1.0    # ... and negative, so dead after the ReLU
    >>> res = fold_lossless(m, torch.randn(64, 1, 32, 32), torch.randn(16, 1, 32, 32),
    ...                     latency=False, progress=False)
    >>> res.report.channels["dead"] >= 1 and res.report.max_abs_logit_delta <= 1e-5
    True
"""

from __future__ import annotations

import copy
import json
import logging
import math

import numpy as np
import torch
import torch_pruning as tp
from scipy.linalg import solve_triangular
from torch import nn

from medscalpel.compress import provable as pv
from medscalpel.compress.graph import (ChannelGraph, Site, add_output_offset, build_channel_graph,
                                       site_rows)
from medscalpel.compress.lossless_report import (GUARANTEES, LosslessReport, LosslessResult,
                                                 _gating, _layer_rows, _measure_deltas,
                                                 _random_fields, _verification_error)
from medscalpel.compress.measure import (Images, count_macs, count_parameters, eval_mode,
                                         first_batch, iter_images, latency_pair)
from medscalpel.compress.plans import GroupPlan, LosslessPlan, SiteFold
from medscalpel.errors import ConfigError, ModelError
from medscalpel.progress import track
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- statistics
class SiteStats:
    """Running float64 moments of one consumer's input channels (shifted for accuracy)."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self.umax: torch.Tensor | None = None
        self.umin: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)
        if self.shift is None:
            c = rows.shape[1]
            self.shift = rows.mean(0)
            self.s1 = torch.zeros(c, dtype=torch.float64)
            self.s2 = torch.zeros(c, c, dtype=torch.float64)
            self.umax = torch.full((c,), -math.inf, dtype=torch.float64)
            self.umin = torch.full((c,), math.inf, dtype=torch.float64)
        v = rows - self.shift
        self.n += rows.shape[0]
        self.s1 += v.sum(0)
        self.s2 += v.T @ v
        self.umax = torch.maximum(self.umax, rows.max(0).values)
        self.umin = torch.minimum(self.umin, rows.min(0).values)

    @property
    def mean(self) -> np.ndarray:
        return (self.shift + self.s1 / self.n).numpy()

    def covariance(self) -> np.ndarray:
        return ((self.s2 - torch.outer(self.s1, self.s1) / self.n) / self.n).numpy()

    def gram(self) -> np.ndarray:
        g = self.s2 + torch.outer(self.shift, self.s1) + torch.outer(self.s1, self.shift) \
            + self.n * torch.outer(self.shift, self.shift)
        return (g / self.n).numpy()


@torch.no_grad()
def collect_site_stats(model: nn.Module, sites: dict[str, Site], images: Images,
                       batch_size: int = 64, limit: int | None = None,
                       progress: bool | None = None) -> tuple[dict[str, SiteStats], int]:
    """Moments of every site's input over ``images`` (hooks removed, mode restored)."""
    stats = {name: SiteStats() for name in sites}
    handles = []

    def hook_for(name: str):
        def hook(module, inputs):
            stats[name].update(site_rows(inputs[0]))
        return hook

    n_images = 0
    with eval_mode(model):
        try:
            for name, site in sites.items():
                mod = model.get_submodule(site.source) if site.source else site.module
                handles.append(mod.register_forward_pre_hook(hook_for(name)))
            total = None
            if isinstance(images, torch.Tensor):
                n = images.shape[0] if limit is None else min(limit, images.shape[0])
                total = math.ceil(n / batch_size)
            for x in track(iter_images(images, batch_size, limit), "calibration activations",
                           total=total, progress=progress):
                model(x)
                n_images += x.shape[0]
        finally:
            for h in handles:
                h.remove()
    return stats, n_images


# ----------------------------------------------------------------------------- planning
class _Basis:
    """Incremental Cholesky factor of one site's (co)variance restricted to its kept basis."""

    def __init__(self, m: np.ndarray):
        self.m = m
        self.idx: list[int] = []
        self._buf = np.zeros(m.shape)  # preallocated: the factor grows one row at a time

    @property
    def L(self) -> np.ndarray:
        k = len(self.idx)
        return self._buf[:k, :k]

    def residual(self, j: int) -> tuple[np.ndarray, float, float]:
        mjj = float(self.m[j, j])
        if not self.idx:
            return np.zeros(0), mjj, mjj
        g = self.m[self.idx, j]
        z = solve_triangular(self.L, g, lower=True, check_finite=False)
        return z, mjj - float(z @ z), mjj

    def add(self, j: int, z: np.ndarray, r: float) -> None:
        k = len(self.idx)
        self._buf[k, :k] = z
        self._buf[k, k] = math.sqrt(r)
        self.idx.append(j)

    def coefs(self, z: np.ndarray) -> np.ndarray:
        if not self.idx:
            return np.zeros(0)
        return solve_triangular(self.L.T, z, lower=False, check_finite=False)


def plan_lossless(model: nn.Module, calib: Images, rank_rtol: float = 1e-5,
                  min_samples_ratio: float = 4.0, batch_size: int = 64,
                  calib_images: int | None = None, dependent: bool = True,
                  progress: bool | None = None) -> LosslessPlan:
    """Find the dead, constant and linearly dependent channels of ``model`` on ``calib``.

    Args:
        model: a :class:`~medscalpel.models.MedClassifier` (or any CNN with a Linear head);
            not modified.
        calib: calibration images (tensor ``[N, C, H, W]`` or a DataLoader of ``(x, y)``).
        rank_rtol: relative residual norm below which a channel counts as dependent (and the
            relative spread below which it counts as constant).
        min_samples_ratio: a consumer is tested for linear dependence only when it has at least
            this many samples (images x positions) per input channel; below that any channel
            would look dependent on the calibration set, so only dead/constant are used there.
        batch_size: calibration batch size.
        calib_images: use at most this many calibration images.
        dependent: also fold linearly dependent channels (False: dead and constant only).
        progress: show a progress bar.
    """
    check_range(rank_rtol, "rank_rtol", "plan_lossless", 0.0, 1.0)
    check_range(min_samples_ratio, "min_samples_ratio", "plan_lossless", 1.0)
    if not hasattr(model, "classifier") or not isinstance(model.classifier, nn.Linear):
        raise ModelError("plan_lossless needs a MedClassifier-like model whose 'classifier' is an "
                         "nn.Linear (the output layer, which is never pruned).")
    work = copy.deepcopy(model).eval()
    example = first_batch(calib, "plan_lossless")
    graph = build_channel_graph(work, example, ignored=[work.classifier])
    stats, n_images = collect_site_stats(work, graph.sites, calib, batch_size, calib_images,
                                         progress)
    if n_images == 0:
        raise ModelError("plan_lossless: the calibration data is empty.")
    return _decide(graph, stats, n_images, example, getattr(model, "arch", type(model).__name__),
                   rank_rtol, min_samples_ratio, dependent, progress)


def _decide(graph: ChannelGraph, stats: dict[str, SiteStats], n_images: int,
            example: torch.Tensor, arch: str, rank_rtol: float, min_samples_ratio: float,
            dependent: bool, progress: bool | None) -> LosslessPlan:
    tol2 = rank_rtol ** 2
    bases: dict[str, _Basis | None] = {}
    means: dict[str, np.ndarray] = {}
    site_info = []
    for name, site in graph.sites.items():
        st = stats[name]
        means[name] = st.mean
        test = dependent and st.n >= min_samples_ratio * (site.channels + 1)
        bases[name] = _Basis(st.covariance() if site.intercept_ok else st.gram()) if test else None
        site_info.append({**site.describe(), "samples": st.n, "dependency_tested": test})
        if bases[name] is not None:  # channels no group owns (e.g. the image) are always kept
            for j in range(site.channels):
                if j not in site.owners:
                    _keep(bases[name], j, tol2)
    groups: list[GroupPlan] = []
    folds: list[SiteFold] = []
    for cg in track(graph.groups, "channel decisions", progress=progress):
        removed, kinds, group_folds = [], [], []
        for ch in range(cg.size):
            per_site: dict[str, tuple[str | None, np.ndarray, float, float]] = {}
            ok = cg.supported
            for sname, idxs in cg.sites.items():
                j = idxs[ch]
                site, st, basis = graph.sites[sname], stats[sname], bases[sname]
                hi, lo = float(st.umax[j]), float(st.umin[j])
                z, r, mjj = (basis.residual(j) if basis is not None
                             else (np.zeros(0), math.inf, math.inf))
                if hi == 0.0 and lo == 0.0:
                    kind = "dead"
                elif site.intercept_ok and hi - lo <= rank_rtol * max(abs(hi), abs(lo)):
                    kind = "constant"
                elif basis is not None and (mjj <= 0.0 or r <= tol2 * mjj):
                    kind = "dependent"
                else:
                    kind = None
                    ok = False
                per_site[sname] = (kind, z, r, mjj)
            if ok:
                site_kinds = [v[0] for v in per_site.values()]
                overall = ("dead" if all(k == "dead" for k in site_kinds) else
                           "constant" if all(k in ("dead", "constant") for k in site_kinds)
                           else "dependent")
                removed.append(ch)
                kinds.append(overall)
                group_folds.append([_fold(graph.sites[sname], bases[sname], means[sname],
                                          cg.sites[sname][ch], kind, z)
                                    for sname, (kind, z, r, mjj) in per_site.items()])
            else:
                for sname, (kind, z, r, mjj) in per_site.items():
                    basis = bases[sname]
                    if basis is not None and mjj > 0.0 and r > tol2 * mjj:
                        basis.add(cg.sites[sname][ch], z, r)
        if removed and len(removed) == cg.size:
            # a layer keeps at least one channel (zero-width layers do not run); the first one
            # stays as it is (not in any basis, so no other fold refers to it)
            removed, kinds, group_folds = removed[1:], kinds[1:], group_folds[1:]
        for fl in group_folds:
            folds.extend(fl)
        groups.append(GroupPlan(cg.root, cg.size, tuple(removed), tuple(kinds), cg.supported,
                                cg.reason, tuple(cg.sites)))
    settings = {"rank_rtol": rank_rtol, "min_samples_ratio": min_samples_ratio,
                "dependent": dependent}
    return LosslessPlan(arch, (1, *example.shape[1:]),
                        tuple(groups), tuple(folds), tuple(site_info), settings, n_images)


def _keep(basis: _Basis, j: int, tol2: float) -> None:
    z, r, mjj = basis.residual(j)
    if mjj > 0.0 and r > tol2 * mjj:
        basis.add(j, z, r)


def _fold(site: Site, basis: _Basis | None, mean: np.ndarray, j: int, kind: str,
          z: np.ndarray) -> SiteFold:
    if kind == "dead":
        return SiteFold(site.name, j, "dead")
    if kind == "constant":
        return SiteFold(site.name, j, "constant", intercept=float(mean[j]))
    assert basis is not None  # dependent needs a tested basis
    a = basis.coefs(z)
    keep = np.nonzero(a)[0]
    b_idx = tuple(int(basis.idx[i]) for i in keep)
    coefs = tuple(float(a[i]) for i in keep)
    intercept = 0.0
    if site.intercept_ok:
        intercept = float(mean[j] - sum(c * mean[i] for c, i in zip(coefs, b_idx)))
    return SiteFold(site.name, j, "dependent", b_idx, coefs, intercept)


# ----------------------------------------------------------------------------- apply
def apply_plan(model: nn.Module, plan: LosslessPlan, inplace: bool = False) -> nn.Module:
    """Fold the plan's channels into their consumers and remove them physically.

    Returns a new model (the input is left unchanged unless ``inplace=True``).
    """

    out = model if inplace else copy.deepcopy(model)
    was_training = out.training
    out.eval()
    try:
        example = torch.zeros(plan.input_shape)
        graph = build_channel_graph(out, example, ignored=[out.classifier])
        by_root = {g.root: g for g in graph.groups}
        for gp in plan.groups:
            if gp.removed and (gp.layer not in by_root or by_root[gp.layer].size != gp.size):
                raise ModelError(f"The lossless plan does not fit this model: layer '{gp.layer}' "
                                 f"(with {gp.size} channels) is not a prunable producer here. "
                                 "Make the plan on the same model you apply it to.")
        by_site: dict[str, list[SiteFold]] = {}
        for f in plan.folds:
            by_site.setdefault(f.site, []).append(f)
        _fold_weights(out, graph, by_site)
        for gp in plan.groups:
            if not gp.removed:
                continue
            root = out.get_submodule(gp.layer)
            fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) \
                else tp.prune_linear_out_channels
            with torch.no_grad():
                graph.dg.get_pruning_group(root, fn, idxs=list(gp.removed)).prune()
    finally:
        out.train(was_training)
    return out


@torch.no_grad()
def _fold_weights(out: nn.Module, graph: ChannelGraph, by_site: dict[str, list[SiteFold]]) -> None:
    for sname, folds in by_site.items():
        module = out.get_submodule(sname)
        w = module.weight.detach().to(torch.float64)
        orig = w.clone()
        offset = torch.zeros(w.shape[0], dtype=torch.float64)
        for f in folds:
            col = orig[:, f.channel]
            for b, a in zip(f.basis, f.coefs):
                w[:, b] += a * col
            if f.intercept != 0.0:
                offset += f.intercept * (col.reshape(col.shape[0], -1).sum(1))
        module.weight.copy_(w.to(module.weight.dtype))
        add_output_offset(graph.dg, module, offset.to(module.weight.dtype))


MODES = ("provable", "empirical")


def fold_lossless(model: nn.Module, calib: Images | None = None, heldout: Images | None = None,
                  atol: float = 1e-5, rank_rtol: float = 1e-5, min_samples_ratio: float = 4.0,
                  dependent: bool = True, batch_size: int = 64,
                  calib_images: int | None = None, latency: bool = True,
                  latency_batch_size: int = 1, verify: bool = True, inplace: bool = False,
                  progress: bool | None = None, mode: str = "provable",
                  weight_rtol: float = 1e-6, random_inputs: int = 64,
                  input_range: tuple[float, float] | None = None,
                  input_shape: tuple[int, ...] | None = None, seed: int = 0) -> LosslessResult:
    """Plan, apply and verify lossless channel folding.

    Args:
        model: the model (left unchanged unless ``inplace=True``).
        calib: calibration images (tensor or DataLoader); the channels are analysed on them in
            ``mode="empirical"``; unused for decisions in ``mode="provable"``.
        heldout: held-out images for verification (never used for the decisions); required in
            empirical mode, optional in provable mode.
        atol: largest allowed max |delta logit| (float32) on ``heldout`` and the random inputs.
        rank_rtol, min_samples_ratio, calib_images: see :func:`plan_lossless` (empirical mode).
        dependent: also fold linearly dependent / duplicate channels.
        batch_size: batch size of the forward passes.
        latency: measure CPU latency of both models (alternating, same run).
        latency_batch_size: batch size of the latency measurement.
        verify: raise :class:`VerificationError` when a measured delta exceeds ``atol`` (in
            empirical mode only the held-out delta decides; the random-input delta is reported).
        inplace: modify and return ``model`` itself.
        progress: show progress bars.
        mode: ``"provable"`` (default): data-free analysis of the weights
            (:func:`~medscalpel.compress.provable.plan_provable`), valid for every input;
            ``"empirical"``: activation statistics on ``calib`` (:func:`plan_lossless`), valid
            on the data it was checked on.
        weight_rtol: relative tolerance of the provable filter-proportionality test.
        random_inputs: number of seeded random inputs (wider than ``input_range``) the folded
            model is also compared on (0: none).
        input_range: the normalised range of real images (default: ``[0, 1]`` mapped through
            the model card's mean/std, or ``(-3, 3)``).
        input_shape: ``(1, C, H, W)`` when neither ``calib`` nor ``heldout`` is given.
        seed: seed of the random inputs.

    Raises:
        VerificationError: the folded model's logits differ by more than ``atol``.
    """

    check_in(mode, "mode", "fold_lossless", MODES)
    check_range(atol, "atol", "fold_lossless", 0.0)
    check_range(random_inputs, "random_inputs", "fold_lossless", 0, integer=True)
    plan = _plan_for_mode(model, calib, heldout, mode, rank_rtol, min_samples_ratio, batch_size,
                          calib_images, dependent, progress, input_shape, weight_rtol)
    reference = copy.deepcopy(model) if inplace else model
    folded = apply_plan(model, plan, inplace=inplace)
    example = torch.zeros(plan.input_shape)
    lo, hi = input_range if input_range is not None else pv.input_range_of(model)
    rand = pv.random_inputs(plan.input_shape, random_inputs, lo, hi, seed) \
        if random_inputs else None
    with eval_mode(reference, folded):
        d = _measure_deltas(reference, folded, heldout, rand, calib, calib_images, batch_size)
        counts = plan.counts()
        gating = _gating(d, mode, atol)
        if verify and not all(x <= tol for x, tol in gating):
            raise _verification_error(plan, mode, d, atol, random_inputs, counts)
        p0, p1 = count_parameters(reference), count_parameters(folded)
        m0, m1 = count_macs(reference, example), count_macs(folded, example)
        lat = latency_pair(reference, folded, example, latency_batch_size) if latency else None
    report = LosslessReport(
        arch=plan.arch, params_before=p0, params_after=p1,
        params_removed_pct=100.0 * (p0 - p1) / p0 if p0 else 0.0,
        macs_before=m0, macs_after=m1,
        latency_ms_before=lat["a_ms"] if lat else None,
        latency_ms_after=lat["b_ms"] if lat else None,
        latency_ratio=lat["ratio"] if lat else None, latency_batch_size=latency_batch_size,
        max_abs_logit_delta=float(d.headline), max_abs_logit_delta_calib=d.calib, atol=atol,
        verified=bool(gating) and all(x <= tol for x, tol in gating), n_calib=plan.n_calib,
        n_heldout=d.n_held, channels=counts, layers=_layer_rows(plan),
        sites_without_dependency_test=[s["name"] for s in plan.sites
                                       if not s["dependency_tested"]],
        plan=plan, mode=mode, guarantee=GUARANTEES[mode], **_random_fields(d, rand, lo, hi, mode,
                                                                         random_inputs, atol))
    logger.info("lossless (%s): %s", mode,
                json.dumps({k: report.channels[k] for k in report.channels}))
    return LosslessResult(folded, report)


def _plan_for_mode(model: nn.Module, calib: Images | None, heldout: Images | None, mode: str,
                   rank_rtol: float, min_samples_ratio: float, batch_size: int,
                   calib_images: int | None, dependent: bool, progress: bool | None,
                   input_shape: tuple[int, ...] | None, weight_rtol: float) -> LosslessPlan:
    """Plan step of :func:`fold_lossless`: activation statistics on ``calib`` (empirical) or
    the data-free analysis of the weights (provable, on an example of the input shape)."""
    if mode == "empirical":
        if calib is None or heldout is None:
            raise ConfigError("fold_lossless(mode='empirical') needs calibration images "
                              "('calib') and held-out images ('heldout'); or use "
                              "mode='provable', which needs no data.")
        return plan_lossless(model, calib, rank_rtol, min_samples_ratio, batch_size,
                             calib_images, dependent, progress)
    if calib is not None:
        example = first_batch(calib, "fold_lossless")
    elif heldout is not None:
        example = first_batch(heldout, "fold_lossless")
    elif input_shape is not None:
        example = torch.zeros(tuple(input_shape))
    else:
        raise ConfigError("fold_lossless(mode='provable') needs the input shape: pass "
                          "'input_shape' (1, C, H, W), or held-out images to verify on.")
    return pv.plan_provable(model, example, weight_rtol, dependent, progress)


__all__ = ["GUARANTEES", "LosslessPlan", "LosslessReport", "LosslessResult", "MODES", "SiteStats",
           "apply_plan", "collect_site_stats", "fold_lossless", "plan_lossless"]
