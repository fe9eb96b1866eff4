"""Storage through fsspec: whole-object writes that are never visible half-written.

- Local disk: a temp file in the same directory, fsync, ``os.replace``, fsync of the directory.
- Object stores (S3, GCS, Azure): one streamed upload that the store makes visible only when it
  completes (a multipart upload / resumable session); a failed one is aborted, never completed.
- Anything else (``memory://``, ...): the bytes are assembled and written with one ``pipe_file``.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import CheckpointNotFoundError, CheckpointWriteError

# Stores whose write handles upload on close() and can discard() an unfinished upload.
STREAMING_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az", "adl"})
TEMP_MARK = ".tmp-"
T = TypeVar("T")


def temp_name(name: str) -> str:
    """Name of the local temp file for ``name``: hidden, and recognisably ours for later cleanup."""
    return f".{name}{TEMP_MARK}{uuid.uuid4().hex[:8]}"


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
        if self.is_local:
            self.url = os.path.abspath(directory) if "://" not in directory else self.root
        else:
            self.url = self.fs.unstrip_protocol(self.root)

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
        if self.protocol not in ("s3", "s3a"):
            return []
        from . import _cloud

        return _cloud.abort_leftover_uploads(self, is_ours)

    def makedirs(self) -> None:
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except Exception as e:  # noqa: BLE001 - any backend error is a write failure
            raise CheckpointWriteError(f"Cannot create checkpoint directory {self.url!r}: {e}") from e

    def writer(self, name: str) -> AtomicWriter:
        if self.is_local:
            return _LocalWriter(self, name)
        if self.protocol in ("s3", "s3a"):
            from . import _cloud

            # s3fs's own writer uploads parts one at a time; ours uploads them in parallel.
            if _cloud.s3_supported(self):
                return _cloud.S3MultipartWriter(self, name)  # type: ignore[return-value]
        if self.streaming:
            return _StreamWriter(self, name)
        return _BufferWriter(self, name)

    def write_bytes(self, name: str, data: bytes) -> None:
        w = self.writer(name)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        w.commit()

    def sync_dir(self) -> None:
        """Make renames in the directory durable (local disk only)."""
        if not self.is_local:
            return
        try:
            fd = os.open(self.root, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def free_bytes(self) -> int | None:
        if not self.is_local:
            return None
        import shutil

        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return None

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            try:
                if self.is_local:
                    os.remove(self.path(name))
                else:
                    path = self.path(name)
                    self._retrying(lambda p=path: self.fs.rm_file(p), f"delete {name}")
            except FileNotFoundError:
                pass

    def _retrying(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``; on object stores retried with bounded backoff on transient errors (5xx, resets)."""
        if not self.streaming:
            return fn()
        from . import _cloud

        return _cloud.retry_call(fn, f"{what} in {self.url}")

    # ------------------------------------------------------------------ reading

    def list_names(self) -> list[str]:
        """Names of the files directly in the directory ([] if it does not exist)."""
        if self.is_local:
            try:
                return os.listdir(self.root)
            except (FileNotFoundError, NotADirectoryError):
                return []
        self.fs.invalidate_cache(self.root)
        try:
            entries = self._retrying(lambda: self.fs.ls(self.root, detail=False), "list")
        except FileNotFoundError:
            return []
        return [posixpath.basename(p.rstrip("/")) for p in entries]

    def read_bytes(self, name: str, max_bytes: int | None = None) -> bytes:
        try:
            if self.is_local:
                with open(self.path(name), "rb") as f:
                    if max_bytes is None:
                        return f.read()
                    # read(n) allocates n bytes up front: never ask for more than the file holds.
                    return f.read(min(os.fstat(f.fileno()).st_size, max_bytes) + 1)
            if max_bytes is None:
                return self._retrying(lambda: self.fs.cat_file(self.path(name)), f"read {name}")

            def read_head() -> bytes:
                with self.fs.open(self.path(name), "rb") as f:
                    return f.read(max_bytes + 1)

            return self._retrying(read_head, f"read {name}")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise CheckpointNotFoundError(f"No file {self.url_of(name)!r}.") from None

    def size(self, name: str) -> int | None:
        try:
            if self.is_local:
                return os.stat(self.path(name)).st_size
            self.fs.invalidate_cache(self.path(name))
            return int(self._retrying(lambda: self.fs.size(self.path(name)), f"stat {name}"))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def open_read(self, name: str) -> Any:
        """A binary file handle with seek / readinto."""
        try:
            if self.is_local:
                return open(self.path(name), "rb", buffering=0)
            f = self._retrying(lambda: self.fs.open(self.path(name), "rb", cache_type="none"), f"open {name}")
            if not self.streaming:
                return f
            from . import _cloud

            return _cloud.RetryingReader(f, self.url_of(name))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise CheckpointNotFoundError(f"No file {self.url_of(name)!r}.") from None


class AtomicWriter:
    """write() bytes, then commit() to make the whole object visible at once, or abort()."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage = storage
        self.name = name
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._write(data)
        except CheckpointWriteError:
            raise
        except Exception as e:  # noqa: BLE001 - any backend error is a write failure
            raise _write_error(self.storage, self.name, e) from e
        self.written += len(data)

    def commit(self) -> None:
        try:
            self._commit()
        except CheckpointWriteError:
            raise
        except Exception as e:  # noqa: BLE001
            self.abort()
            raise _write_error(self.storage, self.name, e) from e

    def _write(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


def _write_error(storage: Storage, name: str, e: BaseException) -> CheckpointWriteError:
    err = CheckpointWriteError(
        f"Writing {storage.url_of(name)!r} failed: {type(e).__name__}: {e}. The previous checkpoint is "
        "intact; free space, fix permissions or connectivity, then save again."
    )
    if isinstance(e, OSError):
        err.errno = e.errno
    return err


class _LocalWriter(AtomicWriter):
    def __init__(self, storage: Storage, name: str) -> None:
        super().__init__(storage, name)
        self.tmp = os.path.join(storage.root, temp_name(name))
        try:
            self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise _write_error(storage, name, e) from e

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def _commit(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp, self.storage.path(self.name))

    def abort(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        try:
            os.remove(self.tmp)
        except OSError:
            pass


class _StreamWriter(AtomicWriter):
    def __init__(self, storage: Storage, name: str) -> None:
        super().__init__(storage, name)
        try:
            self.f = storage.fs.open(storage.path(name), "wb")
        except Exception as e:  # noqa: BLE001
            raise _write_error(storage, name, e) from e

    def _write(self, data: bytes | memoryview) -> None:
        self.f.write(data)

    def _commit(self) -> None:
        self.f.close()

    def abort(self) -> None:
        f = self.f
        if getattr(f, "closed", True):
            return
        try:
            from . import _cloud

            _cloud.discard_upload(
                f
            )  # aborts the multipart upload / resumable session: nothing becomes visible
        except Exception:  # noqa: BLE001 - best effort; the upload was never completed
            pass
        try:
            f.closed = True  # never let close() (or __del__) complete a partial upload
        except AttributeError:
            pass


class _BufferWriter(AtomicWriter):
    def __init__(self, storage: Storage, name: str) -> None:
        super().__init__(storage, name)
        self.buf: io.BytesIO | None = io.BytesIO()

    def _write(self, data: bytes | memoryview) -> None:
        self.buf.write(data)

    def _commit(self) -> None:
        self.storage.fs.pipe_file(self.storage.path(self.name), self.buf.getvalue())
        self.buf = None

    def abort(self) -> None:
        self.buf = None
