"""Run directories, manifests and atomic writes.

Every command that writes output writes into a :class:`RunDir`. A new run is built in a hidden
private sibling directory (``.NAME.XXXX.partial``) under a lock on its ``--out``, and renamed into
place only when the work succeeds and only onto nothing: a run never deletes what it did not
create. Resumable runs (training, grids) keep their ``.partial`` after an interruption and the
next identical run adopts it. Single files are written to a temporary name and renamed.

The content hashes and the machine / version records of a manifest live in
:mod:`medscalpel.provenance` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.errors import DataError, RunError
from medscalpel.provenance import (CPU_FEATURES, cpu_flags, cpu_info, git_commit, hash_array,
                                   hash_bytes, hash_file, hash_strings, machine_info,
                                   package_versions)

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files: give them the usual permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        v = float(obj)
        return v
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _sanitize(obj: Any) -> Any:
    """Replace NaN/Inf by None so the JSON is standard (browsers refuse NaN)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _sanitize(obj.tolist())
    if isinstance(obj, (np.floating,)):
        return _sanitize(float(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if hasattr(obj, "to_dict") and not isinstance(obj, type):
        return _sanitize(obj.to_dict())
    return obj


def dumps_json(obj: Any) -> str:
    return json.dumps(_sanitize(obj), indent=2, default=_json_default, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as standard JSON (NaN -> null) atomically."""
    text = dumps_json(obj)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:

    path = Path(path)
    if not path.is_file():
        raise DataError(f"JSON file not found: {path}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}.") from exc


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# ----------------------------------------------------------------------------- run dirs
PARTIAL_SUFFIX = ".partial"


def final_path(path: str | os.PathLike) -> Path:
    """The final path of a run directory, also while it is being built under its temporary
    name (``.NAME.XXXX.partial`` beside it); other paths are returned unchanged."""
    path = Path(path)
    name = path.name
    if name.startswith(".") and name.endswith(PARTIAL_SUFFIX) and name.count(".") >= 3:
        return path.with_name(name[1:].rsplit(".", 2)[0])
    return path


def lock_path(final: str | os.PathLike) -> Path:
    """The lock file a run holds on its ``--out`` while it runs: ``.NAME.lock`` beside it."""
    final = Path(final)
    return final.parent / f".{final.name}.lock"


class _OutLock:
    """An exclusive, non-blocking ``flock`` on :func:`lock_path` of a run's ``--out``.

    The kernel drops the lock when its process dies (Ctrl-C, kill -9, power loss), so a stale
    lock file never blocks a later run; a second live run to the same ``--out`` is refused at
    its start. The file holds who holds it (pid, command, start time) for the error message.
    """

    def __init__(self, final: Path, command: str):
        self.path = lock_path(final)
        self.final = final
        self.command = command
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(20):  # a lock file removed between our open and flock: take the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                try:
                    holder = os.read(fd, 300).decode("utf-8", "replace").strip()
                finally:
                    os.close(fd)
                raise RunError(
                    f"Another medscalpel run ({holder or 'unknown process'}) is writing "
                    f"{self.final} right now. Wait for it to finish, or choose another --out."
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, (f"pid {os.getpid()}, '{self.command}', since "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S')}").encode())
                self.fd = fd
                return
            os.close(fd)
        raise RunError(f"Cannot lock {self.path}: it keeps changing. Choose another --out.")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it: a waiter re-checks the inode
        os.close(self.fd)
        self.fd = None


def _identity_of(d: dict[str, Any]) -> str:
    return hash_bytes(json.dumps(_sanitize(d), sort_keys=True, default=str).encode())


@dataclass
class RunDir:
    """A run directory that never destroys what it did not create.

    Use as a context manager. While the block runs, files are written under :attr:`path`: a
    private ``.NAME.XXXX.partial`` folder beside the final one, and a lock (:func:`lock_path`)
    refuses a second run to the same ``--out``. On success ``manifest.json`` is completed and the
    folder is renamed to its final name, but only onto nothing (or an empty folder, or, with
    ``overwrite=True``, the medscalpel run directory that was there when this run started); if
    something else appeared at ``--out`` meanwhile, the result stays in its ``.partial`` folder
    and :class:`RunError` says where. On failure the folder this run created is removed.

    ``resumable=True`` (training, grids of cells): an interrupted run (Ctrl-C, kill -9, power
    loss) keeps its ``.partial`` folder, and the next run of the same command and configuration
    adopts it and continues from its checkpoints; no flag is needed. An orphan ``.partial``
    that cannot be adopted (another configuration, or a non-resumable command) is left alone and
    named with the command that removes it (``--overwrite`` removes it).

    ``in_place=True`` (grids that grow): the run is built directly in the final directory,
    which may already hold an earlier run of the same identity (data and model hashes); its
    manifest must match the new ``identity`` or :class:`RunError` is raised. A folder at
    ``--out`` that is not a medscalpel run directory is never written into.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> with RunDir(d, command="doc", config={"a": 1}) as run:
        ...     _ = (run.path / "x.txt").write_text("hi")
        >>> sorted(p.name for p in d.iterdir())
        ['manifest.json', 'x.txt']
    """

    final: Path
    command: str
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    data: dict[str, Any] | None = None
    identity: dict[str, Any] | None = None
    in_place: bool = False
    overwrite: bool = False
    resumable: bool = False

    def __post_init__(self):
        if str(self.final).strip() == "":
            raise RunError("The output directory is empty (''): give a folder name with --out.")
        self.final = Path(self.final)
        self.path = self.final
        self._tmp: Path | None = None
        self._lock: _OutLock | None = None
        self._replace: tuple[int, int] | None = None  # (dev, inode) of the run to overwrite
        self.orphans: list[Path] = []
        self.adopted: Path | None = None
        self._t0 = 0.0

    # ------------------------------------------------------------------ identity
    def run_identity(self) -> dict[str, Any]:
        """What an adopted ``.partial`` must share with this run: the command, its
        configuration, seed and data (or the explicit ``identity``)."""
        return {"command": self.command, "config": self.config, "seed": self.seed,
                "data": self.data, "identity": self.identity}

    # ------------------------------------------------------------------ context protocol
    def __enter__(self) -> "RunDir":
        self._t0 = time.time()
        if self.final.exists() and not self.final.is_dir():
            raise RunError(f"{self.final} exists and is not a directory; choose another --out.")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _OutLock(self.final, self.command)
            self._lock.acquire()
        except OSError as exc:
            raise RunError(f"Cannot create the run directory {self.final}: "
                           f"{exc.strerror or exc} ({exc.filename or self.final.parent}). "
                           "Choose another --out in a folder you can write to.") from exc
        try:
            self._enter_locked()
        except BaseException:
            self._lock.release()
            raise
        return self

    def _enter_locked(self) -> None:
        if self.in_place:
            self._enter_in_place()
            return
        self._check_final_at_start()
        self.orphans = self._orphans()
        if self.resumable:
            self.adopted = self._adoptable(self.orphans)
            if self.adopted is not None:
                self.orphans.remove(self.adopted)
        self._handle_orphans()
        if self.adopted is not None:
            self._tmp = self.adopted
            logger.warning("resuming the interrupted run of %s from %s", self.final,
                           self.adopted.name)
        else:
            try:
                self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.",
                                                  suffix=PARTIAL_SUFFIX, dir=self.final.parent))
            except OSError as exc:
                raise RunError(f"Cannot create the run directory {self.final}: "
                               f"{exc.strerror or exc} ({exc.filename or self.final.parent}). "
                               "Choose another --out in a folder you can write to.") from exc
        self.path = self._tmp
        write_json(self._tmp / MANIFEST, self.manifest(status="running"))

    def _enter_in_place(self) -> None:
        if self.final.is_dir() and any(self.final.iterdir()):
            if not (self.final / MANIFEST).is_file():
                raise RunError(f"{self.final} exists and is not a medscalpel run directory (no "
                               f"{MANIFEST}); it is left untouched. Choose another --out.")
            self._check_identity()
        self.final.mkdir(parents=True, exist_ok=True)
        self.path = self.final
        self._tmp = None
        write_json(self.final / MANIFEST, self.manifest(status="running"))

    def _check_final_at_start(self) -> None:
        """``--out`` must be absent or empty, or (with ``overwrite``) a medscalpel run
        directory, which is then replaced at the end."""
        if not (self.final.is_dir() and any(self.final.iterdir())):
            return
        if not self.overwrite:
            raise RunError(f"Output directory {self.final} already exists and is not empty. "
                           "Choose another --out, or pass --overwrite to replace it.")
        if not (self.final / MANIFEST).is_file():
            raise RunError(f"{self.final} is not a medscalpel run directory (no {MANIFEST}); "
                           "--overwrite only replaces run directories, so it is left untouched. "
                           "Choose another --out.")
        st = self.final.stat()
        self._replace = (st.st_dev, st.st_ino)

    def _adoptable(self, orphans: list[Path]) -> Path | None:
        want = _identity_of(self.run_identity())
        for p in sorted(orphans, key=lambda q: q.stat().st_mtime, reverse=True):
            try:
                man = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if man.get("run_identity") == want and man.get("status") == "running":
                return p
        return None

    def _handle_orphans(self) -> None:
        if not self.orphans:
            return
        if self.overwrite:
            for p in self.orphans:
                shutil.rmtree(p, ignore_errors=True)
            logger.warning("removed %d unfinished run folder(s) of %s left by an interrupted run: "
                           "%s (--overwrite)", len(self.orphans), self.final,
                           ", ".join(p.name for p in self.orphans))
            self.orphans = []
            return
        for p in self.orphans:
            logger.warning("an unfinished run folder of %s was left by an interrupted run with "
                           "other settings and is not used: %s; remove it with: rm -r '%s' (or "
                           "pass --overwrite)", self.final.name, p.name, p)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    write_json(self.path / MANIFEST, self.manifest(status="complete"))
                    if self._tmp is not None:
                        self._finalize_paths()
                        self._commit()
                except OSError as err:
                    if err.errno == errno.ENOSPC:
                        self._after_failure(type(err), err)
                    raise
                self.path = self.final
                return
            self._after_failure(exc_type, exc)
        finally:
            if self._lock is not None:
                self._lock.release()

    def _after_failure(self, exc_type, exc) -> None:
        interrupted = issubclass(exc_type, (KeyboardInterrupt, SystemExit))
        if self._tmp is None or not self._tmp.exists():
            return
        disk_full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        if interrupted and self.resumable and not disk_full:
            with contextlib.suppress(OSError):
                write_json(self._tmp / MANIFEST, self.manifest(status="running"))
            logger.warning("interrupted: the work so far is kept in %s; rerun the same command "
                           "to resume it (rm -r '%s' discards it)", self._tmp, self._tmp)
            return
        shutil.rmtree(self._tmp, ignore_errors=True)
        if disk_full:
            raise RunError(f"The disk is full while writing {self.final}: the unfinished run "
                           "was removed to free its space and nothing was left under that name. "
                           "Free some space, or choose another --out on another disk.") from exc

    def _commit(self) -> None:
        """Rename the finished ``.partial`` onto its final name, only onto nothing, an empty
        folder, or the run directory that ``--overwrite`` was asked to replace."""
        assert self._tmp is not None
        old: Path | None = None
        if self.final.exists():
            st = self.final.stat()
            if self._replace is not None and (st.st_dev, st.st_ino) == self._replace:
                old = self.final.with_name(f".{self.final.name}.{os.getpid()}.replaced")
                os.replace(self.final, old)
            elif self.final.is_dir() and not any(self.final.iterdir()):
                with contextlib.suppress(OSError):
                    self.final.rmdir()
        try:
            os.rename(self._tmp, self.final)  # onto a non-empty folder: ENOTEMPTY, never merges
        except OSError as exc:
            if old is not None:
                os.replace(old, self.final)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                kept = self._tmp
                self._tmp = None
                raise RunError(
                    f"{self.final} appeared while this run was working and is left untouched; "
                    f"the finished result is kept in {kept}: move it where you want it "
                    f"(mv '{kept}' NEW_NAME).") from exc
            raise
        self._tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _orphans(self) -> list[Path]:
        """Hidden ``.NAME.XXXX.partial`` folders beside the final directory: what a killed
        run of the same --out left behind (no live run holds them: we hold the lock)."""
        parent = self.final.parent
        if not parent.is_dir():
            return []
        prefix = f".{self.final.name}."
        try:
            return sorted(p for p in parent.iterdir() if p.is_dir() and p.name.startswith(prefix)
                          and p.name.endswith(PARTIAL_SUFFIX) and p != self._tmp
                          and final_path(p) == self.final)
        except OSError:
            return []

    def final_of(self, path: str | os.PathLike) -> Path:
        """Where ``path`` (under :attr:`path`, the temporary directory while the run is being
        built) will be once the run is complete: the path to record in results."""
        p = Path(path)
        if self._tmp is not None:
            for tmp, final in ((self._tmp, self.final),
                               (self._tmp.resolve(), self.final.resolve())):
                try:
                    return final / p.relative_to(tmp)
                except ValueError:
                    continue
        return p

    def _finalize_paths(self, max_bytes: int = 50 << 20) -> None:
        """Rewrite the temporary directory's name to the final one in the text files of the
        run (JSON, Markdown, HTML, CSV, text), so that no recorded path points into a
        ``.partial`` folder that no longer exists."""
        assert self._tmp is not None
        pairs = [(str(self._tmp.resolve()), str(self.final.resolve())),
                 (str(self._tmp), str(self.final))]
        for f in self._tmp.rglob("*"):
            if f.suffix.lower() not in (".json", ".md", ".html", ".csv", ".txt", ".jsonl") \
                    or not f.is_file() or f.stat().st_size > max_bytes:
                continue
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            new = text
            for old, final in pairs:
                new = new.replace(old, final)
            if new != text:
                with atomic_path(f) as tmp:
                    tmp.write_text(new, encoding="utf-8")

    # ------------------------------------------------------------------ manifest
    def manifest(self, status: str) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "command": self.command,
            "argv": sys.argv,
            "status": status,
            "config": self.config,
            "seed": self.seed,
            "data": self.data,
            "identity": self.identity,
            "versions": package_versions(),
            "machine": machine_info(),
            "git_commit": git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self._t0 or time.time())),
            "seconds": round(time.time() - self._t0, 3) if self._t0 else None,
            "path": str(self.final),
            "run_identity": _identity_of(self.run_identity()),
        }

    def _check_identity(self) -> None:
        man = self.final / MANIFEST
        if not man.is_file():
            return
        old = read_json(man).get("identity")
        if self.identity is not None and old is not None and old != self.identity:
            diff = sorted(k for k in set(old) | set(self.identity)
                          if old.get(k) != self.identity.get(k))
            raise RunError(
                f"Cannot resume {self.final}: it was made with a different {', '.join(diff)} "
                "(the manifest hashes differ). Use a new --out for the new inputs."
            )


__all__ = ["CPU_FEATURES", "MANIFEST", "PARTIAL_SUFFIX", "RunDir", "atomic_path", "cpu_flags",
           "cpu_info", "dumps_json", "final_path", "git_commit", "hash_array", "hash_bytes",
           "hash_file", "hash_strings", "lock_path", "machine_info", "package_versions",
           "read_json", "write_json", "write_text"]
