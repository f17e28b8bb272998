"""Bulk inference on the served runtime (issue 31, item 3): whole batches, decoding worker
processes, logits streamed to disk, and the same Predictions as the in-process loop
(bit-identical logits for fp32 ONNX Runtime)."""

import json
import types

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medscalpel.cli.main import app
from medscalpel.deploy.serve import serve_metadata, write_serve
from medscalpel.deploy.runtimes import RUNTIMES
from medscalpel.deploy.served import load_served
from medscalpel.data import Preprocess, open_dataset
from medscalpel.data.phantom import generate_phantom
from medscalpel.engine.api import predict_spec
from medscalpel.engine.bulk import BulkSettings, bulk_predict, is_runtime_model
from medscalpel.engine.predict import predict
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import MedScalpelError
from medscalpel.models import create_model, make_card, save_model

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph") / "ph"
    generate_phantom(n=40, size=32, seed=5, progress=False, out=root)
    return f"phantom:{root}"


@pytest.fixture(scope="module")
def dense(phantom):
    ds = open_dataset(phantom, split="all")
    torch.manual_seed(0)
    m = create_model("densenet_tiny", ds.num_classes, 1, 32).eval()
    m.card = make_card(m, ds.class_names, ds.task, Preprocess(32))
    return m


@pytest.fixture(scope="module")
def served(dense, phantom, tmp_path_factory):
    """An fp32 ONNX Runtime serve/ folder written by deploy's own writer."""
    ds = open_dataset(phantom, split="all", preprocess=Preprocess(32))
    x = torch.stack([ds.image(i) for i in range(4)])
    dest = tmp_path_factory.mktemp("run") / "serve"
    rt = RUNTIMES.create("onnxruntime:fp32", threads=1)
    rt.prepare(dense, x[:1], x, dest.parent / "work")
    files = write_serve(dest, dense, types.SimpleNamespace(rt=rt), tuple(x.shape[1:]))
    variant = types.SimpleNamespace(runtime=rt.runtime, precision=rt.precision, name=rt.name,
                                    info=rt.info)
    (dest / "serve.json").write_text(json.dumps(
        serve_metadata(dense, tuple(x.shape[1:]), variant, files)))
    return dest


class CountingModel(torch.nn.Module):
    """Wraps a served model and records the batch sizes it is handed."""

    supports_gradients = False

    def __init__(self, inner):
        super().__init__()
        self.inner, self.card, self.num_classes = inner, inner.card, inner.num_classes
        self.in_chans, self.arch, self.sizes = inner.in_chans, inner.arch, []

    def provenance(self):
        return self.inner.provenance()

    def forward(self, x):
        self.sizes.append(int(x.shape[0]))
        return self.inner(x)


def test_served_fp32_bulk_is_bit_identical_to_the_loop(served, phantom):
    m = load_served(served, threads=1)
    ds = open_dataset(phantom, split="all", preprocess=m.card.preprocess)
    ref = predict(m, ds, batch_size=1)   # the unbatched path: one image per call
    counted = CountingModel(m)
    got = bulk_predict(counted, ds, batch_size=8, workers=2, chunk=10)
    assert is_runtime_model(m) and is_runtime_model(counted)
    assert np.array_equal(got.logits, ref.logits) and got.logits.dtype == np.float32
    assert got.ids == ref.ids and np.array_equal(got.labels, ref.labels)
    assert (got.class_names, got.task, got.split, got.model_id) == \
        (ref.class_names, ref.task, ref.split, ref.model_id)
    assert got.meta["dataset_hash"] == ref.meta["dataset_hash"]
    # whole batches of 8 (the last one holds the rest), in order
    assert counted.sizes == [8] * (len(ds) // 8) + ([len(ds) % 8] if len(ds) % 8 else [])
    b = got.meta["bulk"]
    assert b["workers"] == 2 and b["batch_size"] == 8 and b["batches"] == len(counted.sizes)
    assert b["model"] == "served onnxruntime:fp32" and b["images_per_s"] > 0


def test_bulk_torch_model_sets_and_restores_threads(dense, phantom):
    ds = open_dataset(phantom, split="all", preprocess=dense.card.preprocess)
    ref = predict(dense, ds, batch_size=16)
    before = torch.get_num_threads()
    got = bulk_predict(dense, ds, batch_size=16, workers=0, threads=1)
    assert torch.get_num_threads() == before
    assert np.array_equal(got.logits, ref.logits)
    assert got.meta["bulk"]["threads"] == 1 and got.meta["bulk"]["model"] == "torch eager"


def test_bulk_logits_round_trip_the_predictions_file(served, phantom, tmp_path):
    m = load_served(served)
    ds = open_dataset(phantom, split="all", preprocess=m.card.preprocess)
    got = bulk_predict(m, ds, batch_size=7, workers=1, workdir=tmp_path)
    assert list(tmp_path.iterdir()) == []   # the streamed shard is removed
    back = Predictions.load(got.save(tmp_path / "p.npz"))
    assert np.array_equal(back.logits, got.logits) and back.meta["bulk"]["batch_size"] == 7


@pytest.mark.parametrize("kw, match", [({"batch_size": 0}, "batch_size"),
                                       ({"workers": -1}, "workers"),
                                       ({"threads": 0}, "threads")])
def test_bulk_refuses_bad_settings(dense, phantom, kw, match):
    ds = open_dataset(phantom, split="all", preprocess=dense.card.preprocess)
    with pytest.raises((MedScalpelError, ValueError), match=match):
        bulk_predict(dense, ds, **{"batch_size": 4, **kw})


def test_predict_spec_bulk_path_matches_the_default_path(served, phantom):
    m = load_served(served)
    ref = predict_spec(m, phantom, "test", batch_size=5)
    got = predict_spec(m, phantom, "test", bulk=BulkSettings(batch_size=5, workers=1))
    assert np.array_equal(got.logits, ref.logits) and got.ids == ref.ids
    assert got.meta["artifact"]["runtime"] == "onnxruntime" and "bulk" not in ref.meta
    assert got.meta["n_used"] == ref.meta["n_used"] and got.meta["bulk"]["batch_size"] == 5


def test_cli_predict_on_a_served_folder_uses_the_bulk_path(served, dense, phantom, tmp_path):
    out = tmp_path / "pred"
    res = CliRunner().invoke(app, ["predict", "--model", str(served.parent), "--data", phantom,
                                   "--split", "all", "--out", str(out), "--batch-size", "16",
                                   "--threads", "1", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "bulk:" in res.output and "images/s" in res.output
    preds = Predictions.load(out / "predictions.npz")
    ds = open_dataset(phantom, split="all", preprocess=dense.card.preprocess)
    ref = predict(load_served(served), ds, batch_size=16)
    assert np.array_equal(preds.logits, ref.logits)
    assert preds.meta["bulk"] == {**preds.meta["bulk"], "batch_size": 16, "workers": 1,
                                  "threads": 1}
    bad = CliRunner().invoke(app, ["predict", "--model", str(served.parent), "--data", phantom,
                                   "--out", str(tmp_path / "bad"), "--workers", "-2"])
    # a ConfigError: the console entry point prints one 'error:' line and exits 2
    assert isinstance(bad.exception, MedScalpelError) and "'--workers'" in str(bad.exception)


def test_torch_model_dir_keeps_the_default_path(dense, phantom, tmp_path):
    save_model(dense, tmp_path / "m", dense.card)
    out = tmp_path / "pred"
    res = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "m"), "--data", phantom,
                                   "--split", "all", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "bulk" not in Predictions.load(out / "predictions.npz").meta
