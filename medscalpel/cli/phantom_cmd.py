"""``medscalpel data phantom``: generate the phantom dataset (and a contact sheet)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli import deprecations
from medscalpel.cli.common import console, print_table, run_stage


def phantom(
    out: Path = typer.Option(..., help="Directory to write (images.npz, masks.npz, labels.csv, "
                                       "groundtruth.csv, phantom.json)."),
    n: int = typer.Option(2000, "--n-images", help="Number of images (all splits)."),
    n_old: Optional[int] = typer.Option(None, "--n", hidden=True),
    size: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Seed: the same arguments give byte-identical data."),
    label_noise: float = typer.Option(0.07, help="Fraction of flipped (NLP-like) labels."),
    tube_pos: float = typer.Option(0.8, help="P(chest tube | pneumothorax) outside 'shifted'."),
    tube_neg: float = typer.Option(0.05, help="P(chest tube | no pneumothorax) outside 'shifted'."),
    preview: bool = typer.Option(False, help="Also write preview.png: examples per finding with "
                                             "their masks outlined."),
    overwrite: bool = typer.Option(False, help="Replace an existing directory."),
) -> None:
    """Generate Phantom CXR-14: chest X-rays with the 14 NIH findings, NIH label statistics,
    label noise, shortcuts and per-image ground truth."""
    from dataclasses import replace

    from medscalpel.data.phantom import ShortcutConfig
    from medscalpel.pipeline.stages.data import PhantomDatasetSettings

    n = deprecations.renamed(n, n_old, "--n", "data phantom")
    settings = PhantomDatasetSettings(n_images=n, size=size, label_noise=label_noise,
                                      tube_pos=tube_pos, tube_neg=tube_neg, preview=preview)
    shortcut = replace(ShortcutConfig(), tube_pos=tube_pos, tube_neg=tube_neg)
    config = {"n": n, "size": size, "seed": seed, "label_noise": label_noise,
              "shortcut": shortcut.to_dict()}
    data = run_stage("phantom_dataset", out, settings, "data phantom", config, seed=seed,
                     overwrite=overwrite)
    _print_phantom(data, n, size)
    console.print(f"written to {out}  (spec: phantom:{out})")


def _print_phantom(data, n: int, size: int) -> None:
    """Images per split with the chest-tube rates, the seconds and the label noise."""
    s = data.summary()
    rows = [{"split": k, "images": v,
             "P(tube | pneumothorax)": s.tube_rate.get(k, {}).get("pneumothorax"),
             "P(tube | none)": s.tube_rate.get(k, {}).get("no_pneumothorax")}
            for k, v in s.split_counts.items()]
    print_table(rows, f"phantom: {n} images of {size}x{size} in {s.seconds:.1f} s "
                      f"({s.images_per_s:,.0f} images/s), label noise {s.label_noise_rate:.3f}")
