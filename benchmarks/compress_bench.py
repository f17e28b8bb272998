"""Issue C benchmark: compression methods compared on one dense model per dataset.

For each dataset (the phantom at 64 px with densenet121, and Kermany pneumonia from
../shared/data) a dense model is trained once (seeded), then every method is applied with the
same recovery fine-tune budget and measured against it: parameters (stored and non-zero), MACs,
CPU latency speedup (dense and compressed timed alternately in the same run, batch 1 and 32),
delta macro AUROC with a paired bootstrap 95% CI, and max |delta logit| on the test split.

Methods: lossless folding (provable and empirical); tolerance mode (LASSO channel selection +
least-squares refit, no fine-tune) at 25/50/70% of the parameters; L1 unstructured (PruneCXR)
at 50/65/90% sparsity; Torch-Pruning magnitude (L2, the library default) and L1, BN scale,
Taylor, LRP and IG at ratios giving ~2x / 3x / 4x fewer MACs.

It runs in stages and resumes: every finished (dataset, method, setting) is a JSON file under
``--work`` (with the compressed model beside it) and is skipped on rerun. Stages: ``dense``,
``lossless``, ``tolerance``, ``unstructured``, ``structured``, ``latency``, ``export``,
``resolution`` (latency of chosen cells at 224 px), ``table`` (``all`` = the compute stages then the table). With ``--defer-latency`` the cells
skip timing (so datasets can run in parallel, one thread each); ``latency`` then re-times every
saved model against the dense one, alternated in one run, and ``export`` checks ONNX /
onnxruntime / int8 for ``--export-cells``: run both alone on an idle machine.

    .venv/bin/python benchmarks/compress_bench.py all --smoke            # minutes: tiny settings
    .venv/bin/python benchmarks/compress_bench.py structured --datasets kermany --epochs 8
    .venv/bin/python benchmarks/compress_bench.py latency                # idle machine
    .venv/bin/python benchmarks/compress_bench.py table                  # JSON + markdown table

Issue 20 (DL-Backtrace next to LRP / IG / L2, patient-wise Kermany split, rank agreement of the
three attributions' channel scores; results in benchmarks/results/backtrace.{json,md}):

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/compress_bench.py table \
        --stages dense,rankcorr,structured --datasets kermany \
        --criteria backtrace,lrp,ig,l2 --speedups 2,3,4 --epochs 2 --max-steps 12 \
        --recovery-epochs 1 --calib 16 --defer-latency --work runs/bench-backtrace \
        --patient-regex '^(person[0-9]*|IM-[0-9]*|NORMAL2-IM-[0-9]*)' --result-name backtrace
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_result  # noqa: E402

from medscalpel.compress.measure import count_macs, count_parameters, latency_pair  # noqa: E402
from medscalpel.data import Preprocess, open_dataset  # noqa: E402
from medscalpel.engine.compare import compare_predictions  # noqa: E402
from medscalpel.engine.metrics import auroc  # noqa: E402
from medscalpel.engine.predict import collect_images, predict  # noqa: E402
from medscalpel.engine.predictions import Predictions  # noqa: E402
from medscalpel.engine.train import TrainConfig, seed_everything, train  # noqa: E402
from medscalpel.models import create_model, load_model, make_card, save_model  # noqa: E402
from medscalpel.runs import read_json, write_json  # noqa: E402

KERMANY = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany-pneumonia" / "train"
CRITERIA = ("l2", "l1", "bn_scale", "taylor", "lrp", "ig", "backtrace")
SPARSITIES = (0.5, 0.65, 0.9)
SPEEDUPS = (2.0, 3.0, 4.0)
TOLERANCE_RATIOS = (0.25, 0.5, 0.7)


# ----------------------------------------------------------------------------- data / models
_CACHE: dict[str, tuple[Any, Any, Any]] = {}


def datasets(name: str, args) -> tuple[Any, Any, Any]:
    if name not in _CACHE:
        _CACHE[name] = _open_datasets(name, args)
    return _CACHE[name]


def _open_datasets(name: str, args) -> tuple[Any, Any, Any]:
    pre = Preprocess(size=args.size)
    if name == "phantom":
        spec = f"phantom?n={args.phantom_n}&size={args.size}"
    elif name == "kermany":
        if not KERMANY.is_dir():
            raise FileNotFoundError(f"{KERMANY} is absent")
        spec = f"folder:{KERMANY}?dedup=true"
        if args.patient_regex:  # '+' must be written %2B inside a spec string
            spec += "&patient_regex=" + args.patient_regex.replace("+", "%2B")
    else:
        raise SystemExit(f"unknown dataset {name}")
    tr, va, te = (open_dataset(spec, split=s, preprocess=pre) for s in ("train", "val", "test"))
    if args.smoke:  # small seeded subsets
        rng = np.random.default_rng(0)
        tr = tr.subset(sorted(rng.choice(len(tr), min(len(tr), 256), replace=False)))
        va = va.subset(sorted(rng.choice(len(va), min(len(va), 64), replace=False)))
        te = te.subset(sorted(rng.choice(len(te), min(len(te), 128), replace=False)))
    return tr, va, te


def arch_for(name: str, args) -> str:
    return args.arch or ("densenet_tiny" if args.smoke else "densenet121")


def cell_path(args, ds: str, stage: str, key: str) -> Path:
    return Path(args.work) / ds / stage / f"{key}.json"


def done(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return "results" in read_json(path)
    except Exception:  # noqa: BLE001 - a damaged cell is recomputed
        return False


def stage_dense(ds: str, args) -> None:
    out = Path(args.work) / ds / "dense"
    if (out / "model.json").is_file() and (out / "test_predictions.npz").is_file():
        return
    tr, va, te = datasets(ds, args)
    seed_everything(0)
    m = create_model(arch_for(ds, args), tr.num_classes, 1, args.size)
    m.card = make_card(m, tr.class_names, tr.task, tr.preprocess)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=1e-3, seed=0,
                      max_steps_per_epoch=args.max_steps)
    t0 = time.perf_counter()
    res = train(m, tr, va, config=cfg, checkpoint_dir=Path(args.work) / ds / "dense-ckpt")
    save_model(res.model, out)
    predict(res.model, te).save(out / "test_predictions.npz")
    write_json(out / "train.json", {**res.to_dict(), "wall_s": time.perf_counter() - t0})


# ----------------------------------------------------------------------------- measuring
def delta_auroc(ref: Predictions, new: Predictions, n_boot: int, seed: int = 0) -> dict:
    """Macro AUROC difference (new - ref) with a paired bootstrap 95% CI over images."""
    y = ref.targets()
    pr, pn = ref.probs(), new.probs()
    cols = [j for j in range(y.shape[1]) if 0 < np.nansum(y[:, j]) < np.isfinite(y[:, j]).sum()]

    def macro(rows):
        a = [auroc(y[rows, j] > 0.5, pr[rows, j]) for j in cols]
        b = [auroc(y[rows, j] > 0.5, pn[rows, j]) for j in cols]
        return float(np.nanmean(a)), float(np.nanmean(b))

    a0, b0 = macro(np.arange(ref.n))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        rows = rng.integers(0, ref.n, ref.n)
        a, b = macro(rows)
        boots.append(b - a)
    ci = [float(np.nanquantile(boots, 0.025)), float(np.nanquantile(boots, 0.975))] if boots \
        else [float("nan")] * 2
    return {"auroc_dense": a0, "auroc": b0, "delta": b0 - a0, "delta_ci95": ci}


def nonzero(model) -> int:
    """Parameters that are not exactly zero (what unstructured sparsity removes)."""
    return int(sum(int((p != 0).sum()) for p in model.parameters()))


def latencies(dense, model, te, args) -> dict:
    """CPU latency of dense and compressed, alternated in the same run, at batch 1 and 32."""
    x = collect_images(te, 1)[0]
    lat = latency_pair(dense, model, x, batch_size=1, warmup=3, repeats=args.repeats, rounds=3)
    x32 = collect_images(te, 32)[0]
    lat32 = latency_pair(dense, model, x32, batch_size=32, warmup=2,
                         repeats=max(3, args.repeats // 2), rounds=3)
    return {"latency_ms": lat["b_ms"], "latency_dense_ms": lat["a_ms"],
            "cpu_speedup": lat["ratio"],
            "latency_b32_ms": lat32["b_ms"], "latency_b32_dense_ms": lat32["a_ms"],
            "cpu_speedup_b32": lat32["ratio"], "latency_threads": torch.get_num_threads()}


def measure(dense, model, te, dense_preds: Predictions, args, extra: dict) -> dict:
    x = collect_images(te, 1)[0]
    preds = predict(model, te, progress=False)
    lat = {} if args.defer_latency else latencies(dense, model, te, args)
    return {"params": count_parameters(model), "params_dense": count_parameters(dense),
            "nonzero": nonzero(model), "nonzero_dense": nonzero(dense),
            "macs": count_macs(model, x), "macs_dense": count_macs(dense, x), **lat,
            "max_abs_delta_logit": float(np.abs(preds.logits - dense_preds.logits).max()),
            **delta_auroc(dense_preds, preds, args.n_boot), **paired(dense_preds, preds, args),
            **extra}


def paired(ref: Predictions, new: Predictions, args) -> dict:
    """engine.compare's paired bootstrap (macro dAUROC / dAP / dSens / dSpec with CIs) and
    whether the compressed model keeps macro AUROC within 0.005 of dense (the issue's floor)."""
    cmp = compare_predictions(ref, new, n_boot=args.n_boot, seed=0)
    ok, reasons = cmp.meets_floor(macro=-0.005, per_class=-0.01)
    return {"paired_macro": cmp.macro, "meets_floor_0.005": ok, "floor_reasons": reasons,
            "n_test": cmp.n}


def recovery_cfg(args):
    from medscalpel.compress.structured import RecoveryConfig

    return RecoveryConfig(epochs=args.recovery_epochs, lr=5e-4, batch_size=args.batch,
                          max_steps_per_epoch=args.max_steps, seed=0)


def load_dense(ds: str, args):
    d = Path(args.work) / ds / "dense"
    if not (d / "model.json").is_file():
        raise SystemExit(f"run the 'dense' stage for {ds} first")
    return load_model(d), Predictions.load(d / "test_predictions.npz")


def cell_inputs(ds: str, args) -> tuple:
    """A fresh dense model (reloaded per cell, so that no method can alter the next one's
    starting point), its test predictions and the three splits."""
    return (*load_dense(ds, args), *datasets(ds, args))


def save_cell(path: Path, config: dict, results: dict, t0: float, model=None) -> None:
    """One finished cell: its JSON, and the compressed model beside it (for the latency pass)."""
    if model is not None:
        save_model(model, model_dir(path))
    write_json(path, {"config": config, "results": results,
                      "wall_s": round(time.perf_counter() - t0, 2)})


def model_dir(path: Path) -> Path:
    return path.parent / path.stem


# ----------------------------------------------------------------------------- stages
def stage_lossless(ds: str, args) -> None:
    """Provable folding (no data) and empirical folding (dead / constant / linearly dependent
    channels found on calibration images, verified on held-out ones within 1e-5)."""
    from medscalpel.compress import lossless
    from medscalpel.errors import MedScalpelError

    for key, mode, n_calib in (("exact", "provable", args.calib),
                               ("empirical", "empirical", args.lossless_calib)):
        path = cell_path(args, ds, "lossless", key)
        if done(path):
            continue
        t0 = time.perf_counter()
        dense, dp, tr, va, te = cell_inputs(ds, args)
        calib = collect_images(tr, n_calib)[0]
        held = collect_images(va, min(len(va), args.calib))[0]
        try:
            res = lossless.fold_lossless(dense, calib, held, mode=mode, latency=False,
                                         progress=False)
        except MedScalpelError as exc:  # verification refused: recorded, not hidden
            write_json(path.with_suffix(".error.json"), {"mode": mode, "error": str(exc)})
            continue
        save_cell(path, {"method": "lossless", "mode": mode, "calib_images": n_calib},
                  measure(dense, res.model, te, dp, args,
                          {"method": f"lossless ({mode})", "report": res.to_dict()}),
                  t0, res.model)


def stage_tolerance(ds: str, args) -> None:
    """Tolerance mode: LASSO channel selection + least-squares refit (He et al. 2017) to a
    parameter budget, no fine-tune (the reconstruction is the whole method)."""
    from medscalpel.compress.reconstruct import compress_with_tolerance

    for r in args.tolerance_ratios:
        path = cell_path(args, ds, "tolerance", f"ratio-{r:.2f}")
        if done(path):
            continue
        t0 = time.perf_counter()
        dense, dp, tr, va, te = cell_inputs(ds, args)
        calib = collect_images(tr, args.tolerance_calib)[0]
        held = collect_images(va, min(len(va), args.calib))[0]
        res = compress_with_tolerance(dense, calib, held, r, latency=False, progress=False)
        rep = res.report
        save_cell(path, {"method": "tolerance", "target_ratio": r,
                         "calib_images": args.tolerance_calib, "recovery_epochs": 0},
                  measure(dense, res.model, te, dp, args,
                          {"method": f"tolerance {r:.0%} params",
                           "achieved_ratio": rep.achieved_ratio,
                           "keep_fraction": rep.keep_fraction}), t0, res.model)


def stage_unstructured(ds: str, args) -> None:
    from medscalpel.compress.sweep import global_unstructured_prune, remove_masks

    for s in SPARSITIES:
        path = cell_path(args, ds, "unstructured", f"l1-{s:.2f}")
        if done(path):
            continue
        t0 = time.perf_counter()
        dense, dp, tr, va, te = cell_inputs(ds, args)
        keep = args.recovery_epochs > 0
        m = global_unstructured_prune(dense, s, "l1", keep_masks=keep)
        if keep:
            rc = recovery_cfg(args)
            m = train(m, tr, va, config=TrainConfig(epochs=rc.epochs, lr=rc.lr,
                                                    batch_size=rc.batch_size,
                                                    max_steps_per_epoch=rc.max_steps_per_epoch),
                      inplace=True, progress=False).model
            remove_masks(m)
        save_cell(path, {"method": "l1-unstructured", "sparsity": s,
                         "recovery_epochs": args.recovery_epochs},
                  measure(dense, m, te, dp, args, {"method": f"L1 unstructured {s:.0%}"}), t0, m)


def stage_structured(ds: str, args) -> None:
    from medscalpel.compress.structured import prune_structured
    from medscalpel.errors import MedScalpelError

    for sp in args.speedups:  # speedup outer: every criterion's 2x cell comes first
        for crit in args.criteria:
            path = cell_path(args, ds, "structured", f"{crit}-x{sp:g}")
            if done(path):
                continue
            t0 = time.perf_counter()
            dense, dp, tr, va, te = cell_inputs(ds, args)
            calib = collect_images(tr, args.calib)[0]
            try:
                res = prune_structured(dense, calib, crit, target_speedup=sp,
                                       iterative_steps=args.steps, recovery=recovery_cfg(args),
                                       train_ds=tr, val_ds=va, measure_latency=False,
                                       progress=False)
            except MedScalpelError as exc:
                write_json(path.with_suffix(".error.json"), {"error": str(exc)})
                continue
            save_cell(path, {"method": "structured", "criterion": crit, "target_speedup": sp,
                             "steps": args.steps, "recovery_epochs": args.recovery_epochs},
                      measure(dense, res.model, te, dp, args,
                              {"method": f"{crit} x{sp:g}", "ratio": res.ratio,
                               "speedup_macs": res.speedup_macs}), t0, res.model)


RANK_METHODS = ("backtrace", "lrp", "ig")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


def stage_rankcorr(ds: str, args) -> None:
    """How alike the three attributions rank channels on the dense model: channel relevance
    (``channel_relevance``, the scores the lrp / ig / backtrace pruning criteria use, every
    class of every calibration image, |relevance| summed, normalised per layer) of every Conv /
    BN layer, then per layer Spearman's rho between methods and the overlap of the lowest-scored
    half (what a ~2x prune of that layer would remove)."""
    from medscalpel.explain.relevance import channel_relevance

    path = cell_path(args, ds, "rankcorr", "dense")
    if path.is_file():
        return
    t0 = time.perf_counter()
    dense, _, tr, _, _ = cell_inputs(ds, args)
    calib = collect_images(tr, args.calib)[0]
    layers = [n for n, m in dense.named_modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.modules.batchnorm._BatchNorm))]
    scores, wall = {}, {}
    for meth in RANK_METHODS:
        t1 = time.perf_counter()
        cr = channel_relevance(dense, calib, None, method=meth, layers=layers,
                               batch_size=16, progress=False)
        wall[meth] = round(time.perf_counter() - t1, 2)
        scores[meth] = {k: v.double().numpy() for k, v in cr.scores.items()}
    pairs = {}
    for i, a in enumerate(RANK_METHODS):
        for b in RANK_METHODS[i + 1:]:
            rhos, overlaps = [], []
            for n in layers:
                sa, sb = scores[a].get(n), scores[b].get(n)
                if sa is None or sb is None or sa.size < 4:
                    continue
                rhos.append(_spearman(sa, sb))
                half = sa.size // 2
                low_a, low_b = set(np.argsort(sa)[:half]), set(np.argsort(sb)[:half])
                overlaps.append(len(low_a & low_b) / max(1, half))
            r = np.array([x for x in rhos if np.isfinite(x)])
            pooled_a = np.concatenate([scores[a][n] for n in layers if n in scores[a]])
            pooled_b = np.concatenate([scores[b][n] for n in layers if n in scores[b]])
            pairs[f"{a}~{b}"] = {
                "layers": int(r.size), "spearman_median": float(np.median(r)),
                "spearman_mean": float(r.mean()), "spearman_q10": float(np.quantile(r, 0.1)),
                "spearman_q90": float(np.quantile(r, 0.9)),
                "spearman_pooled": _spearman(pooled_a, pooled_b),
                "low_half_overlap_mean": float(np.mean(overlaps))}
    write_json(path, {"calib_images": int(calib.shape[0]), "targets": "every class",
                      "layers": len(layers), "relevance_wall_s": wall, "pairs": pairs,
                      "wall_s": round(time.perf_counter() - t0, 2)})


def stage_latency(ds: str, args) -> None:
    """Re-measure every cell's CPU latency against the dense model (alternated, same run) from
    the saved models: run it alone on an idle machine after cells computed in parallel."""
    cells = [p for p in sorted((Path(args.work) / ds).glob("*/*.json"))
             if p.parent.name in STAGES and not p.name.endswith(".error.json")
             and model_dir(p).is_dir()]
    if not cells:
        return
    dense, _ = load_dense(ds, args)
    _, _, te = datasets(ds, args)
    for p in cells:
        d = read_json(p)
        if d["results"].get("latency_pass") == args.latency_tag:
            continue
        model = load_model(model_dir(p))
        d["results"].update(latencies(dense, model, te, args), latency_pass=args.latency_tag)
        write_json(p, d)
        print(f"{p.relative_to(args.work)}: b1 x{d['results']['cpu_speedup']:.2f}, "
              f"b32 x{d['results']['cpu_speedup_b32']:.2f}", file=sys.stderr)


def stage_resolution(ds: str, args) -> None:
    """CPU latency of chosen cells' architectures at a larger input (``--res-size``, default
    224 px, the clinical input of CheXNet) against the dense one, alternated in one run, at
    batch 1 and 8. Latency only: the models were trained at ``--size``, so no accuracy is
    claimed at this size. Answers whether the MACs cut turns into CPU speedup once compute, not
    per-layer overhead, dominates. Run alone on an idle machine."""
    dense, _ = load_dense(ds, args)
    _, _, te = datasets(ds, args)
    chans = collect_images(te, 1)[0].shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, chans, args.res_size, args.res_size, generator=g)
    for key in args.res_cells:
        cell = cell_path(args, ds, *key.split("/"))
        if not model_dir(cell).is_dir():
            print(f"[skip] resolution {ds}/{key}: no saved model", file=sys.stderr)
            continue
        d = read_json(cell)
        tag = str(args.res_size)
        if tag in d["results"].get("latency_at_size", {}):
            continue
        model = load_model(model_dir(cell))
        with torch.no_grad():
            b1 = latency_pair(dense, model, x[:1], batch_size=1, warmup=2, repeats=5, rounds=3)
            b8 = latency_pair(dense, model, x, batch_size=8, warmup=1, repeats=3, rounds=3)
        d["results"].setdefault("latency_at_size", {})[tag] = {
            "macs": count_macs(model, x[:1]), "macs_dense": count_macs(dense, x[:1]),
            "b1": b1, "b8": b8, "threads": torch.get_num_threads()}
        write_json(cell, d)
        print(f"{ds}/{key} at {tag} px: b1 x{b1['ratio']:.2f}, b8 x{b8['ratio']:.2f}",
              file=sys.stderr)


def stage_export(ds: str, args) -> None:
    """Deployment check of chosen cells: ONNX export, onnxruntime parity and batch-1/32
    latency of torch and onnxruntime against the dense model (same run), int8 (dynamic) with
    its delta macro AUROC on the test split. Run alone on an idle machine."""
    from medscalpel.deploy.export import export_onnx

    dense, _ = load_dense(ds, args)
    _, _, te = datasets(ds, args)
    for key in args.export_cells:
        cell = cell_path(args, ds, *key.split("/"))
        out = cell_path(args, ds, "export", key.replace("/", "-"))
        if done(out):
            continue
        if not model_dir(cell).is_dir():
            print(f"[skip] export {ds}/{key}: no saved model at {model_dir(cell)}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        model = load_model(model_dir(cell))
        res = export_onnx(model, out.with_suffix(".onnx"), batch_sizes=(1, 32), reference=dense,
                          dataset=te, quantize="dynamic", repeats=args.repeats)
        write_json(out, {"cell": key, "results": res.to_dict(),
                         "wall_s": round(time.perf_counter() - t0, 2)})
        print(f"{ds}/{key}: {res.speedup}", file=sys.stderr)


STAGES = ("lossless", "tolerance", "unstructured", "structured")


def _order(row: dict) -> tuple:
    crit = row["config"].get("criterion", "")
    return (row["dataset"], STAGES.index(row["stage"]),
            CRITERIA.index(crit) if crit in CRITERIA else -1, row["macs_speedup"],
            row["nonzero_removed"])


def stage_table(args) -> None:
    rows, dense, exports, at_size = [], {}, [], []
    work = Path(args.work)
    for p in sorted(work.glob("*/*/*.json")):
        if p.parent.name not in STAGES or p.name.endswith(".error.json"):
            continue
        d = read_json(p)
        r = d["results"]
        rows.append({"dataset": p.parent.parent.name, "stage": p.parent.name,
                     "method": r["method"], "params": r["params"],
                     "params_removed": 1 - r["params"] / r["params_dense"],
                     "nonzero_removed": 1 - r["nonzero"] / r["nonzero_dense"],
                     "macs_speedup": r["macs_dense"] / max(1, r["macs"]),
                     "cpu_speedup": r.get("cpu_speedup", float("nan")),
                     "cpu_speedup_b32": r.get("cpu_speedup_b32", float("nan")),
                     "latency_dense_ms": r.get("latency_dense_ms"),
                     "latency_b32_dense_ms": r.get("latency_b32_dense_ms"),
                     "latency_threads": r.get("latency_threads"),
                     "latency_pass": r.get("latency_pass"),
                     "delta_auroc": r["delta"],
                     "delta_auroc_ci95": r["delta_ci95"], "auroc_dense": r["auroc_dense"],
                     "max_abs_delta_logit": r["max_abs_delta_logit"], "wall_s": d["wall_s"],
                     "paired_macro": r.get("paired_macro"),
                     "meets_floor_0.005": r.get("meets_floor_0.005"),
                     "config": d["config"]})
        at_size += [{"dataset": p.parent.parent.name, "cell": f"{p.parent.name}/{p.stem}",
                     "method": r["method"], "size": int(size), **v}
                    for size, v in r.get("latency_at_size", {}).items()]
    rows.sort(key=_order)
    for ds_dir in sorted(p for p in work.iterdir() if (p / "dense" / "train.json").is_file()):
        t = read_json(ds_dir / "dense" / "train.json")
        card = read_json(ds_dir / "dense" / "model.json")
        dense[ds_dir.name] = {"arch": card.get("arch"), "classes": len(card["class_names"]),
                              "best_epoch": t.get("best_epoch"), "val_auroc": t.get("best_metric"),
                              "train_s": t.get("wall_s"),
                              "test_macro_auroc": next((r["auroc_dense"] for r in rows
                                                        if r["dataset"] == ds_dir.name), None)}
    rankcorr = {p.parent.parent.name: read_json(p) for p in sorted(work.glob("*/rankcorr/*.json"))}
    splits = {}
    for ds_name in sorted({r["dataset"] for r in rows}):
        try:
            te = datasets(ds_name, args)[2]
            splits[ds_name] = {"patient_regex": args.patient_regex,
                               "split_unit": te.meta.get("split_unit"),
                               "n_test": len(te)}
        except (FileNotFoundError, ImportError) as exc:
            splits[ds_name] = {"error": str(exc)}
    for p in sorted(work.glob("*/export/*.json")):
        d = read_json(p)
        r = d["results"]
        q = r.get("quantization") or {}
        exports.append({"dataset": p.parent.parent.name, "cell": d["cell"],
                        "parity": r["parity"], "speedup": r["speedup"],
                        "latency": r["latency"], "int8_delta_macro_auroc":
                            q.get("delta_macro_auroc"), "int8_max_abs_delta": q.get(
                            "max_abs_delta_vs_fp32")})
    config = {k: v for k, v in vars(args).items() if k != "stage"}
    name = args.result_name
    payload = {"dense": dense, "rows": rows, "exports": exports, "latency_at_size": at_size,
               "splits": splits, "rankcorr": rankcorr,
               "load_average": list(os.getloadavg())}
    if args.smoke:  # smoke numbers stay in the work directory, never in benchmarks/results
        write_json(work / "compress_smoke.json", {**payload, "config": config})
        out_md = work / "compress_smoke.md"
    else:
        save_result(name, payload, config)
        out_md = RESULTS / f"{name}.md"
    lines = [f"- {k}: split {v.get('split_unit', {}).get('unit', '?')}-wise "
             f"(patient_regex {v.get('patient_regex')!r}), {v.get('n_test')} test images"
             for k, v in splits.items()]
    lines += [f"- {k}: {v['arch']}, {v['classes']} classes, test macro AUROC "
             f"{v['test_macro_auroc']:.4f} (val {v['val_auroc']:.4f}, best epoch "
             f"{v['best_epoch']})" for k, v in dense.items()]
    lines += ["", "| dataset | method | params | removed | nonzero removed | MACs x | CPU x (b1) "
              "| CPU x (b32) | dAUROC [95% CI] | max dlogit |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    def _x(v) -> str:   # a deferred latency (no `latency` pass yet) is said, not printed as nan
        return "not measured" if v is None or v != v else f"{v:.2f}"

    for r in rows:
        lo, hi = r["delta_auroc_ci95"]
        lines.append(f"| {r['dataset']} | {r['method']} | {r['params']:,} | "
                     f"{r['params_removed']:.1%} | {r['nonzero_removed']:.1%} | "
                     f"{r['macs_speedup']:.2f} | "
                     f"{_x(r['cpu_speedup'])} | {_x(r['cpu_speedup_b32'])} | "
                     f"{r['delta_auroc']:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
                     f"{r['max_abs_delta_logit']:.2e} |")
    for ds_name, rc in rankcorr.items():
        lines += ["", f"Channel-score rank agreement on the dense {ds_name} model "
                  f"({rc['calib_images']} calibration images x every class, {rc['layers']} "
                  "Conv/BN layers):", "",
                  "| pair | Spearman median over layers [q10, q90] | pooled | low-half overlap |",
                  "|---|---|---|---|"]
        for pair, v in rc["pairs"].items():
            lines.append(f"| {pair} | {v['spearman_median']:.3f} [{v['spearman_q10']:.3f}, "
                         f"{v['spearman_q90']:.3f}] | {v['spearman_pooled']:.3f} | "
                         f"{v['low_half_overlap_mean']:.3f} |")
    if exports:
        lines += ["", "| dataset | exported | ORT parity | torch x b1 / b32 | ORT x b1 / b32 "
                  "| int8 vs fp32 ORT b1 / b32 | int8 dAUROC |", "|---|---|---|---|---|---|---|"]
        for e in exports:
            sp = e["speedup"]

            def pair(k: str) -> str:
                return (f"{sp.get(k + '@b1', float('nan')):.2f} / "
                        f"{sp.get(k + '@b32', float('nan')):.2f}")

            q = e["int8_delta_macro_auroc"]
            parity = max(v or 0 for v in e["parity"].values())
            lines.append(f"| {e['dataset']} | {e['cell']} | {parity:.1e} | {pair('torch')} | "
                         f"{pair('onnxruntime')} | {pair('int8-vs-fp32')} | "
                         f"{'n/a' if q is None else format(q, '+.4f')} |")
    if at_size:
        lines += ["", "| dataset | method | input | MACs x | CPU x (b1) | CPU x (b8) | dense ms "
                  "b1 / b8 |", "|---|---|---|---|---|---|---|"]
        for a in at_size:
            lines.append(f"| {a['dataset']} | {a['method']} | {a['size']} px | "
                         f"{a['macs_dense'] / max(1, a['macs']):.2f} | {a['b1']['ratio']:.2f} | "
                         f"{a['b8']['ratio']:.2f} | {a['b1']['a_ms']:.1f} / "
                         f"{a['b8']['a_ms']:.1f} |")
    out_md.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["dense", "lossless", "tolerance", "unstructured",
                                      "structured", "rankcorr", "latency", "export",
                                      "resolution", "table", "all"])
    ap.add_argument("--stages", default=None,
                    help="comma-separated stages to run in this order, then the table "
                         "(e.g. dense,rankcorr,structured); overrides the positional stage")
    ap.add_argument("--patient-regex", default=None,
                    help="patient_regex of the Kermany folder adapter (a patient-wise split); "
                         "default: the adapter's default")
    ap.add_argument("--note", default=None,
                    help="free text recorded in the result JSON's config (e.g. what is partial)")
    ap.add_argument("--result-name", default="compress",
                    help="name of the result files under benchmarks/results/")
    ap.add_argument("--datasets", default="phantom,kermany")
    ap.add_argument("--work", default="runs/bench-compress")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--phantom-n", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--recovery-epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--tolerance-ratios", default=",".join(str(r) for r in TOLERANCE_RATIOS))
    ap.add_argument("--tolerance-calib", type=int, default=256)
    ap.add_argument("--lossless-calib", type=int, default=512)
    ap.add_argument("--export-cells", default="structured/l2-x4,structured/bn_scale-x4,structured/lrp-x4",
                    help="cells (stage/key) the 'export' stage exports to ONNX")
    ap.add_argument("--res-size", type=int, default=224,
                    help="input size of the 'resolution' stage (latency only)")
    ap.add_argument("--res-cells", default="structured/bn_scale-x4,structured/bn_scale-x8,"
                    "structured/l2-x4,tolerance/ratio-0.70",
                    help="cells (stage/key) the 'resolution' stage times at --res-size")
    ap.add_argument("--speedups", default=",".join(str(s) for s in SPEEDUPS))
    ap.add_argument("--defer-latency", action="store_true",
                    help="skip latency inside the cells (cells run in parallel); the 'latency' "
                         "stage measures it afterwards from the saved models")
    ap.add_argument("--latency-tag", default="idle",
                    help="label of a latency pass; cells already measured with it are skipped")
    ap.add_argument("--smoke", action="store_true", help="tiny settings to time the pipeline")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.criteria = [c for c in args.criteria.split(",") if c]
    args.speedups = [float(s) for s in args.speedups.split(",") if s]
    args.tolerance_ratios = [float(r) for r in args.tolerance_ratios.split(",") if r]
    args.export_cells = [c for c in args.export_cells.split(",") if c]
    args.res_cells = [c for c in args.res_cells.split(",") if c]
    if args.smoke:
        args.epochs, args.recovery_epochs, args.n_boot = 1, 1, 100
        args.calib, args.repeats, args.tolerance_calib, args.lossless_calib = 16, 5, 32, 32
        if args.work == "runs/bench-compress":
            args.work = "runs/bench-compress-smoke"
    stages = (["dense", "lossless", "tolerance", "unstructured", "structured"]
              if args.stage == "all" else [args.stage] if args.stage != "table" else [])
    if args.stages:
        stages = [st for st in args.stages.split(",") if st]
    timings: dict[str, float] = {}
    for ds in [d for d in args.datasets.split(",") if d]:
        for st in stages:
            t0 = time.perf_counter()
            try:
                {"dense": stage_dense, "lossless": stage_lossless, "tolerance": stage_tolerance,
                 "latency": stage_latency, "export": stage_export, "rankcorr": stage_rankcorr,
                 "resolution": stage_resolution,
                 "unstructured": stage_unstructured, "structured": stage_structured}[st](ds, args)
            except (FileNotFoundError, ImportError) as exc:
                print(f"[skip] {ds}/{st}: {exc}", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001 - report and go on with the next stage
                if "Unknown dataset" in str(exc) or "Valid names" in str(exc):
                    print(f"[skip] {ds}/{st}: {exc}", file=sys.stderr)
                    break
                raise
            timings[f"{ds}/{st}"] = round(time.perf_counter() - t0, 1)
            print(f"{ds}/{st}: {timings[f'{ds}/{st}']} s", file=sys.stderr)
    if args.stage in ("table", "all") or args.stages:
        stage_table(args)
    if timings:
        write_json(Path(args.work) / f"timings-{int(time.time())}.json", timings)
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
