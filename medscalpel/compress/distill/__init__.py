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

The package holds one concept a module: :mod:`.loss` (:class:`DistillLoss`, :func:`teacher_loss`),
:mod:`.training` (:class:`TeacherObjective`, :func:`distill_train`), :mod:`.models` (which model
an argument names: :func:`resolve_model`), :mod:`.measurement` (divergence, latency in turns),
:mod:`.result` (:class:`DistillConfig`, :class:`DistillResult`) and :mod:`.flow`
(:func:`distill` and its steps). Every name stays importable from here.
"""

from __future__ import annotations

from medscalpel.compress.distill.flow import distill
from medscalpel.compress.distill.loss import (TASKS, DistillLoss, attention_map, soft_divergence,
                                              teacher_loss)
from medscalpel.compress.distill.measurement import (latency_rounds, latency_table,
                                                     teacher_divergence)
from medscalpel.compress.distill.models import ModelLike, resolve_model
from medscalpel.compress.distill.result import SCHEMA, DistillConfig, DistillResult
from medscalpel.compress.distill.training import TeacherObjective, distill_train
from medscalpel.compress.distill_accept import TARGETS, acceptance

__all__ = ["DistillConfig", "DistillLoss", "DistillResult", "ModelLike", "SCHEMA", "TARGETS",
           "TASKS", "TeacherObjective", "acceptance", "attention_map", "distill",
           "distill_train", "latency_rounds", "latency_table", "resolve_model",
           "soft_divergence", "teacher_divergence", "teacher_loss"]
