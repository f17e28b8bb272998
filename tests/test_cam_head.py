"""The served artifact explains itself (issue T): CAMs as a second output of the exported
graph, equal to pytorch-grad-cam's Grad-CAM for GAP + linear heads, refused (with the reason)
where the head is not, carried by every runtime, served beside a logits-only artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medscalpel.deploy.cam import _op_counts, prediction_graph_identity
from medscalpel.deploy.cam_head import CamHead, cam_maps, cam_support, rank_agreement
from medscalpel.deploy.flow import deploy
from medscalpel.deploy.runtimes import RUNTIMES
from medscalpel.data import ArrayDataset, Preprocess
from medscalpel.explain.cams import compute_cam
from medscalpel.models.checkpoint import make_card
from medscalpel.models.zoo import create_model


def _model(arch: str, size: int):
    torch.manual_seed(0)
    m = create_model(arch, num_classes=3, img_size=size).eval()
    with torch.no_grad():  # well-conditioned maps: a classifier of unit scale
        m.classifier.weight.normal_(0, 1)
    return m


@pytest.mark.parametrize("arch,size", [("resnet_tiny", 64), ("densenet_tiny", 64),
                                       ("vgg_tiny", 64)])
def test_served_cam_equals_torch_gradcam_in_fp32(arch, size):
    m = _model(arch, size)
    x = torch.rand(6, 1, size, size)
    sup = cam_support(m, x)
    assert sup.ok and sup.max_rel_delta < 1e-5
    with torch.no_grad():
        logits, raw = CamHead(m)(x)
    # the head identity the export rests on
    assert torch.allclose(raw.mean(dim=(2, 3)) + m.classifier.bias, logits, atol=1e-5)
    targets = [0, 1, 2, 0, 1, 2]
    served = cam_maps(raw.numpy(), targets, (size, size))
    g = compute_cam(m, x, targets, method="gradcam", progress=False).maps
    sel = np.stack([raw.numpy()[i, t] for i, t in enumerate(targets)])
    live = sel.reshape(6, -1).max(1) > 1e-3 * np.abs(sel).reshape(6, -1).max(1)
    assert live.sum() >= 3
    assert np.abs(served - g)[live].max() < 1e-4


def test_heads_that_are_not_gap_linear_get_no_cam():
    vit = create_model("vit_test", num_classes=3, img_size=32).eval()
    sup = cam_support(vit, torch.rand(2, 1, 32, 32))
    assert not sup.ok and "token model" in sup.reason

    m = _model("resnet_tiny", 32)
    m.backbone.avgpool = torch.nn.AdaptiveMaxPool2d(1)  # a CAM layer pooled by max, not mean
    sup = cam_support(m, torch.rand(2, 1, 32, 32))
    assert not sup.ok and "not global average pooling" in sup.reason


@pytest.mark.parametrize("name", ["onnxruntime:fp32", "openvino:fp32", "onnxruntime:int8-u8s8",
                                  "openvino:int8"])
def test_every_runtime_carries_the_cam_output(name, tmp_path):
    m = _model("resnet_tiny", 64)
    x = torch.rand(8, 1, 64, 64)
    with torch.no_grad():
        logits, raw = CamHead(m)(x)
    rt = RUNTIMES.create(name, threads=1)
    if rt.available() is not None:
        pytest.skip(rt.available())
    rt.prepare(CamHead(m), x[:1], x, tmp_path)
    out_logits, out_cam = rt.run_outputs(x.numpy())
    assert out_cam.shape == tuple(raw.shape)
    pred = rt.run(x.numpy())   # the prediction path: logits only
    if name == "openvino:int8":  # the plugin fuses the graph without the CAM branch differently
        assert np.abs(pred - out_logits).max() <= rt.tolerance * np.abs(out_logits).max()
    else:
        np.testing.assert_array_equal(pred, out_logits)  # logits stay output 0
    # a prediction runs the logits-only subgraph: the CAM nodes are not in what it runs
    if name.startswith("onnxruntime"):
        assert [o.name for o in rt.predict_session.get_outputs()] == ["logits"]
        assert [o.name for o in rt.session.get_outputs()] == ["logits", "cam"]
    else:
        assert len(rt.predict_compiled.outputs) == 1 and len(rt.compiled.outputs) == 2
    # ... and it executes the same ops as the logits-only artifact: no cost by construction
    plain = RUNTIMES.create(name, threads=1)
    plain.prepare(m, x[:1], x, tmp_path / "plain")
    same = prediction_graph_identity(plain, rt)
    assert same["same_ops_as_logits_only"] is True and same["op_count_differences"] == {}
    assert same["n_ops"] > 5
    # the comparison can tell: the whole CAM graph has ops the logits-only graph lacks
    assert _op_counts(rt, predict=False)[0] != _op_counts(plain, predict=False)[0]
    if name.endswith("fp32"):
        assert np.abs(out_cam - raw.numpy()).max() < 1e-4
    else:  # int8: not equal; the rank agreement of the maps is what is stated
        rho = rank_agreement(cam_maps(out_cam, [0] * 8, (64, 64)),
                             cam_maps(raw.numpy(), [0] * 8, (64, 64)))
        assert np.nanmedian(rho) > 0.8


def test_deploy_serves_cams_and_a_logits_only_artifact(tmp_path):
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.random((48, 64, 64)).astype(np.float32),
                      (rng.random((48, 3)) > .5).astype(np.float32), ["a", "b", "c"],
                      "multilabel", preprocess=Preprocess(size=64), split="test")
    m = _model("resnet_tiny", 64)
    m.card = make_card(m, ["a", "b", "c"], "multilabel", Preprocess(size=64))
    res = deploy(m, ds, tmp_path / "d", variants=["torch:fp32", "onnxruntime:fp32"],
                 batches=(1,), rounds=5, repeats=2, n_boot=0, progress=False)
    serve = tmp_path / "d" / "serve"
    meta = json.loads((serve / "serve.json").read_text())
    if res.recommended == "torch:fp32":
        assert meta["explanation"]["status"] == "torch" and meta["outputs"] == ["logits"]
        return
    e = meta["explanation"]
    assert e["status"] == "served" and meta["outputs"] == ["logits", "cam"]
    assert (serve / "model.onnx").is_file() and (serve / "logits_only" / "model.onnx").is_file()
    assert e["gradcam_equivalence"]["max_abs_delta"] < 1e-4
    assert e["served_vs_torch_fp32"]["max_abs_delta_maps"] < 1e-4
    for key, call in (("latency_cost", "prediction (logits only)"),
                      ("maps_latency_cost", "logits and maps")):
        cost = e[key]
        assert cost["call"] == call and cost["rounds"] >= 5
        assert cost["outcome"] in ("pass", "fail", "undecided")
        assert cost["low"] <= cost["cost"] <= cost["high"]
    # predictions run the logits-only subgraph: the same logits as the whole graph
    assert e["prediction_path"]["max_abs_delta_vs_whole_graph"] < 1e-5
    import onnx

    outs = [o.name for o in onnx.load(str(serve / "model.onnx")).graph.output]
    assert outs == ["logits", "cam"]
    assert [o.name for o in onnx.load(str(serve / "logits_only" / "model.onnx")).graph.output] \
        == ["logits"]
    off = deploy(m, ds, tmp_path / "off", variants=["torch:fp32", "onnxruntime:fp32"],
                 batches=(1,), rounds=5, repeats=2, n_boot=0, progress=False, explain=False)
    assert off.explanation["status"] == "off"
    assert not (tmp_path / "off" / "serve" / "logits_only").exists()


def test_a_failed_cam_cost_points_to_the_logits_only_artifact():
    from medscalpel.deploy.result import explanation_line

    e = {"status": "served", "support": {"layer": "backbone.features", "map_shape": [7, 7]},
         "latency_cost": {"cost": 0.104, "low": 0.072, "high": 0.162, "target": 0.05,
                          "outcome": "fail"},
         "served_vs_torch_fp32": {"median_spearman": 1.0, "max_abs_delta_maps": 0.01},
         "gradcam_equivalence": {"max_abs_delta": 3e-6, "images": 16}}
    line = explanation_line(e)
    assert "+10.4% [+7.2, +16.2]" in line and ": fail" in line
    assert "serve/logits_only/" in line and "--no-explain" in line
    e["latency_cost"]["outcome"] = "pass"
    assert "logits_only" not in explanation_line(e)
    # both calls are named when deploy measured both; only the prediction's failure points away
    e["maps_latency_cost"] = {"cost": 0.104, "low": 0.072, "high": 0.162, "target": 0.05,
                              "outcome": "fail"}
    e["latency_cost"] = {"cost": 0.001, "low": -0.02, "high": 0.03, "target": 0.05,
                         "outcome": "pass"}
    line = explanation_line(e)
    assert "of a prediction (logits-only subgraph) +0.1% [-2.0, +3.0]" in line
    assert "returning the maps +10.4% [+7.2, +16.2]" in line and "logits_only" not in line
