"""Every stage accepts a served run directory (issue T, deliverables 2 and 4): predict, evaluate,
explain cam, report clinical and audit changes run on what ``compress deploy`` served, use its
CAM output for Grad-CAM (equal to torch Grad-CAM in fp32 ONNX Runtime within 1e-4), refuse
what it cannot do with the reason, and name the artifact (runtime, precision, file sha256, CPU)
in what they write."""

from __future__ import annotations

import hashlib
import json
import types

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medscalpel.audit.changes import audit_changes
from medscalpel.audit.changes.explanation import class_cams
from medscalpel.cli.main import app, run
from medscalpel.deploy.cam import explain_variant
from medscalpel.deploy.serve import serve_metadata, write_serve
from medscalpel.deploy.runtimes import RUNTIMES
from medscalpel.deploy.served import load_any, load_served
from medscalpel.data import Preprocess, open_dataset
from medscalpel.data.phantom import generate_phantom
from medscalpel.errors import ConfigError, ModelError
from medscalpel.explain.cams import compute_cam
from medscalpel.models import create_model, make_card, save_model

pytest.importorskip("onnxruntime")

SIZE = 32


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph") / "ph"
    generate_phantom(n=120, size=SIZE, seed=3, progress=False, out=root)
    return f"phantom:{root}"


def _model(ds, max_pool: bool = False):
    torch.manual_seed(0)
    m = create_model("resnet_tiny", num_classes=ds.num_classes, img_size=SIZE).eval()
    with torch.no_grad():  # well-conditioned maps: a classifier of unit scale
        m.classifier.weight.normal_(0, 1)
    if max_pool:  # a CAM layer pooled by max, not mean: no exact CAM output
        m.backbone.avgpool = torch.nn.AdaptiveMaxPool2d(1)
    m.card = make_card(m, ds.class_names, ds.task, Preprocess(SIZE))
    return m


def _serve(model, images, out, name="onnxruntime:fp32"):
    """What deploy writes for the chosen ``name`` variant: the artifact with its CAM output when
    the head allows it (built and checked by deploy's own explain_variant), serve.json."""
    plain = RUNTIMES.create(name, threads=1)
    plain.prepare(model, images[:1], images, out / "work" / "plain")
    with torch.no_grad():
        ref = model(images).numpy()
    cam_rt, info = explain_variant(plain, model, images, ref, images, out / "work" / "cam",
                                   threads=1, rounds=5, repeats=1, warmup=1)
    files = write_serve(out / "serve", model, types.SimpleNamespace(rt=plain),
                        tuple(images.shape[1:]), cam_rt)
    variant = types.SimpleNamespace(runtime=plain.runtime, precision=plain.precision, name=name,
                                    info=plain.info)
    meta = serve_metadata(model, tuple(images.shape[1:]), variant, files, info)
    (out / "serve" / "serve.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def runs(phantom, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    ds = open_dataset(phantom, split="all", preprocess=Preprocess(SIZE))
    x = torch.stack([ds.image(i) for i in range(12)])
    dense = _model(ds)
    save_model(dense, root / "dense", dense.card)
    served = _serve(dense, x, root / "run")
    nocam = _serve(_model(ds, max_pool=True), x, root / "nocam")
    return types.SimpleNamespace(dense=dense, dense_dir=root / "dense", run=served,
                                 nocam=nocam, ds=ds, x=x)


def test_runtime_model_exposes_cams_and_names_its_artifact(runs):
    rm = load_served(runs.run)            # the run directory: its serve/ is found
    assert rm.has_cams and rm.cam_refusal() is None
    # predictions run the logits-only subgraph; the whole graph opens when maps are asked for
    pred_session, whole = rm._keep
    assert [o.name for o in pred_session.get_outputs()] == ["logits"] and whole == []
    cams = rm.cams(runs.x[:3])
    assert [o.name for o in whole[0].get_outputs()] == ["logits", "cam"]
    assert tuple(cams.shape[:2]) == (3, runs.ds.num_classes) and cams.ndim == 4
    assert rm.cam_layer == runs.dense.cam_layer_name
    assert "sum_c W[k, c]" in rm.cam_info["definition"]
    art = rm.provenance()
    onnx_file = runs.run / "serve" / "model.onnx"
    assert art["runtime"] == "onnxruntime" and art["precision"] == "fp32"
    assert art["file"] == "model.onnx"
    assert art["sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert art["cpu"]["model"] and art["cam_output"] == "served"
    # the served card decides as the model it came from (serve.json's operating point)
    op, want_op = rm.card.decision_point(), runs.dense.card.decision_point()
    assert op.method == want_op.method and op.thresholds == want_op.thresholds
    # logits of the CAM graph = the torch model's
    with torch.no_grad():
        want = runs.dense(runs.x).numpy()
    assert np.abs(rm(runs.x).numpy() - want).max() < 1e-4

    plain = load_any(runs.nocam / "serve")
    assert not plain.has_cams
    with pytest.raises(ModelError, match="no CAM output .*not global average pooling"):
        plain.cams(runs.x[:1])


def test_served_cams_equal_torch_gradcam_fp32(runs):
    rm = load_served(runs.run / "serve")
    targets = [i % runs.ds.num_classes for i in range(len(runs.x))]
    served = compute_cam(rm, runs.x, targets, method="gradcam", progress=False)
    torch_cam = compute_cam(runs.dense, runs.x, targets, method="gradcam", progress=False)
    raw = rm.cams(runs.x).numpy()
    sel = np.stack([raw[i, t] for i, t in enumerate(targets)])
    live = sel.reshape(len(sel), -1).max(1) > 1e-3 * np.abs(sel).reshape(len(sel), -1).max(1)
    assert live.sum() >= 4
    assert np.abs(served.maps - torch_cam.maps)[live].max() < 1e-4
    assert served.meta["source"] == "served CAM output" and "fp32" in served.meta["label"]
    assert served.meta["artifact"]["sha256"]
    # the audit's all-class maps from the served output equal its torch Grad-CAM too
    a = class_cams(runs.dense, runs.x, [0, 1, 2])
    b = class_cams(rm, runs.x, [0, 1, 2])
    assert np.abs(a - b).max() < 1e-4
    with pytest.raises(ConfigError, match="needs gradients.*only method='gradcam'"):
        compute_cam(rm, runs.x[:2], 0, method="gradcam++", progress=False)


def test_predict_and_evaluate_on_a_served_run(runs, phantom, tmp_path):
    cli = CliRunner()
    r = cli.invoke(app, ["predict", "--model", str(runs.run), "--data", phantom, "--split",
                         "test", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "served onnxruntime:fp32 artifact model.onnx" in r.output
    preds = json.loads((tmp_path / "p" / "predictions.json").read_text())
    art = preds["meta"]["artifact"]
    assert art["runtime"] == "onnxruntime" and art["precision"] == "fp32" and art["sha256"]
    assert art["cpu"]["model"]
    torch_r = cli.invoke(app, ["predict", "--model", str(runs.dense_dir), "--data", phantom,
                               "--split", "test", "--out", str(tmp_path / "t")])
    assert torch_r.exit_code == 0, torch_r.output
    from medscalpel.engine.predictions import Predictions

    a = Predictions.load(tmp_path / "p" / "predictions.npz")
    b = Predictions.load(tmp_path / "t" / "predictions.npz")
    assert a.ids == b.ids and np.abs(a.logits - b.logits).max() < 1e-4
    assert "artifact" not in b.meta

    r = cli.invoke(app, ["evaluate", str(tmp_path / "p"), "--model", str(runs.run / "serve"),
                         "--n-boot", "20", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["extra"]["artifact"]["sha256"] == art["sha256"]

    r = cli.invoke(app, ["evaluate", str(tmp_path / "p"), "--model", str(runs.run), "--external",
                         phantom, "--n-boot", "20", "--workers", "0", "--batch-size", "7",
                         "--out", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    assert "external set predicted by the served onnxruntime:fp32" in " ".join(r.output.split())
    assert "bulk:" in r.output  # a served model predicts the external set on the bulk path
    ext = json.loads((tmp_path / "x" / "external.json").read_text())
    assert ext["artifact"]["sha256"] == art["sha256"]
    xp = Predictions.load(tmp_path / "x" / "external_predictions.npz")
    assert xp.meta["bulk"]["batch_size"] == 7 and xp.meta["bulk"]["workers"] == 0


def _refused(argv, capsys) -> str:
    """Run the CLI entry point; it must exit 2 with one ``error:`` line, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        run(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert ex.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return " ".join(err.split())


def test_explain_cam_on_a_served_run(runs, phantom, tmp_path, capsys):
    cli = CliRunner()
    cls = runs.ds.class_names[0]
    r = cli.invoke(app, ["explain", "cam", "--model", str(runs.run), "--data", phantom,
                         "--class", cls, "--n", "3", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "served onnxruntime:fp32 CAM output" in r.output
    cams = json.loads((tmp_path / "c" / "cams.json").read_text())
    assert cams["meta"]["precision"] == "fp32" and cams["meta"]["artifact"]["sha256"]
    assert (tmp_path / "c" / "gradcam.png").is_file()
    # the 'cam' stage ran: the manifest names the command and the artifact it loaded
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert man["command"] == "explain cam"
    assert man["config"]["artifact"]["sha256"] == cams["meta"]["artifact"]["sha256"]

    err = _refused(["explain", "cam", "--model", str(runs.run), "--data", phantom, "--class",
                    cls, "--method", "scorecam", "--out", str(tmp_path / "s")], capsys)
    assert "no gradients" in err and "only --method gradcam" in err
    assert not (tmp_path / "s").exists()

    err = _refused(["explain", "cam", "--model", str(runs.nocam), "--data", phantom, "--class",
                    cls, "--out", str(tmp_path / "n")], capsys)
    assert "no CAM output" in err and "not global average pooling" in err
    assert not (tmp_path / "n").exists()

    err = _refused(["explain", "attribute", "--model", str(runs.run), "--data", phantom,
                    "--class", cls, "--out", str(tmp_path / "a")], capsys)
    assert "served artifact" in err and "no gradients" in err


def test_audit_changes_measures_served_explanation_drift(runs):
    rm = load_served(runs.run)
    res = audit_changes(runs.dense, {"served": rm}, runs.ds, measures=["explanation"],
                        n_images=10, n_boot=50, n_faithfulness=4, progress=False)
    p = res.pairs[0]
    assert "explanation" not in p.skipped and p.explanation is not None
    src = p.explanation.meta["map_source"]["new"]
    assert "served onnxruntime:fp32" in src["maps"] and src["artifact"]["sha256"]
    # fp32 served maps are the dense maps: rank agreement 1 wherever both are non-empty
    rho = [c["spearman"]["mean"] for c in p.explanation.classes.values()
           if c["spearman"]["n"] > 0]
    assert rho and min(rho) > 0.999

    no = audit_changes(runs.dense, {"plain": load_served(runs.nocam)}, runs.ds,
                       measures=["explanation"], n_images=4, n_boot=0, progress=False)
    assert "no CAM output" in no.pairs[0].skipped["explanation"]


def test_report_clinical_on_a_served_run(runs, phantom, tmp_path, capsys):
    from PIL import Image

    raw = runs.ds.preprocess.denormalize(runs.x[:2]).numpy().reshape(2, SIZE, SIZE)
    raw = raw.clip(0, 1) * 255
    files = []
    for i, a in enumerate(raw.astype(np.uint8)):
        f = tmp_path / f"img{i}.png"
        Image.fromarray(a).save(f)
        files.append(str(f))
    r = CliRunner().invoke(app, ["report", "clinical", *files, "--model", str(runs.run),
                                 "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "served onnxruntime:fp32 artifact model.onnx" in r.output
    rep = json.loads((tmp_path / "r" / "clinical.json").read_text())["reports"][0]
    assert rep["model"]["artifact"]["sha256"] and rep["model"]["artifact"]["cpu"]["model"]
    assert "served onnxruntime:fp32 CAM output" in rep["model"]["cam_label"]
    assert "not available" in rep["model"]["channel_evidence"]
    page = (tmp_path / "r" / rep["html"]).read_text()
    assert "served artifact: onnxruntime:fp32 model.onnx" in page
    assert rep["findings"]   # the maps shown are the served ones, labelled with the precision
    assert "served onnxruntime:fp32 CAM output" in page and 'id="localisation"' in page
    assert rep["findings"][0]["channels"] == []

    err = _refused(["report", "clinical", *files, "--model", str(runs.nocam), "--out",
                    str(tmp_path / "n")], capsys)
    assert "no CAM output" in err and not (tmp_path / "n").exists()
    err = _refused(["report", "clinical", *files, "--model", str(runs.run), "--cam-method",
                    "scorecam", "--out", str(tmp_path / "s")], capsys)
    assert "only --cam-method gradcam" in err


def test_audit_changes_cli_on_a_served_run(runs, phantom, tmp_path):
    r = CliRunner().invoke(app, ["audit", "changes", str(runs.dense_dir), str(runs.run),
                                 "--data", phantom, "--split", "all", "--measures",
                                 "explanation", "--n-images", "6", "--n-boot", "20",
                                 "--n-faithfulness", "2", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    art = manifest["config"]["artifacts"]["run"]
    assert art["runtime"] == "onnxruntime" and art["sha256"]
    changes = json.loads((tmp_path / "a" / "audit" / "changes" / "changes.json").read_text())
    pair = changes["pairs"][0]
    assert "explanation" not in pair.get("skipped", {})
    assert pair["explanation"]["meta"]["map_source"]["new"]["artifact"]["sha256"] == art["sha256"]


def test_served_int8_explanation_drift_is_measured(runs, tmp_path):
    rt = RUNTIMES.create("onnxruntime:int8-u8s8", threads=1)
    if rt.available() is not None:
        pytest.skip(rt.available())
    run = _serve(runs.dense, runs.x, tmp_path / "int8", "onnxruntime:int8-u8s8")
    rm = load_served(run)
    assert rm.precision == "int8-u8s8" and rm.has_cams, rm.cam_info
    res = audit_changes(runs.dense, {"int8": rm}, runs.ds, measures=["explanation"],
                        n_images=10, n_boot=50, n_faithfulness=4, progress=False)
    e = res.pairs[0].explanation
    assert e is not None and "served onnxruntime:int8-u8s8" in e.meta["map_source"]["new"]["maps"]
    rho = [c["spearman"]["mean"] for c in e.classes.values() if c["spearman"]["n"] > 0]
    assert rho and all(np.isfinite(rho)) and np.median(rho) > 0.5


def test_a_served_torch_variant_keeps_gradients_and_names_its_weights(runs, phantom, tmp_path):
    torch_rt = RUNTIMES.create("torch:fp32", threads=1)
    write_serve(tmp_path / "t" / "serve", runs.dense, types.SimpleNamespace(rt=torch_rt),
                (1, SIZE, SIZE))
    meta = serve_metadata(runs.dense, (1, SIZE, SIZE), types.SimpleNamespace(
        runtime="torch", precision="fp32", name="torch:fp32", info={}), ["model.safetensors"],
        {"status": "torch", "reason": "Grad-CAM by autograd"})
    (tmp_path / "t" / "serve" / "serve.json").write_text(json.dumps(meta))
    cli = CliRunner()
    cls = runs.ds.class_names[0]
    r = cli.invoke(app, ["explain", "cam", "--model", str(tmp_path / "t"), "--data", phantom,
                         "--class", cls, "--n", "2", "--method", "gradcam++", "--out",
                         str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    cams = json.loads((tmp_path / "c" / "cams.json").read_text())
    weights = tmp_path / "t" / "serve" / "model.safetensors"
    assert cams["artifact"]["runtime"] == "torch"
    assert cams["artifact"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
