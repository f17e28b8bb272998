import re

import pytest
import torch

from medscalpel.data import Preprocess
from medscalpel.errors import CheckpointError, ModelError
from medscalpel.models import create_model, import_foreign, load_model, make_card, save_model
from medscalpel.models.checkpoint import read_foreign_state_dict

NAMES = ["a", "b", "c"]


def _chexnet_style_state(model):
    """The key layout of CheXNet reproductions: DataParallel 'module.', 'densenet121.' prefix,
    old torchvision names 'norm.1' and a Sequential(Linear, Sigmoid) classifier."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("classifier."):
            k2 = "module.densenet121.classifier.0." + k.split(".", 1)[1]
        else:
            k2 = "module.densenet121." + k[len("backbone."):]
            k2 = re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k2)
        out[k2] = v.clone()
    return out


def test_import_chexnet_layout(tmp_path):
    src = create_model("densenet_tiny", 3, in_chans=3, img_size=32).eval()
    for m in src.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    state = _chexnet_style_state(src)
    assert any(".norm.1." in k for k in state)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "densenet121", "state_dict": state, "best_loss": 0.1}, path)
    m = import_foreign(path, "densenet_tiny", NAMES, "multilabel", Preprocess(size=32, channels=3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))
    assert m.card.lineage[0]["method"] == "import"
    save_model(m, tmp_path / "out")
    assert torch.equal(load_model(tmp_path / "out")(x), m(x))


def test_import_torchvision_resnet_keys(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(tv.state_dict(), tmp_path / "r18.pt")
    m = import_foreign(tmp_path / "r18.pt", "resnet18", NAMES, "multilabel",
                       Preprocess(size=32, channels=3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), tv(x), atol=1e-6)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": _Evil()}, path)
    with pytest.raises(CheckpointError, match="never unpickles code"):
        read_foreign_state_dict(path)


def test_import_class_mismatch(tmp_path):
    src = create_model("densenet_tiny", 5, in_chans=1, img_size=32)
    torch.save(_chexnet_style_state(src), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="classifier has 5 outputs but 3 class names"):
        import_foreign(tmp_path / "w.pth", "densenet_tiny", NAMES, "multilabel", Preprocess(size=32))


def test_import_wrong_arch(tmp_path):
    src = create_model("vgg_tiny", 3, in_chans=1, img_size=32)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError):
        import_foreign(tmp_path / "w.pt", "densenet_tiny", NAMES, "multilabel", Preprocess(size=32))


def test_nan_weights_refused(tmp_path):
    m = create_model("vgg_tiny", 3, 1, 32)
    with torch.no_grad():
        m.classifier.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match="'classifier.weight' contains NaN"):
        save_model(m, tmp_path / "m", make_card(m, NAMES, "multilabel", Preprocess(size=32)))
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_damaged_safetensors(tmp_path):
    m = create_model("vgg_tiny", 3, 1, 32)
    save_model(m, tmp_path / "m", make_card(m, NAMES, "multilabel", Preprocess(size=32)))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="damaged or not safetensors"):
        load_model(tmp_path / "m")


def test_model_id_is_a_hash_of_the_weights_equal_across_processes(tmp_path):
    import subprocess
    import sys

    from medscalpel.models.checkpoint import weights_id

    code = ("import torch; from medscalpel.models.checkpoint import weights_id; "
            "torch.manual_seed(0); print(weights_id({'b': torch.rand(3), 'a': torch.ones(2, 2, "
            "dtype=torch.bfloat16), 'e': torch.zeros(0)}))")
    ids = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() for _ in range(3)}
    torch.manual_seed(0)
    state = {"b": torch.rand(3), "a": torch.ones(2, 2, dtype=torch.bfloat16), "e": torch.zeros(0)}
    assert ids == {weights_id(state)} and len(weights_id(state)) == 16
    changed = dict(state, b=state["b"] + 1e-6)
    assert weights_id(changed) != weights_id(state)
    assert weights_id({"a2": state["a"]}) != weights_id({"a": state["a"]})
