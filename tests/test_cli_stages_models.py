"""Issue S: ``data phantom``, ``models import``, ``models import-xrv`` and ``predictions import``
each run one registered stage into their run directory; the artifacts sit at their declared
paths; a bad input fails with one error line and leaves nothing at --out."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import medscalpel.pipeline.stages  # noqa: F401  (registers the stages)
from medscalpel.cli.main import app, run
from medscalpel.data.spec import open_dataset
from medscalpel.engine.predictions import Predictions
from medscalpel.layout import ARTIFACTS, read_artifact
from medscalpel.models import create_model, load_model
from medscalpel.models.checkpoint import ModelCard
from medscalpel.pipeline.stage import STAGES, StageContext, run_stage
from medscalpel.pipeline.stages.data import PhantomDatasetSettings, PhantomSettings


def _invoke(argv):
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, (r.output, r.exception)
    return " ".join(r.output.split())  # rich wraps long lines at spaces


def _manifest(out):
    return json.loads(ARTIFACTS["manifest"].path_in(out).read_text())


def _stage(name, reads=(), writes=(), may_write=()):
    cls = STAGES.get(name)
    assert (cls.name, cls.reads, cls.writes, cls.may_write) == (name, reads, writes, may_write)


def _fails_cleanly(argv, out, capsys, match):
    """exit 2, one 'error:' line naming the problem, nothing at --out (no .partial left)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        run(argv)
    err = capsys.readouterr().err
    assert ex.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and match in " ".join(err.split()), err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    """A 40-image phantom made by the command (the dataset the other commands read)."""
    out = tmp_path_factory.mktemp("ph") / "ph"
    text = _invoke(["data", "phantom", "--out", str(out), "--n-images", "40", "--size", "24",
                    "--seed", "2", "--preview"])
    return out, text


def test_data_phantom_runs_the_phantom_dataset_stage(phantom_dir, tmp_path):
    out, text = phantom_dir
    _stage("phantom_dataset", writes=("phantom_dataset",), may_write=("phantom_sheet",))
    man = _manifest(out)
    assert man["command"] == "data phantom" and man["seed"] == 2
    assert man["config"]["n"] == 40 and man["config"]["shortcut"]["tube_pos"] == 0.8
    # the dataset folder is --out itself: phantom:OUT opens it (the documented spec)
    assert ARTIFACTS["phantom_dataset"].locate(out) == "labels.csv"
    assert ARTIFACTS["phantom_sheet"].locate(out) == "preview.png"
    assert len(open_dataset(f"phantom:{out}", split="all")) == 40
    assert "phantom: 40 images of 24x24" in text and f"(spec: phantom:{out})" in text
    # one generator for the command and the demo's 'phantom' stage: the same settings and seed
    # give the same labels (the demo keeps them at data/phantom/ inside its run)
    ctx = StageContext(tmp_path / "demo", seed=2)
    run_stage("phantom", ctx, PhantomSettings(n_images=40, size=24))
    assert ARTIFACTS["phantom_data"].path_in(ctx.out).read_bytes() == \
        ARTIFACTS["phantom_dataset"].path_in(out).read_bytes()
    # without --preview no contact sheet; the stage says so in its summary
    ctx = StageContext(tmp_path / "plain", seed=0)
    rec = run_stage("phantom_dataset", ctx, PhantomDatasetSettings(n_images=20, size=16))
    assert rec.summary["preview"] is False and not ARTIFACTS["phantom_sheet"].exists(ctx.out)


def test_data_phantom_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "ph"
    _fails_cleanly(["data", "phantom", "--out", str(out), "--n-images", "20",
                    "--label-noise", "0.9"], out, capsys, "'--label-noise'")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    src = create_model("vgg_tiny", 14, in_chans=1, img_size=24).eval()
    path = tmp_path_factory.mktemp("ckpt") / "w.pt"
    torch.save(src.state_dict(), path)
    return src, path


def test_models_import_runs_the_import_model_stage(phantom_dir, checkpoint, tmp_path):
    ph, _ = phantom_dir
    src, path = checkpoint
    out = tmp_path / "m"
    spec = f"phantom:{ph}"
    text = _invoke(["models", "import", str(path), "--arch", "vgg_tiny", "--data", spec,
                    "--size", "24", "--out", str(out)])
    _stage("import_model", writes=("imported_model",))
    man = _manifest(out)
    assert man["command"] == "models import" and man["seed"] is None  # nothing random
    # the channels read from the checkpoint are recorded where the given values are
    assert man["config"] == {"checkpoint": str(path), "arch": "vgg_tiny", "data": spec,
                             "size": 24, "channels": 1, "checkpoint_channels": 1,
                             "adapted_channels": False}
    card = read_artifact(out, "imported_model")
    assert isinstance(card, ModelCard) and len(card.class_names) == 14
    assert ARTIFACTS["imported_model"].locate(out) == "model.json"
    m = load_model(out)  # the run directory is the model directory
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))
    assert "input: channels 1 (from" in text and "input: size" not in text
    assert f"({m.num_parameters():,} params)" in text


def test_models_import_bad_architecture_writes_nothing(phantom_dir, checkpoint, tmp_path,
                                                       capsys):
    ph, _ = phantom_dir
    out = tmp_path / "m"
    _fails_cleanly(["models", "import", str(checkpoint[1]), "--arch", "resnet_tiny", "--data",
                    f"phantom:{ph}", "--size", "24", "--out", str(out)], out, capsys,
                   "is it the right architecture?")


def _xrv_like_state():
    import torchvision

    from medscalpel.models.xrv import XRV_PATHOLOGIES

    torch.manual_seed(0)
    tv = torchvision.models.densenet121(num_classes=len(XRV_PATHOLOGIES))
    tv.features.conv0 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    state = tv.state_dict()
    state["op_threshs"] = torch.rand(len(XRV_PATHOLOGIES))
    return state


def test_models_import_xrv_runs_the_import_xrv_stage(tmp_path, capsys):
    """Offline: a local state dict in xrv's layout (without --weights the extra downloads)."""
    torch.save(_xrv_like_state(), tmp_path / "xrv.pt")
    out = tmp_path / "xrv"
    text = _invoke(["models", "import-xrv", "--weights", str(tmp_path / "xrv.pt"), "--size",
                    "64", "--out", str(out)])
    _stage("import_xrv", writes=("imported_model",))
    man = _manifest(out)
    assert man["command"] == "models import-xrv"
    assert man["config"] == {"weights": str(tmp_path / "xrv.pt")}
    card = read_artifact(out, "imported_model")
    assert len(card.class_names) == 18 and card.preprocess.size == 64
    assert f"xrv DenseNet121 (18 pathologies) -> {out}" in text
    # weights of another model: one error line, nothing written
    torch.save(create_model("vgg_tiny", 3, in_chans=1, img_size=24).state_dict(),
               tmp_path / "w.pt")
    bad = tmp_path / "xrv_bad"
    _fails_cleanly(["models", "import-xrv", "--weights", str(tmp_path / "w.pt"), "--out",
                    str(bad)], bad, capsys, "18 pathologies were given")


def _scores_csv(ph, path, n=10):
    """Probabilities for the first ``n`` phantom images, keyed by the phantom's 'id'."""
    labels = pd.read_csv(ARTIFACTS["phantom_dataset"].path_in(ph))
    ds = open_dataset(f"phantom:{ph}", split="all")
    probs = np.random.default_rng(0).uniform(0.05, 0.95, (n, len(ds.class_names)))
    df = pd.DataFrame(probs, columns=ds.class_names)
    df.insert(0, "id", labels["id"].astype(str).to_numpy()[:n])
    df.to_csv(path, index=False)
    return probs


def test_predictions_import_runs_the_import_predictions_stage(phantom_dir, tmp_path, capsys):
    ph, _ = phantom_dir
    spec = f"phantom:{ph}"
    probs = _scores_csv(ph, tmp_path / "p.csv")
    out = tmp_path / "pi"
    text = _invoke(["predictions", "import", str(tmp_path / "p.csv"), "--data", spec,
                    "--id-column", "id", "--out", str(out)])
    _stage("import_predictions", writes=("predictions_file", "predictions_meta"))
    man = _manifest(out)
    assert man["command"] == "predictions import" and man["data"] == {"spec": spec}
    assert man["config"] == {"csv": str(tmp_path / "p.csv"), "labels": spec}
    assert read_artifact(out, "predictions_meta")["n"] == 10
    assert ARTIFACTS["predictions_file"].locate(out) == "predictions.npz"
    p = Predictions.load(ARTIFACTS["predictions_file"].path_in(out))
    np.testing.assert_allclose(1 / (1 + np.exp(-p.logits)), probs, atol=1e-5)
    assert f"imported 10 predictions x 14 classes -> {out}" in text
    # an id column the CSV does not have: one error line, nothing written
    bad = tmp_path / "pi_bad"
    _fails_cleanly(["predictions", "import", str(tmp_path / "p.csv"), "--data", spec,
                    "--out", str(bad)], bad, capsys, "has no id column 'Image Index'")
