"""The explain / polarity commands end to end on a tiny phantom and model."""

import json

import pytest
from typer.testing import CliRunner

from medscalpel.cli.main import app
from medscalpel.data import Preprocess
from medscalpel.data.phantom import generate_phantom
from medscalpel.models import create_model, make_card, save_model

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    generate_phantom(n=160, size=32, seed=0, out=root / "ph", progress=False)
    names = list(generate_phantom(n=1, size=16, progress=False).class_names)
    for arch in ("densenet_tiny", "resnet_tiny"):
        m = create_model(arch, 14, 1, 32)
        save_model(m, root / arch, make_card(m, names, "multilabel", Preprocess(size=32)))
    return root, f"phantom:{root / 'ph'}"


def _ok(r):
    assert r.exit_code == 0, r.output + repr(r.exception)


def test_cam_attribute_channels_compare_polarity(env, tmp_path):
    root, spec = env
    model = str(root / "densenet_tiny")
    _ok(runner.invoke(app, ["explain", "cam", "--model", model, "--data", spec, "--class",
                            "Effusion", "--n", "3", "--out", str(tmp_path / "cam")]))
    assert (tmp_path / "cam" / "gradcam.png").is_file()
    cams = json.loads((tmp_path / "cam" / "cams.json").read_text())
    assert cams["method"] == "gradcam"
    _ok(runner.invoke(app, ["explain", "attribute", "--model", model, "--data", spec, "--class",
                            "Effusion", "--method", "ig", "--n", "2",
                            "--out", str(tmp_path / "ig")]))
    assert (tmp_path / "ig" / "attributions.safetensors").is_file()
    _ok(runner.invoke(app, ["explain", "channels", "--model", model, "--data", spec, "--class",
                            "Effusion", "--n-images", "32", "--out", str(tmp_path / "ch")]))
    table = json.loads((tmp_path / "ch" / "channels.json").read_text())
    assert len(table["rows"]) == 10
    _ok(runner.invoke(app, ["explain", "compare", "--teacher", model, "--student",
                            str(root / "resnet_tiny"), "--data", spec, "--n", "4", "--method",
                            "gradcam", "--out", str(tmp_path / "cmp")]))
    assert (tmp_path / "cmp" / "comparison.json").is_file()
    # attribute / channels / compare run their registered stages: the manifest names the
    # command, the declared artifacts read back through the layout
    from medscalpel.layout import read_artifact

    for d, cmd, key in (("ig", "explain attribute", "attribution"),
                        ("ch", "explain channels", "channels"),
                        ("cmp", "explain compare", "comparison")):
        assert json.loads((tmp_path / d / "manifest.json").read_text())["command"] == cmd
        assert read_artifact(tmp_path / d, key)
    assert len(read_artifact(tmp_path / "ig", "attribution")["ids"]) == 2
    _ok(runner.invoke(app, ["explain", "polarity", "--model", model, "--data", spec, "--n-null",
                            "20", "--compare-with", str(root / "resnet_tiny"), "--out",
                            str(tmp_path / "pol")]))
    # the 'polarity' stage, at the paths the demo's explain stage writes
    pdir = tmp_path / "pol" / "explain" / "polarity"
    pol = json.loads((pdir / "polarity.json").read_text())
    assert pol["class_names"] and (pdir / "polarity.png").is_file()
    stages = json.loads((pdir / "stages.json").read_text())
    assert list(stages["stages"]) == ["model", "resnet_tiny"]
    man = json.loads((tmp_path / "pol" / "manifest.json").read_text())
    assert man["command"] == "audit polarity" and man["config"]["data"] == spec


def test_unknown_class_is_clear(env, tmp_path):
    root, spec = env
    r = runner.invoke(app, ["explain", "cam", "--model", str(root / "densenet_tiny"), "--data",
                            spec, "--class", "Flu", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "Unknown class 'Flu'" in str(r.exception)
    assert not (tmp_path / "x").exists()
