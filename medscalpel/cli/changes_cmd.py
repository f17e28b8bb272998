"""``medscalpel audit changes``: what compression changed beyond accuracy (calibration,
explanations, subgroups, robustness) for one dense model and one or more compressed ones."""

from __future__ import annotations

from pathlib import Path

import typer

from medscalpel.cli.common import console, print_table, run_stage
from medscalpel.errors import ConfigError


def find_models(path: Path) -> list[Path]:
    """A model directory (holding ``model.json``), a served artifact (``serve/`` of ``compress
    deploy``, holding ``serve.json``) or every model directory under ``path`` (a sweep / run
    directory), sorted."""
    from medscalpel.errors import DataError
    from medscalpel.layout import artifact

    card = artifact("model").filename
    if (path / card).is_file() or (path / "serve.json").is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path} is neither a model directory (with {card}) nor a folder "
                        "holding model directories.")
    found = sorted({p.parent for p in path.rglob(card)}
                   | {p.parent for p in path.rglob("serve.json")})
    if not found:
        raise DataError(f"No model directory ({card}) under {path}; give the compressed "
                        "model's folder or a sweep/run directory that holds them.")
    return found


def changes(
    dense: Path = typer.Argument(..., help="The dense (reference) model directory."),
    compressed: list[Path] = typer.Argument(None, help="Compressed model directories, served "
                                            "artifacts (compress deploy's serve/), or a sweep / "
                                            "run directory holding several."),
    data: str = typer.Option(..., help="Dataset spec, e.g. 'phantom?n=2000&size=64' or "
                             "'nih:/data/nih'."),
    out: Path = typer.Option(Path("runs/audit-changes"), help="Run directory to create "
                             "(audit/changes/: changes.json, *_reliability.png, *_explanation.png, "
                             "*_robustness.png, manifest.json)."),
    split: str = typer.Option("test", help="Split of --data to audit on."),
    measures: list[str] = typer.Option(["calibration", "explanation", "subgroups",
                                        "robustness"], help="Measures to run (repeatable)."),
    n_images: int = typer.Option(500, help="Images audited (a seeded choice)."),
    n_boot: int = typer.Option(1000, help="Bootstrap replicates of every CI."),
    attributes: list[str] = typer.Option([], help="Attributes for the subgroup audit "
                                         "(repeatable; default: all the data carries)."),
    min_subgroup: int = typer.Option(20, help="Smaller subgroups are skipped (stated)."),
    n_faithfulness: int = typer.Option(100, help="Images for deletion / insertion / ROAD."),
    corruptions: list[str] = typer.Option([], help="Corruptions (repeatable; default: all)."),
    severities: list[int] = typer.Option([1, 2, 3], help="Corruption severities (1-3)."),
    seed: int = typer.Option(0, help="Seed of the image choice and the bootstrap."),
    runtime: list[str] = typer.Option([], help="Also audit the dense model and each compressed "
                                      "one as run by this deploy runtime (repeatable, e.g. "
                                      "openvino:int8, onnxruntime:int8-u8s8): pairs "
                                      "'NAME@RUNTIME'. Explanations are not measured on them "
                                      "(no gradients)."),
    n_calib: int = typer.Option(32, help="Calibration images of --runtime (from --calib-split)."),
    calib_split: str = typer.Option("train", help="Split of --data the --runtime calibration "
                                    "images come from."),
    threads: int = typer.Option(2, help="Threads of a --runtime variant or served artifact."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Calibration drift (ECE/Brier, sens/spec at the dense model's thresholds), explanation
    drift and faithfulness, per-subgroup delta AUROC, and robustness to CXR corruptions, each
    with CIs. Nothing is written unless the whole audit succeeds."""
    from medscalpel.layout import artifact
    from medscalpel.pipeline.stages.audit import ChangesSettings

    if not compressed and not runtime:
        raise ConfigError("audit changes: nothing to compare with the dense model; give "
                          "compressed model directories or --runtime (e.g. openvino:int8).")
    dirs = [d for c in (compressed or []) for d in find_models(c)
            if d.resolve() != dense.resolve()]
    config = {"dense": str(dense), "compressed": [str(d) for d in dirs], "runtime": list(runtime),
              "n_calib": n_calib, "calib_split": calib_split, "data": data,
              "split": split, "measures": list(measures), "n_images": n_images,
              "n_boot": n_boot, "attributes": list(attributes), "min_subgroup": min_subgroup,
              "n_faithfulness": n_faithfulness, "corruptions": list(corruptions),
              "severities": list(severities)}
    settings = ChangesSettings(
        dense=str(dense), compressed=tuple(str(d) for d in dirs), runtime=tuple(runtime),
        data=data, split=split, measures=tuple(measures), changes_images=n_images,
        changes_faithfulness=n_faithfulness, n_boot=n_boot, attributes=tuple(attributes),
        min_subgroup=min_subgroup, corruptions=tuple(corruptions),
        severities=tuple(severities), n_calib=n_calib, calib_split=calib_split,
        threads=threads)
    # the manifest's config ends with the provenance of every served artifact the stage loaded
    result = run_stage("changes", out, settings, "audit changes", config, seed=seed,
                       overwrite=overwrite, manifest_config=("artifacts",))
    _print_changes(result, data, split)
    console.print(f"written to {artifact('changes').dir_in(out)}")


def _print_changes(result, data: str, split: str) -> None:
    """Each compressed model's headline and its calibration, subgroup and robustness tables."""
    for p in result.pairs:
        console.print(f"[bold]{p.name}[/bold] vs dense ({result.n} images of {data} / {split})")
        for line in p.headline():
            console.print(f"  {line}")
        if p.calibration is not None:
            print_table(p.calibration.table(), title=f"{p.name}: calibration "
                        f"(thresholds: {p.calibration.threshold_source})")
        if p.subgroups is not None:
            print_table(p.subgroups.table(), title=f"{p.name}: subgroups (macro)")
            for s in p.subgroups.skipped:
                console.print(f"  skipped: {s}")
        if p.robustness is not None:
            print_table(p.robustness.table(), title=f"{p.name}: robustness (macro)")
