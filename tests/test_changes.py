"""What compression changed (issue 18): each measure finds a planted effect and not a null one."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from medscalpel.audit.changes import (ChangesAudit, audit_changes, calibration_change,
                                      dataset_attributes, explanation_change, robustness_change,
                                      subgroup_change)
from medscalpel.audit.changes.explanation import _mask_scores, class_cams
from medscalpel.audit.changes.faithfulness import impute_linear
from medscalpel.audit.changes.robustness import LEVELS, corrupt
from medscalpel.data import Preprocess, open_dataset
from medscalpel.data.phantom import generate_phantom
from medscalpel.engine.predictions import Predictions
from medscalpel.errors import ConfigError, DataError
from medscalpel.models.zoo import create_model


def _preds(z, y, names=("a", "b")):
    ids = tuple(str(i) for i in range(len(y)))
    return Predictions(np.asarray(z, np.float32), np.asarray(y, np.float32), ids=ids,
                       class_names=names, task="multilabel")


def _calibrated(n=600, k=2, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, k))
    y = (rng.random((n, k)) < 1 / (1 + np.exp(-z))).astype(np.float32)
    return z, y


# ----------------------------------------------------------------------------- calibration
def test_temperature_change_is_calibration_drift_not_auroc_change():
    z, y = _calibrated()
    dense, hot = _preds(z, y), _preds(3 * z, y)       # temperature 1/3: over-confident
    r = calibration_change(dense, hot, thresholds=[0.3, 0.3], n_boot=300)
    for c in r.classes:
        assert c.delta_ece > 0 and c.delta_ece_ci[0] > 0 and c.delta_ece_p < 0.05
        assert c.delta_brier_ci[0] > 0
        assert c.delta_auroc == 0.0                   # a monotone map keeps every ranking
        # at the stored threshold 0.3 (logit -0.85) the hotter model says "positive" less often
        assert c.delta_sens < 0 and c.delta_sens_ci[1] < 0 and c.recalibrate
    assert r.recommend_recalibration and any("ECE" in s for s in r.reasons)
    # hand-computed ECE of the reference for class a
    p = 1 / (1 + np.exp(-z[:, 0].astype(np.float32).astype(np.float64)))
    b = np.minimum((p * 10).astype(int), 9)
    ece = sum(abs((p[b == i] - y[b == i, 0]).sum()) for i in range(10)) / len(p)
    assert r.classes[0].ece_ref == pytest.approx(ece, abs=1e-6)
    again = type(r).from_dict(r.to_dict())
    assert again.classes[0].delta_ece_ci == r.classes[0].delta_ece_ci


def test_identical_models_have_no_calibration_drift():
    z, y = _calibrated(seed=1)
    r = calibration_change(_preds(z, y), _preds(z, y), n_boot=200)
    assert not r.recommend_recalibration
    for c in r.classes:
        assert c.delta_ece == 0 and c.delta_ece_ci == (0.0, 0.0) and not c.recalibrate


# ----------------------------------------------------------------------------- subgroups
def _subgroup_setup(seed=0, n=600):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < 0.3).astype(np.float32)
    z = 2 * (2 * y - 1) + rng.normal(0, 1.5, y.shape)
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    age = rng.choice(["<40", "40-59", "60+"], n)
    ids = tuple(str(i) for i in range(n))
    att = pd.DataFrame({"sex": sex, "age_band": age}, index=ids)
    return y, z, att, rng


def test_planted_subgroup_loss_is_flagged_null_is_not():
    y, z, att, rng = _subgroup_setup()
    z2 = z.copy()
    f = att["sex"].to_numpy() == "F"
    z2[f, 0] = rng.normal(0, 1.5, f.sum())           # class a destroyed for women only
    r = subgroup_change(_preds(z, y), _preds(z2, y), att, n_boot=400)
    flagged = {(x.attribute, x.level, x.cls) for x in r.flagged()}
    assert ("sex", "F", "a") in flagged and ("sex", "F", "macro") in flagged
    assert not any(a == "age_band" for a, _, _ in flagged)   # the null attribute
    assert not any(lv == "M" for _, lv, _ in flagged)
    fa = next(x for x in r.rows if (x.attribute, x.level, x.cls) == ("sex", "F", "a"))
    assert fa.delta_auroc < -0.2 and fa.contrast_ci[1] < 0 and fa.contrast_p < 0.05
    assert "contrasts tested" in r.note and r.n_tests == 15
    assert type(r).from_dict(r.to_dict()).rows[0] == r.rows[0]


def test_subgroup_errors_and_stated_skips():
    y, z, att, _ = _subgroup_setup(n=200)
    a = _preds(z, y)
    with pytest.raises(DataError, match=r"carry no attribute \['race'\]"):
        subgroup_change(a, a, att, names=["race"], n_boot=0)
    with pytest.raises(DataError, match="have no row in the attribute table"):
        subgroup_change(a, a, att.iloc[:150], n_boot=0)
    att = att.assign(site=np.where(np.arange(200) < 5, "tiny", "big"))
    att.loc[att.index[:3], "sex"] = None
    r = subgroup_change(a, a, att, min_size=10, n_boot=50)
    assert any("site=tiny: 5 image(s) < min_size 10" in s for s in r.skipped)
    assert any("sex: 3 image(s) without a value" in s for s in r.skipped)
    assert not r.flagged()
    assert all(x.delta_auroc == 0 for x in r.rows if np.isfinite(x.delta_auroc))


# ----------------------------------------------------------------------------- robustness
class _MarkerSensitive(nn.Module):
    """The dense model, plus a large push on every logit when the top-right corner is bright."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        corner = x[:, :, 2:6, -8:-3].mean(dim=(1, 2, 3))
        return self.base(x) + 8.0 * (corner > 1.5).float()[:, None] * torch.randn(
            x.shape[0], 1, generator=torch.Generator().manual_seed(0))


class _Separable(nn.Module):
    """A 'model' whose logit k is the mean brightness of a class-specific band (AUROC ~1)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.stack([x[:, 0, 20:40, 10:30].mean((1, 2)), x[:, 0, 20:40, 34:54].mean((1, 2))],
                           1) * 4 + self.w


def _band_images(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, 2, generator=g) < 0.5).float()
    x = torch.randn(n, 1, 64, 64, generator=g) * 0.3
    x[:, 0, 20:40, 10:30] += y[:, :1, None] * 0.8
    x[:, 0, 20:40, 34:54] += y[:, 1:, None] * 0.8
    return x, y.numpy()


def test_planted_corruption_sensitivity_is_found():
    x, y = _band_images()
    dense = _Separable()
    pp = Preprocess(64, mean=(0.5,), std=(0.25,))
    template = _preds(np.zeros((len(y), 2)), y)
    r = robustness_change(dense, _MarkerSensitive(dense), x, template, pp,
                          corruptions=["marker", "noise"], severities=(3,), n_boot=300)
    cell = {(c.corruption, c.cls): c for c in r.cells}
    assert cell[("marker", "macro")].less_robust and cell[("marker", "macro")].relative < -0.05
    assert cell[("marker", "macro")].relative_p < 0.05
    assert not cell[("noise", "macro")].less_robust       # the planted model equals dense there
    assert cell[("noise", "macro")].relative == 0.0
    same = robustness_change(dense, dense, x, template, pp, corruptions=["marker"],
                             severities=(1,), n_boot=100)
    assert all(c.relative == 0 and not c.less_robust for c in same.cells)
    with pytest.raises(Exception, match="corruption"):
        robustness_change(dense, dense, x, template, pp, corruptions=["snow"], n_boot=0)


def test_robustness_delta_is_the_paired_auroc_delta_and_batching_is_exact():
    """The per-cell dense-vs-compressed delta comes from the same replicates as the drops: its
    point value equals compare_predictions' delta on the corrupted predictions, the relative
    robustness is exactly drop_new - drop_ref, and one batched pass over all severities gives
    the per-severity AUROCs of separate passes. (128 images: _MarkerSensitive's noise depends
    on the row's place in its batch of 64, so batches must align.)"""
    from medscalpel.audit.changes._util import logits_of
    from medscalpel.engine.compare import compare_predictions

    x, y = _band_images(128)
    dense = _Separable()
    pp = Preprocess(64, mean=(0.5,), std=(0.25,))
    template = _preds(np.zeros((len(y), 2)), y)
    new = _MarkerSensitive(dense)
    r = robustness_change(dense, new, x, template, pp, corruptions=["marker", "blur"],
                          severities=(1, 3), n_boot=200)
    for c in r.cells:
        assert c.relative == pytest.approx(c.drop_new - c.drop_ref, abs=1e-12)
        assert c.delta_auroc == pytest.approx(c.auroc_new - c.auroc_ref, abs=1e-12)
    xc = corrupt(x, pp, "marker", 3)
    cmp = compare_predictions(_preds(logits_of(dense, xc), y), _preds(logits_of(new, xc), y),
                              n_boot=0)
    cell = {(c.corruption, c.severity, c.cls): c for c in r.cells}
    assert cell[("marker", 3, "macro")].delta_auroc == pytest.approx(cmp.macro["delta_auroc"],
                                                                     abs=1e-6)
    one = robustness_change(dense, new, x, template, pp, corruptions=["marker"],
                            severities=(3,), n_boot=200)
    for c in one.cells:
        assert c.auroc_new == pytest.approx(cell[("marker", 3, c.cls)].auroc_new, abs=1e-6)
        assert c.relative_ci == pytest.approx(cell[("marker", 3, c.cls)].relative_ci, abs=1e-6)
    with pytest.raises(DataError, match="clean_logits must have 128 rows"):
        robustness_change(dense, new, x, template, pp, corruptions=["marker"], n_boot=0,
                          clean_logits=(np.zeros((3, 2)), np.zeros((3, 2))))


def test_corruptions_are_graded_and_shape_preserving():
    pp = Preprocess(64)
    x, _ = _band_images(8)
    dist = []
    for name in LEVELS:
        d = [float((corrupt(x, pp, name, s) - x).abs().mean()) for s in (1, 2, 3)]
        assert corrupt(x, pp, name, 2).shape == x.shape
        assert d[2] >= d[0] > 0, name          # severity 3 moves the image at least as far
        dist.append(d)
    assert torch.equal(corrupt(x, pp, "noise", 2, seed=3), corrupt(x, pp, "noise", 2, seed=3))


# ----------------------------------------------------------------------------- explanation
def test_class_cams_equal_grad_cam_package():
    from medscalpel.explain.cams import compute_cam

    torch.manual_seed(0)
    m = create_model("densenet_tiny", num_classes=3, img_size=64)
    x = torch.randn(6, 1, 64, 64)
    state = copy.deepcopy(m.state_dict())
    maps = class_cams(m, x, [0, 2])
    assert maps.max() > 0.99
    for j, k in enumerate([0, 2]):
        ref = compute_cam(m, x, k, progress=False).maps
        assert np.abs(maps[:, j] - ref).max() < 1e-4
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert m.training and sum(len(mod._forward_hooks) for mod in m.modules()) == 0


@pytest.mark.parametrize("arch", ["resnet_tiny", "vgg_tiny"])
def test_class_cams_equal_textbook_grad_cam(arch):
    import torch.nn.functional as F

    torch.manual_seed(1)
    m = create_model(arch, num_classes=3, img_size=64).eval()
    x = torch.randn(3, 1, 64, 64)
    got = class_cams(m, x, [1])[:, 0]
    store = {}
    h = m.cam_layer().register_forward_hook(lambda mod, i, o: store.__setitem__("a", o))
    try:
        out = m(x.clone().requires_grad_(True))
        a = store["a"]
        g = torch.autograd.grad(out[:, 1].sum(), a)[0]
    finally:
        h.remove()
    cam = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1)).detach()
    cam = cam - cam.flatten(1).min(1)[0][:, None, None]
    cam = cam / (1e-7 + cam.flatten(1).max(1)[0][:, None, None])
    ref = F.interpolate(cam[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert np.abs(got - ref.numpy()).max() < 1e-5


def test_damaged_class_row_drifts_only_that_class():
    torch.manual_seed(0)
    dense = create_model("densenet_tiny", num_classes=3, img_size=64)
    bad = copy.deepcopy(dense)
    with torch.no_grad():
        w = bad.classifier.weight
        w[1] = -w[1]                                     # class 1's evidence flipped
    x = torch.randn(24, 1, 64, 64)
    same = explanation_change(dense, copy.deepcopy(dense), x, class_names=["a", "b", "c"],
                              n_faithfulness=6, steps=4, n_boot=100, progress=False)
    r = explanation_change(dense, bad, x, class_names=["a", "b", "c"], n_faithfulness=6,
                           steps=4, n_boot=100, progress=False)
    for name in ("a", "b", "c"):
        assert same.classes[name]["spearman"]["mean"] == pytest.approx(1.0)
        assert same.classes[name]["iou"]["mean"] == pytest.approx(1.0)
    assert same.faithfulness["deletion"]["delta"]["mean"] == 0.0
    assert r.classes["a"]["spearman"]["mean"] == pytest.approx(1.0)
    assert r.classes["b"]["spearman"]["mean"] < 0.5
    assert r.classes["b"]["pointing"]["mean"] < r.classes["a"]["pointing"]["mean"]
    assert type(r).from_dict(r.to_dict()).classes == r.classes


def test_empty_grad_cams_are_not_scored_and_say_why():
    """Regression (issue 18 benchmark): with every class logit driven by negative evidence
    Grad-CAM is ReLU(negative) = 0 everywhere; the old code ranked the equal pixels of such maps
    by index and reported deletion / insertion numbers with CIs. Empty maps now score NaN and
    the result states the reason and the counts, and the coarse CAM grid is named."""
    torch.manual_seed(0)
    dense = create_model("densenet_tiny", num_classes=2, img_size=32)
    with torch.no_grad():
        dense.classifier.weight.copy_(-dense.classifier.weight.abs() - 0.01)
    x = torch.randn(10, 1, 32, 32)
    r = explanation_change(dense, copy.deepcopy(dense), x, class_names=["a", "b"],
                           n_faithfulness=6, steps=4, n_boot=50, progress=False)
    for name in ("a", "b"):
        row = r.classes[name]
        assert row["empty_maps"] == {"ref": 10, "new": 10}
        assert row["spearman"]["n"] == 0 and np.isnan(row["spearman"]["mean"])
        assert "ReLU" in row["reason"] and "dense 10/10" in row["reason"]
    for k in ("deletion", "insertion", "road"):
        f = r.faithfulness[k]
        assert f["delta"]["n"] == 0 and np.isnan(f["ref"]["mean"])
        assert f["empty_maps"] == {"ref": 6, "new": 6} and "empty Grad-CAM" in f["reason"]
    assert r.meta["cam_grid"]["ref"] == [1, 1] and "coarse CAM layer" in r.meta["cam_note"]
    back = type(r).from_dict(r.to_dict())
    assert back.classes["a"]["reason"] == r.classes["a"]["reason"]


def test_fast_copy_and_reused_clean_logits_change_nothing():
    from medscalpel.audit.changes._util import fast_copy, logits_of
    from medscalpel.audit.changes.faithfulness import deletion_insertion

    torch.manual_seed(0)
    m = create_model("densenet_tiny", num_classes=3, img_size=32).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(6, 1, 32, 32)
    fast = fast_copy(m)
    assert m.training and all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert np.abs(logits_of(fast, x) - logits_of(m, x)).max() < 1e-4
    maps = np.random.default_rng(0).random((6, 32, 32)).astype(np.float32)
    t = np.array([0, 1, 2, 0, 1, 2])
    d0, i0 = deletion_insertion(m, x, maps, t, steps=4)
    d1, i1 = deletion_insertion(m, x, maps, t, steps=4, clean_logits=logits_of(m, x))
    assert np.allclose(d0, d1, atol=1e-6) and np.allclose(i0, i1, atol=1e-6)


def test_mask_energy_and_road_imputation_by_hand():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, :2, :2] = 1.0
    maps[0, 3, 3] = 2.0
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    energy, point = _mask_scores(maps, [mask, None])
    assert energy[0] == pytest.approx(4 / 6) and point[0] == 0.0 and np.isnan(energy[1])
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float64)
    ramp = 0.3 * xx - 0.2 * yy + 1.0
    removed = np.zeros((16, 16), bool)
    removed[4:12, 3:9] = True
    out = impute_linear(ramp, removed, 0.0, np.random.default_rng(0))
    assert np.allclose(out, ramp, atol=1e-9)              # a plane is its own neighbour mean


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def phantom_test(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph") / "ph"
    generate_phantom(n=300, size=64, seed=1, progress=False, out=root)
    return open_dataset(f"phantom:{root}", split="all", preprocess=Preprocess(64))


def test_audit_changes_end_to_end_on_the_phantom(phantom_test, tmp_path):
    att = dataset_attributes(phantom_test)
    assert list(att.columns) == ["sex", "age_band", "view"]
    assert list(att.index) == list(phantom_test.ids)
    sub = phantom_test.subset([5, 2, 9])
    assert list(dataset_attributes(sub).index) == [phantom_test.ids[i] for i in (5, 2, 9)]
    torch.manual_seed(0)
    dense = create_model("densenet_tiny", num_classes=14, img_size=64)
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned.classifier.weight.mul_(2.0)
    res = audit_changes(dense, {"hot": pruned}, phantom_test, n_images=60, n_boot=50,
                        n_faithfulness=8, corruptions=["blur", "marker"], severities=(2,),
                        min_subgroup=10, progress=False)
    p = res.pairs[0]
    assert p.calibration is not None and p.explanation.has_masks
    assert p.robustness.corruptions == ("blur", "marker")
    assert {r.attribute for r in p.subgroups.rows} == {"sex", "age_band", "view"}
    # doubling the head's weights is a temperature change: rankings kept, calibration moved
    assert p.calibration.macro["delta_auroc"] == pytest.approx(0.0, abs=1e-9)
    assert p.calibration.macro["delta_ece"] != 0.0
    path = res.save(tmp_path / "run" / "audit" / "changes")
    assert path.name == "changes.json"
    back = ChangesAudit.load(tmp_path / "run" / "audit" / "changes")
    assert back.pairs[0].figures == {"reliability": "hot_reliability.png",
                                     "explanation": "hot_explanation.png",
                                     "robustness": "hot_robustness.png"}
    assert all((path.parent / f).is_file() for f in back.pairs[0].figures.values())
    # the report section reads the typed result, every number with its JSON pointer
    from medscalpel.report.page import RunFiles, Section, resolve_pointer
    from medscalpel.report.sections.changes import ChangesSection

    sec = Section("changes", "What compression changed")
    ChangesSection().render(RunFiles(tmp_path / "run", tmp_path / "report.html"), sec)
    assert sec.present and len(sec.figures) == 3
    assert [t.key for t in sec.tables] == ["changes_calibration", "changes_subgroups",
                                           "changes_robustness", "changes_explanation"]
    doc = __import__("json").loads(path.read_text())
    cell = sec.tables[0].rows[0][3]
    assert cell.value == pytest.approx(resolve_pointer(doc, cell.src))
    empty = Section("changes", "x")
    ChangesSection().render(RunFiles(tmp_path / "nothing", tmp_path / "r.html"), empty)
    assert not empty.present
    assert back.pairs[0].calibration.macro["delta_ece"] == pytest.approx(
        p.calibration.macro["delta_ece"])
    assert back.pairs[0].subgroups.rows == p.subgroups.rows or len(back.pairs[0].subgroups.rows) \
        == len(p.subgroups.rows)
    assert back.n == 60 and back.measures == res.measures


def test_audit_changes_bad_input(phantom_test):
    dense = create_model("densenet_tiny", num_classes=14, img_size=64)
    other = create_model("densenet_tiny", num_classes=3, img_size=64)
    with pytest.raises(DataError, match="must share the data's class list"):
        audit_changes(dense, other, phantom_test, n_images=10, measures=["calibration"])
    with pytest.raises(DataError, match=r"carry no attribute \['race'\]"):
        audit_changes(dense, dense, phantom_test, n_images=10, measures=["subgroups"],
                      attribute_names=["race"])
    with pytest.raises(ConfigError, match="'measures' parameter of audit_changes"):
        audit_changes(dense, dense, phantom_test, measures=["vibes"])


def test_nih_attributes_from_the_metadata(tmp_path):
    from conftest import shared_path

    from medscalpel.data.nih import read_nih_attributes

    root = shared_path("nih14-sample64")
    ds = open_dataset(f"nih:{root}", split="test", preprocess=Preprocess(64))
    att = dataset_attributes(ds)
    assert list(att.columns) == ["sex", "age_band", "view"] and len(att) == len(ds) == 310
    assert list(att.index) == list(ds.ids)
    assert set(att["sex"]) <= {"F", "M"} and set(att["view"]) <= {"PA", "AP"}
    # an age over 120 (a known NIH error) becomes missing; "058Y" (the 2017 format) parses
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text("Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender,View Position\n"
                   "a.png,No Finding,1,413,M,PA\nb.png,Mass,2,058Y,F,AP\nc.png,Mass,3,39,F,AP\n")
    t = read_nih_attributes(csv)
    assert t["age_band"].isna().tolist() == [True, False, False]
    assert t["age_band"].tolist()[1:] == ["40-59", "<40"] and t["sex"].tolist() == ["M", "F", "F"]


def test_cli_audit_changes_sweep_dir_and_bad_input(tmp_path):
    from typer.testing import CliRunner

    from medscalpel.cli.main import app
    from medscalpel.models import make_card, save_model

    generate_phantom(n=120, size=64, seed=2, out=tmp_path / "ph", progress=False)
    spec = f"phantom:{tmp_path / 'ph'}"
    names = list(open_dataset(spec, split="all").class_names)
    torch.manual_seed(0)
    dense = create_model("densenet_tiny", 14, 1, 64)
    save_model(dense, tmp_path / "dense", make_card(dense, names, "multilabel", Preprocess(64)))
    for name, scale in (("a", 2.0), ("b", 0.5)):
        m = copy.deepcopy(dense)
        with torch.no_grad():
            m.classifier.weight.mul_(scale)
        save_model(m, tmp_path / "sweep" / name, make_card(m, names, "multilabel", Preprocess(64)))
    runner = CliRunner()
    args = ["audit", "changes", str(tmp_path / "dense"), str(tmp_path / "sweep"), "--data", spec,
            "--split", "all", "--n-images", "40", "--n-boot", "20", "--measures", "calibration",
            "--measures", "subgroups", "--min-subgroup", "5"]
    r = runner.invoke(app, args + ["--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    res = ChangesAudit.load(tmp_path / "out" / "audit" / "changes" / "changes.json")
    assert [p.name for p in res.pairs] == ["a", "b"] and res.n == 40
    assert res.pairs[0].explanation is None and res.pairs[0].subgroups is not None
    assert (tmp_path / "out" / "audit" / "changes" / "a_reliability.png").is_file()
    # a compressed model with another label set: a clear error, nothing written
    other = create_model("densenet_tiny", 3, 1, 64)
    save_model(other, tmp_path / "other", make_card(other, ["x", "y", "z"], "multilabel",
                                                     Preprocess(64)))
    r = runner.invoke(app, ["audit", "changes", str(tmp_path / "dense"), str(tmp_path / "other"),
                            "--data", spec, "--split", "all", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "must share the data's class list" in str(r.exception)
    assert not (tmp_path / "bad").exists()
