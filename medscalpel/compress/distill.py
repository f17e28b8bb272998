"""Knowledge distillation into compact students (seed 004).

A frozen, high-capacity teacher trains a compact student with hybrid supervision::

    loss = (1 - soft_weight) * hard + soft_weight * T^2 * soft
           + feature_weight * feature + attention_weight * attention

* ``hard``: the task loss on the ground truth (BCE with unknown labels masked for multi-label,
  cross-entropy for multi-class);
* ``soft``: multi-label: per-class sigmoid distillation at temperature ``T``, the Bernoulli KL
  ``KL(sigmoid(t/T) || sigmoid(s/T))`` averaged over images and classes, which is the BCE between
  ``sigmoid(s/T)`` and the targets ``sigmoid(t/T)`` minus the teacher's (constant) entropy, so it
  is 0 exactly when the student matches the teacher and has the BCE's gradient; multi-class:
  ``KL(softmax(t/T) || softmax(s/T))`` per image (Hinton et al. 2015). ``T^2`` keeps the soft
  gradients' scale independent of ``T``;
* ``feature`` (optional): MSE between the student's penultimate features, mapped by a learnable
  linear projection when the widths differ, and the teacher's (FitNets-style hint on ``f(x)``);
* ``attention`` (optional): attention transfer (Zagoruyko & Komodakis 2017) on the CAM-layer
  feature maps: ``mean((a_s - a_t)^2)`` with ``a = normalize(mean_c F_c^2)`` after resizing the
  student's map to the teacher's resolution.

:func:`distill` runs the comparison the seed asks for on the same data and budget: the student
trained alone and the distilled student (same initial weights, seed, epochs and learning rate),
their parameters, MACs, CPU latency relative to the teacher (measured in the same run), macro
AUROC / AP (accuracy / F1 for multi-class) with bootstrap CIs, their divergence from the teacher,
and the per-class Score-CAM similarity between teacher and student
(:func:`medscalpel.explain.compare.compare_saliency`).

Example:
    >>> import torch
    >>> loss = DistillLoss(soft_weight=1.0, temperature=2.0, task="multiclass")
    >>> z = torch.tensor([[1.0, -1.0, 0.5]])
    >>> float(loss(z, z, torch.tensor([0])))
    0.0
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medscalpel.compress.measure import collect_logits, count_macs, count_parameters, cpu_latency
from medscalpel.data.base import CXRDataset
from medscalpel.compress.distill_accept import TARGETS, acceptance, auroc_verdict
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import check_compatible, collect_images, predict
from medscalpel.engine.predictions import Predictions
from medscalpel.engine.train import TrainConfig, TrainResult, seed_everything, train
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.explain.compare import compare_saliency
from medscalpel.models.checkpoint import load_model, make_card, save_model
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.zoo import ARCHS, create_model
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
TASKS = ("multilabel", "multiclass")
#: name of the temporary attribute carrying the feature projection on the student in training
_PROJ_ATTR = "distill_projection"


# ----------------------------------------------------------------------------- loss
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


# ----------------------------------------------------------------------------- training glue
class _Capture:
    """Forward hooks that keep a model's last penultimate features and CAM-layer map."""

    def __init__(self, model: MedClassifier, features: bool, maps: bool):
        self.model = model
        self.features: torch.Tensor | None = None
        self.maps: torch.Tensor | None = None
        self._handles = []
        if features:
            self._handles.append(model.backbone.register_forward_hook(self._keep_features))
        if maps:
            self._handles.append(model.cam_layer().register_forward_hook(self._keep_maps))

    def _keep_features(self, module, inputs, output):
        self.features = output

    def _keep_maps(self, module, inputs, output):
        reshape = self.model.cam_reshape
        self.maps = reshape(output) if reshape is not None else output

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class TeacherObjective:
    """An ``engine.train`` ``loss_fn(logits, targets, images)`` that runs the frozen teacher on
    the batch (eval mode, no grad, moved to the batch's device) and applies a
    :class:`DistillLoss`; features / maps of the student come from forward hooks.

    Use as a context manager so that hooks are removed and the teacher returns to the CPU.
    """

    def __init__(self, teacher: MedClassifier, student: MedClassifier, loss: DistillLoss):
        self.teacher = teacher
        self.student = student
        self.loss = loss
        self.need_features = loss.feature_weight > 0
        self.need_maps = loss.attention_weight > 0
        self._s_cap: _Capture | None = None
        self._t_cap: _Capture | None = None
        self._teacher_modes: list[tuple[nn.Parameter, bool]] = []
        self.last: dict[str, float] = {}

    def __enter__(self) -> "TeacherObjective":
        self._teacher_mode = self.teacher.training
        self._teacher_modes = [(p, p.requires_grad) for p in self.teacher.parameters()]
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._s_cap = _Capture(self.student, self.need_features, self.need_maps)
        self._t_cap = _Capture(self.teacher, False, self.need_maps)
        return self

    def __exit__(self, *exc) -> None:
        for cap in (self._s_cap, self._t_cap):
            if cap is not None:
                cap.remove()
        for p, flag in self._teacher_modes:
            p.requires_grad_(flag)
        self.teacher.train(self._teacher_mode)
        self.teacher.cpu()

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor,
                 images: torch.Tensor) -> torch.Tensor:
        if self._s_cap is None:
            raise ConfigError("TeacherObjective must be used inside a 'with' block.")
        dev = images.device
        if next(self.teacher.parameters()).device != dev:
            self.teacher.to(dev)
        with torch.no_grad():
            t_feat = self.teacher.features(images)
            t_logits = self.teacher.classifier(t_feat).float()
        parts = self.loss.components(
            logits, t_logits, targets,
            student_features=self._s_cap.features if self.need_features else None,
            teacher_features=t_feat if self.need_features else None,
            student_maps=self._s_cap.maps if self.need_maps else None,
            teacher_maps=self._t_cap.maps if self.need_maps else None)
        self.last = {k: float(v.detach()) for k, v in parts.items()}
        return parts["total"]


def distill_train(teacher: MedClassifier, student: MedClassifier, train_ds: CXRDataset,
                  val_ds: CXRDataset | None, loss: DistillLoss,
                  config: TrainConfig | None = None,
                  checkpoint_dir: str | os.PathLike | None = None,
                  progress: bool | None = None) -> TrainResult:
    """Train a copy of ``student`` with ``loss`` against the frozen ``teacher`` via
    :func:`medscalpel.engine.train.train`; both given models stay unchanged.

    The feature projection of ``loss`` (when it has parameters) is attached to the student copy
    for the duration of training so that the engine's optimiser updates it with the student, and
    detached afterwards (``loss.projection`` then holds the trained projection).
    """
    cfg = (config or TrainConfig()).validate()
    _check_pair(teacher, student, train_ds)
    has_proj = loss.projection is not None and any(True for _ in loss.projection.parameters())
    if loss.feature_weight > 0 and cfg.trainable == "classifier":
        raise ConfigError("distill_train: feature transfer trains the student's backbone, but "
                          "TrainConfig.trainable is 'classifier'. Use trainable='all' or "
                          "feature_weight=0.")
    if loss.feature_weight > 0 and loss.projection is None:
        if student.feature_dim != teacher.feature_dim:
            raise ConfigError(
                f"distill_train: student features ({student.feature_dim}) and teacher features "
                f"({teacher.feature_dim}) differ in width; create DistillLoss with "
                f"student_dim={student.feature_dim}, teacher_dim={teacher.feature_dim}.")
    s = copy.deepcopy(student)
    t = copy.deepcopy(teacher)
    if has_proj:
        s.add_module(_PROJ_ATTR, loss.projection)
    try:
        with TeacherObjective(t, s, loss) as objective:
            res = train(s, train_ds, val_ds, config=cfg, checkpoint_dir=checkpoint_dir,
                        loss_fn=objective, progress=progress, inplace=True)
    finally:
        if has_proj and hasattr(s, _PROJ_ATTR):
            proj = getattr(s, _PROJ_ATTR)
            delattr(s, _PROJ_ATTR)
            loss.projection = proj.cpu()
    res.model.card = student.card
    res.extra["distill"] = loss.settings()
    res.trainable_params = count_parameters(res.model)
    return res


# ----------------------------------------------------------------------------- model resolution
ModelLike = MedClassifier | str | os.PathLike


def _is_model_dir(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike)) and (Path(x) / "model.json").is_file()


def resolve_model(model: ModelLike, dataset: CXRDataset, role: str = "student") -> MedClassifier:
    """A copy of ``model`` (a :class:`MedClassifier`), the model in a medscalpel model directory,
    or a fresh zoo architecture sized for ``dataset`` (classes, channels, image size)."""
    if isinstance(model, MedClassifier):
        return copy.deepcopy(model)
    if _is_model_dir(model):
        return load_model(model)
    if isinstance(model, str) and model in ARCHS.names():
        return create_model(model, num_classes=dataset.num_classes,
                            in_chans=dataset.preprocess.channels,
                            img_size=dataset.preprocess.size)
    if isinstance(model, (str, os.PathLike)) and Path(model).exists():
        raise ModelError(f"The {role} {str(model)!r} is a path but not a medscalpel model "
                         "directory (model.safetensors + model.json); import foreign weights with "
                         "'medscalpel models import' first.")
    raise ModelError(f"Unknown {role} {model!r}: give a zoo architecture (one of "
                     f"{', '.join(ARCHS.names())}), a model directory or a MedClassifier.")


def _check_pair(teacher: MedClassifier, student: MedClassifier, dataset: CXRDataset) -> None:
    for role, m in (("teacher", teacher), ("student", student)):
        if not isinstance(m, MedClassifier):
            raise ModelError(f"The {role} must be a MedClassifier; got {type(m).__name__}.")
        try:
            check_compatible(m, dataset)
        except ModelError as exc:
            raise ModelError(f"The {role} ({m.arch}) does not fit the data: {exc}") from exc


# ----------------------------------------------------------------------------- measurement
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


# ----------------------------------------------------------------------------- config / result
@dataclass
class DistillConfig:
    """Settings of :func:`distill`.

    Attributes:
        soft_weight, temperature, feature_weight, attention_weight: see :class:`DistillLoss`.
        train: training budget shared by the distilled and the stand-alone student.
        teacher_train: budget to train the teacher first when it is given as an untrained zoo
            architecture name (default: ``train``).
        baseline: also train the student alone (the comparison of seed 004).
        n_boot: bootstrap replicates of the metric CIs.
        saliency_images: test images for the teacher-student Score-CAM comparison (0: skip).
        saliency_method: ``scorecam`` (seed 004), ``gradcam`` or ``gradcam++``.
        saliency_classes: class indices compared (default: every class).
        latency_repeats, latency_rounds: CPU latency measurement (batch 1, median).
    """

    soft_weight: float = 0.5
    temperature: float = 4.0
    feature_weight: float = 0.0
    attention_weight: float = 0.0
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher_train: TrainConfig | None = None
    baseline: bool = True
    n_boot: int = 1000
    saliency_images: int = 8
    saliency_method: str = "scorecam"
    saliency_classes: tuple[int, ...] | None = None
    latency_repeats: int = 10
    latency_rounds: int = 3

    def validate(self) -> "DistillConfig":
        o = "DistillConfig"
        check_range(self.soft_weight, "soft_weight", o, 0.0, 1.0)
        check_range(self.temperature, "temperature", o, 0.0, low_inclusive=False)
        check_range(self.feature_weight, "feature_weight", o, 0.0)
        check_range(self.attention_weight, "attention_weight", o, 0.0)
        check_range(self.n_boot, "n_boot", o, 0, integer=True)
        check_range(self.saliency_images, "saliency_images", o, 0, integer=True)
        check_in(self.saliency_method, "saliency_method", o, ("scorecam", "gradcam", "gradcam++"))
        check_range(self.latency_repeats, "latency_repeats", o, 1, integer=True)
        check_range(self.latency_rounds, "latency_rounds", o, 1, integer=True)
        self.train.validate()
        if self.teacher_train is not None:
            self.teacher_train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"soft_weight": self.soft_weight, "temperature": self.temperature,
                "feature_weight": self.feature_weight, "attention_weight": self.attention_weight,
                "train": self.train.to_dict(),
                "teacher_train": (None if self.teacher_train is None
                                  else self.teacher_train.to_dict()),
                "baseline": self.baseline, "n_boot": self.n_boot,
                "saliency_images": self.saliency_images, "saliency_method": self.saliency_method,
                "saliency_classes": None if self.saliency_classes is None
                else list(self.saliency_classes),
                "latency_repeats": self.latency_repeats, "latency_rounds": self.latency_rounds}


@dataclass
class DistillResult:
    """Teacher vs student(s) on the same data and budget.

    Attributes:
        teacher: arch, model id, parameters, MACs, latency and test metrics of the teacher.
        students: ``{"distilled": {...}, "alone": {...}}`` with the same fields plus
            ``param_ratio`` (student / teacher), ``speedup`` (teacher latency / student latency),
            ``auroc_drop`` (teacher - student macro AUROC), ``divergence`` from the teacher on the
            test images and the training history.
        saliency: per student, the teacher-student :class:`SaliencyComparison` summary.
        targets: whether the distilled student is accepted (see :func:`acceptance`): the
            targets, ``param_ratio`` (an exact count), ``speed`` (per-round ratios),
            ``auroc`` (a :class:`~medscalpel.engine.decision.Verdict` dict) and the overall
            ``outcome`` (pass / fail / undecided) with its ``reason``.
        model: the distilled student (best validation weights, with its card); not serialised.
    """

    teacher: dict[str, Any]
    students: dict[str, dict[str, Any]]
    saliency: dict[str, Any]
    targets: dict[str, Any]
    config: DistillConfig
    data: dict[str, Any]
    model: MedClassifier | None = None
    baseline_model: MedClassifier | None = None
    comparisons: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "teacher": self.teacher, "students": self.students,
                "saliency": self.saliency, "targets": self.targets,
                "config": self.config.to_dict(), "data": self.data}

    def table(self) -> list[dict[str, Any]]:
        """One row per model (for the CLI and docs)."""
        rows = [{"model": "teacher", "arch": self.teacher["arch"],
                 "params": self.teacher["parameters"], "MACs": self.teacher["macs"],
                 "latency_ms": self.teacher["latency_ms"], "speedup": 1.0,
                 "AUROC": self.teacher["metrics"]["auroc"], "AP": self.teacher["metrics"]["ap"]}]
        for name, s in self.students.items():
            rows.append({"model": name, "arch": s["arch"], "params": s["parameters"],
                         "MACs": s["macs"], "latency_ms": s["latency_ms"], "speedup": s["speedup"],
                         "AUROC": s["metrics"]["auroc"], "AP": s["metrics"]["ap"]})
        return rows

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the distilled student's model directory (``model/``) and ``distill.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.model is not None:
            save_model(self.model, directory / "model")
            self.students["distilled"]["model_id"] = self.model.card.model_id
        if self.baseline_model is not None:
            save_model(self.baseline_model, directory / "student_alone")
            self.students["alone"]["model_id"] = self.baseline_model.card.model_id
        write_json(directory / "distill.json", self.to_dict())
        return directory

    @staticmethod
    def load_dict(directory: str | os.PathLike) -> dict[str, Any]:
        """The ``distill.json`` of a saved result."""
        p = Path(directory) / "distill.json"
        if not p.is_file():
            raise DataError(f"No distill.json in {directory}: not a distillation result.")
        return read_json(p)


# ----------------------------------------------------------------------------- public API
def _metrics(model: MedClassifier, ds: CXRDataset, n_boot: int, seed: int) -> tuple[dict, Any]:
    preds = predict(model, ds, progress=False)
    ev = evaluate(preds, n_boot=n_boot, seed=seed)
    macro = dict(ev.macro)
    per_class = {c.name: {"auroc": c.auroc, "auroc_ci": list(c.auroc_ci), "ap": c.ap,
                          "ap_ci": list(c.ap_ci), "f1": c.f1, "n_pos": c.n_pos}
                 for c in ev.classes}
    return {"macro": macro, "per_class": per_class}, preds


def _card_for(model: MedClassifier, ds: CXRDataset, parent_card, method: str, **details):
    pre = ds.preprocess.with_augment(None)
    base = (replace(parent_card, arch=model.arch, arch_kwargs=dict(model.arch_kwargs),
                    input=pre.to_dict(), thresholds=None, metrics={}, model_id="")
            if parent_card is not None else
            make_card(model, ds.class_names, ds.task, pre))
    return base.with_lineage(method, parent=details.pop("teacher_id", ""), **details)


def _teacher_id(teacher: MedClassifier) -> str:
    if teacher.card is not None and teacher.card.model_id:
        return teacher.card.model_id
    return teacher.arch


def distill(
    teacher: ModelLike,
    student: ModelLike,
    train_ds: CXRDataset,
    val_ds: CXRDataset | None,
    test_ds: CXRDataset,
    config: DistillConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> DistillResult:
    """Distil ``teacher`` into ``student`` and compare with the student trained alone.

    Args:
        teacher: a trained :class:`MedClassifier`, a model directory, or a zoo architecture name
            (then trained first on ``train_ds`` with ``config.teacher_train``).
        student: a zoo architecture name (built for the data), a model directory (e.g. a
            structurally pruned teacher from ``compress prune``) or a :class:`MedClassifier`.
        train_ds, val_ds, test_ds: the data (the same for every model); ``val_ds`` drives early
            stopping, ``test_ds`` the reported metrics, divergence, latency input and saliency.
        config: see :class:`DistillConfig`.
        checkpoint_dir: optional directory for resumable training state (one sub-directory per
            trained model).

    Returns:
        A :class:`DistillResult`; ``result.save(dir)`` writes the student and ``distill.json``.

    Raises:
        ModelError: a model does not fit the data (classes, channels, task) or is unknown.
        ConfigError: invalid settings.

    Steps: :func:`_validate_distill` -> :func:`_prepare_models` (plan: teacher, student) ->
    :func:`_train_students` (apply) -> :func:`_measure_students`, :func:`_attach_cards`,
    :func:`_compare_saliency` (verify and record).
    """
    cfg = (config or DistillConfig()).validate()
    classes = _validate_distill(train_ds, val_ds, test_ds, cfg)
    ck = Path(checkpoint_dir) if checkpoint_dir else None
    t_model, s_init, teacher_trained_here = _prepare_models(teacher, student, train_ds, val_ds,
                                                            cfg, ck, progress)
    runs = _train_students(t_model, s_init, train_ds, val_ds, cfg, ck, progress)
    teacher_info, students, targets = _measure_students(t_model, runs, test_ds, cfg)
    teacher_info["trained_here"] = teacher_trained_here
    dm, base_model = _attach_cards(runs, s_init.card, students, train_ds, cfg,
                                   teacher_info["model_id"], t_model.arch)
    saliency, comparisons = _compare_saliency(t_model, runs, test_ds, classes, cfg, progress)
    return DistillResult(teacher=teacher_info, students=students, saliency=saliency,
                         targets=targets, config=cfg, data=_data_info(train_ds, val_ds, test_ds),
                         model=dm, baseline_model=base_model, comparisons=comparisons)


def _validate_distill(train_ds: Any, val_ds: Any, test_ds: Any, cfg: DistillConfig
                      ) -> list[int]:
    """Step 1: the data fit together; returns the class indices of the saliency comparison."""
    for name, ds in (("train_ds", train_ds), ("test_ds", test_ds)):
        if not isinstance(ds, CXRDataset):
            raise DataError(f"distill: '{name}' must be a CXRDataset; got {type(ds).__name__}.")
    if val_ds is not None and val_ds.task != train_ds.task:
        raise DataError("distill: the validation and training data have different tasks.")
    if test_ds.class_names != train_ds.class_names or test_ds.task != train_ds.task:
        raise DataError("distill: the test data's classes/task differ from the training data's.")
    classes = (list(cfg.saliency_classes) if cfg.saliency_classes is not None
               else list(range(test_ds.num_classes)))
    bad = [k for k in classes if not 0 <= int(k) < test_ds.num_classes]
    if bad:
        raise ConfigError(f"DistillConfig.saliency_classes {bad} are not class indices of the "
                          f"{test_ds.num_classes} classes {test_ds.class_names}.")
    return classes


def _prepare_models(teacher: ModelLike, student: ModelLike, train_ds: CXRDataset,
                    val_ds: CXRDataset | None, cfg: DistillConfig, ck: Path | None,
                    progress: bool | None
                    ) -> tuple[MedClassifier, MedClassifier, dict[str, Any] | None]:
    """Step 2: the teacher (trained here when given as an architecture name) and the student's
    seeded initial weights; returns (teacher, student, how the teacher was trained here)."""
    seed_everything(cfg.train.seed)  # fresh architectures start from seeded weights
    t_model = resolve_model(teacher, train_ds, "teacher")
    teacher_trained_here = None
    if not _is_model_dir(teacher) and not isinstance(teacher, MedClassifier):
        tcfg = cfg.teacher_train or cfg.train
        tres = train(t_model, train_ds, val_ds, config=tcfg,
                     checkpoint_dir=ck / "teacher" if ck else None, progress=progress)
        t_model = tres.model
        t_model.card = _card_for(t_model, train_ds, None, "train", teacher_id="",
                                 epochs=tcfg.epochs)
        teacher_trained_here = {"epochs_run": len(tres.history), "best_epoch": tres.best_epoch,
                                "seconds": tres.seconds, "config": tcfg.to_dict()}
    if t_model.card is None:  # our copy: give it the data's contract (class names for maps)
        t_model.card = make_card(t_model, train_ds.class_names, train_ds.task,
                                 train_ds.preprocess.with_augment(None))
    seed_everything(cfg.train.seed)
    s_init = resolve_model(student, train_ds, "student")
    _check_pair(t_model, s_init, train_ds)
    return t_model, s_init, teacher_trained_here


def _train_students(t_model: MedClassifier, s_init: MedClassifier, train_ds: CXRDataset,
                    val_ds: CXRDataset | None, cfg: DistillConfig, ck: Path | None,
                    progress: bool | None) -> dict[str, TrainResult]:
    """Step 3: the distilled student, then (``cfg.baseline``) the same student alone, from the
    same initial weights, seed, epochs and learning rate."""
    loss = DistillLoss(cfg.soft_weight, cfg.temperature, train_ds.task, cfg.feature_weight,
                       cfg.attention_weight, student_dim=s_init.feature_dim,
                       teacher_dim=t_model.feature_dim)
    runs: dict[str, TrainResult] = {
        "distilled": distill_train(t_model, s_init, train_ds, val_ds, loss, cfg.train,
                                   checkpoint_dir=ck / "distilled" if ck else None,
                                   progress=progress)}
    if cfg.baseline:
        runs["alone"] = train(s_init, train_ds, val_ds, config=cfg.train,
                              checkpoint_dir=ck / "alone" if ck else None, progress=progress)
    return runs


def _measure_students(t_model: MedClassifier, runs: dict[str, TrainResult],
                      test_ds: CXRDataset, cfg: DistillConfig
                      ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """Step 4: test metrics, size, latency (in turns, same run) and divergence of the teacher
    and every student, and whether the distilled student meets :data:`TARGETS` (a verdict:
    :func:`acceptance`)."""
    task = test_ds.task
    example = test_ds.image(0)[None]
    t_metrics, t_preds = _metrics(t_model, test_ds, cfg.n_boot, cfg.train.seed)
    lat_rounds = latency_rounds({"teacher": t_model, **{k: r.model for k, r in runs.items()}},
                                example, cfg.latency_repeats, cfg.latency_rounds)
    lat = {k: float(np.median(v)) for k, v in lat_rounds.items()}
    preds: dict[str, Predictions] = {}
    t_params = count_parameters(t_model)
    teacher_info = {"arch": t_model.arch, "model_id": _teacher_id(t_model),
                    "parameters": t_params, "macs": count_macs(t_model, example),
                    "latency_ms": lat["teacher"], "latency_rounds_ms": lat_rounds["teacher"],
                    "metrics": t_metrics["macro"],
                    "per_class": t_metrics["per_class"], "trained_here": None}
    n_div = min(len(test_ds), 256)
    div_images, _ = collect_images(test_ds, n_div, seed=cfg.train.seed)
    students: dict[str, dict[str, Any]] = {}
    for name, r in runs.items():
        m = r.model
        met, preds[name] = _metrics(m, test_ds, cfg.n_boot, cfg.train.seed)
        params = count_parameters(m)
        students[name] = {
            "arch": m.arch, "parameters": params, "macs": count_macs(m, example),
            "latency_ms": lat[name], "latency_rounds_ms": lat_rounds[name],
            "param_ratio": params / t_params,
            "speedup": lat["teacher"] / lat[name] if lat[name] > 0 else float("nan"),
            "metrics": met["macro"], "per_class": met["per_class"],
            "auroc_drop": t_metrics["macro"]["auroc"] - met["macro"]["auroc"],
            "divergence": teacher_divergence(m, t_model, div_images, task, 1.0),
            "divergence_images": n_div,
            "train": {"history": r.history, "best_epoch": r.best_epoch, "seconds": r.seconds,
                      **({"distill": r.extra["distill"]} if "distill" in r.extra else {})}}
    d = students["distilled"]
    targets = acceptance(d, lat_rounds["teacher"], lat_rounds["distilled"],
                         auroc_verdict(t_preds, preds["distilled"], cfg.n_boot, cfg.train.seed))
    return teacher_info, students, targets


def _attach_cards(runs: dict[str, TrainResult], parent_card: Any,
                  students: dict[str, dict[str, Any]], train_ds: CXRDataset,
                  cfg: DistillConfig, t_id: str, t_arch: str
                  ) -> tuple[MedClassifier, MedClassifier | None]:
    """Cards with lineage for the distilled student and the student trained alone."""
    details = {"teacher_id": t_id, "teacher_arch": t_arch, "soft_weight": cfg.soft_weight,
               "temperature": cfg.temperature, "feature_weight": cfg.feature_weight,
               "attention_weight": cfg.attention_weight, "epochs": cfg.train.epochs,
               "lr": cfg.train.lr, "seed": cfg.train.seed}
    dm = runs["distilled"].model
    dm.card = replace(_card_for(dm, train_ds, parent_card, "distill", **details),
                      metrics={"test": students["distilled"]["metrics"]},
                      training=cfg.train.to_dict())
    base_model = None
    if "alone" in runs:
        base_model = runs["alone"].model
        base_model.card = replace(
            _card_for(base_model, train_ds, parent_card, "train",
                      **{"teacher_id": "", "epochs": cfg.train.epochs, "lr": cfg.train.lr,
                         "seed": cfg.train.seed, "role": "distillation baseline"}),
            metrics={"test": students["alone"]["metrics"]}, training=cfg.train.to_dict())
    return dm, base_model


def _compare_saliency(t_model: MedClassifier, runs: dict[str, TrainResult],
                      test_ds: CXRDataset, classes: list[int], cfg: DistillConfig,
                      progress: bool | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Where do they look? Per class, teacher vs each student on the same test images."""
    saliency: dict[str, Any] = {}
    comparisons: dict[str, Any] = {}
    if not cfg.saliency_images:
        return saliency, comparisons
    images, idx = collect_images(test_ds, min(cfg.saliency_images, len(test_ds)),
                                 seed=cfg.train.seed)
    for name, r in runs.items():
        cmp = compare_saliency(t_model, r.model, images, classes, method=cfg.saliency_method,
                               progress=progress, ids=[test_ds.ids[i] for i in idx])
        comparisons[name] = cmp
        full = cmp.to_dict()
        saliency[name] = {k: full[k] for k in ("method", "top_fraction", "classes", "overall")}
    return saliency, comparisons


def _data_info(train_ds: CXRDataset, val_ds: CXRDataset | None, test_ds: CXRDataset
               ) -> dict[str, Any]:
    return {"train": train_ds.spec, "train_hash": train_ds.content_hash(),
            "n_train": len(train_ds),
            "val_hash": val_ds.content_hash() if val_ds is not None else None,
            "n_val": len(val_ds) if val_ds is not None else 0,
            "test_hash": test_ds.content_hash(), "n_test": len(test_ds), "task": train_ds.task,
            "class_names": list(test_ds.class_names), "input": test_ds.preprocess.to_dict()}


__all__ = ["DistillConfig", "DistillLoss", "DistillResult", "TARGETS", "TeacherObjective",
           "acceptance", "attention_map", "distill", "distill_train", "latency_rounds",
           "latency_table", "resolve_model", "soft_divergence",
           "teacher_divergence"]
