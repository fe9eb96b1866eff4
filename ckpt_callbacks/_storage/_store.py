"""``Storage``: one checkpoint directory on any fsspec filesystem, and which writer each store gets."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import CheckpointNotFoundError, CheckpointWriteError
from . import _compat, _gcs, _local, _s3
from ._base import STREAMING_PROTOCOLS, AtomicWriter, BufferWriter, StreamWriter
from ._retry import RetryingReader, retry_call

T = TypeVar("T")
_NOT_FOUND = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


class Storage:
    """One checkpoint directory on any fsspec filesystem."""

    def __init__(self, directory: str | os.PathLike, storage_options: dict | None = None) -> None:
        directory = os.fspath(directory)
        if not isinstance(directory, str) or not directory:
            raise ValueError(f"directory must be a non-empty path or URL. Received: directory={directory!r}.")
        self.fs, root = fsspec.core.url_to_fs(directory, **(storage_options or {}))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/") or root
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.protocol = protocol
        self.streaming = protocol in STREAMING_PROTOCOLS
        self._gcs_ours: bool | None = None  # see _gcs.drives; None: not known yet
        self._dir_sync: _local.Background | None = None  # a directory fsync in flight (local disk)
        if self.is_local:
            self.url = os.path.abspath(directory) if "://" not in directory else self.root
        else:
            self.url = self.fs.unstrip_protocol(self.root)
            # Paths come back in the spelling the caller used ("memory://x/run", not fsspec's
            # "memory:///x/run") when that spelling names the same place.
            given = directory.rstrip("/")
            if given != self.url and "://" in given and "::" not in given and "?" not in given:
                if _compat.strip_protocol(given).rstrip("/") == self.root:
                    self.url = given

    # ------------------------------------------------------------------ names

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name) if not self.is_local else os.path.join(self.root, name)

    def url_of(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}" if not self.is_local else os.path.join(self.url, name)

    # ------------------------------------------------------------------ writing

    def abort_pending_uploads(self, is_ours: Callable[[str], bool]) -> list[str]:
        """Abort unfinished multipart uploads of names ``is_ours`` accepts (S3); returns those names.

        Other stores have nothing to abort: local disk leaves temp files (removed as leftovers), and a
        GCS resumable session is never visible and expires by itself.
        """
        return _s3.abort_leftover_uploads(self, is_ours)

    def makedirs(self) -> None:
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except Exception as e:  # noqa: BLE001 - any backend error is a write failure
            raise CheckpointWriteError(f"Cannot create checkpoint directory {self.url!r}: {e}") from e

    def writer(self, name: str) -> AtomicWriter:
        if self.is_local:
            return _local.LocalWriter(self, name)
        if _s3.is_s3(self):
            # s3fs's own writer uploads parts one at a time; ours uploads them in parallel.
            return _s3.S3MultipartWriter(self, name)
        if self._gcs_writer():
            return _gcs.GCSResumableWriter(self, name)
        if self.streaming:
            return StreamWriter(self, name)
        return BufferWriter(self, name)

    @property
    def parallel_parts(self) -> bool:
        """Whether one object's upload is itself parallel (our S3 multipart writer)."""
        return _s3.is_s3(self)

    def _gcs_writer(self) -> bool:
        """Whether our GCS resumable writer drives this store (asked once, unless the answer was unknown)."""
        if self._gcs_ours is None:
            ours = _gcs.drives(self)
            if ours is None:
                return False
            self._gcs_ours = ours
        return self._gcs_ours

    def staged_writer(self, name: str, data: bytes) -> Any:
        """A writer of ``name`` holding ``data``, not yet committed (aborted if the write fails)."""
        w = self.writer(name)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        return w

    def write_bytes(self, name: str, data: bytes) -> None:
        self.staged_writer(name, data).commit()

    def prepare(self, writers: list[AtomicWriter]) -> None:
        """Make what ``writers`` wrote durable, not yet visible; their ``commit()`` then publishes.

        On local disk their temp files are fsync'd concurrently (one fsync's latency for all of them).
        A writer that fails has aborted itself; the caller aborts the others.
        """
        if self.is_local and len(writers) > 1:
            _local.concurrently([w.prepare for w in writers])
        else:
            for w in writers:
                w.prepare()

    def sync_dir(self, *, wait: bool = True) -> None:
        """Make renames in the directory durable (local disk only).

        ``wait=False``: the directory fsync runs in the background; the next rename, removal or
        ``sync_dir`` of this Storage waits for it first (``settle``), so nothing becomes visible before
        what was renamed earlier is durable, and a temp file can be fsync'd meanwhile.
        """
        if not self.is_local:
            return
        self.settle()
        if wait:
            _local.sync_dir(self.root)
        else:
            root = self.root
            self._dir_sync = _local.in_background(lambda: _local.sync_dir(root))

    def settle(self) -> None:
        """Wait for a background directory fsync (``sync_dir(wait=False)``)."""
        pending, self._dir_sync = self._dir_sync, None
        if pending is not None:
            pending.result()

    def free_bytes(self) -> int | None:
        return _local.free_bytes(self.root) if self.is_local else None

    def remove(self, names: Iterable[str]) -> None:
        self.settle()
        for name in names:
            path = self.path(name)
            try:
                if self.is_local:
                    _local.remove(path)
                else:
                    self._retrying(lambda p=path: self.fs.rm_file(p), f"delete {name}")
            except FileNotFoundError:
                pass

    def _retrying(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``; on object stores retried with bounded backoff on transient errors (5xx, resets)."""
        if not self.streaming:
            return fn()
        return retry_call(fn, f"{what} in {self.url}")

    # ------------------------------------------------------------------ reading

    def list_names(self) -> list[str]:
        """Names of the files directly in the directory ([] if it does not exist)."""
        if self.is_local:
            return _local.list_names(self.root)
        self.fs.invalidate_cache(self.root)
        try:
            entries = self._retrying(lambda: self.fs.ls(self.root, detail=False), "list")
        except FileNotFoundError:
            return []
        return [posixpath.basename(p.rstrip("/")) for p in entries]

    def read_bytes(self, name: str, max_bytes: int | None = None) -> bytes:
        path = self.path(name)
        try:
            if self.is_local:
                return _local.read_bytes(path, max_bytes)
            if max_bytes is None:
                return self._retrying(lambda: self.fs.cat_file(path), f"read {name}")
            # One ranged GET (open() would first ask for the object's size, or not, depending on
            # the listing cache).
            return self._retrying(lambda: self.fs.cat_file(path, start=0, end=max_bytes + 1), f"read {name}")
        except _NOT_FOUND:
            raise CheckpointNotFoundError(f"No file {self.url_of(name)!r}.") from None

    def size(self, name: str) -> int | None:
        path = self.path(name)
        try:
            if self.is_local:
                return _local.size(path)
            self.fs.invalidate_cache(path)
            return int(self._retrying(lambda: self.fs.size(path), f"stat {name}"))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def open_read(self, name: str) -> Any:
        """A binary file handle with seek / readinto."""
        path = self.path(name)
        try:
            if self.is_local:
                return _local.open_read(path)
            f = self._retrying(lambda: self.fs.open(path, "rb", cache_type="none"), f"open {name}")
            if not self.streaming:
                return f
            return RetryingReader(f, self.url_of(name))
        except _NOT_FOUND:
            raise CheckpointNotFoundError(f"No file {self.url_of(name)!r}.") from None
