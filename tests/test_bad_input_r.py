"""Issue R, deliverables 3 and 4: the remaining bad inputs each end in exit 2, one ``error:``
line that names the file / column / flag with a fix that works, and nothing at ``--out``; and
the experiment report opens with a headline whose every number points into its artifact.

Commands run through the real console entry point :func:`medscalpel.cli.main.run`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from medscalpel.cli.main import run
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import DataError

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_bad_input import save_tiny_model, write_csv_dataset  # noqa: E402
from test_report_experiment import (_png, check_cells_against_json, make_run_dir,  # noqa: E402
                                    parse)


def cli(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one command line through the console entry point."""
    monkeypatch.setenv("MEDSCALPEL_PROGRESS", "0")
    capsys.readouterr()
    code = 0
    try:
        run([str(a) for a in argv])
    except SystemExit as ex:
        code = ex.code if isinstance(ex.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code: int, out: str, err: str) -> str:
    """The single ``error:`` line of a refused command (asserting exit 2, no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in out + err, err
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    return lines[0]


def write_labels(root: Path, rows: list[str], n_img: int = 8) -> Path:
    """A CSV dataset with the given label rows (header first) over tiny PNGs."""
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_img):
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(
            root / "img" / f"{i}.png")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("r")
    spec = write_csv_dataset(root / "data", n=16)  # classes a, b, c
    model = save_tiny_model(spec, root / "model")
    return {"root": root, "spec": spec, "model": model}


# ----------------------------------------------------------------------------- 1. labels
def test_train_refuses_csv_without_any_label(tmp_path, capsys, monkeypatch):
    csv = write_labels(tmp_path / "d", ["path,a,b"] + [f"img/{i}.png,," for i in range(8)])
    out = tmp_path / "out"
    line = one_error(*cli(["train", "--data", f"csv:{csv}", "--arch", "resnet_tiny",
                           "--size", "32", "--epochs", "1", "--out", out], capsys, monkeypatch))
    assert str(csv) in line and "no label in any of its 8 row(s)" in line
    assert "['a', 'b']" in line and "Fill in 0/1 labels" in line
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_train_names_the_class_column_without_labels(tmp_path, capsys, monkeypatch):
    from medscalpel.data import open_dataset

    rows = ["path,a,b,c"] + [f"img/{i}.png,{i % 2},,{(i // 2) % 2}" for i in range(8)]
    csv = write_labels(tmp_path / "d", rows)
    out = tmp_path / "out"
    line = one_error(*cli(["train", "--data", f"csv:{csv}", "--arch", "resnet_tiny",
                           "--size", "32", "--epochs", "1", "--out", out], capsys, monkeypatch))
    assert "the label column(s) ['b'] hold no label in any of the 8 row(s)" in line
    assert "label_cols=a,c" in line and not out.exists()
    # the advised fix works
    ds = open_dataset(f"csv:{csv}?label_cols=a,c", split="all")
    assert ds.class_names == ["a", "c"] and np.isfinite(ds.labels).all()
    # NaN spelled out counts as blank too
    rows = ["path,a"] + [f"img/{i}.png,NaN" for i in range(8)]
    with pytest.raises(DataError, match=r"no label in any of its 8 row\(s\)"):
        open_dataset(f"csv:{write_labels(tmp_path / 'n', rows)}", split="all")


def test_train_refuses_a_split_without_labels(tmp_path):
    """Labels only in the test rows: the train split has none, refused before any step."""
    import torch

    from medscalpel.data import Preprocess, open_dataset
    from medscalpel.engine.train import TrainConfig, train
    from medscalpel.models import create_model

    rows = ["path,a,b,split"] + [
        f"img/{i}.png,{'' if i < 6 else i % 2},{'' if i < 6 else 1 - i % 2},"
        f"{'train' if i < 6 else 'test'}" for i in range(8)]
    csv = write_labels(tmp_path / "d", rows)
    ds = open_dataset(f"csv:{csv}?split_col=split", split="train",
                      preprocess=Preprocess(size=32))
    torch.manual_seed(0)
    m = create_model("resnet_tiny", 2, 1, 32)
    with pytest.raises(DataError, match=r"The 'train' split of .* has no known label in any of "
                                        r"its \d+ image\(s\).*training needs labels"):
        train(m, ds, None, TrainConfig(epochs=1, batch_size=4, device="cpu"), progress=False)


# ----------------------------------------------------------------------------- 2. NaN logits
def test_evaluate_refuses_nan_logits(base, tmp_path, capsys, monkeypatch):
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], np.float32)
    logits = np.ones((4, 3), np.float32)
    logits[2, 1] = np.nan
    path = tmp_path / "nan.npz"
    # write the file the way a damaged / diverged run would (bypassing the constructor)
    meta = {"schema_version": 1, "ids": list("wxyz"), "class_names": ["a", "b", "c"],
            "task": "multilabel", "split": "test", "model_id": "m", "meta": {}}
    np.savez(path, logits=logits, labels=y,
             meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    out = tmp_path / "ev"
    line = one_error(*cli(["evaluate", path, "--out", out], capsys, monkeypatch))
    assert str(path) in line and "1 of 12 logits are NaN" in line
    assert "image 'y', class 'b'" in line and "predict again" in line
    assert not out.exists()
    with pytest.raises(DataError, match="logits are NaN"):
        Predictions(logits, y, tuple("wxyz"), ("a", "b", "c"), "multilabel")


def test_require_labels_refuses_unlabelled_predictions():
    from medscalpel.engine.external import external_validation

    y = np.array([[1.0], [0.0], [1.0], [0.0]])
    lab = Predictions(np.array([[2.], [-1.], [.5], [-2.]]), y, tuple("abcd"), ("x",),
                      "multilabel")
    unl = Predictions(lab.logits, np.full_like(y, np.nan), tuple("efgh"), ("x",), "multilabel")
    assert lab.require_labels("fitting thresholds") is lab
    with pytest.raises(DataError, match=r"carry no known label .*fitting thresholds needs "
                                        "labelled predictions"):
        unl.require_labels("fitting thresholds", "fit.npz")
    with pytest.raises(DataError, match="the external set: the predictions of 4 image"):
        external_validation(None, lab, unl, n_boot=0)
    mc = Predictions(np.zeros((2, 2)), np.array([-1, -1]), ("a", "b"), ("p", "q"), "multiclass")
    assert not mc.known_labels().any()
    with pytest.raises(DataError, match="carry no known label"):
        mc.require_labels("calibration")


# ----------------------------------------------------------------------------- 3. served
def test_audit_changes_on_garbage_served_model(base, tmp_path, capsys, monkeypatch):
    from medscalpel.deploy.served import load_served

    serve = tmp_path / "deploy" / "serve"
    serve.mkdir(parents=True)
    card = json.loads((base["model"] / "model.json").read_text())
    (serve / "serve.json").write_text(json.dumps({
        "runtime": "onnxruntime", "precision": "fp32", "files": ["model.onnx"],
        "class_names": card["class_names"], "task": card["task"], "input": card["input"]}))
    (serve / "model.onnx").write_bytes(b"\x00garbage, not a protobuf\xff" * 10)
    out = tmp_path / "changes"
    line = one_error(*cli(["audit", "changes", base["model"], serve, "--data", base["spec"],
                           "--out", out, "--n-boot", "10"], capsys, monkeypatch))
    assert str(serve / "model.onnx") in line and "cannot be loaded by onnx" in line  # onnx reads it first
    assert "re-run `medscalpel compress deploy`" in line and not out.exists()
    # serve.json that is no JSON object
    (serve / "serve.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="must hold a JSON object"):
        load_served(serve)


def test_served_onnx_of_another_model_is_refused(base, tmp_path):
    """A loadable ONNX file whose logits width differs from serve.json's classes."""
    import torch

    from medscalpel.deploy.export import export_onnx_file
    from medscalpel.deploy.served import load_served
    from medscalpel.errors import ModelError
    from medscalpel.models import create_model

    serve = tmp_path / "serve"
    serve.mkdir()
    torch.manual_seed(0)
    m = create_model("resnet_tiny", 5, 1, 32).eval()
    export_onnx_file(m, serve / "model.onnx", (1, 32, 32))
    card = json.loads((base["model"] / "model.json").read_text())
    (serve / "serve.json").write_text(json.dumps({
        "runtime": "onnxruntime", "precision": "fp32", "files": ["model.onnx"],
        "class_names": card["class_names"], "task": card["task"], "input": card["input"]}))
    with pytest.raises(ModelError, match=r"outputs 5 logits per image but serve.json names 3"):
        load_served(serve)


# ----------------------------------------------------------------------------- 4. explain
def test_explain_refuses_a_model_of_other_classes(base, tmp_path, capsys, monkeypatch):
    two = write_labels(tmp_path / "two", ["path,a,b"] + [f"img/{i}.png,{i % 2},{1 - i % 2}"
                                                         for i in range(8)])
    m2 = save_tiny_model(f"csv:{two}", tmp_path / "m2")
    for cmd in (["explain", "cam"], ["explain", "attribute"], ["explain", "channels"]):
        out = tmp_path / "_".join(cmd)
        line = one_error(*cli([*cmd, "--model", m2, "--data", base["spec"], "--out", out,
                               "--class", "a"], capsys, monkeypatch))
        assert f"--model {m2} does not fit --data" in line, line
        assert "predicts 2 classes but dataset" in line and "has 3" in line
        assert not out.exists()


# ----------------------------------------------------------------------------- 5. report
def test_report_experiment_refuses_a_folder_without_artifacts(tmp_path, capsys, monkeypatch):
    for folder in (Path("/proc"), tmp_path / "empty"):
        folder.mkdir(exist_ok=True)
        html = tmp_path / f"{folder.name}.html"
        line = one_error(*cli(["report", "experiment", folder, "--out", html], capsys,
                              monkeypatch))
        assert f"No medscalpel artifacts in {folder}" in line and "demo.json" in line
        assert not html.exists() and not html.with_suffix(".json").exists()
    # without --out nothing is written into the folder either
    line = one_error(*cli(["report", "experiment", tmp_path / "empty"], capsys, monkeypatch))
    assert not list((tmp_path / "empty").iterdir())
    # a run directory of a command the report does not render: 'show' is named
    other = tmp_path / "features_run"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"command": "features", "config": {},
                                                     "versions": {}}))
    line = one_error(*cli(["report", "experiment", other, "--out", tmp_path / "f.html"],
                          capsys, monkeypatch))
    assert "run directory of 'features'" in line and f"'medscalpel show {other}'" in line


# ----------------------------------------------------------------------------- 6. duplicates
def test_evaluate_external_counts_dropped_duplicates(tmp_path, capsys, monkeypatch):
    import torch
    from PIL import Image

    from medscalpel.data import Preprocess
    from medscalpel.engine.api import predict_spec
    from medscalpel.models import create_model
    from medscalpel.models.checkpoint import make_card, save_model

    rng = np.random.default_rng(0)
    for site, n_dup in (("int", 0), ("ext", 3)):
        for c in ("NORMAL", "PNEUMONIA"):
            d = tmp_path / site / c
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(
                    d / f"{c}-{i}.png")
        for j in range(n_dup):  # byte-identical copies under another name
            shutil.copy(tmp_path / site / "NORMAL" / f"NORMAL-{j}.png",
                        tmp_path / site / "NORMAL" / f"copy-{j}.png")
    torch.manual_seed(0)
    m = create_model("resnet_tiny", 2, 1, 32)
    save_model(m, tmp_path / "model", make_card(m, ["NORMAL", "PNEUMONIA"], "multiclass",
                                                Preprocess(size=32)))
    internal = predict_spec(tmp_path / "model", f"folder:{tmp_path / 'int'}", "all",
                            progress=False)
    internal.save(tmp_path / "internal.npz")
    out = tmp_path / "ext_run"
    code, stdout, err = cli(["evaluate", tmp_path / "internal.npz", "--model", tmp_path / "model",
                             "--external", f"folder:{tmp_path / 'ext'}", "--n-boot", "20",
                             "--out", out], capsys, monkeypatch)
    assert code == 0, err
    said = " ".join(stdout.split())  # the console wraps long lines
    assert "external set: used 12 of 15 images of" in said
    assert "3 duplicate image file(s) dropped (byte-identical copies)" in said
    res = json.loads((out / "external.json").read_text())
    assert res["external"]["duplicates_removed"] == 3 and res["external"]["n_total"] == 15
    assert res["external"]["n_used"] == 12 and res["internal"]["duplicates_removed"] == 0
    assert any("3 byte-identical duplicate image file(s) dropped" in n for n in res["notes"])


# ----------------------------------------------------------------------------- 8. headline
def _deploy(root: Path, outcome_rounds: tuple[float, ...]) -> None:
    """A deploy.json through the real result types (SpeedRatio from per-round times)."""
    from medscalpel.deploy.result import DeployResult, VariantResult
    from medscalpel.deploy.timing import speed_ratio
    from medscalpel.layout import write_artifact

    ref = [4.0] * len(outcome_rounds)
    sr = speed_ratio(ref, [4.0 / r for r in outcome_rounds]).to_dict()
    cmp = {"macro": {"delta_auroc": -0.0012, "delta_auroc_ci": [-0.004, 0.0015]},
           "classes": [{"name": "x", "delta_auroc": -0.002}]}
    v = VariantResult("onnxruntime:fp32", "onnxruntime", "fp32", "go", (),
                      {"b1": {"median_ms": 4.0 / sr["ratio"]}}, {"b1": sr["ratio"]}, {},
                      1e-6, 1e-7, 1e-4, cmp, speed={"b1": {"vs_torch": sr}})
    write_artifact(root, "deploy", DeployResult(
        model_id="abc", arch="densenet_tiny", input_shape=(1, 1, 32, 32), class_names=("x",),
        task="multilabel", macs=1000, params=100, batches=(1,), rounds=len(outcome_rounds),
        repeats=3, threads=1, split="test", n_images=64, n_calib=16, calib_split="train",
        floor={"macro": -0.005, "per_class": -0.01}, variants=(v,),
        recommended="onnxruntime:fp32", reason="fastest go", peak={}, cpu={},
        loadavg={"start": [0.1], "end": [0.2]}, under_load=False, serve={},
        machine={"cpu": {"model": "Test CPU 3000"}}))


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    from medscalpel.report.experiment import experiment_report

    run_dir = make_run_dir(tmp_path_factory.mktemp("hl") / "run")
    _deploy(run_dir, (1.8, 1.9, 2.0, 1.85, 1.95, 1.9))
    _png(run_dir / "data" / "phantom_preview.png", 5, "phantom")
    rep = experiment_report(run_dir)
    return run_dir, rep, Path(rep.html_path).read_text(encoding="utf-8")


def test_headline_opens_the_report_and_every_number_points_into_its_artifact(report_run):
    run_dir, rep, html = report_run
    # the headline comes before every section; the phantom gallery sits in 'dataset'
    assert html.index('id="headline"') < html.index('data-section="overview"')
    assert html.index('data-section="dataset"') < html.index("phantom images (contact sheet)")
    assert "phantom images" not in parse(html).sections["overview"]["text"]
    head = html[html.index('id="headline"'):html.index('data-section="overview"')]
    cells = parse(head).cells
    assert check_cells_against_json(run_dir, cells) >= 20
    srcs = {c["attrs"]["data-src"].split("#")[0] for c in cells}
    assert {"compress/compress.json", "deploy/deploy.json", "shift/site_shift.json",
            "audit/forgettability/forgettability.json", "audit/pies/pies.json",
            "baseline/model/model.json"} <= srcs
    hl = {i["key"]: i for i in rep.to_dict()["headline"]["items"]}
    assert list(hl) == ["compressed", "faster", "cost_internal", "cost_external", "forgot",
                        "open"]
    assert "densenet_tiny" in hl["compressed"]["text"]
    assert "structured-l1 (0.40 of the parameters)" in hl["compressed"]["text"]
    assert "refused: lossless-refused" in hl["compressed"]["text"]
    # speed: the deploy interval and its outcome, measured on the named CPU
    assert "served onnxruntime:fp32 vs torch fp32 x1.90 [x1.80, x2.00]" in hl["faster"]["text"]
    assert "faster" in hl["faster"]["text"] and "Test CPU 3000" in hl["faster"]["measured_on"]
    # internal cost: paired delta with CI and what the CI says
    assert "structured-l1 \u0394 macro AUROC -0.0212 [-0.0350, -0.0080] (a loss)" in \
        hl["cost_internal"]["text"]
    assert "split 'test', 120 images, paired" in hl["cost_internal"]["measured_on"]
    assert "served onnxruntime:fp32 \u0394 macro AUROC -0.0012 [-0.0040, 0.0015]" in \
        hl["cost_internal"]["text"]
    # external: measured for the dense model only, and said so
    assert "external" in hl["cost_external"]["text"]
    assert "the compressed models were not measured on the external site" in \
        hl["cost_external"]["text"]
    assert "3 of 4 classes lost" in hl["forgot"]["text"] and "6 PIEs of 120 images" in \
        hl["forgot"]["text"]
    assert "what compression changed: not measured (audit/changes/changes.json absent)" in \
        hl["open"]["text"]
    assert hl["open"]["status"] == "undecided"


def test_headline_of_an_undecided_speed_and_a_bare_run(tmp_path):
    from medscalpel.report.experiment import experiment_report
    from medscalpel.runs import write_json

    run_dir = tmp_path / "run"
    _deploy(run_dir, (0.9, 1.2, 1.0))  # three rounds either side of 1: undecided
    rep = experiment_report(run_dir)
    hl = {i["key"]: i for i in rep.to_dict()["headline"]["items"]}
    assert hl["faster"]["status"] == "undecided" and "undecided" in hl["faster"]["text"]
    assert "speed vs torch fp32 undecided for onnxruntime:fp32" in hl["open"]["text"]
    html = Path(rep.html_path).read_text(encoding="utf-8")
    assert check_cells_against_json(run_dir, parse(html).cells) > 5

    bare = tmp_path / "bare"
    write_json(bare / "demo.json", {"profile": "micro", "stages": [], "seconds": 1.0,
                                    "settings": {}})
    rep = experiment_report(bare)
    hl = {i["key"]: i for i in rep.to_dict()["headline"]["items"]}
    for key in ("compressed", "faster", "cost_internal", "cost_external", "forgot"):
        assert hl[key]["status"] == "not measured" and "not measured" in hl[key]["text"], key
    for what in ("compression table", "deployment benchmark", "external site"):
        assert f"{what}: not measured" in hl["open"]["text"]


def test_calibrate_refuses_unlabelled_predictions(tmp_path):
    """'repair calibrate' on predictions of unlabelled images: one error line, exit 2, nothing
    written (it used to write all thresholds 0.5)."""
    import subprocess
    import sys

    from medscalpel.engine.predictions import Predictions

    p = Predictions(np.array([[0.1, -0.2], [1.0, 0.3], [-1.0, 2.0]], np.float32),
                    np.full((3, 2), np.nan, np.float32), ids=("a", "b", "c"),
                    class_names=("x", "y"), task="multilabel")
    p.save(tmp_path / "u.npz")
    out = subprocess.run([sys.executable, "-m", "medscalpel.cli.main", "repair", "calibrate",
                          str(tmp_path / "u.npz"), "--out", str(tmp_path / "cal")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "carry no known label" in out.stderr and out.stderr.count("error:") == 1
    assert not (tmp_path / "cal").exists()


@pytest.mark.parametrize("field,value,match", [
    ("arch", "vgg_nope", r"'arch' must be one of the zoo's architectures"),
    ("size", "sixty-four", r"'input.size' must be a positive integer; got 'sixty-four'"),
    ("task", "regression", r"'task' must be 'multilabel' or 'multiclass'"),
])
def test_hand_edited_model_card_is_refused_with_the_field_named(tmp_path, field, value, match):
    from medscalpel.data import Preprocess
    from medscalpel.errors import CheckpointError
    from medscalpel.models import create_model, load_model, make_card, save_model

    m = create_model("vgg_tiny", num_classes=2, img_size=32)
    save_model(m, tmp_path / "m", make_card(m, ["a", "b"], "multilabel", Preprocess(size=32)))
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    if field == "size":
        card["input"]["size"] = value
    else:
        card[field] = value
    (tmp_path / "m" / "model.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path / "m")
