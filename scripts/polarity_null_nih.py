"""What chance gives in the polarized-channel table on real NIH labels (docs/explain.md):
a random classifier weight matrix against the official NIH ChestX-ray14 training labels.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/polarity_null_nih.py \
        [--data ../shared/data]

Random W ~ N(0, 0.05^2) of shape [14, 1024] (DenseNet121's head; numpy default_rng(0)), the
official train_val labels of Data_Entry_2017_v2020.csv.gz, QuantileRule(q=0.9), 200 draws per
null model, seed 0, max_channels=100 (seed 000's table size). Also: Jaccard categories of the
91 label pairs on train_val, on all 112,120 images and on the 1,000-image nih14-sample64.
Writes benchmarks/results/polarity_null_nih.json (labels stay in the shared data folder).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_result  # noqa: E402
from medscalpel.data.labels import NIH_CLASSES  # noqa: E402
from medscalpel.data.nih import read_nih_labels  # noqa: E402
from medscalpel.explain.polarity import (QuantileRule, classify_jaccard,  # noqa: E402
                                         jaccard_matrix, polarity_analysis)

CATS = ("perfect", "legitimate", "mixed", "conflict")


def pair_summary(y: np.ndarray) -> dict:
    """Jaccard category counts of the 91 class pairs and the largest Jaccard index."""
    jac = jaccard_matrix(y)
    iu = np.triu_indices(len(NIH_CLASSES), 1)
    cats = classify_jaccard(jac[iu], (0.1, 0.3))
    zero = [[NIH_CLASSES[a], NIH_CLASSES[b]] for a, b in zip(*iu) if jac[a, b] == 0]
    return {"n_images": int(len(y)), "n_pairs": int(len(cats)),
            "counts": {c: int(np.sum(cats == c)) for c in CATS},
            "max_jaccard": float(jac[iu].max()), "pairs_with_jaccard_0": zero}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    t0 = time.time()
    data = Path(args.data)
    table = read_nih_labels(data / "nih14-labels" / "Data_Entry_2017_v2020.csv.gz")
    train_val = set((data / "nih14-labels" / "train_val_list.txt").read_text().split())
    tv = table[table["id"].isin(train_val)]
    y_tv = tv[list(NIH_CLASSES)].to_numpy()
    y_all = table[list(NIH_CLASSES)].to_numpy()
    y_sample = read_nih_labels(data / "nih14-sample64" / "Data_Entry_2017.csv")[
        list(NIH_CLASSES)].to_numpy()
    w = np.random.default_rng(0).normal(0.0, 0.05, size=(len(NIH_CLASSES), 1024))
    res = polarity_analysis(w, y_tv, NIH_CLASSES, QuantileRule(q=0.9), n_null=200,
                            max_channels=100, seed=0)
    d = res.to_dict()
    d.pop("channels")
    c, h = NIH_CLASSES.index("Cardiomegaly"), NIH_CLASSES.index("Hernia")
    both = int(np.sum((y_tv[:, c] > 0.5) & (y_tv[:, h] > 0.5)))
    save_result("polarity_null_nih", {
        "polarity": d,
        "label_pairs": {"train_val": pair_summary(y_tv), "all": pair_summary(y_all),
                        "nih14_sample64": pair_summary(y_sample)},
        "cardiomegaly_hernia_train_val": {"co_occurrences": both,
                                          "jaccard": float(jaccard_matrix(y_tv)[c, h])},
        "seconds": round(time.time() - t0, 1), "loadavg": list(os.getloadavg()),
    }, {"weight": "numpy default_rng(0).normal(0, 0.05, [14, 1024])",
        "labels": "nih14-labels/Data_Entry_2017_v2020.csv.gz restricted to train_val_list.txt",
        "rule": "QuantileRule(q=0.9)", "n_null": 200, "max_channels": 100, "seed": 0,
        "bounds": [0.1, 0.3]})


if __name__ == "__main__":
    main()
