import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from medscalpel.data import ArrayDataset, Preprocess
from medscalpel.engine.metrics import auroc, average_precision, evaluate
from medscalpel.engine.predict import extract_features, predict
from medscalpel.engine.predictions import Predictions
from medscalpel.engine.train import TrainConfig, train
from medscalpel.errors import ConfigError, DataError, ModelError, RunError
from medscalpel.models import create_model


def _toy(n=96, size=32, seed=0, k=3):
    rng = np.random.default_rng(seed)
    imgs = (rng.random((n, size, size)) * 80).astype(np.uint8)
    labels = np.zeros((n, k), np.float32)
    labels[:, 0] = rng.random(n) < 0.4
    labels[:, 1] = rng.random(n) < 0.3
    imgs[labels[:, 0] > 0, 4:12, 4:12] += 150
    imgs[labels[:, 1] > 0, 20:28, 20:28] += 150
    names = ["a", "b", "c"][:k]
    return ArrayDataset(imgs, labels, names, "multilabel", preprocess=Preprocess(size=size))


def test_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(5, 80))
        y = rng.random(n) < 0.35
        if y.all() or not y.any():
            continue
        s = np.round(rng.random(n), 2)
        assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_evaluate_thresholds_and_nan_class():
    logits = np.array([[2.0, 0.1], [-1.0, 0.3], [0.5, -0.2], [-2.0, 0.0]], np.float32)
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], np.float32)
    p = Predictions(logits, labels, ("a", "b", "c", "d"), ("x", "y"), "multilabel", split="val")
    res = evaluate(p, thresholds=[0.7, 0.5], n_boot=0)
    x, y = res.classes
    assert x.auroc == 1.0
    # threshold 0.7 -> sigmoid(0.5)=0.62 is negative: one TP of two
    assert x.sensitivity == 0.5 and x.specificity == 1.0
    assert x.f1 == pytest.approx(f1_score([1, 0, 1, 0], [1, 0, 0, 0]))
    assert np.isnan(y.auroc) and "no positive images of 'y'" in y.reason
    assert res.macro["auroc"] == 1.0 and res.macro["n_classes_scored"] == 1
    with pytest.raises(ConfigError, match="3 thresholds given for 2 classes"):
        evaluate(p, thresholds=[0.5, 0.5, 0.5], n_boot=0)


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    ds = _toy(200)
    rng = np.random.default_rng(0)
    logits = ds.labels * 2 + rng.normal(0, 1.5, ds.labels.shape)
    p = Predictions(logits, ds.labels, ds.ids, ds.class_names, "multilabel")
    r1, r2 = evaluate(p, n_boot=100, seed=3), evaluate(p, n_boot=100, seed=3)
    c = r1.classes[0]
    assert c.auroc_ci[0] <= c.auroc <= c.auroc_ci[1]
    from medscalpel.runs import dumps_json
    assert dumps_json(r1.to_dict()) == dumps_json(r2.to_dict())


def test_multiclass_metrics():
    logits = np.array([[3, 0, 0], [0, 3, 0], [0, 0, 3], [3, 0, 0]], np.float32)
    p = Predictions(logits, np.array([0, 1, 2, 1]), list("abcd"), ("n", "p", "c"), "multiclass")
    res = evaluate(p, n_boot=0)
    assert res.macro["accuracy"] == 0.75
    assert res.classes[0].sensitivity == 1.0 and res.classes[1].sensitivity == 0.5


def test_train_then_evaluate_learns(tmp_path):
    ds = _toy(128)
    m = create_model("densenet_tiny", 3, 1, 32)
    before = evaluate(predict(m, ds, progress=False), n_boot=0).macro["auroc"]
    r = train(m, ds, ds, TrainConfig(epochs=3, batch_size=32, lr=3e-3), progress=False)
    ev = evaluate(predict(r.model, ds, progress=False), n_boot=0)
    assert ev.macro["auroc"] > 0.75 and ev.macro["auroc"] > before + 0.15
    assert ev.classes[2].reason  # class c has no positives
    assert r.best_epoch >= 1 and len(r.history) == 3
    # the caller's model is untouched
    assert not torch.equal(m.classifier.weight, r.model.classifier.weight)


def test_train_resume_equals_uninterrupted(tmp_path):
    from medscalpel.engine.train import default_loss

    ds = _toy(64)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=2e-3, patience=5)

    def fresh():
        torch.manual_seed(0)
        return create_model("vgg_tiny", 3, 1, 32)

    full = train(fresh(), ds, ds, cfg, progress=False)
    ck = tmp_path / "ck"
    base = default_loss("multilabel", None)
    calls = {"n": 0}

    class Killed(Exception):
        pass

    def dying_loss(logits, targets, images):  # dies in the middle of epoch 3
        calls["n"] += 1
        if calls["n"] == 4 * 2 + 2:  # 4 steps per epoch
            raise Killed()
        return base(logits, targets, images)

    with pytest.raises(Killed):
        train(fresh(), ds, ds, cfg, checkpoint_dir=ck, loss_fn=dying_loss, progress=False)
    resumed = train(fresh(), ds, ds, cfg, checkpoint_dir=ck, progress=False)
    assert resumed.resumed_from == 2
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(
        [h["train_loss"] for h in full.history], rel=1e-6)
    assert torch.equal(resumed.model.classifier.weight, full.model.classifier.weight)
    other = _toy(64, seed=5)
    with pytest.raises(RunError, match="different model, dataset"):
        train(fresh(), other, other, cfg, checkpoint_dir=ck, progress=False)


def test_determinism_bit_identical_predictions():
    ds = _toy(48)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = create_model("resnet_tiny", 3, 1, 32)
        r = train(m, ds, None, TrainConfig(epochs=1, batch_size=16, seed=7), progress=False)
        outs.append(predict(r.model, ds, progress=False).logits)
    assert np.array_equal(outs[0], outs[1])


def test_features_identity():
    ds = _toy(20)
    m = create_model("densenet_tiny", 3, 1, 32)
    f = extract_features(m, ds, progress=False)
    p = predict(m, ds, progress=False)
    assert np.allclose(f.logits(), p.logits, atol=1e-5)


def test_mismatched_model_and_data():
    ds = _toy(8)
    with pytest.raises(ModelError, match="predicts 4 classes but dataset"):
        predict(create_model("vgg_tiny", 4, 1, 32), ds)
    with pytest.raises(ModelError, match="takes 3 input channel"):
        predict(create_model("vgg_tiny", 3, 3, 32), ds)


def test_empty_split_error():
    ds = _toy(8).subset([], split="val")
    with pytest.raises(DataError, match="'val' split .* is empty"):
        predict(create_model("vgg_tiny", 3, 1, 32), ds)


def test_predictions_roundtrip(tmp_path):
    p = Predictions(np.random.randn(3, 2), np.array([[1, 0], [0, np.nan], [1, 1]]), ["a", "b", "c"],
                    ["x", "y"], "multilabel", split="test", model_id="m", meta={"k": 1})
    path = p.save(tmp_path / "p.npz")
    q = Predictions.load(path)
    assert np.array_equal(p.logits, q.logits) and np.array_equal(p.labels, q.labels,
                                                                    equal_nan=True)
    assert q.ids == p.ids and q.meta == {"k": 1}
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a medscalpel Predictions file"):
        Predictions.load(tmp_path / "bad.npz")


def test_import_reference_predictions_reproduces_aucs(shared_data):
    from medscalpel.engine.importer import import_predictions

    ref = shared_data / "chexnet-reference-predictions"
    preds = import_predictions(ref / "preds.csv",
                               f"nih:{shared_data / 'nih14-labels'}?labels_only=true")
    assert preds.n == 22433
    res = evaluate(preds, n_boot=0)
    aucs = pd.read_csv(ref / "aucs.csv")
    for c, (_, row) in zip(res.classes, aucs.iterrows()):
        assert c.name == row["label"]
        assert round(c.auroc, 3) == round(row["auc"], 3)


def test_import_errors(tmp_path, shared_data):
    from medscalpel.engine.importer import import_predictions

    bad = tmp_path / "p.csv"
    bad.write_text("id,Atelectasis\nx,0.5\n")
    spec = f"nih:{shared_data / 'nih14-labels'}?labels_only=true"
    with pytest.raises(DataError, match="no id column 'Image Index'"):
        import_predictions(bad, spec)
    bad.write_text("Image Index,Atelectasis\nx,0.5\n")
    with pytest.raises(DataError, match="no column for class 'Cardiomegaly'"):
        import_predictions(bad, spec)
