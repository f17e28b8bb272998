"""Population mode of benchmarks/conformal_bench.py (``--population``, issue V): the guarantee
``P(population recall >= T) >= 1 - alpha`` checked against a POPULATION recall, not a test half.

The test-half benchmark (conformal_bench.py without ``--population``) scores each threshold on
the other half of one 20,000-image phantom; a test half as large as the calibration half adds
its own sampling noise, so the share of splits whose TEST-half recall reaches T understates the
guarantee. Here, with the phantom source's model (the same arch, size and training):

* population: ``--pop-chunks`` fresh phantoms of ``--chunk-n`` images each (seeds
  ``--pop-seed``, ``--pop-seed + 1``, ...; the same generator arguments as the test-half
  benchmark's population, only the seed differs; synthetic patients never seen in training),
  predicted once. Its realised per-class recall at a threshold stands for the population recall
  (its own binomial standard error is reported next to it);
* calibration pool: ``--pool-chunks`` further phantoms (seeds from ``--pool-seed``), disjoint
  from the population and from training;
* per draw (``--splits`` of them, seed = draw number): a calibration sample of the SAME number
  of patients as the test-half benchmark's calibration half (half the patients of
  ``phantom?n=EVAL_N&seed=EVAL_SEED``), drawn by patient from the pool
  (:func:`medscalpel.repair.conformal.patient_split`); on it ``ltt_recall`` (``recall>=T`` with
  confidence ``1 - alpha``), ``crc_recall`` (``E[recall]>=T``), the point ``sensitivity``
  threshold and ``youden`` (:class:`~medscalpel.repair.calibrate.ThresholdCalibrator`), all
  library calls; each threshold is applied to the whole population.

Reported per method and class: the share of draws whose population recall reached T (with its
exact binomial 95% interval over the draws), the same share at T -/+ one population standard
error (how much the finite population moves it), the share of ALL draws where a claim was made
and broken (certified AND population recall < T: what alpha bounds), the mean population recall
(what CRC bounds), precision and flagged share (the cost). The macro share's interval is a
bootstrap over draws.

Limits, stated in the output: the population and the pool are finite samples; both are fixed
for all draws, so their own deviations shift every draw's outcome the same way (per class, not
covered by the binomial interval over draws; roughly independent across classes, so the macro
share is less affected). Patients: a phantom patient has several images, the binomial argument
counts images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from medscalpel.engine.predictions import Predictions
from medscalpel.repair.calibrate import ThresholdCalibrator
from medscalpel.repair.conformal import calibrate_guarantee, patient_split

METHODS = ("ltt_recall", "crc_recall", "sensitivity", "youden")
#: columns of one draw's per-class row
COLS = ("certified", "recall", "precision", "flagged", "cal_positives")


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


def stack(parts: list[tuple[Predictions, list[str]]]) -> tuple[Predictions, list[str]]:
    """One Predictions of several chunks (ids prefixed by the chunk's seed, as the patients)."""
    p0 = parts[0][0]
    ids, pids = [], []
    for p, pid in parts:
        seed = pid[0].split(":")[0] if pid else ""
        ids += [f"{seed}:{i}" for i in p.ids]
        pids += pid
    preds = Predictions(logits=np.concatenate([p.logits for p, _ in parts]),
                        labels=np.concatenate([p.labels for p, _ in parts]), ids=tuple(ids),
                        class_names=p0.class_names, task=p0.task, split="all",
                        model_id=p0.model_id)
    return preds, pids


class PopulationRates:
    """Recall, precision and flagged share of the population at any threshold: per class the
    sorted positive and all scores (logits for the conformal thresholds, float64 probabilities
    as :meth:`ThresholdCalibrator.transform` compares them), counted with ``searchsorted``: the
    same counts as ``score >= threshold`` on every image (checked on the first draw)."""

    def __init__(self, preds: Predictions):
        lab = preds.targets()
        z = preds.logits.astype(np.float64)
        p = preds.probs().astype(np.float64)
        self.sorted: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"logit": [], "prob": []}
        self.n_pos, self.n_known = [], []
        for j in range(preds.num_classes):
            known = np.isfinite(lab[:, j])
            y = lab[known, j] > 0.5
            self.n_pos.append(int(y.sum()))
            self.n_known.append(int(known.sum()))
            for key, s in (("logit", z[known, j]), ("prob", p[known, j])):
                self.sorted[key].append((np.sort(s[y]), np.sort(s)))

    def rates(self, j: int, threshold: float, scale: str) -> tuple[float, float, float]:
        pos, every = self.sorted[scale][j]
        tp = pos.size - int(np.searchsorted(pos, threshold, "left"))
        flagged = every.size - int(np.searchsorted(every, threshold, "left"))
        return (tp / pos.size if pos.size else np.nan, tp / flagged if flagged else np.nan,
                flagged / every.size if every.size else np.nan)


def _direct_rates(pop: Predictions, j: int, threshold: float, scale: str
                  ) -> tuple[float, float, float]:
    """The same rates by comparing every image (the self-check of :class:`PopulationRates`)."""
    lab = pop.targets()
    known = np.isfinite(lab[:, j])
    y = lab[known, j] > 0.5
    s = (pop.logits.astype(np.float64) if scale == "logit"
         else pop.probs().astype(np.float64))[known, j]
    d = s >= threshold
    tp, fl = int(np.sum(d & y)), int(d.sum())
    return (tp / y.sum() if y.any() else np.nan, tp / fl if fl else np.nan,
            fl / d.size if d.size else np.nan)


# ----------------------------------------------------------------------------- one draw
def one_draw(pool: Predictions, pool_pids: list[str], n_patients: int, rates: PopulationRates,
             seed: int, args, pop: Predictions | None = None) -> dict[str, np.ndarray]:
    """Calibrate every method on one patient-wise draw from the pool, apply it to the
    population. ``pop`` given: also check the fast counts against a direct comparison."""
    n_pool_patients = len(set(pool_pids))
    sp = patient_split(pool, pool_pids, n_patients / n_pool_patients, seed)
    if sp.n_patients[1] != n_patients:
        raise RuntimeError(f"draw {seed}: {sp.n_patients[1]} patients, wanted {n_patients}")
    cal = pool.select(sp.held_out)
    logit_thr = {"ltt_recall": calibrate_guarantee(cal, f"recall>={args.target}", args.alpha),
                 "crc_recall": calibrate_guarantee(cal, f"E[recall]>={args.target}")}
    prob_thr = {"sensitivity": ThresholdCalibrator("sensitivity", args.target).fit(cal),
                "youden": ThresholdCalibrator("youden").fit(cal)}
    npos = np.nansum(cal.targets() > 0.5, axis=0)
    out: dict[str, np.ndarray] = {}
    for m in METHODS:
        res = np.full((cal.num_classes, len(COLS)), np.nan)
        for j in range(cal.num_classes):
            res[j, 4] = npos[j]
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
            res[j, 1:4] = rates.rates(j, thr, scale)
            if pop is not None:
                direct = _direct_rates(pop, j, thr, scale)
                if not np.allclose(res[j, 1:4], direct, rtol=0, atol=1e-12, equal_nan=True):
                    raise RuntimeError(f"self-check: {m} class {j}: {res[j, 1:4]} vs {direct}")
        out[m] = res
    # what a world of independent images predicts for ltt_recall (continuous scores): the
    # population recall at the k-th smallest of n positives reaches T with probability
    # P(Binomial(n, 1-T) >= k) = 1 - the certificate's binomial_p
    out["ltt_iid"] = np.array([1.0 - c.calibration["binomial_p"] if c.certified else np.nan
                               for c in logit_thr["ltt_recall"].classes])
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


def summarise(draws: list[dict], names: tuple[str, ...], rates: PopulationRates, args,
              n_boot: int = 2000) -> dict:
    T = args.target
    out: dict[str, dict] = {}
    rng = np.random.default_rng(0)
    boot = rng.integers(0, len(draws), (n_boot, len(draws)))
    for m in METHODS:
        arr = np.stack([d[m] for d in draws])  # [D, K, COLS]
        cert = arr[:, :, 0] == 1
        rec = arr[:, :, 1]
        classes = []
        for j, name in enumerate(names):
            ok = cert[:, j]
            r = rec[ok, j]
            se_t = float(np.sqrt(T * (1 - T) / rates.n_pos[j])) if rates.n_pos[j] else np.nan
            met = int(np.sum(r >= T - 1e-12))
            rm = float(r.mean()) if r.size else np.nan
            classes.append({
                "class": name, "population_positives": rates.n_pos[j],
                "population_se_at_target": _f(se_t),
                "cal_positives_mean": float(arr[:, j, 4].mean()),
                "cal_positives_min": int(arr[:, j, 4].min()),
                "certified_share": float(ok.mean()), "n_certified": int(ok.sum()),
                "share_met": met / r.size if r.size else None,
                "share_met_ci95": _ci(met, int(r.size)),
                # the finite population's own noise: the same share at T -/+ one standard error
                "share_met_at_target_minus_se": (float(np.mean(r >= T - se_t)) if r.size
                                                 else None),
                "share_met_at_target_plus_se": (float(np.mean(r >= T + se_t)) if r.size
                                                else None),
                "violations_all_draws": float(np.sum(r < T - 1e-12) / len(draws)),
                "recall_mean": _f(rm),
                "recall_mean_se_draws": _f(float(r.std(ddof=1) / np.sqrt(r.size))
                                           if r.size > 1 else np.nan),
                "recall_mean_se_population": _f(float(np.sqrt(rm * (1 - rm) / rates.n_pos[j]))
                                                if r.size and rates.n_pos[j] else np.nan),
                "recall_p10": _f(float(np.quantile(r, 0.1)) if r.size else np.nan),
                "recall_min": _f(float(r.min()) if r.size else np.nan),
                "precision_mean": _f(float(np.nanmean(arr[ok, j, 2])) if r.size else np.nan),
                "flagged_share_mean": _f(float(np.nanmean(arr[ok, j, 3])) if r.size else np.nan),
            })
        met_all = (rec >= T - 1e-12) & cert  # [D, K]

        bs = np.array([_macro_share(cert[b], met_all[b]) for b in boot])
        keys = ("certified_share", "share_met", "share_met_at_target_minus_se",
                "share_met_at_target_plus_se", "violations_all_draws", "recall_mean",
                "recall_p10", "precision_mean", "flagged_share_mean")
        macro = {k: _f(float(np.mean([c[k] for c in classes if c[k] is not None])))
                 for k in keys}
        macro["share_met_ci95_bootstrap"] = [float(np.quantile(bs, 0.025)),
                                            float(np.quantile(bs, 0.975))]
        shares = [c["share_met"] for c in classes if c["share_met"] is not None]
        macro["share_met_min"] = float(min(shares))
        macro["violations_max"] = float(max(c["violations_all_draws"] for c in classes))
        # pooled over every (draw, class) pair with a claim
        macro["pairs_met"] = float(met_all.sum() / cert.sum())
        out[m] = {"classes": classes, "macro": macro}
    iid = np.stack([d["ltt_iid"] for d in draws])  # [D, K]
    for j, c in enumerate(out["ltt_recall"]["classes"]):
        c["iid_expected_share"] = _f(float(np.nanmean(iid[:, j])) if np.isfinite(
            iid[:, j]).any() else np.nan)
    out["ltt_recall"]["macro"]["iid_expected_share"] = _f(float(np.mean(
        [c["iid_expected_share"] for c in out["ltt_recall"]["classes"]
         if c["iid_expected_share"] is not None])))
    return out


# ----------------------------------------------------------------------------- run
def run(args, phantom_model, phantom_source) -> dict:
    from medscalpel.models.checkpoint import load_model

    t0 = time.perf_counter()
    cache, spec, train_s = phantom_model(args)
    if args.cal_patients:
        n_cal, ref = int(args.cal_patients), "--cal-patients"
    else:  # the calibration half of the test-half benchmark (its first split)
        ev, ev_pids, _ = phantom_source(args)
        sp = patient_split(ev, ev_pids, 0.5, 0)
        n_cal = int(sp.n_patients[0])
        ref = (f"half the patients of phantom?n={args.eval_n}&size=64&seed={args.eval_seed} "
               f"(the test-half benchmark's calibration half: {sp.n_patients[0]} patients, "
               f"{sp.calibration.size} images in its first split)")
    pop_seeds = [args.pop_seed + i for i in range(args.pop_chunks)]
    pool_seeds = [args.pool_seed + i for i in range(args.pool_chunks)]
    used = {0, args.eval_seed}
    if set(pop_seeds) & set(pool_seeds) or (set(pop_seeds) | set(pool_seeds)) & used:
        raise SystemExit(f"the population seeds {pop_seeds}, pool seeds {pool_seeds} and the "
                         f"training / test-half seeds {sorted(used)} must be disjoint")
    model = load_model(cache / "model")
    ccache = cache / "population"
    t1 = time.perf_counter()
    pop, pop_pids = stack([phantom_chunk(model, ccache, args.chunk_n, s) for s in pop_seeds])
    pool, pool_pids = stack([phantom_chunk(model, ccache, args.chunk_n, s) for s in pool_seeds])
    data_s = time.perf_counter() - t1
    if set(pop_pids) & set(pool_pids):
        raise RuntimeError("population and calibration pool share patients")
    rates = PopulationRates(pop)
    t2 = time.perf_counter()
    draws = [one_draw(pool, pool_pids, n_cal, rates, s, args, pop=pop if s == 0 else None)
             for s in range(args.splits)]
    draw_s = time.perf_counter() - t2
    names = tuple(pop.class_names)
    cal_images = np.array([d["n_images"][0] for d in draws])
    return {
        "mode": "population",
        "train_spec": spec, "arch": args.arch, "epochs": args.epochs,
        "chunk_spec": f"phantom?n={args.chunk_n}&size=64&seed=S [all]",
        "population": {"seeds": pop_seeds, "n_images": pop.n,
                       "n_patients": len(set(pop_pids)),
                       "positives": dict(zip(names, rates.n_pos)),
                       "prevalence": {n: rates.n_pos[j] / rates.n_known[j]
                                      for j, n in enumerate(names)}},
        "pool": {"seeds": pool_seeds, "n_images": pool.n, "n_patients": len(set(pool_pids))},
        "draws": args.splits,
        "calibration": {"n_patients": n_cal, "reference": ref,
                        "n_images_mean": float(cal_images.mean()),
                        "n_images_min": int(cal_images.min()),
                        "n_images_max": int(cal_images.max()),
                        "pool_fraction": n_cal / len(set(pool_pids))},
        "self_check": "draw 0: searchsorted counts == direct score >= threshold comparison "
                      "on every population image (raises otherwise)",
        "class_names": list(names),
        "seconds": {"train": round(train_s, 1), "generate_and_predict": round(data_s, 1),
                    "draws": round(draw_s, 1), "total": round(time.perf_counter() - t0, 1)},
        "methods": summarise(draws, names, rates, args),
    }


# ----------------------------------------------------------------------------- markdown
def _p(v, d=3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def _test_half(args) -> dict | None:
    """The test-half benchmark's phantom numbers (benchmarks/results/conformal.json) when it
    ran the same model, population and targets; None otherwise."""
    path = Path(__file__).resolve().parent / "results" / "conformal.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    c = d.get("config", {})
    same = all(c.get(k) == getattr(args, k) for k in ("target", "alpha", "arch", "n", "epochs",
                                                      "eval_n", "eval_seed"))
    ph = d.get("results", {}).get("phantom")
    return ph if same and ph and "methods" in ph else None


def markdown(r: dict, args) -> str:
    T, a = args.target, args.alpha
    pop, pool, cal = r["population"], r["pool"], r["calibration"]
    th = _test_half(args)
    lines = [
        f"# Conformal thresholds against a POPULATION recall: {r['draws']} calibration draws\n",
        (f"Target recall >= {T}; `ltt_recall` promises P(population recall >= {T}) >= "
        f"{1 - a:.2f} (alpha = {a}), `crc_recall` promises E[recall] >= {T}; `sensitivity` "
        "(point threshold at calibration sensitivity T) and `youden` promise nothing. Produced "
        "by `benchmarks/conformal_bench.py --population` (benchmarks/conformal_population.py).\n"),
        (f"Model: {r['arch']}, {r['epochs']} epochs on `{r['train_spec']}` (the test-half "
        f"benchmark's phantom model). Population: {pop['n_images']:,} images, "
        f"{pop['n_patients']:,} patients, {len(pop['seeds'])} fresh phantoms "
        f"`{r['chunk_spec']}` with seeds {pop['seeds'][0]}-{pop['seeds'][-1]} (training used "
        f"seed 0, the test-half benchmark seed {args.eval_seed}), predicted once; its realised "
        "recall at a threshold is the population recall. Calibration pool: "
        f"{pool['n_images']:,} images, {pool['n_patients']:,} patients (seeds "
        f"{pool['seeds'][0]}-{pool['seeds'][-1]}). Each draw: {cal['n_patients']:,} patients "
        f"by patient from the pool ({cal['n_images_mean']:.0f} images on average, "
        f"{cal['n_images_min']}-{cal['n_images_max']}; {cal['reference']}).\n"),
        ("Share met = share of draws with a claim (certified) whose population recall >= "
        "target, exact binomial 95% interval over the draws (Monte-Carlo error only). The "
        "population is finite: SE = its binomial standard error of the recall at the target "
        "(sqrt(T(1-T)/positives)); 'at T -/+ SE' recomputes the share against T - SE and "
        "T + SE, showing how far the population's own noise can move it (the population and "
        "the pool are fixed for all draws, so per class this is a shared offset, not covered "
        "by the interval over draws). Violations = share of ALL draws certified AND population "
        f"recall < target (what alpha = {a} bounds). Macro = mean over classes (interval: "
        "bootstrap over draws). Images of one patient are correlated; the binomial argument "
        "counts images. 'iid expected' (ltt_recall) = the share independent images would give "
        "exactly (continuous scores): the mean over draws of P(Binomial(n, 1-T) >= k), n the "
        "draw's positives, k the order statistic chosen; >= 1 - alpha by construction.\n"),
        ("| method | certified share | share met (macro) | 95% CI | at T-SE, T+SE | worst class "
        "| violations, all draws (macro, worst) | (draw, class) pairs met | mean pop. recall "
        "| recall p10 | precision | flagged share |"
        + (" test-half coverage (conformal.md) |" if th else "")),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if th else ""),
    ]
    for m in METHODS:
        x = r["methods"][m]["macro"]
        ci = x["share_met_ci95_bootstrap"]
        row = (f"| {m} | {_p(x['certified_share'])} | {_p(x['share_met'])} | "
               f"{_p(ci[0])}-{_p(ci[1])} | {_p(x['share_met_at_target_minus_se'])}, "
               f"{_p(x['share_met_at_target_plus_se'])} | {_p(x['share_met_min'])} | "
               f"{_p(x['violations_all_draws'])}, {_p(x['violations_max'])} | "
               f"{_p(x['pairs_met'])} | {_p(x['recall_mean'])} | {_p(x['recall_p10'])} | "
               f"{_p(x['precision_mean'])} | {_p(x['flagged_share_mean'])} |")
        if th:
            row += f" {_p(th['methods'][m]['macro']['coverage'])} |"
        lines.append(row)
    crc = r["methods"]["crc_recall"]["classes"]
    below = [c["class"] for c in crc if c["recall_mean"] is not None and c["recall_mean"] < T]
    far = [c["class"] for c in crc if c["recall_mean"] is not None
           and c["recall_mean"] + 2 * np.hypot(c["recall_mean_se_draws"] or 0.0,
                                               c["recall_mean_se_population"] or 0.0) < T]
    lines.append(f"\n`ltt_recall`, independent-images expectation (macro): "
                 f"{_p(r['methods']['ltt_recall']['macro']['iid_expected_share'])}.")
    lines.append(f"\nCRC (`E[recall]>={T}`): macro mean population recall "
                 f"{_p(r['methods']['crc_recall']['macro']['recall_mean'])}; classes whose mean "
                 f"is below {T}: {', '.join(below) or 'none'}; more than 2 standard errors "
                 f"below (draws and population combined): {', '.join(far) or 'none'}.\n")
    lines.append("Per class, `recall>=T` with confidence (ltt_recall), `E[recall]>=T` (CRC) and "
                 "the point sensitivity threshold:\n")
    lines.append("| class | pop. positives | pop. SE at T | cal positives (mean, min) | ltt "
                 "certified | ltt share met (95% CI) | ltt at T-SE, T+SE | ltt iid expected | "
                 "ltt mean recall | "
                 "ltt precision | crc mean recall (SE draws, SE pop.) | sens. share met | "
                 "sens. mean recall |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for j, c in enumerate(r["methods"]["ltt_recall"]["classes"]):
        k = r["methods"]["crc_recall"]["classes"][j]
        s = r["methods"]["sensitivity"]["classes"][j]
        ci = c["share_met_ci95"]
        ci_txt = f" ({_p(ci[0])}-{_p(ci[1])})" if ci else ""
        lines.append(
            f"| {c['class']} | {c['population_positives']:,} | "
            f"{_p(c['population_se_at_target'], 4)} | {c['cal_positives_mean']:.0f}, "
            f"{c['cal_positives_min']} | {_p(c['certified_share'], 2)} | "
            f"{_p(c['share_met'])}{ci_txt} | "
            f"{_p(c['share_met_at_target_minus_se'])}, {_p(c['share_met_at_target_plus_se'])} | "
            f"{_p(c['iid_expected_share'])} | {_p(c['recall_mean'])} | {_p(c['precision_mean'])} | {_p(k['recall_mean'])} "
            f"({_p(k['recall_mean_se_draws'], 4)}, {_p(k['recall_mean_se_population'], 4)}) | "
            f"{_p(s['share_met'])} | {_p(s['recall_mean'])} |")
    sec = r["seconds"]
    lines.append(f"\nSeconds: generate and predict {sec['generate_and_predict']}, draws "
                 f"{sec['draws']}, total {sec['total']} (OMP_NUM_THREADS=1, torch 1 thread).\n")
    lines.append("Kermany: not possible in this mode: there is no population beyond its ~2,000 "
                 "held-out images (see conformal_kermany.md for the test-half numbers).\n")
    return "\n".join(lines)
