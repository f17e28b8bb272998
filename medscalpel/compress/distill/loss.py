"""The one distillation loss of medscalpel: hard + tempered soft (+ feature, attention) terms.

:class:`DistillLoss` is used by :func:`~medscalpel.compress.distill.distill`, the pruning
recovery fine-tune (:func:`teacher_loss`), the grids and the OFA supernet; its terms are
described in :mod:`medscalpel.compress.distill`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medscalpel.errors import ConfigError, DataError
from medscalpel.validation import check_in, check_range

TASKS = ("multilabel", "multiclass")


def soft_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, task: str,
                    temperature: float = 1.0) -> torch.Tensor:
    """Divergence of the student's tempered outputs from the teacher's (0 when they agree).

    Multi-class: ``KL(softmax(t/T) || softmax(s/T))`` averaged over images. Multi-label: the
    per-class Bernoulli KL ``KL(sigmoid(t/T) || sigmoid(s/T))`` averaged over images and classes
    (equal to ``BCE(sigmoid(s/T), sigmoid(t/T))`` minus the teacher's entropy).
    """
    check_in(task, "task", "soft_divergence", TASKS)
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    if s.shape != t.shape:
        raise DataError(f"soft_divergence: student logits {tuple(s.shape)} and teacher logits "
                        f"{tuple(t.shape)} differ; both models must predict the same classes.")
    if task == "multiclass":
        return F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean",
                        log_target=True)
    p = torch.sigmoid(t)
    # KL(p || q) = p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q)), in log-sigmoid form
    kl = (p * (F.logsigmoid(t) - F.logsigmoid(s))
          + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s)))
    return kl.mean()


def attention_map(feature_map: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis spatial attention ``normalize(mean_c F_c^2)``, flattened
    to ``[N, h*w]``."""
    if feature_map.ndim != 4:
        raise DataError(f"attention_map: feature maps must be [N, C, h, w]; got shape "
                        f"{tuple(feature_map.shape)}.")
    return F.normalize(feature_map.float().pow(2).mean(1).flatten(1), dim=1)


class DistillLoss(nn.Module):
    """Hybrid distillation loss as a module (its projection, if any, is learnable).

    Args:
        soft_weight: weight of the soft (teacher) loss; ``1 - soft_weight`` weighs the hard
            (ground-truth) loss. 0: no teacher; 1: teacher only. The one distillation weight
            of medscalpel (distill, pruning recovery and grids all use this loss).
        temperature: softening temperature ``T > 0`` (the soft term is scaled by ``T^2``).
        task: ``multilabel`` (per-class sigmoid distillation) or ``multiclass`` (softmax KL).
        feature_weight: weight of the penultimate-feature MSE (0 disables it).
        attention_weight: weight of attention transfer on CAM-layer maps (0 disables it).
        student_dim, teacher_dim: penultimate widths; a learnable ``nn.Linear(student_dim,
            teacher_dim, bias=False)`` projection is created when they differ and
            ``feature_weight > 0``.
        pos_weight: optional per-class positive weights of the multi-label hard loss.

    Example:
        >>> import torch
        >>> s, t = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.0, 3.0]])
        >>> y = torch.tensor([[1.0, 0.0]])
        >>> hard = torch.nn.functional.binary_cross_entropy_with_logits(s, y)
        >>> bool(torch.isclose(DistillLoss(soft_weight=0.0)(s, t, y), hard))
        True
    """

    def __init__(self, soft_weight: float = 0.5, temperature: float = 4.0, task: str = "multilabel",
                 feature_weight: float = 0.0, attention_weight: float = 0.0,
                 student_dim: int | None = None, teacher_dim: int | None = None,
                 pos_weight: torch.Tensor | None = None):
        super().__init__()
        o = "DistillLoss"
        check_range(soft_weight, "soft_weight", o, 0.0, 1.0)
        check_range(temperature, "temperature", o, 0.0, low_inclusive=False)
        check_in(task, "task", o, TASKS)
        check_range(feature_weight, "feature_weight", o, 0.0)
        check_range(attention_weight, "attention_weight", o, 0.0)
        self.soft_weight = float(soft_weight)
        self.temperature = float(temperature)
        self.task = task
        self.feature_weight = float(feature_weight)
        self.attention_weight = float(attention_weight)
        self.projection: nn.Module | None = None
        if feature_weight > 0 and student_dim is not None and teacher_dim is not None:
            check_range(student_dim, "student_dim", o, 1, integer=True)
            check_range(teacher_dim, "teacher_dim", o, 1, integer=True)
            self.projection = (nn.Identity() if student_dim == teacher_dim
                               else nn.Linear(student_dim, teacher_dim, bias=False))
        if pos_weight is not None:
            self.register_buffer("pos_weight", torch.as_tensor(pos_weight, dtype=torch.float32))
        else:
            self.pos_weight = None

    def hard_loss(self, student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Ground-truth loss: masked BCE (multi-label, NaN = unknown) or cross-entropy."""
        s = student_logits.float()
        if self.task == "multiclass":
            if targets.ndim != 1:
                raise DataError(f"DistillLoss: multi-class targets must be class indices [N]; "
                                f"got shape {tuple(targets.shape)}.")
            return F.cross_entropy(s, targets.long())
        if targets.shape != s.shape:
            raise DataError(f"DistillLoss: multi-label targets {tuple(targets.shape)} do not match "
                            f"the logits {tuple(s.shape)}.")
        known = torch.isfinite(targets)
        t = torch.where(known, targets.float(), torch.zeros_like(s))
        per = F.binary_cross_entropy_with_logits(s, t, reduction="none",
                                                 pos_weight=self.pos_weight)
        return (per * known).sum() / known.sum().clamp(min=1)

    def feature_loss(self, student_features: torch.Tensor,
                     teacher_features: torch.Tensor) -> torch.Tensor:
        """MSE between projected student features and teacher features."""
        fs = student_features.float()
        ft = teacher_features.float()
        if self.projection is not None:
            fs = self.projection(fs)
        if fs.shape != ft.shape:
            raise ConfigError(
                f"DistillLoss: student features {tuple(student_features.shape)} cannot be compared "
                f"with teacher features {tuple(ft.shape)}. Create the loss with student_dim and "
                "teacher_dim so that a learnable projection maps one onto the other.")
        return F.mse_loss(fs, ft)

    @staticmethod
    def attention_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> torch.Tensor:
        """Attention transfer: mean squared difference of normalised attention maps."""
        if student_maps.ndim != 4 or teacher_maps.ndim != 4:
            raise DataError("DistillLoss: attention transfer needs [N, C, h, w] feature maps; got "
                            f"{tuple(student_maps.shape)} and {tuple(teacher_maps.shape)}.")
        a_s = student_maps.float().pow(2).mean(1, keepdim=True)
        if a_s.shape[-2:] != teacher_maps.shape[-2:]:
            a_s = F.interpolate(a_s, size=teacher_maps.shape[-2:], mode="bilinear",
                                align_corners=False)
        a_s = F.normalize(a_s.flatten(1), dim=1)
        return (a_s - attention_map(teacher_maps)).pow(2).mean()

    def components(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor, student_features: torch.Tensor | None = None,
                   teacher_features: torch.Tensor | None = None,
                   student_maps: torch.Tensor | None = None,
                   teacher_maps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each term (unweighted) and the weighted ``total``."""
        T = self.temperature
        out: dict[str, torch.Tensor] = {}
        zero = student_logits.new_zeros((), dtype=torch.float32)
        w = self.soft_weight
        out["hard"] = self.hard_loss(student_logits, targets) if w < 1 else zero
        out["soft"] = (soft_divergence(student_logits, teacher_logits.detach(), self.task, T)
                       if w > 0 else zero)
        total = (1 - w) * out["hard"] + w * T * T * out["soft"]
        if self.feature_weight > 0:
            if student_features is None or teacher_features is None:
                raise ConfigError("DistillLoss: feature_weight > 0 needs student_features and "
                                  "teacher_features.")
            out["feature"] = self.feature_loss(student_features, teacher_features.detach())
            total = total + self.feature_weight * out["feature"]
        if self.attention_weight > 0:
            if student_maps is None or teacher_maps is None:
                raise ConfigError("DistillLoss: attention_weight > 0 needs student_maps and "
                                  "teacher_maps (CAM-layer feature maps).")
            out["attention"] = self.attention_loss(student_maps, teacher_maps.detach())
            total = total + self.attention_weight * out["attention"]
        out["total"] = total
        return out

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                targets: torch.Tensor, student_features: torch.Tensor | None = None,
                teacher_features: torch.Tensor | None = None,
                student_maps: torch.Tensor | None = None,
                teacher_maps: torch.Tensor | None = None) -> torch.Tensor:
        return self.components(student_logits, teacher_logits, targets, student_features,
                               teacher_features, student_maps, teacher_maps)["total"]

    def settings(self) -> dict[str, Any]:
        return {"soft_weight": self.soft_weight, "temperature": self.temperature, "task": self.task,
                "feature_weight": self.feature_weight, "attention_weight": self.attention_weight,
                "projection": None if self.projection is None else type(self.projection).__name__}


def teacher_loss(teacher: nn.Module, task: str, soft_weight: float = 0.5,
                 temperature: float = 4.0) -> "DistillLoss":
    """An ``engine.train`` ``loss_fn(logits, targets, images)``: :class:`DistillLoss` against a
    frozen teacher's logits on the same batch (pruning recovery from the dense model, grids).

    The teacher is put in eval mode with gradients off (it is the caller's frozen reference).
    """
    return _TeacherLoss(teacher, DistillLoss(soft_weight, temperature, task))


class _TeacherLoss(nn.Module):
    def __init__(self, teacher: nn.Module, loss: DistillLoss):
        super().__init__()
        self.loss = loss
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._teacher = [teacher]  # not a submodule: never trained, moved or saved with the loss

    def settings(self) -> dict[str, Any]:
        return self.loss.settings()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                images: torch.Tensor) -> torch.Tensor:
        teacher = self._teacher[0]
        if next(teacher.parameters()).device != images.device:
            teacher.to(images.device)
        with torch.no_grad():
            t = teacher(images).float()
        return self.loss(logits, t, targets)


__all__ = ["DistillLoss", "TASKS", "attention_map", "soft_divergence", "teacher_loss"]
