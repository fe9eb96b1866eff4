"""Counting reads of checkpoint files, for tests that a restore reads each byte once.

Importable by a test's subprocess too (the Keras tests put this directory on its path):
``reads = count_reads(lambda obj, name, value: setattr(obj, name, value))``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class StorageReads:
    """Reads of checkpoint files (``.index``, ``.data-``) through the storage layer, by file name:
    every ``Storage.read_bytes`` (whole or head) and every ``Storage.open_read``. Real files, real
    reads; only counted. ``reset()`` starts a count (e.g. after a manager's construction)."""

    COUNTED = (".index", ".data-")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        self.counts = {}

    def add(self, name: str) -> None:
        base = name.rsplit("/", 1)[-1]
        if any(part in base for part in self.COUNTED):
            self.counts[base] = self.counts.get(base, 0) + 1

    def read_twice(self) -> dict[str, int]:
        return {n: c for n, c in self.counts.items() if c > 1}

    def assert_each_read_once(self) -> None:
        """Each counted file was read at most once, and an index and a data file were read."""
        assert not self.read_twice(), f"files read more than once: {self.read_twice()} (all: {self.counts})"
        assert any(n.endswith(".index") for n in self.counts), f"no index read: {self.counts}"
        assert any(".data-" in n for n in self.counts), f"no data file read: {self.counts}"


def count_reads(setattr_: Callable[[Any, str, Any], None]) -> StorageReads:
    """Wrap ``Storage.read_bytes`` / ``Storage.open_read`` through ``setattr_`` (pytest's
    ``monkeypatch.setattr``, or plain ``setattr`` in a subprocess); returns the counter."""
    from ckpt_callbacks._storage import Storage

    reads = StorageReads()
    read_bytes, open_read = Storage.read_bytes, Storage.open_read

    def counted_read_bytes(self: Any, name: str, max_bytes: int | None = None) -> bytes:
        reads.add(name)
        return read_bytes(self, name, max_bytes)

    def counted_open_read(self: Any, name: str) -> Any:
        reads.add(name)
        return open_read(self, name)

    setattr_(Storage, "read_bytes", counted_read_bytes)
    setattr_(Storage, "open_read", counted_open_read)
    return reads
