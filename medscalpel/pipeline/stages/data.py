"""Data stages: generate the phantom, label statistics of its training split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medscalpel.data.phantom import generate_phantom
from medscalpel.data.phantom.preview import contact_sheet
from medscalpel.data.stats import dataset_statistics
from medscalpel.pipeline.stage import Stage, StageContext, register_stage


@dataclass(frozen=True)
class PhantomSettings:
    n_images: int = 3000
    size: int = 64


@register_stage
class PhantomStage(Stage):
    """Generate the phantom dataset (and its contact sheet) into the run."""

    name = "phantom"
    writes = ("phantom_data", "phantom_preview")
    Settings = PhantomSettings

    def run(self, ctx: StageContext, s: PhantomSettings) -> dict[str, Any]:
        d = ctx.dir_of("phantom_data")
        ctx.phantom = generate_phantom(n=s.n_images, size=s.size, seed=ctx.seed, out=d,
                                       progress=ctx.progress)
        ctx.spec = f"phantom:{d}"
        contact_sheet(ctx.phantom, ctx.dir_of("phantom_preview") / "phantom_preview.png")
        return {"spec": "phantom:data/phantom", "n": len(ctx.phantom),
                "splits": {sp: int(len(ctx.phantom.rows(sp)))
                           for sp in ("train", "val", "test", "shifted")}}


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
