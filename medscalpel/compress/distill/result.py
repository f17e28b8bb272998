"""Settings and result of :func:`~medscalpel.compress.distill.distill`: :class:`DistillConfig`
and :class:`DistillResult` (``distill.json`` + the students' model directories)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medscalpel.engine.train import TrainConfig
from medscalpel.errors import DataError
from medscalpel.layout import artifact, write_artifact_at
from medscalpel.models.checkpoint import save_model
from medscalpel.models.classifier import MedClassifier
from medscalpel.runs import read_json
from medscalpel.validation import check_in, check_range

SCHEMA = 1


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
        write_artifact_at(directory, "distill", self)
        return directory

    @staticmethod
    def load_dict(directory: str | os.PathLike) -> dict[str, Any]:
        """The ``distill.json`` of a saved result."""
        name = artifact("distill").filename
        p = Path(directory) / name
        if not p.is_file():
            raise DataError(f"No {name} in {directory}: not a distillation result.")
        return read_json(p)


__all__ = ["DistillConfig", "DistillResult"]
