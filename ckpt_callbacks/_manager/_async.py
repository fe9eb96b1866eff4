"""Background saves: the host snapshot an async save blocks on (and its buffers, mapped ahead of the
first save when the state's layout is known), the worker thread's priority, and the exit hook that
reports a background failure nobody waited for.

The manager owns the worker (one thread, one save in flight); this module holds what does not need
the manager's state.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .._format import _format as fmt
from .._format import _kinds
from ..errors import CheckpointError, CheckpointWriteError

logger = logging.getLogger("ckpt_callbacks")

_WORKER_NICENESS = 10

# Managers with a background worker. Python joins the worker threads at exit, so a pending save
# still completes after `fit` returns; the exit hook then reports a failure that nobody waited for.
ASYNC_MANAGERS: weakref.WeakSet[Any] = weakref.WeakSet()


# Pages are touched this many bytes at a time, so a preparation stops soon after it is told to.
_TOUCH_CHUNK = 64 << 20
_PAGE = 4096


class SnapshotBuffers(dict):
    """Tensor name -> host buffer of the async snapshots, kept between saves.

    The first save would map its buffers fresh, and on a VM every freshly mapped page costs a host
    fault (1-2 s per GiB, often more than the copy itself). When the state's layout is known before
    the first save (a resumed run restored it, or a callback passes the live state at train start),
    :meth:`prepare_like` allocates and touches them on a low-priority background thread, so the
    first save copies into memory the process already has.
    """

    def __init__(self) -> None:
        super().__init__()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def prepare_like(self, state: Any) -> bool:
        """Start preparing buffers for a state shaped like ``state``; True when a preparation started.

        Never raises: this only saves time, and the first save allocates whatever is missing.
        """
        try:
            self.finish()
            specs = [(t.name, t.shape, t.dtype) for t in fmt.encode_tree(state, allow_pickle=True).tensors]
        except Exception as e:  # noqa: BLE001 - an optimisation; the save allocates instead
            logger.debug("Not preparing snapshot buffers: %s", e)
            return False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(specs, self._stop), name="ckpt-prepare", daemon=True
        )
        self._thread.start()
        return True

    def _fill(self, specs: list[tuple[str, tuple, np.dtype]], stop: threading.Event) -> None:
        try:
            lower_thread_priority()
            for name, shape, dtype in specs:
                buf = self.get(name)
                if buf is not None and buf.shape == shape and buf.dtype == dtype:
                    continue
                buf = np.empty(shape, dtype)
                self[name] = buf
                flat = buf.reshape(-1).view(np.uint8)
                for start in range(0, flat.size, _TOUCH_CHUNK):
                    if stop.is_set():
                        return
                    flat[start : start + _TOUCH_CHUNK : _PAGE] = 0  # one write per page maps it now
        except Exception as e:  # noqa: BLE001 - e.g. MemoryError: the first save allocates instead
            logger.debug("Preparing snapshot buffers stopped: %s", e)

    def wait(self) -> None:
        """Join a preparation in flight (it runs to its end)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def finish(self) -> None:
        """Stop a preparation in flight, keeping what it made: a snapshot never fills a buffer the
        preparation is still touching, and never waits for the rest of it."""
        self._stop.set()
        self.wait()

    def close(self) -> None:
        """Stop a preparation in flight and drop every buffer."""
        self.finish()
        self.clear()


# numpy copies are split into pieces of about this size and run on a few threads (numpy releases the
# GIL while it copies), so the copy an async save blocks on uses more than one core.
_COPY_PIECE = 32 << 20
_COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
_copy_pool: ThreadPoolExecutor | None = None
_copy_pool_lock = threading.Lock()


def copy_all(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """``np.copyto(dst, src)`` for every pair, in ~32 MiB pieces spread over up to 4 threads.

    On memory the process already has, one core rarely saturates the memory bus; on buffers mapped
    fresh (a first save), the page faults are shared between cores too. Small arrays are batched so
    that a task is never much smaller than a piece.
    """
    tasks: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    size = 0
    for dst, src in pairs:
        if dst.nbytes >= 2 * _COPY_PIECE and dst.flags.c_contiguous and src.flags.c_contiguous:
            d, s = dst.reshape(-1), src.reshape(-1)
            n = max(1, _COPY_PIECE // dst.itemsize)
            tasks.extend([(d[i : i + n], s[i : i + n])] for i in range(0, d.size, n))
            continue
        if size >= _COPY_PIECE:
            tasks.append([])
            size = 0
        tasks[-1].append((dst, src))
        size += dst.nbytes
    tasks = [t for t in tasks if t]
    if _COPY_THREADS < 2 or len(tasks) < 2:
        for task in tasks:
            _copy_task(task)
        return
    for _ in _pool().map(_copy_task, tasks):  # re-raises a failed copy
        pass


def _copy_task(task: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for dst, src in task:
        np.copyto(dst, src, casting="no")


def _pool() -> ThreadPoolExecutor:
    global _copy_pool
    with _copy_pool_lock:
        if _copy_pool is None:
            _copy_pool = ThreadPoolExecutor(_COPY_THREADS, thread_name_prefix="ckpt-copy")
        return _copy_pool


def snapshot(buffers: SnapshotBuffers, encoded: fmt.EncodedState) -> dict[str, np.ndarray]:
    """Copy every tensor into host ``buffers`` reused between saves (the only work async blocks on).

    Called only when no save is in flight, so the worker never reads a buffer being refilled.
    Buffers of tensors the state no longer has are dropped.
    """
    buffers.finish()
    arrays = {}
    numpy_copies: list[tuple[np.ndarray, np.ndarray]] = []
    for t in encoded.tensors:
        if isinstance(t.source, fmt.LazyArray) and t.source.immutable:
            arrays[t.name] = t.array()  # e.g. a JAX array's buffer: kept as it is, no copy
            continue
        buf = buffers.get(t.name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = np.empty(t.shape, dtype=t.dtype)
            buffers[t.name] = buf
        if t.kind == _kinds.NUMPY or not _kinds.get(t.kind).copy_into(buf, t.source):
            src = t.array()
            if src.shape != buf.shape or src.dtype != buf.dtype:
                raise ValueError(
                    f"Tensor {t.name!r} changed while saving: expected {t.dtype} {t.shape}, "
                    f"got {src.dtype} {src.shape}."
                )
            if isinstance(t.source, np.ndarray):
                numpy_copies.append((buf, src))  # copied below, several at once
            else:  # read on demand (LazyArray): copied now, so one such read is alive at a time
                np.copyto(buf, src, casting="no")
        arrays[t.name] = buf
    copy_all(numpy_copies)
    for stale in set(buffers) - set(arrays):
        del buffers[stale]
    return arrays


def lower_thread_priority() -> None:
    """Run the calling (worker) thread at a lower CPU priority than the training threads.

    Writing a checkpoint is memcpy into the page cache plus hashing, about one core's worth; on a
    machine whose cores the training step keeps busy it would otherwise slow every step (P5 in
    docs/performance.md). The kernel's own write-back is unaffected, so the disk stays as busy as
    before. Linux applies setpriority(PRIO_PROCESS, tid) to that one thread; elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < _WORKER_NICENESS:
            os.setpriority(os.PRIO_PROCESS, tid, _WORKER_NICENESS)
    except (AttributeError, OSError):  # pragma: no cover - no permission / no such call
        pass


class BackgroundSaves:
    """The background-save half of :class:`CheckpointManager` (a mixin: it uses the manager's
    ``_lock``, ``_closed``, ``_storage`` and ``_run_job``). One worker thread, one save in flight;
    ``_pending`` is its future, ``_error`` a failure not yet raised, ``_waited_saves`` the count of
    saves that had to wait for the previous one."""

    _executor: ThreadPoolExecutor | None = None
    _pending: Future | None = None
    _error: BaseException | None = None
    _waited_saves = 0

    def _prepare_snapshot(self, state: Any) -> bool:
        """Map the host buffers of an async manager's snapshots for a state shaped like ``state``, on
        a low-priority background thread, so the first ``save`` copies into memory already mapped.

        For the framework callbacks at train start (``state``: the live state they will save; only its
        tensors' shapes and dtypes are read, nothing is copied). Returns at once; True when a
        preparation started (False for a sync or closed manager, or a state that cannot be saved).
        Restoring with an async manager prepares from the restored state by itself.
        """
        if not self._async or self._closed:
            return False
        return self._buffers.prepare_like(state)

    def _prepared(self, state: Any) -> Any:
        """``state``, after starting :meth:`_prepare_snapshot` for it (a restored state)."""
        self._prepare_snapshot(state)
        return state

    def _submit(self, job: Any) -> None:
        """Hand a prepared save (a :class:`._writer.SaveJob`) to the worker thread (started on first use)."""
        with self._lock:
            if self._closed:
                raise CheckpointError("This CheckpointManager is closed; create a new one to save.")
            try:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="ckpt-save")
                    ASYNC_MANAGERS.add(self)
                self._pending = self._executor.submit(self._save_background, job)
            except RuntimeError:
                # The interpreter is shutting down (e.g. save() from an atexit handler) and
                # refuses new threads: write it here rather than lose the save.
                self._pending = None
                self._run_job(job)

    def _wait_previous(self, name: str) -> None:
        """A save requested while one is in flight waits for it: never coalesced, every step is written.

        Each such wait is counted and logged, so a save interval shorter than the write time shows up.
        """
        pending = self._pending
        if pending is not None and not pending.done():
            t0 = time.perf_counter()
            self._wait(raise_error=True)
            self._waited_saves += 1
            logger.info(
                "Async save of %s waited %.3f s for the previous save to finish (%d such wait(s) so far); "
                "save less often or to faster storage to avoid blocking training.",
                self._storage.url_of(name),
                time.perf_counter() - t0,
                self._waited_saves,
            )
        else:
            self._wait(raise_error=True)

    def _save_background(self, job: Any) -> None:
        """The worker's job: write, commit, rotate. A failure is kept for the next save / wait / close
        and logged at once, so it is seen even if the program never calls the manager again."""
        lower_thread_priority()
        try:
            self._run_job(job)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
            logger.error(
                "Background save of %s failed: %s: %s", self._storage.url_of(job.name), type(e).__name__, e
            )
            with self._lock:
                self._error = self._error or e

    def _wait(self, raise_error: bool) -> None:
        # Never wait while holding self._lock: the worker takes it to commit.
        pending = self._pending
        if pending is not None:
            pending.result()  # _save_background never raises
            with self._lock:
                if self._pending is pending:
                    self._pending = None
        if raise_error:
            self._raise_pending_error()

    def _raise_pending_error(self) -> None:
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointWriteError(f"A background save failed: {type(err).__name__}: {err}") from err


@atexit.register
def _finish_pending_saves() -> None:
    for mgr in list(ASYNC_MANAGERS):
        try:
            mgr._wait(raise_error=True)
        except BaseException as e:  # noqa: BLE001 - nobody is left to raise to
            logger.error("A background checkpoint save in %s failed before exit: %s", mgr.directory, e)
            print(
                f"ckpt_callbacks: background save in {mgr.directory} failed before exit: {e}", file=sys.stderr
            )
