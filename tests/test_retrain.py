"""Partial retraining: classifier fine-tune, F re-optimization, last block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medscalpel.engine.predict import Features
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.repair.retrain import (finetune_classifier, finetune_last_block,
                                       last_block_parameters, reoptimize_classifier)


def split(n, seed, shift=0):
    """Class a depends on channels 0-1, class b on channel 2; the starting classifier is wrong
    for class a (weights on noise channels)."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 8)).astype(np.float32) * 2 + 3
    ya = (f[:, 0] + f[:, 1] > 6 + rng.normal(0, 0.5, n)).astype(np.float32)
    yb = (f[:, 2] > 3).astype(np.float32)
    w = np.zeros((2, 8), np.float32)
    w[0, 5:8] = 1.0
    w[1, 2] = 1.0
    b = np.array([-9.0, -3.0], np.float32)
    return Features(f, w, b, np.stack([ya, yb], 1), tuple(f"s{seed}_{i}" for i in range(n)),
                    ("a", "b"), "multilabel", f"split{seed}")


def test_finetune_improves_held_out_auroc_and_freezes_other_rows():
    tr, va, te = split(400, 0), split(200, 1), split(300, 2)
    r = finetune_classifier(tr, va, te, classes=["a"], steps=200, lr=0.05, progress=False)
    assert r.auroc_before["a"] < 0.7 and r.auroc_after["a"] > 0.9
    assert np.array_equal(r.weight[1], tr.weight[1]) and r.bias[1] == tr.bias[1]
    assert r.auroc_after["b"] == r.auroc_before["b"]
    assert r.trainable_params == 9 and r.seconds > 0
    assert r.to_dict()["macro_auroc_after"] > r.to_dict()["macro_auroc_before"]


def test_reoptimize_improves_held_out_auroc_and_is_exact_in_original_space():
    tr, va, te = split(400, 0), split(200, 1), split(300, 2)
    r = reoptimize_classifier(tr, va, te, progress=False)
    assert r.auroc_after["a"] > 0.9
    assert set(r.settings["chosen_C"]) == {"a", "b"}
    # the folded standardisation reproduces scikit-learn's decision function
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(tr.features.astype(np.float64))
    clf = LogisticRegression(C=r.settings["chosen_C"]["a"], max_iter=500).fit(
        sc.transform(tr.features.astype(np.float64)), tr.labels[:, 0] > 0.5)
    ours = te.features.astype(np.float64) @ r.weight[0].astype(np.float64) + r.bias[0]
    ref = clf.decision_function(sc.transform(te.features.astype(np.float64)))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


def test_reoptimize_without_val_and_multiclass():
    tr, te = split(300, 0), split(200, 2)
    lab = (tr.labels[:, 0] + 2 * tr.labels[:, 1]).astype(np.int64) % 2
    mc = Features(tr.features, tr.weight, tr.bias, lab, tr.ids, ("a", "b"), "multiclass")
    r = reoptimize_classifier(mc, Cs=(0.1, 1.0), progress=False)
    assert r.settings["selected_on"] == "20% of train" and r.weight.shape == (2, 8)
    with pytest.raises(ConfigError, match="'classes' must be None"):
        reoptimize_classifier(mc, classes=["a"], progress=False)


def test_with_model_and_save(tmp_path):
    from medscalpel.data.transforms import Preprocess
    from medscalpel.models.checkpoint import load_model, make_card
    from medscalpel.models.zoo import create_model

    model = create_model("vgg_tiny", 2, img_size=32)
    model.classifier = torch.nn.Linear(8, 2)
    model.card = make_card(model, ["a", "b"], "multilabel", Preprocess(size=32))
    tr = split(200, 0)
    w0 = model.classifier.weight.detach().clone()
    r = finetune_classifier(tr, steps=20, model=model, progress=False)
    assert torch.equal(model.classifier.weight, w0)
    r.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.card.lineage[-1]["method"] == "classifier_finetune"
    np.testing.assert_allclose(loaded.classifier.weight.detach().numpy(), r.weight)


def test_last_block_finetune_trains_only_the_last_block():
    from medscalpel.data.base import ArrayDataset
    from medscalpel.data.transforms import Preprocess
    from medscalpel.models.zoo import create_model

    rng = np.random.default_rng(0)
    img = rng.random((16, 32, 32)).astype(np.float32)
    lab = (rng.random((16, 2)) < 0.5).astype(np.float32)
    ds = ArrayDataset(img, lab, ["a", "b"], "multilabel", preprocess=Preprocess(size=32))
    model = create_model("resnet_tiny", 2, img_size=32)
    names = last_block_parameters(model)
    assert all(n.startswith(("backbone.layer4", "classifier")) for n in names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = finetune_last_block(model, ds, epochs=1, batch_size=8, lr=1e-2, device="cpu",
                            progress=False)
    after = r.model.state_dict()
    changed = {k for k in before if before[k].is_floating_point()
               and not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("backbone.layer4", "classifier")) for k in changed)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r.trainable_params < model.num_parameters()
    with pytest.raises(ModelError, match="no parameter under 'backbone.nope'"):
        last_block_parameters(model, "backbone.nope")


def test_errors():
    tr = split(50, 0)
    with pytest.raises(ConfigError, match="'steps' parameter of finetune_classifier"):
        finetune_classifier(tr, steps=0)
    with pytest.raises(DataError, match="must be a Features"):
        finetune_classifier(tr.to_predictions())
    with pytest.raises(ConfigError, match="unknown class 'zz'"):
        finetune_classifier(tr, classes=["zz"])
    with pytest.raises(ConfigError, match="'select' parameter of reoptimize_classifier"):
        reoptimize_classifier(tr, select="acc")


def test_features_command_feeds_retrain_and_predictions_are_refused(tmp_path, capsys):
    """'medscalpel features' writes the Features file 'repair retrain' reads; a Predictions
    file given to retrain is one clean error naming that command (no KeyError)."""
    import sys
    from pathlib import Path

    from medscalpel.cli.main import run

    sys.path.insert(0, str(Path(__file__).parent))
    from test_cli_bad_input import save_tiny_model, write_csv_dataset

    spec = write_csv_dataset(tmp_path / "data", n=16)
    model = save_tiny_model(spec, tmp_path / "model")
    for split in ("train", "test"):
        with pytest.raises(SystemExit) as ex:
            run(["features", "--model", str(model), "--data", spec, "--split", split, "--out",
                 str(tmp_path / f"{split}.npz")])
        assert ex.value.code == 0, capsys.readouterr().err
    f = Features.load(tmp_path / "train.npz")
    assert f.features.shape[0] == 8 and f.class_names == ("a", "b", "c")
    # logits == features @ W.T + b: the file holds what the classifier sees
    from medscalpel.engine.api import predict_spec

    preds = predict_spec(model, spec, "train", 8)
    np.testing.assert_allclose(f.features @ f.weight.T + f.bias, preds.logits, atol=1e-4)
    preds.save(tmp_path / "preds.npz")
    with pytest.raises(SystemExit) as ex:
        run(["repair", "retrain", str(tmp_path / "preds.npz"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "is a Predictions file" in err and "medscalpel features" in err
    with pytest.raises(SystemExit) as ex:
        run(["repair", "retrain", str(tmp_path / "train.npz"), "--held-out",
             str(tmp_path / "test.npz"), "--steps", "20", "--out", str(tmp_path / "r")])
    assert ex.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "r").is_dir()
