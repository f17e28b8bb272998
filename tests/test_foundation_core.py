import json

import pytest
import torch

from medscalpel.errors import CheckpointError, ConfigError, RunError
from medscalpel.models import create_model, list_models, load_model, make_card, save_model
from medscalpel.data import Preprocess
from medscalpel.registry import Registry
from medscalpel.runs import RunDir


def test_registry_unknown_lists_valid():
    r = Registry("thing")
    r.register("a")(lambda: 1)
    assert r.create("a") == 1
    with pytest.raises(ConfigError, match="Unknown thing 'b'. Valid names: a"):
        r.create("b")


@pytest.mark.parametrize("arch", sorted(list_models()))
def test_introspection_identity(arch):
    size = 32 if arch in ("vit_test", "densenet_tiny", "resnet_tiny", "vgg_tiny") else 64
    m = create_model(arch, num_classes=4, in_chans=1, img_size=size).eval()
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        logits = m(x)
        f = m.features(x)
        fmap = m.feature_map(x)
    assert f.shape == (2, m.feature_dim)
    manual = f @ m.classifier.weight.T + m.classifier.bias
    assert torch.allclose(manual, logits, atol=1e-5)
    assert fmap.ndim == 4 and fmap.shape[0] == 2


def test_checkpoint_roundtrip_and_pruned_shapes(tmp_path):
    m = create_model("densenet_tiny", num_classes=3, img_size=32).eval()
    card = make_card(m, ["a", "b", "c"], "multilabel", Preprocess(size=32))
    # physically shrink the classifier input and the last BN (as pruning would)
    x = torch.randn(2, 1, 32, 32)
    save_model(m, tmp_path / "m", card)
    m2 = load_model(tmp_path / "m")
    assert torch.equal(m(x), m2(x))
    assert m2.card.class_names == ("a", "b", "c")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["arch"] == "densenet_tiny" and len(meta["model_id"]) == 16


def test_load_refuses_missing_card(tmp_path):
    m = create_model("vgg_tiny", num_classes=2, img_size=32)
    save_model(m, tmp_path / "m", make_card(m, ["x", "y"], "multiclass", Preprocess(size=32)))
    (tmp_path / "m" / "model.json").unlink()
    with pytest.raises(CheckpointError, match="No model card"):
        load_model(tmp_path / "m")


def test_rundir_atomic(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ZeroDivisionError):
        with RunDir(out, command="t") as run:
            (run.path / "half.txt").write_text("x")
            1 / 0
    assert not out.exists()
    assert not list(tmp_path.iterdir())
    with RunDir(out, command="t", config={"k": 1}) as run:
        (run.path / "a.txt").write_text("x")
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["config"] == {"k": 1}
    with pytest.raises(RunError, match="already exists"):
        with RunDir(out, command="t"):
            pass


def test_rundir_resume_identity(tmp_path):
    out = tmp_path / "sweep"
    with RunDir(out, command="s", identity={"data": "h1"}, in_place=True):
        pass
    with pytest.raises(RunError, match="different data"):
        with RunDir(out, command="s", identity={"data": "h2"}, in_place=True):
            pass


def test_spec_parsing_values():
    from medscalpel.data.spec import DatasetSpec

    s = DatasetSpec.parse("folder:/x/y?dedup=true&seed=0&val_fraction=0.1&classes=a,b")
    assert s.adapter == "folder" and s.root == "/x/y"
    assert s.options == {"dedup": True, "seed": 0, "val_fraction": 0.1, "classes": "a,b"}
    assert isinstance(s.options["seed"], int) and not isinstance(s.options["seed"], bool)
    with pytest.raises(ConfigError, match="Unknown dataset adapter 'zip'. Valid names: chexpert"):
        DatasetSpec.parse("zip:/x")


def test_final_path_of_partial_run_dir(tmp_path):
    from medscalpel.runs import final_path

    with RunDir(tmp_path / "my.run", command="t") as run:
        assert run.path != tmp_path / "my.run"
        assert final_path(run.path) == tmp_path / "my.run"
    assert final_path(tmp_path / "plain") == tmp_path / "plain"
