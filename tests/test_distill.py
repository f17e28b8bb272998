"""Knowledge distillation (issue G): loss values on known inputs, training glue, the
teacher-student comparison and the hardware-aware student choice."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medscalpel.compress.distill import (DistillConfig, DistillLoss, DistillResult,
                                         attention_map, distill, distill_train, resolve_model,
                                         soft_divergence, teacher_divergence)
from medscalpel.compress.student_search import choose_student
from medscalpel.data import ArrayDataset, Preprocess
from medscalpel.engine.predict import collect_images
from medscalpel.engine.train import TrainConfig, train
from medscalpel.errors import ConfigError, DataError, ModelError
from medscalpel.models.checkpoint import load_model, make_card, save_model
from medscalpel.models.zoo import create_model

SIZE = 32


def _toy(n: int, seed: int, task: str = "multilabel") -> ArrayDataset:
    """Bright squares whose position is the label (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    imgs = rng.normal(0.3, 0.05, (n, SIZE, SIZE)).astype(np.float32)
    if task == "multilabel":
        y = (rng.random((n, 2)) < 0.5).astype(np.float32)
        imgs[y[:, 0] > 0, 4:12, 4:12] += 0.5
        imgs[y[:, 1] > 0, 20:28, 20:28] += 0.5
        names = ["left", "right"]
    else:
        y = rng.integers(0, 3, n)
        for i in range(n):
            r = 4 + 9 * int(y[i])
            imgs[i, r:r + 6, 10:20] += 0.5
        names = ["top", "middle", "bottom"]
    return ArrayDataset(np.clip(imgs, 0, 1), y, names, task, preprocess=Preprocess(size=SIZE),
                        spec=f"toy-{task}-{seed}", split=f"s{seed}")


@pytest.fixture(scope="module")
def ml_data():
    return _toy(64, 0), _toy(32, 1), _toy(24, 2)


@pytest.fixture(scope="module")
def ml_teacher(ml_data):
    torch.manual_seed(0)
    tr, va, _ = ml_data
    res = train(create_model("vgg_tiny", 2, img_size=SIZE), tr, va,
                TrainConfig(epochs=3, batch_size=16, lr=3e-3), progress=False)
    return res.model


# ----------------------------------------------------------------------------- loss values
S_ML = torch.tensor([[2.0, -1.0, 0.3], [-0.5, 1.5, 0.0]])
T_ML = torch.tensor([[0.5, 3.0, -2.0], [1.0, -1.0, 0.2]])
Y_ML = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0]])


def test_soft_weight_zero_is_pure_hard_loss_multilabel_with_unknown_labels():
    loss = DistillLoss(soft_weight=0.0, temperature=3.0, task="multilabel")
    known = torch.isfinite(Y_ML)
    ref = F.binary_cross_entropy_with_logits(S_ML[known], Y_ML[known])
    assert torch.isclose(loss(S_ML, T_ML, Y_ML), ref, atol=1e-6)


def test_soft_weight_zero_is_cross_entropy_multiclass():
    y = torch.tensor([0, 1])
    loss = DistillLoss(soft_weight=0.0, temperature=2.0, task="multiclass")
    assert torch.isclose(loss(S_ML, T_ML, y), F.cross_entropy(S_ML, y), atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_soft_weight_one_is_pure_soft_multiclass_kl(T):
    y = torch.tensor([0, 1])
    p_t = torch.softmax(T_ML / T, 1)
    log_q = torch.log_softmax(S_ML / T, 1)
    kl = (p_t * (p_t.log() - log_q)).sum(1).mean()
    loss = DistillLoss(soft_weight=1.0, temperature=T, task="multiclass")
    assert torch.isclose(loss(S_ML, T_ML, y), T * T * kl, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_soft_weight_one_is_sigmoid_bce_minus_teacher_entropy(T):
    p = torch.sigmoid(T_ML / T)
    bce = F.binary_cross_entropy_with_logits(S_ML / T, p)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    loss = DistillLoss(soft_weight=1.0, temperature=T, task="multilabel")
    # the labels (with NaN) must not matter when soft_weight = 1
    assert torch.isclose(loss(S_ML, T_ML, Y_ML), T * T * (bce - entropy), atol=1e-5)


def test_hybrid_is_the_weighted_sum():
    loss = DistillLoss(soft_weight=0.7, temperature=2.0, task="multilabel")
    parts = loss.components(S_ML, T_ML, Y_ML)
    assert torch.isclose(parts["total"], 0.3 * parts["hard"] + 0.7 * 4.0 * parts["soft"])
    assert set(parts) == {"hard", "soft", "total"}


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_identical_logits_soft_term_is_zero_with_zero_gradient(task):
    s = T_ML.clone().requires_grad_(True)
    soft = soft_divergence(s, T_ML, task, temperature=3.0)
    soft.backward()
    assert abs(float(soft.detach())) < 1e-6
    assert s.grad.abs().max() < 1e-6
    # the sigmoid BCE itself is at its minimum there: the teacher's entropy, not 0
    if task == "multilabel":
        p = torch.sigmoid(T_ML / 3.0)
        bce = F.binary_cross_entropy_with_logits(T_ML / 3.0, p)
        assert float(bce) > 0.3
        assert torch.isclose(bce, -(p * p.log() + (1 - p) * (1 - p).log()).mean(), atol=1e-6)


def test_large_temperature_reaches_the_logit_matching_limits():
    # Hinton et al.: T^2 KL -> mean over images of ||(s - mean s) - (t - mean t)||^2 / (2K)
    T = 200.0
    d = (S_ML - S_ML.mean(1, keepdim=True)) - (T_ML - T_ML.mean(1, keepdim=True))
    limit_mc = (d.pow(2).sum(1) / (2 * S_ML.shape[1])).mean()
    got = DistillLoss(soft_weight=1.0, temperature=T, task="multiclass")(S_ML, T_ML, torch.tensor([0, 1]))
    assert torch.isclose(got, limit_mc, rtol=1e-2)
    # per-class sigmoid: KL(Bern(t/T) || Bern(s/T)) ~ (s - t)^2 / (8 T^2)
    limit_ml = ((S_ML - T_ML).pow(2) / 8).mean()
    got = DistillLoss(soft_weight=1.0, temperature=T, task="multilabel")(S_ML, T_ML, Y_ML)
    assert torch.isclose(got, limit_ml, rtol=1e-2)
    # T = 1 differs from the limit (the soft targets are sharp there)
    t1 = DistillLoss(soft_weight=1.0, temperature=1.0, task="multilabel")(S_ML, T_ML, Y_ML)
    assert not torch.isclose(t1, limit_ml, rtol=1e-1)


def test_feature_projection_is_learnable_and_shape_checked():
    loss = DistillLoss(0.5, 2.0, "multilabel", feature_weight=1.0, student_dim=4, teacher_dim=6)
    assert isinstance(loss.projection, torch.nn.Linear)
    fs, ft = torch.randn(5, 4, requires_grad=True), torch.randn(5, 6)
    parts = loss.components(S_ML[:1].repeat(5, 1), T_ML[:1].repeat(5, 1),
                            torch.ones(5, 3), student_features=fs, teacher_features=ft)
    ref = F.mse_loss(loss.projection(fs), ft)
    assert torch.isclose(parts["feature"], ref)
    parts["total"].backward()
    assert loss.projection.weight.grad is not None and loss.projection.weight.grad.abs().sum() > 0
    assert fs.grad.abs().sum() > 0
    same = DistillLoss(0.5, 2.0, "multilabel", feature_weight=1.0, student_dim=6, teacher_dim=6)
    assert isinstance(same.projection, torch.nn.Identity)
    bare = DistillLoss(0.5, 2.0, "multilabel", feature_weight=1.0)
    with pytest.raises(ConfigError, match="student_dim and\\s+teacher_dim|teacher_dim"):
        bare.feature_loss(fs, ft)
    with pytest.raises(ConfigError, match="needs student_features"):
        bare(S_ML, T_ML, Y_ML)


def test_attention_transfer_values():
    t = torch.rand(2, 8, 4, 4)
    # attention maps are invariant to scaling and to the channel count (mean over channels)
    assert float(DistillLoss.attention_loss(3.0 * t, t)) < 1e-10
    s = torch.cat([t, t], 1)
    assert float(DistillLoss.attention_loss(s, t)) < 1e-10
    # a student map at another resolution is resized to the teacher's
    up = F.interpolate(t.pow(2).mean(1, keepdim=True), size=(8, 8), mode="nearest").sqrt()
    assert float(DistillLoss.attention_loss(up, t)) < 0.02
    other = torch.zeros(2, 8, 4, 4)
    other[:, :, 0, 0] = 1.0
    a_t = attention_map(t)
    a_o = attention_map(other)
    assert torch.isclose(DistillLoss.attention_loss(other, t), (a_o - a_t).pow(2).mean())
    assert float(DistillLoss.attention_loss(other, t)) > 0.01
    with pytest.raises(DataError, match="\\[N, C, h, w\\]"):
        DistillLoss.attention_loss(torch.rand(2, 8), t)


def test_loss_parameter_errors():
    with pytest.raises(ConfigError, match="'soft_weight' parameter of DistillLoss"):
        DistillLoss(soft_weight=1.5)
    with pytest.raises(ConfigError, match="'temperature' parameter of DistillLoss"):
        DistillLoss(temperature=0.0)
    with pytest.raises(ConfigError, match="'task' parameter of DistillLoss"):
        DistillLoss(task="regression")
    with pytest.raises(DataError, match="differ; both models must predict the same classes"):
        soft_divergence(torch.zeros(2, 3), torch.zeros(2, 4), "multiclass")
    with pytest.raises(DataError, match="class indices"):
        DistillLoss(soft_weight=0.0, task="multiclass")(S_ML, T_ML, Y_ML)


# ----------------------------------------------------------------------------- training
def test_distillation_lowers_divergence_from_the_teacher(ml_data, ml_teacher):
    tr, va, te = ml_data
    student = create_model("resnet_tiny", 2, img_size=SIZE)
    before_state = copy.deepcopy(student.state_dict())
    images, _ = collect_images(te)
    before = teacher_divergence(student, ml_teacher, images, "multilabel")
    loss = DistillLoss(soft_weight=1.0, temperature=2.0, task="multilabel")
    res = distill_train(ml_teacher, student, tr, None, loss,
                        TrainConfig(epochs=4, batch_size=16, lr=3e-3), progress=False)
    after = teacher_divergence(res.model, ml_teacher, images, "multilabel")
    assert after < 0.5 * before, (before, after)
    # the caller's student is unchanged, the teacher's flags are restored
    for k, v in student.state_dict().items():
        assert torch.equal(v, before_state[k])
    assert all(p.requires_grad for p in ml_teacher.parameters())
    assert not ml_teacher.training
    assert res.extra["distill"]["soft_weight"] == 1.0


def test_feature_and_attention_transfer_train_the_projection(ml_data, ml_teacher):
    tr, _, _ = ml_data
    student = create_model("densenet_tiny", 2, img_size=SIZE)
    loss = DistillLoss(0.5, 2.0, "multilabel", feature_weight=1.0, attention_weight=10.0,
                       student_dim=student.feature_dim, teacher_dim=ml_teacher.feature_dim)
    assert student.feature_dim != ml_teacher.feature_dim
    w0 = loss.projection.weight.detach().clone()
    res = distill_train(ml_teacher, student, tr, None, loss,
                        TrainConfig(epochs=1, batch_size=16, lr=1e-2, max_steps_per_epoch=3),
                        progress=False)
    assert not torch.allclose(loss.projection.weight, w0)
    assert not hasattr(res.model, "distill_projection")
    assert set(res.model.state_dict()) == set(student.state_dict())
    # hooks were removed: a forward pass stores nothing anywhere and gives plain logits
    assert not res.model.backbone._forward_hooks
    assert not ml_teacher.backbone._forward_hooks


def test_distill_train_refuses_mismatched_models(ml_data, ml_teacher):
    tr, _, _ = ml_data
    loss = DistillLoss(0.5, 2.0, "multilabel")
    with pytest.raises(ModelError, match="student .* does not fit the data"):
        distill_train(ml_teacher, create_model("resnet_tiny", 3, img_size=SIZE), tr, None, loss,
                      TrainConfig(epochs=1))
    no_dims = DistillLoss(0.5, 2.0, "multilabel", feature_weight=1.0)
    with pytest.raises(ConfigError, match="differ in width"):
        distill_train(ml_teacher, create_model("densenet_tiny", 2, img_size=SIZE), tr, None,
                      no_dims, TrainConfig(epochs=1))


# ----------------------------------------------------------------------------- comparison
def test_distill_compares_and_saves_with_lineage(ml_data, ml_teacher, tmp_path):
    tr, va, te = ml_data
    cfg = DistillConfig(soft_weight=0.5, temperature=2.0,
                        train=TrainConfig(epochs=2, batch_size=16, lr=3e-3), n_boot=20,
                        saliency_images=2, saliency_method="scorecam", latency_repeats=2,
                        latency_rounds=1)
    res = distill(ml_teacher, "resnet_tiny", tr, va, te, cfg, progress=False)
    d = res.to_dict()
    assert set(d["students"]) == {"distilled", "alone"}
    t_params = sum(p.numel() for p in ml_teacher.parameters())
    for s in d["students"].values():
        assert s["arch"] == "resnet_tiny"
        assert s["param_ratio"] == pytest.approx(s["parameters"] / t_params)
        assert s["speedup"] == pytest.approx(d["teacher"]["latency_ms"] / s["latency_ms"])
        assert 0 <= s["metrics"]["auroc"] <= 1 and len(s["metrics"]["auroc_ci"]) == 2
        assert s["divergence"] >= 0
    assert d["teacher"]["parameters"] == t_params
    assert d["targets"]["param_ratio_met"] == (d["students"]["distilled"]["param_ratio"] <= 0.1)
    sal = d["saliency"]["distilled"]
    assert sal["method"] == "scorecam" and set(sal["classes"]) == {"left", "right"}
    assert all(v["n_images"] == 2 for v in sal["classes"].values())
    # the same initial weights and seed: the two students differ only by the loss
    assert (d["students"]["distilled"]["train"]["distill"]["temperature"] == 2.0
            and "distill" not in d["students"]["alone"]["train"])
    res.save(tmp_path / "run")
    m = load_model(tmp_path / "run" / "model")
    step = m.card.lineage[-1]
    assert step["method"] == "distill" and step["soft_weight"] == 0.5 and step["temperature"] == 2.0
    assert step["epochs"] == 2 and step["parent"] == "vgg_tiny"
    assert DistillResult.load_dict(tmp_path / "run")["students"]["distilled"]["model_id"] == \
        m.card.model_id
    x, _ = collect_images(te, 4)
    assert torch.allclose(m(x), res.model(x), atol=1e-5)


def test_distill_multiclass_from_a_model_dir_student(tmp_path):
    tr, va, te = _toy(48, 3, "multiclass"), _toy(24, 4, "multiclass"), _toy(24, 5, "multiclass")
    teacher = create_model("vgg_tiny", 3, img_size=SIZE)
    teacher.card = make_card(teacher, tr.class_names, "multiclass", tr.preprocess)
    save_model(teacher, tmp_path / "teacher")
    student = create_model("resnet_tiny", 3, img_size=SIZE)
    save_model(student, tmp_path / "student",
               make_card(student, tr.class_names, "multiclass", tr.preprocess))
    cfg = DistillConfig(soft_weight=0.8, temperature=3.0, baseline=False, n_boot=0, saliency_images=0,
                        train=TrainConfig(epochs=1, batch_size=16), latency_repeats=1,
                        latency_rounds=1)
    res = distill(tmp_path / "teacher", tmp_path / "student", tr, va, te, cfg, progress=False)
    assert set(res.students) == {"distilled"}
    assert "accuracy" in res.students["distilled"]["metrics"]
    assert res.teacher["model_id"] == load_model(tmp_path / "teacher").card.model_id
    assert res.model.card.lineage[-1]["parent"] == res.teacher["model_id"]
    assert res.saliency == {}


def test_distill_error_paths(ml_data, ml_teacher, tmp_path):
    tr, va, te = ml_data
    with pytest.raises(ModelError, match="Unknown student 'nosuchnet'"):
        distill(ml_teacher, "nosuchnet", tr, va, te, DistillConfig(saliency_images=0))
    (tmp_path / "junk").mkdir()
    with pytest.raises(ModelError, match="not a medscalpel model directory"):
        resolve_model(str(tmp_path / "junk"), tr)
    with pytest.raises(ConfigError, match="saliency_classes \\[5\\]"):
        distill(ml_teacher, "resnet_tiny", tr, va, te, DistillConfig(saliency_classes=(5,)))
    with pytest.raises(ConfigError, match="'saliency_method' parameter of DistillConfig"):
        distill(ml_teacher, "resnet_tiny", tr, va, te, DistillConfig(saliency_method="lime"))
    mc = _toy(16, 6, "multiclass")
    with pytest.raises(DataError, match="test data's classes/task differ"):
        distill(ml_teacher, "resnet_tiny", tr, va, mc, DistillConfig())


# ----------------------------------------------------------------------------- student choice
def test_choose_student_picks_within_budget(ml_data, ml_teacher):
    tr, va, _ = ml_data
    res = choose_student(["resnet_tiny", "densenet_tiny"], 1e6, (tr, va), ml_teacher,
                         proxy_epochs=1, proxy_steps=2, batch_size=16, latency_repeats=2,
                         latency_rounds=1, progress=False)
    rows = {r.name: r for r in res.rows}
    assert set(rows) == {"resnet_tiny", "densenet_tiny"}
    assert all(r.within_budget and r.latency_ms > 0 and r.macs > 0 for r in rows.values())
    trained = [r for r in rows.values() if r.status in ("trained", "chosen")]
    assert len(trained) == 2
    best = max(trained, key=lambda r: (r.proxy_auroc, -r.latency_ms))
    assert res.chosen == best.name and rows[res.chosen].status == "chosen"
    assert res.model is not None and res.model.arch == res.chosen
    assert res.to_dict()["procedure"]["latency"]["batch_size"] == 1
    # the same seed gives the same proxy scores, whatever drew from torch's random state before
    # (a fresh candidate's first weights come from the seed, not from the global state)
    torch.rand(7)
    again = choose_student(["resnet_tiny", "densenet_tiny"], 1e6, (tr, va), ml_teacher,
                           proxy_epochs=1, proxy_steps=2, batch_size=16, latency_repeats=2,
                           latency_rounds=1, progress=False)
    assert ({r.name: r.proxy_auroc for r in again.rows}
            == {r.name: r.proxy_auroc for r in res.rows})


def test_choose_student_budget_filters_and_errors(ml_data, ml_teacher):
    from medscalpel.compress.measure import cpu_latency

    tr, va, _ = ml_data
    x = tr.image(0)[None]
    small, big = create_model("densenet_tiny", 2, img_size=SIZE), create_model("resnet50", 2,
                                                                               img_size=SIZE)
    budget = math.sqrt(cpu_latency(small, x, repeats=5) * cpu_latency(big, x, repeats=5))
    res = choose_student([small, big], budget, (tr, va), ml_teacher, proxy_steps=1,
                         batch_size=16, latency_repeats=3, latency_rounds=1, progress=False)
    rows = {r.arch: r for r in res.rows}
    assert not rows["resnet50"].within_budget and rows["resnet50"].status.startswith("skipped")
    assert math.isnan(rows["resnet50"].proxy_auroc)
    assert res.chosen == rows["densenet_tiny"].name == "densenet_tiny#0"
    with pytest.raises(ConfigError, match="no candidate is within the latency budget"):
        choose_student(["resnet_tiny"], 1e-6, (tr, va), ml_teacher, proxy_steps=1,
                       latency_repeats=1, latency_rounds=1, progress=False)
    with pytest.raises(ConfigError, match="'latency_budget_ms' parameter of choose_student"):
        choose_student(["resnet_tiny"], -1.0, (tr, va), ml_teacher)
    with pytest.raises(ConfigError, match="at least one student"):
        choose_student([], 10.0, (tr, va), ml_teacher)
    with pytest.raises(ConfigError, match="untrained architecture name"):
        choose_student(["resnet_tiny"], 10.0, (tr, va), "vgg_tiny")
    with pytest.raises(DataError, match="\\(train_ds, val_ds\\) pair"):
        choose_student(["resnet_tiny"], 10.0, [tr], ml_teacher)


# ----------------------------------------------------------------------------- CLI
def test_cli_distill_and_students(tmp_path):
    import typer
    from typer.testing import CliRunner

    from medscalpel.cli.distill_cmd import distill as distill_cli
    from medscalpel.cli.distill_cmd import students as students_cli

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 48), ("val", 16), ("test", 16)):
        y = rng.integers(0, 2, (n, 1))
        x = rng.integers(0, 60, (n, SIZE, SIZE)).astype(np.uint8)
        x[y[:, 0] == 1, 8:20, 8:20] = 220
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    npz = tmp_path / "pneumoniamnist_32.npz"
    np.savez(npz, **arrays)
    app = typer.Typer()
    app.command("distill")(distill_cli)
    app.command("students")(students_cli)
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["distill", "vgg_tiny", "--data", f"medmnist:{npz}", "--student",
                            "resnet_tiny", "--out", str(out), "--epochs", "1",
                            "--teacher-epochs", "1", "--size", str(SIZE), "--batch-size", "16",
                            "--saliency-images", "1", "--saliency-method", "gradcam",
                            "--n-boot", "0", "--soft-weight", "0.7", "--temperature", "2"])
    assert r.exit_code == 0, r.output
    d = DistillResult.load_dict(out / "distill")
    assert d["config"]["soft_weight"] == 0.7 and d["teacher"]["trained_here"]["epochs_run"] == 1
    assert (out / "manifest.json").is_file() and (out / "distill" / "student_alone" / "model.json").is_file()
    m = load_model(out / "distill" / "model")
    assert m.arch == "resnet_tiny" and m.card.class_names == ("NORMAL", "PNEUMONIA")
    r = runner.invoke(app, ["students", str(out / "distill" / "model"), "--data", f"medmnist:{npz}",
                            "--candidates", "densenet_tiny,resnet_tiny", "--latency-budget-ms",
                            "1000", "--out", str(tmp_path / "st"), "--proxy-steps", "1",
                            "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    from medscalpel.runs import read_json

    st = read_json(tmp_path / "st" / "students.json")
    assert st["chosen"] in ("densenet_tiny", "resnet_tiny") and len(st["candidates"]) == 2


def test_one_distillation_weight_everywhere():
    """soft_weight means the TEACHER's weight in DistillLoss, the training-loop teacher_loss
    (pruning recovery, grids) and every CLI flag; no 'alpha' is left to mean the opposite."""
    import inspect

    import medscalpel.pipeline.grid as grid
    from medscalpel.cli import distill_cmd, scale_cmd
    from medscalpel.compress.distill import teacher_loss

    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 2)
    x = torch.randn(5, 4)
    s = torch.randn(5, 2)
    y = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    with torch.no_grad():
        t = teacher(x)
    for w in (0.0, 0.25, 1.0):
        got = teacher_loss(teacher, "multilabel", soft_weight=w, temperature=2.0)(s, y, x)
        want = DistillLoss(soft_weight=w, temperature=2.0, task="multilabel")(s, t, y)
        assert torch.equal(got, want)
    hard = DistillLoss(soft_weight=0.0)(s, t, y)
    teach = DistillLoss(soft_weight=1.0, temperature=2.0)(s, t, y)
    mixed = DistillLoss(soft_weight=0.25, temperature=2.0)(s, t, y)
    assert torch.isclose(mixed, 0.75 * hard + 0.25 * teach)
    assert not any(p.requires_grad for p in teacher.parameters())
    for fn in (distill_cmd.distill, distill_cmd.students, scale_cmd.distill, grid.distill_grid,
               grid.run_distill_grid):
        params = inspect.signature(fn).parameters
        assert not any("alpha" in p for p in params), fn.__name__
        assert any(p.startswith("soft_weight") for p in params), fn.__name__
