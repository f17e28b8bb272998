"""Bulk inference benchmark (issue 31, item 3): images/s and peak memory of ``medscalpel
predict`` on a folder of 224 px images through the bulk path (decoding worker processes,
whole batches, logits streamed to disk), for a dense and a structurally pruned DenseNet121,
torch eager vs every served variant ``compress deploy`` builds on this machine.

Nothing is trained: random-init weights run at the same speed as trained ones. The images are
seeded random 224 px greyscale PNGs written once to ``--work``. Each (model, variant, n) runs
in its own fresh process (``one``), so its peak RSS is its own: the process's ``VmHWM``
(its resident high-water mark; ``ru_maxrss`` is not used because a child started from a large
parent inherits the parent's value), the largest decoding worker's ``VmHWM``, and the sum of
the RSS of the whole process tree sampled every 50 ms (an upper bound: forked workers share
pages with the parent).

    nice -n 10 .venv/bin/python benchmarks/bulk_bench.py --n 1000 4000 > /tmp/bulk.log 2>&1

writes ``benchmarks/results/bulk.json`` (after every run, so a stopped run leaves its partial
numbers, marked ``complete: false``) and ``benchmarks/results/bulk.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_result  # noqa: E402

from medscalpel.deploy.flow import DEFAULT_VARIANTS  # noqa: E402
from medscalpel.deploy.serve import serve_metadata, write_serve  # noqa: E402
from medscalpel.compress.measure import count_macs, count_parameters  # noqa: E402
from medscalpel.deploy.runtimes import RUNTIMES, cpu_features  # noqa: E402
from medscalpel.deploy.served import load_any  # noqa: E402
from medscalpel.compress.structured import prune_structured  # noqa: E402
from medscalpel.data import Preprocess  # noqa: E402
from medscalpel.engine.api import predict_spec  # noqa: E402
from medscalpel.engine.bulk import BulkSettings  # noqa: E402
from medscalpel.engine.train import seed_everything  # noqa: E402
from medscalpel.models import create_model, load_model, make_card, save_model  # noqa: E402
from medscalpel.runs import cpu_info, write_text  # noqa: E402

SIZE = 224
CLASSES = [f"finding_{i}" for i in range(14)]
SERVED = [v for v in DEFAULT_VARIANTS if not v.startswith("torch")]


# ----------------------------------------------------------------------------- preparation
def write_images(folder: Path, n: int, start: int = 0) -> None:
    """Seeded random greyscale PNGs (a smooth field plus noise, like an X-ray's texture)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, n):
        p = folder / f"img{i:06d}.png"
        if p.is_file():
            continue
        rng = np.random.default_rng(i)
        low = rng.random((14, 14))
        img = np.kron(low, np.ones((16, 16))) * 180 + rng.normal(0, 20, (SIZE, SIZE))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)


def image_folder(work: Path, n: int) -> Path:
    """``work/images_<n>``: hard links to the first ``n`` of the shared image pool."""
    pool = work / "pool"
    write_images(pool, n)
    folder = work / f"images_{n}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        dst = folder / f"img{i:06d}.png"
        if not dst.exists():
            os.link(pool / dst.name, dst)
    return folder


def build_models(work: Path, ratio: float) -> dict[str, Any]:
    """Dense and pruned random-init DenseNet121 model directories (+ MACs / params)."""
    info: dict[str, Any] = {}
    seed_everything(0)
    pre = Preprocess(size=SIZE)
    x = torch.rand(4, 1, SIZE, SIZE)
    dense_dir, pruned_dir = work / "models" / "dense", work / "models" / "pruned"
    if not (dense_dir / "model.json").is_file():
        m = create_model("densenet121", len(CLASSES), 1, SIZE).eval()
        m.card = make_card(m, CLASSES, "multilabel", pre)
        save_model(m, dense_dir, m.card)
    dense = load_model(dense_dir).eval()
    if not (pruned_dir / "model.json").is_file():
        res = prune_structured(dense, x, "l1", ratio=ratio, round_to=16, measure_latency=False,
                               progress=False)
        save_model(res.model, pruned_dir, res.model.card)
    pruned = load_model(pruned_dir).eval()
    for name, m in (("dense", dense), ("pruned", pruned)):
        info[name] = {"dir": str(work / "models" / name), "macs": count_macs(m, x[:1]),
                      "params": count_parameters(m)}
    info["pruned"]["macs_reduction"] = info["dense"]["macs"] / info["pruned"]["macs"]
    info["pruned"]["prune"] = {"criterion": "l1", "ratio": ratio, "round_to": 16}
    return info


def build_variant(model_dir: Path, name: str, dest: Path, calib: torch.Tensor,
                  threads: int) -> dict[str, Any]:
    """A serve/ folder for runtime variant ``name`` written by deploy's own writer, with its
    parity (max |delta logit| vs the torch model on the calibration images)."""
    if (dest / "serve.json").is_file():
        return json.loads((dest / "build.json").read_text())
    model = load_model(model_dir).eval()
    rt = RUNTIMES.create(name, threads=threads)
    why = rt.available()
    if why:
        return {"status": "unavailable", "reason": why}
    t0 = time.perf_counter()
    rt.prepare(model, calib[:1], calib, dest.parent / f"work_{name.replace(':', '_')}")
    with torch.inference_mode():
        ref = model(calib).numpy()
    got = rt.run(calib.numpy())
    files = write_serve(dest, model, types.SimpleNamespace(rt=rt), (1, SIZE, SIZE))
    variant = types.SimpleNamespace(runtime=rt.runtime, precision=rt.precision, name=rt.name,
                                    info=rt.info)
    (dest / "serve.json").write_text(json.dumps(serve_metadata(model, (1, SIZE, SIZE), variant,
                                                               files)))
    info = {"status": "built", "build_seconds": round(time.perf_counter() - t0, 1),
            "parity_max_abs_delta_logit": float(np.abs(got - ref).max()),
            "logit_scale": float(np.abs(ref).max()), "n_calib": int(calib.shape[0])}
    (dest / "build.json").write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------- one run
def tree_rss(proc, hwm: dict[int, int]) -> int:
    """Sum of the RSS of ``proc`` and its children; records each child's VmHWM in ``hwm``."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
            if p.pid != proc.pid:
                hwm[p.pid] = max(hwm.get(p.pid, 0), vm_hwm(p.pid))
        except Exception:  # noqa: BLE001 - a worker that just exited
            pass
    return total


def vm_hwm(pid: int | str = "self") -> int:
    """Peak resident set (``VmHWM``) of a process in bytes, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_one(args) -> None:
    """One (model, variant, n) in this fresh process; prints one JSON line."""
    import psutil

    proc = psutil.Process()
    peak = {"tree": 0}
    hwm: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["tree"] = max(peak["tree"], tree_rss(proc, hwm))
            stop.wait(0.05)

    m = load_any(args.model, threads=args.threads)
    loaded_rss = proc.memory_info().rss
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    preds = predict_spec(m, str(args.images), None, progress=False,
                         bulk=BulkSettings(args.batch, args.workers, args.threads))
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    b = preds.meta["bulk"]
    print(json.dumps({
        "n": preds.n, "images_per_s": b["images_per_s"], "bulk_seconds": b["seconds"],
        "model_seconds": b["model_seconds"], "end_to_end_seconds": round(wall, 3),
        "rss_after_load_mb": round(loaded_rss / 2**20, 1),
        "peak_rss_self_mb": round(vm_hwm() / 2**20, 1),
        "peak_rss_largest_worker_mb": round(max(hwm.values(), default=0) / 2**20, 1),
        "peak_rss_tree_sum_mb": round(peak["tree"] / 2**20, 1),
        "bulk": b, "logits_finite": bool(np.isfinite(preds.logits).all())}))


# ----------------------------------------------------------------------------- driver
def save(out: dict[str, Any], config: dict[str, Any]) -> None:
    save_result(config["name"], out, config)
    write_text(RESULTS / f"{config['name']}.md", markdown(out, config))


def markdown(out: dict[str, Any], config: dict[str, Any]) -> str:
    lines = [f"# Bulk inference ({config['name']}.json)", "",
             f"DenseNet121 at {SIZE} px, random init, {len(CLASSES)} classes; `predict` bulk "
             f"path: batch {config['batch']}, {config['workers']} decoding worker(s), "
             f"{config['threads']} runtime threads; CPU: {out['cpu']}. Each row is one fresh "
             "process. Peak RSS: the process's own VmHWM; tree sum = process + workers "
             "sampled every 50 ms (over-counts pages shared by forked workers).",
             f"Complete (this run's plan): {out['complete']}. Not run of the plan: "
             f"{', '.join(out['not_run']) or 'none'}.",
             f"Scope: variants {config['variants']} at n={config['n']}; the fastest served "
             f"variant of each model ({out.get('fastest_served', {})}) also at "
             f"n={config.get('fastest_at')}. Not run: the rest of the issue's grid (every served "
             "variant at 1k, 4k and 16k images): each row runs alone on the 2 shared cores, and "
             "the dense torch eager row alone takes ~4 min per 1k images. Each variant is timed "
             "once, one after the other (no alternation, no spread): the machine's load moves "
             "every number; 1-minute load average at start / end: "
             f"{out.get('loadavg', {}).get('start', 'not recorded')} / "
             f"{out.get('loadavg', {}).get('end', 'not recorded')}.", "",
             "| model | variant | n | images/s | x torch eager (same n) | peak RSS self MB | "
             "peak RSS tree sum MB |", "|---|---|---|---|---|---|---|"]
    for r in out["runs"]:
        ref = next((e for e in out["runs"] if e["model"] == r["model"] and e["n"] == r["n"]
                    and e["variant"] == "torch:fp32" and "images_per_s" in e), None)
        ratio = (f"{r['images_per_s'] / ref['images_per_s']:.2f}" if ref and "images_per_s" in r
                 else "-")
        lines.append(f"| {r['model']} | {r['variant']} | {r['n']} | {r.get('images_per_s', r.get('error', '-'))} "
                     f"| {ratio} | {r.get('peak_rss_self_mb', '-')} | "
                     f"{r.get('peak_rss_tree_sum_mb', '-')} |")
    lines += ["", "## Targets", ""]
    for t in out.get("targets", []):
        lines.append(f"- {t}")
    return "\n".join(lines) + "\n"


def targets(out: dict[str, Any]) -> list[str]:
    """The two targets, met or not, from the runs made."""
    lines = []
    runs = [r for r in out["runs"] if "images_per_s" in r]
    for model in ("dense", "pruned"):
        for n in sorted({r["n"] for r in runs}):
            rows = [r for r in runs if r["model"] == model and r["n"] == n]
            ref = next((r for r in rows if r["variant"] == "torch:fp32"), None)
            served = [r for r in rows if r["variant"] != "torch:fp32"]
            if ref and served:
                best = max(served, key=lambda r: r["images_per_s"])
                x = best["images_per_s"] / ref["images_per_s"]
                lines.append(f"{model}, n={n}: fastest served {best['variant']} "
                             f"{best['images_per_s']:.1f} images/s = {x:.2f}x torch eager "
                             f"{ref['images_per_s']:.1f} images/s: target >= 3x "
                             f"{'MET' if x >= 3 else 'NOT MET'}")
    for model in ("dense", "pruned"):
        for v in sorted({r["variant"] for r in runs}):
            rows = sorted((r for r in runs if r["model"] == model and r["variant"] == v),
                          key=lambda r: r["n"])
            if len(rows) >= 2:
                a, b = rows[0], rows[-1]
                growth = b["peak_rss_self_mb"] - a["peak_rss_self_mb"]
                rel = growth / a["peak_rss_self_mb"]
                lines.append(f"{model} {v}: peak RSS self {a['peak_rss_self_mb']} MB at n={a['n']}"
                             f" -> {b['peak_rss_self_mb']} MB at n={b['n']} ({rel:+.1%}); flat "
                             f"(within 10%) {'MET' if abs(rel) <= 0.10 else 'NOT MET'}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", nargs="?", default="all", choices=["all", "one", "render"])
    ap.add_argument("--work", default="/tmp/medscalpel_bulk_bench")
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--models", nargs="+", default=["dense", "pruned"])
    ap.add_argument("--variants", nargs="+", default=["torch:fp32", *SERVED])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--name", default="bulk")
    ap.add_argument("--fastest-at", type=int, nargs="*", default=[],
                    help="also run the fastest served variant of each model at these n")
    # 'one'
    ap.add_argument("--model")
    ap.add_argument("--images")
    args = ap.parse_args()
    if args.cmd == "one":
        run_one(args)
        return
    if args.cmd == "render":   # rewrite NAME.md from NAME.json
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        write_text(RESULTS / f"{args.name}.md", markdown(saved["results"], saved["config"]))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config = {"name": args.name, "batch": args.batch, "workers": args.workers,
              "threads": args.threads, "n": args.n, "models": args.models,
              "variants": args.variants, "size": SIZE, "work": str(work),
              "fastest_at": args.fastest_at,
              "command": "nice -n 10 .venv/bin/python benchmarks/bulk_bench.py " +
                         " ".join(sys.argv[1:])}
    cpu = f"{cpu_info().get('model', '?')} ({cpu_info().get('logical_cpus')} logical CPUs; " \
          f"{', '.join(k for k, v in cpu_features().items() if v)})"
    planned = [(m, v, n) for n in args.n for m in args.models for v in args.variants]
    out: dict[str, Any] = {"cpu": cpu, "complete": False, "runs": [], "variants": {},
                           "not_run": [f"{m} {v} n={n}" for m, v, n in planned]}
    t0 = time.perf_counter()
    out["loadavg"] = {"start": round(os.getloadavg()[0], 2)}
    out["models"] = build_models(work, args.ratio)
    calib_ds = image_folder(work, 16)
    calib = _load_images(calib_ds, 16)
    for mname in args.models:
        for v in args.variants:
            if v.startswith("torch"):
                continue
            dest = work / "served" / mname / v.replace(":", "_") / "serve"
            try:
                out["variants"][f"{mname} {v}"] = build_variant(
                    Path(out["models"][mname]["dir"]), v, dest, calib, args.threads)
            except Exception as exc:  # noqa: BLE001 - a variant this machine cannot build
                out["variants"][f"{mname} {v}"] = {"status": "failed",
                                                   "reason": f"{type(exc).__name__}: {exc}"}
            print(f"built {mname} {v}: {out['variants'][f'{mname} {v}']}", flush=True)
    out["build_seconds"] = round(time.perf_counter() - t0, 1)
    save(out, config)
    for mname, v, n in planned:
        _run(out, config, work, mname, v, n, args)
    best = {}
    for mname in args.models:
        rows = [r for r in out["runs"] if r["model"] == mname and "images_per_s" in r
                and r["variant"] != "torch:fp32"]
        if rows:
            best[mname] = max(rows, key=lambda r: r["images_per_s"])["variant"]
            out["not_run"] += [f"{mname} {best[mname]} n={n}" for n in args.fastest_at]
    out["fastest_served"] = best
    for n in args.fastest_at:   # every model at the smaller n first
        for mname, v in best.items():
            _run(out, config, work, mname, v, n, args)
    out["loadavg"]["end"] = round(os.getloadavg()[0], 2)
    out["complete"] = not out["not_run"]
    out["targets"] = targets(out)
    save(out, config)


def _load_images(folder: Path, n: int) -> torch.Tensor:
    from medscalpel.data.io import read_image

    pre = Preprocess(size=SIZE)
    files = sorted(folder.iterdir())[:n]
    return torch.stack([pre(read_image(f)) for f in files])


def _run(out, config, work, mname, v, n, args) -> None:
    key = f"{mname} {v} n={n}"
    model_dir = (out["models"][mname]["dir"] if v.startswith("torch")
                 else str(work / "served" / mname / v.replace(":", "_") / "serve"))
    row: dict[str, Any] = {"model": mname, "variant": v, "n": n}
    if not v.startswith("torch") and out["variants"].get(f"{mname} {v}", {}).get(
            "status") != "built":
        row["error"] = "not built: " + str(out["variants"].get(f"{mname} {v}"))
    else:
        images = image_folder(work, n)
        cmd = [sys.executable, __file__, "one", "--model", model_dir, "--images", str(images),
               "--batch", str(args.batch), "--workers", str(args.workers),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            row["error"] = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr else "?"
    out["runs"].append(row)
    if key in out["not_run"]:
        out["not_run"].remove(key)
    out["targets"] = targets(out)
    print(json.dumps({k: row.get(k) for k in ("model", "variant", "n", "images_per_s",
                                              "peak_rss_self_mb", "peak_rss_tree_sum_mb",
                                              "error")}), flush=True)
    save(out, config)


if __name__ == "__main__":
    main()
