"""compress deploy: every runtime's parity, the recommendation with planted slower / less
accurate / non-conforming variants (real runtimes and models, nothing mocked), the floor error,
the CLI round trip and the missing-extra path."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medscalpel.cli.main import app
from medscalpel.deploy.flow import DEFAULT_VARIANTS, DeployResult, deploy
from medscalpel.deploy.runtimes import (RUNTIMES, OrtFp32, TorchEager, openvino_capabilities)
from medscalpel.deploy.timing import speed_ratio
from medscalpel.data import ArrayDataset, Preprocess
from medscalpel.errors import ConfigError, MissingExtraError
from medscalpel.models.checkpoint import load_model, make_card, save_model
from medscalpel.models.zoo import create_model

CLASSES = ["a", "b", "c"]


def _ds(split, n=64, seed=0):
    """Images whose class evidence is a bright patch, so a trained-looking model has AUROC."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 3)) > 0.5).astype(np.float32)
    labels[0], labels[1] = 1, 0
    x = rng.random((n, 32, 32)).astype(np.float32) * 0.3
    for k in range(3):
        x[labels[:, k] == 1, 4 + 8 * k:10 + 8 * k, 4:28] += 0.7
    return ArrayDataset(x, labels, CLASSES, "multilabel", preprocess=Preprocess(size=32),
                        split=split)


@pytest.fixture(scope="module")
def model():
    """densenet_tiny briefly trained on the patch images, so that its AUROCs are meaningful."""
    torch.manual_seed(0)
    m = create_model("densenet_tiny", 3, img_size=32)
    m.card = make_card(m, CLASSES, "multilabel", Preprocess(size=32))
    ds = _ds("train", n=128, seed=2)
    x = torch.stack([ds.image(i) for i in range(len(ds))])
    y = torch.as_tensor(ds.labels)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    for step in range(40):
        idx = torch.arange(32 * (step % 4), 32 * (step % 4) + 32)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


class SlowTorch(TorchEager):
    """A planted slower variant: the same float32 model, run three times per batch."""

    runtime = "planted_slow"

    def run(self, x):
        for _ in range(2):
            super().run(x)
        return super().run(x)


class RowPerturbedTorch(TorchEager):
    """A planted less-accurate variant: class 'c''s classifier row replaced by noise (declared
    as a reduced precision with no parity bound, so only the accuracy floor can stop it)."""

    runtime, precision = "planted_rows", "int8"
    tolerance = float("inf")

    def prepare(self, model, example, calib, workdir):
        super().prepare(model, example, calib, workdir)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            w = self.model.classifier.weight
            w[2] = torch.randn(w.shape[1], generator=g) * w.abs().mean() * 3


class WrongOnnx(OrtFp32):
    """A planted non-conforming artifact: a real ONNX file of a model with other weights."""

    runtime = "planted_onnx"
    filename = "wrong.onnx"

    def prepare(self, model, example, calib, workdir):
        other = create_model("densenet_tiny", 3, img_size=32).eval()
        super().prepare(other, example, calib, workdir)


def test_every_available_runtime_has_parity(model, tmp_path):
    names = [n for n in DEFAULT_VARIANTS]
    res = deploy(model, _ds("test"), tmp_path / "d", calib_data=_ds("train", seed=1),
                 variants=names, batches=(1, 4), rounds=2, repeats=2, n_boot=100,
                 progress=False)
    by = {v.name: v for v in res.variants}
    assert list(by) == names  # torch fp32 first, every requested variant reported
    for v in res.variants:
        assert v.status in ("go", "no-go", "unavailable"), (v.name, v.reasons)
        if v.status == "unavailable":
            assert v.reasons and v.name == "openvino:bf16"
            assert "BF16" not in openvino_capabilities()
            continue
        tol = 1e-3 if v.precision == "fp32" else (0.05 if v.precision == "bf16" else 0.5)
        assert v.parity_rel <= tol and v.parity_abs >= 0
        assert set(v.latency) == {"b1", "b4"} and all(  # 2 rounds, or 4 when re-measured
            len(v.latency[b]["rounds_ms"]) in (2, 4) for b in v.latency)
        assert v.comparison["n"] == 64 and v.macro_delta_auroc is not None
        assert v.speedup_vs_torch["b1"] > 0 and 0 < v.peak_fraction["b1"]
    assert by["torch:fp32"].parity_abs == 0.0 and by["torch:fp32"].macro_delta_auroc == 0.0
    # int8 really is int8: not bit-identical to float32
    assert by["onnxruntime:int8-u8s8"].parity_abs > 1e-5
    assert by["onnxruntime:int8-u8s8"].info["activation"] == "u8"
    assert by["onnxruntime:int8-s8s8"].info["activation"] == "s8"
    assert by["openvino:fp32"].info["precision_used"].lower().endswith(("f32", "float32"))
    # every ONNX-based variant names the exporter that wrote its graph (one shared export)
    exported = [v for v in res.variants
                if v.status != "unavailable" and not v.runtime.startswith("torch")]
    assert exported and {v.info["export"]["exporter"] for v in exported} <= {"dynamo",
                                                                             "torchscript"}
    assert len({v.info["export"]["exporter"] for v in exported}) == 1
    assert res.serve["export"] == (by[res.recommended].info.get("export")
                                   if res.serve["explanation"]["status"] != "served"
                                   else res.serve["explanation"]["export"])
    # the recommendation is the fastest go variant at batch 1, unless a faster one is not
    # DECISIVELY faster (per-round ratio interval holds 1, or noisy): then the higher precision
    go = [v for v in res.variants if v.go]
    rec = by[res.recommended]
    assert rec.go
    for w in go:
        if w.median_ms(1) < rec.median_ms(1):
            sr = speed_ratio(rec.latency["b1"]["rounds_ms"], w.latency["b1"]["rounds_ms"])
            assert sr.outcome != "faster" and "not decisively faster" in res.reason
    assert rec.speed["b1"]["vs_torch"]["rounds"] or rec.name == "torch:fp32"
    assert res.machine["cpu"]["model"] and "theoretical" in res.peak
    # files: deploy.json round trip, exports, the served artifact and its contract
    d = tmp_path / "d"
    assert DeployResult.load(d).to_dict() == DeployResult.from_dict(res.to_dict()).to_dict()
    assert (d / "export" / "model.onnx").is_file() and (d / "export" / "model.xml").is_file()
    assert (d / "deploy.md").read_text().count("| ") > 10
    serve = (d / "serve")
    assert all((serve / f).is_file() for f in res.serve["files"])
    assert res.serve["class_names"] == CLASSES and res.serve["mean"] is not None
    assert res.peak["fp32_gmacs"] > 0 and res.loadavg["start"]


def test_planted_slow_inaccurate_and_nonconforming_variants_are_refused(model, tmp_path):
    slow, rows, wrong = SlowTorch(1), RowPerturbedTorch(1), WrongOnnx(1)
    res = deploy(model, _ds("test"), tmp_path / "d", calib_data=_ds("train", seed=1),
                 variants=["torch:fp32", "onnxruntime:fp32", slow, rows, wrong], batches=(1,),
                 rounds=5, repeats=3, n_boot=100, progress=False)  # 5 rounds: 94% interval
    by = {v.name: v for v in res.variants}
    s = by["planted_slow:fp32"]
    assert s.status == "no-go" and any("slower than torch fp32" in r for r in s.reasons)
    assert s.parity_abs == 0.0  # refused for speed alone
    r = by["planted_rows:int8"]
    assert r.status == "no-go" and any(x.startswith("failed floor (internal)") and
                                       "loss beyond the margin shown in c " in x
                                       for x in r.reasons)
    assert r.verdicts["internal"]["outcome"] == "fail"
    assert r.worst_class_delta_auroc < -0.01
    w = by["planted_onnx:fp32"]
    assert w.status == "refused" and "failed parity" in w.reasons[0]
    assert not wrong.files and not list(tmp_path.rglob("wrong.onnx"))  # its file was removed
    assert res.recommended in ("torch:fp32", "onnxruntime:fp32")
    # the report's Deployment section reads the typed result from the run layout
    from medscalpel.report.page import RunFiles, Section
    from medscalpel.report.sections.deployment import DeploymentSection

    run = tmp_path / "run"
    (run / "compress").mkdir(parents=True)
    (tmp_path / "d").rename(run / "deploy")
    sec = Section("deployment", "Deployment")
    DeploymentSection().render(RunFiles(run, run / "reports" / "experiment.html"), sec)
    assert sec.present and sec.badge == "go" and len(sec.tables[0].rows) == 5
    row = {r[0].text: r for r in sec.tables[0].rows}["planted_slow:fp32"]
    assert row[1].text == "no-go" and "slower than torch fp32" in row[-1].text
    assert dict(sec.facts)["recommended"].text == res.recommended


def test_floor_not_shown_serves_the_reference(model, tmp_path):
    rows = RowPerturbedTorch(1)
    # 16 images: no class has 10 positives and 10 negatives, so no floor can be SHOWN met:
    # every variant is undecided and the reference itself (nothing to verify) is served
    res = deploy(model, _ds("test", n=16), tmp_path / "d", variants=["onnxruntime:fp32", rows],
                 batches=(1,), rounds=1, repeats=1, n_boot=100, progress=False)
    by = {v.name: v for v in res.variants}
    assert by["onnxruntime:fp32"].status == "undecided"
    assert "no unit could be tested" in by["onnxruntime:fp32"].reasons[0]
    assert by["planted_rows:int8"].status == "undecided"
    assert res.recommended == "torch:fp32" and "the reference itself is served" in res.reason
    with pytest.raises(ConfigError, match="floor_macro"):  # a floor is a loss bound (<= 0)
        deploy(model, _ds("test", n=16), tmp_path / "e", variants=["onnxruntime:fp32"],
               floor_macro=0.01, progress=False)
    assert not (tmp_path / "e").exists()  # nothing half-written


def test_accuracy_verdicts_decide_go_undecided_and_external(model, tmp_path):
    """A variant is served only when its paired intervals SHOW the floor is met, on the
    evaluation set and on the external set; accepting unscorable classes is recorded."""
    rows = RowPerturbedTorch(1)
    res = deploy(model, _ds("test", n=96), tmp_path / "d", calib_data=_ds("train", seed=1),
                 variants=["torch:fp32", "onnxruntime:fp32", rows], batches=(1,), rounds=5,
                 repeats=2, n_boot=200, progress=False, accept_unscorable=True,
                 external_data=_ds("test", n=96, seed=7))
    by = {v.name: v for v in res.variants}
    ort = by["onnxruntime:fp32"]
    assert set(ort.verdicts) == {"internal", "external"}
    assert ort.verdicts["internal"]["outcome"] in ("pass", "undecided")
    planted = by["planted_rows:int8"]
    assert planted.status in ("no-go", "undecided")
    assert planted.verdicts["internal"]["outcome"] in ("fail", "undecided")
    rec = by[res.recommended]
    assert all(d["outcome"] == "pass" for d in rec.verdicts.values()) and rec.go
    assert res.external["n_images"] == 96 and "external" in (tmp_path / "d" / "deploy.md"
                                                             ).read_text()
    back = DeployResult.load(tmp_path / "d")
    assert back.variant("onnxruntime:fp32").verdicts == ort.verdicts


def test_missing_runtime_names_the_extra(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # the import now fails
    with pytest.raises(MissingExtraError, match=r"'openvino'.*medscalpel\[deploy\]"):
        deploy(model, _ds("test", n=16), tmp_path / "d", runtimes=["torch", "openvino"],
               batches=(1,), rounds=1, repeats=1, n_boot=0, progress=False)
    # not asked for explicitly: reported as unavailable, the others still run
    res = deploy(model, _ds("test", n=16), tmp_path / "e",
                 variants=None, precisions=["fp32"], batches=(1,), rounds=1, repeats=1,
                 n_boot=0, progress=False)
    ov = {v.name: v for v in res.variants}["openvino:fp32"]
    assert ov.status == "unavailable" and "medscalpel[deploy]" in ov.reasons[0]
    with pytest.raises(ConfigError, match="Unknown deployment runtime 'tensorrt:fp32'"):
        RUNTIMES.get("tensorrt:fp32")
    with pytest.raises(ConfigError, match="Unknown precision 'int4' for deploy. Valid names: "
                                          "bf16, fp32, int8"):
        deploy(model, _ds("test", n=16), tmp_path / "f", precisions=["int4"], progress=False)


def test_cli_round_trip_and_exit_2(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c, cls in enumerate(["NORMAL", "PNEUMONIA"]):
        (root / cls).mkdir(parents=True)
        for i in range(20):
            img = (rng.random((32, 32)) * 60).astype(np.uint8)
            if c:
                img[8:24, 8:24] += 150
            Image.fromarray(img).save(root / cls / f"{cls.lower()}_{i}.png")
    spec = f"folder:{root}?val_fraction=0.25&test_fraction=0.5"
    torch.manual_seed(0)
    m = create_model("densenet_tiny", 2, img_size=32)
    m.card = make_card(m, ["NORMAL", "PNEUMONIA"], "multiclass", Preprocess(size=32))
    save_model(m, tmp_path / "model")
    runner = CliRunner()
    args = ["compress", "deploy", "--model", str(tmp_path / "model"), "--data", spec,
            "--runtimes", "torch,onnxruntime", "--precisions", "fp32", "--batch", "1,2",
            "--rounds", "1", "--repeats", "1", "--n-boot", "50"]
    res = runner.invoke(app, args + ["--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "recommended:" in res.output and "| onnxruntime:fp32 |" in res.output
    # the command's run directory holds the deploy artifact where the demo's stage writes it
    from medscalpel.deploy.served import serve_folder
    from medscalpel.layout import read_artifact

    back = read_artifact(tmp_path / "out", "deploy")
    assert isinstance(back, DeployResult)
    assert DeployResult.load(tmp_path / "out" / "deploy").to_dict() == back.to_dict()
    assert back.recommended in ("torch:fp32", "onnxruntime:fp32") and back.batches == (1, 2)
    assert back.split == "test" and back.calib_split == "train"
    served = tmp_path / "out" / "deploy" / "serve"
    assert serve_folder(tmp_path / "out") == served  # `audit changes DENSE OUT` finds it
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["command"] == \
        "compress deploy"
    if back.recommended == "torch:fp32":
        assert load_model(served).card.class_names == ("NORMAL", "PNEUMONIA")
    else:
        from medscalpel.deploy.export import ort_run, ort_session

        x = torch.rand(2, 1, 32, 32)
        with torch.no_grad():
            assert np.abs(ort_run(ort_session(served / "model.onnx"), x)
                          - m.eval()(x).numpy()).max() < 1e-4
    from medscalpel.cli.main import run

    monkeypatch.setattr(sys, "argv", ["medscalpel", *args, "--floor-macro", "0.5", "--out",
                                      str(tmp_path / "bad")])
    with pytest.raises(SystemExit) as exc:
        run()  # the console entry point: MedScalpelError -> one line + exit 2
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "floor" in err and "[-1, 0]" in err and "Got 0.5" in err  # a loss bound, <= 0
    assert not (tmp_path / "bad").exists()


def test_openvino_int8_accuracy_control_runs_on_our_metric(model, tmp_path):
    """NNCF's quantize_with_accuracy_control driven by our per-class metric: it builds, keeps
    parity within the int8 bound, records the control settings, and is measured like any
    variant; without labelled calibration images it is unavailable with the reason."""
    res = deploy(model, _ds("test"), tmp_path / "ac", calib_data=_ds("train", seed=1),
                 variants=["openvino:int8-ac"], batches=(1,), rounds=1, repeats=1, n_boot=50,
                 n_calib=32, progress=False)
    v = {x.name: x for x in res.variants}["openvino:int8-ac"]
    assert v.status in ("go", "no-go"), v.reasons
    assert v.info["accuracy_control"]["max_drop"] == 0.01
    assert "per-class" in v.info["accuracy_control"]["metric"]
    assert v.parity_rel <= 0.5 and v.comparison["n"] == 64
    rt = RUNTIMES.create("openvino:int8-ac", threads=1)
    assert "validation images" in rt.available()


def test_precision_family_int8_keeps_every_int8_variant():
    from medscalpel.deploy.flow import _select

    names = [r.name for r in _select(None, None, ["fp32", "int8"], 1, {})]
    assert {"onnxruntime:int8-u8s8", "onnxruntime:int8-s8s8", "openvino:int8"} <= set(names)
    assert "openvino:bf16" not in names and "openvino:int8-ac" not in names


def test_model_without_card_is_refused_before_any_work(tmp_path, monkeypatch):
    import time as _time

    m = create_model("vgg_tiny", num_classes=3, img_size=32)  # no card
    t0 = _time.perf_counter()
    with pytest.raises(ConfigError, match="no ModelCard.*load_model"):
        deploy(m, _ds("test", n=16), tmp_path / "d", variants=["onnxruntime:fp32"],
               progress=False)
    assert _time.perf_counter() - t0 < 5 and not (tmp_path / "d").exists()


def test_quick_deploy_records_what_it_left_out(model, tmp_path, monkeypatch):
    import importlib.util

    from medscalpel.deploy import flow as D

    real = importlib.util.find_spec
    monkeypatch.setattr(D.importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    res = D.quick_deploy(model, _ds("test"), tmp_path / "q", progress=False)
    assert not any(v.name.startswith("openvino") for v in res.variants)
    assert any("not measured: openvino:fp32" in n for n in res.notes)
