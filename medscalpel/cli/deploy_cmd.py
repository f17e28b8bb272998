"""``medscalpel compress deploy``: benchmark every CPU runtime x precision and write the fastest
variant that keeps the accuracy (runs the registered 'deploy' stage, which calls
:func:`medscalpel.deploy.flow.deploy`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medscalpel.cli.common import console, fmt, run_stage
from medscalpel.errors import ConfigError

_EXTERNAL_HELP = ("A second site's labelled dataset spec (same classes): every variant must "
                  "also be shown to meet the floor there (all of its images, as 'evaluate "
                  "--external' uses them).")
_UNSCORABLE_HELP = ("Accept classes with fewer than --min-positives positive or negative "
                    "evaluation images unchecked (named in every verdict); without it they "
                    "leave verdicts undecided.")
_EXPLAIN_HELP = ("Serve the artifact with a second output, the class activation maps (checked "
                 "against Grad-CAM, latency cost measured); --no-explain: logits only. When "
                 "CAMs are served, the logits-only artifact is kept beside them in "
                 "serve/logits_only.")
_GUARANTEE_HELP = ("When the model card carries a guarantee (repair calibrate --guarantee "
                   "--model), serve only variants whose re-certification PASSES (an undecided "
                   "one is not served); a failing one is never served. Refused for a card "
                   "without one.")


def _list(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def _batches(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"--batch must be a comma list of integers such as '1,8'; got "
                          f"{text!r}.") from exc


def deploy(
    model: Path = typer.Option(..., help="Model directory (model.safetensors + model.json)."),
    data: str = typer.Option(..., help="Dataset spec; its --split gives parity and delta AUROC, "
                             "its train split the int8 calibration images."),
    out: Path = typer.Option(..., help="Run directory to create (deploy/: deploy.json, "
                             "deploy.md, export/, serve/; manifest.json)."),
    split: str = typer.Option("test", help="Split for parity and paired delta AUROC."),
    runtimes: Optional[str] = typer.Option(None, help="Comma list of runtimes (torch, "
                                           "torch_channels_last, torch_compile, onnxruntime, "
                                           "openvino); default: every available one."),
    precisions: Optional[str] = typer.Option(None, help="Comma list of precisions (fp32, bf16, "
                                             "int8, int8-u8s8, int8-s8s8, int8-ac)."),
    batch: str = typer.Option("1,8", help="Batch sizes timed; the first decides."),
    rounds: int = typer.Option(5, help="Alternated rounds (each variant once per round)."),
    repeats: int = typer.Option(5, help="Timed runs per variant per round."),
    floor_macro: float = typer.Option(-0.005, help="Accuracy floor: macro delta AUROC."),
    floor_class: float = typer.Option(-0.01, help="Accuracy floor: every class's delta AUROC."),
    n_images: int = typer.Option(256, help="Evaluation images (parity, delta AUROC)."),
    n_calib: int = typer.Option(64, help="Calibration images for int8 (train split)."),
    threads: Optional[int] = typer.Option(None, help="Threads per runtime (default: torch's)."),
    n_boot: int = typer.Option(1000, help="Paired bootstrap replicates for the CIs."),
    seed: int = typer.Option(0, help="Seed of the image choice and the bootstrap."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    external: Optional[str] = typer.Option(None, metavar="SPEC", help=_EXTERNAL_HELP),
    accept_unscorable: bool = typer.Option(False, help=_UNSCORABLE_HELP),
    min_positives: int = typer.Option(10, help="Positive (and negative) images a class needs "
                                      "for its floor to be checked."),
    explain: bool = typer.Option(True, help=_EXPLAIN_HELP),
    require_guarantee: bool = typer.Option(False, help=_GUARANTEE_HELP),
) -> None:
    """Export (ONNX, OpenVINO IR), benchmark runtimes x precisions alternated in one run, check
    parity and per-class delta AUROC, and serve the fastest variant meeting the floor."""
    from medscalpel.pipeline.stages.compress import DeploySettings

    rts, precs = _list(runtimes), _list(precisions)
    settings = DeploySettings(model=str(model), data=data, split=split, external=external,
                              runtimes=tuple(rts) if rts else None,
                              precisions=tuple(precs) if precs else None,
                              batches=tuple(_batches(batch)), rounds=rounds, repeats=repeats,
                              floor_macro=floor_macro, floor_class=floor_class,
                              eval_images=n_images, n_calib=n_calib, threads=threads,
                              bootstrap=n_boot, accept_unscorable=accept_unscorable,
                              min_positives=min_positives, explain=explain,
                              require_guarantee=require_guarantee)
    config = {"model": str(model), "data": data, "split": split, "external": external}
    # one run directory, one manifest: the registered 'deploy' stage writes deploy/ (deploy.json,
    # serve/, ...) where the demo's deploy stage writes it; what deploy() measured with (the
    # variants, batches, rounds, repeats, threads, floors) joins the config, the hashes of the
    # evaluation and calibration data the manifest's data
    res = run_stage("deploy", out, settings, "compress deploy", config, seed=seed,
                    overwrite=overwrite, manifest_data=("eval", "calib"),
                    manifest_config=("variants", "batches", "rounds", "repeats", "threads",
                                     "floor_macro", "floor_class"))
    _print_deploy(res, out)


def _print_deploy(res, out: Path) -> None:
    """The benchmark table, the recommended variant and where it is served, its explanation
    output, exporter and guarantee, and its paired macro delta AUROC."""
    from medscalpel.deploy.result import explanation_line, export_line, guarantee_lines
    from medscalpel.layout import artifact

    console.print(res.markdown(), markup=False, highlight=False)
    chosen = res.chosen
    console.print(f"recommended: {res.recommended} ({res.reason}); served from "
                  f"{artifact('deploy').dir_in(out) / 'serve'} "
                  f"({', '.join(res.serve['files'])})", markup=False)
    console.print(f"explanation output: {explanation_line(res.explanation)}", markup=False)
    console.print(f"exported by: {export_line(res.serve.get('export'))}", markup=False)
    console.print(f"guarantee: {guarantee_lines(res)[0]}", markup=False)
    if chosen is not None and chosen.comparison is not None:
        m_ = chosen.comparison["macro"]
        console.print(f"macro dAUROC {fmt(m_.get('delta_auroc'), 4)} CI "
                      f"{fmt(tuple(m_.get('delta_auroc_ci') or ()), 4)} on {res.n_images} images "
                      f"of '{res.split}'", markup=False)
