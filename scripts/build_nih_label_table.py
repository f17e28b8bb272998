"""Build the NIH ChestX-ray14 label-combination table shipped with medscalpel.

The phantom dataset resamples real NIH label vectors from this table, so its prevalence,
co-occurrence and long tail match ChestX-ray14. The table holds counts only (no images, no
identifiers): for every distinct combination of the 14 findings, how many of the 112,120
images carry exactly that combination ("" = No Finding).

Usage:
    python scripts/build_nih_label_table.py \
        --csv ../shared/data/nih14-labels/Data_Entry_2017_v2020.csv.gz \
        --out medscalpel/resources/nih_label_combinations.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

import pandas as pd

CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
           "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
           "Pleural_Thickening", "Hernia"]


def build(csv_path: Path) -> dict:
    df = pd.read_csv(csv_path, usecols=["Image Index", "Finding Labels"])
    counts: Counter[str] = Counter()
    for row, text in enumerate(df["Finding Labels"].astype(str)):
        names = [t.strip() for t in text.split("|") if t.strip()]
        names = [n for n in names if n != "No Finding"]
        unknown = [n for n in names if n not in CLASSES]
        if unknown:
            raise SystemExit(f"{csv_path}: row {row + 2} has unknown finding(s) {unknown}; "
                             f"expected names from {CLASSES} or 'No Finding'.")
        key = "|".join(sorted(set(names), key=CLASSES.index))
        counts[key] += 1
    combos = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    md5 = hashlib.md5(Path(csv_path).read_bytes()).hexdigest()
    return {
        "schema_version": 1,
        "source": "NIH ChestX-ray14 Data_Entry_2017_v2020.csv (official metadata)",
        "source_md5": md5,
        "class_names": CLASSES,
        "n_images": int(len(df)),
        "n_combinations": len(combos),
        "combinations": [[k, int(v)] for k, v in combos],
    }


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path,
                    default=here.parent / "shared/data/nih14-labels/Data_Entry_2017_v2020.csv.gz")
    ap.add_argument("--out", type=Path,
                    default=here / "medscalpel/resources/nih_label_combinations.json")
    args = ap.parse_args()
    if not args.csv.is_file():
        raise SystemExit(f"NIH metadata file not found: {args.csv}. Pass --csv PATH to the "
                         "official Data_Entry_2017_v2020.csv(.gz).")
    table = build(args.csv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # one combination per line: small diffs, easy to read
    lines = [json.dumps(c) for c in table.pop("combinations")]
    head = json.dumps(table, indent=1)[:-2]
    text = head + ',\n "combinations": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"
    json.loads(text)  # self-check
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {table['n_combinations']} combinations of "
          f"{table['n_images']} images")


if __name__ == "__main__":
    main()
