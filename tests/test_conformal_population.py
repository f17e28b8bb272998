"""The population benchmark's machinery (benchmarks/conformal_population.py): independent
draws of disjoint patients, one image per patient, leave-one-chunk-out population counts equal
to a direct comparison, and a draw's rows (tiny planted data, no model)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medscalpel.engine.predictions import Predictions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import conformal_population as cp  # noqa: E402


def _chunk(rng, n, seed, k=2):
    y = (rng.random((n, k)) < 0.3).astype(np.float32)
    z = (2.0 * y + rng.normal(size=(n, k))).astype(np.float32)
    pids = [f"s{seed}:P{i // 3:04d}" for i in range(n)]  # 3 images a patient
    p = Predictions(z, y, ids=tuple(map(str, range(n))), class_names=("a", "b"),
                    task="multilabel")
    return p, pids


def test_parse_seeds_and_groups_of_disjoint_patients():
    assert cp.parse_seeds("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(SystemExit, match="repeated"):
        cp.parse_seeds("1-3,2")
    pids = [f"P{i // 2}" for i in range(40)] + ["Q"] * 5
    groups = cp.patient_groups(pids, 4, seed=3)
    assert sorted(np.concatenate(groups).tolist()) == list(range(45))
    owners = [{pids[i] for i in g} for g in groups]
    assert all(not (owners[a] & owners[b]) for a in range(4) for b in range(a + 1, 4))
    assert sorted(len(o) for o in owners) == [5, 5, 5, 6]  # 21 patients cut into 4
    again = cp.patient_groups(pids, 4, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(groups, again))


def test_leave_one_out_counts_equal_a_direct_comparison():
    rng = np.random.default_rng(0)
    chunks = [_chunk(rng, 300, s)[0] for s in range(3)]
    rates = cp.LeaveOneOutRates(chunks)
    for out in range(3):
        pop = cp.stack([c for i, c in enumerate(chunks) if i != out])
        for j in range(2):
            for thr in (-1.0, 0.3, 1.7):
                assert np.allclose(rates.rates(j, thr, "logit", out),
                                   cp._direct_rates(pop, j, thr, "logit"), atol=1e-12)
                p = float(1 / (1 + np.exp(-thr)))
                assert np.allclose(rates.rates(j, p, "prob", out),
                                   cp._direct_rates(pop, j, p, "prob"), atol=1e-12)
            assert rates.n_pos(j, out) == int((pop.labels[:, j] > 0.5).sum())


def test_one_draw_rows_and_self_check():
    rng = np.random.default_rng(1)
    loaded = [_chunk(rng, 600, s) for s in range(3)]
    chunks = [p for p, _ in loaded]
    rates = cp.LeaveOneOutRates(chunks)
    preds, pids = loaded[0]
    rows = cp.patient_groups(pids, 2, seed=0)[0]
    args = SimpleNamespace(target=0.9, alpha=0.1)
    d = cp.one_draw(preds.select(rows), [pids[i] for i in rows], rates, 0, seed=5, args=args,
                    pop=cp.stack(chunks[1:]))
    assert set(cp.METHODS) <= set(d)
    for m in cp.METHODS:
        assert d[m].shape == (2, len(cp.COLS)) and np.all(d[m][:, 0] == 1)
        assert np.all((d[m][:, 1] >= 0) & (d[m][:, 1] <= 1))
    # one positive image per positive patient (3 images a patient, labels per image)
    assert d["n_images"][0] == rows.size
    assert np.all(d["ltt_per_patient"][:, 4] < d["ltt_recall"][:, 4])
    pos_patients = [len({pids[i] for i in rows if preds.labels[i, j] > 0.5}) for j in range(2)]
    assert d["ltt_per_patient"][:, 4].tolist() == pos_patients
    assert np.all((d["ltt_recall_iid"] >= 0.9) & (d["ltt_recall_iid"] <= 1))


def test_within_patient_icc_and_design_effect():
    x = np.array([1, 1, 0, 0, 1, 1, 0, 0], float)
    same = cp.within_patient_icc(x, np.repeat(np.arange(4), 2))
    assert same["icc"] == pytest.approx(1.0) and same["design_effect"] == pytest.approx(2.0)
    mixed = cp.within_patient_icc(np.array([1, 0, 1, 0, 1, 0], float), np.repeat(np.arange(3), 2))
    assert mixed["icc"] == pytest.approx(-1.0)  # every patient has one of each: negative
    rng = np.random.default_rng(2)
    free = cp.within_patient_icc((rng.random(6000) < 0.1).astype(float),
                                 np.repeat(np.arange(2000), 3))
    assert abs(free["icc"]) < 0.05 and free["images_per_patient_w"] == pytest.approx(3.0)
