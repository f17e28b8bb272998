"""Specialisation of a trained supernet: one subnet per latency budget, latency MEASURED on the
deployment runtime, accuracy measured directly on the patient-wise validation split.

Procedure (:func:`search_subnets`):

1. the runtime: the one ``compress deploy`` recommended (read from a deploy run's
   ``deploy.json`` or ``serve.json``, :func:`latency_spec_from_deploy`), else ONNX Runtime fp32
   with one thread;
2. measure the smallest, the largest and ``n_random`` random subnets on that runtime (batch 1,
   warm-up, median of ``repeats`` calls per round, median over ``rounds``; the ONNX files of the
   search are written by the TorchScript exporter, which takes ~0.1 s where the dynamo one takes
   several seconds per model);
3. per budget: score every measured subnet within it (validation macro AUROC after BatchNorm
   re-calibration on training images), then ``generations`` rounds of evolution: the best
   ``population`` subnets within the budget each give a mutated child (each kernel, expand
   ratio and depth re-drawn with probability ``mutate_prob``), measured, scored when within;
4. confirm: the best-scoring subnet is measured again (``confirm_rounds`` rounds, the default
   exporter, as ``compress deploy`` would export it); it is chosen when that median is within
   the budget, else the next one is tried (up to ``max_confirm``). When nothing is confirmed
   the budget is reported as not met, with the fastest latency seen: no subnet is made up.

:func:`medscalpel.compress.ofa.flow.distill_ofa` is the whole flow (train the supernet, search,
extract, evaluate on the test split against the teacher).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from medscalpel.compress.ofa.supernet import (OFASupernet, SubnetConfig, extract_subnet,
                                              recalibrate_bn)
from medscalpel.data.base import CXRDataset
from medscalpel.deploy.export import preferred_exporter
from medscalpel.deploy.result import DEPLOY_JSON, DeployResult
from medscalpel.deploy.runtimes import RUNTIMES
from medscalpel.deploy.timing import median_ms
from medscalpel.engine.metrics import evaluate
from medscalpel.engine.predict import predict
from medscalpel.errors import ConfigError, DataError
from medscalpel.layout import artifact
from medscalpel.progress import track
from medscalpel.runs import read_json
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

SCHEMA = 1
SEARCH_EXPORTER_REASON = ("subnet search time budget: the TorchScript exporter takes ~0.1 s per "
                          "subnet where the dynamo one takes 4-10 s; the chosen subnets are "
                          "re-measured with the default exporter")


# ----------------------------------------------------------------------------- latency
@dataclass(frozen=True)
class LatencySpec:
    """Where and how subnet latency is measured (batch 1)."""

    runtime: str = "onnxruntime:fp32"
    threads: int = 1
    rounds: int = 3
    repeats: int = 10
    warmup: int = 3
    source: str = "default: onnxruntime fp32 (no deploy run given)"

    def __post_init__(self):
        o = "LatencySpec"
        if self.runtime not in RUNTIMES.names():
            raise ConfigError(f"The 'runtime' parameter of {o} must be one of "
                              f"{', '.join(RUNTIMES.names())}. Got {self.runtime!r} instead.")
        for name in ("threads", "rounds", "repeats"):
            check_range(getattr(self, name), name, o, 1, integer=True)
        check_range(self.warmup, "warmup", o, 0, integer=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_spec_from_deploy(path: str | os.PathLike, **kw: Any) -> LatencySpec:
    """The runtime ``compress deploy`` chose: from its run directory (``deploy/deploy.json``),
    a deploy folder (``deploy.json``, or ``serve/serve.json``) or either file."""
    p = Path(path)
    files = [p] if p.is_file() else [p / DEPLOY_JSON, artifact("deploy").path_in(p),
                                     p / "serve" / "serve.json", p / "serve.json"]
    for f in files:
        if not f.is_file():
            continue
        if f.name == DEPLOY_JSON:
            res = DeployResult.load(f)
            if res.recommended is None:
                raise DataError(f"{f} recommends no runtime (no variant met the accuracy floor); "
                                "give --runtime instead.")
            return LatencySpec(runtime=res.recommended, threads=int(res.threads),
                               source=f"recommended in {f}", **kw)
        d = read_json(f)
        if "runtime" not in d or "precision" not in d:
            raise DataError(f"{f} names no runtime/precision: not a serve.json of compress deploy.")
        return LatencySpec(runtime=f"{d['runtime']}:{d['precision']}",
                           threads=int(d.get("threads", 1)), source=f"served in {f}", **kw)
    raise DataError(f"No {DEPLOY_JSON} or serve.json in {path}: give the folder of a "
                    "'compress deploy' run (or one of those files).")


class _Prepared(contextlib.AbstractContextManager):
    """A model built in the runtime (in a temporary folder removed on exit)."""

    def __init__(self, model: nn.Module, spec: LatencySpec, example: torch.Tensor,
                 calib: torch.Tensor | None):
        self._tmp = tempfile.TemporaryDirectory(prefix="medscalpel-ofa-")
        self.rt = RUNTIMES.create(spec.runtime, threads=spec.threads)
        reason = self.rt.available()
        if reason is not None:
            self._tmp.cleanup()
            raise ConfigError(f"The runtime '{spec.runtime}' cannot run here: {reason}.")
        self.rt.prepare(model.eval(), example[:1].float(), calib, self._tmp.name)
        self.x = np.ascontiguousarray(example[:1].float().numpy())

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def alternated_latency(models: dict[str, nn.Module], spec: LatencySpec,
                       example: torch.Tensor, calib: torch.Tensor | None = None,
                       rounds: int | None = None) -> dict[str, list[float]]:
    """Per-round batch-1 latency (ms; each the median of ``spec.repeats`` calls after
    ``spec.warmup``) of every model in ``spec.runtime``, the models measured in turns within each
    round (so that the machine's load hits them alike: per-round ratios,
    :func:`~medscalpel.deploy.timing.speed_ratio`, compare like with like)."""
    with contextlib.ExitStack() as stack, _threads(spec.threads):
        prepared = {k: stack.enter_context(_Prepared(m, spec, example, calib))
                    for k, m in models.items()}
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(rounds or spec.rounds):
            for k, p in prepared.items():
                times[k].append(median_ms(lambda p=p: p.rt.run(p.x), spec.warmup, spec.repeats))
    return times


# ----------------------------------------------------------------------------- search
@dataclass
class SearchConfig:
    """Settings of :func:`search_subnets` (see the module docstring)."""

    n_random: int = 40
    generations: int = 2
    population: int = 8
    mutate_prob: float = 0.3
    confirm_rounds: int = 5
    max_confirm: int = 3
    bn_images: int = 256
    seed: int = 0

    def validate(self) -> "SearchConfig":
        o = "SearchConfig"
        check_range(self.n_random, "n_random", o, 0, integer=True)
        check_range(self.generations, "generations", o, 0, integer=True)
        check_range(self.population, "population", o, 1, integer=True)
        check_range(self.mutate_prob, "mutate_prob", o, 0.0, 1.0)
        check_range(self.confirm_rounds, "confirm_rounds", o, 1, integer=True)
        check_range(self.max_confirm, "max_confirm", o, 1, integer=True)
        check_range(self.bn_images, "bn_images", o, 1, integer=True)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Candidate:
    """One measured subnet of the search."""

    key: str
    config: SubnetConfig
    latency_ms: float
    latency_rounds_ms: list[float]
    origin: str
    val_auroc: float | None = None
    parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "config": self.config.to_dict(), "latency_ms": self.latency_ms,
                "latency_rounds_ms": self.latency_rounds_ms, "origin": self.origin,
                "val_auroc": self.val_auroc, "parameters": self.parameters}


@dataclass
class BudgetChoice:
    """The outcome of one budget: the chosen subnet (``met``) or why there is none."""

    budget_ms: float
    met: bool
    reason: str
    candidate: Candidate | None = None
    confirm_rounds_ms: list[float] = field(default_factory=list)
    confirm_latency_ms: float | None = None
    n_within: int = 0
    #: better-scoring subnets rejected because their re-timed median exceeded the budget
    rejected: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"budget_ms": self.budget_ms, "met": self.met, "reason": self.reason,
                "candidate": None if self.candidate is None else self.candidate.to_dict(),
                "confirm_rounds_ms": self.confirm_rounds_ms,
                "confirm_latency_ms": self.confirm_latency_ms, "n_within": self.n_within,
                "rejected": self.rejected}


class _Searcher:
    """The state of one search: measured candidates, cached scores."""

    def __init__(self, supernet: OFASupernet, spec: LatencySpec, cfg: SearchConfig,
                 bn_images: torch.Tensor, val_ds: CXRDataset, progress: bool | None):
        self.net, self.spec, self.cfg = supernet, spec, cfg
        self.space = supernet.space
        self.bn_images, self.val_ds = bn_images, val_ds
        self.example = bn_images[:1]
        self.calib = bn_images[:32]
        self.rng = np.random.default_rng(cfg.seed)
        self.cands: dict[str, Candidate] = {}
        self.progress = progress

    def measure(self, cfgs: Sequence[SubnetConfig], origin: str) -> list[Candidate]:
        out = []
        for c in track(list(cfgs), f"latency ({origin})", progress=self.progress):
            key = c.key(self.space)
            if key not in self.cands:
                sub = extract_subnet(self.net, c).eval()
                with preferred_exporter("torchscript", SEARCH_EXPORTER_REASON):
                    rounds = alternated_latency({"s": sub}, self.spec, self.example,
                                                self.calib)["s"]
                self.cands[key] = Candidate(key, c, float(statistics.median(rounds)), rounds,
                                            origin, parameters=sub.num_parameters())
            out.append(self.cands[key])
        return out

    def score(self, cand: Candidate) -> float:
        if cand.val_auroc is None:
            sub = recalibrate_bn(extract_subnet(self.net, cand.config), self.bn_images)
            ev = evaluate(predict(sub, self.val_ds, progress=False), n_boot=0)
            auroc = float(ev.macro["auroc"])
            cand.val_auroc = auroc if math.isfinite(auroc) else -math.inf
        return cand.val_auroc

    def within(self, budget: float) -> list[Candidate]:
        ranked = [c for c in self.cands.values() if c.latency_ms <= budget]
        for c in ranked:
            self.score(c)
        return sorted(ranked, key=lambda c: (-c.val_auroc, c.latency_ms))

    def mutate(self, cfg: SubnetConfig) -> SubnetConfig:
        p, sp, r = self.cfg.mutate_prob, self.space, self.rng
        ks = tuple(int(r.choice(sp.kernel_choices)) if r.random() < p else k for k in cfg.kernels)
        es = tuple(float(r.choice(sp.expand_choices)) if r.random() < p else e
                   for e in cfg.expands)
        ds = tuple(int(r.choice(sp.depth_choices)) if r.random() < p else d for d in cfg.depths)
        return SubnetConfig(ds, ks, es)

    def evolve(self, budget: float) -> None:
        for g in range(self.cfg.generations):
            parents = self.within(budget)[:self.cfg.population]
            if not parents:
                return
            self.measure([self.mutate(c.config) for c in parents], f"evolution {budget:g} ms g{g}")

    def confirm(self, budget: float) -> BudgetChoice:
        ranked = self.within(budget)
        if not ranked:
            fastest = min(self.cands.values(), key=lambda c: c.latency_ms)
            return BudgetChoice(budget, False, f"no subnet measured within {budget:g} ms on "
                                f"{self.spec.runtime} (fastest: {fastest.latency_ms:.3f} ms, "
                                f"{fastest.key})", n_within=0)
        rejected: list[dict[str, Any]] = []
        for cand in ranked[:self.cfg.max_confirm]:
            sub = recalibrate_bn(extract_subnet(self.net, cand.config), self.bn_images)
            rounds = alternated_latency({"s": sub}, self.spec, self.example, self.calib,
                                        rounds=self.cfg.confirm_rounds)["s"]
            med = float(statistics.median(rounds))
            if med <= budget:
                return BudgetChoice(budget, True, f"confirmed: median {med:.3f} ms <= "
                                    f"{budget:g} ms over {len(rounds)} rounds", cand, rounds, med,
                                    len(ranked), rejected, sub)
            rejected.append({"key": cand.key, "search_latency_ms": cand.latency_ms,
                             "confirm_rounds_ms": rounds, "confirm_latency_ms": med})
            logger.info("budget %g ms: %s re-measured at %.3f ms, trying the next", budget,
                        cand.key, med)
        return BudgetChoice(budget, False, f"{len(ranked)} subnet(s) measured within "
                            f"{budget:g} ms in the search, but none of the best "
                            f"{self.cfg.max_confirm} stayed within it when re-measured",
                            n_within=len(ranked), rejected=rejected)


@dataclass
class SearchResult:
    """Every measured candidate and one :class:`BudgetChoice` per budget."""

    choices: list[BudgetChoice]
    candidates: list[Candidate]
    latency: LatencySpec
    config: SearchConfig

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "latency": self.latency.to_dict(),
                "exporter": {"search": "torchscript", "reason": SEARCH_EXPORTER_REASON,
                             "confirm": "auto (as compress deploy)"},
                "config": self.config.to_dict(),
                "choices": [c.to_dict() for c in self.choices],
                "candidates": [c.to_dict() for c in self.candidates]}


def search_subnets(supernet: OFASupernet, budgets_ms: Sequence[float], val_ds: CXRDataset,
                   bn_images: torch.Tensor, latency: LatencySpec | None = None,
                   config: SearchConfig | None = None,
                   progress: bool | None = None) -> SearchResult:
    """The most accurate measured subnet within each latency budget (module docstring).

    Args:
        supernet: a trained supernet (left unchanged).
        budgets_ms: batch-1 latency budgets (ms) on ``latency.runtime``.
        val_ds: the (patient-wise) validation split that scores subnets.
        bn_images: training images for BatchNorm re-calibration (the first is the latency
            input, the first 32 calibrate int8 runtimes).

    Returns:
        A :class:`SearchResult`; ``choices[i].model`` is the confirmed subnet of budget ``i``
        (BatchNorm re-calibrated) or ``None`` with the reason in ``choices[i].reason``.
    """
    budgets = [float(b) for b in budgets_ms]
    if not budgets or any(not math.isfinite(b) or b <= 0 for b in budgets):
        raise ConfigError(f"The 'budgets_ms' parameter of search_subnets must be positive "
                          f"latencies in ms. Got {list(budgets_ms)!r} instead.")
    cfg = (config or SearchConfig()).validate()
    spec = latency or LatencySpec()
    s = _Searcher(supernet, spec, cfg, bn_images, val_ds, progress)
    sp = supernet.space
    s.measure([sp.min_config(), sp.max_config()], "extremes")
    s.measure([sp.sample(s.rng) for _ in range(cfg.n_random)], "random")
    choices = []
    for b in budgets:
        s.evolve(b)
        choices.append(s.confirm(b))
        logger.info("budget %g ms: %s", b, choices[-1].reason)
    return SearchResult(choices, list(s.cands.values()), spec, cfg)


__all__ = ["BudgetChoice", "Candidate", "LatencySpec", "SEARCH_EXPORTER_REASON",
           "SearchConfig", "SearchResult", "alternated_latency", "latency_spec_from_deploy",
           "search_subnets"]
