"""The one resumable cell engine (medscalpel.cells): computed once, skipped after, damaged cells
recomputed, identity refused, the index round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medscalpel.cells import INDEX, Cell, CellIndex, canonical, cell_id, run_cells
from medscalpel.errors import ConfigError, DataError, RunError


class Recorder:
    """A cell function that records each call: ``value = x * 10``, with two artifacts."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[int] = []
        self.fail_at = fail_at

    def __call__(self, cell):
        if cell["x"] == self.fail_at:
            raise ZeroDivisionError(f"boom at {cell['x']}")
        self.calls.append(cell["x"])
        return {"value": cell["x"] * 10,
                "artifacts": {"a.npy": np.arange(cell["x"] + 1, dtype=np.int64),
                              "info.json": {"x": cell["x"], "half": cell["x"] / 2}}}


GRID = [{"kind": "toy", "x": x} for x in range(4)]


def _run(out, fn, cells=GRID, **kw):
    return run_cells(cells, fn, out, identity={"data": "d0"}, progress=False, **kw)


def test_cell_computed_once_then_skipped(tmp_path):
    fn = Recorder()
    first = _run(tmp_path / "g", fn)
    assert fn.calls == [0, 1, 2, 3]
    assert (first.n_computed, first.n_skipped) == (4, 0)
    assert [c.result["value"] for c in first.cells] == [0, 10, 20, 30]
    c2 = first.cells[2]
    assert c2.cell == {"kind": "toy", "x": 2} and c2.cell_id == cell_id(GRID[2])
    assert np.array_equal(np.load(first.artifact(c2.cell_id, "a.npy")), [0, 1, 2])
    assert json.loads(first.artifact(c2.cell_id, "info.json").read_text()) == {"x": 2, "half": 1.0}
    assert c2.artifacts["a.npy"] == (tmp_path / "g" / c2.path / "a.npy").stat().st_size
    again = _run(tmp_path / "g", fn)
    assert fn.calls == [0, 1, 2, 3]  # nothing recomputed
    assert (again.n_computed, again.n_skipped) == (0, 4)
    assert not any(c.computed for c in again.cells)
    assert canonical(again.results()) == canonical(first.results())
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["command"] == "grid"


def test_damaged_cells_are_recomputed_others_kept(tmp_path):
    out = tmp_path / "g"
    first = _run(out, Recorder())
    ids = [c.cell_id for c in first.cells]
    (out / "cells" / f"{ids[0]}.json").write_text("{\"cell_id\": ")  # truncated commit file
    art = out / "cells" / ids[1] / "a.npy"
    art.write_bytes(art.read_bytes()[:-3])  # truncated artifact: its size differs
    (out / "cells" / ids[2] / "info.json").unlink()  # missing artifact
    fn = Recorder()
    res = _run(out, fn)
    assert sorted(fn.calls) == [0, 1, 2] and (res.n_computed, res.n_skipped) == (3, 1)
    assert canonical(res.results()) == canonical(first.results())
    assert np.array_equal(np.load(res.artifact(ids[1], "a.npy")), [0, 1])


def test_failed_run_keeps_finished_cells_and_resumes(tmp_path):
    out = tmp_path / "g"
    with pytest.raises(ZeroDivisionError, match="boom at 2"):
        _run(out, Recorder(fail_at=2), index_every_s=0.0)
    part = CellIndex.load(out)  # the index is written as cells finish
    assert [c.cell["x"] for c in part.cells] == [0, 1]
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    fn = Recorder()
    res = _run(out, fn)
    assert fn.calls == [2, 3] and (res.n_computed, res.n_skipped) == (2, 2)


def test_earlier_cells_stay_listed_and_new_cells_only_are_run(tmp_path):
    out = tmp_path / "g"
    _run(out, Recorder(), cells=GRID[:3])
    (out / INDEX).unlink()  # e.g. killed before the index was rewritten: the cell files count
    fn = Recorder()
    res = _run(out, fn, cells=GRID[2:])
    assert fn.calls == [3] and (res.n_computed, res.n_skipped) == (1, 1)
    assert [c.cell["x"] for c in res.cells] == [2, 3, 0, 1]  # requested first, then earlier


def test_identity_is_checked(tmp_path):
    out = tmp_path / "g"
    first = _run(out, Recorder())
    with pytest.raises(RunError, match="different data .*manifest hashes differ"):
        run_cells(GRID, Recorder(), out, identity={"data": "d1"}, progress=False)
    f = out / "cells" / f"{first.cells[0].cell_id}.json"
    forged = json.loads(f.read_text())
    forged["identity_hash"] = "0" * 16
    f.write_text(json.dumps(forged))
    with pytest.raises(RunError, match="results are never mixed"):
        _run(out, Recorder())


def test_index_round_trip_and_refusals(tmp_path):
    out = tmp_path / "g"
    idx = _run(out, Recorder(), command="scale toy", config={"note": "t"})
    d = json.loads((out / INDEX).read_text())
    assert d["schema_version"] == 2 and d["n_cells"] == 4 and d["command"] == "scale toy"
    assert CellIndex.load(out) == idx
    assert CellIndex.from_dict(idx.to_dict()) == idx
    assert Cell.from_dict(idx.cells[1].to_dict()) == idx.cells[1]
    assert [c.cell["x"] for c in idx.select(kind="toy", x=3)] == [3]
    assert idx.select(kind="prune") == []
    with pytest.raises(DataError, match="schema_version 1; this medscalpel reads 2"):
        CellIndex.from_dict({**d, "schema_version": 1})
    with pytest.raises(DataError, match="no artifact 'b.npy'"):
        idx.artifact(idx.cells[0].cell_id, "b.npy")
    # directories of the two older engines: a clear error naming the fix
    old = tmp_path / "old"
    old.mkdir()
    (old / "grid.json").write_text("{}")
    with pytest.raises(DataError, match=r"older medscalpel \(grid.json.*new --out"):
        CellIndex.load(old)
    with pytest.raises(RunError, match=r"older medscalpel \(grid.json\).*new --out"):
        _run(old, Recorder())


def test_bad_grids_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="must not be empty"):
        run_cells([], len, tmp_path / "a")
    with pytest.raises(ConfigError, match="more than once"):
        run_cells([{"x": 1}, {"x": 1}], len, tmp_path / "b")
    with pytest.raises(ConfigError, match="not JSON-able"):
        run_cells([{"x": object()}], len, tmp_path / "c")
    with pytest.raises(ConfigError, match="artifact name '../x' is not a plain file name"):
        run_cells([{"x": 1}], lambda c: {"artifacts": {"../x": np.zeros(1)}}, tmp_path / "d",
                  progress=False)
