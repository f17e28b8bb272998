"""Hardware-aware student choice (in place of seed 004's OFA-595 supernet, whose weights cannot
be had here).

Procedure (:func:`choose_student`):

1. build every candidate (zoo architecture names sized for the data, model directories such as a
   structurally pruned teacher, or :class:`MedClassifier` objects);
2. measure each candidate's CPU latency on *this* machine: batch 1, warm-up passes, median of
   repeated passes, measured in turns with the teacher in the same run (so machine load affects
   all alike); count parameters and MACs;
3. drop the candidates over the latency budget (they are listed, not trained);
4. proxy-train each remaining candidate by distillation from the teacher for a small budget
   (``proxy_epochs`` x ``proxy_steps`` steps, same seed and learning rate for all) and score it on
   held-out data (macro AUROC, ties broken by lower latency);
5. pick the most accurate candidate within the budget; the table records every measurement.

Example:
    >>> res = choose_student(["resnet_tiny", "mobilenetv3_small_100"], 5.0,
    ...                      (train_ds, val_ds), "runs/teacher/model")  # doctest: +SKIP
    >>> res.chosen, res.table()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from medscalpel.compress.distill import (DistillLoss, ModelLike, distill_train, latency_table,
                                         resolve_model, teacher_divergence)
from medscalpel.compress.measure import count_macs, count_parameters
from medscalpel.data.base import CXRDataset, split_by_patient
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import collect_images, predict
from medscalpel.engine.train import TrainConfig, seed_everything
from medscalpel.errors import ConfigError, DataError
from medscalpel.models.classifier import MedClassifier
from medscalpel.progress import track
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

SCHEMA = 1


@dataclass
class CandidateRow:
    """One candidate student: its cost on this machine and its proxy accuracy."""

    name: str
    arch: str
    parameters: int
    macs: int
    latency_ms: float
    speedup: float
    within_budget: bool
    proxy_auroc: float = float("nan")
    proxy_ap: float = float("nan")
    proxy_accuracy: float | None = None
    proxy_divergence: float = float("nan")
    proxy_seconds: float = 0.0
    status: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class StudentSearchResult:
    """The candidates' table and the chosen student.

    Attributes:
        rows: one :class:`CandidateRow` per candidate, in the given order.
        chosen: name of the chosen candidate.
        latency_budget_ms: the budget.
        teacher: arch, parameters and latency of the teacher (same run).
        procedure: the settings of the measurement and of the proxy training.
        model: the chosen candidate after proxy training (not serialised).
    """

    rows: list[CandidateRow]
    chosen: str
    latency_budget_ms: float
    teacher: dict[str, Any]
    procedure: dict[str, Any]
    model: MedClassifier | None = field(default=None, repr=False)
    chosen_source: Any = field(default=None, repr=False)

    def table(self) -> list[dict[str, Any]]:
        return [{"candidate": r.name, "params": r.parameters, "MACs": r.macs,
                 "latency_ms": r.latency_ms, "speedup": r.speedup, "in_budget": r.within_budget,
                 "proxy_AUROC": r.proxy_auroc, "status": r.status} for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "chosen": self.chosen,
                "latency_budget_ms": self.latency_budget_ms, "teacher": self.teacher,
                "procedure": self.procedure, "candidates": [r.to_dict() for r in self.rows]}


def _name(c: Any, i: int) -> str:
    if isinstance(c, MedClassifier):
        return f"{c.arch}#{i}"
    return str(c)


def _split(data, seed: int) -> tuple[CXRDataset, CXRDataset]:
    if isinstance(data, CXRDataset):
        rest, held = split_by_patient(data.patient_ids, 0.25, seed=seed)
        if len(held) == 0 or len(rest) == 0:
            raise DataError(f"choose_student: {len(data)} images are too few to hold out a "
                            "proxy validation set; pass (train_ds, val_ds) or more data.")
        return data.subset(rest, "proxy_train"), data.subset(held, "proxy_val")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(d, CXRDataset) for d in data):
        return data[0], data[1]
    raise DataError("choose_student: 'data' must be a CXRDataset (split 75/25 by patient "
                    "internally) or a (train_ds, val_ds) pair.")


def choose_student(
    candidates: Sequence[ModelLike],
    latency_budget_ms: float,
    data: CXRDataset | tuple[CXRDataset, CXRDataset],
    teacher: MedClassifier | str | os.PathLike,
    proxy_epochs: int = 1,
    proxy_steps: int | None = 20,
    soft_weight: float = 0.5,
    temperature: float = 4.0,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    latency_repeats: int = 10,
    latency_rounds: int = 3,
    progress: bool | None = None,
) -> StudentSearchResult:
    """Pick the most accurate student under a CPU latency budget (see the module docstring).

    Args:
        candidates: zoo architecture names, model directories or :class:`MedClassifier` objects.
        latency_budget_ms: largest acceptable batch-1 CPU latency (median, ms) on this machine.
        data: ``(train_ds, val_ds)`` for the proxy training and scoring, or one dataset that is
            split 75/25 by patient.
        teacher: the trained teacher (model, or model directory).
        proxy_epochs, proxy_steps: proxy budget per candidate (``proxy_steps`` caps the steps of
            an epoch; ``None``: full epochs).
        soft_weight, temperature: distillation loss of the proxy training (see DistillLoss).

    Returns:
        A :class:`StudentSearchResult` (``chosen`` is the winner's name, ``model`` its proxy-trained
        weights, ``table()`` every measurement).

    Raises:
        ConfigError: no candidate, a bad budget, or no candidate within the budget.
    """
    train_ds, val_ds = _validate_search(candidates, latency_budget_ms, proxy_epochs,
                                        proxy_steps, data, seed)
    t_model = resolve_model(teacher, train_ds, "teacher")
    if not isinstance(teacher, MedClassifier) and t_model.card is None:
        raise ConfigError(f"choose_student: the teacher must be a trained model (a MedClassifier "
                          f"or a model directory); {teacher!r} is an untrained architecture name.")
    names = [_name(c, i) for i, c in enumerate(candidates)]
    if len(set(names)) != len(names):
        raise ConfigError(f"choose_student: candidate names repeat ({names}); give each "
                          "candidate once.")
    models = {}
    for n, c in zip(names, candidates):  # a fresh architecture's first weights from the seed
        seed_everything(seed)
        models[n] = resolve_model(c, train_ds, "student")
    example = train_ds.image(0)[None]
    rows, t_lat = _measure_candidates(t_model, models, example, latency_budget_ms,
                                      latency_repeats, latency_rounds)
    cfg = TrainConfig(epochs=proxy_epochs, lr=lr, batch_size=batch_size, seed=seed,
                      max_steps_per_epoch=proxy_steps, patience=proxy_epochs,
                      warmup_epochs=0.0).validate()
    trained = _proxy_train(rows, models, t_model, train_ds, val_ds, cfg, soft_weight,
                           temperature, latency_budget_ms, seed, progress)
    best = max((r for r in rows if r.status == "trained"), key=_rank)
    best.status = "chosen"
    procedure = {"latency": {"batch_size": 1, "warmup": 3, "repeats": latency_repeats,
                             "rounds": latency_rounds, "statistic": "median",
                             "input_shape": list(example.shape),
                             "threads": int(torch.get_num_threads())},
                 "proxy": {"epochs": proxy_epochs, "steps_per_epoch": proxy_steps, "lr": lr,
                           "batch_size": batch_size, "seed": seed, "soft_weight": soft_weight,
                           "temperature": temperature, "n_train": len(train_ds),
                           "n_val": len(val_ds), "score": "validation macro AUROC"}}
    teacher_info = {"arch": t_model.arch, "parameters": count_parameters(t_model),
                    "latency_ms": t_lat,
                    "model_id": t_model.card.model_id if t_model.card is not None else ""}
    src = dict(zip(names, candidates))[best.name]
    return StudentSearchResult(rows=rows, chosen=best.name,
                               latency_budget_ms=float(latency_budget_ms), teacher=teacher_info,
                               procedure=procedure, model=trained[best.name], chosen_source=src)


def _validate_search(candidates: Sequence[ModelLike], latency_budget_ms: float,
                     proxy_epochs: int, proxy_steps: int | None,
                     data: CXRDataset | tuple[CXRDataset, CXRDataset], seed: int
                     ) -> tuple[CXRDataset, CXRDataset]:
    """Step 0: check the settings; returns the (proxy train, proxy validation) data."""
    o = "choose_student"
    if not candidates:
        raise ConfigError(f"The 'candidates' parameter of {o} must list at least one student.")
    check_range(latency_budget_ms, "latency_budget_ms", o, 0, low_inclusive=False)
    check_range(proxy_epochs, "proxy_epochs", o, 1, integer=True)
    if proxy_steps is not None:
        check_range(proxy_steps, "proxy_steps", o, 1, integer=True)
    return _split(data, seed)


def _measure_candidates(t_model: MedClassifier, models: dict[str, MedClassifier],
                        example: torch.Tensor, latency_budget_ms: float, latency_repeats: int,
                        latency_rounds: int) -> tuple[list[CandidateRow], float]:
    """Steps 2-3: size and latency of every candidate, in turns with the teacher in this run;
    returns the rows and the teacher's latency. Raises when none is within the budget."""
    lat = latency_table({"__teacher__": t_model, **models}, example, latency_repeats,
                        latency_rounds)
    t_lat = lat["__teacher__"]
    rows: list[CandidateRow] = []
    for n, m in models.items():
        rows.append(CandidateRow(
            name=n, arch=m.arch, parameters=count_parameters(m), macs=count_macs(m, example),
            latency_ms=lat[n], speedup=t_lat / lat[n] if lat[n] > 0 else float("nan"),
            within_budget=bool(lat[n] <= latency_budget_ms)))
    if not any(r.within_budget for r in rows):
        best = min(rows, key=lambda r: r.latency_ms)
        raise ConfigError(
            f"choose_student: no candidate is within the latency budget of "
            f"{latency_budget_ms:g} ms on this machine (fastest: {best.name} at "
            f"{best.latency_ms:.2f} ms). Raise the budget or add smaller candidates.")
    return rows, t_lat


def _proxy_train(rows: list[CandidateRow], models: dict[str, MedClassifier],
                 t_model: MedClassifier, train_ds: CXRDataset, val_ds: CXRDataset,
                 cfg: TrainConfig, soft_weight: float, temperature: float,
                 latency_budget_ms: float, seed: int, progress: bool | None
                 ) -> dict[str, MedClassifier]:
    """Step 4: distil each candidate within the budget for the proxy budget and score it on
    the validation data (its row is filled in); returns the proxy-trained models."""
    val_images, _ = collect_images(val_ds, min(len(val_ds), 128), seed=seed)
    trained: dict[str, MedClassifier] = {}
    for r in track(rows, "proxy training", progress=progress):
        if not r.within_budget:
            r.status = f"skipped: {r.latency_ms:.2f} ms > budget {latency_budget_ms:g} ms"
            continue
        m = models[r.name]
        loss = DistillLoss(soft_weight, temperature, train_ds.task)
        res = distill_train(t_model, m, train_ds, val_ds, loss, cfg, progress=False)
        ev = evaluate(predict(res.model, val_ds, progress=False), n_boot=0)
        r.proxy_auroc = float(ev.macro["auroc"])
        r.proxy_ap = float(ev.macro["ap"])
        r.proxy_accuracy = ev.macro.get("accuracy")
        r.proxy_divergence = teacher_divergence(res.model, t_model, val_images, train_ds.task)
        r.proxy_seconds = res.seconds
        r.status = "trained"
        trained[r.name] = res.model
    return trained


def _rank(r: CandidateRow) -> tuple[float, float]:
    """Step 5: higher proxy AUROC first (NaN last), ties broken by lower latency."""
    a = r.proxy_auroc if math.isfinite(r.proxy_auroc) else -math.inf
    return (a, -r.latency_ms)


__all__ = ["CandidateRow", "StudentSearchResult", "choose_student"]
