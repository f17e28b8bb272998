"""``medscalpel compress distill --student ofa``: one supernet, one subnet per latency budget
(a thin wrapper over :func:`medscalpel.compress.ofa.flow.distill_ofa`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from medscalpel.cli.common import console, fmt, print_table
from medscalpel.errors import ConfigError


def parse_budgets(text: str) -> tuple[float, ...]:
    """``"0.2,0.5"`` -> ``(0.2, 0.5)``; every budget a positive number of milliseconds."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ConfigError(f"--latency-budget must be a comma list of milliseconds, e.g. "
                          f"'0.2,0.5'; got {text!r}.") from exc
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ConfigError(f"--latency-budget must list positive milliseconds; got {text!r}.")
    return values


def parse_phase_epochs(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"--phase-epochs must be four integers 'largest,kernel,depth,width'; "
                          f"got {text!r}.") from exc
    if len(values) != 4 or values[0] < 1 or min(values) < 0:
        raise ConfigError(f"--phase-epochs must be four integers 'largest,kernel,depth,width' "
                          f"(largest >= 1, others >= 0); got {text!r}.")
    return values  # type: ignore[return-value]


def latency_spec(deploy_run: Path | None, runtime: str):
    """--runtime, else the runtime the deploy run chose, else ONNX Runtime fp32."""
    from medscalpel.compress.ofa.search import LatencySpec, latency_spec_from_deploy

    if runtime:
        return LatencySpec(runtime=runtime, source="--runtime")
    if deploy_run is not None:
        return latency_spec_from_deploy(deploy_run)
    return LatencySpec()


def run_ofa(teacher: str, data: str, train_ds, val_ds, test_ds, out: Path, budgets: str,
            deploy_run: Path | None, runtime: str, phase_epochs: str, search_subnets: int,
            lr: float, batch_size: int, soft_weight: float, temperature: float,
            max_steps_per_epoch: int | None, teacher_train, n_boot: int,
            saliency_images: int, saliency_method: str, saliency_classes, seed: int,
            device: str, overwrite: bool) -> None:
    from medscalpel.compress.ofa.flow import OFAConfig, distill_ofa
    from medscalpel.compress.ofa.search import SearchConfig
    from medscalpel.compress.ofa.train import OFATrainConfig
    from medscalpel.runs import RunDir

    b = parse_budgets(budgets)
    spec = latency_spec(deploy_run, runtime)
    cfg = OFAConfig(
        train=OFATrainConfig(phase_epochs=parse_phase_epochs(phase_epochs), lr=lr,
                             shrink_lr=lr / 2, batch_size=batch_size, soft_weight=soft_weight,
                             temperature=temperature, seed=seed,
                             max_steps_per_epoch=max_steps_per_epoch, device=device),
        search=SearchConfig(n_random=search_subnets, seed=seed), n_boot=n_boot,
        saliency_images=saliency_images, saliency_method=saliency_method,
        saliency_classes=saliency_classes, teacher_train=teacher_train).validate()
    config: dict[str, Any] = {"teacher": teacher, "student": "ofa", "data": data,
                              "latency_budgets_ms": list(b), "latency": spec.to_dict(),
                              **cfg.to_dict()}
    with RunDir(out, command="compress distill", config=config, seed=seed,
                data={"train": train_ds.content_hash(), "val": val_ds.content_hash(),
                      "test": test_ds.content_hash()}, overwrite=overwrite,
                resumable=True) as run:
        # per-phase, per-epoch supernet state: an interrupted run resumes when run again
        res = distill_ofa(teacher, train_ds, val_ds, test_ds, b, cfg, spec,
                          checkpoint_dir=run.path / "checkpoint")
        res.save(run.path)
    print_table(res.table(), f"teacher vs once-for-all subnets (test split, latency on "
                             f"{spec.runtime}, {spec.threads} thread(s))")
    for s in res.subnets:
        if s["met"]:
            sp = s["speed_vs_teacher"]
            final = "" if s["within_budget_final"] else (
                " [yellow](over the budget in the final alternated timing: "
                f"{fmt(s['latency_ms'], 3)} ms)[/yellow]")
            console.print(f"{s['label']}: {s['reason']}; test macro AUROC "
                          f"{fmt(s['test_auroc'])} (delta vs teacher {fmt(s['delta_auroc'])}, "
                          f"95% CI {fmt(s['delta_auroc_ci'][0])} .. "
                          f"{fmt(s['delta_auroc_ci'][1])}), x{fmt(sp['ratio'], 2)} vs the "
                          f"teacher ({sp['outcome']}){final}", highlight=False)
        else:
            console.print(f"[red]{s['label']}: NOT MET: {s['reason']}[/red]", highlight=False)
    console.print(f"supernet {res.supernet.supernet_id} (latency source: {spec.source}); "
                  f"written to {out}", highlight=False)
