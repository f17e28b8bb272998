"""The evidence behind 'mutually exclusive' on NIH ChestX-ray14 (issue 21; docs/reports.md).

For every one of the 91 label pairs of the official NIH label table (112,120 images) this
computes observed vs expected co-occurrences, the lift with its exact 95% CI, the one-sided exact
p-value and the verdict of the default exclusion rule
(:class:`medscalpel.data.cooccurrence.ExclusionRule`), and writes the 25 pairs with Jaccard
< 0.01 (the pairs the old Jaccard rule called "mutually exclusive") as a table. It does the
same for the 1,000-image NIH sample, where pairs never co-occur by sampling alone.

Usage:
    python scripts/nih_exclusion_table.py \
        --labels ../shared/data/nih14-labels --sample ../shared/data/nih14-sample64 \
        --out benchmarks/results/nih_exclusion.json          # also writes nih_exclusion.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel import __version__
from medscalpel.data.cooccurrence import ExclusionRule, cooccurrence_evidence
from medscalpel.data.nih import find_nih_label_file
from medscalpel.data.spec import open_dataset
from medscalpel.runs import atomic_path, hash_file, write_json

JACCARD_LEVEL = 0.01  # the old clinical-report rule's level


def table(root: Path, rule: ExclusionRule) -> dict[str, Any]:
    ds = open_dataset(f"nih:{root}?labels_only=true", split="all")
    ev = cooccurrence_evidence(ds.labels, ds.class_names, rule, source=f"nih:{root} (all)")
    low = sorted((p for p in ev.pairs if p.jaccard < JACCARD_LEVEL), key=lambda p: p.lift)
    verdicts = {v: sum(p.verdict == v for p in ev.pairs)
                for v in ("exclusive", "not_exclusive", "insufficient")}
    label_file = find_nih_label_file(root)
    return {"label_file": label_file.name, "label_file_md5": hash_file(label_file, "md5"),
            "n_images": ev.n, "n_pairs": len(ev.pairs), "enough_images": ev.enough_images,
            "warnings": list(ev.warnings), "n_exclusive": len(ev.exclusive_pairs()),
            "verdicts_all_pairs": verdicts,
            "n_never_cooccur": sum(p.observed == 0 and p.count_a > 0 and p.count_b > 0
                                   for p in ev.pairs),
            "n_jaccard_below_level": len(low),
            "min_lift_upper_all_pairs": float(np.nanmin([p.lift_ci[1] for p in ev.pairs])),
            "low_jaccard_pairs": [p.to_dict() for p in low],
            "never_cooccur_pairs": [[p.a, p.b, round(p.expected, 2)] for p in ev.pairs
                                    if p.observed == 0 and p.count_a > 0 and p.count_b > 0]}


def markdown(res: dict[str, Any]) -> str:
    full = res["results"]["full"]
    rule = res["config"]["rule"]
    lines = [
        "# NIH ChestX-ray14: the 25 label pairs with Jaccard < 0.01, judged by evidence",
        "",
        f"Written by `scripts/nih_exclusion_table.py` ({res['date']}, medscalpel "
        f"{res['versions']['medscalpel']}). Label table: `{full['label_file']}` (md5 "
        f"{full['label_file_md5']}), {full['n_images']:,} images, all rows (every label known). "
        f"Rule: upper {rule['confidence']:.0%} CI bound of the lift < {rule['max_lift_upper']}, "
        f">= {rule['min_expected']:g} expected co-occurrences, >= {rule['min_images']} images.",
        "",
        "| pair | Jaccard | observed | expected | lift | 95% CI of lift | p (fewer) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in full["low_jaccard_pairs"]:
        lo, hi = p["lift_ci"]
        lines.append(f"| {p['a']} - {p['b']} | {p['jaccard']:.4f} | {p['observed']} | "
                     f"{p['expected']:.1f} | {p['lift']:.2f} | {lo:.2f}-{hi:.2f} | "
                     f"{p['p_value']:.2g} | {p['verdict']} |")
    lines += ["", f"Exclusive pairs under the rule: {full['n_exclusive']} of {full['n_pairs']}. "
              f"Lowest upper CI bound of the lift over all pairs: "
              f"{full['min_lift_upper_all_pairs']:.2f}."]
    if "sample" in res["results"]:
        s = res["results"]["sample"]
        lines += ["", f"1,000-image NIH sample (`{s['label_file']}`): {s['n_never_cooccur']} "
                  f"pairs never co-occur, {s['n_exclusive']} exclusive under the rule "
                  f"(enough images: {s['enough_images']})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, default=Path("../shared/data/nih14-labels"))
    ap.add_argument("--sample", type=Path, default=Path("../shared/data/nih14-sample64"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/nih_exclusion.json"))
    args = ap.parse_args(argv)
    rule = ExclusionRule()
    results = {"full": table(args.labels, rule)}
    if args.sample.is_dir():
        results["sample"] = table(args.sample, rule)
    res = {"benchmark": "nih_exclusion", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "machine": {"python": platform.python_version(), "platform": platform.platform()},
           "versions": {"medscalpel": __version__, "numpy": np.__version__,
                        "scipy": __import__("scipy").__version__},
           "config": {"rule": rule.to_dict(), "rule_text": rule.describe(),
                      "jaccard_level": JACCARD_LEVEL, "labels": str(args.labels),
                      "sample": str(args.sample), "command": " ".join(sys.argv)},
           "results": results}
    write_json(args.out, res)
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(res))
    full = results["full"]
    print(f"{full['n_images']} images: {full['n_jaccard_below_level']} pairs with Jaccard < "
          f"{JACCARD_LEVEL}, {full['n_exclusive']} exclusive -> {args.out}")


if __name__ == "__main__":
    main()
