"""Replicates of the OFA benchmark (issue 30): one summary over ``ofa_bench.py`` results that
differ only in ``--seed``.

Each seed is a full replicate: the teacher, the ONE supernet and its search, the candidate
students and the pruned teacher are all trained again. On Kermany the seed draws another
training subsample and the patient-wise validation and test splits stay the same (the folder
adapter's split seed is fixed): the seeds vary the training, not the test set. On the phantom
the seed generates another phantom, so every split differs (``same_test_split`` says which).
The summary does not pool evidence across seeds: each seed's verdicts carry their own Holm
correction, and this script counts them (how many seeds meet the target "at least one OFA
subnet dominates a candidate student", and how often each (budget rank, student) pair got each
verdict), next to the spread of every model's test macro AUROC and served latency over the
seeds. Usage::

    .venv/bin/python benchmarks/ofa_seeds.py benchmarks/results/ofa_kermany_128.json \
        benchmarks/results/ofa_kermany_128_seed1.json \
        benchmarks/results/ofa_kermany_128_seed2.json \
        --out benchmarks/results/ofa_kermany_128_seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medscalpel.runs import write_json  # noqa: E402

# settings that may differ between replicates (everything else must match)
PER_SEED = ("seed", "work", "out", "plot", "replot")


class NotReplicates(ValueError):
    """The results given are not replicates of one setting (the message names the file)."""
OUTCOMES = ("dominates", "dominated", "undecided")


def _model_key(name: str, budgets: list[float]) -> str:
    """``ofa:budget_0.0998ms`` -> ``ofa:budget#2`` (budgets are measured per seed; ranks match)."""
    if not name.startswith("ofa:budget_"):
        return name
    ms = float(name[len("ofa:budget_"):-len("ms")])
    rank = min(range(len(budgets)), key=lambda i: abs(budgets[i] - ms))
    return f"ofa:budget#{rank + 1}"


def check_replicates(results: list[dict], names: list[str]) -> None:
    """Refuse results that are not replicates of one setting (one line naming the file)."""
    if len(results) < 2:
        raise NotReplicates("ofa_seeds: give at least two results of ofa_bench.py")
    ref = {k: v for k, v in results[0]["settings"].items() if k not in PER_SEED}
    seeds = []
    for res, name in zip(results, names):
        if res.get("benchmark") != "ofa":
            raise NotReplicates(f"ofa_seeds: {name} is not a result of ofa_bench.py")
        got = {k: v for k, v in res["settings"].items() if k not in PER_SEED}
        diff = sorted(k for k in set(ref) | set(got) if ref.get(k) != got.get(k))
        if diff:
            raise NotReplicates(f"ofa_seeds: {name} differs from {names[0]} in {', '.join(diff)} "
                             f"(only {', '.join(PER_SEED)} may differ)")
        seeds.append(res["settings"]["seed"])
    if len(set(seeds)) != len(seeds):
        raise NotReplicates(f"ofa_seeds: the same seed twice: {seeds}")


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1
            else 0.0, "min": min(values), "max": max(values), "n": len(values)}


def _note(same_split: bool) -> str:
    if same_split:
        return ("seeds vary the training subsample, the teacher, the supernet, the students and "
                "the pruned teacher; the validation and test splits are the same in every seed "
                "(one data spec), so the seeds are not independent test sets and no evidence is "
                "pooled across them: each seed's verdicts are corrected within that seed only")
    return ("each seed has its own data (the data specs differ: e.g. a phantom generated with "
            "that seed, so its training, validation and test images all differ) and trains "
            "every model again; no evidence is pooled across seeds: each seed's verdicts are "
            "corrected within that seed only")


def summarise(results: list[dict], names: list[str]) -> dict:
    check_replicates(results, names)
    per_seed, pairs, models = [], {}, {}
    for res, name in zip(results, names):
        budgets = res["budgets_ms"]
        dom = res.get("dominance") or {"pairs": []}
        counts = Counter(p["outcome"] for p in dom["pairs"])
        dominating = [_model_key(p["candidate"], budgets) + " > " + p["other"]
                      for p in dom["pairs"] if p["outcome"] == "dominates"]
        per_seed.append({
            "seed": res["settings"]["seed"], "file": Path(name).name,
            "budgets_ms": budgets, "teacher_test_auroc": res["rows"]["teacher"]["test_auroc"],
            "verdicts": {o: counts.get(o, 0) for o in OUTCOMES},
            "n_pairs": len(dom["pairs"]), "target_met": bool(dominating),
            "dominating_pairs": dominating,
            # served: the search confirmed a subnet within the budget; met: that subnet also
            # stayed within it in the final alternated timing beside the other models
            "budgets_served": [r["ofa"] is not None for r in res["per_budget"]],
            "budgets_met_final": [r["ofa"] is not None and r["ofa"]["latency_ms"] <= r["budget_ms"]
                                  for r in res["per_budget"]],
            # the CPU (model and flags) each seed's latencies were measured on
            "cpu": res["machine"].get("cpu"),
            "load_average_at_end": res["machine"].get("load_average_at_end"),
            "seconds_total": res.get("seconds_total")})
        for p in dom["pairs"]:
            key = f"{_model_key(p['candidate'], budgets)} vs {p['other']}"
            pairs.setdefault(key, Counter())[p["outcome"]] += 1
        for mname, row in res["rows"].items():
            m = models.setdefault(_model_key(mname, budgets),
                                  {"test_auroc": [], "latency_ms": [], "delta_auroc": [],
                                   "macs": []})
            m["test_auroc"].append(row["test_auroc"])
            m["latency_ms"].append(row["latency_ms"])
            m["macs"].append(row["macs"])
            if row.get("delta_auroc") is not None:
                m["delta_auroc"].append(row["delta_auroc"])
    n = len(results)
    same_split = len({json.dumps(r["data"]["spec"]) for r in results}) == 1
    n_met = sum(s["target_met"] for s in per_seed)
    return {
        "benchmark": "ofa_seeds", "dataset": results[0]["dataset"],
        "settings": {k: v for k, v in results[0]["settings"].items() if k not in PER_SEED},
        "seeds": [s["seed"] for s in per_seed], "per_seed": per_seed,
        "target": "at least one OFA subnet dominates a candidate student (per seed, Holm "
                  "over that seed's pairs)",
        "target_met_seeds": n_met, "n_seeds": n,
        "pairs": {k: {o: c.get(o, 0) for o in OUTCOMES} for k, c in pairs.items()},
        "models": {k: {f: _spread(v) for f, v in m.items() if v} for k, m in models.items()},
        "same_test_split": same_split, "note": _note(same_split),
        "summary": f"target met in {n_met} of {n} seed(s)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def markdown(s: dict) -> str:
    lines = [f"# OFA benchmark over seeds: {s['dataset']} {s['settings']['size']} px",
             "", f"**{s['summary']}** ({s['target']}). {s['note']}.", "",
             ("| seed | teacher AUROC | budgets ms | budgets served (search) / met (final timing) "
              "| dominates / dominated / undecided | dominating pairs | load avg at end |"),
             "|---|---|---|---|---|---|---|"]
    for p in s["per_seed"]:
        v = p["verdicts"]
        load = p["load_average_at_end"]
        lines.append(
            f"| {p['seed']} | {p['teacher_test_auroc']:.3f} | "
            f"{', '.join(f'{b:.3f}' for b in p['budgets_ms'])} | "
            f"{sum(p['budgets_served'])} / {sum(p['budgets_met_final'])} of "
            f"{len(p['budgets_served'])} | "
            f"{v['dominates']} / {v['dominated']} / {v['undecided']} of {p['n_pairs']} | "
            f"{'; '.join(p['dominating_pairs']) or '-'} | "
            f"{', '.join(f'{x:.1f}' for x in load) if load else '-'} |")
    lines += ["", ("| model (OFA: budget rank) | test macro AUROC mean [min, max] | "
                   "delta vs teacher mean [min, max] | latency ms mean [min, max] | MACs mean |"),
              "|---|---|---|---|---|"]
    for name, m in s["models"].items():
        a, lat = m["test_auroc"], m["latency_ms"]
        d = m.get("delta_auroc")
        dtxt = f"{d['mean']:+.4f} [{d['min']:+.4f}, {d['max']:+.4f}]" if d else "-"
        lines.append(f"| {name} | {a['mean']:.4f} [{a['min']:.4f}, {a['max']:.4f}] | {dtxt} | "
                     f"{lat['mean']:.3f} [{lat['min']:.3f}, {lat['max']:.3f}] | "
                     f"{m['macs']['mean'] / 1e6:.2f}M |")
    lines += ["", "| pair | dominates | dominated | undecided |", "|---|---|---|---|"]
    for key, c in s["pairs"].items():
        lines.append(f"| {key} | {c['dominates']} | {c['dominated']} | {c['undecided']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="result JSONs of ofa_bench.py, one per seed")
    p.add_argument("--out", required=True, help="summary JSON (a .md table is written beside)")
    args = p.parse_args(argv)
    loaded = []
    for name in args.results:
        try:
            loaded.append(json.loads(Path(name).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"ofa_seeds: cannot read {name}: {e}", file=sys.stderr)
            return 2
    try:
        s = summarise(loaded, args.results)
    except NotReplicates as e:
        print(e, file=sys.stderr)
        return 2
    write_json(args.out, s)
    Path(args.out).with_suffix(".md").write_text(markdown(s))
    print(s["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
