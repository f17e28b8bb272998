"""Once-for-all distillation end to end (:func:`distill_ofa`): ONE supernet training, then one
subnet per latency budget, each saved as a standalone model with its lineage, and measured on
the test split against the teacher.

Steps: :func:`~medscalpel.compress.ofa.train.train_supernet` (progressive shrinking, KD,
resumable) -> :func:`~medscalpel.compress.ofa.search.search_subnets` (latency measured on the
deploy runtime, validation AUROC) -> cards with lineage (supernet id, subnet configuration,
measured latency, runtime) -> test metrics with paired bootstrap CIs against the teacher
(:func:`~medscalpel.engine.compare.compare_predictions`), latency of the teacher and of every
subnet in alternated rounds on the same runtime (:func:`~medscalpel.deploy.timing.speed_ratio`),
Score-CAM agreement with the teacher (:func:`~medscalpel.explain.compare.compare_saliency`).

Example:
    >>> res = distill_ofa("runs/teacher/model", train_ds, val_ds, test_ds,
    ...                   budgets_ms=(0.2, 0.4))  # doctest: +SKIP
    >>> res.save("runs/ofa")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medscalpel.compress.measure import count_macs, count_parameters
from medscalpel.compress.ofa.search import (LatencySpec, SearchConfig, SearchResult,
                                            alternated_latency, search_subnets)
from medscalpel.compress.ofa.supernet import OFASupernet, SupernetInfo
from medscalpel.compress.ofa.train import (OFATrainConfig, resolve_teacher, save_supernet,
                                           train_supernet)
from medscalpel.data.base import CXRDataset
from medscalpel.deploy.timing import speed_ratio
from medscalpel.engine.compare import compare_predictions
from medscalpel.engine.predict import collect_images, predict
from medscalpel.engine.train import TrainConfig, seed_everything, train
from medscalpel.errors import ConfigError, DataError
from medscalpel.explain.compare import compare_saliency
from medscalpel.models.checkpoint import make_card, save_model
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.zoo import ARCHS, create_model
from medscalpel.runs import read_json, write_json
from medscalpel.validation import check_in, check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
RESULT = "ofa.json"
SUPERNET_DIR = "supernet"


@dataclass
class OFAConfig:
    """Settings of :func:`distill_ofa`.

    Attributes:
        train: the supernet training (:class:`OFATrainConfig`).
        search: the subnet search (:class:`SearchConfig`).
        n_boot: paired bootstrap replicates of the test comparison with the teacher.
        latency_rounds: alternated rounds of the final teacher-vs-subnets timing.
        saliency_images, saliency_method, saliency_classes: the teacher-subnet saliency
            comparison (0 images: skipped).
    """

    train: OFATrainConfig = field(default_factory=OFATrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    n_boot: int = 1000
    latency_rounds: int = 5
    saliency_images: int = 8
    saliency_method: str = "scorecam"
    saliency_classes: tuple[int, ...] | None = None
    teacher_train: TrainConfig | None = None

    def validate(self) -> "OFAConfig":
        o = "OFAConfig"
        self.train.validate()
        self.search.validate()
        check_range(self.n_boot, "n_boot", o, 0, integer=True)
        check_range(self.latency_rounds, "latency_rounds", o, 1, integer=True)
        check_range(self.saliency_images, "saliency_images", o, 0, integer=True)
        check_in(self.saliency_method, "saliency_method", o, ("scorecam", "gradcam", "gradcam++"))
        if self.teacher_train is not None:
            self.teacher_train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train.to_dict(), "search": self.search.to_dict(),
                "n_boot": self.n_boot, "latency_rounds": self.latency_rounds,
                "saliency_images": self.saliency_images, "saliency_method": self.saliency_method,
                "saliency_classes": None if self.saliency_classes is None
                else list(self.saliency_classes),
                "teacher_train": None if self.teacher_train is None
                else self.teacher_train.to_dict()}


def budget_label(budget_ms: float) -> str:
    """The folder name of a budget's subnet, e.g. ``budget_0.25ms``."""
    return f"budget_{budget_ms:g}ms"


@dataclass
class OFAResult:
    """One supernet, the search, and per budget the chosen subnet measured on the test split.

    Attributes:
        supernet: id, space, parameters and training history of the supernet.
        search: every measured candidate and the per-budget choice.
        teacher: arch, id, parameters, MACs, latency rounds and test macro AUROC.
        subnets: one dict per budget: ``met`` (a subnet within the budget was confirmed),
            ``reason``, and when met the subnet's configuration, parameters, MACs, latency
            (rounds, alternated with the teacher; ``speed_vs_teacher`` a SpeedRatio dict),
            test macro AUROC with its CI and the paired delta vs the teacher with its CI,
            Score-CAM agreement, ``model_dir`` once saved.
        models: budget label -> subnet model (with card); not serialised.
    """

    supernet: SupernetInfo
    search: SearchResult
    teacher: dict[str, Any]
    subnets: list[dict[str, Any]]
    data: dict[str, Any]
    config: OFAConfig
    models: dict[str, MedClassifier] = field(default_factory=dict, repr=False)
    supernet_model: OFASupernet | None = field(default=None, repr=False)
    train_result: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "supernet": self.supernet.to_dict(),
                "search": self.search.to_dict(), "teacher": self.teacher,
                "subnets": self.subnets, "data": self.data, "config": self.config.to_dict()}

    def table(self) -> list[dict[str, Any]]:
        rows = [{"model": "teacher", "budget_ms": None, "params": self.teacher["parameters"],
                 "latency_ms": self.teacher["latency_ms"], "speedup": 1.0,
                 "AUROC": self.teacher["test_auroc"], "dAUROC": 0.0, "status": "reference"}]
        for s in self.subnets:
            rows.append({"model": s["label"], "budget_ms": s["budget_ms"],
                         "params": s.get("parameters"), "latency_ms": s.get("latency_ms"),
                         "speedup": (s.get("speed_vs_teacher") or {}).get("ratio"),
                         "AUROC": s.get("test_auroc"), "dAUROC": s.get("delta_auroc"),
                         "status": "met" if s["met"] else "NOT MET"})
        return rows

    def save(self, directory: str | os.PathLike) -> Path:
        """``supernet/``, ``<budget label>/model/`` per met budget, and ``ofa.json``."""
        d = Path(directory)
        if self.train_result is not None:
            save_supernet(self.train_result, d / SUPERNET_DIR)
        for s in self.subnets:
            m = self.models.get(s["label"])
            if m is not None:
                s["model_dir"] = str(save_model(m, d / s["label"] / "model"))
        write_json(d / RESULT, self.to_dict())
        return d

    @staticmethod
    def load_dict(directory: str | os.PathLike) -> dict[str, Any]:
        p = Path(directory) / RESULT
        if not p.is_file():
            raise DataError(f"No {RESULT} in {directory}: not a once-for-all distillation run.")
        d = read_json(p)
        if int(d.get("schema_version", 0)) > SCHEMA:
            raise DataError(f"{p} has schema {d.get('schema_version')}, newer than {SCHEMA}.")
        return d


def distill_ofa(teacher: MedClassifier | str | os.PathLike, train_ds: CXRDataset,
                val_ds: CXRDataset, test_ds: CXRDataset, budgets_ms: Sequence[float],
                config: OFAConfig | None = None, latency: LatencySpec | None = None,
                checkpoint_dir: str | os.PathLike | None = None,
                progress: bool | None = None) -> OFAResult:
    """Train one supernet distilled from ``teacher`` and specialise one subnet per budget.

    Args:
        teacher: a trained model or model directory, or a zoo architecture name (then trained
            here first with ``config.teacher_train``, checkpointed like the supernet).
        train_ds, val_ds, test_ds: training data, the patient-wise validation split (supernet
            monitoring and subnet scores) and the test split (reported numbers).
        budgets_ms: batch-1 latency budgets (ms) on ``latency.runtime``.
        config: see :class:`OFAConfig`; latency: see :class:`LatencySpec` (default ONNX
            Runtime fp32, 1 thread; :func:`latency_spec_from_deploy` reads a deploy run's).
        checkpoint_dir: resumable supernet training state.

    Returns:
        An :class:`OFAResult` (``save(dir)`` writes the supernet, the subnets and ``ofa.json``).
    """
    cfg = (config or OFAConfig()).validate()
    spec = latency or LatencySpec()
    _validate(train_ds, val_ds, test_ds, budgets_ms)
    ck = Path(checkpoint_dir) if checkpoint_dir else None
    t_model = _prepare_teacher(teacher, train_ds, val_ds, cfg, ck, progress)
    tr = train_supernet(t_model, train_ds, val_ds, cfg.train,
                        ck / SUPERNET_DIR if ck else None, progress)
    info = tr.info()
    bn_images, _ = collect_images(train_ds, min(cfg.search.bn_images, len(train_ds)),
                                  seed=cfg.search.seed)
    sr = search_subnets(tr.supernet, budgets_ms, val_ds, bn_images, spec, cfg.search, progress)
    models = _cards(sr, info, tr.teacher_id, train_ds, spec, cfg)
    teacher_info, subnets = _measure(t_model, sr, models, test_ds, spec, cfg, bn_images, progress)
    return OFAResult(info, sr, teacher_info, subnets, _data_info(train_ds, val_ds, test_ds), cfg,
                     models, tr.supernet, tr)


def _prepare_teacher(teacher: MedClassifier | str | os.PathLike, train_ds: CXRDataset,
                     val_ds: CXRDataset, cfg: OFAConfig, ck: Path | None,
                     progress: bool | None) -> MedClassifier:
    """The trained teacher; a zoo architecture name is trained here first."""
    if not (isinstance(teacher, str) and teacher in ARCHS.names() and not Path(teacher).exists()):
        return resolve_teacher(teacher, train_ds)
    tcfg = cfg.teacher_train or TrainConfig(seed=cfg.train.seed)
    seed_everything(tcfg.seed)
    pre = train_ds.preprocess
    model = create_model(teacher, num_classes=train_ds.num_classes, in_chans=pre.channels,
                         img_size=pre.size)
    res = train(model, train_ds, val_ds, config=tcfg,
                checkpoint_dir=ck / "teacher" if ck else None, progress=progress)
    t = res.model
    t.card = make_card(t, train_ds.class_names, train_ds.task, pre.with_augment(None),
                       training=tcfg.to_dict()).with_lineage("train", parent="",
                                                             epochs=tcfg.epochs)
    return t


def _validate(train_ds: Any, val_ds: Any, test_ds: Any, budgets_ms: Sequence[float]) -> None:
    for name, ds in (("train_ds", train_ds), ("val_ds", val_ds), ("test_ds", test_ds)):
        if not isinstance(ds, CXRDataset):
            raise DataError(f"distill_ofa: '{name}' must be a CXRDataset (the search scores "
                            f"subnets on the validation split); got {type(ds).__name__}.")
        ds.require_nonempty()
    for ds in (val_ds, test_ds):
        if ds.class_names != train_ds.class_names or ds.task != train_ds.task:
            raise DataError("distill_ofa: the splits' classes/task differ from the training "
                            "data's.")
    if not budgets_ms:
        raise ConfigError("distill_ofa needs at least one latency budget (ms).")


def _cards(sr: SearchResult, info: SupernetInfo, t_id: str, train_ds: CXRDataset,
           spec: LatencySpec, cfg: OFAConfig) -> dict[str, MedClassifier]:
    """Each confirmed subnet with a card whose lineage names the supernet, the subnet
    configuration, the budget and the latency measured on the runtime."""
    pre = train_ds.preprocess.with_augment(None)
    models: dict[str, MedClassifier] = {}
    for ch in sr.choices:
        if not ch.met or ch.model is None:
            continue
        m = ch.model
        m.card = make_card(m, train_ds.class_names, train_ds.task, pre).with_lineage(
            "ofa_subnet", parent=t_id, supernet_id=info.supernet_id,
            subnet_config=ch.candidate.config.to_dict(), subnet_key=ch.candidate.key,
            budget_ms=ch.budget_ms, latency_ms=ch.confirm_latency_ms,
            latency_rounds_ms=list(ch.confirm_rounds_ms), runtime=spec.runtime,
            threads=spec.threads, latency_source=spec.source, val_auroc=ch.candidate.val_auroc,
            soft_weight=cfg.train.soft_weight, temperature=cfg.train.temperature,
            phase_epochs=list(cfg.train.phase_epochs), seed=cfg.train.seed)
        models[budget_label(ch.budget_ms)] = m
    return models


def _measure(t_model: MedClassifier, sr: SearchResult, models: dict[str, MedClassifier],
             test_ds: CXRDataset, spec: LatencySpec, cfg: OFAConfig, bn_images,
             progress: bool | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Test metrics (paired with the teacher), alternated latency and saliency agreement."""
    example = test_ds.image(0)[None]
    t_preds = predict(t_model, test_ds, progress=False)
    lat = alternated_latency({"teacher": t_model, **models}, spec, example, bn_images[:32],
                             rounds=cfg.latency_rounds)
    seed = cfg.train.seed
    cmp_t = compare_predictions(t_preds, t_preds, n_boot=0, seed=seed)
    teacher = {"arch": t_model.arch, "model_id": getattr(t_model.card, "model_id", ""),
               "parameters": count_parameters(t_model), "macs": count_macs(t_model, example),
               "latency_ms": float(np.median(lat["teacher"])),
               "latency_rounds_ms": lat["teacher"],
               "test_auroc": cmp_t.macro["auroc_ref"]}
    sal_images = (collect_images(test_ds, min(cfg.saliency_images, len(test_ds)), seed=seed)[0]
                  if cfg.saliency_images else None)
    classes = (list(cfg.saliency_classes) if cfg.saliency_classes is not None
               else list(range(test_ds.num_classes)))
    subnets = []
    for ch in sr.choices:
        label = budget_label(ch.budget_ms)
        row: dict[str, Any] = {"label": label, **ch.to_dict()}
        m = models.get(label)
        if m is not None:
            c = compare_predictions(t_preds, predict(m, test_ds, progress=False),
                                    n_boot=cfg.n_boot, seed=seed)
            mc = c.macro
            row.update(
                parameters=count_parameters(m), macs=count_macs(m, example),
                param_ratio=count_parameters(m) / teacher["parameters"],
                latency_ms=float(np.median(lat[label])), latency_rounds_ms=lat[label],
                within_budget_final=bool(np.median(lat[label]) <= ch.budget_ms),
                speed_vs_teacher=speed_ratio(lat["teacher"], lat[label]).to_dict(),
                test_auroc=mc["auroc_new"], test_auroc_ci=[float(v) for v in mc["auroc_new_ci"]],
                delta_auroc=mc["delta_auroc"], delta_auroc_ci=list(mc["delta_auroc_ci"]),
                test_split={"split": c.split, "n": c.n, "n_boot": cfg.n_boot})
            if sal_images is not None:
                row["saliency"] = compare_saliency(
                    t_model, m, sal_images, classes, method=cfg.saliency_method,
                    progress=progress).to_dict()["overall"]
        subnets.append(row)
    return teacher, subnets


def _data_info(train_ds: CXRDataset, val_ds: CXRDataset, test_ds: CXRDataset) -> dict[str, Any]:
    return {"train": train_ds.spec, "train_hash": train_ds.content_hash(),
            "n_train": len(train_ds), "val_hash": val_ds.content_hash(), "n_val": len(val_ds),
            "test_hash": test_ds.content_hash(), "n_test": len(test_ds), "task": train_ds.task,
            "class_names": list(test_ds.class_names), "input": test_ds.preprocess.to_dict()}


__all__ = ["OFAConfig", "OFAResult", "RESULT", "SUPERNET_DIR", "budget_label", "distill_ofa"]
