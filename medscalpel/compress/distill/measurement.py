"""Measurements of a distillation: the student's divergence from the teacher and batch-1 CPU
latency of several models measured in turns (per-round ratios compare like with like)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medscalpel.compress.distill.loss import soft_divergence
from medscalpel.compress.measure import collect_logits, cpu_latency
from medscalpel.models.classifier import MedClassifier


@torch.no_grad()
def teacher_divergence(student: MedClassifier, teacher: MedClassifier, images: torch.Tensor,
                       task: str, temperature: float = 1.0, batch_size: int = 64) -> float:
    """Mean :func:`soft_divergence` of the student from the teacher on ``images`` (eval mode,
    both models left as they were)."""
    s = collect_logits(student, images, batch_size)
    t = collect_logits(teacher, images, batch_size)
    return float(soft_divergence(s, t, task, temperature))


def latency_rounds(models: dict[str, nn.Module], example: torch.Tensor, repeats: int = 10,
                   rounds: int = 3, warmup: int = 3) -> dict[str, list[float]]:
    """Batch-1 CPU latency (median ms of ``repeats`` passes) of several models, per round: the
    models are measured in turns within each round, so that the shared machine's load affects
    all of them alike and a per-round ratio compares like with like."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            times[name].append(cpu_latency(m, example, 1, warmup, repeats))
    return times


def latency_table(models: dict[str, nn.Module], example: torch.Tensor, repeats: int = 10,
                  rounds: int = 3, warmup: int = 3) -> dict[str, float]:
    """Median over rounds of :func:`latency_rounds`."""
    times = latency_rounds(models, example, repeats, rounds, warmup)
    return {k: float(np.median(v)) for k, v in times.items()}


__all__ = ["latency_rounds", "latency_table", "teacher_divergence"]
