"""Step 2 of :func:`~medscalpel.compress.structured.prune_structured`: search the channel ratio
that meets a target, on MACs (false position, cached for local pruning) or on latency measured
in a runtime (bisection)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medscalpel.compress.importance import (Criterion, L1Criterion, RelevanceCriterion,
                                            ScoresCriterion)
from medscalpel.compress.measure import count_macs
from medscalpel.compress.structured.channels import OWNER, _one_shot
from medscalpel.compress.structured.validate import _Job
from medscalpel.deploy.runtimes import runtime_latency
from medscalpel.errors import ConfigError
from medscalpel.progress import track

#: ratio searches of local pruning, by (architecture, input, target, settings): see _solve_ratio
_RATIO_CACHE: dict[tuple, tuple[float, list[dict[str, float]]]] = {}


def _solve_ratio(model: nn.Module, images: torch.Tensor, targets, crit: Criterion,
                 target_speedup: float, global_pruning: bool, max_layer_ratio: float,
                 ignored_names: Sequence[str], round_to: int | None, task: str, batch_size: int,
                 macs_before: int, progress: bool | None) -> tuple[float, list[dict[str, float]]]:
    """False position on the channel ratio until MACs_before / MACs_after reaches
    ``target_speedup``.

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
