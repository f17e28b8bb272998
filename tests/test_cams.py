"""CAMs: a planted discriminative patch is found; the caller's model is left untouched."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.explain.cams import CAMS, CamResult, compute_cam, hook_counts
from medscalpel.explain.compare import compare_saliency, pearson
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.zoo import create_model

SIZE = 32
PATCH1 = (slice(8, 16), slice(20, 28))    # class 1's region: right half of the image
PATCH0 = (slice(20, 28), slice(4, 12))    # a distractor in class 0's region (left half)


class RegionGate(nn.Module):
    """Multiplies channel c by a fixed spatial mask: channel c only sees its region."""

    def __init__(self, masks: torch.Tensor):
        super().__init__()
        self.register_buffer("masks", masks)

    def forward(self, x):
        return x * self.masks[None]


def planted_model() -> MedClassifier:
    """Class k's logit = 200 * mean over region k of ReLU(local mean - 0.5): it depends only on
    bright 4x4 cells inside region k (k=0: left half, k=1: right half)."""
    conv = nn.Conv2d(1, 2, kernel_size=4, stride=4)
    with torch.no_grad():
        conv.weight.fill_(1.0 / 16)
        conv.bias.fill_(-0.5)
    masks = torch.zeros(2, 8, 8)
    masks[0, :, :4] = 1
    masks[1, :, 4:] = 1
    backbone = nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU(inplace=True),
                                         gate=RegionGate(masks), pool=nn.AdaptiveAvgPool2d(1),
                                         flatten=nn.Flatten(1)))
    clf = nn.Linear(2, 2)
    with torch.no_grad():
        clf.weight.copy_(torch.eye(2) * 200)
        clf.bias.zero_()
    return MedClassifier(backbone, clf, "planted", cam_layer="backbone.gate")


def planted_images(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.3
    x[:, :, PATCH1[0], PATCH1[1]] = 1.0
    x[:, :, PATCH0[0], PATCH0[1]] = 1.0
    return x


def _mass_in(m: np.ndarray, region) -> float:
    return float(m[region].sum() / m.sum())


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam"])
def test_planted_patch_is_highlighted(method):
    model = planted_model()
    x = planted_images()
    with torch.no_grad():
        logits = model(x)
    assert torch.all(logits[:, 0] > 1) and torch.all(logits[:, 1] > 1)
    res1 = compute_cam(model, x, 1, method=method, progress=False)
    res0 = compute_cam(model, x, 0, method=method, progress=False)
    assert res1.maps.shape == (3, SIZE, SIZE)
    assert res1.maps.min() >= 0 and res1.maps.max() <= 1 + 1e-6
    for i in range(3):
        r, c = res1.peaks()[i]
        assert 8 <= r < 16 and 20 <= c < 28, (method, r, c)
        r, c = res0.peaks()[i]
        assert 20 <= r < 28 and 4 <= c < 12, (method, r, c)
        # dilate the patch by 2 px: bilinear upsampling of a 8x8 map spreads mass a little
        near1 = (slice(6, 18), slice(18, 30))
        assert _mass_in(res1.maps[i], near1) > 0.75
        assert res1.maps[i][PATCH0].max() < 0.2 * res1.maps[i].max() + 1e-6
    np.testing.assert_allclose(res1.logits, logits[:, 1].numpy(), rtol=1e-5)
    assert res1.targets == (1, 1, 1)


def test_targets_per_image_not_argmax():
    model = planted_model()
    x = planted_images(2)
    res = compute_cam(model, x, [1, 0], method="gradcam", progress=False)
    assert res.targets == (1, 0)
    assert res.peaks()[0][1] >= 16 and res.peaks()[1][1] < 16


@pytest.mark.parametrize("arch,size", [("densenet_tiny", 32), ("resnet_tiny", 32),
                                       ("vgg_tiny", 32), ("vit_test", 32)])
def test_model_state_mode_hooks_unchanged(arch, size):
    model = create_model(arch, num_classes=3, img_size=size)
    model.train()
    model.backbone[0].eval() if isinstance(model.backbone, nn.Sequential) else None
    modes = {n: m.training for n, m in model.named_modules()}
    # a hook and a gradient of the caller's own must survive
    calls = []
    own = model.classifier.register_forward_hook(lambda m, i, o: calls.append(1))
    model.classifier.weight.grad = torch.full_like(model.classifier.weight, 7.0)
    before_hooks = hook_counts(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 1, size, size)
    for method in ("gradcam", "gradcam++", "scorecam"):
        res = compute_cam(model, x, [0, 1, 2], method=method, batch_size=2, progress=False)
        assert res.maps.shape == (3, size, size)
        assert np.isfinite(res.maps).all()
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert hook_counts(model) == before_hooks
    assert all(p.requires_grad for p in model.parameters())
    assert torch.all(model.classifier.weight.grad == 7.0)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")
    for k, v in model.state_dict().items():   # BN running stats: CAMs run in eval mode
        assert torch.equal(v, state[k]), k
    own.remove()
    assert hook_counts(model) == {"forward": 0, "forward_pre": 0, "backward": 0,
                                  "backward_pre": 0}


def test_densenet121_inplace_relu_no_autograd_error():
    # the real CheXNet layout has in-place ReLUs in every dense layer; the hooked layer is the
    # non-inplace backbone.relu after norm5
    model = create_model("densenet121", num_classes=14, img_size=32)
    res = compute_cam(model, torch.randn(1, 1, 32, 32), 13, method="gradcam++", progress=False)
    assert res.maps.shape == (1, 32, 32)
    assert res.layer == "backbone.relu"


def test_cam_result_roundtrip(tmp_path):
    model = create_model("vgg_tiny", num_classes=2, img_size=32)
    res = compute_cam(model, torch.randn(2, 1, 32, 32), 1, progress=False, ids=["a", "b"])
    p = res.save(tmp_path / "cams.npz")
    back = CamResult.load(p)
    np.testing.assert_array_equal(back.maps, res.maps)
    assert back.ids == ("a", "b") and back.targets == (1, 1) and back.method == "gradcam"
    d = res.to_dict()
    assert d["n"] == 2 and d["images"][1]["id"] == "b" and d["images"][0]["class"] == "class1"


def test_cam_errors():
    model = create_model("vgg_tiny", num_classes=2, img_size=32)
    x = torch.randn(2, 1, 32, 32)
    with pytest.raises(ConfigError, match="Unknown CAM method 'eigencam'.*gradcam"):
        compute_cam(model, x, 0, method="eigencam")
    with pytest.raises(ConfigError, match=r"class indices in \[0, 1\]"):
        compute_cam(model, x, 2)
    with pytest.raises(ConfigError, match="one per image \\(2\\)"):
        compute_cam(model, x, [0, 1, 1])
    with pytest.raises(DataError, match="3 channels but the model"):
        compute_cam(model, torch.randn(2, 3, 32, 32), 0)
    with pytest.raises(DataError, match=r"\[N, C, H, W\] tensor"):
        compute_cam(model, torch.randn(1, 32, 32), 0)
    with pytest.raises(ModelError, match="needs a MedClassifier"):
        compute_cam(nn.Linear(3, 2), x, 0)
    with pytest.raises(ConfigError, match="'batch_size' parameter of compute_cam"):
        compute_cam(model, x, 0, batch_size=0)
    assert set(CAMS.names()) == {"gradcam", "gradcam++", "scorecam"}
    with pytest.raises(DataError, match="CAM file not found"):
        CamResult.load("/nonexistent/cams.npz")


def test_compare_saliency_identical_and_different(tmp_path):
    from medscalpel.explain.figures import comparison_figure

    t = planted_model()
    x = planted_images(2)
    same = compare_saliency(t, planted_model(), x, [0, 1], method="gradcam", progress=False)
    np.testing.assert_allclose(same.pearson, 1.0, atol=1e-6)
    np.testing.assert_allclose(same.iou, 1.0)
    # a student whose regions are swapped looks at the other patch
    s = planted_model()
    s.backbone.gate.masks.copy_(s.backbone.gate.masks.flip(0))
    diff = compare_saliency(t, s, x, [1], method="gradcam", frac=0.05, progress=False)
    assert np.all(diff.pearson < 0.2) and np.all(diff.iou < 0.1)
    d = diff.to_dict()
    assert d["classes"]["class1"]["n_images"] == 2
    p = comparison_figure(diff, x, tmp_path / "cmp.png", k=1)
    assert p.stat().st_size > 5000
    assert np.isnan(pearson(np.ones((4, 4)), np.arange(16).reshape(4, 4)))
    with pytest.raises(ConfigError, match="at least one"):
        compare_saliency(t, s, x, [], method="gradcam")
