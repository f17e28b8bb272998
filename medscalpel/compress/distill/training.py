"""Training glue of distillation: the frozen teacher as an ``engine.train`` objective
(:class:`TeacherObjective`, with forward hooks for the student's features and maps) and
:func:`distill_train`, which trains a copy of the student with it."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from medscalpel.compress.distill.loss import DistillLoss
from medscalpel.compress.distill.models import _check_pair
from medscalpel.compress.measure import count_parameters
from medscalpel.data.base import CXRDataset
from medscalpel.engine.train import TrainConfig, TrainResult, train
from medscalpel.errors import ConfigError
from medscalpel.models.classifier import MedClassifier

#: name of the temporary attribute carrying the feature projection on the student in training
_PROJ_ATTR = "distill_projection"


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


__all__ = ["TeacherObjective", "distill_train"]
