"""Per-class threshold calibration on a real CheXNet (DenseNet121) reproduction's NIH outputs.

The reference predictions (22,433 NIH images, sigmoid probabilities for 14 findings) are split
by PATIENT into a calibration half and an evaluation half. Youden's J, F1-optimal and
target-sensitivity (0.9) thresholds are fitted per class on the calibration half and evaluated on
the other half against the default 0.5 (F1, recall, precision; per class and macro). A second
seed of the patient split shows the spread.

Run:  .venv/bin/python benchmarks/calibration_nih.py
Writes benchmarks/results/calibration_nih.json and prints a markdown table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save_result  # noqa: E402

from medscalpel.data.base import split_by_patient  # noqa: E402
from medscalpel.repair.calibrate import calibrate_thresholds  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PREDS = DATA / "chexnet-reference-predictions" / "preds.csv"
LABELS = DATA / "nih14-labels"


def load():
    """Predictions with labels and the patient id of each image."""
    try:
        from medscalpel.data.spec import open_dataset
        from medscalpel.engine.importer import import_predictions

        spec = f"nih:{LABELS}?labels_only=true"
        preds = import_predictions(PREDS, spec, split="nih-reference")
        ds = open_dataset(spec, split="all")
        pid = dict(zip(ds.ids, ds.patient_ids))
        return preds, [pid[i] for i in preds.ids], "medscalpel.engine.importer"
    except ImportError:  # importer not available: read the CSVs directly
        import pandas as pd

        from medscalpel.engine.predictions import Predictions

        names = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                 "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
                 "Pleural_Thickening", "Hernia"]
        df = pd.read_csv(PREDS)
        meta = pd.read_csv(LABELS / "Data_Entry_2017_v2020.csv.gz").set_index("Image Index")
        meta = meta.loc[df["Image Index"]]
        lab = np.array([[n in s.split("|") for n in names] for s in meta["Finding Labels"]],
                       np.float32)
        p = np.clip(df[[f"prob_{n}" for n in names]].to_numpy(np.float64), 1e-7, 1 - 1e-7)
        preds = Predictions(np.log(p) - np.log1p(-p), lab, tuple(df["Image Index"]),
                            tuple(names), "multilabel", "nih-reference")
        return preds, meta["Patient ID"].astype(str).tolist(), "pandas"


def main() -> None:
    if not PREDS.is_file():
        raise SystemExit(f"real data not available: {PREDS}")
    t0 = time.perf_counter()
    preds, patients, reader = load()
    out = {"n_images": preds.n, "n_patients": len(set(patients)), "reader": reader, "runs": {}}
    for seed in (0, 1):
        cal_rows, eval_rows = split_by_patient(patients, 0.5, seed=seed)
        fit, ev = preds.select(cal_rows), preds.select(eval_rows)
        assert not set(patients[i] for i in cal_rows) & set(patients[i] for i in eval_rows)
        runs = {}
        for method in ("youden", "f1", "sensitivity"):
            tm = time.perf_counter()
            r = calibrate_thresholds(fit, ev, method=method, target_sensitivity=0.9)
            runs[method] = {"seconds": round(time.perf_counter() - tm, 3),
                            **r.evaluation.to_dict()}
        out["runs"][f"seed{seed}"] = {"n_calibration": fit.n, "n_evaluation": ev.n,
                                      "methods": runs}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    path = save_result("calibration_nih", out, {"split": "by patient, 50/50, seeds 0 and 1",
                                                "baseline": 0.5, "target_sensitivity": 0.9,
                                                "source": str(PREDS.relative_to(DATA))})
    print(markdown(out))
    print(f"\nwritten {path}")


def markdown(out) -> str:
    lines = []
    s0 = out["runs"]["seed0"]
    lines.append(f"Calibration half {s0['n_calibration']} images, evaluation half "
                 f"{s0['n_evaluation']} images (patient split, seed 0).\n")
    lines.append("| method | macro F1 @0.5 | macro F1 | x | macro recall @0.5 | macro recall | x | "
                 "macro precision @0.5 | macro precision |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for seed, run in out["runs"].items():
        for m, r in run["methods"].items():
            c, d, x = r["macro"]["calibrated"], r["macro"]["default"], r["macro"]["ratio"]
            lines.append(f"| {m} ({seed}) | {d['f1']:.3f} | {c['f1']:.3f} | {x['f1']:.2f} | "
                         f"{d['recall']:.3f} | {c['recall']:.3f} | {x['recall']:.2f} | "
                         f"{d['precision']:.3f} | {c['precision']:.3f} |")
    lines.append("\nPer class, Youden's J (seed 0):\n")
    lines.append("| class | thr | F1 @0.5 | F1 | recall @0.5 | recall | precision @0.5 | "
                 "precision |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for c in s0["methods"]["youden"]["classes"]:
        a, d = c["calibrated"], c["default"]
        lines.append(f"| {c['class']} | {c['threshold']:.3f} | {d['f1']:.3f} | {a['f1']:.3f} | "
                     f"{d['recall']:.3f} | {a['recall']:.3f} | {d['precision']:.3f} | "
                     f"{a['precision']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
