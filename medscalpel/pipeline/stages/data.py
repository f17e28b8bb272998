"""Data stages: generate the phantom (into a run, or as a dataset folder of its own), label
statistics of its training split."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.data.phantom import PhantomData, ShortcutConfig, generate_phantom
from medscalpel.data.phantom.preview import contact_sheet
from medscalpel.data.stats import dataset_statistics
from medscalpel.layout import ARTIFACTS
from medscalpel.pipeline.stage import Stage, StageContext, register_stage

SPLITS = ("train", "val", "test", "shifted")


@dataclass(frozen=True)
class PhantomSettings:
    n_images: int = 3000
    size: int = 64
    label_noise: float = 0.07  # fraction of flipped (NLP-like) labels
    tube_pos: float = ShortcutConfig.tube_pos  # P(chest tube | pneumothorax) outside 'shifted'
    tube_neg: float = ShortcutConfig.tube_neg  # P(chest tube | none) outside 'shifted'


def generate(ctx: StageContext, s: PhantomSettings, folder: Path) -> PhantomData:
    """The phantom of ``s`` (seeded by the run's seed), written into ``folder``."""
    shortcut = replace(ShortcutConfig(), tube_pos=s.tube_pos, tube_neg=s.tube_neg)
    return generate_phantom(n=s.n_images, size=s.size, seed=ctx.seed, out=folder,
                            label_noise=s.label_noise, shortcut=shortcut, progress=ctx.progress)


def split_counts(data: PhantomData) -> dict[str, int]:
    return {sp: len(data.rows(sp)) for sp in SPLITS}


@register_stage
class PhantomStage(Stage):
    """Generate the phantom dataset (and its contact sheet) into the run."""

    name = "phantom"
    writes = ("phantom_data", "phantom_preview")
    Settings = PhantomSettings

    def run(self, ctx: StageContext, s: PhantomSettings) -> dict[str, Any]:
        d = ctx.dir_of("phantom_data")
        ctx.phantom = generate(ctx, s, d)
        ctx.spec = f"phantom:{d}"
        contact_sheet(ctx.phantom, ARTIFACTS["phantom_preview"].path_in(ctx.out))
        return {"spec": "phantom:data/phantom", "n": len(ctx.phantom),
                "splits": split_counts(ctx.phantom)}


@dataclass(frozen=True)
class PhantomDatasetSettings(PhantomSettings):
    n_images: int = 2000
    preview: bool = False  # also the contact sheet (examples per finding, masks outlined)


@register_stage
class PhantomDatasetStage(Stage):
    """Generate the phantom as a dataset folder of its own (``data phantom --out DIR``, read
    back as the spec ``phantom:DIR``), with its contact sheet on request.

    A stage apart from ``phantom``: the demo keeps its phantom inside the run
    (``data/phantom/``), while ``data phantom`` writes a folder that ``phantom:DIR`` opens, the
    spec the documentation and every earlier run directory use."""

    name = "phantom_dataset"
    writes = ("phantom_dataset",)
    may_write = ("phantom_sheet",)
    Settings = PhantomDatasetSettings

    def run(self, ctx: StageContext, s: PhantomDatasetSettings) -> dict[str, Any]:
        data = generate(ctx, s, ctx.dir_of("phantom_dataset"))
        if s.preview:
            contact_sheet(data, ARTIFACTS["phantom_sheet"].path_in(ctx.out))
        ctx.results[self.name] = data
        return {"spec": f"phantom:{ctx.final_dir_of('phantom_dataset')}", "n": len(data),
                "splits": split_counts(data), "preview": s.preview}


@dataclass(frozen=True)
class StatsSettings:
    split: str = "train"


@register_stage
class StatsStage(Stage):
    """Label statistics of the training split (prevalence, co-occurrence, Jaccard)."""

    name = "stats"
    may_read = ("phantom_data",)  # the demo's phantom; a command's --data instead
    writes = ("label_stats",)
    Settings = StatsSettings

    def run(self, ctx: StageContext, s: StatsSettings) -> dict[str, Any]:
        st = dataset_statistics(ctx.data_spec(), s.split, ctx.dir_of("label_stats"))
        return {"n_images": st.n,
                "prevalence": dict(zip(st.class_names, np.round(st.prevalence, 4))),
                "spec": st.spec, "split": s.split, "content_hash": st.content_hash}
