"""The served artifact explains itself (issue T): ``deploy`` rebuilds the chosen runtime
variant from :class:`~medscalpel.deploy.cam_head.CamHead`, so the served graph returns the
class activation maps beside the logits, and measures what that costs and how faithful the
maps are:

- the head identity (``logits = mean(CAM) + b``) on the evaluation images, else no CAM output;
- the torch fp32 CAM against pytorch-grad-cam's Grad-CAM at the same layer (max |delta| of the
  [0, 1] maps; equal up to float error for such heads);
- the served CAM against the torch fp32 CAM: max |delta| and the median Spearman rank agreement
  per image (the statement for bf16 / int8, whose maps are not bit-equal);
- the served logits' parity with the logits-only artifact (the same bound as the variant's);
- the latency cost of the extra output at batch 1, alternated rounds (target <= 5%), for the two
  calls a server makes: a PREDICTION (``latency_cost``: the runtimes run the logits-only subgraph
  of the served file, :func:`~medscalpel.deploy.export.logits_only_onnx` /
  :func:`~medscalpel.deploy.runtimes.logits_only_openvino`, so a prediction never computes the
  maps) and a call that RETURNS THE MAPS (``maps_latency_cost``: the whole graph), each against
  the logits-only artifact; the prediction path's logits are checked equal to the whole graph's.

The logits-only artifact is kept beside it (``serve/logits_only/``) for users who want none.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from medscalpel.deploy.cam_head import CamHead, cam_maps, cam_support, rank_agreement
from medscalpel.deploy.export import logits_only_onnx
from medscalpel.deploy.runtimes import RUNTIMES, Runtime
from medscalpel.deploy.timing import MIN_CONFIDENCE, median_ms, speed_ratio
from medscalpel.explain.cams import compute_cam

logger = logging.getLogger(__name__)

#: the latency cost of the CAM output this project aims for (issue T)
CAM_COST_TARGET = 0.05
#: images whose CAMs are compared (top class of each)
N_CAM_IMAGES = 16


def _targets(logits: np.ndarray) -> list[int]:
    return [int(k) for k in np.argmax(logits, axis=1)]


def _torch_gradcam_delta(model, images: torch.Tensor, targets: list[int],
                         fp32_maps: np.ndarray, raw: np.ndarray) -> dict[str, Any]:
    """Torch fp32 CAM vs pytorch-grad-cam Grad-CAM on images whose map is not degenerate
    (a map whose positive part is below 1e-3 of its scale is float noise after min-max)."""

    g = compute_cam(model, images, targets, method="gradcam", progress=False).maps
    sel = np.stack([raw[i, t] for i, t in enumerate(targets)])
    scale = np.abs(sel).reshape(len(sel), -1).max(1)
    ok = sel.reshape(len(sel), -1).max(1) > 1e-3 * np.maximum(scale, 1e-12)
    d = np.abs(fp32_maps - g).reshape(len(g), -1).max(1)
    return {"max_abs_delta": float(d[ok].max()) if ok.any() else None,
            "images": int(ok.sum()), "degenerate_images": int((~ok).sum()),
            "definition": "max |served-definition CAM - pytorch-grad-cam Grad-CAM| of the [0, 1] "
                          "maps (ReLU, min-max per image, bilinear), torch fp32, same layer"}


def explain_variant(chosen: Runtime, model, images: torch.Tensor, ref_logits: np.ndarray,
                    calib: torch.Tensor, workdir: Path, threads: int, rounds: int, repeats: int,
                    warmup: int, runtime_kwargs: dict[str, Any] | None = None
                    ) -> tuple[Runtime | None, dict[str, Any]]:
    """Build ``chosen`` again with a CAM output and measure it. Returns the built runtime (or
    ``None`` with the reason in the dict when the model or the runtime cannot carry CAMs)."""
    support = cam_support(model, images[:8])
    info: dict[str, Any] = {"support": support.to_dict(), "output": "cam",
                            "definition": "cam[n, k] = sum_c W[k, c] A[n, c] at the CAM layer "
                                          "(pre-ReLU class activation map; logits = mean(cam) + "
                                          "b); Grad-CAM = ReLU(cam) / (h w)"}
    if not support.ok:
        return None, {**info, "status": "not available", "reason": support.reason}
    if chosen.runtime.startswith("torch"):
        return None, {**info, "status": "torch",
                      "reason": "the served torch model explains itself with Grad-CAM "
                                "(medscalpel explain cam); no second output is exported"}
    head = CamHead(model).eval()
    n = min(N_CAM_IMAGES, images.shape[0])
    x = images[:n]
    with torch.inference_mode():
        _, raw_t = head(x)
    raw_t = raw_t.numpy()
    targets = _targets(ref_logits[:n])
    size = (int(images.shape[2]), int(images.shape[3]))
    fp32_maps = cam_maps(raw_t, targets, size)
    info["gradcam_equivalence"] = _torch_gradcam_delta(model, x, targets, fp32_maps, raw_t)
    rt = RUNTIMES.create(chosen.name, threads=threads, **(runtime_kwargs or {}))
    try:
        rt.prepare(head, x[:1], calib, workdir)
        outs = rt.run_outputs(np.ascontiguousarray(x.numpy()))
    except Exception as exc:  # noqa: BLE001 - a runtime that cannot carry it says so
        rt.remove_files()
        return None, {**info, "status": "not available",
                      "reason": f"{chosen.name} could not build the CAM graph: "
                                f"{type(exc).__name__}: {str(exc)[:200]}"}
    info["export"] = rt.info.get("export")  # how the served CAM graph was exported
    served_maps = cam_maps(outs[1], targets, size)
    rho = rank_agreement(served_maps, fp32_maps)
    scale = max(float(np.abs(ref_logits).max()), 1e-6)
    # the served logits: the whole graph's and the prediction path's (its logits-only subgraph;
    # OpenVINO int8 fuses it differently, so they may differ within the precision's bound)
    pred = np.asarray(rt.run(np.ascontiguousarray(x.numpy())))
    parity = max(float(np.abs(outs[0] - ref_logits[:n]).max()),
                 float(np.abs(pred - ref_logits[:n]).max())) / scale
    info["served_vs_torch_fp32"] = {
        "max_abs_delta_maps": float(np.abs(served_maps - fp32_maps).max()),
        "median_spearman": float(np.nanmedian(rho)) if np.isfinite(rho).any() else None,
        "min_spearman": float(np.nanmin(rho)) if np.isfinite(rho).any() else None,
        "images": n, "targets": "top class of each image"}
    info["logit_parity_rel"] = parity
    info["prediction_path"] = {
        "graph": "logits-only subgraph of the served file (the CAM nodes are not run)",
        "max_abs_delta_vs_whole_graph": float(np.abs(pred - outs[0]).max()),
        **prediction_graph_identity(chosen, rt)}
    if not parity <= chosen.tolerance:
        rt.remove_files()
        return None, {**info, "status": "refused",
                      "reason": f"the CAM graph's logits differ from torch fp32 by {parity:.3g} "
                                f"of the logit scale > {chosen.tolerance:g}"}
    info["latency_cost"], info["maps_latency_cost"] = latency_costs(
        chosen, rt, x[:1].numpy(), rounds, repeats, warmup)
    info["status"] = "served"
    return rt, info


def _op_counts(rt: Runtime, predict: bool) -> tuple[Counter, str] | None:
    """What a prediction of ``rt`` executes, as op-type counts: ONNX Runtime -> the ONNX graph
    its prediction session was built from (before ORT's own optimisation, which is
    deterministic for one graph); OpenVINO -> the compiled model's runtime graph (after the
    plugin's fusions: what actually runs)."""
    if rt.runtime == "onnxruntime":
        sub = logits_only_onnx(rt.files[0])[0] if predict else None
        proto = onnx.load_from_string(sub) if sub is not None else onnx.load(str(rt.files[0]))
        return Counter(n.op_type for n in proto.graph.node), "ONNX graph of the prediction session"
    if rt.runtime == "openvino":
        compiled = rt.predict_compiled if predict else rt.compiled
        ops = compiled.get_runtime_model().get_ops()
        return (Counter(str(op.get_rt_info()["layerType"]) for op in ops),
                "OpenVINO compiled runtime graph (after the plugin's fusions)")
    return None


def prediction_graph_identity(plain: Runtime, with_cam: Runtime) -> dict[str, Any]:
    """Whether a prediction on the CAM artifact executes the same graph as the logits-only
    artifact (equal op-type counts; for OpenVINO, of the compiled graphs): when it does, the
    prediction's latency cost is zero by construction and the timing only shows its noise."""
    a, b = _op_counts(plain, False), _op_counts(with_cam, True)
    if a is None or b is None:
        return {"same_ops_as_logits_only": None, "ops_compared": "not compared for this runtime"}
    diff = {k: b[0].get(k, 0) - a[0].get(k, 0) for k in set(a[0]) | set(b[0])
            if b[0].get(k, 0) != a[0].get(k, 0)}
    return {"same_ops_as_logits_only": not diff, "ops_compared": b[1],
            "n_ops": sum(b[0].values()), "op_count_differences": diff}


def _cost(t_with: list[float], t_plain: list[float], call: str) -> dict[str, Any]:
    sr = speed_ratio(t_with, t_plain)  # > 1: the logits-only artifact is faster by that factor
    sure = sr.confidence >= MIN_CONFIDENCE
    outcome = ("pass" if sure and sr.high - 1 <= CAM_COST_TARGET else
               "fail" if sure and sr.low - 1 > CAM_COST_TARGET else "undecided")
    return {"call": call, "cost": sr.ratio - 1, "low": sr.low - 1, "high": sr.high - 1,
            "confidence": sr.confidence, "noisy": sr.noisy, "target": CAM_COST_TARGET,
            "outcome": outcome, "plain_ms": sr.candidate_ms, "cam_ms": sr.reference_ms,
            "rounds": len(sr.rounds), "batch": 1}


def latency_costs(plain: Runtime, with_cam: Runtime, x1: np.ndarray, rounds: int, repeats: int,
                  warmup: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Batch-1 latency of the artifact with the CAM output against the logits-only artifact,
    in ONE alternated run (the three calls' order rotates every round): ``cost = ms / plain_ms
    - 1`` (median of per-round ratios and its interval) for a prediction (``with_cam.run``: the
    logits-only subgraph) and for a call returning the maps (``with_cam.run_outputs``)."""
    times: dict[str, list[float]] = {"plain": [], "predict": [], "maps": []}
    calls = {"plain": lambda: plain.run(x1), "predict": lambda: with_cam.run(x1),
             "maps": lambda: with_cam.run_outputs(x1)}
    order = list(calls)
    for r in range(max(rounds, 5)):
        for k in order[r % 3:] + order[:r % 3]:
            times[k].append(median_ms(calls[k], warmup, repeats))
    return (_cost(times["predict"], times["plain"], "prediction (logits only)"),
            _cost(times["maps"], times["plain"], "logits and maps"))


__all__ = ["CAM_COST_TARGET", "explain_variant", "latency_costs", "prediction_graph_identity"]
