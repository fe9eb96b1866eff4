"""Storage through fsspec: whole-object writes that are never visible half-written.

- Local disk: a temp file in the same directory, fsync, ``os.replace``, fsync of the directory.
- Object stores (S3, GCS, Azure): one streamed upload that the store makes visible only when it
  completes (a multipart upload / resumable session); a failed one is aborted, never completed.
  S3 and GCS use writers of our own, which retry every request and resolve a lost reply; others use
  the fsspec file object.
- Anything else (``memory://``, ...): the bytes are assembled and written with one ``pipe_file``.

The package, in import order (each module imports only those above it; the third-party libraries
only lazily, inside functions, so ``import ckpt_callbacks`` imports none of them):

``_compat``
    Every private use of s3fs, gcsfs, aiohttp and fsspec, one small named function each, and the
    supported version ranges. A missing internal raises ``UnsupportedStorageLibraryError`` naming
    the installed version and the range; there is no quiet fallback to the library writers.
    ``tests/test_storage_compat.py`` has one test per use.
``_retry``
    The one retry layer (``is_transient``, ``backoff``, ``retry_call`` / ``retry_async``,
    ``RetryingReader``), and why the libraries' own retries below it are left as they are.
``_base``
    The ``AtomicWriter`` protocol (``write`` / ``commit`` / ``abort``), the ``CheckpointWriteError``
    every backend error becomes, and the generic writers: the fsspec file object of a streaming
    store, and one ``pipe_file`` for the rest.
``_local``
    Local disk: the temp-file writer and every local file operation (the write-fault tests replace
    this module's ``os``).
``_s3``
    The parallel, bounded-memory S3 multipart writer, its zero-copy part bodies, and the abort of
    uploads left pending by a killed save (why it exists, with measured memory, in its docstring).
``_gcs``
    The GCS resumable-session writer that resumes from the server's offset and recognises its own
    finished object after a lost reply (why it exists, in its docstring).
``_store``
    ``Storage``: one directory on any fsspec filesystem (names, reads, deletes, listing) and which
    writer each store gets.

``ckpt_callbacks._manager._lock`` (the writer lock / lease) lives with the manager: it takes a
``Storage`` and uses only public fsspec calls (no private library API to gather here), and the lock tests patch
its module globals (``os``, ``fcntl``, ``LEASE_SECONDS``), which a re-exporting shim would not reach.
"""

from __future__ import annotations

from ..errors import UnsupportedStorageLibraryError
from ._base import (
    STREAMING_PROTOCOLS,
    TEMP_MARK,
    AtomicWriter,
    BufferWriter,
    StreamWriter,
    discard_upload,
    temp_name,
    write_error,
)
from ._gcs import GCS_UPLOAD_TOKEN, GCSResumableWriter
from ._local import LocalWriter
from ._retry import (
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    RETRY_ATTEMPTS,
    RetryingReader,
    backoff,
    is_transient,
    retry_async,
    retry_call,
    run_on_loop,
)
from ._s3 import (
    CHECKSUM,
    MAX_INFLIGHT_PARTS,
    MAX_PARTS,
    PART_BYTES,
    PART_GROWTH_EVERY,
    PartBody,
    S3MultipartWriter,
    abort_leftover_uploads,
    part_size_for,
)
from ._store import Storage

# The names these had when they lived in ``_storage.py`` / ``_cloud.py``.
_write_error = write_error
_backoff = backoff

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_MAX_S",
    "CHECKSUM",
    "GCS_UPLOAD_TOKEN",
    "MAX_INFLIGHT_PARTS",
    "MAX_PARTS",
    "PART_BYTES",
    "PART_GROWTH_EVERY",
    "RETRY_ATTEMPTS",
    "STREAMING_PROTOCOLS",
    "TEMP_MARK",
    "AtomicWriter",
    "BufferWriter",
    "GCSResumableWriter",
    "LocalWriter",
    "PartBody",
    "RetryingReader",
    "S3MultipartWriter",
    "Storage",
    "StreamWriter",
    "UnsupportedStorageLibraryError",
    "abort_leftover_uploads",
    "backoff",
    "discard_upload",
    "is_transient",
    "part_size_for",
    "retry_async",
    "retry_call",
    "run_on_loop",
    "temp_name",
    "write_error",
]
