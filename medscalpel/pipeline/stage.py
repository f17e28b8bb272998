"""Stages: the units a run is made of (issue S).

A stage is a registered class with a ``name``, the artifact keys it ``reads`` and ``writes``
(:data:`medscalpel.layout.ARTIFACTS`), a typed ``Settings`` dataclass and ``run(ctx, settings)``.
:func:`run_stage` checks the contract around the call: every declared input exists before it
runs, every declared output exists after it (unless the stage reports itself ``skipped``), so a
stage that writes an undeclared path, or forgets one, fails in the tests, not on a report page.
The demo is an ordered list of stage names with settings (:mod:`medscalpel.pipeline.demo`).

What stages share in one run lives in a :class:`StageContext`: the run directory, the seed, and
the live objects made so far (dataset spec, datasets, the current model, predictions,
features, thresholds). A stage that needs an object another stage made asks the context, which
loads it from that stage's declared artifact when it is not in memory.

Example:
    >>> import medscalpel.pipeline.stages  # registers the stages
    >>> sorted(STAGES.names())[:3]
    ['attribute', 'audit', 'baseline']
    >>> STAGES.get("stats").writes
    ('label_stats',)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from medscalpel.data.phantom import PhantomData
from medscalpel.data.spec import open_dataset
from medscalpel.data.transforms import Preprocess
from medscalpel.engine.predict import Features, collect_images
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, RunError
from medscalpel.layout import ARTIFACTS, artifact, read_artifact
from medscalpel.models import load_model
from medscalpel.registry import Registry
from medscalpel.runs import RunDir

logger = logging.getLogger(__name__)


@dataclass
class StageRecord:
    """What one stage did: its name, seconds, status (``ok`` or ``skipped``) and summary."""

    name: str
    seconds: float
    status: str
    summary: dict[str, Any] = field(default_factory=dict)


class _FromArtifact(dict):
    """``{split: object}`` that loads a missing split from its declared artifact."""

    def __init__(self, ctx: "StageContext", key: str, loader):
        super().__init__()
        self._ctx, self._key, self._loader = ctx, key, loader

    def __missing__(self, split: str):
        path = ARTIFACTS[self._key].path_in(self._ctx.out, split=split)
        if not path.is_file():
            raise RunError(f"No {self._key} of split '{split}' in {self._ctx.out} "
                           f"({ARTIFACTS[self._key].relpath(split=split)}): run the "
                           f"'{ARTIFACTS[self._key].stage}' stage first.")
        value = self._loader(path)
        self[split] = value
        return value


class StageContext:
    """What the stages of one run share: the run directory, seed, preprocessing and the live
    objects made so far. Objects another stage made are loaded from its artifacts on demand.

    Args:
        out: the run directory (under construction: a ``.partial`` folder).
        seed: the run's seed.
        size: input resolution of the models the run trains (its :class:`Preprocess`).
        progress: progress bars (``None``: only on a terminal).
    """

    def __init__(self, out: str | os.PathLike, seed: int = 0, size: int = 64,
                 progress: bool | None = None):

        self.out = Path(out)
        self.seed = seed
        self.progress = progress
        self.size = size
        self.pp = Preprocess(size=size, channels=1)
        self.spec = ""
        self._phantom = None
        self.datasets: dict[str, Any] = {}
        self._model = None
        self.preds: dict[str, Any] = _FromArtifact(self, "predictions", Predictions.load)
        self.features: dict[str, Any] = _FromArtifact(self, "features", Features.load)
        self._thresholds: list[float] | None = None
        self._compress_rows: list[dict[str, Any]] | None = None
        #: result objects of the stages run in this process, by stage name (what a command
        #: prints after :func:`run_command`; the artifacts on disk are the record)
        self.results: dict[str, Any] = {}
        #: where the run directory will be once it is finished (``out`` is its ``.partial``
        #: folder while a command runs): what a result that names its own files records
        self.final: Path | None = None

    # ------------------------------------------------------------------ shared objects
    @property
    def model(self):
        """The current model: set by a stage, else the calibrated or the baseline model of
        this run directory."""
        if self._model is None:
            for key in ("calibrated_card", "baseline_card"):
                if ARTIFACTS[key].exists(self.out):
                    self._model = load_model(ARTIFACTS[key].path_in(self.out).parent)
                    break
            else:
                raise RunError(f"No model in {self.out}: run the 'baseline' stage first.")
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model = value

    @property
    def thresholds(self) -> list[float] | None:
        """The current model's decision thresholds (set by 'calibrate', else its card's)."""
        if self._thresholds is None:
            try:
                card = self.model.card
            except RunError:  # no model yet
                return None
            self._thresholds = card.effective_thresholds() if card is not None else None
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value) -> None:
        self._thresholds = value

    @property
    def compress_rows(self) -> list[dict[str, Any]]:
        """The rows of this run's compression table ('compress' stage), [] before it ran."""
        if self._compress_rows is None:
            if not ARTIFACTS["compress"].exists(self.out):
                return []
            self._compress_rows = list(read_artifact(self.out, "compress").rows)
        return self._compress_rows

    @compress_rows.setter
    def compress_rows(self, value) -> None:
        self._compress_rows = list(value)

    @property
    def phantom(self):
        """The phantom of this run (its ground truth: masks, severities, label noise)."""
        if self._phantom is None:
            d = self.dir_of("phantom_data")
            if not ARTIFACTS["phantom_data"].exists(self.out):
                raise RunError(f"No phantom in {self.out}: run the 'phantom' stage first.")
            self._phantom = PhantomData.load(d)
            self.spec = self.spec or f"phantom:{d}"
        return self._phantom

    @phantom.setter
    def phantom(self, value) -> None:
        self._phantom = value

    def data_spec(self) -> str:
        """The run's dataset spec: the one a command gave (``--data``), else this run's
        phantom."""
        if not self.spec and ARTIFACTS["phantom_data"].exists(self.out):
            self.spec = f"phantom:{self.dir_of('phantom_data')}"
        if not self.spec:
            raise RunError("No dataset in this run: run the 'phantom' stage first, or give "
                           "the command --data.")
        return self.spec

    def has_data(self) -> bool:
        """Whether the run has a dataset (a command's ``--data`` or the run's phantom)."""
        return bool(self.spec) or ARTIFACTS["phantom_data"].exists(self.out)

    def ds(self, split: str):
        self.data_spec()
        if split not in self.datasets:
            self.datasets[split] = open_dataset(self.spec, split=split, preprocess=self.pp)
        return self.datasets[split]

    def images(self, split: str, n: int, seed: int = 0) -> torch.Tensor:
        return self.labelled_images(split, n, seed)[0]

    def labelled_images(self, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, Any]:

        ds = self.ds(split)
        x, idx = collect_images(ds, n, seed=seed)
        return x, np.asarray(ds.labels)[idx]

    def dir_of(self, key: str, **fmt: Any) -> Path:
        """The folder of a declared artifact in this run directory."""
        return artifact(key).dir_in(self.out, **fmt)

    def final_dir_of(self, key: str, **fmt: Any) -> Path:
        """The folder of a declared artifact once the run directory is finished."""
        return artifact(key).dir_in(self.final or self.out, **fmt)


class Stage:
    """One registered unit of work. Subclasses set ``name``, ``reads``, ``writes``,
    ``Settings`` (a dataclass) and implement :meth:`run`, returning a JSON-able summary;
    ``{"status": "skipped", "reason": ...}`` says it did not run (its outputs are then not
    required).

    ``reads`` / ``writes`` hold artifact keys, optionally with one placeholder value after a
    colon per file (``"predictions:split=test"``); ``may_write`` the artifacts it writes only
    in some runs (e.g. an export when a structured model exists): declared, not required;
    ``may_read`` the artifacts it uses when an earlier stage wrote them (e.g. the served
    artifact of ``deploy``, which skips without a structured model): declared, not required.
    """

    name: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    may_write: ClassVar[tuple[str, ...]] = ()
    may_read: ClassVar[tuple[str, ...]] = ()
    Settings: ClassVar[type] = type(None)
    help: ClassVar[str] = ""

    def run(self, ctx: StageContext, settings: Any) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError


STAGES: Registry[type[Stage]] = Registry("stage")


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: register a :class:`Stage` under its ``name`` (its declared artifacts
    must exist in the layout)."""
    for ref in (*cls.reads, *cls.may_read, *cls.writes, *cls.may_write):
        key, _ = _parse_ref(ref)
        if key not in ARTIFACTS:
            raise ConfigError(f"Stage '{cls.name}' declares the unknown artifact '{key}'; "
                              "declare it in medscalpel/layout.py.")
    first = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    STAGES.register(cls.name, help=cls.help or first)(cls)
    return cls


def _parse_ref(ref: str) -> tuple[str, dict[str, str]]:
    key, _, rest = ref.partition(":")
    fmt = dict(kv.split("=", 1) for kv in rest.split(",") if kv) if rest else {}
    return key, fmt


def missing_artifacts(run_dir: str | os.PathLike, refs: tuple[str, ...]) -> list[str]:
    """The declared artifacts of ``refs`` that ``run_dir`` does not hold (as relative paths)."""
    out = []
    for ref in refs:
        key, fmt = _parse_ref(ref)
        if not ARTIFACTS[key].exists(run_dir, **fmt):
            out.append(ARTIFACTS[key].relpath(**fmt))
    return out


def settings_from(cls: type, source: Any, **overrides: Any) -> Any:
    """A stage's ``Settings`` filled from the same-named fields of ``source`` (a profile
    dataclass or a dict), then ``overrides``."""
    if not is_dataclass(cls):
        raise ConfigError(f"Stage settings must be a dataclass; got {cls!r}.")
    src = asdict(source) if is_dataclass(source) else dict(source)
    kw = {f.name: src[f.name] for f in fields(cls) if f.name in src}
    kw.update(overrides)
    return cls(**kw)


def run_stage(name: str, ctx: StageContext, settings: Any) -> StageRecord:
    """Run one registered stage with its contract checked: declared inputs must exist first,
    declared outputs after (unless it skipped)."""
    cls = STAGES.get(name)
    if not isinstance(settings, cls.Settings):
        raise ConfigError(f"Stage '{name}' takes {cls.Settings.__name__} settings; got "
                          f"{type(settings).__name__}.")
    lacking = missing_artifacts(ctx.out, cls.reads)
    if lacking:
        raise RunError(f"Stage '{name}' needs {', '.join(lacking)} in {ctx.out}, which the "
                       "stages before it did not write.")
    t0 = time.perf_counter()
    summary = cls().run(ctx, settings) or {}
    status = "skipped" if summary.get("status") == "skipped" else "ok"
    if status == "ok":
        lacking = missing_artifacts(ctx.out, cls.writes)
        if lacking:
            raise RunError(f"Stage '{name}' declares {', '.join(lacking)} but did not write "
                           "it: a bug in the stage or in medscalpel/layout.py.")
    return StageRecord(name, round(time.perf_counter() - t0, 2), status, summary)


def run_command(name: str, out: str | os.PathLike, settings: Any, *, command: str,
                config: dict[str, Any], seed: int | None = 0, spec: str = "",
                overwrite: bool = False, resumable: bool = False,
                data: dict[str, Any] | None = None,
                manifest_data: tuple[str, ...] = (),
                manifest_config: tuple[str, ...] = ()) -> tuple[StageRecord, StageContext]:
    """A single CLI command: run the registered stage ``name`` into a new run directory
    ``out`` (a :class:`~medscalpel.runs.RunDir`: ``.partial`` until it finishes, a manifest,
    nothing left behind on failure), so that the command writes exactly what the stage writes
    in the demo, at the same relative paths.

    Args:
        seed: the manifest's seed; ``None`` for a command that draws nothing (the stage's
            context then has seed 0).
        spec: the dataset spec the command was given (``--data``); the stage reads it from
            the context (:meth:`StageContext.data_spec`).
        data: the manifest's ``data`` from the start (part of the run's identity, so that a
            resumable run is recognised when the same command runs again).
        manifest_data: keys of the stage's summary recorded as the manifest's ``data``.
        manifest_config: keys of the stage's summary added to the manifest's ``config`` (what
            the stage found out, e.g. the provenance of the artifact it loaded).

    Returns:
        the stage's record and its context (``ctx.results[name]``: the result object the
        stage made, for the command to print).
    """
    with RunDir(out, command=command, config=config, seed=seed, data=data,
                overwrite=overwrite, resumable=resumable) as run:
        ctx = StageContext(run.path, seed=seed if seed is not None else 0, progress=None)
        ctx.spec, ctx.final = spec, Path(out)
        rec = run_stage(name, ctx, settings)
        if manifest_data:
            run.data = {**(data or {}), **{k: rec.summary.get(k) for k in manifest_data}}
        run.config = {**run.config, **{k: rec.summary.get(k) for k in manifest_config}}
    return rec, ctx


def run_in_place(name: str, folder: str | os.PathLike, settings: Any, *,
                 seed: int = 0) -> tuple[StageRecord, StageContext]:
    """Run the registered stage ``name`` on an existing or self-managed folder instead of a new
    run directory: a grid that IS its run directory (the cell engine builds it in place, with
    its own manifest, lock and identity check, and resumes or extends it when run again), or a
    report rendered into the run directory it reads. The stage's contract is checked as in
    :func:`run_stage`."""
    ctx = StageContext(folder, seed=seed, progress=None)
    ctx.final = Path(folder)
    return run_stage(name, ctx, settings), ctx


__all__ = ["STAGES", "Stage", "StageContext", "StageRecord", "missing_artifacts",
           "register_stage", "run_command", "run_in_place", "run_stage", "settings_from"]
