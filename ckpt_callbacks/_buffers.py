"""Host buffers of an async manager's snapshots, kept between saves and mapped ahead of the first.

``save()`` with ``async_save=True`` blocks the training thread for one copy of the state into these
buffers. Later saves reuse them; the first save would map them fresh, and on a VM every freshly
mapped page costs a host fault (1-2 s per GiB, often more than the copy itself). When the state's
layout is known before the first save — a resumed run restored it — the buffers are allocated and
touched on a low-priority background thread right away, so the first save copies into memory the
process already has (SPEC §8 P4 from the first save on).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from . import _format as fmt

logger = logging.getLogger("ckpt_callbacks")

_PAGE = 4096


class SnapshotBuffers(dict):
    """name -> numpy buffer, a dict; ``prepare_like`` fills it in the background, ``wait`` joins that."""

    def __init__(self) -> None:
        super().__init__()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def prepare_like(self, state: Any) -> None:
        """Allocate and touch buffers for a state shaped like ``state`` (a restored one), in the background.

        Never raises: this only saves time, and the first save allocates whatever is missing.
        """
        try:
            self.wait()
            tensors = fmt.encode_tree(state, allow_pickle=True).tensors
            specs = [(t.name, t.shape, t.dtype) for t in tensors]
        except Exception as e:  # noqa: BLE001 - an optimisation; the save allocates instead
            logger.debug("Not preparing snapshot buffers: %s", e)
            return
        self._thread = threading.Thread(target=self._fill, args=(specs,), name="ckpt-prefault", daemon=True)
        self._thread.start()

    def _fill(self, specs: list[tuple[str, tuple, np.dtype]]) -> None:
        try:
            from ._manager import _lower_thread_priority

            _lower_thread_priority()
            for name, shape, dtype in specs:
                if self._stop.is_set():
                    return
                buf = self.get(name)
                if buf is not None and buf.shape == shape and buf.dtype == dtype:
                    continue
                buf = np.empty(shape, dtype)
                flat = buf.reshape(-1).view(np.uint8)
                flat[::_PAGE] = 0  # one write per page maps it now rather than during the first save
                self[name] = buf
        except Exception as e:  # noqa: BLE001 - e.g. MemoryError: the first save allocates instead
            logger.debug("Preparing snapshot buffers stopped: %s", e)

    def wait(self) -> None:
        """Join a preparation in flight: a buffer must never be touched while a snapshot fills it."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop a preparation in flight and drop every buffer."""
        self._stop.set()
        self.wait()
        self.clear()
