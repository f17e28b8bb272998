"""Run directories, manifests and atomic writes.

Every command that writes output writes into a :class:`RunDir`. A new run is built in a hidden
temporary sibling directory and renamed into place only when the work succeeds, so a failure
leaves nothing half-written. Single files are written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medscalpel.errors import RunError

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
    from medscalpel.errors import DataError

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


# ----------------------------------------------------------------------------- hashing
def hash_file(path: str | os.PathLike, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_strings(items: list[str] | tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def hash_array(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- environment
def package_versions() -> dict[str, str]:
    from importlib import metadata

    names = ["medscalpel", "torch", "torchvision", "timm", "numpy", "scikit-learn", "torch-pruning",
             "captum", "grad-cam", "zennit", "onnxruntime"]
    out: dict[str, str] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_info() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():  # pragma: no cover - GPU only
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- run dirs
def final_path(path: str | os.PathLike) -> Path:
    """The final path of a run directory, also while it is being built under its temporary
    name (``.NAME.XXXX.partial`` beside it); other paths are returned unchanged."""
    path = Path(path)
    name = path.name
    if name.startswith(".") and name.endswith(".partial") and name.count(".") >= 3:
        return path.with_name(name[1:].rsplit(".", 2)[0])
    return path


@dataclass
class RunDir:
    """A run directory built atomically.

    Use as a context manager: files are written under :attr:`path` (a temporary directory while
    the block runs); on success the directory is renamed to its final name and ``manifest.json``
    is written; on failure the temporary directory is removed and nothing is left behind.

    With ``resume=True`` an existing directory is reused in place (for resumable sweeps): its
    manifest must match the new one's ``identity`` (data and model hashes) or :class:`RunError`
    is raised.

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
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        self.final = Path(self.final)
        self.path = self.final
        self._tmp: Path | None = None
        self.orphans: list[Path] = []
        self._t0 = 0.0

    # ------------------------------------------------------------------ context protocol
    def __enter__(self) -> "RunDir":
        self._t0 = time.time()
        if self.final.exists() and not self.final.is_dir():
            raise RunError(f"{self.final} exists and is not a directory; choose another --out.")
        if self.resume and self.final.is_dir():
            self._check_identity()
            self.path = self.final
            self._tmp = None
            return self
        self.orphans = self._orphans()
        if self.orphans:
            names = ", ".join(p.name for p in self.orphans[:3])
            if self.overwrite:
                for p in self.orphans:
                    shutil.rmtree(p, ignore_errors=True)
                logger.warning("removed %d unfinished run folder(s) left by an interrupted run "
                               "of %s: %s (--overwrite)", len(self.orphans), self.final, names)
            else:
                logger.warning("%d unfinished run folder(s) of %s were left by an interrupted "
                               "run: %s (in %s); they are not used: delete them, or pass "
                               "--overwrite to clean them up", len(self.orphans), self.final.name,
                               names, self.final.parent)
        if self.final.exists() and any(self.final.iterdir()):
            if not self.overwrite:
                hint = (" It holds the checkpoint of an interrupted run: pass --resume to "
                        "continue it." if any(self.final.glob("**/checkpoint/state.json"))
                        else "")
                raise RunError(
                    f"Output directory {self.final} already exists and is not empty. "
                    "Choose another --out, or pass --overwrite to replace it." + hint
                )
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".partial",
                                              dir=self.final.parent))
        except OSError as exc:
            raise RunError(f"Cannot create the run directory {self.final}: "
                           f"{exc.strerror or exc} ({exc.filename or self.final.parent}). "
                           "Choose another --out in a folder you can write to.") from exc
        self.path = self._tmp
        if self.resume:
            # a resumable run is built in place so that finished cells survive a kill
            shutil.rmtree(self._tmp)
            self._tmp = None
            self.final.mkdir(parents=True, exist_ok=True)
            self.path = self.final
            write_json(self.final / MANIFEST, self.manifest(status="running"))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._tmp is not None and self._tmp.exists():
                shutil.rmtree(self._tmp, ignore_errors=True)
            return
        write_json(self.path / MANIFEST, self.manifest(status="complete"))
        if self._tmp is not None:
            self._finalize_paths()
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self._tmp, self.final)
            self._tmp = None
        self.path = self.final

    def _orphans(self) -> list[Path]:
        """Hidden ``.NAME.XXXX.partial`` folders beside the final directory: what a killed
        run of the same --out left behind."""
        parent = self.final.parent
        if not parent.is_dir():
            return []
        prefix = f".{self.final.name}."
        try:
            return sorted(p for p in parent.iterdir() if p.is_dir() and p.name.startswith(prefix)
                          and p.name.endswith(".partial") and p != self._tmp
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
