"""``medscalpel audit changes``: what compression changed beyond accuracy (calibration,
explanations, subgroups, robustness) for one dense model and one or more compressed ones."""

from __future__ import annotations

from pathlib import Path

import typer

from medscalpel.cli.common import console, print_table


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
    from medscalpel.audit.changes import audit_changes
    from medscalpel.engine.api import model_provenance as provenance
    from medscalpel.layout import artifact
    from medscalpel.runs import RunDir

    ref, dirs, models, ds = _load_models(dense, list(compressed or []), runtime, data, split,
                                         calib_split, n_calib, threads)
    config = {"dense": str(dense), "compressed": [str(d) for d in dirs], "runtime": list(runtime),
              "n_calib": n_calib, "calib_split": calib_split, "data": data,
              "split": split, "measures": list(measures), "n_images": n_images,
              "n_boot": n_boot, "attributes": list(attributes), "min_subgroup": min_subgroup,
              "n_faithfulness": n_faithfulness, "corruptions": list(corruptions),
              "severities": list(severities),
              "artifacts": {k: provenance(m) for k, m in models.items()
                            if provenance(m) is not None}}
    with RunDir(out, command="audit changes", config=config, seed=seed,
                overwrite=overwrite) as run:
        result = audit_changes(ref, models, ds, measures=measures, n_images=n_images,
                               n_boot=n_boot, seed=seed, attribute_names=attributes or None,
                               min_subgroup=min_subgroup, n_faithfulness=n_faithfulness,
                               corruptions=corruptions or None, severities=severities)
        result.save(artifact("changes").dir_in(run.path))
    _print_changes(result, data, split)
    console.print(f"written to {artifact('changes').dir_in(out)}")


def _load_models(dense: Path, compressed: list[Path], runtime: list[str], data: str,
                 split: str, calib_split: str, n_calib: int, threads: int):
    """The dense model, the compressed model directories found, every compared model by name
    (each compressed one, and the dense and torch ones again as run by each --runtime) and the
    audited split: ``(dense_model, dirs, models, dataset)``."""
    from medscalpel.data import open_dataset
    from medscalpel.deploy.served import load_served, runtime_model
    from medscalpel.engine.predict import collect_images
    from medscalpel.errors import ConfigError
    from medscalpel.models import load_model

    if not compressed and not runtime:
        raise ConfigError("audit changes: nothing to compare with the dense model; give "
                          "compressed model directories or --runtime (e.g. openvino:int8).")
    ref = load_model(dense)
    dirs = [d for c in compressed for d in find_models(c) if d.resolve() != dense.resolve()]
    models = {}
    for d in dirs:
        name = (d.parent.name if d.name == "serve" else d.name)
        name = name if name not in models else str(d)
        models[name] = (load_served(d, threads) if (d / "serve.json").is_file()
                        else load_model(d))
    ds = open_dataset(data, split=split, preprocess=ref.card.preprocess)
    if runtime:
        cal_ds = open_dataset(data, split=calib_split, preprocess=ref.card.preprocess)
        calib = collect_images(cal_ds, n_calib, seed=1)[0]
        torch_models = {"dense": ref, **{k: m for k, m in models.items()
                                        if getattr(m, "supports_gradients", True)}}
        for rt in runtime:
            for k, m in torch_models.items():
                models[f"{k}@{rt}"] = runtime_model(m, rt, calib, threads=threads)
    return ref, dirs, models, ds


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
