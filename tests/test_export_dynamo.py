"""ONNX export through torch's dynamo-based exporter (issue T): parity with torch per zoo
architecture and for CamHead's two outputs, a dynamic batch axis, the file loading in
onnxruntime and OpenVINO, and the TorchScript fallback chosen explicitly and recorded."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch

from typer.testing import CliRunner

from medscalpel.cli.main import app
from medscalpel.deploy import export as export_mod
from medscalpel.deploy.export import onnx_file as onnx_file_mod
from medscalpel.deploy.cam_head import CamHead
from medscalpel.deploy.export import export_onnx, export_onnx_file, ort_session
from medscalpel.errors import ConfigError, ModelError
from medscalpel.data import Preprocess
from medscalpel.models import make_card, save_model
from medscalpel.models.zoo import create_model

pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
TOL = 1e-4

ARCHS = [
    pytest.param("densenet_tiny", 32, id="densenet_tiny"),
    pytest.param("densenet121", 64, id="densenet121", marks=pytest.mark.slow),
    pytest.param("resnet_tiny", 32, id="resnet_tiny"),
    pytest.param("resnet18", 32, id="resnet18"),
    pytest.param("vgg_tiny", 32, id="vgg_tiny"),
    pytest.param("mobilenetv3_small_100", 64, id="mobilenetv3_small_100",
                 marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", 64, id="efficientnet_b0", marks=pytest.mark.slow),
    pytest.param("vit_test", 32, id="vit_test"),
]


def _outputs(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _check_runtimes(path, model, size, n_out):
    """Batch 1 and 3 (the example had 2): onnxruntime and OpenVINO (f32) match torch."""
    gen = torch.Generator().manual_seed(1)
    sess = ort_session(path, 1)
    assert [o.name for o in sess.get_outputs()] == list(getattr(model, "output_names",
                                                                ("logits",)))
    for b in (1, 3):
        x = torch.randn(b, 1, size, size, generator=gen)
        ref = _outputs(model, x)
        got = sess.run(None, {"images": x.numpy()})
        assert len(got) == len(ref) == n_out
        for g, r in zip(got, ref):
            assert g.shape == r.shape and g.shape[0] == b
            assert float(np.abs(g - r).max()) <= TOL
    ov = pytest.importorskip("openvino", reason="OpenVINO is the 'deploy' extra")
    from medscalpel.deploy.runtimes import compile_openvino

    compiled = compile_openvino(ov.Core().read_model(str(path)), "f32", 1)
    x = torch.randn(3, 1, size, size, generator=gen)
    res = compiled(x.numpy())
    for i, r in enumerate(_outputs(model, x)):
        assert float(np.abs(res[compiled.output(i)] - r).max()) <= 1e-3  # f32 kernels differ


@pytest.mark.parametrize("arch,size", ARCHS)
def test_dynamo_export_parity_per_architecture(arch, size, tmp_path):
    torch.manual_seed(0)
    model = create_model(arch, 3, img_size=size)
    info = export_onnx_file(model, tmp_path / "m.onnx", (1, size, size))
    assert info == {"exporter": "dynamo", "reason": "default", "fallback": False,
                    "opset": export_mod.DEFAULT_OPSET, "dynamo_error": None}
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert not any(n.metadata_props for n in graph.node)  # no stack traces / local paths
    _check_runtimes(tmp_path / "m.onnx", model, size, 1)


@pytest.mark.parametrize("arch", ["densenet_tiny", "resnet_tiny"])
def test_dynamo_export_of_cam_head_has_both_outputs(arch, tmp_path):
    torch.manual_seed(0)
    head = CamHead(create_model(arch, 3, img_size=32))
    info = export_onnx_file(head, tmp_path / "c.onnx", (1, 32, 32))
    assert info["exporter"] == "dynamo" and not info["fallback"]
    outs = onnx.load(tmp_path / "c.onnx").graph.output
    assert [o.name for o in outs] == ["logits", "cam"]
    assert all(o.type.tensor_type.shape.dim[0].dim_param for o in outs)
    _check_runtimes(tmp_path / "c.onnx", head, 32, 2)


def test_export_result_records_the_exporter(tmp_path):
    torch.manual_seed(0)
    m = create_model("vgg_tiny", 2, img_size=32)
    r = export_onnx(m, tmp_path / "m.onnx", batch_sizes=(1,), repeats=1, rounds=1,
                    reference=create_model("vgg_tiny", 2, img_size=32))
    d = r.to_dict()
    assert d["exporter"]["exporter"] == "dynamo" and d["opset"] == 18
    assert d["exporter"]["reference"]["exporter"] == "dynamo"
    assert d["versions"]["onnxscript"] not in ("", "not installed")
    assert r.parity["random"] <= TOL


def test_torchscript_path_is_explicit_and_recorded(tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    m = create_model("resnet_tiny", 3, img_size=32)
    # a low opset goes through the TorchScript exporter, and says so
    info = export_onnx_file(m, tmp_path / "a.onnx", (1, 32, 32), opset=17)
    assert info["exporter"] == "torchscript" and "opset 17 requested" in info["reason"]
    assert info["opset"] == 17 and not info["fallback"]
    # an architecture in the table goes through it, with the table's reason
    monkeypatch.setitem(export_mod.TORCHSCRIPT_ARCHS, "resnet_tiny", "DynamoError: demo")
    with caplog.at_level(logging.INFO, logger=export_mod.__name__):
        info = export_onnx_file(m, tmp_path / "b.onnx", (1, 32, 32))
    assert info["exporter"] == "torchscript" and info["reason"] == "resnet_tiny: DynamoError: demo"
    assert "TorchScript exporter (resnet_tiny: DynamoError: demo)" in caplog.text
    _check_runtimes(tmp_path / "b.onnx", m, 32, 1)
    with pytest.raises(ConfigError, match="'exporter' parameter of export_onnx_file"):
        export_onnx_file(m, tmp_path / "c.onnx", (1, 32, 32), exporter="jit")


def test_dynamo_failure_falls_back_with_the_error(tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    m = create_model("vgg_tiny", 3, img_size=32)

    def broken(*a, **k):
        raise ImportError("No module named 'onnxscript'")

    # export_onnx_file looks _export_dynamo up in the module that writes ONNX files
    monkeypatch.setattr(onnx_file_mod, "_export_dynamo", broken)
    with caplog.at_level(logging.WARNING, logger=export_mod.__name__):
        info = export_onnx_file(m, tmp_path / "m.onnx", (1, 32, 32))
    assert info["exporter"] == "torchscript" and info["fallback"] is True
    assert info["dynamo_error"] == "ImportError: No module named 'onnxscript'"
    assert "falling back to the TorchScript exporter" in caplog.text
    _check_runtimes(tmp_path / "m.onnx", m, 32, 1)
    # an explicit request for the dynamo exporter does not fall back
    with pytest.raises(ModelError, match="dynamo exporter\\) failed: ImportError"):
        export_onnx_file(m, tmp_path / "n.onnx", (1, 32, 32), exporter="dynamo")
    assert not (tmp_path / "n.onnx").exists()


def test_cli_export_names_the_exporter(tmp_path):
    torch.manual_seed(0)
    m = create_model("vgg_tiny", 2, img_size=32)
    save_model(m, tmp_path / "m", make_card(m, ["a", "b"], "multilabel", Preprocess(size=32)))
    runner = CliRunner()
    for opset, exporter in ((None, "dynamo"), ("17", "torchscript")):
        out = tmp_path / f"ex{opset}"
        args = ["compress", "export", str(tmp_path / "m"), "--out", str(out), "--batch-sizes",
                "1", "--repeats", "1"] + (["--opset", opset] if opset else [])
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output + repr(r.exception)
        assert f"ONNX exporter: {exporter}" in r.output
        meta = json.loads((out / "export.json").read_text())
        assert meta["exporter"]["exporter"] == exporter
        assert meta["opset"] == (18 if opset is None else 17)
        # the 'export_onnx' stage records the ONNX file where it is once the run finished
        assert meta["onnx_path"] == str(out / "model.onnx") and (out / "model.onnx").is_file()
        assert json.loads((out / "manifest.json").read_text())["command"] == "compress export"


def test_preferred_exporter_applies_to_auto_exports_only_and_is_recorded(tmp_path):
    from medscalpel.deploy.export import export_onnx_file, preferred_exporter
    from medscalpel.models.zoo import create_model

    m = create_model("vgg_tiny", num_classes=2, img_size=32).eval()
    with preferred_exporter("torchscript", "a time budget"):
        rec = export_onnx_file(m, tmp_path / "a.onnx", (1, 32, 32))
        explicit = export_onnx_file(m, tmp_path / "b.onnx", (1, 32, 32), exporter="dynamo")
    assert rec["exporter"] == "torchscript" and "a time budget" in rec["reason"]
    assert explicit["exporter"] == "dynamo"
    assert export_onnx_file(m, tmp_path / "c.onnx", (1, 32, 32))["exporter"] == "dynamo"
