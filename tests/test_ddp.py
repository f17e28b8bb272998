"""DDP over gloo with 2 CPU processes: the same optimisation as one process at equal global
batch (vit_test: LayerNorm only, so no batch-statistics dependence)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medscalpel.data import ArrayDataset, Preprocess
from medscalpel.engine.distributed import DDPSettings, global_batches, shard, train_ddp
from medscalpel.engine.predict import predict
from medscalpel.engine.train import TrainConfig, train
from medscalpel.errors import ConfigError
from medscalpel.models import create_model

#: stated tolerance (docs/reliability.md): per-epoch / per-step global loss, and final logits
LOSS_TOL = 1e-5
LOGIT_TOL = 1e-3


def _data(n=48, size=32, seed=0):
    rng = np.random.default_rng(seed)
    imgs = (rng.random((n, size, size)) * 80).astype(np.uint8)
    y = (rng.random((n, 3)) < [0.4, 0.3, 0.5]).astype(np.float32)
    y[3, 2] = np.nan  # unknown labels: the masked BCE must still average over the global batch
    y[10, 0] = np.nan
    imgs[y[:, 0] == 1, 4:12, 4:12] += 150
    imgs[y[:, 1] == 1, 20:28, 20:28] += 150
    ds = ArrayDataset(imgs, y, ["a", "b", "c"], "multilabel", preprocess=Preprocess(size=size))
    return ds, ds.subset(range(0, n, 3), split="val")


CFG = TrainConfig(epochs=3, batch_size=16, lr=3e-3, seed=0, device="cpu", patience=5)


def test_global_batches_are_shared_without_overlap():
    b = global_batches(48, CFG, epoch=1)
    assert len(b) == 3 and all(len(x) == 16 for x in b)
    assert sorted(i for x in b for i in x) == list(range(48))
    parts = [shard(b[0], r, 2) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(b[0]) and not set(parts[0]) & set(parts[1])
    assert global_batches(48, CFG, 1) == b and global_batches(48, CFG, 2) != b


def test_two_processes_match_one_process():
    ds, val = _data()
    torch.manual_seed(0)
    model = create_model("vit_test", 3, 1, 32)
    one = train(model, ds, val, CFG, progress=False)
    two = train_ddp(model, ds, val, CFG, world_size=2, progress=False)
    ref = train_ddp(model, ds, val, CFG, world_size=1, progress=False)
    l1 = np.array([h["train_loss"] for h in one.history])
    l2 = np.array([h["train_loss"] for h in two.history])
    assert np.abs(l1 - l2).max() < LOSS_TOL
    assert l1[-1] < l1[0]  # it did learn
    # step by step: 2 processes x 8 images vs 1 process x 16
    s1, s2 = np.concatenate(ref.extra["step_losses"]), np.concatenate(two.extra["step_losses"])
    assert s1.shape == s2.shape == (9,) and np.abs(s1 - s2).max() < LOSS_TOL
    assert [h["val_auroc"] for h in one.history] == pytest.approx(
        [h["val_auroc"] for h in two.history], abs=1e-6)
    assert one.best_epoch == two.best_epoch
    p1 = predict(one.model, val, progress=False).logits
    p2 = predict(two.model, val, progress=False).logits
    assert np.abs(p1 - p2).max() < LOGIT_TOL
    assert two.extra["ddp"]["world_size"] == 2 and two.extra["ddp"]["batch_norm"] == "local"
    # the caller's model is untouched
    assert torch.equal(next(model.parameters()), next(create_model_like(model).parameters()))


def create_model_like(model):
    torch.manual_seed(0)
    return create_model("vit_test", 3, 1, 32)


class CrashOnce:
    """The default masked BCE, but the process dies at step ``at`` of the first run only
    (a marker file remembers that it crashed once): a run interrupted midway."""

    def __init__(self, marker, at):
        self.marker, self.at, self.calls = marker, at, 0

    def __call__(self, logits, targets, images):
        from medscalpel.engine.train import default_loss

        self.calls += 1
        if self.calls > self.at and not self.marker.exists():
            self.marker.write_text("crashed")
            raise RuntimeError("simulated crash")
        return default_loss("multilabel", None)(logits, targets, images)


def test_ddp_resumes_per_epoch(tmp_path):
    from medscalpel.errors import RunError

    ds, val = _data()
    torch.manual_seed(0)
    model = create_model("vit_test", 3, 1, 32)
    ck = tmp_path / "ck"
    crash = CrashOnce(tmp_path / "marker", at=7)  # 3 steps per epoch: dies in epoch 3
    # one rank crashes; whichever failure reaches the caller first (the crash itself, or the
    # other rank losing its peer) is reported as a RunError naming the rank
    with pytest.raises(RunError, match=r"simulated crash|DDP rank \d failed"):
        train_ddp(model, ds, val, CFG, world_size=2, checkpoint_dir=ck, loss_fn=crash,
                  progress=False)
    assert (ck / "state.json").is_file()
    rest = train_ddp(model, ds, val, CFG, world_size=2, checkpoint_dir=ck, loss_fn=crash,
                     progress=False)
    full = train_ddp(model, ds, val, CFG, world_size=2, loss_fn=crash, progress=False)
    assert rest.resumed_from == 2 and len(rest.extra["step_losses"]) == 1
    assert [h["train_loss"] for h in rest.history] == [h["train_loss"] for h in full.history]
    for a, b in zip(rest.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)
    # a different world size is another run: refused, not mixed
    with pytest.raises(RunError, match="different model, dataset or configuration"):
        train_ddp(model, ds, val, CFG, world_size=1, checkpoint_dir=ck, loss_fn=crash,
                  progress=False)


def _nan_loss(logits, targets, images):
    return logits.sum() * float("nan")


def test_ddp_errors_are_clean():
    ds, val = _data()
    model = create_model("vit_test", 3, 1, 32)
    with pytest.raises(ConfigError, match="GLOBAL batch and must be a multiple of world_size=2"):
        train_ddp(model, ds, None, TrainConfig(batch_size=15, device="cpu"), world_size=2)
    with pytest.raises(ConfigError, match="cannot be 'sync' on CPU"):
        train_ddp(create_model("resnet_tiny", 3, 1, 32), ds, None,
                  TrainConfig(epochs=1, batch_size=16, device="cpu"), world_size=2,
                  settings=DDPSettings(batch_norm="sync"), progress=False)
    # an error inside the ranks comes back as the same MedScalpelError, not a traceback dump
    with pytest.raises(ConfigError, match="Training diverged at epoch 1, step 0"):
        train_ddp(model, ds, None, TrainConfig(epochs=1, batch_size=16, device="cpu"),
                  world_size=2, loss_fn=_nan_loss, progress=False)
    with pytest.raises(ConfigError, match="batch_norm"):
        DDPSettings(batch_norm="group").validate()
