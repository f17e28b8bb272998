"""Same seed, same machine -> bit-identical weights and predictions."""

from __future__ import annotations

import numpy as np
import torch

from medscalpel.data import ArrayDataset, Augment, Preprocess
from medscalpel.engine.predict import predict
from medscalpel.engine.train import TrainConfig, train
from medscalpel.models import create_model


def _data(n=64, size=32):
    rng = np.random.default_rng(0)
    imgs = (rng.random((n, size, size)) * 80).astype(np.uint8)
    y = (rng.random((n, 3)) < [0.4, 0.3, 0.5]).astype(np.float32)
    imgs[y[:, 0] == 1, 4:12, 4:12] += 150
    pp = Preprocess(size=size)
    train_ds = ArrayDataset(imgs, y, ["a", "b", "c"], "multilabel",
                            preprocess=pp.with_augment(Augment()))  # random augmentation too
    return train_ds, ArrayDataset(imgs, y, ["a", "b", "c"], "multilabel", preprocess=pp)


def _fit_predict(arch, seed, train_ds, test_ds):
    torch.manual_seed(seed)
    model = create_model(arch, 3, 1, 32)  # the initialisation follows the seed too
    cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, seed=seed, device="cpu")
    res = train(model, train_ds, test_ds, cfg, progress=False)
    return res, predict(res.model, test_ds, progress=False).logits


def test_same_seed_bit_identical_predictions():
    train_ds, test_ds = _data()
    for arch in ("densenet_tiny", "vit_test"):  # BatchNorm + concatenations; attention
        r1, a = _fit_predict(arch, 3, train_ds, test_ds)
        # unrelated random draws in between must not matter
        torch.rand(100)
        np.random.rand(100)
        r2, b = _fit_predict(arch, 3, train_ds, test_ds)
        assert np.array_equal(a, b), arch
        for (k, v), w in zip(r1.model.state_dict().items(), r2.model.state_dict().values()):
            assert torch.equal(v, w), k
        assert [h["train_loss"] for h in r1.history] == [h["train_loss"] for h in r2.history]
        _, c = _fit_predict(arch, 4, train_ds, test_ds)
        assert not np.array_equal(a, c)  # the check can fail: another seed differs


def test_fit_seed_fixes_the_initial_weights_too(tmp_path):
    """``fit`` creates the model itself: the same seed must give the same weights even when
    unrelated random draws happened before (the seed covers the initialisation)."""
    from safetensors.torch import load_file

    from medscalpel.engine.api import fit

    spec = "phantom?n=96&size=32&seed=5"
    cfg = TrainConfig(epochs=1, batch_size=16, seed=7, device="cpu")
    runs = []
    for i in range(2):
        torch.rand(17 + i)  # different global RNG state before each call
        res = fit(spec, "densenet_tiny", tmp_path / f"r{i}", cfg, size=32, eval_split=None,
                  progress=False)
        runs.append(load_file(res.model_dir / "model.safetensors"))
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_acquisition_augmentation_is_seeded_and_changes_the_display_curve():
    x = torch.full((1, 32, 32), 0.25)
    x[:, 8:24, 8:24] = 0.75
    light, acq = Augment(), Augment.preset("acquisition")
    assert light.gamma == 0.0 and light.noise == 0.0 and Augment.preset("light") == light
    a = acq(x.clone(), torch.Generator().manual_seed(5))
    b = acq(x.clone(), torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    # over draws the ratio of the two tissue levels varies (gamma) and noise appears
    draws = [acq(x.clone(), torch.Generator().manual_seed(s)) for s in range(40)]
    flat_sd = [float(d[:, 26:30, 26:30].std()) for d in draws]
    assert max(flat_sd) > 0.02  # detector noise in a flat region
    plain = [light(x.clone(), torch.Generator().manual_seed(s)) for s in range(40)]
    assert max(float(d[:, 26:30, 26:30].std()) for d in plain) < 1e-3
    import pytest

    from medscalpel.errors import ConfigError

    with pytest.raises(ConfigError, match="Unknown augmentation profile"):
        Augment.preset("heavy")
