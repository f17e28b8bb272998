"""The distillation comparison itself: :func:`distill` and its steps (validate -> prepare the
models -> train the students -> measure, cards, saliency)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.compress.distill.loss import DistillLoss
from medscalpel.compress.distill.measurement import latency_rounds, teacher_divergence
from medscalpel.compress.distill.models import ModelLike, _check_pair, _is_model_dir, resolve_model
from medscalpel.compress.distill.result import DistillConfig, DistillResult
from medscalpel.compress.distill.training import distill_train
from medscalpel.compress.distill_accept import acceptance, auroc_verdict
from medscalpel.compress.measure import count_macs, count_parameters
from medscalpel.data.base import CXRDataset
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import collect_images, predict
from medscalpel.engine.predictions import Predictions
from medscalpel.engine.train import TrainResult, seed_everything, train
from medscalpel.errors import ConfigError, DataError
from medscalpel.explain.compare import compare_saliency
from medscalpel.models.checkpoint import make_card
from medscalpel.models.classifier import MedClassifier


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


__all__ = ["distill"]
