"""A run never destroys what it did not create (issue R): a folder that appears at --out while
a run works, a second run to the same --out, --overwrite of something that is not a run, a
full disk, an interrupted resumable run and orphans of other settings."""

from __future__ import annotations

import errno
import json
import logging

import pytest

from medscalpel.errors import RunError
from medscalpel.runs import MANIFEST, RunDir, lock_path


def _partials(parent, name="out"):
    return sorted(parent.glob(f".{name}.*.partial"))


def test_folder_created_at_out_during_the_run_is_never_deleted(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RunError, match=r"appeared while this run was working.*kept in"):
        with RunDir(out, command="t") as run:
            (run.path / "result.txt").write_text("mine")
            out.mkdir()  # the user makes a folder there meanwhile...
            (out / "notes.txt").write_text("user data")
    assert (out / "notes.txt").read_text() == "user data"  # ...and keeps it
    kept = _partials(tmp_path)
    assert len(kept) == 1 and (kept[0] / "result.txt").read_text() == "mine"
    assert not lock_path(out).exists()


def test_empty_folder_at_out_is_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with RunDir(out, command="t") as run:
        (run.path / "a.txt").write_text("a")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", MANIFEST]


def test_second_run_to_the_same_out_is_refused_at_start(tmp_path):
    out = tmp_path / "out"
    with RunDir(out, command="first") as run:
        with pytest.raises(RunError, match=r"Another medscalpel run \(pid \d+, 'first'.*is "
                                           r"writing .*choose another --out"):
            RunDir(out, command="second").__enter__()
        (run.path / "a.txt").write_text("first")
        assert len(_partials(tmp_path)) == 1  # the refused run made nothing
    assert (out / "a.txt").read_text() == "first"
    with RunDir(out, command="third", overwrite=True):  # the lock is released at the end
        pass


def test_existing_run_needs_overwrite_and_user_folders_are_never_overwritten(tmp_path):
    out = tmp_path / "out"
    with RunDir(out, command="t") as run:
        (run.path / "old.txt").write_text("old")
    with pytest.raises(RunError, match="already exists and is not empty.*--overwrite"):
        RunDir(out, command="t").__enter__()
    with RunDir(out, command="t", overwrite=True) as run:
        assert (out / "old.txt").exists()  # replaced only at the end
        (run.path / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "new.txt"]
    assert not list(tmp_path.glob(".out.*"))
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"x")
    with pytest.raises(RunError, match="not a medscalpel run directory.*left untouched"):
        RunDir(user, command="t", overwrite=True).__enter__()
    assert (user / "cat.jpg").read_bytes() == b"x" and not _partials(tmp_path, "photos")


def test_empty_out_name_is_refused():
    with pytest.raises(RunError, match="empty"):
        RunDir("", command="t")


def test_disk_full_leaves_nothing_and_frees_the_space(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RunError, match="disk is full.*nothing was left"):
        with RunDir(out, command="train", resumable=True) as run:
            (run.path / "checkpoint").mkdir()
            (run.path / "checkpoint" / "big.bin").write_bytes(b"0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(run.path / "x"))
    assert not out.exists() and not _partials(tmp_path) and not lock_path(out).exists()


def test_failure_removes_what_the_run_created(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with RunDir(out, command="t", resumable=True):
            raise ValueError("boom")
    assert not out.exists() and not _partials(tmp_path)


def test_interrupted_resumable_run_is_adopted_by_the_same_command(tmp_path, caplog):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with RunDir(out, command="train", config={"epochs": 3}, resumable=True) as run:
            (run.path / "epoch1.txt").write_text("done")
            raise KeyboardInterrupt
    (partial,) = _partials(tmp_path)
    assert json.loads((partial / MANIFEST).read_text())["status"] == "running"
    # another configuration does not adopt it: it is named with the command that removes it
    with caplog.at_level(logging.WARNING, logger="medscalpel.runs"):
        with RunDir(out.with_name("other"), command="train", resumable=True):
            pass
        with pytest.raises(RunError):  # (other: nothing to do with 'out')
            RunDir(out.with_name("other"), command="train").__enter__()
    with caplog.at_level(logging.WARNING, logger="medscalpel.runs"):
        caplog.clear()
        with pytest.raises(KeyboardInterrupt):
            with RunDir(out, command="train", config={"epochs": 4}, resumable=True) as run2:
                assert run2.adopted is None and not (run2.path / "epoch1.txt").exists()
                raise KeyboardInterrupt
    assert "rm -r" in caplog.text
    assert len(_partials(tmp_path)) == 2
    with RunDir(out, command="train", config={"epochs": 3}, resumable=True) as run3:
        assert run3.adopted == partial and (run3.path / "epoch1.txt").read_text() == "done"
    assert (out / "epoch1.txt").read_text() == "done"
    assert json.loads((out / MANIFEST).read_text())["status"] == "complete"
    assert len(_partials(tmp_path)) == 1  # the epochs=4 one, named, not deleted


def test_interrupted_plain_run_removes_its_partial(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with RunDir(out, command="evaluate"):
            raise KeyboardInterrupt
    assert not out.exists() and not _partials(tmp_path)


def test_in_place_grid_never_writes_into_a_user_folder(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("x")
    with pytest.raises(RunError, match="not a medscalpel run directory"):
        RunDir(user, command="grid", in_place=True).__enter__()
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]
