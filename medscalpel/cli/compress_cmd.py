"""``medscalpel compress sweep|prune|export`` commands (thin wrappers over medscalpel.compress)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from medscalpel.cli import deprecations
from medscalpel.cli.common import (N_BOOT, N_BOOT_HELP, console, fmt, print_table, run_stage,
                                   run_stage_in_place)
from medscalpel.errors import ConfigError

_TARGET_LATENCY_HELP = ("Search the ratio whose MEASURED latency (ms, batch 1) in --runtime is at "
                        "most this.")
_SPEEDUP_MEASURED_HELP = ("Search the ratio whose measured latency in --runtime is this many "
                          "times the dense one's.")
_ROUND_TO_HELP = ("Keep channel counts multiples of this (default in the measured modes: the "
                  "CPU's fp32 vector width, 8 or 16).")
_EXTERNAL_HELP = ("A second site's labelled dataset spec (same classes): the pruned and the "
                  "unpruned model are also compared on all of its images, with the same "
                  "verdict.")


def parse_ratios(text: str) -> list[float]:
    """``"0:0.95:0.05"`` (start:stop:step, stop included) or ``"0,0.5,0.9"``."""
    import numpy as np

    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError("step must be > 0")
            return [round(float(v), 6) for v in np.arange(start, stop + step / 2, step)]
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"--ratios must be 'start:stop:step' or a comma list of numbers; got "
                          f"{text!r} ({exc}).") from exc


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"--{name} must be a comma list of integers; got {text!r}.") from exc


def _open(spec: str, split: str, model):
    from medscalpel.data import open_dataset

    pre = model.card.preprocess if model.card is not None else None
    return open_dataset(spec, split=split, preprocess=pre)


def sweep(
    models: list[Path] = typer.Argument(..., help="Model directories (model.safetensors + "
                                        "model.json), e.g. the same architecture trained with "
                                        "several seeds."),
    data: str = typer.Option(..., help="Dataset spec of the evaluation data, e.g. "
                             "'phantom?n=2000&size=64' or 'nih_lt:/data/nih'."),
    split: str = typer.Option("test", help="Split evaluated at every sparsity."),
    out: Path = typer.Option(Path("runs/compress-sweep"), help="Sweep directory (resumable: "
                             "rerun with the same --out to finish or extend it)."),
    ratios: str = typer.Option("0:0.95:0.05", help="Sparsities: 'start:stop:step' or a list."),
    methods: str = typer.Option("l1,random", help="l1 (global magnitude) and/or random "
                                "(control)."),
    seeds: str = typer.Option("0", help="Seeds of random masks / fine-tunes, comma list."),
    finetune_epochs: int = typer.Option(0, help="Fine-tune epochs after pruning (0: none, as "
                                        "in PruneCXR)."),
    finetune_lr: float = typer.Option(1e-4, help="Fine-tune learning rate."),
    batch_size: int = typer.Option(64, help="Prediction batch size."),
) -> None:
    """Global unstructured (L1 / random) sparsity sweep: one Predictions per (model, method,
    ratio) for the audit stage; finished cells are skipped on rerun."""
    from medscalpel.pipeline.stages.compress import SweepSettings

    settings = SweepSettings(models=tuple(str(m) for m in models), data=data, split=split,
                             sweep_ratios=tuple(parse_ratios(ratios)),
                             sweep_methods=tuple(m.strip() for m in methods.split(",")
                                                 if m.strip()),
                             sweep_seeds=tuple(_ints(seeds, "seeds")),
                             finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
                             sweep_batch_size=batch_size)
    res = run_stage_in_place("sweep_grid", out, settings)
    console.print(f"{len(res.cells)} cells ({res.n_computed} computed, {res.n_skipped} already "
                  f"done) in {out}")
    for mid in res.model_ids:
        for method in res.methods:
            r, a = res.curve(mid, method)
            if r.size:
                console.print(f"{mid} {method}: " + ", ".join(f"{x:.2f}->{fmt(float(y))}"
                                                              for x, y in zip(r, a)))




def prune(
    model: Path = typer.Argument(..., help="Model directory to prune."),
    data: str = typer.Option(..., help="Dataset spec: calibration images and recovery "
                             "fine-tune come from its train split."),
    out: Path = typer.Option(Path("runs/compress-prune"), help="Run directory to create "
                             "(model/, prune.json, manifest.json)."),
    criterion: str = typer.Option("l1", help="l1, l2, bn_scale, taylor, lrp, ig, backtrace."),
    ratio: Optional[float] = typer.Option(None, help="Channel ratio removed per group (default "
                                          "0.5 unless --target-speedup)."),
    target_speedup: Optional[float] = typer.Option(None, help="Search the ratio giving this "
                                                   "MACs reduction instead."),
    target_latency: Optional[float] = typer.Option(None, "--target-latency",
                                                   help=_TARGET_LATENCY_HELP),
    target_speedup_measured: Optional[float] = typer.Option(None, help=_SPEEDUP_MEASURED_HELP),
    runtime: str = typer.Option("onnxruntime:fp32", help="Runtime of the measured modes "
                                "(e.g. onnxruntime:fp32, openvino:fp32, torch:fp32)."),
    round_to: Optional[int] = typer.Option(None, help=_ROUND_TO_HELP),
    global_pruning: bool = typer.Option(False, "--global", help="Rank channels globally."),
    steps: int = typer.Option(1, help="Iterative pruning steps."),
    recovery_epochs: int = typer.Option(0, help="Total recovery fine-tune epochs (split over "
                                        "the steps)."),
    lr: float = typer.Option(5e-4, help="Recovery learning rate."),
    distill: bool = typer.Option(False, help="Distil from the unpruned model during recovery."),
    soft_weight: float = typer.Option(0.5, help="With --distill: weight of the unpruned model's "
                                      "soft targets (1 - it weighs the ground truth)."),
    temperature: float = typer.Option(2.0, help="Distillation temperature."),
    calib: int = typer.Option(64, "--n-calib", help="Number of calibration images."),
    calib_old: Optional[int] = typer.Option(None, "--calib", hidden=True),
    max_steps_per_epoch: Optional[int] = typer.Option(None, help="Cap recovery steps/epoch."),
    dry_run: bool = typer.Option(False, help="Only report the channels that would be removed."),
    n_boot: int = typer.Option(N_BOOT, help=N_BOOT_HELP),
    eval_split: str = typer.Option("test", help="Split of --data the pruned and the unpruned "
                                   "model are compared on (paired, same images)."),
    external: Optional[str] = typer.Option(None, metavar="SPEC", help=_EXTERNAL_HELP),
    seed: int = typer.Option(0, help="Seed of the calibration choice and recovery."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Structured channel pruning on Torch-Pruning dependency graphs (physically smaller model
    with lineage), optionally iterative with recovery fine-tune / distillation."""
    calib = deprecations.renamed(calib, calib_old, "--calib", "compress prune")
    from medscalpel.compress.structured import RecoveryConfig
    from medscalpel.engine.predict import collect_images
    from medscalpel.models.checkpoint import load_model

    m = load_model(model)
    train_ds = _open(data, "train", m)
    val_ds = _open(data, "val", m) if recovery_epochs else None
    images, idx = collect_images(train_ds, calib, seed=seed)
    rec = RecoveryConfig(epochs=recovery_epochs, lr=lr, distill_from_dense=distill,
                         soft_weight=soft_weight, T=temperature, seed=seed,
                         max_steps_per_epoch=max_steps_per_epoch)
    config = {"model": str(model), "data": data, "criterion": criterion, "ratio": ratio,
              "target_speedup": target_speedup, "target_latency_ms": target_latency,
              "target_speedup_measured": target_speedup_measured, "runtime": runtime,
              "round_to": round_to, "global": global_pruning, "steps": steps,
              "recovery": rec.to_dict(), "calib": calib, "dry_run": dry_run,
              "eval_split": eval_split, "n_boot": n_boot}
    settings = dict(criterion=criterion, ratio=ratio, target_speedup=target_speedup,
                    global_pruning=global_pruning, iterative_steps=steps, recovery=rec,
                    round_to=round_to, target_latency_ms=target_latency,
                    target_speedup_measured=target_speedup_measured, runtime=runtime)
    run_dir = dict(command="compress prune", config=config, seed=seed, overwrite=overwrite)
    if dry_run:
        return _prune_dry_run(m, images, train_ds, val_ds, settings, out, run_dir)
    result, ext_verdict = _prune_run(m, images, train_ds, val_ds, settings, data, eval_split,
                                     external, n_boot, seed, out, run_dir)
    _print_prune(result, ext_verdict, criterion, eval_split, out)


def _prune_dry_run(m, images, train_ds, val_ds, settings: dict, out: Path,
                   run_dir: dict) -> None:
    """``compress prune --dry-run``: the plan's parameters and MACs, nothing pruned; writes
    prune.json."""
    from medscalpel.compress.structured import prune_structured
    from medscalpel.layout import write_artifact
    from medscalpel.runs import RunDir

    with RunDir(out, data={"train": train_ds.content_hash()}, **run_dir) as run:
        res = prune_structured(m, images, train_ds=train_ds, val_ds=val_ds, dry_run=True,
                               **settings)
        write_artifact(run.path, "prune", res)
    console.print(f"{settings['criterion']} (dry run): params {res.params_before:,} -> "
                  f"{res.params_after:,}, MACs x{res.speedup_macs:.2f}; nothing pruned")


def _prune_run(m, images, train_ds, val_ds, settings: dict, data: str, eval_split: str,
               external: Optional[str], n_boot: int, seed: int, out: Path, run_dir: dict):
    """Prune through the registered ``prune`` compressor, compare with the unpruned model on
    ``eval_split`` (and on the --external site): ``(CompressionResult, external verdict)``."""
    from medscalpel.compress.contract import CompressionInputs, compress
    from medscalpel.layout import write_artifact
    from medscalpel.runs import RunDir

    eval_ds = _open(data, eval_split, m)
    ext_ds = _open(external, "all", m) if external is not None else None  # before any work
    inputs = CompressionInputs(calib=images, train=train_ds, val=val_ds, evaluate=eval_ds)
    with RunDir(out, data={"train": train_ds.content_hash(), eval_split: eval_ds.content_hash()},
                **run_dir) as run:
        result = compress("prune", m, inputs, n_boot=n_boot, **settings)
        result.save(run.path)
        write_artifact(run.path, "prune", result.report)
        ext_verdict = (_external_floor(m, result.model, ext_ds, external, run.path, n_boot, seed)
                       if ext_ds is not None else None)
    return result, ext_verdict


def _print_prune(result, ext_verdict, criterion: str, eval_split: str, out: Path) -> None:
    """Parameters, MACs and measured speedup, the paired accuracy table and the verdicts
    against the default floor (internal split, and the external site when given)."""
    res = result.report
    lat = res.latency["ratio"] if res.latency else None
    spread = (f" (spread {res.latency['spread']:.0%} over {res.latency['rounds']} alternated "
              "rounds" + ("; NOISY: measure again on an idle machine)" if res.latency["noisy"]
                          else ")")) if res.latency and "spread" in res.latency else ""
    console.print(f"{criterion}: params {res.params_before:,} -> {res.params_after:,} "
                  f"({res.param_reduction:.1%} removed), MACs x{res.speedup_macs:.2f}, "
                  f"CPU speedup (batch 1) {fmt(lat, 2)}{spread}; written to {out}")
    if res.latency and res.latency.get("runtime"):
        console.print(f"measured in {res.latency['runtime']}: {res.latency['runtime_dense_ms']:.3g}"
                      f" -> {res.latency['runtime_pruned_ms']:.3g} ms "
                      f"(x{res.latency['runtime_ratio']:.2f}) at ratio {res.ratio:.3f}")
    print_table(result.comparison.table(), f"accuracy: pruned vs unpruned on '{eval_split}' "
                f"({result.comparison.n} images, paired bootstrap)")
    console.print(result.comparison.summary(), highlight=False)
    cmp = result.comparison
    verdict = cmp.verdict(margin=0.01, macro_margin=0.005,
                          method="bootstrap" if cmp.replicates is not None and cmp.n_boot
                          else "delong")
    for where, vd in (("internal", verdict), ("external", ext_verdict)):
        if vd is None:
            continue
        colour = {"pass": "green", "fail": "red"}.get(vd.outcome, "yellow")
        console.print(f"[{colour}]{where}: accuracy vs the default floor (macro -0.005, class "
                      f"-0.01; paired intervals, Holm): {escape(vd.summary())}[/{colour}]",
                      highlight=False)


def _external_floor(dense, pruned, ext_ds, spec: str, run_path: Path, n_boot: int, seed: int):
    """The pruned vs the unpruned model on every image of a second site: paired deltas and the
    same non-inferiority verdict as on the evaluation split (declared artifact
    ``external_comparison``)."""
    from medscalpel.engine.compare import compare_predictions
    from medscalpel.engine.predict import predict
    from medscalpel.layout import write_artifact

    cmp = compare_predictions(predict(dense, ext_ds, progress=False),
                              predict(pruned, ext_ds, progress=False), n_boot=n_boot, seed=seed)
    verdict = cmp.verdict(margin=0.01, macro_margin=0.005,
                          method="bootstrap" if cmp.replicates is not None and cmp.n_boot
                          else "delong")
    write_artifact(run_path, "external_comparison",
                   {"spec": spec, "comparison": cmp.to_dict(), "verdict": verdict.to_dict()})
    return verdict


def export(
    model: Path = typer.Argument(..., help="Model directory to export."),
    out: Path = typer.Option(Path("runs/compress-export"), help="Run directory to create "
                             "(model.onnx, export.json, manifest.json)."),
    reference: Optional[Path] = typer.Option(None, help="Dense model directory to compare "
                                             "latency with (measured in the same run)."),
    data: Optional[str] = typer.Option(None, help="Dataset spec for real-image parity, int8 "
                                       "calibration and delta AUROC."),
    split: str = typer.Option("test", help="Split of --data."),
    quantize: Optional[str] = typer.Option(None, help="int8 quantization: dynamic or static."),
    batch_sizes: str = typer.Option("1,32", help="Latency batch sizes."),
    opset: int = typer.Option(18, help="ONNX opset (>= 18: the dynamo exporter; lower: "
                              "the TorchScript one, recorded in export.json)."),
    repeats: int = typer.Option(10, help="Timed repeats per measurement."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """ONNX export with onnxruntime parity, CPU latency vs the dense model (same run) and
    optional int8 quantization with its delta macro AUROC."""
    from medscalpel.pipeline.stages.compress import ExportSettings

    config = {"model": str(model), "reference": str(reference) if reference else None,
              "data": data, "split": split, "quantize": quantize, "batch_sizes": batch_sizes,
              "opset": opset}
    settings = ExportSettings(model=str(model), reference=config["reference"], data=data,
                              split=split, quantize=quantize,
                              batch_sizes=tuple(_ints(batch_sizes, "batch-sizes")), opset=opset,
                              repeats=repeats)
    res = run_stage("export_onnx", out, settings, "compress export", config, overwrite=overwrite)
    console.print(f"ONNX parity: random {fmt(res.parity['random'], 8)}, real "
                  f"{fmt(res.parity['real'], 8)}; speedup vs reference "
                  + ", ".join(f"{k} {v:.2f}" for k, v in res.speedup.items()))
    console.print(f"ONNX exporter: {res.exporter['exporter']} ({res.exporter['reason']}), "
                  f"opset {res.opset}")
    console.print(f"written to {out}")
