"""``medscalpel data phantom``: generate the phantom dataset (and a contact sheet)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli import deprecations
from medscalpel.cli.common import console, print_table


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

    n = deprecations.renamed(n, n_old, "--n", "data phantom")

    from medscalpel.data.phantom import ShortcutConfig, generate_phantom
    from medscalpel.runs import RunDir

    shortcut = replace(ShortcutConfig(), tube_pos=tube_pos, tube_neg=tube_neg)
    config = {"n": n, "size": size, "seed": seed, "label_noise": label_noise,
              "shortcut": shortcut.to_dict()}
    with RunDir(out, command="data phantom", config=config, seed=seed,
                overwrite=overwrite) as run:
        data = generate_phantom(n=n, size=size, seed=seed, out=run.path, label_noise=label_noise,
                                shortcut=shortcut)
        if preview:
            from medscalpel.data.phantom.preview import contact_sheet

            contact_sheet(data, run.path / "preview.png")
    s = data.summary()
    rows = [{"split": k, "images": v,
             "P(tube | pneumothorax)": s.tube_rate.get(k, {}).get("pneumothorax"),
             "P(tube | none)": s.tube_rate.get(k, {}).get("no_pneumothorax")}
            for k, v in s.split_counts.items()]
    print_table(rows, f"phantom: {n} images of {size}x{size} in {s.seconds:.1f} s "
                      f"({s.images_per_s:,.0f} images/s), label noise {s.label_noise_rate:.3f}")
    console.print(f"written to {out}  (spec: phantom:{out})")
