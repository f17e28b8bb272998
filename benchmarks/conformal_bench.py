"""Conformal guarantees for thresholds (issue V): do they hold over many patient-wise splits,
and what do they cost next to Youden's J and a plain target-sensitivity threshold?

For each source, ``--splits`` random PATIENT-wise 50/50 calibration / test splits
(:func:`medscalpel.repair.conformal.patient_split`, seed = split number). On the calibration
half, per class:

* ``ltt_recall``: ``recall>=T`` with confidence ``1 - alpha`` (binomial / Clopper-Pearson,
  Learn then Test);
* ``crc_recall``: ``E[recall]>=T`` (Conformal Risk Control);
* ``sensitivity``: the point threshold with calibration sensitivity >= T
  (:class:`~medscalpel.repair.calibrate.ThresholdCalibrator`, no guarantee);
* ``youden``: Youden's J (no recall target at all);
* ``ltt_precision``: ``precision>=P`` with confidence ``1 - alpha`` (fixed-sequence LTT);
* ``crc_fnr``: the multi-label set ``fnr<=a`` (one shared threshold, CRC).

On the test half: the realised recall, precision and flagged share. Reported per class and as
the mean over classes: the share of splits where the class was certified, the share of
certified splits whose realised recall (precision) reached the target (``coverage``; the
high-probability guarantees promise >= 1 - alpha of the POPULATION recall, not of a finite test
half), the mean realised recall (CRC promises its mean >= T), mean precision and flagged share
(the cost).

The exchangeable null of the test-half share (issue 29), for the two order-statistic recall
rules (``ltt_recall``, ``crc_recall``): per split and class, the exact probability that the test
half meets T if calibration and test positives are exchangeable
(:func:`medscalpel.repair.conformal.expected_test_share`, negative-hypergeometric), averaged
over the certified splits, against the observed share (Poisson-binomial range and p), with the
test misses' excess and variance ratio against their law; the same for an IMAGE-wise control
(the same seeds, every image its own patient: the design under which the law is exact given
the held-out set), and how the positives cluster in patients. See the markdown's text for what
this does and does not show.

Sources:
* ``phantom``: a small model (``--arch``, ``--epochs``) trained on ``phantom?n=N&size=64``,
  predicting EVERY image of a fresh phantom population (``seed=--eval-seed``: synthetic patients
  never seen in training); patient ids from the phantom.
* ``nih``: the real CheXNet reproduction's predictions on 22,433 NIH images
  (``../shared/data/chexnet-reference-predictions``), patient ids from the NIH table; skipped
  with a reason when the data is absent.
* ``kermany``: a small model (``--kermany-arch`` at ``--kermany-size`` px, ``--kermany-epochs``)
  trained on the folder adapter's PATIENT-wise split of ``../shared/data/kermany-pneumonia/train``
  (byte-identical files dropped, patient ids from the file names ``person123_...``, the same
  ``folder:`` spec path as benchmarks/compress_bench.py and
  scripts/foundation_kermany_patientwise.py; ``test_fraction=--kermany-test-fraction`` of the
  patients held out, early stopping on the ``val`` patients), predicting only the held-out
  ``test`` patients; one class (PNEUMONIA vs NORMAL, :func:`~medscalpel.repair.calibrate.
  binary_view`). Skipped with a reason when the data is absent.

Population mode (``--population``, benchmarks/conformal_population.py): the same phantom model
and targets, but each draw's thresholds (``ltt_recall``, also on one image per patient,
``crc_recall``, ``sensitivity``, ``youden``) are calibrated on an INDEPENDENT draw (a group
of disjoint patients of one of ``--chunk-seeds`` fresh phantoms; ``--parts`` groups a phantom)
and scored on the POPULATION of all the other phantoms: the quantity the high-probability
guarantee bounds, without a test half's noise. Writes conformal_population.json / .md.

Run:  nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conformal_bench.py
      [--splits 500] [--sources phantom,nih] [--name conformal]
      (population: --population [--chunk-seeds 101-110,201-210,301-330 --parts 2,4,10])
      (Kermany: --sources kermany --precision 0.95 --name conformal_kermany; its prevalence
      is about 0.74, so the default precision target 0.5 would be met by flagging everyone)
Writes benchmarks/results/NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conformal_population as cp  # noqa: E402
from common import RESULTS, save_result  # noqa: E402

from medscalpel.engine.predictions import Predictions  # noqa: E402
from medscalpel.repair.calibrate import ThresholdCalibrator  # noqa: E402
from medscalpel.repair.conformal import (HELDOUT_TOL, calibrate_guarantee,  # noqa: E402
                                         compare_test_share, expected_test_share,
                                         heldout_miss_pmf, miss_rate_upper_bound,
                                         patient_split)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
KERMANY = DATA / "kermany-pneumonia" / "train"
RECALL_METHODS = ("ltt_recall", "crc_recall", "sensitivity", "youden")
#: the order-statistic recall rules, whose test-half share has an exact exchangeable law
NULL_METHODS = ("ltt_recall", "crc_recall")


# ----------------------------------------------------------------------------- sources
def phantom_model(args) -> tuple[Path, str, float]:
    """The phantom source's model directory (trained once, then cached), its training spec and
    the seconds training took here (0 when cached)."""
    from medscalpel.engine.api import fit
    from medscalpel.engine.train import TrainConfig

    cache = REPO / "runs" / "conformal_bench" / f"{args.arch}_n{args.n}_e{args.epochs}"
    spec = f"phantom?n={args.n}&size=64"
    t0 = time.perf_counter()
    if not (cache / "model" / "model.json").is_file():
        cfg = TrainConfig(epochs=args.epochs, batch_size=64, seed=0, patience=args.epochs)
        fit(spec, args.arch, cache, cfg, size=64, channels=1, eval_split=None, progress=False)
    return cache, spec, time.perf_counter() - t0


def phantom_source(args) -> tuple[Predictions, list[str], dict]:
    from medscalpel.data.spec import open_dataset
    from medscalpel.engine.predict import predict
    from medscalpel.models.checkpoint import load_model

    cache, spec, train_s = phantom_model(args)
    ev = f"phantom?n={args.eval_n}&size=64&seed={args.eval_seed}"
    key = f"{args.eval_n}_{args.eval_seed}"  # the predictions and their patient ids, one key
    pfile, idfile = cache / f"eval_{key}.npz", cache / f"patients_{key}.json"
    if pfile.is_file() and idfile.is_file():
        preds = Predictions.load(pfile)
        pids = json.loads(idfile.read_text())
    else:
        model = load_model(cache / "model")
        ds = open_dataset(ev, split="all", preprocess=model.card.preprocess)
        preds = predict(model, ds, batch_size=128, progress=False)
        pids = [str(p) for p in ds.patient_ids]
        preds.save(pfile)
        idfile.write_text(json.dumps(pids))
    return preds, pids, {"train_spec": spec, "arch": args.arch, "epochs": args.epochs,
                         "eval_spec": f"{ev} [all]", "train_and_predict_s": round(train_s, 1)}


def kermany_model(args) -> tuple[Path, str, float]:
    """The Kermany source's model directory (trained PATIENT-wise once, then cached), its
    ``folder:`` spec and the seconds training took here (0 when cached); FileNotFoundError
    when the real data is absent. Also the dense model of conformal_compress_bench.py
    ``--source kermany``."""
    from medscalpel.engine.api import fit
    from medscalpel.engine.train import TrainConfig

    if not KERMANY.is_dir():
        raise FileNotFoundError(f"real data not available: {KERMANY}")
    spec = (f"folder:{KERMANY}?dedup=true&patient_regex=auto&val_fraction=0.1"
            f"&test_fraction={args.kermany_test_fraction}&seed=0")
    cache = (REPO / "runs" / "conformal_bench" / f"kermany_{args.kermany_arch}_"
             f"{args.kermany_size}_e{args.kermany_epochs}_t{args.kermany_test_fraction:g}")
    if (cache / "model" / "model.json").is_file():
        return cache, spec, 0.0
    t0 = time.perf_counter()
    cfg = TrainConfig(epochs=args.kermany_epochs, batch_size=64, seed=0, patience=3)
    fit(spec, args.kermany_arch, cache, cfg, size=args.kermany_size, channels=1,
        eval_split=None, progress=False)
    return cache, spec, time.perf_counter() - t0


def kermany_source(args) -> tuple[Predictions, list[str], dict]:
    from medscalpel.data.spec import open_dataset
    from medscalpel.engine.predict import predict
    from medscalpel.models.checkpoint import load_model
    from medscalpel.repair.calibrate import binary_view

    cache, spec, train_s = kermany_model(args)
    pfile, idfile = cache / "test_preds.npz", cache / "test_patients.json"
    model = load_model(cache / "model")
    ds = open_dataset(spec, split="test", preprocess=model.card.preprocess)
    if pfile.is_file() and idfile.is_file():
        preds = Predictions.load(pfile)
        pids = json.loads(idfile.read_text())
    else:
        preds = predict(model, ds, batch_size=128, progress=False)
        pids = [str(p) for p in ds.patient_ids]
        preds.save(pfile)
        idfile.write_text(json.dumps(pids))
    if ds.meta.get("split_unit", {}).get("unit") not in (None, "patient"):
        raise RuntimeError(f"kermany: the split is not patient-wise: {ds.meta['split_unit']}")
    train_ds = open_dataset(spec, split="train")
    leak = set(pids) & {str(p) for p in train_ds.patient_ids}
    if leak:
        raise RuntimeError(f"kermany: {len(leak)} test patients also in training")
    from sklearn.metrics import roc_auc_score

    view = binary_view(preds, "PNEUMONIA")
    auroc = float(roc_auc_score(view.labels[:, 0] > 0.5, view.logits[:, 0]))
    return view, pids, {"auroc_held_out": auroc,
        "train_spec": spec.replace(str(KERMANY), "<shared data>/kermany-pneumonia/train"),
        "arch": args.kermany_arch, "size": args.kermany_size, "epochs": args.kermany_epochs,
        "eval_spec": "the same spec [test]: held-out patients", "split_unit":
        ds.meta.get("split_unit"), "dedup": ds.meta.get("dedup"),
        "n_train_images": len(train_ds), "train_and_predict_s": round(train_s, 1)}


def nih_source(args) -> tuple[Predictions, list[str], dict]:
    from calibration_nih import PREDS, load

    if not PREDS.is_file():
        raise FileNotFoundError(f"real data not available: {PREDS}")
    preds, patients, reader = load()
    return preds, [str(p) for p in patients], {"source": str(PREDS.relative_to(DATA)),
                                               "reader": reader}


# ----------------------------------------------------------------------------- one split
def _rates(y: np.ndarray, d: np.ndarray) -> tuple[float, float, float]:
    tp = int(np.sum(y & d))
    npos, nflag = int(y.sum()), int(d.sum())
    return (tp / npos if npos else np.nan, tp / nflag if nflag else np.nan,
            float(d.mean()) if d.size else np.nan)


def _null_counts(g, te: Predictions) -> np.ndarray:
    """[K, 5] per class: calibration positives n, order statistic k (0: not certified), test
    positives m, test misses J of the recall certificate ``g`` on ``te``, and the test
    positives TIED with the cut (the k-th calibration positive score: the float32 just above
    the stored threshold); ties only remove misses, so with ties the law is a lower bound."""
    z, lab = te.logits.astype(np.float64), te.targets()
    out = np.zeros((te.num_classes, 5), np.int64)
    for j, c in enumerate(g.classes):
        known = np.isfinite(lab[:, j])
        y = lab[known, j] > 0.5
        k = int(c.calibration.get("order_statistic", 0)) if c.certified else 0
        miss = tied = 0
        if k:
            cut = float(np.nextafter(np.float32(c.threshold_logit), np.float32(np.inf)))
            zz = z[known, j].astype(np.float32).astype(np.float64)
            miss = int(np.sum(y & (z[known, j] < c.threshold_logit)))
            tied = int(np.sum(y & (zz == cut)))
        out[j] = (c.n_positives, k, int(y.sum()), miss, tied)
    return out


def control_split(preds: Predictions, seed: int, args) -> dict:
    """The same 50/50 split drawn by IMAGE (every image its own patient): the design under
    which the negative-hypergeometric law holds exactly given the held-out set."""
    sp = patient_split(preds, None, 0.5, seed)
    cal, te = preds.select(sp.calibration), preds.select(sp.held_out)
    return {"ltt_recall": _null_counts(calibrate_guarantee(cal, f"recall>={args.target}",
                                                           args.alpha), te),
            "crc_recall": _null_counts(calibrate_guarantee(cal, f"E[recall]>={args.target}"),
                                       te)}


def one_split(preds: Predictions, pids: list[str], seed: int, args) -> dict:
    sp = patient_split(preds, pids, 0.5, seed)
    cal, te = preds.select(sp.calibration), preds.select(sp.held_out)
    assert not {pids[i] for i in sp.calibration} & {pids[i] for i in sp.held_out}
    zt, lt, pt = te.logits.astype(np.float64), te.targets(), te.probs().astype(np.float64)
    k = preds.num_classes
    out: dict[str, np.ndarray] = {}
    thr_logit = {
        "ltt_recall": calibrate_guarantee(cal, f"recall>={args.target}", args.alpha),
        "crc_recall": calibrate_guarantee(cal, f"E[recall]>={args.target}"),
        "ltt_precision": calibrate_guarantee(cal, f"precision>={args.precision}", args.alpha),
    }
    thr_prob = {"sensitivity": ThresholdCalibrator("sensitivity", args.target).fit(cal),
                "youden": ThresholdCalibrator("youden").fit(cal)}
    for m in (*thr_logit, *thr_prob):
        # certified, recall, precision, flagged share, n flagged, n positives
        res = np.full((k, 6), np.nan)
        for j in range(k):
            known = np.isfinite(lt[:, j])
            y = lt[known, j] > 0.5
            if m in thr_logit:
                c = thr_logit[m].classes[j]
                if not c.certified:
                    res[j, 0] = 0
                    continue
                d = zt[known, j] >= c.threshold_logit
            else:
                cb = thr_prob[m]
                if cb.class_names_[j] in cb.fallback_:
                    res[j, 0] = 0
                    continue
                d = pt[known, j] >= cb.thresholds_[j]
            res[j] = (1, *_rates(y, d), int(d.sum()), int(y.sum()))
        out[m] = res
    fnr = calibrate_guarantee(cal, f"fnr<={args.fnr}")
    c = fnr.classes[0]
    if c.certified:
        pos = np.nan_to_num(lt, nan=0.0) > 0.5
        img = pos.sum(1) > 0
        missed = (pos[img] & (zt[img] < c.threshold_logit)).sum(1) / pos[img].sum(1)
        out["crc_fnr"] = np.array([1.0, float(missed.mean()),
                                   float((zt >= c.threshold_logit).mean())])
    else:
        out["crc_fnr"] = np.array([0.0, np.nan, np.nan])
    out["null"] = {m: _null_counts(thr_logit[m], te) for m in NULL_METHODS}
    out["n_pos_cal"] = np.array([c.n_positives for c in thr_logit["ltt_recall"].classes])
    out["n_pos_test"] = np.nansum(lt > 0.5, axis=0)
    out["n_patients"] = np.array(sp.n_patients, float)
    return out


# ----------------------------------------------------------------------------- summary
def _nanmean(a) -> float | None:
    a = np.asarray(a, float)
    return float(np.nanmean(a)) if np.isfinite(a).any() else None


def null_summary(counts: list[np.ndarray], names: Sequence[str], target: float) -> list[dict]:
    """Observed test-half share vs its exchangeable expectation, per class.

    ``counts``: one [K, 5] array (n, k, m, J, ties; :func:`_null_counts`) per split. For each class
    over the certified splits: the observed share of test halves with recall >= ``target``,
    the expectation (mean over splits of :func:`~medscalpel.repair.conformal.
    expected_test_share`), the Poisson-binomial comparison (:func:`~medscalpel.repair.
    conformal.compare_test_share`), and the test misses J against their negative-hypergeometric
    law: mean J minus its expectation, and ``variance_ratio`` = mean squared deviation of J from
    its expectation / mean negative-hypergeometric variance (1 under exchangeable image-wise
    splits; above 1 when a patient's positives move together and their scores are alike)."""
    arr = np.stack(counts)  # [splits, K, 4]
    out = []
    for j, name in enumerate(names):
        hits, probs, dev, var, ties = [], [], [], [], []
        for n, k, m, miss, tied in arr[:, j]:
            if k <= 0 or m <= 0:
                continue
            ties.append(tied > 0)
            pmf = heldout_miss_pmf(int(n), int(k), int(m))
            jj = np.arange(pmf.size)
            mu = float(pmf @ jj)
            hits.append((m - miss) / m >= target - HELDOUT_TOL)
            probs.append(expected_test_share(int(n), int(k), int(m), target))
            dev.append(miss - mu)
            var.append(float(pmf @ (jj - mu) ** 2))
        cmp = compare_test_share(hits, probs)
        # a tie at the cut in some split: the law is then a LOWER bound of that split's share
        out.append({"class": name, **cmp,
                    "tie_splits_share": float(np.mean(ties)) if ties else None,
                    "mean_excess_misses": float(np.mean(dev)) if dev else None,
                    "variance_ratio": float(np.mean(np.square(dev)) / np.mean(var))
                    if var and np.mean(var) > 0 else None})
    return out


def clustering(preds: Predictions, pids: list[str]) -> list[dict]:
    """Per class, how the positive images sit in patients: positive images, positive
    patients, positive images per positive patient, and the share of positive images whose
    patient has another positive image (these move together in a patient-wise split)."""
    lab = preds.targets()
    out = []
    for j, name in enumerate(preds.class_names):
        rows = np.flatnonzero(np.nan_to_num(lab[:, j], nan=0.0) > 0.5)
        _, size = np.unique([pids[i] for i in rows], return_counts=True)
        out.append({"class": name, "positive_images": int(rows.size),
                    "positive_patients": int(size.size),
                    "images_per_patient": float(rows.size / size.size) if size.size else None,
                    "share_in_multi_image_patients": float(size[size > 1].sum() / rows.size)
                    if rows.size else None, "max_images_per_patient": int(size.max())
                    if size.size else None})
    return out


def summarise(runs: list[dict], names: tuple[str, ...], args) -> dict:
    methods: dict[str, dict] = {}
    for m in (*RECALL_METHODS, "ltt_precision"):
        arr = np.stack([r[m] for r in runs])  # [splits, K, 6]
        cert = arr[:, :, 0] == 1
        level = args.precision if m == "ltt_precision" else args.target
        col = 2 if m == "ltt_precision" else 1
        per_class = []
        for j, name in enumerate(names):
            ok = cert[:, j]
            v = arr[ok, j, col]
            v = v[np.isfinite(v)]
            # the test half's own evidence of a violation: one-sided 95% Clopper-Pearson upper
            # bound of the realised rate below the level
            cnt = arr[ok, j, 4 if m == "ltt_precision" else 5]
            hit = np.rint(arr[ok, j, col] * cnt)
            good = np.isfinite(hit) & (cnt > 0)
            ub = np.array([miss_rate_upper_bound(int(h), int(c), 0.05)
                           for h, c in zip(hit[good], cnt[good])])
            per_class.append({
                "class": name, "certified_share": float(ok.mean()),
                "n_certified": int(ok.sum()),
                "coverage": float(np.mean(v >= level - 1e-12)) if v.size else None,
                "significant_violations": float(np.mean(ub < level)) if ub.size else None,
                # what a high-probability guarantee bounds by alpha: over ALL splits, certified
                # AND the realised rate below the level (not certified = no claim made)
                "violations_all_splits": float(np.sum(v < level - 1e-12) / len(runs)),
                "significant_violations_all_splits": float(np.sum(ub < level) / len(runs)),
                "recall_mean": _nanmean(arr[ok, j, 1]),
                "recall_p10": float(np.nanquantile(arr[ok, j, 1], 0.1)) if ok.any() else None,
                "precision_mean": _nanmean(arr[ok, j, 2]),
                "flagged_share_mean": _nanmean(arr[ok, j, 3])})
        methods[m] = {"level": level, "classes": per_class, "macro": {
            key: _nanmean([c[key] for c in per_class if c[key] is not None])
            for key in ("certified_share", "coverage", "significant_violations",
                        "violations_all_splits", "significant_violations_all_splits",
                        "recall_mean", "recall_p10",
                        "precision_mean", "flagged_share_mean")}}
        covs = [c["coverage"] for c in per_class if c["coverage"] is not None]
        methods[m]["macro"]["coverage_min"] = float(min(covs)) if covs else None
        methods[m]["macro"]["violations_max"] = float(max(
            c["violations_all_splits"] for c in per_class))
    f = np.stack([r["crc_fnr"] for r in runs])
    okf = f[:, 0] == 1
    methods["crc_fnr"] = {"level": args.fnr, "certified_share": float(okf.mean()),
                          "fnr_mean": _nanmean(f[okf, 1]),
                          "fnr_p90": float(np.quantile(f[okf, 1], 0.9)) if okf.any() else None,
                          "flagged_share_mean": _nanmean(f[okf, 2])}
    npc = np.stack([r["n_pos_cal"] for r in runs])
    npt = np.stack([r["n_pos_test"] for r in runs])
    pat = np.stack([r["n_patients"] for r in runs])
    for m in NULL_METHODS:
        methods[m]["exchangeable"] = null_summary([r["null"][m] for r in runs], names,
                                                  args.target)
    return {"methods": methods,
            "positives": [{"class": n, "cal_mean": float(npc[:, j].mean()),
                           "cal_min": int(npc[:, j].min()), "test_mean": float(npt[:, j].mean())}
                          for j, n in enumerate(names)],
            "patients_cal_mean": float(pat[:, 0].mean()),
            "patients_test_mean": float(pat[:, 1].mean())}


def run_source(name: str, args) -> dict:
    loader = {"phantom": phantom_source, "nih": nih_source, "kermany": kermany_source}[name]
    try:
        preds, pids, info = loader(args)
    except FileNotFoundError as exc:
        print(f"{name}: skipped ({exc})", flush=True)
        return {"skipped": str(exc)}
    t0 = time.perf_counter()
    runs = [one_split(preds, pids, s, args) for s in range(args.splits)]
    sec = time.perf_counter() - t0
    names = tuple(preds.class_names)
    control = [control_split(preds, s, args) for s in range(args.splits)]
    out = {**info, "n_images": preds.n, "n_patients": len(set(pids)),
           "class_names": list(names), "splits": args.splits,
           "split_seconds": round(sec, 1), **summarise(runs, names, args),
           "image_wise_control": {m: null_summary([c[m] for c in control], names, args.target)
                                  for m in NULL_METHODS},
           "control_seconds": round(time.perf_counter() - t0 - sec, 1),
           "clustering": clustering(preds, pids)}
    print(f"{name}: {args.splits} splits in {sec:.0f} s", flush=True)
    return out


# ----------------------------------------------------------------------------- markdown
def _f(v, d=3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def markdown(res: dict, args) -> str:
    lines = [f"# Conformal thresholds: {args.splits} patient-wise 50/50 splits per source\n",
             f"Targets: recall >= {args.target} (alpha = {args.alpha}), precision >= "
             f"{args.precision} (alpha = {args.alpha}), set FNR <= {args.fnr}. Coverage = share "
             "of certified splits whose realised TEST-half rate met the target. The "
             "high-probability guarantees promise >= 1 - alpha for the POPULATION rate, not "
             "for a finite test half; for the two recall rules the share an exactly valid "
             "certificate is expected to show on test halves is known exactly (section "
             "'Test-half share against its exchangeable expectation' per source, "
             f"{NULL_TEXT_REF}). "
             "Significant violations = share of certified splits whose test half alone shows "
             "the rate below the target (one-sided 95% Clopper-Pearson upper bound < target). "
             "'All splits' counts a violation only where a claim was made (certified AND "
             "realised rate below the target) over all splits: the quantity a "
             "high-probability guarantee bounds by alpha for the population rate; the "
             "conditional coverage of a class certified in only a few lucky splits is not. "
             "The population-level check, where the true rate is known, is "
             "conformal_population.md (phantom) and the simulation in tests/test_conformal.py. "
             "Means over classes (macro). Produced by benchmarks/conformal_bench.py.\n"]
    for src, r in res.items():
        if "skipped" in r:
            lines.append(f"## {src}: not run ({r['skipped']})\n")
            continue
        lines.append(f"## {src}: {r['n_images']} images, {r['n_patients']} patients, "
                     f"{len(r['class_names'])} classes\n")
        if "auroc_held_out" in r:
            lines.append(f"Model: {r['arch']} at {r['size']} px, {r['epochs']} epochs, trained "
                         f"on {r['n_train_images']} images of `{r['train_spec']}` [train] "
                         f"(split unit: {(r.get('split_unit') or {}).get('unit')}); the images "
                         f"here are its held-out test patients; AUROC there "
                         f"{r['auroc_held_out']:.3f}.\n")
        lines.append("| method | certified share | coverage (macro) | coverage (worst class) | "
                     "significant violations | violations, all splits (macro, worst) | "
                     "significant, all splits | mean recall | recall p10 | mean precision | "
                     "flagged share |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for m in (*RECALL_METHODS, "ltt_precision"):
            a = r["methods"][m]["macro"]
            lines.append(f"| {m} | {_f(a['certified_share'])} | {_f(a['coverage'])} | "
                         f"{_f(a['coverage_min'])} | {_f(a['significant_violations'])} | "
                         f"{_f(a['violations_all_splits'])}, {_f(a['violations_max'])} | "
                         f"{_f(a['significant_violations_all_splits'])} | "
                         f"{_f(a['recall_mean'])} | "
                         f"{_f(a['recall_p10'])} | {_f(a['precision_mean'])} | "
                         f"{_f(a['flagged_share_mean'])} |")
        f = r["methods"]["crc_fnr"]
        lines.append(f"\nSet FNR <= {args.fnr} (CRC, one shared threshold): certified in "
                     f"{_f(f['certified_share'])} of splits, mean realised FNR "
                     f"{_f(f['fnr_mean'])} (90th percentile {_f(f['fnr_p90'])}), flagged share "
                     f"{_f(f['flagged_share_mean'])}.\n")
        lines.append("Per class, recall >= target with confidence (ltt_recall) vs the point "
                     "target-sensitivity threshold:\n")
        lines.append("| class | cal positives (mean, min) | ltt certified | ltt coverage | "
                     "ltt recall | ltt precision | sens. coverage | sens. recall | "
                     "sens. precision |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for j, c in enumerate(r["methods"]["ltt_recall"]["classes"]):
            s = r["methods"]["sensitivity"]["classes"][j]
            p = r["positives"][j]
            lines.append(f"| {c['class']} | {p['cal_mean']:.0f}, {p['cal_min']} | "
                         f"{_f(c['certified_share'], 2)} | {_f(c['coverage'])} | "
                         f"{_f(c['recall_mean'])} | {_f(c['precision_mean'])} | "
                         f"{_f(s['coverage'])} | {_f(s['recall_mean'])} | "
                         f"{_f(s['precision_mean'])} |")
        lines.extend(null_markdown(r, args.target))
        lines.append("")
    return "\n".join(lines)


NULL_TEXT_REF = "medscalpel.repair.conformal.expected_test_share"
NULL_TEXT = (
    "If the n calibration and m test positive scores of a class are exchangeable (no ties), "
    "the number J of test positives below the threshold (the k-th smallest calibration "
    "positive; k from the binomial rule for ltt_recall, floor((1-T)(n+1)) for crc_recall) is "
    "negative-hypergeometric, P(J=j) = C(j+k-1, j) C(m-j+n-k, m-j) / C(n+m, m), and a test "
    "half meets T iff J <= the largest j with (m-j)/m >= T (the coverage test above). "
    "Expected = mean over the certified splits of P(J <= that j | n, k, m) "
    f"({NULL_TEXT_REF}). The law depends only on ranks, so it holds for ANY fixed held-out "
    "set split uniformly at random by image: it is what the split design alone produces, and "
    "agreement with it says nothing about the population recall. The splits all re-divide "
    "ONE held-out set: they are not independent draws from the population, and their shares "
    "carry that set's luck. Given the set, independent uniform image-wise splits have "
    "independent Bernoulli(p_i) outcomes, so the 95% range (of the share) and the two-sided "
    "p (Poisson-binomial) are exact for the image-wise control (the same seeds, every image "
    "its own patient); for the patient-wise splits they test whether keeping a patient's "
    "images together changes the share. Excess misses = mean of J minus its expectation; "
    "variance ratio = mean squared deviation of J from its expectation / the "
    "negative-hypergeometric variance (1 for exchangeable image-wise splits). Patient "
    "clustering pushes the observed share below the expectation when a patient's positive "
    "images have alike scores: they change halves together, J spreads more (ratio > 1) and, "
    "for an expectation above 1/2 as for ltt_recall, mass moves above the allowed misses; "
    "it needs positives in multi-image patients (column 'clustered': the share of positive "
    "images whose patient has another one). Tied scores (e.g. quantised logits) only remove "
    "misses: where a test positive ties with the cut, the expectation is a lower bound and "
    "the table says so. With one test per class and method, about 1 in 20 "
    "consistent classes shows p < 0.05 by chance; Holm's count below corrects for that.")


def null_markdown(r: dict, target: float) -> list[str]:
    """The per-class table: observed test-half share vs the exchangeable expectation, for the
    patient-wise splits and the image-wise control."""
    lines = ["\n### Test-half share against its exchangeable expectation\n", NULL_TEXT + "\n",
             "| method | class | splits | observed | expected | 95% range | p | excess misses "
             "| variance ratio | image-wise: observed, expected, p, variance ratio | "
             "pos. images / pos. patient, clustered |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in NULL_METHODS:
        for j, e in enumerate(r["methods"][m]["exchangeable"]):
            c = r["image_wise_control"][m][j]
            cl = r["clustering"][j]
            rng = "-" if e["range"] is None else f"{e['range'][0]:.3f}-{e['range'][1]:.3f}"
            flag = "" if e["consistent"] in (None, True) else " (**inconsistent**)"
            if e.get("tie_splits_share"):
                flag += f" (ties at the cut in {e['tie_splits_share']:.0%} of splits: lower bound)"
            lines.append(
                f"| {m} | {e['class']} | {e['n']} | {_f(e['observed'])} | "
                f"{_f(e['expected'])} | {rng} | {_p(e['p_two_sided'])}{flag} | "
                f"{_f(e['mean_excess_misses'], 2)} | {_f(e['variance_ratio'], 2)} | "
                f"{_f(c['observed'])}, {_f(c['expected'])}, {_p(c['p_two_sided'])}, "
                f"{_f(c['variance_ratio'], 2)} | {_f(cl['images_per_patient'], 2)}, "
                f"{_f(cl['share_in_multi_image_patients'], 2)} |")
    lines.append("")
    for m in NULL_METHODS:
        rows = {"patient-wise": r["methods"][m]["exchangeable"],
                "image-wise control": r["image_wise_control"][m]}
        parts = []
        for what, ex in rows.items():
            ps = [e["p_two_sided"] for e in ex if e["p_two_sided"] is not None]
            obs = [e["observed"] for e in ex if e["observed"] is not None]
            exp = [e["expected"] for e in ex if e["expected"] is not None]
            parts.append(f"{what}: observed {_f(_nanmean(obs))} vs expected "
                         f"{_f(_nanmean(exp))} (macro), p < 0.05 in {sum(p < 0.05 for p in ps)} "
                         f"of {len(ps)} classes, {holm_rejections(ps)} after Holm, "
                         f"{holm_rejections([e['p_low'] for e in ex if e['p_low'] is not None], 0.025)}"
                         " below it after Holm (one-sided, 0.025)")
        lines.append(f"{m}: " + "; ".join(parts) + ".\n")
    return lines


def holm_rejections(ps: Sequence[float], level: float = 0.05) -> int:
    """How many of the p-values Holm's step-down rejects at family-wise ``level``."""
    ps = sorted(ps)
    for i, p in enumerate(ps):
        if p > level / (len(ps) - i):
            return i
    return len(ps)


def _p(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if v >= 0.001 else f"{v:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", type=int, default=500)
    ap.add_argument("--sources", default="phantom,nih")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--precision", type=float, default=0.5)
    ap.add_argument("--fnr", type=float, default=0.1)
    ap.add_argument("--arch", default="resnet_tiny")
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--eval-n", type=int, default=20000)
    ap.add_argument("--eval-seed", type=int, default=1)
    ap.add_argument("--kermany-arch", default="resnet_tiny")
    ap.add_argument("--kermany-size", type=int, default=64)
    ap.add_argument("--kermany-epochs", type=int, default=8)
    ap.add_argument("--kermany-test-fraction", type=float, default=0.4)
    ap.add_argument("--name", default=None,
                    help="result name (default: conformal, or conformal_population)")
    ap.add_argument("--population", action="store_true",
                    help="phantom only: score each draw's thresholds on a large fresh phantom "
                         "population instead of a test half (benchmarks/conformal_population.py)")
    ap.add_argument("--chunk-n", type=int, default=20000,
                    help="--population: images per generated phantom")
    ap.add_argument("--chunk-seeds", default="101-110,201-210,301-330",
                    help="--population: seeds of the phantoms (each predicted once, cached)")
    ap.add_argument("--parts", default="2,4,10",
                    help="--population: designs, as calibration draws per phantom (2: half "
                         "a phantom, the test-half benchmark's calibration size)")
    args = ap.parse_args()
    if args.name is None:
        args.name = "conformal_population" if args.population else "conformal"
    import torch

    torch.set_num_threads(1)
    if args.population:
        res = cp.run(args, phantom_model)
        path = save_result(args.name, res, vars(args))
        md = cp.markdown(res, args)
        (RESULTS / f"{args.name}.md").write_text(md + "\n", encoding="utf-8")
        print(md)
        print(f"\nwritten {path}")
        return
    t0 = time.perf_counter()
    res = {s: run_source(s, args) for s in args.sources.split(",")}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    path = save_result(args.name, res, vars(args))
    md = markdown({k: v for k, v in res.items() if k != "seconds"}, args)
    (RESULTS / f"{args.name}.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
