"""Small tensors of a data file: gathered into one write, hashed on the helper thread.

Thousands of small tensors (P3: 5,000 of 105 KiB) cost per tensor what one big tensor costs per
16 MiB chunk. So they are not copied into a buffer but written together by one gathered write
(``os.writev`` on local disk) of about ``batch_bytes``, and their checksums (and incremental
probes) are computed on the file's helper thread while the next batch is gathered and written
(xxhash releases the GIL). At most ``_IN_FLIGHT`` batches wait for their hashes, so a slow hash
never holds more than a few batches of materialised tensors alive.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from typing import Any

from .._format import _format as fmt
from . import _incremental

_IN_FLIGHT = 2


class Gather:
    """The small tensors written since the last flush, and the hashes still being computed."""

    def __init__(self, writer: Any, pool: Any, batch_bytes: int, probes: dict | None) -> None:
        self.writer, self.pool, self.batch_bytes, self.probes = writer, pool, batch_bytes, probes
        self.views: list[memoryview] = []
        self.to_hash: list[tuple[dict, str, memoryview]] = []
        self.nbytes = 0
        self.hashing: deque[Future] = deque()

    def add(self, view: memoryview, entry: dict, name: str, hash_it: bool) -> None:
        """Write ``view`` with the next batch; its checksum lands in ``entry["checksum"]`` (unless
        known: ``hash_it`` False) and its probe in ``probes[name]``."""
        self.views.append(view)
        self.nbytes += len(view)
        if hash_it or self.probes is not None:
            self.to_hash.append((entry if hash_it else {}, name, view))
        if self.nbytes >= self.batch_bytes:
            self.flush()

    def flush(self) -> None:
        """Write what is gathered (before a big tensor's bytes, and at the end)."""
        if self.to_hash:
            if self.pool is None:
                _hash_into(self.to_hash, self.probes)
            else:
                while len(self.hashing) >= _IN_FLIGHT:
                    self.hashing.popleft().result()
                self.hashing.append(self.pool.submit(_hash_into, self.to_hash, self.probes))
        if self.views:
            self.writer.write_many(self.views)
        self.views, self.to_hash, self.nbytes = [], [], 0

    def finish(self) -> None:
        self.flush()
        while self.hashing:
            self.hashing.popleft().result()


def _hash_into(items: list[tuple[dict, str, memoryview]], probes: dict | None) -> None:
    for entry, name, view in items:
        entry["checksum"] = fmt.checksum_bytes(view)
        if probes is not None:
            probes[name] = _incremental.probe_bytes(view, entry["checksum"])
