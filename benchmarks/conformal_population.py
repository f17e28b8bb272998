"""Population mode of benchmarks/conformal_bench.py (``--population``, issue V): the guarantee
``P(population recall >= T) >= 1 - alpha`` checked against a POPULATION recall, with
INDEPENDENT calibration draws.

The test-half benchmark (conformal_bench.py without ``--population``) scores each threshold on
the other half of one 20,000-image phantom; its own sampling noise pulls the share of splits
that reach T down. A first population design drew all calibration sets from ONE fixed pool and
scored them on ONE fixed population: every draw then shared the pool's and the population's
finite-sample offsets, so per class the 500 draws were one realisation, not 500 (its Edema
share, 83.6%, could not tell a failing guarantee from a shared offset). This design removes
that:

* data: ``--chunk-seeds`` phantoms of ``--chunk-n`` images each, ``phantom?n=N&size=64&seed=S``
  (synthetic patients never seen in training: training used seed 0, the test-half benchmark
  seed 1), each predicted once by the phantom source's model and cached per seed;
* a draw is a group of PATIENTS of one phantom: each phantom's patients are shuffled (seeded
  by its seed) and cut into ``P`` equal groups; every group is one calibration set. The
  phantom generator draws every patient independently (labels per image, habitus per
  patient, nothing shared by a phantom), so groups of disjoint patients are independent
  calibration draws from the same population, within and across phantoms. ``--parts`` lists
  the designs: ``P = 2`` is the test-half benchmark's calibration size (half a phantom), with
  2 draws a phantom; ``P = 10`` gives 10 independent draws a phantom, of a tenth of the size;
* a draw's thresholds are scored on the POPULATION of every OTHER phantom (all chunks but the
  draw's own: independent of the draw), whose realised recall at a threshold stands for the
  population recall (its binomial standard error at T is reported next to it; the population
  is still shared by the draws of different phantoms, an offset of that size);
* per draw: ``ltt_recall`` (``recall>=T`` with confidence ``1 - alpha``), ``crc_recall``
  (``E[recall]>=T``), the point ``sensitivity`` threshold and ``youden``
  (:class:`~medscalpel.repair.calibrate.ThresholdCalibrator`), all library calls, on every
  image of the draw; and ``ltt_per_patient``: the same ``recall>=T`` certificate on ONE
  randomly chosen positive image per positive patient of the same draw
  (``calibrate_guarantee(..., groups=patient ids)``: the binomial argument counts images;
  one image a patient makes them independent draws), scored on the same image-level
  population recall.

Reported per design, method and class: the share of draws whose population recall reached T
with its exact binomial 95% interval over the (independent) draws and a cluster-bootstrap
interval over the phantoms (if the draws were not independent, the second would be wider),
the share at T -/+ one population standard error, the share of ALL draws where a claim was
made and broken (what alpha bounds), the mean population recall (what CRC bounds),
precision and flagged share; for ``ltt`` also the share independent images would give
(``iid expected``, the mean of ``P(Binomial(n, 1-T) >= k)``, >= 1 - alpha by construction).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from calibration_nih import PREDS as NIH_PREDS
from calibration_nih import load as load_nih
from scipy.stats import binomtest

from medscalpel.engine.predictions import Predictions
from medscalpel.repair.calibrate import ThresholdCalibrator
from medscalpel.repair.conformal import calibrate_guarantee

METHODS = ("ltt_recall", "ltt_per_patient", "crc_recall", "sensitivity", "youden")
LTT = ("ltt_recall", "ltt_per_patient")
#: columns of one draw's per-class row
COLS = ("certified", "recall", "precision", "flagged", "cal_positives")
#: a class enters the macro share only when certified in this many draws and this share of them
MIN_CERTIFIED, MIN_CERTIFIED_SHARE = 10, 0.1


# ----------------------------------------------------------------------------- data
def phantom_chunk(model, cache: Path, n: int, seed: int) -> tuple[Predictions, list[str]]:
    """Predictions of the phantom of ``(n, size 64, seed)`` (all splits) and its patient ids
    prefixed by the seed (ids restart at P000000 in every phantom); cached under ``cache``."""
    from medscalpel.data.phantom.generate import generate_phantom
    from medscalpel.engine.predict import predict

    pfile, idfile = cache / f"chunk_{n}_{seed}.npz", cache / f"chunk_{n}_{seed}_patients.json"
    if pfile.is_file() and idfile.is_file():
        return Predictions.load(pfile), json.loads(idfile.read_text())
    # generated in memory (not through open_dataset, whose cache would keep every chunk on
    # disk and in memory); the same generator call as the 'phantom?n=N&size=64&seed=S' spec
    data = generate_phantom(n=n, size=64, seed=seed, progress=False)
    ds = data.dataset("all", preprocess=model.card.preprocess,
                      spec=f"phantom?n={n}&size=64&seed={seed}")
    preds = predict(model, ds, batch_size=128, progress=False)
    pids = [f"s{seed}:{p}" for p in ds.patient_ids]
    cache.mkdir(parents=True, exist_ok=True)
    preds.save(pfile)
    idfile.write_text(json.dumps(pids))
    return preds, pids


def parse_seeds(text: str) -> list[int]:
    """``'101-110,301'`` -> ``[101, ..., 110, 301]``."""
    out: list[int] = []
    for part in str(text).split(","):
        a, _, b = part.strip().partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    if len(set(out)) != len(out):
        raise SystemExit(f"--chunk-seeds: a seed is repeated in {text!r}")
    return out


def patient_groups(pids: list[str], parts: int, seed: int) -> list[np.ndarray]:
    """The rows of ``parts`` groups of disjoint patients of equal patient count (the patients
    shuffled by ``seed``, then cut), rows in their original order."""
    uniq = np.array(sorted(set(pids)))
    rng = np.random.default_rng([seed, parts])
    rng.shuffle(uniq)
    group_of = {p: g for g, block in enumerate(np.array_split(uniq, parts)) for p in block}
    g = np.array([group_of[p] for p in pids])
    return [np.flatnonzero(g == k) for k in range(parts)]


class ScoreCounts:
    """Per class the sorted positive and all known scores (logits for the conformal
    thresholds, float64 probabilities as :meth:`ThresholdCalibrator.transform` compares them):
    the counts of ``score >= threshold`` by ``searchsorted``."""

    def __init__(self, preds: Predictions):
        lab = preds.targets()
        z = preds.logits.astype(np.float64)
        p = preds.probs().astype(np.float64)
        self.sorted: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"logit": [], "prob": []}
        for j in range(preds.num_classes):
            known = np.isfinite(lab[:, j])
            y = lab[known, j] > 0.5
            for key, s in (("logit", z[known, j]), ("prob", p[known, j])):
                self.sorted[key].append((np.sort(s[y]), np.sort(s)))

    def counts(self, j: int, threshold: float, scale: str) -> np.ndarray:
        """``[true positives, positives, flagged, known images]``."""
        pos, every = self.sorted[scale][j]
        return np.array([pos.size - np.searchsorted(pos, threshold, "left"), pos.size,
                         every.size - np.searchsorted(every, threshold, "left"), every.size],
                        float)

    def n_pos(self, j: int) -> int:
        return int(self.sorted["logit"][j][0].size)


class LeaveOneOutRates:
    """Recall, precision and flagged share at a threshold over every chunk but one: the counts
    over all chunks minus the left-out chunk's (the same counts as ``score >= threshold`` on
    every image of the other chunks; checked on the first draw)."""

    def __init__(self, chunks: list[Predictions]):
        self.parts = [ScoreCounts(p) for p in chunks]
        self.total = ScoreCounts(stack(chunks))

    def rates(self, j: int, threshold: float, scale: str, leave_out: int
              ) -> tuple[float, float, float]:
        tp, npos, fl, n = (self.total.counts(j, threshold, scale)
                           - self.parts[leave_out].counts(j, threshold, scale))
        return (tp / npos if npos else np.nan, tp / fl if fl else np.nan,
                fl / n if n else np.nan)

    def n_pos(self, j: int, leave_out: int) -> int:
        return self.total.n_pos(j) - self.parts[leave_out].n_pos(j)


def stack(chunks: list[Predictions]) -> Predictions:
    """One Predictions of several chunks (ids prefixed by the chunk number)."""
    p0 = chunks[0]
    return Predictions(logits=np.concatenate([p.logits for p in chunks]),
                       labels=np.concatenate([p.labels for p in chunks]),
                       ids=tuple(f"{c}:{i}" for c, p in enumerate(chunks) for i in p.ids),
                       class_names=p0.class_names, task=p0.task, split="all",
                       model_id=p0.model_id)


def _direct_rates(pop: Predictions, j: int, threshold: float, scale: str
                  ) -> tuple[float, float, float]:
    """The same rates by comparing every image (the self-check of the counts)."""
    lab = pop.targets()
    known = np.isfinite(lab[:, j])
    y = lab[known, j] > 0.5
    s = (pop.logits.astype(np.float64) if scale == "logit"
         else pop.probs().astype(np.float64))[known, j]
    d = s >= threshold
    tp, fl = int(np.sum(d & y)), int(d.sum())
    return (tp / y.sum() if y.any() else np.nan, tp / fl if fl else np.nan,
            fl / d.size if d.size else np.nan)


def within_patient_icc(x: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """One-way ANOVA intraclass correlation of ``x`` within ``groups`` (unequal sizes:
    ``n0``-corrected) and Kish's design effect ``1 + (sum n_i^2 / N - 1) ICC``: how much the
    variance of a count over images exceeds the binomial one when whole patients are drawn."""
    _, g, n = np.unique(groups, return_inverse=True, return_counts=True)
    N, k = x.size, n.size
    if k < 2 or N <= k:
        return {"icc": float("nan"), "design_effect": float("nan"), "images_per_patient_w": 1.0}
    means = np.bincount(g, x, k) / n
    grand = float(x.mean())
    msb = float(np.sum(n * (means - grand) ** 2) / (k - 1))
    msw = float(np.sum((x - means[g]) ** 2) / (N - k))
    n0 = (N - np.sum(n.astype(float) ** 2) / N) / (k - 1)
    icc = (msb - msw) / (msb + (n0 - 1) * msw) if msb + (n0 - 1) * msw > 0 else float("nan")
    m_w = float(np.sum(n.astype(float) ** 2) / N)
    return {"icc": float(icc), "design_effect": float(1 + (m_w - 1) * icc),
            "images_per_patient_w": m_w}


def miss_correlation(preds: Predictions, pids: list[str], target: float
                     ) -> list[dict[str, float]]:
    """Per class, among the positive images: the within-patient ICC of the MISS indicator at
    the (1 - target) quantile of the positive logits (what the binomial count of the recall
    certificate is made of) and its design effect."""
    lab, z = preds.targets(), preds.logits.astype(np.float64)
    pid = np.asarray(pids, dtype=object).astype(str)
    out = []
    for j in range(preds.num_classes):
        pos = np.flatnonzero(np.nan_to_num(lab[:, j], nan=0.0) > 0.5)
        q = np.quantile(z[pos, j], 1.0 - target)
        out.append({"class": preds.class_names[j], "positives": int(pos.size),
                    **within_patient_icc((z[pos, j] < q).astype(float), pid[pos])})
    return out


def nih_miss_correlation(target: float) -> dict:
    """:func:`miss_correlation` on the real NIH CheXNet predictions (22,433 images, patient ids
    from the NIH table; benchmarks/calibration_nih.py), or why not (data absent)."""
    if not NIH_PREDS.is_file():
        return {"skipped": f"real data not available: {NIH_PREDS.name}"}
    preds, patients, _ = load_nih()
    return {"n_images": preds.n, "n_patients": len(set(map(str, patients))),
            "classes": miss_correlation(preds, [str(p) for p in patients], target)}


# ----------------------------------------------------------------------------- one draw
def one_draw(cal: Predictions, cal_pids: list[str], rates: LeaveOneOutRates, chunk: int,
             seed: int, args, pop: Predictions | None = None) -> dict[str, np.ndarray]:
    """Calibrate every method on one draw (all its images; ``ltt_per_patient`` on one
    random positive image per positive patient: the library's ``groups=``), score it on the
    population of the other chunks. ``pop`` given (that population): also check the counts
    against a direct comparison."""
    logit_thr = {"ltt_recall": calibrate_guarantee(cal, f"recall>={args.target}", args.alpha),
                 "ltt_per_patient": calibrate_guarantee(cal, f"recall>={args.target}",
                                                        args.alpha, groups=cal_pids,
                                                        seed=seed),
                 "crc_recall": calibrate_guarantee(cal, f"E[recall]>={args.target}")}
    prob_thr = {"sensitivity": ThresholdCalibrator("sensitivity", args.target).fit(cal),
                "youden": ThresholdCalibrator("youden").fit(cal)}
    npos = {"all": np.nansum(cal.targets() > 0.5, axis=0),
            "one": np.array([c.n_positives for c in logit_thr["ltt_per_patient"].classes])}
    out: dict[str, np.ndarray] = {}
    for m in METHODS:
        res = np.full((cal.num_classes, len(COLS)), np.nan)
        for j in range(cal.num_classes):
            res[j, 4] = npos["one" if m == "ltt_per_patient" else "all"][j]
            if m in logit_thr:
                c = logit_thr[m].classes[j]
                thr, scale, ok = c.threshold_logit, "logit", c.certified
            else:
                cb = prob_thr[m]
                thr, scale = float(cb.thresholds_[j]), "prob"
                ok = cb.class_names_[j] not in cb.fallback_
            res[j, 0] = float(ok)
            if not ok:
                continue
            res[j, 1:4] = rates.rates(j, thr, scale, chunk)
            if pop is not None:
                direct = _direct_rates(pop, j, thr, scale)
                if not np.allclose(res[j, 1:4], direct, rtol=0, atol=1e-12, equal_nan=True):
                    raise RuntimeError(f"self-check: {m} class {j}: {res[j, 1:4]} vs {direct}")
        out[m] = res
    # what a world of independent images predicts for ltt (continuous scores): the population
    # recall at the k-th smallest of n positives reaches T with probability
    # P(Binomial(n, 1-T) >= k) = 1 - the certificate's binomial_p
    for m in LTT:
        out[m + "_iid"] = np.array([1.0 - c.calibration["binomial_p"] if c.certified
                                    else np.nan for c in logit_thr[m].classes])
    out["n_images"] = np.array([cal.n], float)
    return out


# ----------------------------------------------------------------------------- summary
def _ci(k: int, n: int) -> list[float] | None:
    if n == 0:
        return None
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return [float(ci.low), float(ci.high)]


def _f(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def _macro_share(cert: np.ndarray, met: np.ndarray) -> float:
    """Mean over classes of (draws met) / (draws certified), classes never certified left out."""
    c = cert.sum(0)
    return float(np.mean(met.sum(0)[c > 0] / c[c > 0]))


def _cluster_boot(chunk_of: np.ndarray, n_boot: int, seed: int = 0) -> list[np.ndarray]:
    """Row indices of ``n_boot`` bootstrap samples of whole chunks (clusters)."""
    rng = np.random.default_rng(seed)
    chunks = np.unique(chunk_of)
    rows = {c: np.flatnonzero(chunk_of == c) for c in chunks}
    return [np.concatenate([rows[c] for c in rng.choice(chunks, chunks.size)])
            for _ in range(n_boot)]


def summarise(draws: list[dict], chunk_of: np.ndarray, names: tuple[str, ...],
              pop_pos: list[int], args, n_boot: int = 1000) -> dict:
    """Per method: per class and macro shares (exact CI over draws; cluster-bootstrap CI over
    chunks), the shares at T -/+ one population SE, violations, recall, precision, cost."""
    T, level = args.target, 1.0 - args.alpha
    out: dict[str, dict] = {}
    boot = _cluster_boot(chunk_of, n_boot)
    for m in METHODS:
        arr = np.stack([d[m] for d in draws])  # [D, K, COLS]
        cert = arr[:, :, 0] == 1
        rec = arr[:, :, 1]
        met_all = (rec >= T - 1e-12) & cert  # [D, K]
        classes = []
        for j, name in enumerate(names):
            ok = cert[:, j]
            r = rec[ok, j]
            se_t = float(np.sqrt(T * (1 - T) / pop_pos[j])) if pop_pos[j] else np.nan
            met = int(np.sum(r >= T - 1e-12))
            bs = [met_all[b, j].sum() / cert[b, j].sum() for b in boot if cert[b, j].any()]
            ci = _ci(met, int(r.size))
            classes.append({
                "class": name, "population_positives": pop_pos[j],
                "population_se_at_target": _f(se_t),
                "cal_positives_mean": float(arr[:, j, 4].mean()),
                "cal_positives_min": int(arr[:, j, 4].min()),
                "certified_share": float(ok.mean()), "n_certified": int(ok.sum()),
                "share_met": met / r.size if r.size else None,
                "share_met_ci95": ci,
                "share_met_ci95_cluster_bootstrap": ([float(np.quantile(bs, 0.025)),
                                                      float(np.quantile(bs, 0.975))]
                                                     if len(bs) else None),
                "short_of_level": bool(ci is not None and ci[1] < level),
                "share_met_at_target_minus_se": (float(np.mean(r >= T - se_t)) if r.size
                                                 else None),
                "share_met_at_target_plus_se": (float(np.mean(r >= T + se_t)) if r.size
                                                else None),
                "violations_all_draws": float(np.sum(r < T - 1e-12) / len(draws)),
                "recall_mean": _f(float(r.mean()) if r.size else np.nan),
                "recall_mean_se_draws": _f(float(r.std(ddof=1) / np.sqrt(r.size))
                                           if r.size > 1 else np.nan),
                "recall_p10": _f(float(np.quantile(r, 0.1)) if r.size else np.nan),
                "precision_mean": _f(float(np.nanmean(arr[ok, j, 2])) if r.size else np.nan),
                "flagged_share_mean": _f(float(np.nanmean(arr[ok, j, 3])) if r.size else np.nan),
            })
        # classes certified in too few draws (a share of a handful) stay out of the macro
        few = max(MIN_CERTIFIED, int(np.ceil(MIN_CERTIFIED_SHARE * len(draws))))
        keep = np.array([c["n_certified"] >= few for c in classes])
        bs = np.array([_macro_share(cert[b][:, keep], met_all[b][:, keep]) for b in boot])
        keys = ("certified_share", "share_met", "share_met_at_target_minus_se",
                "share_met_at_target_plus_se", "violations_all_draws", "recall_mean",
                "recall_p10", "precision_mean", "flagged_share_mean")
        macro = {k: _f(float(np.mean([c[k] for c, ok in zip(classes, keep)
                                      if ok and c[k] is not None]))) for k in keys}
        macro["certified_share"] = _f(float(np.mean([c["certified_share"] for c in classes])))
        macro["classes_left_out"] = [c["class"] for c, ok in zip(classes, keep) if not ok]
        macro["min_certified_draws"] = few
        macro["share_met_ci95_cluster_bootstrap"] = [float(np.quantile(bs, 0.025)),
                                                    float(np.quantile(bs, 0.975))]
        shares = [c["share_met"] for c, ok in zip(classes, keep) if ok]
        macro["share_met_min"] = float(min(shares))
        macro["violations_max"] = float(max(c["violations_all_draws"] for c in classes))
        macro["pairs_met"] = float(met_all.sum() / cert.sum())  # every (draw, class) claim
        macro["pairs_met_ci95"] = _ci(int(met_all.sum()), int(cert.sum()))
        macro["classes_short_of_level"] = [c["class"] for c, ok in zip(classes, keep)
                                           if ok and c["short_of_level"]]
        out[m] = {"classes": classes, "macro": macro}
        if m in LTT:
            iid = np.stack([d[m + "_iid"] for d in draws])  # [D, K]
            for j, c in enumerate(classes):
                c["iid_expected_share"] = _f(float(np.nanmean(iid[:, j])) if np.isfinite(
                    iid[:, j]).any() else np.nan)
            macro["iid_expected_share"] = _f(float(np.mean(
                [c["iid_expected_share"] for c, ok in zip(classes, keep)
                 if ok and c["iid_expected_share"] is not None])))
            macro["iid_expected_pairs"] = _f(float(np.nanmean(np.where(cert, iid, np.nan))))
    return out


# ----------------------------------------------------------------------------- run
def run(args, phantom_model) -> dict:
    from medscalpel.models.checkpoint import load_model

    t0 = time.perf_counter()
    cache, spec, train_s = phantom_model(args)
    seeds = parse_seeds(args.chunk_seeds)
    used = {0, args.eval_seed}
    if set(seeds) & used:
        raise SystemExit(f"the chunk seeds {seeds} and the training / test-half seeds "
                         f"{sorted(used)} must be disjoint")
    parts = [int(p) for p in str(args.parts).split(",")]
    model = load_model(cache / "model")
    t1 = time.perf_counter()
    loaded = [phantom_chunk(model, cache / "population", args.chunk_n, s) for s in seeds]
    data_s = time.perf_counter() - t1
    chunks, chunk_pids = [p for p, _ in loaded], [q for _, q in loaded]
    every = [p for q in chunk_pids for p in q]
    if len(set(every)) != sum(len(set(q)) for q in chunk_pids):
        raise RuntimeError("two chunks share a patient id")
    rates = LeaveOneOutRates(chunks)
    names = tuple(chunks[0].class_names)
    icc = miss_correlation(stack(chunks), every, args.target)
    icc_nih = nih_miss_correlation(args.target)
    t2 = time.perf_counter()
    designs = {}
    for P in parts:
        draws, chunk_of, sizes = [], [], []
        for c, (preds, pids) in enumerate(loaded):
            for g, rows in enumerate(patient_groups(pids, P, seeds[c])):
                check = None
                if not draws and P == parts[0]:  # self-check of the counts on the first draw
                    check = stack([q for i, q in enumerate(chunks) if i != c])
                draws.append(one_draw(preds.select(rows), [pids[i] for i in rows], rates, c,
                                      seed=seeds[c] * 1000 + g, args=args, pop=check))
                chunk_of.append(c)
                sizes.append(len({pids[i] for i in rows}))
        pop_pos = [int(np.mean([rates.n_pos(j, c) for c in range(len(chunks))]))
                   for j in range(len(names))]
        img = np.stack([d["n_images"] for d in draws])
        designs[str(P)] = {
            "parts_per_chunk": P, "draws": len(draws),
            "patients_per_draw_mean": float(np.mean(sizes)),
            "images_per_draw_mean": float(img[:, 0].mean()),
            "images_per_draw_min": int(img[:, 0].min()),
            "images_per_draw_max": int(img[:, 0].max()),
            "population_positives_mean": dict(zip(names, pop_pos)),
            "methods": summarise(draws, np.array(chunk_of), names, pop_pos, args)}
        print(f"parts {P}: {len(draws)} draws, {time.perf_counter() - t2:.0f} s", flush=True)
    draw_s = time.perf_counter() - t2
    n_img = sum(p.n for p in chunks)
    return {
        "mode": "population, independent draws",
        "train_spec": spec, "arch": args.arch, "epochs": args.epochs,
        "chunk_spec": f"phantom?n={args.chunk_n}&size=64&seed=S [all]",
        "chunk_seeds": seeds, "n_images": n_img,
        "n_patients": sum(len(set(q)) for q in chunk_pids),
        "population": "every chunk but the draw's own (leave-one-chunk-out)",
        "population_images_per_draw": n_img - args.chunk_n,
        "self_check": "first draw: searchsorted counts == direct score >= threshold "
                      "comparison on every image of its population (raises otherwise)",
        "class_names": list(names), "designs": designs,
        "within_patient_miss_correlation": icc,
        "nih_within_patient_miss_correlation": icc_nih,
        "seconds": {"train": round(train_s, 1), "generate_and_predict_or_load": round(data_s, 1),
                    "draws": round(draw_s, 1), "total": round(time.perf_counter() - t0, 1)},
    }


# ----------------------------------------------------------------------------- markdown
def _p(v, d=3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def _cis(ci) -> str:
    return f"{_p(ci[0])}-{_p(ci[1])}" if ci else "-"


def markdown(r: dict, args) -> str:
    T, a = args.target, args.alpha
    seeds = r["chunk_seeds"]
    lines = [
        "# Conformal thresholds against a POPULATION recall, independent calibration draws\n",
        (f"Target recall >= {T}; `ltt_recall` promises P(population recall >= {T}) >= "
         f"{1 - a:.2f} (alpha = {a}) over the calibration draw, `crc_recall` promises "
         f"E[recall] >= {T}; `sensitivity` (point threshold at calibration sensitivity T) and "
         "`youden` promise nothing. `ltt_per_patient`: the `ltt_recall` certificate on ONE "
         "random positive image per positive patient of the same draw (`calibrate_guarantee("
         "..., groups=patient ids)`). Produced by `benchmarks/conformal_bench.py "
         "--population` (benchmarks/conformal_population.py); machine (CPU model and flags), "
         "versions and config in conformal_population.json.\n"),
        (f"Model: {r['arch']}, {r['epochs']} epochs on `{r['train_spec']}` (the test-half "
         f"benchmark's phantom model). Data: {len(seeds)} phantoms `{r['chunk_spec']}` (seeds "
         f"{args.chunk_seeds}; training used seed 0, the test-half benchmark seed "
         f"{args.eval_seed}), {r['n_images']:,} images, {r['n_patients']:,} patients, each "
         "predicted once. A draw = one of P equal groups of disjoint patients of one phantom "
         "(the generator draws every patient independently, so the draws are independent, "
         "within and across phantoms); its thresholds are scored on the "
         f"{r['population_images_per_draw']:,} images of every OTHER phantom (the population, "
         "independent of the draw).\n"),
        ("Share met = share of draws with a claim (certified) whose population recall >= T, "
         "exact binomial 95% interval over the draws; 'cluster' = bootstrap over whole "
         "phantoms (wider if draws of one phantom were dependent). 'at T-SE, T+SE' = the share "
         "against T -/+ the population's binomial standard error at T: the population is "
         "shared by draws of different phantoms, so its own noise is an offset of that size, "
         "not covered by the intervals. Violations = share of ALL draws certified AND "
         f"population recall < T (what alpha = {a} bounds). 'iid expected' = the share "
         "independent images would give (continuous scores): the mean over draws of "
         "P(Binomial(n, 1-T) >= k), n the draw's positives, k the order statistic chosen; >= "
         "1 - alpha by construction, above it where n is small (discreteness). Short = the "
         f"exact 95% interval lies entirely below {1 - a:.2f}. Pairs = every (draw, class) "
         "with a claim, pooled. Macro = mean over the classes certified in at least "
         f"{MIN_CERTIFIED} draws and {MIN_CERTIFIED_SHARE:.0%} of them (the others are named "
         "below the design's table).\n"),
        "## Summary per design\n",
        ("| draws per phantom | draws | patients / images per draw | method | share met "
         "(macro) | cluster 95% CI | pairs met (95% CI) | iid expected (pairs) | worst class | "
         "violations (macro, worst) | classes short |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, d in r["designs"].items():
        for m in LTT:
            x = d["methods"][m]["macro"]
            size = (f"{d['patients_per_draw_mean']:.0f} / {d['images_per_draw_mean']:.0f}"
                    + ("" if m == "ltt_recall" else " (one positive image a patient)"))
            lines.append(
                f"| {key} | {d['draws']} | {size} | {m} | {_p(x['share_met'])} | "
                f"{_cis(x['share_met_ci95_cluster_bootstrap'])} | {_p(x['pairs_met'])} "
                f"({_cis(x['pairs_met_ci95'])}) | {_p(x['iid_expected_pairs'])} | "
                f"{_p(x['share_met_min'])} | {_p(x['violations_all_draws'])}, "
                f"{_p(x['violations_max'])} | "
                f"{', '.join(x['classes_short_of_level']) or 'none'} |")
    icc = r["within_patient_miss_correlation"]
    nih = r["nih_within_patient_miss_correlation"]
    de = [c["design_effect"] for c in icc if np.isfinite(c["design_effect"])]
    lines += [
        "\n## How correlated are one patient's images?\n",
        ("Among the positive images of a class (all phantoms), the within-patient intraclass "
         f"correlation of the MISS indicator at the population's {1 - T:.2f} quantile of the "
         "positive logits (the events the certificate counts) and Kish's design effect "
         "1 + (sum n_i^2 / N - 1) ICC (how much more a count of misses varies than the "
         "binomial count the certificate assumes, when whole patients are drawn): design "
         f"effect {min(de):.3f} to {max(de):.3f} over the classes. The phantom draws every "
         "image's labels independently; a patient's images share only the patient's habitus "
         "(and age / sex), so this is the correlation there was to find. The same on the real "
         "NIH CheXNet predictions (the same statistic at the same quantile of ITS positive "
         "logits; patient ids from the NIH table): "
         + ("not computed (" + nih["skipped"] + ")" if "skipped" in nih else
            f"{nih['n_images']:,} images of {nih['n_patients']:,} patients, design effect "
            f"{min(c['design_effect'] for c in nih['classes']):.2f} to "
            f"{max(c['design_effect'] for c in nih['classes']):.2f}: a real patient's "
            "follow-up films share findings and scores, and an image-level certificate there "
            "counts far fewer independent draws than it assumes")
         + ".\n"),
        "| class | phantom positives | weighted positive images per patient | ICC of misses | "
        "design effect | NIH positives | NIH weighted images per patient | NIH ICC | NIH "
        "design effect |", "|---|---|---|---|---|---|---|---|---|"]
    nih_rows = {c["class"]: c for c in nih.get("classes", [])}
    for c in icc:
        n = nih_rows.get(c["class"], {})
        lines.append(f"| {c['class']} | {c['positives']:,} | {_p(c['images_per_patient_w'], 2)} "
                     f"| {_p(c['icc'], 4)} | {_p(c['design_effect'], 3)} | "
                     f"{n.get('positives', '-')} | {_p(n.get('images_per_patient_w'), 2)} | "
                     f"{_p(n.get('icc'), 3)} | {_p(n.get('design_effect'), 2)} |")
    for key, d in r["designs"].items():
        lines += [f"\n## {key} draws per phantom: {d['draws']} independent draws of "
                  f"{d['patients_per_draw_mean']:.0f} patients ({d['images_per_draw_mean']:.0f} "
                  f"images, {d['images_per_draw_min']}-{d['images_per_draw_max']})\n",
                  "| method | certified share | share met (macro) | cluster 95% CI | at T-SE, "
                  "T+SE | worst class | violations, all draws (macro, worst) | mean pop. "
                  "recall | recall p10 | precision | flagged share |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in METHODS:
            x = d["methods"][m]["macro"]
            lines.append(
                f"| {m} | {_p(x['certified_share'])} | {_p(x['share_met'])} | "
                f"{_cis(x['share_met_ci95_cluster_bootstrap'])} | "
                f"{_p(x['share_met_at_target_minus_se'])}, "
                f"{_p(x['share_met_at_target_plus_se'])} | {_p(x['share_met_min'])} | "
                f"{_p(x['violations_all_draws'])}, {_p(x['violations_max'])} | "
                f"{_p(x['recall_mean'])} | {_p(x['recall_p10'])} | {_p(x['precision_mean'])} | "
                f"{_p(x['flagged_share_mean'])} |")
        left = {m: d["methods"][m]["macro"]["classes_left_out"] for m in METHODS}
        if any(left.values()):
            lines.append("\nLeft out of the macro (certified in fewer than "
                         f"{d['methods']['ltt_recall']['macro']['min_certified_draws']} draws): "
                         + "; ".join(f"{m}: {', '.join(v)}" for m, v in left.items() if v) + ".")
        crc = d["methods"]["crc_recall"]["classes"]
        below = [c["class"] for c in crc if c["recall_mean"] is not None
                 and c["recall_mean"] + 2 * np.hypot(c["recall_mean_se_draws"] or 0.0,
                                                     c["population_se_at_target"] or 0.0) < T]
        lines.append(f"\nCRC (`E[recall]>={T}`): macro mean population recall "
                     f"{_p(d['methods']['crc_recall']['macro']['recall_mean'])}; classes more "
                     f"than 2 standard errors (draws and population) below {T}: "
                     f"{', '.join(below) or 'none'}.\n")
        lines += ["| class | pop. positives | pop. SE at T | cal positives (mean, min) | ltt "
                  "certified | ltt share met (95% CI; cluster) | ltt at T-SE, T+SE | ltt iid "
                  "expected | per patient certified | per patient share met (95% CI) | "
                  "per patient iid expected | crc mean recall | sens. share met |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for j, c in enumerate(d["methods"]["ltt_recall"]["classes"]):
            o = d["methods"]["ltt_per_patient"]["classes"][j]
            k = d["methods"]["crc_recall"]["classes"][j]
            s = d["methods"]["sensitivity"]["classes"][j]
            lines.append(
                f"| {c['class']} | {c['population_positives']:,} | "
                f"{_p(c['population_se_at_target'], 4)} | {c['cal_positives_mean']:.0f}, "
                f"{c['cal_positives_min']} | {_p(c['certified_share'], 2)} | "
                f"{_p(c['share_met'])} ({_cis(c['share_met_ci95'])}; "
                f"{_cis(c['share_met_ci95_cluster_bootstrap'])})"
                f"{' **short**' if c['short_of_level'] else ''} | "
                f"{_p(c['share_met_at_target_minus_se'])}, "
                f"{_p(c['share_met_at_target_plus_se'])} | {_p(c['iid_expected_share'])} | "
                f"{_p(o['certified_share'], 2)} | {_p(o['share_met'])} "
                f"({_cis(o['share_met_ci95'])}){' **short**' if o['short_of_level'] else ''} | "
                f"{_p(o['iid_expected_share'])} | {_p(k['recall_mean'])} | "
                f"{_p(s['share_met'])} |")
    sec = r["seconds"]
    lines.append(f"\nSeconds: generate and predict (or load the cached predictions) "
                 f"{sec['generate_and_predict_or_load']}, draws {sec['draws']}, total "
                 f"{sec['total']} (OMP_NUM_THREADS=1, torch 1 thread).\n")
    lines.append("Kermany: not possible in this mode: there is no population beyond its ~2,000 "
                 "held-out images (see conformal_kermany.md for the test-half numbers).\n")
    return "\n".join(lines)
