"""What the served CAM output costs (issue T, item 1): DenseNet121 at 224 px, batch 1, dense and
structurally pruned, on every served runtime variant this machine builds.

For each (model, variant) the variant is built twice, as ``compress deploy`` builds it: the
logits-only artifact and the artifact with the second output ``cam`` (deploy's own
:func:`medscalpel.deploy.cam.explain_variant`). Reported per row, as deploy stores it:

- ``latency_cost``: batch-1 latency of a PREDICTION on the artifact with the CAM output (the
  runtime runs its logits-only subgraph) / the logits-only artifact - 1, the median of per-round
  ratios from ONE alternated run (``--rounds`` rounds, the three calls' order rotated every
  round) with the order-statistic interval; outcome ``pass`` when the whole interval is <= 5 %,
  ``fail`` when it is all above, else ``undecided``;
- ``maps_latency_cost``: the same for a call that returns the logits AND the maps (the whole
  graph), from the same run;
- the CAM's equivalence to pytorch-grad-cam's Grad-CAM in torch fp32 (max |delta| of [0, 1]
  maps), and the served CAM's Spearman rank agreement with the torch fp32 CAM (bf16 / int8 are
  not bit-equal: their rank agreement is the statement).

The models are the bulk benchmark's (:mod:`bulk_bench`): RANDOM-INIT weights (speed does not
depend on training; the CAM agreement numbers are for these weights, not a trained model's).
Images: seeded random 224 px inputs.

    nice -n 10 .venv/bin/python benchmarks/cam_cost_bench.py [--rounds 9] > /tmp/cam_cost.log 2>&1

writes benchmarks/results/cam_cost.json and cam_cost.md (after every row, ``complete`` marks
whether every planned row ran).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bulk_bench import SERVED, SIZE, build_models  # noqa: E402
from common import RESULTS, save_result  # noqa: E402

from medscalpel.deploy.cam import (CAM_COST_TARGET, explain_variant,  # noqa: E402
                                   prediction_graph_identity)
from medscalpel.deploy.cam_head import CamHead  # noqa: E402
from medscalpel.deploy.runtimes import RUNTIMES  # noqa: E402
from medscalpel.models.checkpoint import load_model  # noqa: E402
from medscalpel.runs import cpu_info  # noqa: E402


def _runtime(name: str, threads: int, work: Path) -> tuple[Any, Path | None, dict[str, Any]]:
    """A fresh runtime of variant ``name`` and an empty work folder for it, or the reason it
    cannot run here (then the folder is None)."""
    rt = RUNTIMES.create(name, threads=threads)
    why = rt.available()
    if why:
        return rt, None, {"status": "unavailable", "reason": why}
    wd = work / name.replace(":", "_")
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    return rt, wd, {}


def _row(model, name: str, images: torch.Tensor, calib: torch.Tensor, work: Path,
         threads: int, rounds: int, repeats: int, warmup: int) -> dict[str, Any]:
    rt, wd, refused = _runtime(name, threads, work)
    if wd is None:
        return refused
    t0 = time.perf_counter()
    try:
        rt.prepare(model, images[:1], calib, wd / "plain")
        with torch.inference_mode():
            ref = model(images).numpy()
        cam_rt, info = explain_variant(rt, model, images, ref, calib, wd / "cam", threads,
                                       rounds, repeats, warmup)
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    info["build_and_measure_seconds"] = round(time.perf_counter() - t0, 1)
    return info


def _graphs_row(model, name: str, images: torch.Tensor, calib: torch.Tensor, work: Path,
                threads: int) -> dict[str, Any]:
    """``--graphs-only``: build the logits-only and the CAM artifact and compare what a
    prediction executes (:func:`prediction_graph_identity`), without timing."""
    rt, wd, refused = _runtime(name, threads, work)
    if wd is None:
        return refused
    try:
        rt.prepare(model, images[:1], calib, wd / "plain")
        cam = RUNTIMES.create(name, threads=threads)
        cam.prepare(CamHead(model).eval(), images[:1], calib, wd / "cam")
        x = images.numpy()
        with torch.inference_mode():
            ref = model(images).numpy()
        pred, whole = cam.run(x), cam.run_outputs(x)[0]
        scale = max(float(np.abs(ref).max()), 1e-6)
        return {**prediction_graph_identity(rt, cam),
                "prediction_vs_whole_graph_max_abs_delta": float(np.abs(pred - whole).max()),
                "prediction_vs_logits_only_max_abs_delta": float(np.abs(pred - rt.run(x)).max()),
                "logit_scale": scale}
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def markdown(res: dict[str, Any], config: dict[str, Any]) -> str:
    lines = ["# Latency cost of the served CAM output (cam_cost.json)", "",
             f"DenseNet121 at {SIZE} px, random init, batch 1, {config['threads']} runtime "
             f"threads, {config['rounds']} alternated rounds x {config['repeats']} calls; CPU: "
             f"{res['cpu']}. Load average at start / end: {res.get('load_start')} / "
             f"{res.get('load_end')}. Complete: {res['complete']}.", "",
             "A prediction on the CAM artifact runs its logits-only subgraph; 'maps' is a call "
             "returning logits and maps (the whole graph). Both are against the logits-only "
             "artifact, in one alternated run; outcome: pass when the whole interval is <= "
             f"{CAM_COST_TARGET:.0%}, fail when all of it is above, else undecided.", "",
             "| model | variant | logits-only ms | prediction ms | prediction cost [interval] | "
             "outcome | maps ms | maps cost [interval] | outcome | prediction vs whole-graph "
             "logits max abs delta | CAM vs Grad-CAM fp32 max abs delta | "
             "served vs fp32 CAM Spearman (median / min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cost(c: dict[str, Any]) -> tuple[str, str]:
        return (f"{c['cost']:+.1%} [{c['low']:+.1%}, {c['high']:+.1%}]",
                f"{c['outcome']}{' (noisy)' if c['noisy'] else ''}")

    for key, r in res["rows"].items():
        m, v = key.split(" ", 1)
        lc, mc = r.get("latency_cost"), r.get("maps_latency_cost")
        if not lc or not mc:
            lines.append(f"| {m} | {v} | - | - | - | {r.get('status')}: "
                         f"{str(r.get('reason', ''))[:80]} | - | - | - | - | - | - |")
            continue
        ge = (r.get("gradcam_equivalence") or {}).get("max_abs_delta")
        sv = r.get("served_vs_torch_fp32") or {}
        pp = (r.get("prediction_path") or {}).get("max_abs_delta_vs_whole_graph")
        lines.append(
            f"| {m} | {v} | {lc['plain_ms']:.2f} | {lc['cam_ms']:.2f} | {cost(lc)[0]} | "
            f"{cost(lc)[1]} | {mc['cam_ms']:.2f} | {cost(mc)[0]} | {cost(mc)[1]} | "
            f"{'-' if pp is None else f'{pp:.1e}'} | {'-' if ge is None else f'{ge:.2e}'} | "
            f"{sv.get('median_spearman', float('nan')):.3f} / "
            f"{sv.get('min_spearman', float('nan')):.3f} |")
    for label, k in (("predictions", "latency_cost"), ("calls returning maps",
                                                        "maps_latency_cost")):
        outs = [r[k]["outcome"] for r in res["rows"].values() if r.get(k)]
        lines += ["", f"Outcomes for {label}: " + ", ".join(
            f"{o} {outs.count(o)}" for o in ("pass", "undecided", "fail")) + f" of {len(outs)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/medscalpel_bulk_bench")
    ap.add_argument("--models", nargs="+", default=["dense", "pruned"])
    ap.add_argument("--variants", nargs="+", default=SERVED)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--name", default="cam_cost")
    ap.add_argument("--graphs-only", action="store_true",
                    help="only compare what a prediction executes (no timing) -> NAME_graphs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    models = build_models(work, args.ratio)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, SIZE, SIZE, generator=g)
    calib = torch.rand(16, 1, SIZE, SIZE, generator=g)
    config = {**{k: v for k, v in vars(args).items()}, "size": SIZE,
              "cam_cost_target": CAM_COST_TARGET,
              "command": "nice -n 10 .venv/bin/python benchmarks/cam_cost_bench.py " +
                         " ".join(sys.argv[1:])}
    c = cpu_info()
    res: dict[str, Any] = {"cpu": f"{c.get('model', '?')} ({c.get('logical_cpus')} logical CPUs"
                                  f"; {', '.join(c.get('features', []))})",
                           "models": models, "rows": {}, "complete": False,
                           "load_start": [round(x, 2) for x in os.getloadavg()]}
    if args.graphs_only:
        name = f"{args.name}_graphs"
        for mname in args.models:
            model = load_model(Path(models[mname]["dir"])).eval()
            for v in args.variants:
                res["rows"][f"{mname} {v}"] = _graphs_row(model, v, images, calib,
                                                          work / "cam_graphs", args.threads)
                print(f"{mname} {v}: {res['rows'][f'{mname} {v}']}", flush=True)
                save_result(name, res, config)
        res["complete"] = len(res["rows"]) == len(args.models) * len(args.variants)
        save_result(name, res, config)
        return
    for mname in args.models:
        model = load_model(Path(models[mname]["dir"])).eval()
        for v in args.variants:
            print(f"{mname} {v} ...", flush=True)
            try:
                res["rows"][f"{mname} {v}"] = _row(model, v, images, calib, work / "cam_cost",
                                                   args.threads, args.rounds, args.repeats,
                                                   args.warmup)
            except Exception as exc:  # noqa: BLE001 - a variant this machine cannot build
                res["rows"][f"{mname} {v}"] = {"status": "failed",
                                               "reason": f"{type(exc).__name__}: {exc}"}
            row = res["rows"][f"{mname} {v}"]
            print(f"{mname} {v}: {row.get('latency_cost')} | {row.get('maps_latency_cost')}",
                  flush=True)
            res["load_end"] = [round(x, 2) for x in os.getloadavg()]
            save_result(args.name, res, config)
            (RESULTS / f"{args.name}.md").write_text(markdown(res, config))
    res["complete"] = len(res["rows"]) == len(args.models) * len(args.variants)
    save_result(args.name, res, config)
    (RESULTS / f"{args.name}.md").write_text(markdown(res, config))


if __name__ == "__main__":
    main()
