"""ONNX export: onnxruntime parity, latency table vs a reference, int8 quantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medscalpel.deploy import export as export_mod
from medscalpel.deploy.export import export_onnx
from medscalpel.compress.structured import prune_structured
from medscalpel.data import ArrayDataset, Preprocess
from medscalpel.errors import ConfigError, VerificationError
from medscalpel.models.zoo import create_model


def _ds(n=24):
    rng = np.random.default_rng(0)
    labels = (rng.random((n, 3)) > 0.5).astype(np.float32)
    labels[0], labels[1] = 1, 0
    return ArrayDataset(rng.random((n, 32, 32)).astype(np.float32), labels, ["a", "b", "c"],
                        "multilabel", preprocess=Preprocess(size=32), split="test")


@pytest.fixture
def dense():
    torch.manual_seed(0)
    return create_model("densenet_tiny", 3, img_size=32)


def test_onnx_parity_and_latency_vs_reference(dense, tmp_path):
    pruned = prune_structured(dense, torch.randn(4, 1, 32, 32), "l1", ratio=0.5,
                              measure_latency=False, progress=False).model
    ds = _ds()
    res = export_onnx(pruned, tmp_path / "m.onnx", batch_sizes=(1, 4), reference=dense,
                      dataset=ds, repeats=2, rounds=1)
    assert res.parity["random"] < 1e-4 and res.parity["real"] < 1e-4
    assert (tmp_path / "m.onnx").stat().st_size == res.file_bytes > 0
    assert res.input_shape == [1, 32, 32]
    combos = {(r["runtime"], r["model"], r["batch"]) for r in res.latency}
    assert combos == {(rt, who, b) for rt in ("torch", "onnxruntime")
                      for who in ("model", "reference") for b in (1, 4)}
    assert set(res.speedup) == {"torch@b1", "torch@b4", "onnxruntime@b1", "onnxruntime@b4"}
    assert all(v > 0 for v in res.speedup.values())
    # dynamic batch: the file accepts any batch size
    sess = export_mod.ort_session(tmp_path / "m.onnx")
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert np.abs(export_mod.ort_run(sess, x) - pruned.eval()(x).numpy()).max() < 1e-4


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_quantization_reports_delta_auroc(dense, tmp_path, mode):
    res = export_onnx(dense, tmp_path / "m.onnx", batch_sizes=(1,), dataset=_ds(), quantize=mode,
                      repeats=2, rounds=1)
    q = res.quantization
    assert q["mode"] == mode and q["file_bytes"] > 0
    assert np.isfinite(q["delta_macro_auroc"]) and abs(q["delta_macro_auroc"]) < 0.5
    assert 0 < q["max_abs_delta_vs_fp32"] < 1.0  # int8 is close to, but not exactly, float32
    assert ("onnxruntime", "int8", 1) in {(r["runtime"], r["model"], r["batch"])
                                          for r in res.latency}


def test_export_errors(dense, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="'quantize' parameter of export_onnx"):
        export_onnx(dense, tmp_path / "a.onnx", quantize="int4")
    with pytest.raises(ConfigError, match="'batch_sizes' parameter of export_onnx"):
        export_onnx(dense, tmp_path / "a.onnx", batch_sizes=())
    with pytest.raises(ConfigError, match="input_size"):
        export_onnx(dense, tmp_path / "a.onnx", input_size=(32, 32))
    with pytest.raises(ConfigError, match="real images have shape"):
        export_onnx(dense, tmp_path / "a.onnx", real_images=torch.randn(2, 1, 16, 16))
    real_run = export_mod.ort_run
    monkeypatch.setattr(export_mod, "ort_run", lambda s, x, b=64: real_run(s, x, b) + 1.0)
    with pytest.raises(VerificationError, match="disagree by 1"):
        export_onnx(dense, tmp_path / "bad.onnx", batch_sizes=(1,), repeats=1)
    assert not (tmp_path / "bad.onnx").exists()


def test_exported_densenet_has_batchnorm_folded_where_the_graph_allows(dense, tmp_path):
    """BN right after a conv (norm0, every dense layer's norm2) is folded into that conv by the
    exporter; the pre-activation BNs (norm1, transitions, norm5) follow a Concat / pooling, with
    a ReLU before the next conv, so no conv can absorb them: they must stay, and nothing else."""
    import collections

    import onnx

    export_mod.export_onnx_file(dense, tmp_path / "m.onnx", (1, 32, 32))
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node)
    names = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    after_conv = [n for n in names if n.endswith(("norm0", "norm2"))]
    assert len(after_conv) == 1 + sum(1 for n in names if n.endswith("norm2")) > 1
    assert ops["BatchNormalization"] == len(names) - len(after_conv)
    assert ops["Conv"] == sum(1 for m in dense.modules() if isinstance(m, torch.nn.Conv2d))


def test_quantize_onnx_settings(dense, tmp_path):
    export_mod.export_onnx_file(dense, tmp_path / "m.onnx", (1, 32, 32))
    calib = torch.rand(8, 1, 32, 32)
    info = export_mod.quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", "static", calib,
                                    activation="u8")
    assert info["activation"] == "u8" and info["format"] == "QDQ"
    assert info["reduce_range"] == (not export_mod.has_vnni())
    import onnx

    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert "QuantizeLinear" in ops and "Concat" in ops  # concatenations stay in float
    with pytest.raises(ConfigError, match="'activation' parameter of quantize_onnx"):
        export_mod.quantize_onnx(tmp_path / "m.onnx", tmp_path / "x.onnx", "static", calib,
                                 activation="u4")
