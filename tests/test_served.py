"""Deployed artifacts as models (issues 15 / 18): runtime variants and served folders give the
torch model's logits within their precision's bound, and the changes audit runs on them with the
explanation measure stated as not measured."""

import types

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medscalpel.audit.changes import ChangesAudit, audit_changes
from medscalpel.cli.main import app
from medscalpel.deploy.serve import serve_metadata, write_serve
from medscalpel.deploy.runtimes import OrtFp32
from medscalpel.deploy.served import RuntimeModel, load_served, runtime_model
from medscalpel.data import Preprocess, open_dataset
from medscalpel.data.phantom import generate_phantom
from medscalpel.errors import DataError, ModelError, VerificationError
from medscalpel.models import create_model, load_model, make_card, save_model

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph") / "ph"
    generate_phantom(n=160, size=32, seed=3, progress=False, out=root)
    return f"phantom:{root}"


@pytest.fixture(scope="module")
def dense(phantom):
    ds = open_dataset(phantom, split="all")
    torch.manual_seed(0)
    m = create_model("densenet_tiny", ds.num_classes, 1, 32).eval()
    m.card = make_card(m, ds.class_names, ds.task, Preprocess(32))
    return m


def _images(phantom, n=24, split="all"):
    ds = open_dataset(phantom, split=split, preprocess=Preprocess(32))
    return ds, torch.stack([ds.image(i) for i in range(n)])


def test_runtime_model_matches_torch_and_refuses_gradients(dense, phantom):
    _, x = _images(phantom)
    rm = runtime_model(dense, "onnxruntime:fp32", x[:8])
    with torch.no_grad():
        ref = dense(x).numpy()
    got = rm(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert rm.parity["relative"] <= 1e-3 and rm.parity["n_images"] == 8
    assert rm.card.class_names == dense.card.class_names and "@onnxruntime:fp32" in rm.card.model_id
    assert rm.card.lineage[-1]["runtime"] == "onnxruntime" and not rm.supports_gradients
    with pytest.raises(ModelError, match="no gradients"):
        rm(x.clone().requires_grad_(True))
    q = runtime_model(dense, "onnxruntime:int8-u8s8", x[:8])
    assert q.precision == "int8-u8s8" and 0 < q.parity["max_abs_delta_logit"]
    assert q.parity["relative"] <= q.parity["tolerance"]


class OtherWeightsOnnx(OrtFp32):
    """A planted broken artifact: a real ONNX file of a model with other weights."""

    def prepare(self, model, example, calib, workdir):
        torch.manual_seed(7)
        other = create_model("densenet_tiny", 14, 1, 32).eval()
        super().prepare(other, example, calib, workdir)


def test_runtime_model_refuses_a_broken_artifact(dense, phantom, tmp_path):
    _, x = _images(phantom, 8)
    with pytest.raises(VerificationError, match="fails parity"):
        runtime_model(dense, OtherWeightsOnnx(1), x, workdir=tmp_path / "wd")


def test_changes_audit_on_an_int8_artifact_skips_only_explanations(dense, phantom, tmp_path):
    ds, x = _images(phantom, 16)
    q = runtime_model(dense, "onnxruntime:int8-u8s8", x)
    res = audit_changes(dense, {"int8": q}, ds, n_images=60, n_boot=50, n_faithfulness=8,
                        corruptions=["noise", "jpeg"], severities=(1,), min_subgroup=5)
    p = res.pairs[0]
    assert p.explanation is None and "no gradients" in p.skipped["explanation"]
    assert p.calibration is not None and p.robustness is not None and p.subgroups is not None
    assert any(line.startswith("explanation: not measured") for line in p.headline())
    # the calibration numbers are those of the int8 logits, not of the torch model
    assert p.calibration.macro["ece_new"] != p.calibration.macro["ece_ref"]
    res.save(tmp_path / "a")
    back = ChangesAudit.load(tmp_path / "a")
    assert back.pairs[0].skipped == p.skipped
    assert (tmp_path / "a" / "int8_robustness.png").is_file()
    assert not (tmp_path / "a" / "int8_explanation.png").exists()


def _served_dir(dense, x, dest, runtime="onnxruntime:fp32"):
    """A serve/ folder written by deploy's own writer for a built runtime variant."""
    from medscalpel.deploy.runtimes import RUNTIMES

    rt = RUNTIMES.create(runtime, threads=1)
    rt.prepare(dense, x[:1], x, dest.parent / "work")
    chosen = types.SimpleNamespace(rt=rt)
    files = write_serve(dest, dense, chosen, tuple(x.shape[1:]))
    variant = types.SimpleNamespace(runtime=rt.runtime, precision=rt.precision, name=rt.name,
                                    info=rt.info)
    (dest / "serve.json").write_text(__import__("json").dumps(
        serve_metadata(dense, tuple(x.shape[1:]), variant, files)))
    return dest


def test_load_served_onnx_and_torch(dense, phantom, tmp_path):
    _, x = _images(phantom, 8)
    served = _served_dir(dense, x, tmp_path / "run" / "serve")
    for path in (served, served.parent):   # the serve/ folder or the run directory
        m = load_served(path)
        assert isinstance(m, RuntimeModel) and m.runtime == "onnxruntime"
        assert m.card.class_names == dense.card.class_names
        assert m.card.preprocess.size == dense.card.preprocess.size
        with torch.no_grad():
            assert np.abs(m(x).numpy() - dense(x).numpy()).max() < 1e-4
    save_model(dense, tmp_path / "t" / "serve")
    (tmp_path / "t" / "serve" / "serve.json").write_text(
        '{"runtime": "torch", "precision": "fp32", "files": ["model.json"], '
        '"class_names": ["a"], "task": "multilabel", "input": {"size": 32}}')
    assert not isinstance(load_served(tmp_path / "t"), RuntimeModel)
    with pytest.raises(DataError, match="serve.json not found"):
        load_served(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "serve.json").write_text('{"runtime": "onnxruntime"}')
    with pytest.raises(DataError, match="missing"):
        load_served(tmp_path / "bad")


@pytest.mark.slow
def test_openvino_int8_runtime_model(dense, phantom):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    _, x = _images(phantom, 16)
    q = runtime_model(dense, "openvino:int8", x)
    with torch.no_grad():
        ref = dense(x).numpy()
    assert q(x).shape == ref.shape and q.parity["relative"] <= 0.5


def test_cli_audit_changes_runtime_and_served(dense, phantom, tmp_path):
    save_model(dense, tmp_path / "dense")
    _, x = _images(phantom, 8)
    _served_dir(load_model(tmp_path / "dense").eval(), x, tmp_path / "dep" / "serve")
    runner = CliRunner()
    args = ["audit", "changes", str(tmp_path / "dense"), str(tmp_path / "dep"), "--data", phantom,
            "--split", "all", "--n-images", "40", "--n-boot", "20", "--measures", "calibration",
            "--measures", "explanation", "--runtime", "onnxruntime:int8-u8s8", "--n-calib", "8",
            "--calib-split", "all", "--n-faithfulness", "4"]
    r = runner.invoke(app, args + ["--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    res = ChangesAudit.load(tmp_path / "out" / "audit" / "changes")
    names = [p.name for p in res.pairs]
    assert names == ["dep", "dense@onnxruntime:int8-u8s8"]
    for p in res.pairs:
        assert p.calibration is not None and "explanation" in p.skipped
    # served fp32 ONNX of the same weights: no calibration change
    assert abs(res.pairs[0].calibration.macro["delta_ece"]) < 1e-4
    assert "not measured" in r.output
    r = runner.invoke(app, ["audit", "changes", str(tmp_path / "dense"), "--data", phantom,
                            "--out", str(tmp_path / "none")])
    assert r.exit_code != 0 and "nothing to compare" in str(r.exception)
    assert not (tmp_path / "none").exists()
