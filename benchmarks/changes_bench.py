"""Issue 18 benchmark: the full what-compression-changed audit of one dense/compressed pair.

On the phantom (n=6000, 64 px, patient-wise train/val/test split; the audit uses 500 images of
the test split) a ``--arch`` (default densenet_small, the demo's quick-profile architecture) is
trained here (seeded, ``--epochs`` epochs, niced on one thread; saved and reused under
``--work``), then pruned structurally to ~4x and ~8x fewer MACs (``prune_structured``,
criterion ``--criterion``, a short recovery fine-tune of ``--recovery-epochs`` x
``--recovery-steps`` batches), and :func:`medscalpel.audit.changes.audit_changes` runs all four
measures on each pair with the default settings (1000 bootstrap replicates, 100 faithfulness
images, 9 corruptions x 3 severities) on ``--threads`` torch threads (default 2: the target is
stated for 2 cores). Recorded per pair: process CPU seconds (the primary, load-independent
number; it sums both threads), wall seconds (measured on a shared machine: an upper bound) and
the load average before/after, per-measure wall seconds. Run it with OMP_WAIT_POLICY=PASSIVE:
on a shared, oversubscribed machine OpenMP's spinning waits otherwise add CPU seconds that are
no work.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/changes_bench.py --train-only \
        --epochs 5 --recovery-steps 30
    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python \
        benchmarks/changes_bench.py --epochs 5 --recovery-steps 30
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/changes_bench.py --demo-only
    -> benchmarks/results/changes.json, benchmarks/results/changes.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_result  # noqa: E402

from medscalpel.audit.changes import PairChanges, audit_changes  # noqa: E402
from medscalpel.compress.structured import RecoveryConfig, prune_structured  # noqa: E402
from medscalpel.data import Preprocess, open_dataset  # noqa: E402
from medscalpel.engine.train import TrainConfig, seed_everything, train  # noqa: E402
from medscalpel.models import create_model, load_model, make_card, save_model  # noqa: E402
from medscalpel.runs import write_text  # noqa: E402


def dense_model(args, tr, va):
    out = Path(args.work) / "dense"
    if (out / "model.json").is_file():
        info = json.loads((out / "train_info.json").read_text()) \
            if (out / "train_info.json").is_file() else {}
        return load_model(out), {**info, "reused": True}
    seed_everything(0)
    m = create_model(args.arch, tr.num_classes, 1, args.size)
    m.card = make_card(m, tr.class_names, tr.task, tr.preprocess)
    cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=args.lr, seed=0,
                      patience=max(2, args.epochs), max_steps_per_epoch=args.max_steps)
    t0, c0 = time.perf_counter(), time.process_time()
    res = train(m, tr, va, config=cfg)
    save_model(res.model, out)
    info = {"train_wall_s": round(time.perf_counter() - t0, 1),
            "train_cpu_s": round(time.process_time() - c0, 1), "epochs": args.epochs,
            "max_steps_per_epoch": args.max_steps, "lr": args.lr, "batch_size": 64,
            "epochs_run": len(res.history)}
    write_text(out / "train_info.json", json.dumps(info))
    return res.model, {**info, "reused": False}


def pruned_model(args, dense, tr, va, sp: float):
    """``prune_structured`` to ``sp`` x fewer MACs with a short recovery fine-tune (saved and
    reused, like the dense model)."""
    name = f"{args.criterion}_x{sp:g}"
    out = Path(args.work) / name
    if (out / "model.json").is_file():
        return load_model(out), json.loads((out / "prune_info.json").read_text())
    calib = torch.stack([tr.image(i) for i in range(64)])
    t0, c0 = time.perf_counter(), time.process_time()
    rec = RecoveryConfig(epochs=args.recovery_epochs, batch_size=64, lr=5e-4,
                         max_steps_per_epoch=args.recovery_steps) \
        if args.recovery_epochs else None
    pr = prune_structured(dense, calib, criterion=args.criterion, target_speedup=sp,
                          recovery=rec, train_ds=tr if rec else None, val_ds=va if rec else None,
                          measure_latency=False, progress=False)
    save_model(pr.model, out)
    info = {"speedup_macs": pr.speedup_macs, "criterion": args.criterion,
            "recovery_epochs": args.recovery_epochs,
            "recovery_max_steps_per_epoch": args.recovery_steps,
            "prune_wall_s": round(time.perf_counter() - t0, 1),
            "prune_cpu_s": round(time.process_time() - c0, 1)}
    write_text(out / "prune_info.json", json.dumps(info))
    return pr.model, info


MD_HEAD = ["| pair | MACs speedup | AUROC dense / compressed | dAUROC macro [95% CI] | "
           "dECE macro [95% CI] | recalibrate | Grad-CAM Spearman (median class) | "
           "deletion d [CI] | subgroups flagged | less robust cells | "
           "audit CPU s (calib/expl/subgr/robust wall s) | audit wall s | load avg |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def md_row(name: str, entry: dict) -> str:
    """One markdown row from a stored pair entry (also used by ``--md-only``)."""
    p = PairChanges.from_dict(entry["audit"])
    c, e = p.calibration, p.explanation
    if e is None:   # a deployed runtime artifact: no gradients (the reason is in 'skipped')
        rho_txt = dl_txt = "not measured (runtime artifact, no gradients)"
    else:
        rho = [v["spearman"]["mean"] for v in e.classes.values()
               if v["spearman"]["mean"] == v["spearman"]["mean"]]
        scored = sum(int(v["spearman"]["n"]) for v in e.classes.values())
        total = e.n_similarity * len(e.classes)
        rho_txt = (f"{np.median(rho):.2f} ({scored}/{total} pairs)" if rho
                   else f"not scored (0/{total} image x class pairs with two non-empty maps)")
        if e.meta.get("cam_grid"):
            rho_txt += f"; CAM grid {'x'.join(map(str, e.meta['cam_grid']['ref']))}"
        dl = e.faithfulness.get("deletion", {})
        if dl and dl["delta"]["n"]:
            dl_txt = (f"{dl['delta']['mean']:+.3f} [{dl['delta']['ci'][0]:+.3f}, "
                      f"{dl['delta']['ci'][1]:+.3f}]")
        else:
            em = dl.get("empty_maps", {})
            dl_txt = (f"not scored (empty maps: dense {em.get('ref')}/{e.n_faithfulness}, "
                      f"compressed {em.get('new')}/{e.n_faithfulness})")
    cm = c.macro
    rb = [x for x in p.robustness.macro() if x.less_robust]
    sec, load0, load1 = p.seconds, entry["loadavg_before"], entry["loadavg_after"]
    return (f"| {name} | {entry['speedup_macs']:.2f} | {p.robustness.clean['auroc_ref']:.3f} / "
            f"{p.robustness.clean['auroc_new']:.3f} | {cm['delta_auroc']:+.3f} "
            f"[{cm['delta_auroc_ci'][0]:+.3f}, {cm['delta_auroc_ci'][1]:+.3f}] | "
            f"{cm['delta_ece']:+.3f} [{cm['delta_ece_ci'][0]:+.3f}, "
            f"{cm['delta_ece_ci'][1]:+.3f}] | "
            f"{'yes' if c.recommend_recalibration else 'no'} | {rho_txt} | {dl_txt} | "
            + (f"{len([r for r in p.subgroups.flagged() if r.cls == 'macro'])} macro / "
               f"{len(p.subgroups.flagged())} any class / {len(p.subgroups.flagged(True))} Holm"
               if p.subgroups is not None else "not measured (no attributes)") + " | "
            f"{len(rb)}/{len(p.robustness.macro())} | {entry['cpu_s']:.0f} "
            f"({sec.get('calibration', 0):.0f}/{sec.get('explanation', 0):.0f}/"
            f"{sec.get('subgroups', 0):.0f}/{sec.get('robustness', 0):.0f}) | "
            f"{entry['wall_s']:.0f} | {load0[0]:.1f}-{load1[0]:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/bench-changes-v2")
    ap.add_argument("--arch", default="densenet_small")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--phantom-n", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--criterion", default="l2")
    ap.add_argument("--speedups", default="4,8")
    ap.add_argument("--recovery-epochs", type=int, default=1)
    ap.add_argument("--recovery-steps", type=int, default=None)
    ap.add_argument("--n-images", type=int, default=500)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads of the audit (the target is stated for 2 cores)")
    ap.add_argument("--train-only", action="store_true", help="train / prune, no audit")
    ap.add_argument("--demo-only", action="store_true", help="only time the demo-ready call")
    ap.add_argument("--md-only", action="store_true", help="rebuild changes.md from changes.json")
    ap.add_argument("--pair", nargs=2, metavar=("DENSE", "COMPRESSED"), default=None,
                    help="audit a pair of saved model dirs instead (e.g. the Kermany densenet121 "
                         "and its pruned model of deploy_bench.py) on --data [test]")
    ap.add_argument("--data", default=None, help="dataset spec of --pair")
    ap.add_argument("--pair-name", default=None, help="row name of --pair")
    ap.add_argument("--pair-runtime", default=None,
                    help="audit --pair's COMPRESSED model as run by this deploy runtime (e.g. "
                         "openvino:int8; 32 calibration images of the train split)")
    args = ap.parse_args()
    if args.pair:
        torch.set_num_threads(args.threads)
        pair_call(args)
        return
    if args.md_only:   # rebuild changes.md from the stored audits (no computation)
        stored = json.loads((RESULTS / "changes.json").read_text())
        write_text(RESULTS / "changes.md", md_text(argparse.Namespace(**stored["config"]), [
            *MD_HEAD, *(md_row(k, v) for k, v in stored["results"]["pairs"].items())]))
        return
    if args.demo_only:
        torch.set_num_threads(args.threads)
        write(args, "", {"demo_call": demo_call(args)}, [])
        return
    pp = Preprocess(args.size)
    spec = f"phantom?n={args.phantom_n}&size={args.size}&seed=0"
    tr, va, te = (open_dataset(spec, split=s, preprocess=pp) for s in ("train", "val", "test"))
    torch.set_num_threads(1)      # training runs niced in the background on one thread
    dense, train_info = dense_model(args, tr, va)
    models = {}
    for sp in [float(s) for s in args.speedups.split(",")]:
        models[f"{args.criterion}_x{sp:g}"] = pruned_model(args, dense, tr, va, sp)
    if args.train_only:
        return
    torch.set_num_threads(args.threads)
    results = {"dense": {**train_info, "arch": args.arch, "size": args.size,
                         "spec": spec, "split": "phantom patient-wise train/val/test"},
               "pairs": {}}
    md = list(MD_HEAD)
    for name, (pm, pinfo) in models.items():
        load0 = os.getloadavg()
        t0, c0 = time.perf_counter(), time.process_time()
        res = audit_changes(dense, {name: pm}, te, n_images=args.n_images,
                            n_boot=args.n_boot, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        load1 = os.getloadavg()
        res.save(Path(args.work) / "audit" / name)
        p = res.pairs[0]
        results["pairs"][name] = {
            **pinfo, "n_images": res.n, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "within_target_cpu_s_300": bool(cpu <= 300), "seconds": p.seconds,
            "torch_threads": torch.get_num_threads(), "loadavg_before": load0,
            "loadavg_after": load1, "headline": p.headline(), "audit": p.to_dict()}
        md.append(md_row(name, results["pairs"][name]))
        results["pairs"][name]["md_row"] = md[-1]
        print(md[-1], flush=True)
        write(args, spec, results, MD_HEAD)   # after every pair: a partial run still reports


def pair_call(args) -> None:
    """``--pair``: the full audit of two saved models on ``--data`` [test]; stored under
    ``results.other_pairs[--pair-name]`` of changes.json (its own markdown table below)."""
    dense, comp = load_model(args.pair[0]).eval(), load_model(args.pair[1]).eval()
    te = open_dataset(args.data, split="test", preprocess=dense.card.preprocess)
    name = args.pair_name or Path(args.pair[1]).name
    comp_torch, build = comp, {}
    if args.pair_runtime:
        from medscalpel.deploy.served import runtime_model
        from medscalpel.engine.predict import collect_images

        tr = open_dataset(args.data, split="train", preprocess=dense.card.preprocess)
        t0 = time.perf_counter()
        comp = runtime_model(comp_torch, args.pair_runtime,
                             collect_images(tr, 32, seed=1)[0], threads=args.threads)
        build = {"runtime": args.pair_runtime, "build_wall_s": round(time.perf_counter() - t0, 1),
                 "parity": comp.parity, "calib": "32 images of the train split (seed 1)"}
        name = args.pair_name or f"{Path(args.pair[1]).name}@{args.pair_runtime}"
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    from medscalpel.audit.changes import MEASURES

    # a folder dataset carries no per-image attributes: the subgroup measure is skipped, stated
    measures = [m for m in MEASURES if m != "subgroups" or hasattr(te, "attributes")]
    res = audit_changes(dense, {name: comp}, te, n_images=args.n_images, n_boot=args.n_boot,
                        measures=measures, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    load1 = os.getloadavg()
    res.save(Path(args.work) / "audit" / name)
    p = res.pairs[0]
    from medscalpel.compress.measure import count_macs

    x = te.image(0)[None]
    entry = {"dense_dir": args.pair[0], "compressed_dir": args.pair[1], "data": args.data,
             "arch": dense.card.arch, "size": dense.card.preprocess.size,
             "speedup_macs": count_macs(dense, x) / count_macs(comp_torch, x), "n_images": res.n,
             **({"runtime_build": build} if build else {}),
             "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
             "within_target_wall_s_300": bool(wall <= 300), "seconds": p.seconds,
             "torch_threads": torch.get_num_threads(), "loadavg_before": load0,
             "loadavg_after": load1, "headline": p.headline(), "audit": p.to_dict(),
             "measures": measures, "skipped": ([] if "subgroups" in measures else
             ["subgroups: the dataset carries no per-image attributes (sex, age, view)"])
             + [f"{k}: {v}" for k, v in p.skipped.items()]}
    entry["md_row"] = md_row(name, entry)
    print(entry["md_row"], flush=True)
    stored = json.loads((RESULTS / "changes.json").read_text())
    results = stored["results"]
    results.setdefault("other_pairs", {})[name] = entry
    save_result("changes", results, stored["config"])
    cfg = argparse.Namespace(**stored["config"])
    write_text(RESULTS / "changes.md", md_text(cfg, [
        *MD_HEAD, *(v["md_row"] for v in results["pairs"].values())]))


#: the demo-ready call (report section of the demo): one pair, lighter settings
DEMO_KW = dict(n_images=200, n_boot=200, n_faithfulness=32, severities=(2,), progress=False)


def demo_call(args) -> dict:
    """Time the demo-ready call on the demo's 'quick' architecture (densenet_small, 64 px):
    the dense model is randomly initialised (cost does not depend on the weights) and pruned
    to ~4x fewer MACs with the same criterion."""
    pp = Preprocess(args.size)
    te = open_dataset(f"phantom?n=2000&size={args.size}&seed=0", split="test", preprocess=pp)
    seed_everything(0)
    m = create_model("densenet_small", te.num_classes, 1, args.size)
    m.card = make_card(m, te.class_names, te.task, pp)
    calib = torch.stack([te.image(i) for i in range(32)])
    pr = prune_structured(m, calib, criterion=args.criterion, target_speedup=4.0,
                          measure_latency=False, progress=False)
    runs = []
    for _ in range(2):
        load0 = os.getloadavg()
        t0, c0 = time.perf_counter(), time.process_time()
        res = audit_changes(m, {"structured_x4": pr.model}, te, **DEMO_KW)
        runs.append({"wall_s": round(time.perf_counter() - t0, 1),
                     "cpu_s": round(time.process_time() - c0, 1), "loadavg_before": load0,
                     "loadavg_after": os.getloadavg(), "seconds": res.pairs[0].seconds})
    return {"call": "audit_changes(dense, {'structured_x4': pruned}, test, n_images=200, "
                    "n_boot=200, n_faithfulness=32, severities=(2,))",
            "arch": "densenet_small", "size": args.size, "speedup_macs": pr.speedup_macs,
            "n_test_images": len(te), "torch_threads": torch.get_num_threads(), "runs": runs}


def write(args, spec, results, md) -> None:
    cfg = {**vars(args), "spec": spec, "split": "test", "omp_num_threads":
           os.environ.get("OMP_NUM_THREADS"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    old = RESULTS / "changes.json"
    if old.is_file():   # keep what another stage of this script measured
        import json

        stored = json.loads(old.read_text())
        prev = stored.get("results", {})
        if args.demo_only:   # the config on file describes the pairs run: keep it
            cfg = {**stored.get("config", {}), "demo_only_threads": args.threads}
        if "pairs" in results and "pairs" in prev:   # pairs measured earlier stay unless rerun
            results = {**results, "pairs": {**prev["pairs"], **results["pairs"]}}
        results = {**{k: v for k, v in prev.items() if k not in results}, **results}
    if md:
        md = md + [p["md_row"] for p in results.get("pairs", {}).values() if "md_row" in p]
    save_result("changes", results, cfg)
    if not md:
        return
    write_text(RESULTS / "changes.md", md_text(args, md))


def md_text(args, md) -> str:
    other = _other_pairs_md()
    return other and _md_text(args, md) + other or _md_text(args, md)


def _other_pairs_md() -> str:
    f = RESULTS / "changes.json"
    pairs = json.loads(f.read_text())["results"].get("other_pairs") if f.is_file() else None
    if not pairs:
        return ""
    lines = ["", "## Other pairs (``--pair``: saved models audited on their own data)", "",
             *MD_HEAD]
    lines += [v["md_row"] for v in pairs.values()]
    lines += [""] + [f"- {k}: {v['arch']} at {v['size']} px, {v['data']} [test], "
                     f"{v['n_images']} images; dense {v['dense_dir']}, compressed "
                     f"{v['compressed_dir']}"
                     + (f" run on {v['runtime_build']['runtime']} (parity max |delta logit| "
                        f"{v['runtime_build']['parity']['max_abs_delta_logit']:.3g}, built in "
                        f"{v['runtime_build']['build_wall_s']:.0f} s)"
                        if v.get("runtime_build") else "") + f"; audit wall {v['wall_s']:.0f} s on "
                     f"{v['torch_threads']} threads (load {v['loadavg_before'][0]:.1f}-"
                     f"{v['loadavg_after'][0]:.1f})" for k, v in pairs.items()]
    return "\n".join(lines) + "\n"


def _md_text(args, md) -> str:
    return (f"# What compression changed: phantom {args.arch} 64 px (benchmarks/changes_bench.py)"
            "\n\n" + "\n".join(md) + "\n\nLoad averages, per-measure seconds and every "
            f"statistic: changes.json. Dense model: {args.arch} trained here for {args.epochs} "
            f"epochs; pruned models: prune_structured(criterion={args.criterion!r}) with a "
            f"{args.recovery_epochs}-epoch x {args.recovery_steps} batch recovery fine-tune. "
            f"CPU s = process CPU time of the audit ({args.threads} torch threads, summed); wall "
            "s was measured on a shared machine (load average column) and is an upper bound. "
            "Empty Grad-CAM maps (ReLU of negative class evidence) are not scored; the CAM "
            "layer is 2x2 at 64 px.\n")


if __name__ == "__main__":
    main()
