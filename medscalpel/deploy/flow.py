"""Deploy fast: benchmark every available CPU runtime x precision on the same images and serve
the fastest one that keeps the accuracy.

``deploy`` exports the model (ONNX; OpenVINO IR), builds each variant of
:data:`~medscalpel.deploy.runtimes.RUNTIMES` (torch eager / channels-last / compile, ONNX
Runtime fp32 / int8 U8S8 / int8 S8S8, OpenVINO fp32 / bf16 / int8 via NNCF), checks parity
against torch float32 (a variant over its tolerance is refused and its files removed), compares
per-class and macro AUROC with paired bootstrap CIs on a real split
(:func:`~medscalpel.engine.compare.compare_predictions`), times all variants ALTERNATED in
rounds (median and spread per variant, plus an fp32 matmul peak in the same rounds), and
recommends the fastest variant that is not slower than torch fp32 (nor, for a reduced
precision, than its own runtime's fp32) and meets the accuracy floor. Every other variant gets
its no-go reasons.

Example:
    >>> import tempfile, torch
    >>> from medscalpel.data import ArrayDataset, Preprocess
    >>> import numpy as np
    >>> from medscalpel.models.zoo import create_model
    >>> rng = np.random.default_rng(0)
    >>> ds = ArrayDataset(rng.random((16, 32, 32)).astype(np.float32),
    ...                   (rng.random((16, 2)) > .5).astype(np.float32), ["a", "b"],
    ...                   "multilabel", preprocess=Preprocess(size=32), split="test")
    >>> from medscalpel.models.checkpoint import make_card
    >>> m = create_model("vgg_tiny", num_classes=2, img_size=32)
    >>> m.card = make_card(m, ["a", "b"], "multilabel", Preprocess(size=32))
    >>> r = deploy(m, ds, tempfile.mkdtemp() + "/d", variants=["torch:fp32", "onnxruntime:fp32"],
    ...            batches=(1,), rounds=1, repeats=1, n_boot=0, progress=False)
    >>> r.recommended in ("torch:fp32", "onnxruntime:fp32")
    True
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medscalpel.compress.measure import count_macs, count_parameters
from medscalpel.data.base import split_warning
from medscalpel.deploy.cam import explain_variant
from medscalpel.deploy.export import preferred_exporter
from medscalpel.deploy.result import DeployResult, VariantResult
from medscalpel.deploy.runtimes import RUNTIMES, OpenVinoInt8AccuracyControl, Runtime, cpu_features
from medscalpel.deploy.serve import copy_exports, serve_metadata, write_serve
from medscalpel.deploy.timing import SpeedRatio, speed_ratio
from medscalpel.deploy.variant_timing import benchmark_variants, peak_gemms
from medscalpel.engine.compare import compare_predictions
from medscalpel.engine.metrics import auroc
from medscalpel.engine.predict import collect_images
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, MedScalpelError, MissingExtraError, VerificationError
from medscalpel.progress import track
from medscalpel.repair.calibrate import binary_view
from medscalpel.repair.card_guarantee import guarantee_of_card
from medscalpel.repair.conformal import GuaranteeResult, Recertification, recertify
from medscalpel.runs import RunDir, dumps_json, machine_info, package_versions, write_json
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

OWNER = "deploy"
#: every variant tried by default. Opt-in: ``openvino:int8-ac`` (re-validates many times) and
#: ``torch_compile:fp32`` (compiling densenet_tiny at 64 px took 77 s on this 2-core CPU).
DEFAULT_VARIANTS = ("torch:fp32", "torch_channels_last:fp32",
                    "onnxruntime:fp32", "onnxruntime:int8-u8s8", "onnxruntime:int8-s8s8",
                    "openvino:fp32", "openvino:bf16", "openvino:int8")
REFERENCE = "torch:fp32"


class _Variant:
    """A runtime being measured (mutable bookkeeping inside one ``deploy`` call)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.status = "go"
        self.reasons: list[str] = []
        self.times: dict[int, list[float]] = {}
        self.parity: tuple[float, float] | None = None
        self.comparison = None
        self.verdicts: dict[str, Any] = {}  # "internal" / "external": Verdict
        self.ext_comparison = None
        self.preds: Predictions | None = None        # its own logits on the evaluation images
        self.ext_preds: Predictions | None = None    # ... and on the external set
        self.recert: dict[str, Recertification] = {}  # "internal" / "external"
        self.prepare_s: float | None = None

    def fail(self, status: str, reason: str) -> None:
        self.status = status
        self.reasons.append(reason)


# ----------------------------------------------------------------------------- validate
def _validate(batches, rounds, repeats, warmup, n_images, n_calib, floor_macro, floor_class):
    if not batches:
        raise ConfigError(f"The 'batches' parameter of {OWNER} must not be empty.")
    for b in batches:
        check_range(b, "batches", OWNER, 1, integer=True)
    check_range(rounds, "rounds", OWNER, 1, integer=True)
    check_range(repeats, "repeats", OWNER, 1, integer=True)
    check_range(warmup, "warmup", OWNER, 0, integer=True)
    check_range(n_images, "n_images", OWNER, 2, integer=True)
    check_range(n_calib, "n_calib", OWNER, 1, integer=True)
    # a floor is a non-inferiority margin: a loss of at most |floor| (0 asks for no loss)
    check_range(floor_macro, "floor_macro", OWNER, -1.0, 0.0)
    check_range(floor_class, "floor_class", OWNER, -1.0, 0.0)


def _select(variants, runtimes, precisions, threads, extra_kwargs) -> list[Runtime]:
    """Registered names (filtered by runtime / precision) and Runtime instances, the torch
    fp32 reference first. Unknown names raise; an explicitly asked runtime whose extra is
    missing raises :class:`MissingExtraError`."""
    explicit = variants is not None or runtimes is not None
    names_or_rts = list(variants) if variants is not None else list(DEFAULT_VARIANTS)
    known_rt = {n.split(":")[0] for n in RUNTIMES.names()}
    known_pr = {n.split(":")[1] for n in RUNTIMES.names()}
    for r in runtimes or ():
        if r not in known_rt:
            raise ConfigError(f"Unknown runtime '{r}' for {OWNER}. Valid names: "
                              f"{', '.join(sorted(known_rt))}.")
    for p in precisions or ():
        if p not in known_pr:
            raise ConfigError(f"Unknown precision '{p}' for {OWNER}. Valid names: "
                              f"{', '.join(sorted(known_pr))}.")
    if variants is None:  # an opt-in variant joins when its own runtime / precision is named
        default_pr = {n.split(":")[1] for n in DEFAULT_VARIANTS}
        names_or_rts += [n for n in RUNTIMES.names() if n not in DEFAULT_VARIANTS and (
            n.split(":")[0] in (runtimes or ())
            or (n.split(":")[1] in (precisions or ()) and n.split(":")[1] not in default_pr))]
    if runtimes is not None:
        names_or_rts = [n for n in names_or_rts if not isinstance(n, str)
                        or n.split(":")[0] in runtimes]
    if precisions is not None:  # 'int8' names its family: int8, int8-u8s8, int8-s8s8
        names_or_rts = [n for n in names_or_rts if not isinstance(n, str)
                        or any(n.split(":")[1] == p or n.split(":")[1].startswith(p + "-")
                               for p in precisions)]
    out: list[Runtime] = []
    for item in names_or_rts:
        if isinstance(item, Runtime):
            out.append(item)
            continue
        RUNTIMES.get(item)  # unknown names list the valid ones
        kw = extra_kwargs if item == OpenVinoInt8AccuracyControl.runtime + ":" + \
            OpenVinoInt8AccuracyControl.precision else {}
        rt = RUNTIMES.create(item, threads=threads, **kw)
        rt._explicit = explicit  # type: ignore[attr-defined]
        out.append(rt)
    if not any(r.name == REFERENCE for r in out):
        out.insert(0, RUNTIMES.create(REFERENCE, threads=threads))
    out.sort(key=lambda r: r.name != REFERENCE)
    seen: set[str] = set()
    for r in out:
        if r.name in seen:
            raise ConfigError(f"{OWNER}: variant '{r.name}' is listed twice.")
        seen.add(r.name)
    return out


# ----------------------------------------------------------------------------- plan / build
def _input_shape(model: nn.Module, data) -> tuple[int, int, int]:
    card = getattr(model, "card", None)
    if card is not None and card.input.get("size"):
        return (int(card.input.get("channels", 1)), int(card.input["size"]),
                int(card.input["size"]))
    return tuple(data.image(0).shape)  # type: ignore[return-value]


def _predictions(logits: np.ndarray, data, idx: list[int], name: str) -> Predictions:
    labels = np.asarray(data.labels)[idx]
    return Predictions(logits, labels, tuple(str(data.ids[i]) for i in idx),
                       tuple(data.class_names), data.task, data.split, model_id=name)


def run_batched(rt: Runtime, images: torch.Tensor, batch: int) -> np.ndarray:
    """Logits of ``rt`` on all images in full batches of ``batch`` (the last one padded, so a
    shape-specialised runtime compiles once)."""
    x = images.numpy()
    outs = []
    for i in range(0, x.shape[0], batch):
        chunk = x[i:i + batch]
        n = chunk.shape[0]
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outs.append(np.asarray(rt.run(chunk))[:n])
    return np.concatenate(outs).astype(np.float32)


def _ac_metric(labels: np.ndarray, ref_logits: np.ndarray, task: str):
    """NNCF accuracy-control metric from OUR per-class AUROC: ``1 + min(worst class delta,
    2 x macro delta)`` vs the torch fp32 reference, so ``max_drop=0.01`` encodes the default
    floors (class -0.01, macro -0.005)."""
    k = ref_logits.shape[1]
    y = (np.eye(k)[labels] if task == "multiclass" else labels).astype(float)

    def per_class(logits: np.ndarray) -> np.ndarray:
        return np.array([auroc(y[:, c][~np.isnan(y[:, c])], logits[:, c][~np.isnan(y[:, c])])
                         for c in range(k)])

    ref = per_class(ref_logits)

    def metric(logits: np.ndarray) -> float:
        d = per_class(logits) - ref
        d = d[np.isfinite(d)]
        return 1.0 + float(min(d.min(), 2 * d.mean())) if d.size else 1.0

    return metric


def _build(v: _Variant, model, example, calib, workdir) -> None:
    """available() -> prepare(); failures become the variant's status (never silent)."""
    rt = v.rt
    try:
        reason = rt.available()
    except MissingExtraError as exc:
        if getattr(rt, "_explicit", False):
            raise
        reason = str(exc)
    if reason is not None:
        v.fail("unavailable", reason)
        return
    t0 = time.perf_counter()
    try:
        rt.prepare(model, example, calib, workdir)
    except MedScalpelError as exc:
        v.fail("error", f"export/compile error: {exc}")
    except Exception as exc:  # noqa: BLE001 - a runtime's own failure is a result, not a crash
        v.fail("error", f"export/compile error: {type(exc).__name__}: {str(exc)[:300]}")
    v.prepare_s = round(time.perf_counter() - t0, 3)
    if v.status == "error":
        rt.remove_files()


def _check_accuracy(v: _Variant, images, ref_logits, ref_preds, data, idx, batch, n_boot,
                    seed, external=None) -> None:
    """Parity vs torch fp32 (refuse + remove files over tolerance) and paired delta AUROC on
    the evaluation images and, when given, on the external set (``external``: images,
    reference predictions, dataset, indices)."""
    try:
        logits = run_batched(v.rt, images, batch)
        ext_logits = (run_batched(v.rt, external[0], batch) if external is not None else None)
    except Exception as exc:  # noqa: BLE001
        v.fail("error", f"inference error: {type(exc).__name__}: {str(exc)[:300]}")
        v.rt.remove_files()
        return
    scale = max(float(np.abs(ref_logits).max()), 1e-6)
    worst = float(np.abs(logits - ref_logits).max()) if np.isfinite(logits).all() else np.inf
    v.parity = (worst, worst / scale)
    if not worst / scale <= v.rt.tolerance:
        v.fail("refused", f"failed parity: max |delta logit| {worst:.3g} = {worst / scale:.3g} of "
                          f"the logit scale > {v.rt.tolerance:g}; its files were removed")
        v.rt.remove_files()
        return
    v.preds = _predictions(logits, data, idx, v.rt.name)
    v.comparison = compare_predictions(ref_preds, v.preds, n_boot=n_boot, seed=seed,
                                       boot_metrics=("auroc",))
    if external is not None:
        _, ext_ref, ext_data, ext_idx = external
        v.ext_preds = _predictions(ext_logits, ext_data, ext_idx, v.rt.name)
        v.ext_comparison = compare_predictions(ext_ref, v.ext_preds, n_boot=n_boot, seed=seed,
                                               boot_metrics=("auroc",))


def accuracy_verdict(comparison, floor_macro: float, floor_class: float, n_boot: int,
                     accept_unscorable: bool | Sequence[str] = False, min_pos: int = 10):
    """The non-inferiority verdict of one variant on one set: every class's delta AUROC >=
    ``floor_class`` and the macro mean's >= ``floor_macro`` shown by the paired intervals, Holm
    across them (paired bootstrap, or paired DeLong without replicates)."""
    return comparison.verdict(margin=-floor_class, macro_margin=-floor_macro,
                              method="bootstrap" if n_boot else "delong",
                              min_pos=min_pos, min_neg=min_pos,
                              accepted_unscorable=accept_unscorable)


# ----------------------------------------------------------------------------- guarantee
def _recertify(v: _Variant, g: GuaranteeResult, positive: str | None,
               require: bool) -> None:
    """Re-certify ``g`` on the variant's own logits (evaluation set, and external set when
    measured): a fail is no-go, undecided blocks only when ``require``."""
    for where, preds in (("internal", v.preds), ("external", v.ext_preds)):
        if preds is None:
            continue
        view = binary_view(preds, positive) if positive is not None else preds
        rc = recertify(g, view)
        v.recert[where] = rc
        if rc.outcome == "fail":
            v.fail("no-go", f"guarantee {g.spec} FAILS ({where}): {rc.verdict.reason}")
        elif rc.outcome == "undecided" and require:
            v.fail("undecided", f"guarantee {g.spec} not re-certified ({where}, "
                                f"--require-guarantee): {rc.verdict.reason}; "
                                f"{rc.min_k.get('statement', '')}")


# ----------------------------------------------------------------------------- decide
_PRECISION_RANK = {"fp32": 0, "bf16": 1}  # int8 variants rank 2: most accuracy risk


def _speed(v: _Variant, other: _Variant, b: int) -> SpeedRatio | None:
    """How much faster ``v`` is than ``other`` at batch ``b``: per-round ratios of one
    alternated run (``None`` when either was not timed)."""
    if not v.times.get(b) or not other.times.get(b) or len(v.times[b]) != len(other.times[b]):
        return None
    return speed_ratio(other.times[b], v.times[b])


def _decide(vs: list[_Variant], batches, floor_macro, floor_class, vnni: bool, n_boot: int = 0,
            accept_unscorable: bool | Sequence[str] = False, min_pos: int = 10,
            guarantee: tuple[GuaranteeResult, str | None] | None = None,
            require_guarantee: bool = False) -> None:
    """Accuracy, then speed. Accuracy: the variant's non-inferiority verdict on the evaluation
    set (and on the external set when given) must PASS: a fail is no-go, an undecided verdict
    (intervals straddling the floor, or classes with too few positives to check) is
    ``undecided``, never served. Guarantee (when the card carries one): every variant that
    passes the floor is re-certified on its own logits; a fail is no-go, an undecided
    re-certification blocks only with ``require_guarantee``. Speed: no-go when DECISIVELY
    slower than torch fp32 (or a reduced precision than its own runtime's fp32): the whole
    interval of its per-round speed ratio below 1. Within timing noise it stays eligible and the tie rule of
    :func:`_recommend` decides."""
    b0 = batches[0]
    by_name = {v.rt.name: v for v in vs}
    ref = by_name.get(REFERENCE)
    for v in vs:
        if v.status != "go":
            continue
        # the reference IS the model: nothing to verify, so it stays servable whatever the
        # evaluation set can show (its comparison with itself is kept for the record)
        for where, cmp in (() if v is ref else
                           (("internal", v.comparison), ("external", v.ext_comparison))):
            if cmp is None:
                continue
            verdict = accuracy_verdict(cmp, floor_macro, floor_class, n_boot,
                                       accept_unscorable, min_pos)
            v.verdicts[where] = verdict
            if verdict.outcome == "fail":
                v.fail("no-go", f"failed floor ({where}): {verdict.reason}")
            elif verdict.outcome == "undecided":
                v.fail("undecided", f"floor not shown ({where}): {verdict.reason}")
        if guarantee is not None and v.status == "go":
            _recertify(v, guarantee[0], guarantee[1], require_guarantee)
        sr = _speed(v, ref, b0) if ref is not None and v is not ref else None
        if sr is not None and sr.outcome == "slower":
            v.fail("no-go", f"slower than torch fp32 at batch {b0}: {sr.describe()}")
        fp32 = by_name.get(f"{v.rt.runtime}:fp32")
        sf = _speed(v, fp32, b0) if fp32 is not None and v.rt.precision != "fp32" else None
        if sf is not None and sf.outcome == "slower":
            hw = "" if vnni or not v.rt.precision.startswith("int8") else \
                " (no VNNI on this CPU: int8 runs on the AVX2 path)"
            v.fail("no-go", f"{v.rt.precision} slower than {v.rt.runtime} fp32 at batch {b0}: "
                            f"{sf.describe()}{hw}")


def _noisy(live: list[_Variant], b0: int) -> list[str]:
    ref = next((v for v in live if v.rt.name == REFERENCE), None)
    if ref is None:
        return []
    out = []
    for v in live:
        sr = _speed(v, ref, b0) if v is not ref else None
        if sr is not None and sr.noisy:
            out.append(v.rt.name)
    return out


def _rank(v: _Variant) -> int:
    return _PRECISION_RANK.get(v.rt.precision, 2)


def _recommend(vs: list[_Variant], b0: int) -> tuple[_Variant | None, str]:
    """The fastest ``go`` variant, unless other ``go`` variants are indistinguishable from it
    within timing noise (the per-round ratio's interval holds 1 or the rounds are noisy):
    among those the highest precision is served (fp32 > bf16 > int8), so that a noisy run does
    not flip the recommendation to a riskier precision it has not shown to be faster."""
    go = [v for v in vs if v.status == "go" and v.times.get(b0)]
    if not go:
        return None, ""
    fastest = min(go, key=lambda v: statistics.median(v.times[b0]))
    ties = [v for v in go if v is fastest
            or (_speed(fastest, v, b0) is not None and _speed(fastest, v, b0).outcome != "faster")]
    best = min(ties, key=lambda v: (_rank(v), statistics.median(v.times[b0])))
    ref = next(v for v in vs if v.rt.name == REFERENCE)
    sr = _speed(best, ref, b0)
    m = best.comparison.macro["delta_auroc"] if best.comparison else 0.0
    speed = sr.describe() if sr is not None else "1.00x (it is the reference)"
    shown = (" and ".join(f"{k} {best.verdicts[k].outcome}" for k in best.verdicts)
             or "the reference itself")
    reason = (f"fastest variant shown to meet the floor at batch {b0}: {speed} torch fp32 "
              f"eager, macro dAUROC {m:+.4f} (verdict: {shown}), parity "
              f"{best.parity[1]:.2g} of the logit scale")
    if best is not fastest:
        reason += (f"; {fastest.rt.name} had the lowest median but is not decisively faster "
                   f"({_speed(fastest, best, b0).describe()}), so the higher precision is "
                   "served")
    elif len(ties) > 1:
        others = ", ".join(v.rt.name for v in ties if v is not best)
        reason += f"; within timing noise of: {others}"
    if best is ref:
        held = [v.rt.name for v in vs if v is not ref and v.status in ("undecided", "no-go")]
        if held:
            reason += (f"; no faster variant was shown to meet the floor ({', '.join(held)}: "
                       "see their verdicts), so the reference itself is served")
    return best, reason


def _floor_error(vs: list[_Variant], floor_macro, floor_class) -> VerificationError:
    broken = [v.rt.name for v in vs if any(r.outcome == "fail" for r in v.recert.values())]
    if broken:
        return VerificationError(f"{OWNER}: no variant can be served: the model card's guarantee "
                                 f"FAILS for {', '.join(broken)} (see each variant's "
                                 "recertification), and no other variant was shown to meet the "
                                 "floor and keep it.")
    unsure = [v.rt.name for v in vs if v.status == "undecided"
              and any(r.outcome == "undecided" for r in v.recert.values())]
    if unsure:
        return VerificationError(f"{OWNER}: no variant can be served with --require-guarantee: "
                                 f"the model card's guarantee could not be re-certified "
                                 f"(undecided) for {', '.join(unsure)}: "
                                 f"{next(v for v in vs if v.rt.name == unsure[0]).reasons[-1]}")
    judged = [v for v in vs if v.verdicts]
    if not judged:
        return VerificationError(f"{OWNER}: no variant could be measured; see the reasons.")
    undecided = [v for v in judged if v.status == "undecided"]
    best = max(judged, key=lambda v: v.comparison.macro["delta_auroc"]
               if v.comparison is not None else -np.inf)
    lines = "; ".join(f"{k}: {vd.outcome} ({vd.reason})" for k, vd in best.verdicts.items())
    hint = (" Classes with fewer than 10 positive or negative evaluation images cannot be "
            "checked: use more images (--n-images), or accept them unchecked "
            "(--accept-unscorable, stated in the result)." if undecided else
            " Lower the floor or compress less.")
    return VerificationError(
        f"{OWNER}: no variant was shown to meet the accuracy floor (macro dAUROC >= "
        f"{floor_macro:+g}, every class >= {floor_class:+g}, paired intervals, Holm); "
        f"{len(undecided)} undecided; best: {best.rt.name}: {lines[:600]}.{hint}")


# ----------------------------------------------------------------------------- results
def _variant_result(v: _Variant, ref: _Variant, vs: list[_Variant], batches, macs, peak,
                    ) -> VariantResult:
    rt = v.rt
    lat, sp_t, sp_f, rate, frac, theo, speed = {}, {}, {}, {}, {}, {}, {}
    fp32 = next((w for w in vs if w.rt.name == f"{rt.runtime}:fp32"), None)
    peak_key = "int8" if rt.precision.startswith("int8") and peak.get("int8_gmacs") else "fp32"
    for b in batches:
        t = v.times.get(b)
        if not t:
            continue
        med = float(statistics.median(t))
        key = f"b{b}"
        lat[key] = {"median_ms": med, "min_ms": min(t), "max_ms": max(t),
                    "spread": (max(t) - min(t)) / med, "rounds_ms": list(t)}
        ev: dict[str, Any] = {}
        st = _speed(v, ref, b)
        if st is not None:
            sp_t[key] = st.ratio
            ev["vs_torch"] = st.to_dict()
        sf = _speed(v, fp32, b) if fp32 is not None and fp32 is not v else None
        if sf is not None:
            sp_f[key] = sf.ratio
            ev["vs_fp32"] = sf.to_dict()
        if ev:
            speed[key] = ev
        rate[key] = macs * b / (med / 1000.0) / 1e9
        if peak.get(f"{peak_key}_gmacs"):
            frac[key] = rate[key] / peak[f"{peak_key}_gmacs"]
        bound = peak.get("theoretical", {}).get(f"{peak_key}_gmacs")
        if bound:
            theo[key] = rate[key] / bound
    files = [f for f in rt.files if f.exists()]
    return VariantResult(
        name=rt.name, runtime=rt.runtime, precision=rt.precision, status=v.status,
        reasons=tuple(v.reasons), latency=lat, speedup_vs_torch=sp_t, speedup_vs_fp32=sp_f,
        parity_abs=v.parity[0] if v.parity else None,
        parity_rel=v.parity[1] if v.parity else None, parity_tolerance=rt.tolerance,
        # as JSON holds them (NaN -> null), so that a loaded deploy.json equals the result
        comparison=_as_json(v.comparison),
        verdicts={k: _as_json(vd) for k, vd in v.verdicts.items()},
        recertification={k: _as_json(rc) for k, rc in v.recert.items()},
        external_comparison=_as_json(v.ext_comparison),
        mac_rate=rate, peak_fraction=frac, peak_used=f"{peak_key} matmul" if rate else "",
        theoretical_fraction=theo, speed=speed,
        prepare_seconds=v.prepare_s, file_bytes=sum(f.stat().st_size for f in files) or None,
        info=dict(rt.info))


def _as_json(obj: Any) -> Any:
    return None if obj is None else json.loads(dumps_json(obj))


def _versions() -> dict[str, str]:

    out = package_versions()
    for n in ("openvino", "nncf"):
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return out


# ----------------------------------------------------------------------------- public API
def deploy(
    model: nn.Module,
    data,
    out: str | os.PathLike,
    *,
    calib_data=None,
    variants: Sequence[str | Runtime] | None = None,
    runtimes: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    batches: Sequence[int] = (1, 8),
    rounds: int = 5,
    repeats: int = 5,
    warmup: int = 2,
    n_images: int = 256,
    n_calib: int = 64,
    floor_macro: float = -0.005,
    floor_class: float = -0.01,
    threads: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
    explain: bool = True,
    external_data=None,
    accept_unscorable: bool | Sequence[str] = False,
    min_positives: int = 10,
    notes: Sequence[str] = (),
    require_guarantee: bool = False,
) -> DeployResult:
    """Benchmark every available runtime x precision and write the fastest acceptable one.

    Args:
        model: the (compressed) float32 model; it is not changed.
        data: labelled dataset split for parity and paired delta AUROC (e.g. the test split).
        out: run directory to create: ``deploy.json``, ``deploy.md``, ``export/`` (ONNX and
            OpenVINO IR float32), ``serve/`` (the chosen artifact + ``serve.json``), manifest.
        calib_data: split the int8 calibration images come from (the training split); default
            ``data`` (labelled as leaky in the notes).
        variants: registered names (``RUNTIMES.names()``) and/or :class:`Runtime` instances;
            default :data:`DEFAULT_VARIANTS`. torch fp32 (the reference) is always included.
        runtimes, precisions: filters on the variant names (e.g. ``["openvino"]``, ``["fp32"]``).
        batches: batch sizes timed; the first one decides the recommendation.
        rounds: alternated rounds (each variant once per round); ``repeats`` timed runs each.
        n_images, n_calib: evaluation and calibration images.
        floor_macro, floor_class: accuracy floor (<= 0) on macro / every class delta AUROC: a
            variant is served only when its paired intervals SHOW the loss is within the
            floor (non-inferiority, Holm across classes + macro;
            :meth:`~medscalpel.engine.compare.PairedComparison.verdict`); undecided variants
            are reported, never served.
        external_data: an optional labelled second-site set (same classes): every variant is
            judged on it too and must pass on both.
        accept_unscorable: classes with fewer than ``min_positives`` positive or negative
            evaluation images cannot be checked and leave a verdict undecided; ``True`` (or
            class names) accepts them unchecked, recorded in each verdict.
        notes: the caller's own notes for the result (e.g. what it left out).
        require_guarantee: when the card's operating point carries a guarantee
            (``repair calibrate --guarantee --model``) every variant that meets the floor is
            re-certified on its own logits (evaluation and external sets): a FAIL is always
            no-go; with ``require_guarantee`` an undecided re-certification is too (and a card
            without a guarantee is refused before any work).
        threads: intra-op threads of every runtime (default: torch's current setting).
        n_boot: paired bootstrap replicates of the delta AUROC CIs.
        explain: serve the chosen variant with a second output, the class activation maps
            (:mod:`~medscalpel.deploy.cam`: checked against Grad-CAM, its latency
            cost measured); the logits-only artifact is kept in ``serve/logits_only``. Models
            whose head is not GAP + linear (ViTs, VGG's FC head) get none, stated.

    Returns:
        The :class:`DeployResult` (also in ``out/deploy.json``).

    Raises:
        MissingExtraError: an explicitly requested runtime is not installed (names the extra).
        VerificationError: no variant was shown to meet the floor (the best one and its
            verdicts in the message); nothing is left in ``out``.
    """
    t0 = time.perf_counter()
    batches = tuple(int(b) for b in batches)
    _validate(batches, rounds, repeats, warmup, n_images, n_calib, floor_macro, floor_class)
    if getattr(model, "card", None) is None:  # before any work: serving needs the contract
        raise ConfigError(f"{OWNER}: the model has no ModelCard (class names, task, input, "
                          "thresholds), which the served artifact's serve.json is made of; "
                          "load it with load_model(dir) or set model.card = make_card(...).")
    g, positive, g_notes = guarantee_of_card(model.card)
    if require_guarantee and g is None:
        raise ConfigError(f"{OWNER}: require_guarantee, but the model card's operating point "
                          "carries no guarantee (certify one with 'repair calibrate --guarantee "
                          "... --model DIR').")
    g_info = _guarantee_info(g, g_notes, require_guarantee)
    threads = int(threads or torch.get_num_threads())
    load_start = list(os.getloadavg())
    model = copy.deepcopy(model).eval().cpu().float()
    shape = _input_shape(model, data)
    images, idx = collect_images(data, n_images, seed=seed)
    calib_src = calib_data if calib_data is not None else data
    calib, cidx = collect_images(calib_src, n_calib, seed=seed + 1)
    ac_kwargs: dict[str, Any] = {}
    notes = [n for n in (split_warning(data), *notes) if n]
    if external_data is not None:
        if list(external_data.class_names) != list(data.class_names):
            raise ConfigError(f"{OWNER}: the external set's classes {list(external_data.class_names)}"
                              f" differ from the evaluation set's {list(data.class_names)}; map "
                              "them first (see 'medscalpel evaluate --external').")
        ext_images, ext_idx = collect_images(external_data, n_images, seed=seed + 2)
    if accept_unscorable:
        notes.append("classes with too few positive or negative evaluation images were accepted "
                     "unchecked (accept_unscorable): each verdict names them")
    if calib_data is None:
        notes.append("int8 calibration images came from the evaluation split (leaky): pass "
                      "calib_data (the training split)")
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    workdir = Path(tempfile.mkdtemp(prefix="medscalpel-deploy-"))
    try:
        ref_rt = RUNTIMES.create(REFERENCE, threads=threads)
        ref_rt.prepare(model, images[:1], None, workdir)
        ref_logits = run_batched(ref_rt, images, max(batches))
        ref_preds = _predictions(ref_logits, data, idx, REFERENCE)
        external = None
        if external_data is not None:
            ext_ref = _predictions(run_batched(ref_rt, ext_images, max(batches)), external_data,
                                   ext_idx, REFERENCE)
            external = (ext_images, ext_ref, external_data, ext_idx)
        if calib_data is not None:
            with torch.inference_mode():
                cal_ref = np.asarray(model(calib).float())
            ac_kwargs = {"validation": (calib.numpy(), np.asarray(calib_src.labels)[cidx]),
                         "metric": _ac_metric(np.asarray(calib_src.labels)[cidx], cal_ref,
                                              calib_src.task)}
        vs = [_Variant(rt) for rt in _select(variants, runtimes, precisions, threads, ac_kwargs)]
        for v in track(vs, "build variants", progress=progress):
            _build(v, model, images[:1], calib, workdir)
            if v.status == "go":
                _check_accuracy(v, images, ref_logits, ref_preds, data, idx, max(batches),
                                n_boot, seed, external)
        live = [v for v in vs if v.status == "go"]
        peak = benchmark_variants(live, images, batches, rounds, warmup, repeats, threads, progress)
        noisy = _noisy(live, batches[0])
        if noisy:  # once: more rounds, appended to the same aligned series
            logger.warning("timing of %s was noisy; measuring %d more rounds", ", ".join(noisy),
                           rounds)
            peak = benchmark_variants(live, images, batches, rounds, warmup, repeats, threads,
                                      progress)
            still = _noisy(live, batches[0])
            notes.append(f"timing was noisy ({', '.join(noisy)}): re-measured with {rounds} more "
                         "rounds" + (f"; still noisy: {', '.join(still)} (their speed-ups are "
                                     "uncertain in size: quote them with their intervals)"
                                     if still else ""))
        feats = cpu_features()
        _decide(vs, batches, floor_macro, floor_class, feats["vnni"], n_boot, accept_unscorable,
                min_positives, None if g is None else (g, positive), require_guarantee)
        chosen, reason = _recommend(vs, batches[0])
        if chosen is None:
            raise _floor_error(vs, floor_macro, floor_class)
        if explain:
            kw = ac_kwargs if isinstance(chosen.rt, OpenVinoInt8AccuracyControl) else None
            cam_rt, cam_info = explain_variant(chosen.rt, model, images, ref_logits, calib,
                                               workdir / "cam", threads, rounds, repeats, warmup,
                                               kw)
        else:
            cam_rt, cam_info = None, {"status": "off", "reason": "explain=False: logits only"}
        result = _finish(model, shape, vs, chosen, reason, workdir, out, data, calib_src,
                         images, calib, batches, rounds, repeats, threads, floor_macro,
                         floor_class, peak, feats, load_start, notes, overwrite, t0,
                         cam_rt, cam_info, external, g_info)
    finally:
        torch.set_num_threads(prev)
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _finish(model, shape, vs, chosen, reason, workdir, out, data, calib_src, images, calib,
            batches, rounds, repeats, threads, floor_macro, floor_class, peak, feats,
            load_start, notes, overwrite, t0, cam_rt=None, cam_info=None,
            external=None, guarantee=None) -> DeployResult:
    """Assemble the DeployResult and write the run directory atomically."""
    macs = count_macs(model, images[:1])
    ref = next(v for v in vs if v.rt.name == REFERENCE)
    results = tuple(_variant_result(v, ref, vs, batches, macs, peak) for v in vs)
    load_end = list(os.getloadavg())
    cores = os.cpu_count() or 1
    under_load = max(load_start[0], load_end[0]) > 0.5 * cores
    chosen_res = next(r for r in results if r.name == chosen.rt.name)
    card = getattr(model, "card", None)
    config = {"variants": [v.rt.name for v in vs], "batches": list(batches), "rounds": rounds,
              "repeats": repeats, "threads": threads, "floor_macro": floor_macro,
              "floor_class": floor_class}
    with RunDir(Path(out), command="compress deploy", config=config, overwrite=overwrite,
                data={"eval": data.content_hash(), "calib": calib_src.content_hash()}) as run:
        exports = copy_exports(workdir, run.path)
        files = write_serve(run.path / "serve", model, chosen, shape, cam_rt)
        meta = serve_metadata(model, shape, chosen_res, files, cam_info)
        write_json(run.path / "serve" / "serve.json", meta)
        result = DeployResult(
            model_id=getattr(card, "model_id", "") or getattr(model, "arch", "model"),
            arch=str(getattr(model, "arch", type(model).__name__)), input_shape=tuple(shape),
            class_names=tuple(data.class_names), task=data.task, macs=macs,
            params=count_parameters(model), batches=batches, rounds=rounds, repeats=repeats,
            threads=threads, split=data.split, n_images=int(images.shape[0]),
            n_calib=int(calib.shape[0]), calib_split=calib_src.split,
            floor={"macro": floor_macro, "per_class": floor_class}, variants=results,
            recommended=chosen.rt.name, reason=reason, peak=peak, cpu=feats,
            loadavg={"start": load_start, "end": load_end}, under_load=under_load,
            serve={"dir": "serve", "files": files, "exports": exports, **meta},
            notes=tuple(notes), versions=_versions(), machine=machine_info(),
            explanation=dict(cam_info or {}),
            external=({"split": external[2].split, "n_images": int(external[0].shape[0]),
                       "spec": getattr(external[2], "spec", None)} if external else {}),
            guarantee=dict(guarantee or {}),
            seconds=round(time.perf_counter() - t0, 3))
        result.save(run.path)
    return result


def _guarantee_info(g: GuaranteeResult | None, notes: list[str], require: bool
                    ) -> dict[str, Any]:
    """deploy.json's ``guarantee``: what was re-certified, or that there was nothing."""
    if g is None:
        return {"status": "none", "reason": "the model card's operating point carries no "
                                            "guarantee: nothing to re-certify"}
    return {"status": "re-certified", "spec": g.spec, "alpha": g.alpha,
            "certified_on": {"split": g.split, "n_images": g.n_images,
                             "n_patients": g.n_patients, "model_id": g.model_id},
            "certified_classes": [c.name for c in g.classes if c.certified],
            "require_guarantee": require, "notes": notes,
            "rule": "every variant meeting the floor is re-certified on its own logits at the "
                    "card's thresholds (exact one-sample tests, Holm over the certified rows): "
                    "fail -> no-go; undecided -> " + ("not served (--require-guarantee)" if
                                                      require else "reported, not blocking")}


#: why the budgeted paths (quick_deploy, the demo's export) keep the TorchScript exporter
DEMO_EXPORTER_REASON = ("the demo's time budget: the dynamo exporter took 2-35 s per model where "
                        "the TorchScript one took 0.1-4 s (benchmarks/results/"
                        "export_exporters.json); same parity")

#: the demo's quick stage: the fp32 runtimes (int8 calibration alone took 43 s of a 121 s
#: quick run on densenet121 at 64 px under load average 11 on 2 cores), one batch, few rounds
QUICK_VARIANTS = ("torch:fp32", "onnxruntime:fp32", "openvino:fp32")


def quick_deploy(model: nn.Module, data, out: str | os.PathLike, calib_data=None,
                 overwrite: bool = False, progress: bool | None = None) -> DeployResult:
    """A budgeted :func:`deploy` for the demo (batch 1, 5 rounds: the fewest whose speed
    interval reaches 90% coverage, 64 evaluation and 16 calibration images, 200 bootstrap
    replicates, the :data:`QUICK_VARIANTS` that are installed; OpenVINO is skipped without the
    extra, and that is recorded). At 64 images most classes have too few positives to check:
    they are accepted unchecked, and every verdict names them. The int8 and bf16 variants are
    left to the full command."""
    names = [n for n in QUICK_VARIANTS
             if not n.startswith("openvino") or importlib.util.find_spec("openvino")]
    left_out = [n for n in QUICK_VARIANTS if n not in names]
    with preferred_exporter("torchscript", DEMO_EXPORTER_REASON):
        return deploy(model, data, out, calib_data=calib_data, variants=names, batches=(1,),
                  rounds=5, repeats=3, warmup=1, n_images=64, n_calib=16, n_boot=200,
                      overwrite=overwrite, progress=progress, accept_unscorable=True,
                      notes=([f"not measured: {', '.join(left_out)} (OpenVINO is not "
                              "installed: pip install 'medscalpel[deploy]')"] if left_out else [])
                      + [f"ONNX files exported with the TorchScript exporter: "
                         f"{DEMO_EXPORTER_REASON}"])


__all__ = ["DEFAULT_VARIANTS", "QUICK_VARIANTS", "quick_deploy", "DeployResult", "VariantResult", "deploy", "peak_gemms",
           "run_batched", "serve_metadata"]
