"""External validation: hand-computed numbers on tiny Predictions, class (mis)matching, the
compression-under-shift comparison, the reliability figure and the ``evaluate --external`` CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from medscalpel.cli.main import app
from medscalpel.data import Preprocess
from medscalpel.engine.external import (ExternalValidation, compression_shift,
                                        external_validation, map_class_names, plot_reliability,
                                        weighted_ece)
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError

runner = CliRunner()


def sig(z):
    return 1 / (1 + np.exp(-np.asarray(z, float)))


def ml(logits, labels, ids, names=("x",), split="test", meta=None):
    return Predictions(np.asarray(logits, np.float32), np.asarray(labels, np.float32),
                       ids=tuple(ids), class_names=names, task="multilabel", split=split,
                       meta=meta or {})


INT = ml([[2.], [-1.], [0.5], [-2.]], [[1.], [0.], [1.], [0.]], "abcd")
EXT = ml([[2.], [1.], [-0.5], [-2.]], [[1.], [0.], [1.], [0.]], "efgh", split="all")


def test_hand_computed_values_at_default_and_stored_thresholds():
    r = external_validation(None, INT, EXT, n_boot=0)
    assert r.threshold_source == "default 0.5" and r.thresholds == (0.5,)
    c = r.classes[0]
    i, e = c["internal"], c["external"]
    assert (i["auroc"], i["sensitivity"], i["specificity"], i["f1"]) == (1.0, 1.0, 1.0, 1.0)
    # external: positives score 2, -0.5; negatives 1, -2 -> 3 of 4 pairs ordered
    assert e["auroc"] == 0.75 and e["ap"] == pytest.approx((1 + 2 / 3) / 2)
    assert (e["sensitivity"], e["specificity"], e["f1"]) == (0.5, 0.5, 0.5)
    p = sig([2, 1, -0.5, -2])  # one image per ECE bin: ECE = mean |p - y|
    assert e["ece"] == pytest.approx(np.mean(np.abs(p - [1, 0, 1, 0])), abs=1e-6)
    assert i["ece"] == pytest.approx(np.mean(np.abs(sig([2, -1, 0.5, -2]) - [1, 0, 1, 0])),
                                     abs=1e-6)
    assert c["delta"]["auroc"]["value"] == -0.25 and c["delta"]["specificity"]["value"] == -0.5
    assert r.macro["delta"]["sensitivity"]["value"] == -0.5
    assert np.isnan(c["delta"]["auroc"]["ci"][0])  # n_boot=0: no CI
    card = SimpleNamespace(thresholds=[0.8])  # a stored operating point
    r2 = external_validation(card, INT, EXT, n_boot=0)
    e2 = r2.classes[0]["external"]
    assert r2.threshold_source == "model card" and e2["threshold"] == 0.8
    assert (e2["sensitivity"], e2["specificity"]) == (0.5, 1.0)  # p=0.73 negative now
    assert r2.classes[0]["internal"]["sensitivity"] == 0.5  # p(0.5)=0.62 < 0.8
    assert external_validation(None, INT, EXT, thresholds=[0.7], n_boot=0).threshold_source \
        == "given"
    with pytest.raises(ConfigError, match="one probability per class \\(1\\). Got 2"):
        external_validation(None, INT, EXT, thresholds=[0.5, 0.5], n_boot=0)


def test_weighted_ece_equals_binned_definition():
    rng = np.random.default_rng(0)
    p, y = rng.random(200), rng.random(200) < 0.4
    idx = np.minimum((p * 10).astype(int), 9)
    want = sum(abs(p[idx == b].mean() - y[idx == b].mean()) * (idx == b).sum()
               for b in range(10) if (idx == b).any()) / 200
    assert weighted_ece(y, p, np.ones((1, 200)))[0] == pytest.approx(want)
    w = np.zeros((1, 200))
    w[0, :50] = 2.0  # weights = duplicating rows
    sub = weighted_ece(y[:50], p[:50], np.ones((1, 50)))[0]
    assert weighted_ece(y, p, w)[0] == pytest.approx(sub)


def test_bootstrap_cis_unpaired_and_split_warning_note():
    rng = np.random.default_rng(1)
    n = 400
    y = (rng.random((n, 2)) < 0.3).astype(np.float32)
    a = ml(y * 2.0 + rng.normal(0, 1, (n, 2)), y, [f"i{k}" for k in range(n)], ("a", "b"),
           meta={"split_unit": {"unit": "image", "n_images": n}, "split": "test"})
    b = ml(y * 1.0 + rng.normal(0, 1, (n, 2)) + 0.8, y, [f"e{k}" for k in range(n)], ("a", "b"),
           split="all")
    r = external_validation(None, a, b, n_boot=300, seed=3)
    for c in r.classes:
        for side in ("internal", "external"):
            lo, hi = c[side]["auroc_ci"]
            assert lo < c[side]["auroc"] < hi
        d = c["delta"]["auroc"]
        assert d["ci"][0] < d["value"] < d["ci"][1] < 0  # weaker separation outside: a real drop
        wi = np.diff(c["internal"]["auroc_ci"])[0]
        assert np.diff(d["ci"])[0] > wi  # unpaired: wider than one side alone
        assert c["delta"]["specificity"]["ci"][1] < 0  # the +0.8 logit shift costs specificity
    assert any("split by IMAGE" in n for n in r.notes)
    again = ExternalValidation.from_dict(r.to_dict())
    assert again == r or again.to_dict() == r.to_dict()
    with pytest.raises(DataError, match="external-validation result"):
        ExternalValidation.from_dict({"schema_version": 99})


def test_multiclass_binary_threshold_and_argmax():
    logits = np.array([[0., 1.], [0., -1.], [0., 0.3], [0., -0.3], [0., 2.]], np.float32)
    lab = np.array([1, 0, 0, 0, 1])
    a = Predictions(logits, lab, ids=tuple("abcde"), class_names=("NORMAL", "PNEUMONIA"),
                    task="multiclass")
    r = external_validation(SimpleNamespace(thresholds=None), a, a, n_boot=0)
    assert r.decision.startswith("binary") and r.threshold_source == "default 0.5"
    pn = r.classes[1]["internal"]
    assert (pn["sensitivity"], pn["specificity"]) == (1.0, 2 / 3)  # 0.3 -> p=0.57 positive
    r2 = external_validation(None, a, a, thresholds=[0.5, 0.6], n_boot=0)
    assert r2.classes[1]["internal"]["specificity"] == 1.0
    assert r2.classes[0]["internal"]["sensitivity"] == 1.0  # NORMAL = not PNEUMONIA
    assert r.macro["internal"]["accuracy"] == 0.8
    three = Predictions(np.eye(3, dtype=np.float32)[[0, 1, 2, 1]], np.array([0, 1, 2, 2]),
                        ids=tuple("abcd"), class_names=("x", "y", "z"), task="multiclass")
    r3 = external_validation(None, three, three, n_boot=0)
    assert r3.decision == "argmax" and r3.classes[2]["internal"]["sensitivity"] == 0.5


def test_class_mismatch_error_and_class_map():
    names = ("a", "b")
    rng = np.random.default_rng(0)
    y = (rng.random((30, 2)) < 0.5).astype(np.float32)
    z = rng.normal(0, 1, (30, 2)) + 2 * y
    internal = ml(z, y, [f"i{k}" for k in range(30)], names)
    renamed = ml(z[:, ::-1], y[:, ::-1], [f"e{k}" for k in range(30)], ("B_ext", "a"))
    with pytest.raises(DataError, match=r"model classes missing there \['b'\], classes there the "
                                        r"model does not predict \['B_ext'\].*class_map"):
        external_validation(None, internal, renamed, n_boot=0)
    mapped = external_validation(None, internal, renamed, class_map={"B_ext": "b"}, n_boot=0)
    same = external_validation(None, internal,
                               ml(z, y, [f"e{k}" for k in range(30)], names), n_boot=0)
    assert json.dumps(mapped.classes[1]["external"]) == json.dumps(same.classes[1]["external"])
    assert any("mapped" in n for n in mapped.notes)
    with pytest.raises(ConfigError, match="'class_map' keys \\['nope'\\]"):
        map_class_names(["a"], ["a"], {"nope": "a"})
    with pytest.raises(DataError, match="classes there the model does not predict \\['COVID'\\]"):
        map_class_names(["NORMAL", "COVID", "PNEUMONIA"], ["NORMAL", "PNEUMONIA"],
                        task="multiclass")
    assert map_class_names(["x", "A", "extra"], ["A", "x"]) == [1, 0]  # multi-label: extra ignored


def test_compression_shift_flags_a_class_that_degrades_only_externally():
    rng = np.random.default_rng(2)
    n = 300

    def pair(noise_b):
        y = (rng.random((n, 2)) < 0.4).astype(np.float32)
        z = 3 * y + rng.normal(0, 1, (n, 2))
        ids = [f"{rng.integers(1e9)}_{k}" for k in range(n)]
        comp = z.copy()
        comp[:, 1] += rng.normal(0, noise_b, n)
        return ml(z, y, ids, ("a", "b")), ml(comp, y, ids, ("a", "b"))

    di, ci = pair(0.0)
    de, ce = pair(3.0)
    s = compression_shift(di, ci, de, ce, n_boot=200, seed=0)
    assert s.classes[0]["auroc"]["extra"] == pytest.approx(0.0)
    assert not s.classes[0]["auroc"]["loses_more_externally"]
    b = s.classes[1]["auroc"]
    assert b["internal_delta"] == 0.0 and b["external_delta"] < -0.05
    assert b["loses_more_externally"] and b["extra_ci"][1] < 0
    assert type(s).from_dict(s.to_dict()).classes == s.classes


def test_reliability_png(tmp_path):
    r = external_validation(None, INT, EXT, n_boot=0)
    path = plot_reliability(r, tmp_path / "rel.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def tiny_model(tmp_path):
    import torch

    from medscalpel.data import open_dataset
    from medscalpel.models.checkpoint import make_card, save_model
    from medscalpel.models.zoo import create_model

    torch.manual_seed(0)
    names = open_dataset("phantom?n=60&size=32&seed=0", "all", Preprocess(size=32)).class_names
    m = create_model("resnet_tiny", num_classes=len(names), in_chans=1, img_size=32)
    card = make_card(m, names, "multilabel", Preprocess(size=32),
                     training={"data": "phantom?n=60&size=32&seed=0"})
    return save_model(m, tmp_path / "model", card)


def test_cli_predict_and_evaluate_external_round_trip(tmp_path, tiny_model):
    res = runner.invoke(app, ["predict", "--model", str(tiny_model), "--data",
                              "phantom?n=60&size=32&seed=0", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())  # rich wraps long lines
    internal = Predictions.load(tmp_path / "p")
    assert internal.split == "test" and "held-out 'test' split" in out
    assert f"used {internal.n} of 60 images" in out
    res = runner.invoke(app, ["evaluate", str(tmp_path / "p"), "--model", str(tiny_model),
                              "--external", "phantom?n=40&size=32&seed=5", "--n-boot", "20",
                              "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "external set: used 40 of 40 images" in out and "every image ('all')" in out
    r = ExternalValidation.load(tmp_path / "ev")
    assert r.internal["n"] == internal.n and r.external["n"] == 40
    assert r.threshold_source == "default 0.5" and (tmp_path / "ev" / "reliability.png").is_file()
    ext = Predictions.load(tmp_path / "ev" / "external_predictions.npz")
    assert ext.split == "all" and ext.meta["n_total"] == 40
    bad = runner.invoke(app, ["evaluate", str(tmp_path / "p"), "--external", "phantom?n=40"])
    assert bad.exit_code != 0 and "needs --model" in str(bad.exception)
