"""Shared measurements for every compression method: parameters, MACs, CPU latency and output
agreement between two models.

All functions leave the models they measure unchanged (train/eval mode restored, hooks removed).

Example:
    >>> import torch
    >>> from medscalpel.models.zoo import create_model
    >>> m = create_model("vgg_tiny", num_classes=2, img_size=32)
    >>> count_parameters(m) == sum(p.numel() for p in m.parameters())
    True
    >>> max_abs_logit_delta(m, m, torch.zeros(2, 1, 32, 32))
    0.0
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader

from medscalpel.deploy.timing import median_ms, speed_ratio
from medscalpel.errors import ConfigError
from medscalpel.validation import check_range

Images = torch.Tensor | DataLoader | Iterable


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode for the block and restore each one's previous mode."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, t in zip(models, modes):
            m.train(t)


def iter_images(data: Images, batch_size: int = 64, limit: int | None = None,
                owner: str = "medscalpel.compress") -> Iterator[torch.Tensor]:
    """Yield float image batches ``[B, C, H, W]`` from a tensor, a DataLoader of ``(x, y)`` /
    ``x`` items, or any iterable of such items; stop after ``limit`` images when given."""
    seen = 0
    if isinstance(data, torch.Tensor):
        if data.ndim != 4:
            raise ConfigError(f"{owner}: image tensors must be [N, C, H, W]; got shape "
                              f"{tuple(data.shape)}.")
        n = data.shape[0] if limit is None else min(limit, data.shape[0])
        for i in range(0, n, batch_size):
            yield data[i:min(i + batch_size, n)].float()
        return
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ConfigError(f"{owner}: the data must yield image batches [B, C, H, W] (or "
                              f"(images, labels) pairs); got {type(x).__name__}.")
        if limit is not None and seen + x.shape[0] > limit:
            x = x[:limit - seen]
        if x.shape[0] == 0:
            return
        seen += x.shape[0]
        yield x.float()
        if limit is not None and seen >= limit:
            return


def first_batch(data: Images, owner: str = "medscalpel.compress") -> torch.Tensor:
    for x in iter_images(data, batch_size=2, owner=owner):
        return x[:1]
    raise ConfigError(f"{owner}: the image data is empty.")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return int(sum(p.numel() for p in model.parameters()))


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulate operations of one forward pass on ``example_inputs`` (counted by
    Torch-Pruning's ``count_ops_and_params``, which follows the actual tensor shapes)."""

    with eval_mode(model), torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs)


logger = logging.getLogger(__name__)


def cpu_latency(model: nn.Module, example_inputs: torch.Tensor, batch_size: int = 1,
                warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time in milliseconds of one forward pass at ``batch_size`` on the CPU
    (after ``warmup`` passes), in the current thread settings.

    Compare two models only with numbers taken in the same process, one after the other.
    """
    check_range(batch_size, "batch_size", "cpu_latency", 1, integer=True)
    check_range(repeats, "repeats", "cpu_latency", 1, integer=True)
    check_range(warmup, "warmup", "cpu_latency", 0, integer=True)
    x = example_inputs[:1].float().cpu()
    x = x.expand(batch_size, *x.shape[1:]).contiguous()
    with eval_mode(model), torch.inference_mode():
        return median_ms(lambda: model(x), warmup, repeats)


def latency_pair(model_a: nn.Module, model_b: nn.Module, example_inputs: torch.Tensor,
                 batch_size: int = 1, warmup: int = 3, repeats: int = 10,
                 rounds: int = 3) -> dict[str, float]:
    """CPU latency of two models measured alternately in the same run (so that machine load
    affects both alike): the one latency protocol of medscalpel.

    Returns:
        medians in ms (``a_ms``, ``b_ms``), ``ratio``: the median of the per-round ratios
        ``a / b`` (> 1 means ``b`` is faster), the per-round ratios, their order-statistic
        interval (``ratio_low``, ``ratio_high``, ``ratio_confidence``), ``spread`` ((max - min)
        / median of the round ratios), ``noisy`` (spread > :data:`~medscalpel.deploy.timing.
        NOISY_SPREAD`: a warning is logged; repeat on an idle machine before trusting the
        ratio), ``outcome`` (:class:`~medscalpel.deploy.timing.SpeedRatio`: ``faster`` /
        ``slower`` / ``undecided`` for ``b``) and the 1-minute load average.
    """
    a_t, b_t = [], []
    for _ in range(rounds):
        a_t.append(cpu_latency(model_a, example_inputs, batch_size, warmup, repeats))
        b_t.append(cpu_latency(model_b, example_inputs, batch_size, warmup, repeats))
    sr = speed_ratio(a_t, b_t)
    if sr.noisy:
        logger.warning("latency ratio %.2f varies by %.0f%% between %d alternated rounds "
                       "(load average %.1f): measure again on an idle machine", sr.ratio,
                       100 * sr.spread, rounds, os.getloadavg()[0])
    return {"a_ms": sr.reference_ms, "b_ms": sr.candidate_ms, "ratio": sr.ratio,
            "batch_size": batch_size, "round_ratios": list(sr.rounds), "ratio_low": sr.low,
            "ratio_high": sr.high, "ratio_confidence": sr.confidence, "spread": sr.spread,
            "noisy": sr.noisy, "outcome": sr.outcome, "rounds": rounds,
            "load_average": float(os.getloadavg()[0])}


@torch.no_grad()
def collect_logits(model: nn.Module, images: Images, batch_size: int = 64) -> torch.Tensor:
    """Logits of ``model`` on all images (float32, eval mode, mode restored)."""
    outs = []
    with eval_mode(model):
        for x in iter_images(images, batch_size):
            outs.append(model(x).float())
    if not outs:
        raise ConfigError("collect_logits: the image data is empty.")
    return torch.cat(outs)


@torch.no_grad()
def max_abs_logit_delta(model_a: nn.Module, model_b: nn.Module, images: Images,
                        batch_size: int = 64) -> float:
    """Largest absolute difference between the two models' logits over all images (float32)."""
    worst = 0.0
    any_batch = False
    with eval_mode(model_a, model_b):
        for x in iter_images(images, batch_size):
            any_batch = True
            d = (model_a(x).float() - model_b(x).float()).abs().max().item()
            worst = max(worst, float(d))
    if not any_batch:
        raise ConfigError("max_abs_logit_delta: the image data is empty.")
    return worst

