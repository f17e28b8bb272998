"""torchxrayvision adapter: xrv's DenseNet121 key layout (torchvision keys, op_threshs buffer)."""

import pytest
import torch
import torchvision

from medscalpel.errors import CheckpointError
from medscalpel.models.xrv import XRV_PATHOLOGIES, load_xrv_densenet, xrv_preprocess


def _xrv_like_state():
    tv = torchvision.models.densenet121(num_classes=len(XRV_PATHOLOGIES))
    tv.features.conv0 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    state = tv.state_dict()
    state["op_threshs"] = torch.rand(len(XRV_PATHOLOGIES))
    return tv.eval(), state


def test_load_local_xrv_weights_gives_logits(tmp_path):
    tv, state = _xrv_like_state()
    torch.save(state, tmp_path / "xrv.pt")
    m = load_xrv_densenet(tmp_path / "xrv.pt", size=64)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m(x), tv(x), atol=1e-5)  # logits, no op_threshs
    assert m.card.class_names == XRV_PATHOLOGIES and m.card.input["std"] == [1 / 2048]
    # xrv's range: a white pixel (1.0) maps to +1024
    assert xrv_preprocess().normalize(torch.ones(1, 4, 4)).max().item() == pytest.approx(1024)


def test_wrong_pathology_count(tmp_path):
    _, state = _xrv_like_state()
    torch.save(state, tmp_path / "xrv.pt")
    with pytest.raises(CheckpointError, match="18 outputs but 14 pathologies"):
        load_xrv_densenet(tmp_path / "xrv.pt", pathologies=XRV_PATHOLOGIES[:14])
