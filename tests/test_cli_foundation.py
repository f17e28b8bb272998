"""End-to-end CLI: train -> predict -> evaluate on a tiny image folder; errors exit non-zero
with a clear message and leave no run directory behind."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medscalpel.cli.main import app

runner = CliRunner()


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c, cls in enumerate(["NORMAL", "PNEUMONIA"]):
        (root / cls).mkdir(parents=True)
        for i in range(24):
            img = (rng.random((24, 24)) * 60).astype(np.uint8)
            if c:
                img[6:18, 6:18] += 150
            Image.fromarray(img).save(root / cls / f"{cls.lower()}_{i}.png")
    return root


def _ok(res):
    assert res.exit_code == 0, res.output + repr(res.exception)


def test_train_predict_evaluate(tmp_path, folder):
    spec = f"folder:{folder}?dedup=true&val_fraction=0.25&test_fraction=0.25"
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--data", spec, "--arch", "vgg_tiny", "--size", "24",
                              "--epochs", "2", "--batch-size", "8", "--n-boot", "20",
                              "--out", str(out)])
    _ok(res)
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "train" and man["status"] == "complete"
    assert man["versions"]["torch"].startswith("2.14.1")
    card = json.loads((out / "model" / "model.json").read_text())
    assert card["class_names"] == ["NORMAL", "PNEUMONIA"] and card["task"] == "multiclass"
    assert card["input"]["size"] == 24
    res = runner.invoke(app, ["predict", "--model", str(out / "model"), "--data", spec,
                              "--split", "test", "--out", str(tmp_path / "pred")])
    _ok(res)
    res = runner.invoke(app, ["evaluate", str(tmp_path / "pred" / "predictions.npz"), "--model",
                              str(out / "model"), "--n-boot", "50", "--out", str(tmp_path / "ev")])
    _ok(res)
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 12 and 0.0 <= metrics["macro"]["accuracy"] <= 1.0
    assert "PNEUMONIA" in res.output


def test_missing_dir_is_clear_error_and_nothing_written(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--data", f"folder:{tmp_path / 'nope'}", "--arch",
                              "vgg_tiny", "--out", str(out)])
    assert res.exit_code != 0
    assert "nope" in str(res.exception)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_unknown_adapter_and_arch(tmp_path, folder):
    res = runner.invoke(app, ["train", "--data", "bogus:/x", "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "Valid names" in str(res.exception)
    res = runner.invoke(app, ["train", "--data", f"folder:{folder}", "--arch", "resnet9000",
                              "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "Unknown architecture 'resnet9000'" in str(res.exception)


def test_console_entry_point_exit_code(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from medscalpel.cli.main import run; run()",
                           "predict", "--model", str(tmp_path / "none"), "--data", "bogus",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "No weights" in proc.stderr


def test_models_list():
    res = runner.invoke(app, ["models", "list"])
    _ok(res)
    assert "densenet121" in res.output and "resnet50" in res.output


def _all_commands():
    import typer

    def walk(cmd, path=()):
        yield path
        for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
            if not getattr(sub, "hidden", False):
                yield from walk(sub, path + (name,))

    return list(walk(typer.main.get_command(app)))


TYPE_LABELS = ("<bool>", "<str>", "<int>", "<float>", "<path>", "<list", " TEXT", " INTEGER",
               " FLOAT", " PATH ", "BOOLEAN")


@pytest.mark.parametrize("path", [" ".join(p) for p in _all_commands()])
def test_dash_h_and_no_type_labels(path, capsys):
    """-h works on every command and group; help rows say what to give, never a type label."""
    from medscalpel.cli.main import run

    with pytest.raises(SystemExit) as ex:
        run([*path.split(), "-h"])
    out = capsys.readouterr().out
    assert ex.value.code == 0
    assert "Usage: medscalpel" in out
    found = [t for t in TYPE_LABELS if t in out]
    assert not found, (path, found)
    assert "seed 00" not in out  # no internal jargon ("seed 004's teacher")


def _preds(logits, labels, task, ids=None, names=("A", "B", "C")):
    from medscalpel.engine.predictions import Predictions

    n = len(logits)
    return Predictions(logits=np.asarray(logits, np.float32), labels=np.asarray(labels),
                       ids=tuple(ids or [f"i{k}" for k in range(n)]), class_names=names,
                       task=task, split="test", model_id=task)


def test_evaluate_reference_paired_and_accuracy(tmp_path, capsys):
    """evaluate A --reference B: paired deltas printed and saved; a candidate identical to the
    reference has delta 0 exactly; accuracy is printed for a multi-class model."""
    from medscalpel.cli.main import run
    from medscalpel.engine.compare import PairedComparison

    rng = np.random.default_rng(0)
    y = np.tile([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + 2.0 * np.eye(3)[y]
    ref = _preds(logits, y, "multiclass")
    ref.save(tmp_path / "ref.npz")
    worse = logits.copy()
    worse[:30] = rng.normal(size=(30, 3))  # half the images lose their signal
    _preds(worse, y, "multiclass").save(tmp_path / "cand.npz")
    with pytest.raises(SystemExit) as ex:
        run(["evaluate", str(tmp_path / "cand.npz"), "--reference", str(tmp_path / "ref.npz"),
             "--n-boot", "200", "--out", str(tmp_path / "cmp")])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert "macro" in out and "dAUROC" in out and "accuracy delta" in out
    cmp = PairedComparison.load(tmp_path / "cmp")
    acc_ref = float(np.mean(logits.argmax(1) == y))
    acc_new = float(np.mean(worse.argmax(1) == y))
    assert cmp.n == 60 and cmp.macro["delta_accuracy"] == pytest.approx(acc_new - acc_ref)
    assert cmp.macro["delta_auroc"] < 0
    # the same predictions against themselves: every delta is exactly 0
    with pytest.raises(SystemExit) as ex:
        run(["evaluate", str(tmp_path / "ref.npz"), "--reference", str(tmp_path / "ref.npz"),
             "--n-boot", "50", "--out", str(tmp_path / "same")])
    same = PairedComparison.load(tmp_path / "same")
    assert same.macro["delta_auroc"] == 0.0 and same.macro["delta_accuracy"] == 0.0
    # plain evaluate prints the multi-class accuracy
    with pytest.raises(SystemExit):
        run(["evaluate", str(tmp_path / "ref.npz"), "--n-boot", "0"])
    assert f"accuracy {acc_ref:.3f}" in capsys.readouterr().out


def test_models_import_refuses_channel_mismatch(tmp_path, folder, capsys):
    """models import reads the input channels from the first convolution; forcing other
    channels is refused unless --adapt-channels, which is said out loud."""
    import torch

    from medscalpel.cli.main import run
    from medscalpel.models import create_model, load_model

    src = create_model("vgg_tiny", 2, in_chans=1, img_size=24).eval()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    spec = f"folder:{folder}"
    with pytest.raises(SystemExit) as ex:
        run(["models", "import", str(tmp_path / "w.pt"), "--arch", "vgg_tiny", "--data", spec,
             "--size", "24", "--out", str(tmp_path / "m1")])
    assert ex.value.code == 0, capsys.readouterr().err
    assert "channels 1 (from" in capsys.readouterr().out
    m = load_model(tmp_path / "m1")
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))
    with pytest.raises(SystemExit) as ex:
        run(["models", "import", str(tmp_path / "w.pt"), "--arch", "vgg_tiny", "--data", spec,
             "--size", "24", "--channels", "3", "--out", str(tmp_path / "m3")])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "takes 1 input channel(s)" in err and "--adapt-channels" in err
    assert not (tmp_path / "m3").exists()
    with pytest.raises(SystemExit) as ex:
        run(["models", "import", str(tmp_path / "w.pt"), "--arch", "vgg_tiny", "--like", spec,
             "--size", "24", "--channels", "3", "--adapt-channels", "--out",
             str(tmp_path / "m3")])
    assert ex.value.code == 0
    assert "adapted from 1 to 3" in capsys.readouterr().out
    assert load_model(tmp_path / "m3").card.preprocess.channels == 3


def test_show_prints_any_run(tmp_path, capsys):
    """show RUN prints a run's results again: an evaluate run (metrics.json), a comparison
    (comparison.json) and a run holding a declared artifact (layout.ARTIFACTS)."""
    from medscalpel.cli.main import run
    from medscalpel.layout import write_artifact

    y = np.tile([0, 1, 2], 10)
    logits = np.eye(3)[y] * 2.0 + np.random.default_rng(0).normal(size=(30, 3))
    _preds(logits, y, "multiclass").save(tmp_path / "p.npz")
    with pytest.raises(SystemExit):
        run(["evaluate", str(tmp_path / "p.npz"), "--n-boot", "20", "--out", str(tmp_path / "ev")])
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        run(["show", str(tmp_path / "ev")])
    out = capsys.readouterr().out
    assert ex.value.code == 0
    assert "evaluate" in out and "complete" in out  # the manifest
    compact = "".join(out.split())
    # the declared artifact 'metrics', titled with its key, path and description
    assert "metrics(metrics.json):" in compact
    assert "split):macro" in compact and f"{metrics['macro']['auroc']:.3f}" in out
    assert "split):classes" in compact
    d = tmp_path / "demo_like"
    write_artifact(d, "calibration", {"fit_split": "val", "calibrator": {"method": "youden"},
                                      "evaluation": {"macro": {"f1": 0.75}}})
    with pytest.raises(SystemExit) as ex:
        run(["show", str(d)])
    out = capsys.readouterr().out
    compact = "".join(out.split())  # rich wraps long titles
    assert ex.value.code == 0 and "calibrate/calibration.json" in compact and "0.750" in out
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as ex:
        run(["show", str(tmp_path / "empty")])
    assert ex.value.code == 2 and "holds no result" in capsys.readouterr().err


def test_predict_image_files_folder_and_glob(tmp_path, folder, capsys):
    """predict takes one image, a folder of unlabelled images or a glob: labels unknown (said
    so), the same logits as through the labelled dataset spec; evaluate refuses them."""
    import torch

    from medscalpel.cli.main import run
    from medscalpel.data import Preprocess
    from medscalpel.engine.api import predict_spec
    from medscalpel.engine.predictions import Predictions
    from medscalpel.models import create_model, make_card, save_model

    torch.manual_seed(0)
    m = create_model("vgg_tiny", 2, 1, 24)
    pp = Preprocess(size=24, channels=1)
    save_model(m, tmp_path / "m", make_card(m, ["NORMAL", "PNEUMONIA"], "multiclass", pp))
    one = folder / "PNEUMONIA" / "pneumonia_3.png"
    cases = [(str(one), 1), (str(folder / "NORMAL"), 24), (f"{folder}/*/*.png", 48)]
    for k, (data, n) in enumerate(cases):
        with pytest.raises(SystemExit) as ex:
            run(["predict", "--model", str(tmp_path / "m"), "--data", data, "--out",
                 str(tmp_path / f"p{k}")])
        out = capsys.readouterr().out
        assert ex.value.code == 0, out
        assert f"used {n} of {n} images" in out and "no labels" in out
        p = Predictions.load(tmp_path / f"p{k}")
        assert p.n == n and (p.labels == -1).all() and p.meta["unlabelled"]
    labelled = predict_spec(tmp_path / "m", f"folder:{folder}?dedup=false", "all", 16)
    row = [i for i, s in enumerate(labelled.ids) if s.endswith("pneumonia_3.png")]
    assert len(row) == 1
    single = Predictions.load(tmp_path / "p0")
    np.testing.assert_allclose(single.logits[0], labelled.logits[row[0]], atol=1e-5)
    with pytest.raises(SystemExit) as ex:
        run(["evaluate", str(tmp_path / "p2"), "--n-boot", "0"])
    assert ex.value.code == 2 and "no labels to evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:
        run(["predict", "--model", str(tmp_path / "m"), "--data", f"{folder}/*.nothing",
             "--out", str(tmp_path / "p9")])
    assert ex.value.code == 2 and "No image file" in capsys.readouterr().err


def test_train_acquisition_augmentation_is_recorded_and_bad_profile_refused(tmp_path, folder):
    spec = f"folder:{folder}?dedup=true&val_fraction=0.25&test_fraction=0.25"
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--data", spec, "--arch", "vgg_tiny", "--size", "24",
                              "--epochs", "1", "--batch-size", "8", "--n-boot", "10",
                              "--augment-profile", "acquisition", "--out", str(out)])
    _ok(res)
    card = json.loads((out / "model" / "model.json").read_text())
    aug = card["training"]["augment"]
    assert aug["gamma"] == 0.4 and aug["noise"] == 0.05 and aug["scale"] == [0.9, 1.15]
    res = runner.invoke(app, ["train", "--data", spec, "--arch", "vgg_tiny", "--no-augment",
                              "--out", str(tmp_path / "plain"), "--epochs", "1", "--size", "24"])
    _ok(res)
    assert json.loads((tmp_path / "plain" / "model" / "model.json").read_text()
                      )["training"]["augment"] is None
    bad = tmp_path / "bad"
    res = runner.invoke(app, ["train", "--data", spec, "--arch", "vgg_tiny",
                              "--augment-profile", "heavy", "--out", str(bad)])
    assert res.exit_code != 0 and "Unknown augmentation profile 'heavy'" in str(res.exception)
    assert not bad.exists()
