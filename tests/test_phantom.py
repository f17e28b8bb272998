"""Phantom CXR-14: determinism, NIH label statistics, masks in their anatomy, shortcut rates,
adapter round-trip, errors."""

import json

import numpy as np
import pytest

from medscalpel.data import open_dataset
from medscalpel.data.phantom import CLASS_NAMES, ShortcutConfig, generate_phantom
from medscalpel.data.phantom.labels import label_statistics, nih_statistics, sample_nih_labels
from medscalpel.errors import DataError


@pytest.fixture(scope="module")
def small():
    return generate_phantom(n=240, size=48, seed=3, progress=False)


def test_deterministic_by_seed(small):
    again = generate_phantom(n=240, size=48, seed=3, progress=False)
    assert np.array_equal(small.images, again.images)
    assert np.array_equal(small.labels, again.labels)
    assert small.gt.equals(again.gt)
    other = generate_phantom(n=240, size=48, seed=4, progress=False)
    assert not np.array_equal(small.images, other.images)


def test_label_statistics_match_nih_within_sampling_error():
    n = 20000
    y = sample_nih_labels(np.random.default_rng(0), n)
    got, ref = label_statistics(y), nih_statistics()
    p = ref["prevalence"]
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(got["prevalence"] - p) <= 4 * se + 1e-12)
    # pairwise Jaccard: delta-method standard error from the binomial of the intersection
    inter, union = ref["intersection"], ref["union"]
    se_j = np.sqrt(inter * (1 - inter) / n) / np.maximum(union, 1e-9) * 2
    off = ~np.eye(len(p), dtype=bool)
    assert np.all(np.abs(got["jaccard"] - ref["jaccard"])[off] <= 4 * se_j[off] + 2e-3)
    # the real table: effusion and infiltration are the most common, hernia the rarest
    order = np.argsort(-p)
    assert {CLASS_NAMES[order[0]], CLASS_NAMES[order[1]]} == {"Infiltration", "Effusion"}
    assert CLASS_NAMES[order[-1]] == "Hernia"


def test_label_noise_rate(small):
    flips = small.label_flips()
    pos = small.labels == 1
    assert 0.0 < flips[pos].mean() < 0.2
    assert np.array_equal(small.clean_labels() != small.labels, flips)


def test_masks_inside_their_anatomy(small):
    names = small.class_names
    checked = 0
    for row in range(len(small)):
        m = small.masks(row)
        lungs = m["lung_right"] | m["lung_left"]
        assert lungs.sum() > 0 and m["heart"].sum() > 0
        for name in ("Effusion", "Nodule", "Mass", "Pneumothorax", "Consolidation"):
            if name in m and m[name].sum() > 0:
                inside = (m[name] & lungs).sum() / m[name].sum()
                assert inside > 0.6, (row, name, inside)
                checked += 1
        if "Cardiomegaly" in m:
            assert (m["Cardiomegaly"] & m["heart"]).sum() / m["Cardiomegaly"].sum() > 0.9
        if "Effusion" in m and m["Effusion"].sum():
            ys = np.nonzero(m["Effusion"])[0]
            lung_ys = np.nonzero(lungs)[0]
            assert ys.mean() > np.median(lung_ys)  # basal
        present = {names[k] for k in np.flatnonzero(small.clean_labels()[row])}
        assert set(m) - {"lung_right", "lung_left", "heart", "chest_tube"} <= present
        assert ("chest_tube" in m) == bool(small.gt["chest_tube"].iloc[row])
    assert checked > 10


def test_shortcut_rates_per_split():
    d = generate_phantom(n=3000, size=16, seed=0, progress=False,
                         shortcut=ShortcutConfig(tube_pos=0.8, tube_neg=0.05, tube_shifted=0.5))
    k = CLASS_NAMES.index("Pneumothorax")
    ptx = d.clean_labels()[:, k] == 1
    tube = d.gt["chest_tube"].to_numpy().astype(bool)
    split = d.gt["split"].to_numpy()
    inside = np.isin(split, ["train", "val", "test"])
    assert abs(tube[inside & ptx].mean() - 0.8) < 0.1
    assert abs(tube[inside & ~ptx].mean() - 0.05) < 0.02
    sh = split == "shifted"
    assert abs(tube[sh].mean() - 0.5) < 0.08
    # independent of the label in the shifted split
    if (sh & ptx).sum() >= 5:
        assert abs(tube[sh & ptx].mean() - tube[sh & ~ptx].mean()) < 0.35


def test_adapter_round_trip(tmp_path, small):
    small.save(tmp_path / "ph")
    train = open_dataset(f"phantom:{tmp_path / 'ph'}", split="train")
    shifted = open_dataset(f"phantom:{tmp_path / 'ph'}", split="shifted")
    rows = small.rows("train")
    assert train.ids == small.gt["id"].iloc[rows].tolist()
    assert np.array_equal(train.labels, small.labels[rows])
    assert train.class_names == CLASS_NAMES and train.task == "multilabel"
    x, y = train[0]
    assert x.shape == (1, 64, 64) and y.shape == (14,)
    assert np.array_equal(train.load_raw(0), small.images[rows[0]])
    assert set(train.ids).isdisjoint(shifted.ids)
    assert train.confounder("chest_tube").dtype == bool
    pids = set(train.patient_ids)
    assert pids.isdisjoint(shifted.patient_ids)  # patient-wise splits
    m = train.masks(0)
    assert m["heart"].shape == (48, 48)


def test_generated_spec_is_cached_and_consistent(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSCALPEL_CACHE", str(tmp_path / "cache"))
    a = open_dataset("phantom?n=120&size=24&seed=5", split="train")
    b = open_dataset("phantom?n=120&size=24&seed=5", split="test")
    assert set(a.ids).isdisjoint(b.ids)
    assert len(a) + len(b) < 120


def test_errors(tmp_path, small):
    with pytest.raises(DataError, match="Phantom directory not found"):
        open_dataset(f"phantom:{tmp_path / 'nope'}", split="train")
    small.save(tmp_path / "ph")
    meta = json.loads((tmp_path / "ph" / "phantom.json").read_text())
    del meta["splits"]
    (tmp_path / "ph" / "phantom.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"lacks the key\(s\) \['splits'\]"):
        open_dataset(f"phantom:{tmp_path / 'ph'}", split="train")
    with pytest.raises(Exception, match="split"):
        open_dataset("phantom?n=50&size=16", split="bogus")


def test_cli_phantom(tmp_path):
    from typer.testing import CliRunner

    from medscalpel.cli.main import app

    out = tmp_path / "ph"
    r = CliRunner().invoke(app, ["data", "phantom", "--out", str(out), "--n", "80", "--size",
                                 "24", "--preview"])
    assert r.exit_code == 0, r.output
    assert (out / "preview.png").stat().st_size > 1000
    assert json.loads((out / "manifest.json").read_text())["command"] == "data phantom"


def test_attributes_exposed_and_their_effect_is_known(small):
    from medscalpel.data.phantom.generate import age_band, render_chunk

    att = small.attributes()
    assert list(att.columns) == ["sex", "age_band", "view"]
    assert list(att.index) == small.gt["id"].tolist()
    assert set(att["sex"]) == {"F", "M"} and set(att["age_band"]) <= {"<40", "40-59", "60+"}
    assert list(age_band(np.array([0, 39, 40, 59, 60, 95]))) == ["<40", "<40", "40-59", "40-59",
                                                                  "60+", "60+"]
    # sex and age are per patient: every film of one patient has the same ones
    per_patient = small.gt.groupby("patient_id")[["sex", "age"]].nunique()
    assert (per_patient.to_numpy() == 1).all()
    # the effect: same draws, female thorax narrower; old patients have fainter bones
    b = 64
    base = np.zeros((b, 4), np.float32)
    clean = np.zeros((b, 14), np.int8)
    none = np.zeros(b, bool)
    kw = dict(size=48, clean=clean, patient_base=base, ap=none, tube=none)
    male = render_chunk(np.random.default_rng(0), female=none, age=np.full(b, 45), **kw)
    fem = render_chunk(np.random.default_rng(0), female=~none, age=np.full(b, 45), **kw)
    old = render_chunk(np.random.default_rng(0), female=none, age=np.full(b, 85), **kw)
    lung_area = lambda c: np.unpackbits(c["anat_bits"][:, :2], axis=-1).sum()  # noqa: E731
    assert lung_area(fem) < 0.95 * lung_area(male)
    assert np.allclose(old["anatomy"].bone_gain, 1.1 - 0.008 * 65)
    assert old["images"].astype(float).mean() != male["images"].astype(float).mean()
