"""``medscalpel compress distill`` and ``medscalpel compress students`` (thin wrappers over
:mod:`medscalpel.compress.distill` and :mod:`medscalpel.compress.student_search`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from medscalpel.cli.common import (N_BOOT, N_BOOT_HELP, console, fmt, one_of, print_table,
                                   run_stage)
from medscalpel.errors import ConfigError

_TEACHER_HELP = ("The teacher: a model directory (model.safetensors + model.json), or a zoo "
                 "architecture name that is first trained on --data for --teacher-epochs.")
_DATA_HELP = ("Dataset spec with train/val/test splits, e.g. 'phantom?n=2000&size=64' or "
              "'folder:/data/kermany/train?dedup=true'.")
_STUDENT_HELP = ("Student: a zoo architecture (mobilenetv3_small_100, mobilenetv3_large_100, "
                 "efficientnet_b0, resnet18, resnet_tiny, densenet_tiny, ...), a model "
                 "directory (e.g. a structurally pruned teacher from 'compress prune'), or "
                 "'ofa': one once-for-all supernet, one subnet per --latency-budget.")
_OUT_HELP = ("Run directory to create (distill/: distill.json, model/, student_alone/; "
             "manifest.json).")
_SOFT_WEIGHT_HELP = ("Weight of the teacher's soft targets in [0, 1] (1 - it weighs the "
                     "ground-truth loss; 0 = no teacher).")
_DEPLOY_RUN_HELP = ("--student ofa: a 'compress deploy' run (deploy.json / serve.json) whose "
                    "runtime and threads measure the subnets.")
_PHASE_EPOCHS_HELP = ("--student ofa: epochs of the progressive shrinking phases "
                      "largest,kernel,depth,width (in place of --epochs).")


def _preprocess(model_dir: str, size: int, channels: int):
    """The teacher's input contract when it is a model directory, else --size/--channels."""
    from medscalpel.pipeline.stages.compress import teacher_preprocess

    return teacher_preprocess(model_dir, size, channels)


def _open_splits(data: str, pre, augment: bool):
    from medscalpel.data import open_dataset
    from medscalpel.data.transforms import Augment

    train_ds = open_dataset(data, split="train",
                            preprocess=pre.with_augment(Augment() if augment else None))
    return train_ds, open_dataset(data, split="val", preprocess=pre), \
        open_dataset(data, split="test", preprocess=pre)


def _class_list(text: str) -> tuple[int, ...] | None:
    if not text.strip():
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ConfigError(f"--saliency-classes must be a comma list of class indices; got "
                          f"{text!r}.") from exc


def distill(
    teacher_arg: Optional[str] = typer.Argument(None, hidden=True, metavar="TEACHER"),
    teacher: Optional[str] = typer.Option(None, "--model", "--teacher", help=_TEACHER_HELP),
    data: str = typer.Option(..., help=_DATA_HELP),
    student: str = typer.Option("mobilenetv3_small_100", help=_STUDENT_HELP),
    out: Path = typer.Option(Path("runs/compress-distill"), help=_OUT_HELP),
    soft_weight: float = typer.Option(0.5, help=_SOFT_WEIGHT_HELP),
    temperature: float = typer.Option(4.0, help="Distillation temperature T (soft term scaled "
                                      "by T^2)."),
    epochs: int = typer.Option(10, help="Student epochs (the same for the distilled and the "
                               "stand-alone student)."),
    lr: float = typer.Option(1e-3, help="Student learning rate."),
    batch_size: int = typer.Option(32, help="Batch size."),
    feature_weight: float = typer.Option(0.0, help="Weight of penultimate-feature MSE through "
                                         "a learnable projection (0: off)."),
    attention_weight: float = typer.Option(0.0, help="Weight of attention transfer on the "
                                           "CAM-layer maps (0: off)."),
    baseline: bool = typer.Option(True, help="Also train the student alone (the comparison)."),
    teacher_epochs: int = typer.Option(5, help="Epochs to train a teacher given by name."),
    teacher_lr: float = typer.Option(1e-3, help="Learning rate of a teacher given by name."),
    size: int = typer.Option(64, help="Input size when the teacher is given by name."),
    channels: int = typer.Option(1, help="Input channels when the teacher is given by name."),
    augment: bool = typer.Option(True, help="Light CXR augmentation on the train split."),
    max_steps_per_epoch: Optional[int] = typer.Option(None, help="Cap the steps of an epoch."),
    saliency_images: int = typer.Option(8, help="Test images for the teacher-student saliency "
                                        "comparison (0: skip)."),
    saliency_method: str = typer.Option("scorecam", help="scorecam (the default of the "
                                        "saliency comparison), gradcam or gradcam++."),
    saliency_classes: str = typer.Option("", help="Class indices compared, comma list (default "
                                         "all)."),
    n_boot: int = typer.Option(N_BOOT, help=N_BOOT_HELP),
    seed: int = typer.Option(0, help="Seed of both students' training."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    latency_budget: str = typer.Option("", help="--student ofa: comma list of batch-1 latency "
                                       "budgets in ms (one subnet each) on the deploy runtime."),
    deploy_run: Optional[Path] = typer.Option(None, help=_DEPLOY_RUN_HELP),
    runtime: str = typer.Option("", help="--student ofa: runtime:precision measuring the "
                                "subnets (default: the --deploy-run's, else onnxruntime:fp32)."),
    phase_epochs: str = typer.Option("4,2,2,2", help=_PHASE_EPOCHS_HELP),
    search_subnets: int = typer.Option(40, help="--student ofa: random subnets measured before "
                                       "the evolutionary search."),
) -> None:
    """Knowledge distillation: teacher -> compact student with hybrid supervision, compared
    with the student trained alone (params, MACs, CPU speedup, AUROC/AP with CIs, Score-CAM
    similarity); or (--student ofa) one once-for-all supernet and one subnet per latency
    budget."""
    from medscalpel.compress.distill import DistillConfig
    from medscalpel.engine.train import TrainConfig

    teacher = one_of(teacher, teacher_arg, "--model", "TEACHER", "the teacher model",
                     command="compress distill")
    _check_student(student, latency_budget, feature_weight, attention_weight)
    splits = _open_splits(data, _preprocess(teacher, size, channels), augment)
    if student == "ofa":
        from medscalpel.cli.ofa_cmd import run_ofa

        run_ofa(teacher, data, *splits, out, latency_budget, deploy_run,
                runtime, phase_epochs, search_subnets, lr, batch_size, soft_weight, temperature,
                max_steps_per_epoch,
                TrainConfig(epochs=teacher_epochs, batch_size=batch_size, lr=teacher_lr,
                            seed=seed, device=device, max_steps_per_epoch=max_steps_per_epoch),
                n_boot, saliency_images, saliency_method, _class_list(saliency_classes), seed,
                device, overwrite)
        return
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                       max_steps_per_epoch=max_steps_per_epoch, patience=max(3, epochs))
    cfg = DistillConfig(soft_weight=soft_weight, temperature=temperature,
                        feature_weight=feature_weight, attention_weight=attention_weight, train=tcfg,
                        teacher_train=TrainConfig(epochs=teacher_epochs, batch_size=batch_size,
                                                  lr=teacher_lr, seed=seed, device=device,
                                                  max_steps_per_epoch=max_steps_per_epoch),
                        baseline=baseline, n_boot=n_boot, saliency_images=saliency_images,
                        saliency_method=saliency_method,
                        saliency_classes=_class_list(saliency_classes)).validate()
    res = _run_distill(teacher, student, data, splits, cfg, seed, out, overwrite)
    _print_distill(res, out)


def _check_student(student: str, latency_budget: str, feature_weight: float,
                   attention_weight: float) -> None:
    """--student ofa goes with --latency-budget (and only it), and distils logits only."""
    if (student == "ofa") != bool(latency_budget.strip()):
        raise ConfigError("--student ofa and --latency-budget MS[,MS...] go together (one subnet "
                          "per budget); other students take no budget.")
    if student == "ofa" and (feature_weight > 0 or attention_weight > 0):
        raise ConfigError("--student ofa distils logits only (DistillLoss soft + hard terms); "
                          "--feature-weight and --attention-weight must stay 0.")


def _run_distill(teacher: str, student: str, data: str, splits, cfg, seed: int, out: Path,
                 overwrite: bool):
    """Distil through the registered ``distill`` compressor in a resumable run directory;
    writes distill/distill.json (the distilled student in model/ beside it)."""
    from medscalpel.compress.contract import CompressionInputs, compress
    from medscalpel.layout import artifact
    from medscalpel.runs import RunDir

    train_ds, val_ds, test_ds = splits
    config = {"teacher": teacher, "student": student, "data": data, **cfg.to_dict()}
    with RunDir(out, command="compress distill", config=config, seed=seed,
                data={"train": train_ds.content_hash(), "val": val_ds.content_hash(),
                      "test": test_ds.content_hash()}, overwrite=overwrite,
                resumable=True) as run:
        # per-epoch state of every training: an interrupted run resumes when run again
        inputs = CompressionInputs(train=train_ds, val=val_ds, test=test_ds)
        res = compress("distill", teacher, inputs, student=student, config=cfg,
                       checkpoint_dir=run.path / "checkpoint").report
        res.save(artifact("distill").dir_in(run.path))
    return res


def _print_distill(res, out: Path) -> None:
    """Teacher vs students, the distilled student's size, speed, AUROC drop and saliency
    agreement, and the acceptance verdict with its three parts."""
    from medscalpel.layout import artifact

    print_table(res.table(), "teacher vs students (test split)")
    d = res.students["distilled"]
    sal = res.saliency.get("distilled", {}).get("overall", {})
    tg = res.targets
    sp = tg["speed"]
    console.print(f"distilled {d['arch']}: {d['param_ratio']:.3f} of the teacher's parameters, "
                  f"CPU speedup x{fmt(d['speedup'], 2)} (median of {sp['rounds']} rounds, "
                  f"x{fmt(sp['min'], 2)} .. x{fmt(sp['max'], 2)}), AUROC drop "
                  f"{fmt(d['auroc_drop'], 4)} (point estimate), saliency Pearson "
                  f"{fmt(sal.get('pearson_mean'))}", highlight=False)
    colour = {"pass": "green", "fail": "red"}.get(tg["outcome"], "yellow")
    console.print(f"[{colour}]student acceptance: {tg['outcome']} ({tg['reason']})[/{colour}]",
                  highlight=False)
    console.print(f"  params: {tg['param_ratio']['outcome']}: {tg['param_ratio']['reason']}",
                  highlight=False)
    console.print(f"  speed (x{tg['min_speedup']:g}): {sp['outcome']}: {sp['reason']}",
                  highlight=False)
    console.print(f"  AUROC (non-inferiority, paired): {escape(tg['auroc_summary'])}",
                  highlight=False)
    console.print(f"written to {artifact('distill').dir_in(out)} (the distilled student in "
                  f"model/ there)")


def students(
    teacher_arg: Optional[Path] = typer.Argument(None, hidden=True, metavar="TEACHER"),
    teacher: Optional[Path] = typer.Option(None, "--model", "--teacher", help="Trained teacher "
                                           "model directory."),
    data: str = typer.Option(..., help="Dataset spec: proxy training on its train split, "
                             "scoring on its val split."),
    candidates: str = typer.Option("mobilenetv3_small_100,mobilenetv3_large_100,efficientnet_b0,"
                                   "resnet_tiny,densenet_tiny", help="Comma list of zoo "
                                   "architectures and/or model directories."),
    latency_budget_ms: float = typer.Option(..., help="Largest batch-1 CPU latency (median ms) "
                                            "on this machine."),
    out: Path = typer.Option(Path("runs/compress-students"), help="Run directory to create "
                             "(students.json, manifest.json)."),
    proxy_epochs: int = typer.Option(1, help="Proxy training epochs per candidate."),
    proxy_steps: int = typer.Option(20, help="Steps per proxy epoch."),
    soft_weight: float = typer.Option(0.5, help="Weight of the teacher's soft targets in the "
                                      "proxy training (1 - it weighs the ground truth)."),
    temperature: float = typer.Option(4.0, help="Distillation temperature of the proxy."),
    lr: float = typer.Option(1e-3, help="Proxy learning rate."),
    batch_size: int = typer.Option(32, help="Proxy batch size."),
    seed: int = typer.Option(0, help="Seed (same for every candidate)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Hardware-aware student choice: measure candidates' CPU latency here, proxy-distil those
    within the budget, pick the most accurate."""
    from medscalpel.pipeline.stages.compress import StudentsSettings

    teacher = one_of(teacher, teacher_arg, "--model", "TEACHER", "the teacher model",
                     command="compress students")
    names = [c.strip() for c in candidates.split(",") if c.strip()]
    config = {"teacher": str(teacher), "data": data, "candidates": names,
              "latency_budget_ms": latency_budget_ms, "proxy_epochs": proxy_epochs,
              "proxy_steps": proxy_steps, "soft_weight": soft_weight, "temperature": temperature,
              "lr": lr, "batch_size": batch_size}
    settings = StudentsSettings(teacher=str(teacher), data=data, candidates=tuple(names),
                                latency_budget_ms=latency_budget_ms, proxy_epochs=proxy_epochs,
                                proxy_steps=proxy_steps, soft_weight=soft_weight,
                                temperature=temperature, lr=lr, batch_size=batch_size)
    res = run_stage("students", out, settings, "compress students", config, seed=seed,
                    overwrite=overwrite, manifest_data=("train", "val"))
    print_table(res.table(), f"candidates (teacher {res.teacher['latency_ms']:.2f} ms)")
    console.print(f"chosen: {res.chosen}; written to {out}")
