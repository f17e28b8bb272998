"""The main job: ``medscalpel demo``.

On the embedded phantom dataset: generate the phantom, train the baseline, evaluate, calibrate,
compress (lossless + structured + sweep), audit, explain, repair the chest-tube shortcut by
surgery and triage, distil a student, and write the experiment report and a few clinical
reports. The demo is an ordered list of registered stages (:data:`DEMO_STAGES`,
:mod:`medscalpel.pipeline.stages`), each given the settings its profile holds; every stage
writes its declared artifacts into the run directory (the layout the experiment report reads)
and is timed in ``demo.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

import medscalpel.pipeline.stages  # noqa: F401  (registers the stages)
from medscalpel.errors import ConfigError, RunError
from medscalpel.pipeline.stage import (STAGES, StageContext, StageRecord, run_stage,
                                       settings_from)
from medscalpel.layout import ARTIFACTS, write_artifact
from medscalpel.runs import dumps_json, read_json


@dataclass(frozen=True)
class DemoProfile:
    """Sizes of one demo profile."""

    name: str
    n_images: int
    size: int
    arch: str
    epochs: int
    batch_size: int = 64
    lr: float = 2e-3
    sweep_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.65, 0.8, 0.9, 0.95)
    sweep_seeds: tuple[int, ...] = (0,)
    prune_criteria: tuple[str, ...] = ("l1", "bn_scale", "lrp")
    prune_speedup: float = 2.0
    recovery_epochs: int = 1
    calib_images: int = 128
    heldout_images: int = 128
    sparsify_ratio: float = 0.5
    sparsify_epochs: int = 2
    student: str = "resnet_tiny"
    distill_epochs: int = 2
    #: where teacher and students look (distill stage): Score-CAM (seed 004) costs one forward
    #: pass per feature channel per image and class; Grad-CAM one backward pass
    distill_saliency: str = "scorecam"
    n_cam: int = 4
    n_clinical: int = 3
    n_boot: int = 200
    max_steps_per_epoch: int | None = None
    shift_k: int = 20  # labelled site-B images per class for the k-shot recalibration
    changes_images: int = 200  # test images of the what-compression-changed audit
    changes_faithfulness: int = 32  # images of its deletion / insertion / ROAD measures

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROFILES: dict[str, DemoProfile] = {
    # for CI: everything runs, on tiny data, in about a minute
    "micro": DemoProfile("micro", n_images=400, size=32, arch="densenet_tiny", epochs=2,
                         batch_size=32, sweep_ratios=(0.0, 0.5, 0.9), prune_criteria=("l1", "lrp"),
                         prune_speedup=1.5, recovery_epochs=0, sparsify_epochs=1, calib_images=32,
                         heldout_images=32, distill_epochs=1, n_cam=2, n_clinical=2, n_boot=50,
                         shift_k=5, changes_images=60, changes_faithfulness=8,
                         distill_saliency="gradcam"),
    # make demo: budgeted for <= 5 minutes on this project's 2-core CPU (AVX2) with the
    # shift, deploy and changes stages: fewer images and epochs, one sparsify and one distill
    # epoch, two pruning criteria (magnitude and attribution-guided)
    "quick": DemoProfile("quick", n_images=3000, size=64, arch="densenet_small", epochs=6,
                         batch_size=64, n_boot=200, sparsify_epochs=1, distill_epochs=1,
                         prune_criteria=("l1", "lrp"), distill_saliency="gradcam"),
    # closer to the issues' numbers: 20,000 images, densenet121, a full ratio grid
    "full": DemoProfile("full", n_images=20000, size=64, arch="densenet121", epochs=6,
                        sweep_ratios=tuple(np.round(np.arange(0, 0.96, 0.05), 2)),
                        sweep_seeds=(0, 1, 2), recovery_epochs=2, calib_images=256,
                        heldout_images=512, student="mobilenetv3_small_100", distill_epochs=4,
                        n_cam=8, n_clinical=5, n_boot=1000),
}


@dataclass
class DemoResult:
    out_dir: Path
    profile: DemoProfile
    stages: list[StageRecord]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.name, "settings": self.profile.to_dict(),
                "seconds": round(self.seconds, 1),
                "stages": [asdict(s) for s in self.stages]}


#: the stages of the main job, in order
DEMO_STAGES: tuple[str, ...] = ("phantom", "stats", "baseline", "calibrate", "shift", "compress",
                                "deploy", "sweep", "audit", "changes", "explain", "repair",
                                "distill", "reports")


def run_demo(out: str | os.PathLike, profile: str | DemoProfile = "quick", seed: int = 0,
             progress: bool | None = None, log: Callable[[str], None] | None = None,
             **overrides: Any) -> DemoResult:
    """Run every stage of medscalpel on the phantom into ``out`` (which must not exist or be
    empty: the CLI wraps this in a :class:`~medscalpel.runs.RunDir`).

    Args:
        profile: ``micro`` (CI), ``quick`` (``make demo``, <= 10 min on 2 CPU cores) or ``full``.
        overrides: profile fields to change (e.g. ``epochs=1``).
        log: called with one line per finished stage (the CLI prints it).
    """
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ConfigError(f"Unknown demo profile '{profile}'. Valid names: "
                              f"{', '.join(PROFILES)}.")
        profile = PROFILES[profile]
    if overrides:
        profile = replace(profile, **overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(out, seed=seed, size=profile.size, progress=progress)
    records = _finished_stages(out, profile)
    t_all = time.perf_counter() - sum(r.seconds for r in records)
    for i, name in enumerate(DEMO_STAGES, 1):
        if i <= len(records):
            if log is not None:
                log(f"[{i}/{len(DEMO_STAGES)}] {name:<10} done before (resumed run)")
            continue
        rec = run_stage(name, ctx, settings_from(STAGES.get(name).Settings, profile))
        records.append(rec)
        write_artifact(out, "demo", DemoResult(out, profile, records,
                                               time.perf_counter() - t_all).to_dict())
        if log is not None:
            log(f"[{i}/{len(DEMO_STAGES)}] {name:<10} {rec.seconds:7.1f} s")
    return DemoResult(out, profile, records, time.perf_counter() - t_all)


def _finished_stages(out: Path, profile: DemoProfile) -> list[StageRecord]:
    """The stages an interrupted run of the same profile finished (``demo.json`` is rewritten
    after each stage, so a stage listed there completed): a resumed demo starts after them.
    A ``demo.json`` of other settings is refused rather than mixed."""
    path = ARTIFACTS["demo"].path_in(out)
    if not path.is_file():
        return []
    doc = read_json(path)
    if json.loads(dumps_json(doc.get("settings"))) != json.loads(dumps_json(profile.to_dict())):
        raise RunError(f"{out} holds a demo run with other settings ({path.name}); use a new "
                       "--out or the same profile.")
    done: list[StageRecord] = []
    for name, rec in zip(DEMO_STAGES, doc.get("stages", [])):
        if rec.get("name") != name or rec.get("status") not in ("ok", "skipped"):
            break
        done.append(StageRecord(name, float(rec.get("seconds", 0.0)), rec["status"],
                                {**(rec.get("summary") or {}), "resumed": True}))
    return done
