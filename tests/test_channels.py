"""Classifier-channel attribution: contributions rebuild logit - bias exactly; top tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medscalpel.explain.polarity import TopKRule
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.explain.channels import (channel_contributions, channel_contributions_from_features,
                                         channel_contributions_from_model)
from medscalpel.models.zoo import create_model


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("arch", ["densenet_tiny", "resnet_tiny"])
def test_contributions_sum_to_logit_minus_bias(arch, dtype, atol):
    model = create_model(arch, num_classes=4, img_size=32).to(dtype)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=dtype))
    x = torch.randn(5, 1, 32, 32, dtype=dtype)
    model.train()
    cc = channel_contributions_from_model(model, x, batch_size=2, progress=False)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        logits = model(x).double().numpy()
    b = model.classifier.bias.detach().double().numpy()
    for k in range(4):
        np.testing.assert_allclose(cc.for_class(k).sum(1), logits[:, k] - b[k], rtol=0, atol=atol)
        np.testing.assert_allclose(cc.image(3, k).sum(), logits[3, k] - b[k], rtol=0, atol=atol)
    np.testing.assert_allclose(cc.all().sum(-1), logits - b, rtol=0, atol=atol)
    assert cc.meta["max_abs_reconstruction_error"] < atol
    # features from model.features(x) give the same numbers
    with torch.no_grad():
        f = model.features(x)
    cc2 = channel_contributions(f, model.classifier.weight, model.classifier.bias)
    # (batched convolutions may round differently from the full batch in float32)
    np.testing.assert_allclose(cc2.for_class(2), cc.for_class(2), rtol=0, atol=atol)
    np.testing.assert_allclose(cc2.for_class(2).sum(1), logits[:, 2] - b[2], rtol=0, atol=atol)


def _hand_case():
    # 3 images, 4 channels, 3 classes; contributions are hand-computable
    f = np.array([[1.0, 0.0, 2.0, 1.0],
                  [2.0, 1.0, 0.0, 1.0],
                  [0.0, 3.0, 1.0, 1.0]])
    W = np.array([[0.5, 1.0, -1.0, 0.1],
                  [2.0, -0.1, 0.0, 0.2],
                  [-3.0, 0.3, 4.0, 0.0]])
    b = np.array([0.1, 0.0, -0.5])
    labels = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], float)
    return f, W, b, labels


def test_top_channels_table():
    f, W, b, labels = _hand_case()
    cc = channel_contributions(f, W, b, ["A", "B", "C"], ["i0", "i1", "i2"], labels)
    # class A contributions: rows [0.5, 0, -2, 0.1], [1, 1, 0, 0.1], [0, 3, -1, 0.1]
    np.testing.assert_allclose(cc.mean(0), [0.5, 4 / 3, -1.0, 0.1])
    t = cc.top_channels("A", n=2, rule=TopKRule(k=1))
    assert t.channels() == [1, 0]
    row = t.rows[0]
    assert row.weight == 1.0 and row.mean_contribution == pytest.approx(4 / 3)
    # channel 1 is in an image's own top-2 for images 1 and 2 (image 0: channels 0 and 3)
    assert row.top_fraction == pytest.approx(2 / 3)
    # strongest |w| per row (TopKRule k=1): A -> ch2 (-1.0), B -> ch0 (+2.0), C -> ch2 (+4.0)
    assert t.rows[1].channel == 0 and t.rows[1].pushes == (("B", 2.0),)
    assert t.rows[1].pulls == ()
    neg = cc.top_channels("A", n=1, order="negative", rule=TopKRule(k=1))
    assert neg.channels() == [2] and neg.rows[0].pushes == (("C", 4.0),)
    assert t.mean_logit_minus_bias == pytest.approx(np.mean(cc.logits()[:, 0] - 0.1))
    # false positives of A (label 0, prob >= 0.5): logits A = -1.3, 2.2, 2.2 -> rows 1
    fp = cc.false_positives("A")
    assert fp.tolist() == [1]
    tfp = cc.top_channels("A", n=1, rows=fp, rows_desc="false positives")
    assert tfp.n_images == 1 and tfp.channels() == [0]  # tie with ch1 broken by index
    d = cc.to_dict(n=2)
    assert d["classes"]["A"]["n_false_positives"] == 1
    assert d["classes"]["A"]["all"]["rows"][0]["channel"] == 1
    frame = t.to_frame()
    assert list(frame["channel"]) == [1, 0]


def test_from_features_object():
    from medscalpel.engine.predict import Features

    f, W, b, labels = _hand_case()
    feats = Features(f.astype(np.float32), W.astype(np.float32), b.astype(np.float32), labels,
                     ("a", "b", "c"), ("A", "B", "C"), "multilabel")
    cc = channel_contributions_from_features(feats)
    np.testing.assert_allclose(cc.logits(), feats.logits(), atol=1e-6)
    assert cc.ids == ("a", "b", "c") and cc.class_names == ("A", "B", "C")


def test_channel_errors():
    f, W, b, labels = _hand_case()
    with pytest.raises(DataError, match="does not fit features with 4 channels"):
        channel_contributions(f, W[:, :3], b)
    with pytest.raises(DataError, match=r"bias of shape \(2,\)"):
        channel_contributions(f, W, b[:2])
    cc = channel_contributions(f, W, b, ["A", "B", "C"])
    with pytest.raises(ConfigError, match="Unknown class 'D'"):
        cc.top_channels("D")
    with pytest.raises(ConfigError, match="'order' parameter of top_channels"):
        cc.top_channels(0, order="biggest")
    with pytest.raises(DataError, match="needs labels"):
        cc.false_positives(0)
    with pytest.raises(DataError, match="no images selected"):
        cc.top_channels(0, rows=np.zeros(3, bool))
    with pytest.raises(ModelError, match="needs a MedClassifier"):
        channel_contributions_from_model(torch.nn.Linear(3, 2), torch.zeros(1, 3))
    model = create_model("vgg_tiny", num_classes=2, img_size=32)
    with pytest.raises(DataError, match="tensor or a CXRDataset"):
        channel_contributions_from_model(model, np.zeros((1, 1, 32, 32)))


def test_channel_bar_figure(tmp_path):
    from medscalpel.explain.figures import channel_bar_figure

    f, W, b, labels = _hand_case()
    cc = channel_contributions(f, W, b, ["A", "B", "C"])
    p = channel_bar_figure(cc.top_channels("A", n=4, order="abs"), tmp_path / "bars.png")
    assert p.stat().st_size > 5000
