"""Deployment benchmark (issue 15, item 6): DenseNet121 on the Kermany pneumonia images with a
PATIENT-wise split, trained and deployed at 128 px (224 px training does not fit on 2 shared
cores), side by side in ONE alternated run at batch 1 and 8:

- dense torch eager fp32 (and dense ONNX Runtime / OpenVINO fp32: same-runtime ratios);
- Torch-Pruning's own MagnitudePruner at uniform ratio 0.5 (the peer default), same recovery, timed in
  torch eager and on ONNX Runtime fp32 (speed is judged against its faster row);
- ONNX Runtime int8 as its docs recommend (quant_pre_process + quantize_static defaults);
- OpenVINO + NNCF default int8 (nncf.quantize defaults) of the dense model;
- medscalpel: prune_structured (round_to=16, MACs target) + recovery, then ``compress deploy``'s
  recommended runtime x precision.

Stages (each resumable; work in ``--work``; ``all`` runs them in order):

    .venv/bin/python benchmarks/deploy_bench.py train      # dense model (~10-25 min, 2 cores)
    .venv/bin/python benchmarks/deploy_bench.py prune      # medscalpel + Torch-Pruning peers
    .venv/bin/python benchmarks/deploy_bench.py deploy     # compress deploy on the pruned model
    .venv/bin/python benchmarks/deploy_bench.py compare    # the alternated side-by-side run

``compare`` writes ``benchmarks/results/deploy.{json,md}`` with the load average and spreads.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_result  # noqa: E402

from medscalpel.deploy.flow import DeployResult, deploy  # noqa: E402
from medscalpel.deploy.export import export_onnx_file, ort_session  # noqa: E402
from medscalpel.compress.measure import count_macs, count_parameters  # noqa: E402
from medscalpel.deploy.runtimes import RUNTIMES, Runtime, cpu_features  # noqa: E402
from medscalpel.compress.structured import RecoveryConfig, prune_structured  # noqa: E402
from medscalpel.data import Preprocess, open_dataset  # noqa: E402
from medscalpel.engine.compare import compare_predictions  # noqa: E402
from medscalpel.engine.predict import collect_images, predict  # noqa: E402
from medscalpel.engine.predictions import Predictions  # noqa: E402
from medscalpel.engine.train import TrainConfig, seed_everything, train  # noqa: E402
from medscalpel.models import create_model, load_model, make_card, save_model  # noqa: E402
from medscalpel.runs import read_json, write_json, write_text  # noqa: E402

KERMANY = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany-pneumonia" / "train"
PATIENT_REGEX = "^(person[0-9]*|IM-[0-9]*|NORMAL2-IM-[0-9]*)"


def datasets(args) -> tuple[Any, Any, Any]:
    if not KERMANY.is_dir():
        raise SystemExit(f"{KERMANY} is absent: this benchmark needs the shared Kermany data")
    spec = (f"folder:{KERMANY}?dedup=true&patient_regex="
            + PATIENT_REGEX.replace("+", "%2B"))
    pre = Preprocess(size=args.size)
    tr, va, te = (open_dataset(spec, split=s, preprocess=pre) for s in ("train", "val", "test"))
    if args.smoke:  # seeded small subsets: checks the pipeline, numbers stay in --work
        rng = np.random.default_rng(0)
        tr, va, te = (d.subset(sorted(rng.choice(len(d), n, replace=False)))
                      for d, n in ((tr, 96), (va, 32), (te, 48)))
    return tr, va, te


def stage_train(args) -> None:
    out = Path(args.work) / "dense"
    if (out / "model.json").is_file():
        return
    tr, va, te = datasets(args)
    seed_everything(0)
    m = create_model("densenet_tiny" if args.smoke else "densenet121", tr.num_classes, 1,
                     args.size)
    m.card = make_card(m, tr.class_names, tr.task, tr.preprocess)
    cfg = TrainConfig(epochs=args.epochs, batch_size=32, lr=1e-3, seed=0,
                      max_steps_per_epoch=args.max_steps)
    t0 = time.perf_counter()
    res = train(m, tr, va, config=cfg, checkpoint_dir=Path(args.work) / "dense-ckpt")
    save_model(res.model, out)
    write_json(out / "train.json", {**res.to_dict(), "wall_s": time.perf_counter() - t0,
                                    "n_train": len(tr), "n_val": len(va), "n_test": len(te),
                                    "size": args.size, "split": "patient-wise",
                                    "patient_regex": PATIENT_REGEX})


def _calib(tr, n: int) -> torch.Tensor:
    return collect_images(tr, n, seed=1)[0]


def _recovery_train(model, teacher, tr, va, args):
    """The same recovery for every pruned model: distillation from the dense model,
    ``--recovery-epochs`` epochs of at most ``--recovery-steps`` steps of batch 32 each
    (engine.train + distill.teacher_loss; a step cap above the epoch length is the epoch)."""
    from medscalpel.compress.distill import teacher_loss

    cfg = TrainConfig(epochs=args.recovery_epochs, batch_size=32, lr=5e-4, seed=0,
                      max_steps_per_epoch=args.recovery_steps, warmup_epochs=0.1)
    res = train(model, tr, va, config=cfg,
                loss_fn=teacher_loss(copy.deepcopy(teacher).eval(), model.card.task),
                inplace=True)
    return res.model.eval(), res.to_dict()


def stage_prune(args) -> None:
    import torch_pruning as tp

    work = Path(args.work)
    dense = load_model(work / "dense").eval()
    tr, va, te = datasets(args)
    va = va.subset(sorted(np.random.default_rng(0).choice(len(va), min(len(va), 200),
                                                          replace=False)))
    calib = _calib(tr, 32)
    if not (work / "pruned" / "model.json").is_file():
        t0 = time.perf_counter()
        res = prune_structured(dense, calib, "l2", ratio=args.ratio, round_to=16,
                               measure_latency=False, progress=False)
        m, hist = _recovery_train(res.model, dense, tr, va, args)
        m.card = res.model.card
        save_model(m, work / "pruned")
        write_json(work / "pruned" / "prune.json", {**res.to_dict(), "recovery_history": hist,
                                                    "wall_s": time.perf_counter() - t0})
    if not (work / "tp_uniform" / "model.json").is_file():
        t0 = time.perf_counter()
        m = copy.deepcopy(dense).eval()
        with torch.enable_grad():
            pruner = tp.pruner.MagnitudePruner(
                m, calib[:1], importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=0.5, ignored_layers=[m.classifier])
            pruner.step()
        m.card = dense.card.with_lineage("torch_pruning.MagnitudePruner", dense.card.model_id,
                                         ratio=0.5, importance="l2 magnitude, uniform")
        m, hist = _recovery_train(m, dense, tr, va, args)
        save_model(m, work / "tp_uniform")
        write_json(work / "tp_uniform" / "prune.json",
                   {"pruner": "tp.pruner.MagnitudePruner", "pruning_ratio": 0.5,
                    "recovery_history": hist, "wall_s": time.perf_counter() - t0})


def stage_deploy(args) -> None:
    from medscalpel.errors import VerificationError

    work = Path(args.work)
    if (work / "deploy" / "deploy.json").is_file():
        return
    tr, va, te = datasets(args)
    pruned = load_model(work / "pruned").eval()
    try:
        deploy(pruned, te, work / "deploy", calib_data=tr, batches=(1, 8), rounds=3, repeats=3,
               n_images=args.n_images, n_calib=32, threads=args.threads, overwrite=True,
               progress=False)
    except VerificationError as exc:
        write_json(work / "deploy-error.json", {"error": str(exc)})
        raise


class OrtDocsInt8(Runtime):
    """ONNX Runtime int8 as its docs show it: quant_pre_process, then quantize_static with
    its defaults (QDQ, int8 activations and weights, per-tensor), on the dense model."""

    runtime, precision = "onnxruntime-docs", "int8"

    def prepare(self, model, example, calib, workdir) -> None:
        from onnxruntime.quantization import CalibrationDataReader, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        fp32, pre = Path(workdir) / "docs-fp32.onnx", Path(workdir) / "docs-pre.onnx"
        out = Path(workdir) / "docs-int8.onnx"
        export_onnx_file(model, fp32, tuple(example.shape[1:]))
        quant_pre_process(str(fp32), str(pre))
        batches = [calib[i:i + 1].numpy() for i in range(calib.shape[0])]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(batches)

            def get_next(self):
                x = next(self.it, None)
                return None if x is None else {"images": x}

        quantize_static(str(pre), str(out), Reader())
        self.files = [out]
        self.session = ort_session(out, self.threads)

    def run(self, x):
        return self.session.run(None, {"images": np.ascontiguousarray(x, np.float32)})[0]


def _entries(work: Path, rec: str) -> list[tuple[str, str, Any, Runtime]]:
    """(label, what, model, runtime) for the side-by-side run."""
    dense = load_model(work / "dense").eval()
    pruned = load_model(work / "pruned").eval()
    tpm = load_model(work / "tp_uniform").eval()
    rt = lambda name: RUNTIMES.create(name, threads=1)  # noqa: E731
    out = [("dense torch eager fp32", "dense", dense, rt("torch:fp32")),
           ("dense onnxruntime fp32", "dense", dense, rt("onnxruntime:fp32")),
           ("dense openvino fp32", "dense", dense, rt("openvino:fp32")),
           ("Torch-Pruning MagnitudePruner uniform 0.5, torch eager", "tp_uniform", tpm,
            rt("torch:fp32")),
           ("Torch-Pruning MagnitudePruner uniform 0.5, onnxruntime fp32", "tp_uniform", tpm,
            rt("onnxruntime:fp32")),
           ("ONNX Runtime int8, docs recipe (dense)", "dense", dense, OrtDocsInt8(1)),
           ("OpenVINO + NNCF default int8 (dense)", "dense", dense, rt("openvino:int8")),
           ("medscalpel pruned, torch eager fp32", "pruned", pruned, rt("torch:fp32")),
           (f"medscalpel recommended: pruned on {rec}", "pruned", pruned, rt(rec))]
    if f"dense {rec.replace(':', ' ')}" not in {e[0] for e in out}:
        out.append((f"dense {rec.replace(':', ' ')}", "dense", dense, rt(rec)))
    return out


def stage_compare(args) -> None:
    from medscalpel.deploy.flow import peak_gemms, run_batched
    from medscalpel.deploy.runtimes import time_runtime

    work = Path(args.work)
    dep = DeployResult.load(work / "deploy")
    tr, va, te = datasets(args)
    load_start = list(os.getloadavg())
    images, idx = collect_images(te, args.n_images, seed=0)
    calib = _calib(tr, 32)
    entries = _entries(work, dep.recommended)
    ex = images[:1]
    built, rows = [], []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        ref_logits = None
        for i, (label, what, model, rt) in enumerate(entries):
            t0 = time.perf_counter()
            rt.prepare(model, ex, calib, Path(tmp) / str(i))
            logits = run_batched(rt, images, 8)
            if ref_logits is None:
                ref_logits = logits
            preds = Predictions(logits, np.asarray(te.labels)[idx],
                                tuple(str(te.ids[j]) for j in idx), tuple(te.class_names),
                                te.task, te.split, model_id=label)
            built.append((label, what, model, rt, preds, time.perf_counter() - t0))
        ref_preds = built[0][4]
        x = {b: np.ascontiguousarray(np.repeat(ex.numpy(), b, axis=0)) for b in (1, 8)}
        times: dict[tuple[str, int], list[float]] = {}
        peaks = peak_gemms(1)
        peak_t: dict[str, list[float]] = {k: [] for k in peaks}
        for r in range(args.rounds):
            order = built[r % len(built):] + built[:r % len(built)]
            for b in (1, 8):
                for label, _, _, rt, _, _ in order:
                    times.setdefault((label, b), []).append(time_runtime(rt, x[b], 2,
                                                                         args.repeats))
            for k, (fn, _) in peaks.items():
                peak_t[k].append(_median_ms(fn))
    sizes = {k: peaks[k][1] / (statistics.median(v) / 1e3) / 1e9 for k, v in peak_t.items()}
    peak = {"sizes_gmacs": sizes}
    for prec in ("fp32", "int8"):  # the fastest GEMM size per precision is the peak
        rates = [v for k, v in sizes.items() if k.startswith(prec + "@")]
        if rates:
            peak[f"{prec}_gmacs"] = max(rates)
    macs = {w: count_macs(m, ex) for _, w, m, _, _, _ in built}
    params = {w: count_parameters(m) for _, w, m, _, _, _ in built}
    med = {k: statistics.median(v) for k, v in times.items()}
    for label, what, model, rt, preds, prep_s in built:
        cmp = compare_predictions(ref_preds, preds, n_boot=1000, seed=0)
        ok, why = cmp.meets_floor(-0.005, -0.01)
        pk = "int8" if rt.precision.startswith("int8") else "fp32"
        row = {"variant": label, "model": what, "runtime": rt.runtime, "precision": rt.precision,
               "params": params[what], "macs": macs[what],
               "parity_max_abs_vs_dense_torch": float(np.abs(preds.logits - ref_logits).max()),
               "macro_delta_auroc": cmp.macro["delta_auroc"],
               "macro_delta_auroc_ci": list(cmp.macro["delta_auroc_ci"]),
               "per_class": [{"class": c.name, "delta_auroc": c.delta_auroc,
                              "ci": list(c.delta_auroc_ci)} for c in cmp.classes],
               "auroc_dense": cmp.macro["auroc_ref"], "auroc": cmp.macro["auroc_new"],
               "meets_floor": ok, "floor_reasons": why, "prepare_s": round(prep_s, 2)}
        for b in (1, 8):
            t = times[(label, b)]
            row[f"b{b}_ms"] = med[(label, b)]
            row[f"b{b}_spread"] = (max(t) - min(t)) / med[(label, b)]
            row[f"b{b}_speedup_vs_dense_torch"] = med[("dense torch eager fp32", b)] / med[
                (label, b)]
            rate = macs[what] * b / (med[(label, b)] / 1e3) / 1e9
            row[f"b{b}_gmacs"] = rate
            row[f"b{b}_peak_fraction"] = rate / peak[f"{pk}_gmacs"]
        rows.append(row)
    load_end = list(os.getloadavg())
    numbers = _targets(rows, dep)
    # "at equal or better accuracy" judged PAIRED: the recommended variant against each peer on
    # the same images (a CI of the difference that holds 0 = no measurable accuracy difference)
    by_label = {b[0]: b[4] for b in built}
    rec_label = next(b[0] for b in built if b[0].startswith("medscalpel recommended"))
    for key, peer in (("torch_pruning_uniform", "Torch-Pruning MagnitudePruner uniform 0.5, "
                                                "torch eager"),
                      ("ort_int8_docs", "ONNX Runtime int8, docs recipe (dense)"),
                      ("openvino_nncf_int8", "OpenVINO + NNCF default int8 (dense)")):
        c = compare_predictions(by_label[peer], by_label[rec_label], n_boot=1000, seed=0)
        lo, hi = c.macro["delta_auroc_ci"]
        # speed against the peer's FASTEST row (Torch-Pruning's model also on ONNX Runtime)
        peer_ms = min(r["b1_ms"] for r in rows if r["variant"] == peer
                      or (key == "torch_pruning_uniform"
                          and r["variant"].startswith("Torch-Pruning")))
        faster = rows[[r["variant"] for r in rows].index(rec_label)]["b1_ms"] < peer_ms
        numbers["targets"][f"vs_{key}"] = {
            "macro_delta_auroc_rec_minus_peer": c.macro["delta_auroc"],
            "ci": [lo, hi], "faster_b1": bool(faster),
            "accuracy": "better" if lo > 0 else ("worse" if hi < 0 else
                                                 "no measurable difference (CI holds 0)")}
    _noninferiority(numbers)
    numbers.update({"rows": rows, "peak": peak, "loadavg": {"start": load_start, "end": load_end},
                    "under_load": max(load_start[0], load_end[0]) > 0.5 * (os.cpu_count() or 1),
                    "deploy_recommended": dep.recommended, "deploy_reason": dep.reason,
                    "deploy_variants": [{"name": v.name, "status": v.status,
                                         "reasons": list(v.reasons),
                                         "b1_ms": v.median_ms(1), "b8_ms": v.median_ms(8)}
                                        for v in dep.variants],
                    "train": read_json(work / "dense" / "train.json"),
                    "n_test_images": int(images.shape[0])})
    config = {"arch": "densenet_tiny" if args.smoke else "densenet121", "smoke": args.smoke,
              "size": args.size, "resolution_note": f"trained and deployed at {args.size} px: "
              "224 px training does not fit on 2 shared cores", "split": "patient-wise",
              "patient_regex": PATIENT_REGEX, "threads": 1, "rounds": args.rounds,
              "repeats": args.repeats, "batches": [1, 8], "prune_ratio": args.ratio,
              "round_to": 16, "recovery_steps": args.recovery_steps,
              "recovery_epochs": args.recovery_epochs, "name": args.name,
              "epochs": args.epochs, "max_steps": args.max_steps}
    if args.smoke:
        write_json(work / "deploy_smoke.json", {"results": numbers, "config": config})
        write_text(work / "deploy_smoke.md", _markdown(numbers, config))
        return
    save_result(args.name, numbers, config)
    write_text(RESULTS / f"{args.name}.md", _markdown(numbers, config))


def stage_table(args) -> None:
    """Rebuild ``NAME.md`` (and the derived non-inferiority flags) from ``NAME.json``."""
    stored = read_json(RESULTS / f"{args.name}.json")
    numbers = _noninferiority(stored["results"])
    stored["config"].setdefault("name", args.name)
    stored["results"], stored["table_rederived"] = numbers, time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(RESULTS / f"{args.name}.json", stored)   # the measurement's date is kept
    write_text(RESULTS / f"{args.name}.md", _markdown(numbers, stored["config"]))


def _median_ms(fn, repeats: int = 3) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _targets(rows: list[dict], dep: DeployResult) -> dict[str, Any]:
    by = {r["variant"]: r for r in rows}
    rec = next(r for r in rows if r["variant"].startswith("medscalpel recommended"))
    same = by.get(f"dense {dep.recommended.replace(':', ' ')}")
    tp_row = min((r for r in rows if r["variant"].startswith("Torch-Pruning")),
                 key=lambda r: r["b1_ms"])   # its fastest runtime
    ort_row = by["ONNX Runtime int8, docs recipe (dense)"]
    return {"targets": {
        "recommended_b1_speedup_vs_dense_torch": rec["b1_speedup_vs_dense_torch"],
        "met_10x_vs_dense_torch": rec["b1_speedup_vs_dense_torch"] >= 10,
        "recommended_b1_speedup_vs_dense_same_runtime": None if same is None
        else same["b1_ms"] / rec["b1_ms"],
        "met_4x_vs_dense_same_runtime": None if same is None
        else same["b1_ms"] / rec["b1_ms"] >= 4,
        "recommended_meets_floor": rec["meets_floor"],
        "recommended_b1_peak_fraction": rec["b1_peak_fraction"],
        "met_50pct_of_peak": rec["b1_peak_fraction"] >= 0.5,
        "ahead_of_torch_pruning_uniform": rec["b1_ms"] < tp_row["b1_ms"]
        and rec["macro_delta_auroc"] >= tp_row["macro_delta_auroc"],
        "ahead_of_ort_int8_docs": rec["b1_ms"] < ort_row["b1_ms"]
        and rec["macro_delta_auroc"] >= ort_row["macro_delta_auroc"]}}


#: non-inferiority margin of "equal accuracy" against a peer: the issue's macro floor
NONINFERIORITY_MARGIN = -0.005


def _noninferiority(numbers: dict) -> dict:
    """Add to each paired ``vs_*`` comparison whether the recommended variant is non-inferior to
    the peer at the floor margin (the paired 95% CI of recommended - peer lies above -0.005),
    and the targets "ahead of the peer" read that way: faster at batch 1 AND non-inferior. The
    point-estimate flags (``ahead_of_*``: faster and a macro delta at least the peer's) stay."""
    t = numbers["targets"]
    for key in ("torch_pruning_uniform", "ort_int8_docs", "openvino_nncf_int8"):
        v = t.get(f"vs_{key}")
        if v is None:
            continue
        v["noninferior_at_floor"] = bool(v["ci"][0] >= NONINFERIORITY_MARGIN)
        v["noninferiority_margin"] = NONINFERIORITY_MARGIN
        t[f"ahead_of_{key}_noninferior"] = bool(v["faster_b1"] and v["noninferior_at_floor"])
    return numbers


def _markdown(numbers: dict, config: dict) -> str:
    f = lambda v, d=3: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# Deployment benchmark (benchmarks/deploy_bench.py -> benchmarks/results/"
             f"{config.get('name', 'deploy')}.json)",
             "", ("SMOKE RUN (densenet_tiny, small subsets: checks the pipeline only). "
                  if config.get("smoke") else "")
             + f"{config['arch']}, Kermany pneumonia, PATIENT-wise split, {config['size']} px "
             f"({config['resolution_note']}); {numbers['n_test_images']} test images; 1 thread; "
             f"{config['rounds']} alternated rounds x {config['repeats']} repeats; prune ratio "
             f"{config['prune_ratio']}, recovery of both pruned models: "
             f"{config.get('recovery_epochs', 1)} epoch(s) of at most "
             f"{config['recovery_steps']} steps of 32 (capped by the epoch length, 114 steps).",
             f"Load average start {numbers['loadavg']['start']}, end {numbers['loadavg']['end']}"
             + (": latencies MEASURED UNDER LOAD (other sessions share the 2 cores)."
                if numbers["under_load"] else "."),
             f"Peak GEMM: fp32 {f(numbers['peak'].get('fp32_gmacs'), 1)} GMAC/s, int8 "
             f"{f(numbers['peak'].get('int8_gmacs'), 1)} GMAC/s (same rounds).", "",
             "| variant | params | MMACs | b1 ms (spread) | b1 x dense torch | b8 ms | "
             "b8 x dense torch | % peak b1 | parity | macro dAUROC [95% CI] | floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in numbers["rows"]:
        ci = r["macro_delta_auroc_ci"]
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['macs'] / 1e6:.0f} | "
                     f"{f(r['b1_ms'], 2)} ({f(r['b1_spread'], 2)}) | "
                     f"{f(r['b1_speedup_vs_dense_torch'], 2)} | {f(r['b8_ms'], 1)} | "
                     f"{f(r['b8_speedup_vs_dense_torch'], 2)} | "
                     f"{100 * r['b1_peak_fraction']:.1f} | "
                     f"{r['parity_max_abs_vs_dense_torch']:.2g} | "
                     f"{f(r['macro_delta_auroc'], 4)} [{f(ci[0], 4)}, {f(ci[1], 4)}] | "
                     f"{'yes' if r['meets_floor'] else 'no'} |")
    lines += ["", "Targets: " + ", ".join(f"{k} = {f(v, 3)}"
                                         for k, v in numbers["targets"].items()
                                         if not k.startswith("vs_")), ""]
    for k, v in numbers["targets"].items():
        if k.startswith("vs_"):
            lines.append(f"- recommended {k.replace('_', ' ')} (paired, same images): "
                         f"{'faster' if v['faster_b1'] else 'NOT faster'} at batch 1; macro "
                         f"dAUROC (recommended - peer) {v['macro_delta_auroc_rec_minus_peer']:+.4f} "
                         f"[{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}]: {v['accuracy']}"
                         + (f"; non-inferior at the {v['noninferiority_margin']} margin: "
                            f"{'yes' if v['noninferior_at_floor'] else 'NO'}"
                            if "noninferior_at_floor" in v else ""))
    lines += ["",
              f"compress deploy recommended {numbers['deploy_recommended']}: "
              f"{numbers['deploy_reason']}.", "", "compress deploy variants (pruned model):", ""]
    lines += [f"- {v['name']}: {v['status']}, b1 {f(v['b1_ms'], 2)} ms"
              + (f" ({'; '.join(v['reasons'])})" if v["reasons"] else "")
              for v in numbers["deploy_variants"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["train", "prune", "deploy", "compare", "table", "all"],
                    help="table: re-derive the flags and the markdown of results/NAME.json "
                         "(no measurement)")
    ap.add_argument("--work", default="runs/bench-deploy")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=0.75, help="medscalpel prune ratio")
    ap.add_argument("--recovery-steps", type=int, default=20,
                    help="recovery steps per epoch (capped by the epoch length)")
    ap.add_argument("--recovery-epochs", type=int, default=1)
    ap.add_argument("--dense", default=None,
                    help="reuse the dense model of another work directory (linked as WORK/dense)")
    ap.add_argument("--name", default="deploy",
                    help="result name: benchmarks/results/NAME.{json,md}")
    ap.add_argument("--n-images", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="densenet_tiny on small subsets")
    args = ap.parse_args(argv)
    if args.smoke:
        args.work, args.size, args.max_steps, args.recovery_steps = (args.work + "-smoke", 32,
                                                                     3, 2)
        args.epochs, args.n_images = 1, 48
    torch.set_num_threads(args.threads)
    if args.dense:
        link = Path(args.work) / "dense"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(Path(args.dense).resolve() / "dense")
    stages = ["train", "prune", "deploy", "compare"] if args.stage == "all" else [args.stage]
    for s in stages:
        globals()[f"stage_{s}"](args)


if __name__ == "__main__":
    main()
