"""Background saves: the host snapshot an async save blocks on, the worker thread's priority, and
the exit hook that reports a background failure nobody waited for.

The manager owns the worker (one thread, one save in flight); this module holds what does not need
the manager's state.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from typing import Any

import numpy as np

from . import _format as fmt
from . import _kinds

logger = logging.getLogger("ckpt_callbacks")

_WORKER_NICENESS = 10

# Managers with a background worker. Python joins the worker threads at exit, so a pending save
# still completes after `fit` returns; the exit hook then reports a failure that nobody waited for.
ASYNC_MANAGERS: weakref.WeakSet[Any] = weakref.WeakSet()


def snapshot(buffers: dict[str, np.ndarray], encoded: fmt.EncodedState) -> dict[str, np.ndarray]:
    """Copy every tensor into host ``buffers`` reused between saves (the only work async blocks on).

    Called only when no save is in flight, so the worker never reads a buffer being refilled.
    Buffers of tensors the state no longer has are dropped.
    """
    arrays = {}
    for t in encoded.tensors:
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
            np.copyto(buf, src, casting="no")
        arrays[t.name] = buf
    for stale in set(buffers) - set(arrays):
        del buffers[stale]
    return arrays


def lower_thread_priority() -> None:
    """Run the calling (worker) thread at a lower CPU priority than the training threads.

    Writing a checkpoint is memcpy into the page cache plus hashing, about one core's worth; on a
    machine whose cores the training step keeps busy it would otherwise slow every step (SPEC §8
    P5). The kernel's own write-back is unaffected, so the disk stays as busy as before. Linux
    applies setpriority(PRIO_PROCESS, tid) to that one thread; elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < _WORKER_NICENESS:
            os.setpriority(os.PRIO_PROCESS, tid, _WORKER_NICENESS)
    except (AttributeError, OSError):  # pragma: no cover - no permission / no such call
        pass


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
