"""Executors: run one function over many independent cells, locally or on a Ray cluster.

One interface, three engines (the :data:`EXECUTORS` registry):

* ``serial`` - in this process, one cell after the other (debugging, tests, tiny grids);
* ``local`` (default) - a :class:`concurrent.futures.ProcessPoolExecutor`, each worker limited
  to ``threads_per_worker`` torch threads. Workers are forked (cheap: no re-import of torch)
  unless CUDA is already initialised in this process or the platform lacks ``fork``, where
  they are spawned (CUDA cannot be forked); ``start_method`` overrides;
* ``ray`` - one Ray task per cell on an existing cluster (``ray_address``, e.g.
  ``ray://head:10001`` or ``auto``) or a local one started for the call.

A cell is a JSON-able ``dict``; ``fn`` is a picklable *top-level* function ``fn(cell) -> result``.
Results come back in the order of ``cells`` whatever the engine, and are the same whatever
the engine (the cell function must be deterministic; see ``docs/reliability.md``).

Example:
    >>> from medscalpel.pipeline.executors import map_cells
    >>> map_cells(abs, [-1, 2, -3], executor="serial", progress=False)
    [1, 2, 3]
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from medscalpel.errors import ConfigError, MedScalpelError, RunError, optional_import
from medscalpel.progress import track
from medscalpel.registry import Registry
from medscalpel.validation import check_range

logger = logging.getLogger(__name__)

CellFn = Callable[[Any], Any]

#: executor name -> class with ``imap(fn, cells) -> Iterator[(index, result)]``
EXECUTORS: Registry["Executor"] = Registry("executor")


class CellError(RunError):
    """A cell function failed; ``index`` and ``cell`` say which one."""

    def __init__(self, index: int, cell: Any, cause: BaseException):
        super().__init__(f"Cell {index} ({_short(cell)}) failed: {type(cause).__name__}: {cause}")
        self.index = index
        self.cell = cell
        self.cause = cause


def _short(cell: Any, n: int = 160) -> str:
    s = repr(cell)
    return s if len(s) <= n else s[: n - 3] + "..."


def _raise_cell_error(index: int, cell: Any, exc: BaseException) -> None:
    """Re-raise a user-facing error as is (its message already says what and how to fix);
    wrap anything else in :class:`CellError` naming the cell."""
    if isinstance(exc, MedScalpelError):
        raise exc
    raise CellError(index, cell, exc) from exc


def _init_worker(threads: int) -> None:  # runs in each local worker process

    torch.set_num_threads(threads)
    os.environ.setdefault("MEDSCALPEL_PROGRESS", "0")


def _cuda_initialized() -> bool:

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


class Executor:
    """Base class: subclasses implement :meth:`imap`.

    Args:
        max_workers: parallel cells (default: the CPU count, at most the number of cells).
        threads_per_worker: torch intra-op threads in each worker (1 by default: parallelism
            comes from the cells).
    """

    name = "base"

    def __init__(self, max_workers: int | None = None, threads_per_worker: int = 1, **_: Any):
        if max_workers is not None:
            check_range(max_workers, "max_workers", f"the '{self.name}' executor", 1, integer=True)
        check_range(threads_per_worker, "threads_per_worker", f"the '{self.name}' executor", 1,
                    integer=True)
        self.max_workers = max_workers
        self.threads_per_worker = threads_per_worker

    def imap(self, fn: CellFn, cells: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` as cells finish (any order)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "max_workers": self.max_workers,
                "threads_per_worker": self.threads_per_worker}


@EXECUTORS.register("serial", help="in this process, one cell after the other (debugging)")
class SerialExecutor(Executor):
    name = "serial"

    def imap(self, fn: CellFn, cells: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for i, cell in enumerate(cells):
            try:
                out = fn(cell)
            except Exception as exc:  # noqa: BLE001 - re-raised with the cell named
                _raise_cell_error(i, cell, exc)
            yield i, out


@EXECUTORS.register("local", help="a local process pool (default)")
class LocalExecutor(Executor):
    name = "local"

    def __init__(self, max_workers: int | None = None, threads_per_worker: int = 1,
                 start_method: str | None = None, **kw: Any):
        super().__init__(max_workers, threads_per_worker, **kw)
        if start_method is None:
            start_method = "spawn" if _cuda_initialized() or "fork" not in \
                mp.get_all_start_methods() else "fork"
        if start_method not in mp.get_all_start_methods():
            raise ConfigError(f"The 'start_method' parameter of the 'local' executor must be one "
                              f"of {mp.get_all_start_methods()}. Got {start_method!r} instead.")
        self.start_method = start_method

    def imap(self, fn: CellFn, cells: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if not cells:
            return
        n = min(self.max_workers or os.cpu_count() or 1, len(cells))
        pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context(self.start_method),
                                      initializer=_init_worker,
                                      initargs=(self.threads_per_worker,))
        try:
            futures = {pool.submit(fn, cell): i for i, cell in enumerate(cells)}
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    out = fut.result()
                except cf.process.BrokenProcessPool as exc:
                    raise RunError(f"A worker process of the 'local' executor died while running "
                                   f"cell {i} ({_short(cells[i])}), e.g. killed for memory. "
                                   "Finished cells are kept; rerun to resume, with fewer "
                                   "--max-workers if memory is short.") from exc
                except Exception as exc:  # noqa: BLE001 - re-raised with the cell named
                    _raise_cell_error(i, cells[i], exc)
                yield i, out
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@EXECUTORS.register("ray", help="Ray tasks on a cluster (--ray-address) or a local Ray")
class RayExecutor(Executor):
    """One Ray task per cell.

    Args:
        ray_address: the cluster to join (``auto``, ``ray://host:10001``, ``host:6379``);
            ``None`` joins the Ray already initialised in this process or starts a local one
            with ``max_workers`` CPUs.
        num_cpus_per_cell: CPUs Ray reserves per cell.
        num_gpus_per_cell: GPUs Ray reserves per cell (e.g. 1 for training cells).
    """

    name = "ray"

    def __init__(self, max_workers: int | None = None, threads_per_worker: int = 1,
                 ray_address: str | None = None, num_cpus_per_cell: float = 1.0,
                 num_gpus_per_cell: float = 0.0, **kw: Any):
        super().__init__(max_workers, threads_per_worker, **kw)
        check_range(num_cpus_per_cell, "num_cpus_per_cell", "the 'ray' executor", 0)
        check_range(num_gpus_per_cell, "num_gpus_per_cell", "the 'ray' executor", 0)
        self.ray_address = ray_address
        self.num_cpus_per_cell = num_cpus_per_cell
        self.num_gpus_per_cell = num_gpus_per_cell

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ray_address": self.ray_address,
                "num_cpus_per_cell": self.num_cpus_per_cell,
                "num_gpus_per_cell": self.num_gpus_per_cell}

    def imap(self, fn: CellFn, cells: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        ray = optional_import("ray", "distributed", "--executor ray")
        if not cells:
            return
        started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.ray_address:
                kw["address"] = self.ray_address
            elif self.max_workers:
                kw["num_cpus"] = self.max_workers
            try:
                ray.init(**kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RunError(f"Cannot connect to the Ray cluster at {self.ray_address!r}: {exc}. "
                               "Check --ray-address (e.g. 'auto' on a cluster node, or "
                               "'ray://head:10001'), or use --executor local.") from exc
            started = True
        try:
            task = ray.remote(num_cpus=self.num_cpus_per_cell,
                              num_gpus=self.num_gpus_per_cell)(_ray_call)
            refs = {task.remote(fn, cell, self.threads_per_worker): i
                    for i, cell in enumerate(cells)}
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = refs[ref]
                    try:
                        out = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - RayTaskError wraps the cause
                        for r in pending:
                            ray.cancel(r)
                        cause = getattr(exc, "cause", None) or exc
                        _raise_cell_error(i, cells[i], cause)
                    yield i, out
        finally:
            if started:
                ray.shutdown()


def _ray_call(fn: CellFn, cell: Any, threads: int) -> Any:
    _init_worker(threads)
    return fn(cell)


def get_executor(executor: str | Executor = "local", **kw: Any) -> Executor:
    """An :class:`Executor` from its registry name (``serial``, ``local``, ``ray``) or as is."""
    if isinstance(executor, Executor):
        return executor
    return EXECUTORS.create(str(executor), **kw)


def imap_cells(fn: CellFn, cells: Sequence[Any], executor: str | Executor = "local",
               max_workers: int | None = None, ray_address: str | None = None,
               progress: bool | None = None, **executor_kw: Any) -> Iterator[tuple[int, Any]]:
    """Like :func:`map_cells` but yields ``(index, result)`` as each cell finishes (so the
    caller can persist it at once)."""
    cells = list(cells)
    if ray_address is not None:
        executor_kw["ray_address"] = ray_address
    ex = get_executor(executor, max_workers=max_workers, **executor_kw)
    if ray_address is not None and ex.name != "ray":
        raise ConfigError(f"--ray-address is only used with --executor ray (got --executor "
                          f"{ex.name}).")
    yield from track(ex.imap(fn, cells), f"cells ({ex.name})", total=len(cells),
                     progress=progress)


def map_cells(fn: CellFn, cells: Sequence[Any], executor: str | Executor = "local",
              max_workers: int | None = None, ray_address: str | None = None,
              progress: bool | None = None, **executor_kw: Any) -> list[Any]:
    """Run ``fn`` on every cell; the results in the order of ``cells``.

    Args:
        fn: a picklable top-level function ``fn(cell) -> result``.
        cells: JSON-able cells (dicts).
        executor: ``local`` (process pool, default), ``serial`` or ``ray``, or an
            :class:`Executor`.
        max_workers: parallel cells (local pool size / CPUs of a local Ray).
        ray_address: the Ray cluster to join (``--executor ray`` only).
        progress: show a progress bar (default: ``MEDSCALPEL_PROGRESS``).
        **executor_kw: engine options (``threads_per_worker``, ``start_method``,
            ``num_cpus_per_cell``, ``num_gpus_per_cell``).

    Raises:
        MedScalpelError: a cell raised it (re-raised as is).
        CellError: a cell raised any other exception (the cell is named).
    """
    cells = list(cells)
    out: list[Any] = [None] * len(cells)
    for i, r in imap_cells(fn, cells, executor, max_workers, ray_address, progress,
                           **executor_kw):
        out[i] = r
    return out


__all__ = ["EXECUTORS", "CellError", "Executor", "LocalExecutor", "RayExecutor",
           "SerialExecutor", "get_executor", "imap_cells", "map_cells"]
