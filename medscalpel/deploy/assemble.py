"""Recording a deploy call: measured variants -> :class:`~medscalpel.deploy.result.DeployResult`
and the run directory.

:func:`_variant_result` turns one variant's bookkeeping into its typed row (latency per batch,
speed ratios with evidence, MAC rate and peak fractions, parity, verdicts as JSON holds them);
:func:`_guarantee_info` states what was re-certified; :func:`_finish` writes the run directory
atomically (exports, the served artifact and its ``serve.json``, ``deploy.json``).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from medscalpel.compress.measure import count_macs, count_parameters
from medscalpel.deploy.decide import _speed
from medscalpel.deploy.plan import REFERENCE, _Inputs, _Plan, _Variant
from medscalpel.deploy.result import DeployResult, VariantResult
from medscalpel.deploy.serve import copy_exports, serve_metadata, write_serve
from medscalpel.repair.conformal import GuaranteeResult
from medscalpel.runs import RunDir, dumps_json, machine_info, package_versions, write_json


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


def _finish(model, inp: _Inputs, plan: _Plan, vs, chosen, reason, workdir, out, data, peak,
            feats, load_start, notes, overwrite, t0, cam_rt=None, cam_info=None,
            external=None, guarantee=None, manifest: bool = True) -> DeployResult:
    """Assemble the DeployResult and write the run directory atomically (``manifest``: as a
    run directory of its own; else into ``out``, a folder of the caller's run directory)."""
    shape, calib_src, images, calib = inp.shape, inp.calib_src, inp.images, inp.calib
    batches, rounds, repeats, threads = plan.batches, plan.rounds, plan.repeats, plan.threads
    floor_macro, floor_class = plan.floor_macro, plan.floor_class
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
    with _output(out, manifest, command="compress deploy", config=config, overwrite=overwrite,
                 data={"eval": data.content_hash(), "calib": calib_src.content_hash()}) as path:
        exports = copy_exports(workdir, path)
        files = write_serve(path / "serve", model, chosen, shape, cam_rt)
        meta = serve_metadata(model, shape, chosen_res, files, cam_info)
        write_json(path / "serve" / "serve.json", meta)
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
        result.save(path)
    return result


@contextmanager
def _output(out, manifest: bool, **run_dir: Any) -> Iterator[Path]:
    """Where :func:`_finish` writes: a :class:`~medscalpel.runs.RunDir` of its own at ``out``
    (``manifest``), else ``out`` itself, a folder inside the caller's run directory (which is
    already private until it finishes, and holds the one manifest)."""
    if manifest:
        with RunDir(Path(out), **run_dir) as run:
            yield run.path
    else:
        Path(out).mkdir(parents=True, exist_ok=True)
        yield Path(out)


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

