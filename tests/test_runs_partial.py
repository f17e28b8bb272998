"""Interrupted runs: orphaned .partial folders are named by the next run (or cleaned with
--overwrite); recorded paths are the final ones, never the temporary .partial folder."""

import json
import logging

from medscalpel.runs import RunDir, write_json


def test_orphan_partial_named_then_cleaned(tmp_path, caplog):
    orphan = tmp_path / ".train.k1ll3d.partial"
    (orphan / "checkpoints").mkdir(parents=True)
    (orphan / "checkpoints" / "last.pt").write_bytes(b"x")
    other = tmp_path / ".trainer.abcd.partial"  # another run's name: not ours
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="medscalpel.runs"):
        with RunDir(tmp_path / "train", command="t") as run:
            assert run.orphans == [orphan]
    assert ".train.k1ll3d.partial" in caplog.text and "--overwrite" in caplog.text
    assert orphan.exists() and other.exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medscalpel.runs"):
        with RunDir(tmp_path / "train", command="t", overwrite=True):
            pass
    assert "removed 1 unfinished" in caplog.text
    assert not orphan.exists() and other.exists()


def test_recorded_paths_are_final(tmp_path):
    final = tmp_path / "demo"
    with RunDir(final, command="demo") as run:
        assert ".partial" in run.path.name
        inner = run.path / "models" / "m"
        assert run.final_of(inner) == final / "models" / "m"
        write_json(run.path / "a.json", {"model": str(inner), "abs": str(inner.resolve())})
        (run.path / "r.md").write_text(f"see {inner}\n")
    text = (final / "a.json").read_text() + (final / "r.md").read_text()
    assert ".partial" not in text
    assert json.loads((final / "a.json").read_text())["model"] == str(final / "models" / "m")
    man = json.loads((final / "manifest.json").read_text())
    assert man["path"] == str(final) and man["status"] == "complete"
