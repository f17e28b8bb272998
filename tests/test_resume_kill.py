"""No lost work: kill -9 a grid or a plain training run midway, rerun the same command (no
flag), and get the result of an uninterrupted run; a changed dataset is refused instead of
mixed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medscalpel.errors import RunError
from medscalpel.pipeline.grid import canonical, grid_identity, prune_grid, run_cell, run_grid

sys.path.insert(0, str(Path(__file__).parent))
from test_executors import save_tiny_model, write_csv_dataset  # noqa: E402

PY = sys.executable
ENV = {**os.environ, "MEDSCALPEL_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

GRID_SCRIPT = '''
import sys, time, json
import torch
torch.set_num_threads(1)
from medscalpel.pipeline.grid import grid_identity, run_cell, run_grid

def slow_cell(cell):
    time.sleep(0.3)
    return run_cell(cell)

if __name__ == "__main__":
    cells = json.loads(open(sys.argv[1]).read())
    res = run_grid(cells, slow_cell, sys.argv[2], executor="local", max_workers=2,
                   identity=grid_identity(cells), progress=False)
    print(json.dumps({"computed": res.n_computed, "skipped": res.n_skipped}))
'''

TRAIN_SCRIPT = '''
import sys, time, json
import numpy as np, torch
torch.set_num_threads(1)
from medscalpel.data import ArrayDataset, Preprocess
from medscalpel.engine.train import TrainConfig, train
from medscalpel.models import create_model
from medscalpel.runs import RunDir

class SlowArrays(ArrayDataset):
    def load_raw(self, index):
        time.sleep(0.004)
        return super().load_raw(index)

def data(cls):
    rng = np.random.default_rng(0)
    imgs = (rng.random((64, 32, 32)) * 80).astype(np.uint8)
    y = (rng.random((64, 3)) < [0.4, 0.3, 0.5]).astype(np.float32)
    imgs[y[:, 0] == 1, 4:12, 4:12] += 150
    return cls(imgs, y, ["a", "b", "c"], "multilabel", preprocess=Preprocess(size=32))

CFG = TrainConfig(epochs=6, batch_size=16, lr=3e-3, seed=1, device="cpu", patience=10)

def run(cls, out):
    """What 'medscalpel train --out OUT' does: a resumable RunDir (built under a hidden
    .partial name, adopted by the next identical run) with the checkpoint in RUN/checkpoint."""
    torch.manual_seed(1)
    model = create_model("densenet_tiny", 3, 1, 32)
    with RunDir(out, command="train", config={"epochs": CFG.epochs}, resumable=True) as run:
        return train(model, data(cls), None, CFG, checkpoint_dir=run.path / "checkpoint",
                     progress=False)

if __name__ == "__main__":
    res = run(SlowArrays, sys.argv[1])
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in res.model.state_dict().items()}, sys.argv[2])
    print(json.dumps({"resumed_from": res.resumed_from,
                      "losses": [h["train_loss"] for h in res.history]}))
'''


def _sigint_default() -> None:
    # a shell without job control starts background jobs with SIGINT ignored, and children
    # inherit that: the Ctrl-C case must test the run, not how the test suite was launched
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(script: Path, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([PY, str(script), *map(str, args)], env=ENV, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # its own process group: kill -9 it all
                            preexec_fn=_sigint_default)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0,
               sig: int = signal.SIGKILL) -> None:
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run finished before it could be killed:\n{out}\n{err}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the run made no progress to kill")
        time.sleep(0.02)
    os.killpg(proc.pid, sig)  # kill -9 (or Ctrl-C): the driver and its workers
    proc.wait(timeout=30)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # Ctrl-C: KeyboardInterrupt unwinds through the run directory
        assert proc.returncode != 0 and "KeyboardInterrupt" in proc.communicate()[1]


def _finish(proc_args, timeout=120, cwd: Path | None = None) -> dict:
    out = subprocess.run([PY, *map(str, proc_args)], env=ENV, capture_output=True, text=True,
                         timeout=timeout, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    spec = write_csv_dataset(root / "data")
    model = save_tiny_model(spec, root / "m1")
    return root, spec, str(model)


def test_kill9_grid_midway_then_resume(setup, tmp_path):
    root, spec, model = setup
    cells = prune_grid([model], spec, ratios=[0.0, 0.3, 0.6, 0.9], methods=["l1", "random"],
                       seeds=[0])
    (tmp_path / "cells.json").write_text(json.dumps(cells))
    script = tmp_path / "grid_script.py"
    script.write_text(GRID_SCRIPT)
    out = tmp_path / "grid"
    done_dir = out / "cells"

    def finished():
        return sorted(done_dir.glob("*.json")) if done_dir.is_dir() else []

    proc = _start(script, tmp_path / "cells.json", out)
    _kill_when(proc, lambda: len(finished()) >= 2)
    before = {p.name: p.read_bytes() for p in finished()}
    assert 2 <= len(before) < len(cells)
    for p in finished():  # atomic: every committed cell is complete, with its artifact
        d = json.loads(p.read_bytes())
        assert (done_dir / d["cell_id"] / "predictions.npz").is_file()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    stats = _finish([script, tmp_path / "cells.json", out])
    assert stats["skipped"] >= len(before) and stats["computed"] + stats["skipped"] == len(cells)
    for name, data in before.items():  # no finished cell was lost or redone
        assert (done_dir / name).read_bytes() == data
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    # equal to an uninterrupted run
    ref = run_grid(cells, run_cell, tmp_path / "ref", executor="serial",
                   identity=grid_identity(cells), progress=False)
    got = [json.loads((done_dir / f"{c.cell_id}.json").read_text())["result"] for c in ref.cells]
    assert canonical(got) == canonical(ref.results())
    for c in ref.cells:
        a = np.load(done_dir / c.cell_id / "predictions.npz")["logits"]
        assert np.array_equal(a, np.load(ref.artifact(c.cell_id, "predictions.npz"))["logits"])
    # the same command on a changed dataset refuses to mix results
    csv = Path(spec.split(":", 1)[1].split("?")[0])
    lines = csv.read_text().splitlines()
    row = 4  # image 3: in the evaluated 'test' split (a train row would not change its hash)
    assert lines[row].endswith(",test")
    lines[row] = lines[row].replace(",0,", ",1,", 1) if ",0," in lines[row] else \
        lines[row].replace(",1,", ",0,", 1)
    csv.write_text("\n".join(lines) + "\n")
    try:
        with pytest.raises(RunError, match="different data .*manifest hashes differ"):
            run_grid(cells, run_cell, tmp_path / "ref", executor="serial",
                     identity=grid_identity(cells), progress=False)
    finally:
        write_csv_dataset(root / "data")  # restore for other tests of the module


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_kill9_plain_training_after_epoch_1_then_resume(tmp_path, sig):
    """A killed plain run keeps its checkpoint in its private .partial folder; the SAME command
    run again (no flag) adopts it and continues from the last finished epoch; the result equals
    an uninterrupted run and nothing is left beside the finished run directory."""
    script = tmp_path / "train_script.py"
    script.write_text(TRAIN_SCRIPT)
    out = tmp_path / "run"

    def epochs_done():
        for p in tmp_path.glob(".run.*.partial"):
            try:
                return json.loads((p / "checkpoint" / "state.json").read_text())["epoch"] + 1
            except (OSError, ValueError, KeyError):
                return 0
        return 0

    # a relative --out, as users type it: the run is built in ./.run.XXXX.partial
    proc = _start(script, "run", tmp_path / "w.safetensors", "plain", cwd=tmp_path)
    _kill_when(proc, lambda: epochs_done() >= 1, sig=sig)
    done = epochs_done()
    assert 1 <= done < 6
    partial = list(tmp_path.glob(".run.*.partial"))
    assert len(partial) == 1 and (partial[0] / "checkpoint" / "state.json").is_file()
    assert not out.exists()  # nothing under the final name while it was not finished
    res = _finish([script, "run", tmp_path / "w.safetensors", "plain"], timeout=300,
                  cwd=tmp_path)
    assert res["resumed_from"] >= done and len(res["losses"]) == 6
    ckpt = out / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 5
    assert not list(tmp_path.glob(".run.*"))  # the orphan was adopted, not left behind
    # equal to an uninterrupted plain run in this process (same data); its checkpoint ends in
    # the finished run directory and nothing is left beside it
    sys.modules.pop("train_script", None)
    sys.path.insert(0, str(tmp_path))
    try:
        import train_script
    finally:
        sys.path.remove(str(tmp_path))
    from medscalpel.data import ArrayDataset
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    ref = train_script.run(ArrayDataset, tmp_path / "ref")
    assert json.loads((tmp_path / "ref" / "checkpoint" / "state.json").read_text())["epoch"] == 5
    assert not list(tmp_path.glob(".ref.*"))
    assert res["losses"] == [h["train_loss"] for h in ref.history]
    got = load_file(str(tmp_path / "w.safetensors"))
    for k, v in ref.model.state_dict().items():
        assert torch.equal(got[k], v), k
