"""The writer protocol every store implements, and the writers for stores without one of our own.

:class:`AtomicWriter`: ``write()`` bytes, then ``commit()`` makes the whole object visible at once,
or ``abort()`` leaves nothing visible. Any backend error becomes a ``CheckpointWriteError`` naming the
object (:func:`write_error`). Here too: the generic object-store writer (the fsspec file object,
whose upload becomes visible only on ``close()``) and the one for stores without streaming uploads
(the bytes assembled, then one ``pipe_file``).
"""

from __future__ import annotations

import io
import logging
import uuid
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointWriteError
from . import _compat

if TYPE_CHECKING:
    from ._store import Storage

logger = logging.getLogger("ckpt_callbacks")

# Stores whose write handles upload on close() and can discard() an unfinished upload.
STREAMING_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az", "adl"})
TEMP_MARK = ".tmp-"


def temp_name(name: str) -> str:
    """Name of the local temp file for ``name``: hidden, and recognisably ours for later cleanup."""
    return f".{name}{TEMP_MARK}{uuid.uuid4().hex[:8]}"


def write_error(storage: Storage, name: str, e: BaseException) -> CheckpointWriteError:
    err = CheckpointWriteError(
        f"Writing {storage.url_of(name)!r} failed: {type(e).__name__}: {e}. The previous checkpoint is "
        "intact; free space, fix permissions or connectivity, then save again."
    )
    if isinstance(e, OSError):
        err.errno = e.errno
    return err


class AtomicWriter:
    """write() bytes, then commit() to make the whole object visible at once, or abort().

    ``prepare()`` between the two makes the bytes durable without making them visible (local disk:
    the temp file's fsync), so that several files can be made durable together
    (:meth:`Storage.prepare`) and then published in order; stores that persist on publish do nothing.
    """

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
            raise write_error(self.storage, self.name, e) from e
        self.written += memoryview(data).nbytes

    def write_many(self, views: list[memoryview]) -> None:
        """Write ``views`` one after the other (local disk: one gathered write, no copy)."""
        try:
            self._write_many(views)
        except CheckpointWriteError:
            raise
        except Exception as e:  # noqa: BLE001 - any backend error is a write failure
            raise write_error(self.storage, self.name, e) from e
        self.written += sum(v.nbytes for v in views)

    def _write_many(self, views: list[memoryview]) -> None:
        for view in views:
            self._write(view)

    def prepare(self) -> None:
        self._finishing(self._prepare)

    def commit(self) -> None:
        self._finishing(self._commit)

    def _finishing(self, step: Any) -> None:
        try:
            step()
        except CheckpointWriteError:
            raise
        except Exception as e:  # noqa: BLE001
            self.abort()
            raise write_error(self.storage, self.name, e) from e

    def _write(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def _prepare(self) -> None:
        pass

    def _commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


def discard_upload(f: Any) -> None:
    """Abandon an unfinished fsspec write handle so that nothing becomes visible (best effort).

    For gcsfs the resumable session is cancelled with one DELETE of its session URI instead of
    ``GCSFile.discard()``, which retries six times with up to 32 s of backoff; a session that is not
    cancelled is never visible either and expires by itself after a week. Other stores use
    ``discard()`` (s3fs: AbortMultipartUpload).
    """
    location = getattr(f, "location", None)
    fs = getattr(f, "fs", None)
    if _compat.is_gcsfs(fs) and isinstance(location, str):
        f.location = None
        try:
            status = _compat.gcs_cancel_session(fs, location)
            if status not in (204, 499, 404, 410):
                logger.debug("Cancelling GCS upload session answered HTTP %s", status)
        except Exception as e:  # noqa: BLE001 - best effort
            logger.debug("Could not cancel GCS upload session: %s", e)
        return
    f.discard()


class StreamWriter(AtomicWriter):
    """The fsspec file object of a streaming store: its upload becomes visible only on close()."""

    def __init__(self, storage: Storage, name: str) -> None:
        super().__init__(storage, name)
        try:
            self.f = storage.fs.open(storage.path(name), "wb")
        except Exception as e:  # noqa: BLE001
            raise write_error(storage, name, e) from e

    def _write(self, data: bytes | memoryview) -> None:
        self.f.write(data)

    def _commit(self) -> None:
        self.f.close()

    def abort(self) -> None:
        f = self.f
        if getattr(f, "closed", True):
            return
        try:
            discard_upload(f)  # aborts the multipart upload / resumable session: nothing becomes visible
        except Exception:  # noqa: BLE001 - best effort; the upload was never completed
            pass
        try:
            f.closed = True  # never let close() (or __del__) complete a partial upload
        except AttributeError:
            pass


class BufferWriter(AtomicWriter):
    """Stores without streaming uploads (``memory://``, ...): the bytes assembled, one ``pipe_file``."""

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
