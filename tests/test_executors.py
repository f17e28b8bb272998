"""Executors and resumable grids: same results on serial / local pool / Ray (2 local workers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medscalpel.errors import ConfigError, DataError, RunError
from medscalpel.pipeline.executors import EXECUTORS, CellError, map_cells
from medscalpel.cells import CellIndex
from medscalpel.pipeline.grid import (canonical, cell_id, grid_identity, prune_grid, run_cell,
                                      run_grid, run_prune_grid)


def write_csv_dataset(root: Path, n: int = 48, size: int = 32, seed: int = 0) -> str:
    """A tiny on-disk multi-label CSV dataset (PNG files); returns its spec."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["path,a,b,c,split"]
    for i in range(n):
        y = (rng.random(3) < [0.4, 0.35, 0.3]).astype(int)
        img = (rng.random((size, size)) * 80).astype(np.uint8)
        img[4:12, 4:12] += np.uint8(150 * y[0])
        img[20:28, 20:28] += np.uint8(150 * y[1])
        img[4:12, 20:28] += np.uint8(120 * y[2])
        Image.fromarray(img).save(root / "img" / f"{i:03d}.png")
        rows.append(f"img/{i:03d}.png,{y[0]},{y[1]},{y[2]},{('train', 'train', 'val', 'test')[i % 4]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return f"csv:{root / 'labels.csv'}?split_col=split"


def save_tiny_model(spec: str, out: Path, arch: str = "resnet_tiny", seed: int = 0) -> Path:
    import torch

    from medscalpel.data import Preprocess, open_dataset
    from medscalpel.models import create_model
    from medscalpel.models.checkpoint import make_card, save_model

    pp = Preprocess(size=32)
    ds = open_dataset(spec, split="test", preprocess=pp)
    torch.manual_seed(seed)
    m = create_model(arch, ds.num_classes, 1, 32)
    return save_model(m, out, make_card(m, ds.class_names, ds.task, pp))


@pytest.fixture(scope="module")
def grid_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    spec = write_csv_dataset(root / "data")
    m1 = save_tiny_model(spec, root / "m1", seed=0)
    m2 = save_tiny_model(spec, root / "m2", seed=1)
    return root, spec, [str(m1), str(m2)]


def _square(x):
    return x * x


def _fail_on_three(x):
    if x == 3:
        raise ZeroDivisionError("boom at three")
    return x


def _config_error(x):
    raise ConfigError("bad cell value")


@pytest.mark.parametrize("executor", ["serial", "local"])
def test_map_cells_keeps_order(executor):
    cells = list(range(7))
    assert map_cells(_square, cells, executor=executor, max_workers=2, progress=False) == \
        [c * c for c in cells]


def test_map_cells_errors_name_the_cell():
    with pytest.raises(CellError, match=r"Cell 2 \(3\) failed: ZeroDivisionError: boom at three"):
        map_cells(_fail_on_three, [1, 2, 3, 4], executor="local", max_workers=2, progress=False)
    with pytest.raises(ConfigError, match="bad cell value"):  # user errors pass through as is
        map_cells(_config_error, [1], executor="serial", progress=False)
    with pytest.raises(ConfigError, match="Unknown executor 'dask'. Valid names: local, ray, serial"):
        map_cells(_square, [1], executor="dask")
    with pytest.raises(ConfigError, match="--ray-address is only used with --executor ray"):
        map_cells(_square, [1], executor="local", ray_address="auto")
    with pytest.raises(ConfigError, match="max_workers"):
        map_cells(_square, [1], executor="local", max_workers=0)
    assert sorted(EXECUTORS.names()) == ["local", "ray", "serial"]


def test_cell_ids_stable_and_grid_checks():
    c = {"kind": "prune", "method": "l1", "ratio": 0.5, "model": "/a/b", "seed": None}
    assert cell_id(c) == cell_id(dict(reversed(list(c.items()))))
    assert cell_id(c) != cell_id({**c, "ratio": 0.55})
    assert cell_id(c).startswith("prune_l1_r0.5-")
    assert cell_id({"kind": "prune", "method": "l1", "ratio": 0.5})[:14] == "prune_l1_r0.5-"
    with pytest.raises(ConfigError, match="more than once"):
        run_grid([c, dict(c)], run_cell, "/nonexistent/never", executor="serial")
    with pytest.raises(ConfigError, match="must not be empty"):
        run_grid([], run_cell, "/nonexistent/never")
    with pytest.raises(ConfigError, match="ratios"):
        prune_grid(["m"], "csv:x", ratios=[1.0])
    with pytest.raises(ConfigError, match="methods"):
        prune_grid(["m"], "csv:x", methods=["l3"])


def _strip(res: CellIndex) -> str:
    return canonical(res.results())


def test_prune_grid_same_results_serial_local_and_resume(grid_setup, tmp_path):
    _, spec, models = grid_setup
    kw = dict(ratios=[0.0, 0.5, 0.9], methods=["l1", "random"], seeds=[0, 1], progress=False)
    a = run_prune_grid(models, spec, tmp_path / "serial", executor="serial", **kw)
    b = run_prune_grid(models, spec, tmp_path / "local", executor="local", max_workers=2, **kw)
    assert len(a.cells) == 2 * (3 + 2 * 3) and a.n_computed == 18 and a.n_skipped == 0
    assert _strip(a) == _strip(b)
    for ca, cb in zip(a.cells, b.cells):
        pa = np.load(a.artifact(ca.cell_id, "predictions.npz"))["logits"]
        pb = np.load(b.artifact(cb.cell_id, "predictions.npz"))["logits"]
        assert np.array_equal(pa, pb)
    # sparsity achieved, and pruning to 0.9 changes the logits
    r = {(c.cell["method"], c.cell["seed"], c.cell["ratio"]): c.result for c in a.cells
         if c.cell["model"] == models[0]}
    assert r[("l1", None, 0.9)]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert r[("l1", None, 0.0)]["sparsity"] < 0.01
    # rerun: everything skipped, same index; extending the grid computes only the new cells
    again = run_prune_grid(models, spec, tmp_path / "serial", executor="serial", **kw)
    assert again.n_computed == 0 and again.n_skipped == 18 and _strip(again) == _strip(a)
    with pytest.raises(ConfigError, match="--ray-address is only used with --executor ray"):
        run_prune_grid(models, spec, tmp_path / "serial", executor="local", ray_address="auto",
                       **kw)  # refused even when every cell is done
    more = run_prune_grid(models, spec, tmp_path / "serial", executor="serial",
                          **{**kw, "ratios": [0.0, 0.5, 0.7, 0.9]})
    assert more.n_computed == 2 * (1 + 2) and more.n_skipped == 18
    # the grid directory is a sweep directory for the audit stage: one index format
    from medscalpel.audit.forgettability import audit_forgettability
    from medscalpel.audit.sweepio import load_sweep
    from medscalpel.compress.sweep import SweepResult

    assert CellIndex.load(tmp_path / "serial").to_dict() == more.to_dict()
    sw = SweepResult.load(tmp_path / "serial")
    ratios, auc = sw.curve(sw.model_ids[0], "l1")
    assert list(ratios) == [0.0, 0.5, 0.7, 0.9] and np.isfinite(auc).all()
    assert sw.predictions(sw.model_ids[0], "random", 0.5, seed=1).n == 12
    swp = load_sweep(tmp_path / "serial", method="random")
    assert swp.levels.tolist() == [0.0, 0.5, 0.7, 0.9] and len(swp.seeds) == 2 * 2
    assert swp.info["achieved_sparsity"][f"{sw.model_ids[0]}-s1@0.9"] == pytest.approx(0.9, abs=1e-3)
    l1 = audit_forgettability(tmp_path / "serial", method="l1", n_boot=0, n_perm=5)
    assert l1.levels.tolist() == [0.0, 0.5, 0.7, 0.9]


def test_grid_refuses_other_data_and_recomputes_damaged_cells(grid_setup, tmp_path):
    root, spec, models = grid_setup
    cells = prune_grid(models[:1], spec, ratios=[0.0, 0.5], methods=["l1"])
    out = tmp_path / "g"
    first = run_grid(cells, run_cell, out, executor="serial", identity=grid_identity(cells))
    # a damaged (truncated) cell file is recomputed, the others are kept
    bad = out / "cells" / f"{first.cells[1].cell_id}.json"
    bad.write_text(bad.read_text()[:40])
    res = run_grid(cells, run_cell, out, executor="serial", identity=grid_identity(cells))
    assert (res.n_computed, res.n_skipped) == (1, 1) and _strip(res) == _strip(first)
    # another model file under the same path -> refused, nothing mixed
    other = save_tiny_model(spec, tmp_path / "m_other", seed=5)
    changed = [{**c, "model": str(other)} for c in cells]
    ident = grid_identity(changed)
    ident["models"] = {models[0]: ident["models"][str(other)]}
    with pytest.raises(RunError, match="different models .*manifest hashes differ"):
        run_grid(cells, run_cell, out, executor="serial", identity=ident)
    # a cell file from another grid (identity hash) is refused too
    forged = json.loads((out / "cells" / f"{first.cells[0].cell_id}.json").read_text())
    forged["identity_hash"] = "0" * 16
    (out / "cells" / f"{first.cells[0].cell_id}.json").write_text(json.dumps(forged))
    with pytest.raises(RunError, match="results are never mixed"):
        run_grid(cells, run_cell, out, executor="serial", identity=grid_identity(cells))
    with pytest.raises(DataError, match="no model.safetensors"):
        grid_identity([{**cells[0], "model": str(tmp_path / "nope")}])


def test_prune_grid_on_ray_equals_local(grid_setup, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'medscalpel[distributed]'")
    _, spec, models = grid_setup
    kw = dict(ratios=[0.0, 0.6], methods=["l1", "random"], seeds=[3], progress=False)
    local = run_prune_grid(models, spec, tmp_path / "local", executor="local", max_workers=2, **kw)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.cluster_resources().get("CPU") == 2
        on_ray = run_prune_grid(models, spec, tmp_path / "ray", executor="ray", **kw)
    finally:
        ray.shutdown()
    assert on_ray.executor["executor"] == "ray" and on_ray.n_computed == len(local.cells) == 8
    assert _strip(on_ray) == _strip(local)
    for ca, cb in zip(local.cells, on_ray.cells):
        assert ca.cell_id == cb.cell_id
        assert np.array_equal(np.load(local.artifact(ca.cell_id, "predictions.npz"))["logits"],
                              np.load(on_ray.artifact(cb.cell_id, "predictions.npz"))["logits"])
