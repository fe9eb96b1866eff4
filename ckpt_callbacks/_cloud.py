"""Object-store plumbing: a parallel, bounded-memory S3 multipart writer and transient-error retries.

Why a writer of our own for S3: s3fs's file object uploads one part at a time from a buffer of
``block_size`` bytes, so a multi-GiB save runs at the speed of one HTTP stream. boto3's transfer
manager is parallel but wants a file or an in-memory payload. This writer takes the checkpoint as a
stream of ``write()`` calls, cuts it into parts and uploads up to ``MAX_INFLIGHT_PARTS`` of them at
once on fsspec's event loop (the same aiobotocore client, credentials and ``storage_options`` that
s3fs uses). Memory stays bounded: the in-flight limit is one semaphore for the whole process, so
the manager's concurrent data shards share it instead of multiplying it, and ``write()`` blocks
(back-pressure) while every slot is taken. A part in flight is handed to botocore as a file over the
filled buffer (:class:`PartBody`), so it is neither copied nor queued whole in the socket transport;
aiohttp sends it straight from that buffer (no worker-thread reads, see _register_part_payload),
and each part's CRC32 is computed on the writer's thread, so the one event-loop thread that sends
every part does little else than sign and send.
Peak extra memory is about ``(MAX_INFLIGHT_PARTS + concurrent writers) * PART_BYTES`` plus the
manager's 4 MiB coalescing buffer per writer — measured 68-85 MiB for a 512 MiB save (one writer)
and ~120 MiB for a 2 GiB one (4 shards), within the P6 target of docs/performance.md (0.1·S + 64 MiB).

Visibility: parts are invisible until ``CompleteMultipartUpload``; a failed or aborted save calls
``AbortMultipartUpload`` (after cancelling and draining its in-flight parts, so no late part
re-creates storage) and nothing is ever visible. Objects smaller than one part are one PUT.

Retries: s3fs and botocore already retry some failures; on top of that every request here goes
through :func:`retry_async` / :func:`retry_call` with bounded exponential backoff and jitter for the
errors that are transient by nature (5xx, 429, throttling, timeouts, connection resets). Anything else
(403, 404, a bad request) fails at once. An ambiguous ``CompleteMultipartUpload`` (the connection
dropped after the server finished it) is resolved by comparing the object's ETag with the one S3
derives from the part ETags.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import io
import logging
import random
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ._storage import Storage

logger = logging.getLogger("ckpt_callbacks")

T = TypeVar("T")

# S3 parts must be >= 5 MiB except the last; 8 MiB matches boto3's default multipart chunk size.
PART_BYTES = 8 << 20
# S3 allows at most 10,000 parts; the part size doubles every PART_GROWTH_EVERY parts so that a
# stream of unknown length never runs out (8 MiB * 1000 + 16 MiB * 1000 + ... passes the 5 TiB object limit).
MAX_PARTS = 10_000
PART_GROWTH_EVERY = 1_000
# Parts being uploaded at once, process-wide (boto3's transfer manager uses 10 threads). Bounded by
# The P6 memory target at the smallest sharded size (256 MiB: 0.1·S + 64 MiB = 89.6 MiB of extra memory).
MAX_INFLIGHT_PARTS = 6
# Bounded retries for transient errors: attempts in total, and the backoff between them.
RETRY_ATTEMPTS = 5
# The checksum every part carries (boto3's transfer-manager default), and its field in responses.
CHECKSUM = "CRC32"
_CHECKSUM_FIELD = "ChecksumCRC32"
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 2.0

_inflight = threading.BoundedSemaphore(MAX_INFLIGHT_PARTS)


class _BufferPool:
    """Part buffers recycled across parts and writers.

    Allocating and freeing an 8 MiB buffer per part from several threads fragments glibc's arenas
    (its mmap threshold rises to 8 MiB after the first free), so RSS grows well past the bytes that
    are live; recycling keeps it at (writers + parts in flight) buffers. The free list lives only
    while some writer is open: between saves nothing is held.
    """

    def __init__(self, keep: int) -> None:
        self._free: list[bytearray] = []
        self._keep = keep
        self._users = 0
        self._lock = threading.Lock()

    def open_user(self) -> None:
        with self._lock:
            self._users += 1

    def close_user(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users <= 0:
                self._users = 0
                self._free.clear()

    def get(self, size: int) -> bytearray:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) == size:
                    return self._free.pop(i)
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        with self._lock:
            if self._users > 0 and len(self._free) < self._keep:
                self._free.append(buf)


_pool = _BufferPool(keep=MAX_INFLIGHT_PARTS + 2)

_TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "OperationAborted",
    }
)
_PERMANENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is worth retrying: 5xx/429, timeouts, resets.

    s3fs translates botocore's ``ClientError`` into ``OSError`` and gcsfs raises its own
    ``HttpError``, keeping the original as ``__cause__``; so the whole chain is inspected.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _PERMANENT):
            return False
        if isinstance(exc, (TimeoutError, ConnectionError, asyncio.TimeoutError)):
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):  # botocore ClientError
            err = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if err.get("Code") in _TRANSIENT_CODES or status in _TRANSIENT_HTTP:
                return True
        code = getattr(exc, "code", None)  # gcsfs HttpError
        if type(exc).__name__ == "HttpError" and str(code).isdigit() and int(code) in _TRANSIENT_HTTP:
            return True
        module = type(exc).__module__ or ""
        if module.startswith("botocore") and type(exc).__name__ in {
            "HTTPClientError",
            "ConnectionError",
            "ConnectionClosedError",
            "EndpointConnectionError",
            "ReadTimeoutError",
            "ConnectTimeoutError",
            "ResponseStreamingError",
            "IncompleteReadError",
            "ResponseParserError",
        }:
            return True
        if module.startswith("aiohttp") and type(exc).__name__ in {
            "ServerDisconnectedError",
            "ClientOSError",
            "ClientConnectionError",
            "ClientPayloadError",
            "ServerTimeoutError",
            "ClientConnectorError",
            "ConnectionTimeoutError",
            "SocketTimeoutError",
        }:
            return True
        if type(exc).__name__ == "FSTimeoutError":
            return True
        # gcsfs raises these from ``requests`` for some answers (a 502 becomes ProxyError); they are
        # OSErrors, not the builtin ConnectionError.
        if module.startswith("requests") and type(exc).__name__ in {
            "ConnectionError",
            "ProxyError",
            "ConnectTimeout",
            "ReadTimeout",
            "Timeout",
            "ChunkedEncodingError",
        }:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter, capped: 0.1, 0.2, 0.4, ... seconds, at most BACKOFF_MAX_S."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * (0.5 + random.random() / 2)


def retry_call(fn: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS) -> T:
    """``fn()``, retried with bounded backoff while it fails with a transient error."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if attempt == attempts - 1 or not is_transient(e):
                raise
            delay = _backoff(attempt)
            logger.warning("%s failed (%s: %s); retrying in %.2f s", what, type(e).__name__, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    what: str,
    attempts: int = RETRY_ATTEMPTS,
    give_up: Callable[[], bool] = lambda: False,
) -> T:
    """The coroutine version of :func:`retry_call` (sleeps without blocking the event loop).

    ``give_up()`` is checked before each retry: an aborted upload stops retrying its parts.
    """
    for attempt in range(attempts):
        try:
            return await fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if attempt == attempts - 1 or not is_transient(e) or give_up():
                raise
            delay = _backoff(attempt)
            logger.warning("%s failed (%s: %s); retrying in %.2f s", what, type(e).__name__, e, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def run_on_loop(fs: Any, make: Callable[[], Awaitable[T]], what: str) -> T:
    """Run one request (with retries) on fsspec's event loop and wait for it."""
    return asyncio.run_coroutine_threadsafe(retry_async(make, what), fs.loop).result()


def abort_leftover_uploads(storage: Storage, is_ours: Callable[[str], bool]) -> list[str]:
    """Abort the pending multipart uploads of this format's files directly in the directory.

    A process killed in the middle of a multipart upload leaves it pending: invisible, but its parts
    are stored (and billed) until someone aborts it. The directory has one writer (the manager holds
    the writer lock when this runs), so a pending upload of one of our file names is a leftover.
    Uploads of other names, and anything in sub-directories, are not touched. Best effort: a failure
    is logged, never raised (nothing is visible either way). Returns the file names aborted.
    """
    if storage.protocol not in ("s3", "s3a") or not s3_supported(storage):
        return []
    fs = storage.fs
    bucket, root, _ = fs.split_path(storage.root)
    prefix = root.rstrip("/") + "/" if root else ""
    aborted: list[str] = []
    markers: dict[str, str] = {}
    try:
        while True:
            resp = run_on_loop(
                fs,
                lambda m=dict(markers): fs._call_s3(
                    "list_multipart_uploads", Bucket=bucket, Prefix=prefix, Delimiter="/", **m
                ),
                f"ListMultipartUploads s3://{bucket}/{prefix}",
            )
            for upload in resp.get("Uploads", []):
                key = upload.get("Key", "")
                name = key[len(prefix) :]
                if not key.startswith(prefix) or "/" in name or not is_ours(name):
                    continue
                try:
                    run_on_loop(
                        fs,
                        lambda k=key, u=upload["UploadId"]: fs._call_s3(
                            "abort_multipart_upload", Bucket=bucket, Key=k, UploadId=u
                        ),
                        f"AbortMultipartUpload s3://{bucket}/{key}",
                    )
                    aborted.append(name)
                except Exception as e:  # noqa: BLE001 - NoSuchUpload: already gone
                    if "NoSuchUpload" not in str(e):
                        logger.warning("Could not abort pending upload of s3://%s/%s: %s", bucket, key, e)
            if not resp.get("IsTruncated"):
                break
            markers = {
                "KeyMarker": resp.get("NextKeyMarker", ""),
                "UploadIdMarker": resp.get("NextUploadIdMarker", ""),
            }
    except Exception as e:  # noqa: BLE001 - best effort
        logger.warning("Could not list pending uploads in s3://%s/%s: %s", bucket, prefix, e)
    if aborted:
        logger.info("Aborted %d pending upload(s) of interrupted saves in %s", len(aborted), storage.url)
    return aborted


def _multipart_etag(etags: list[str]) -> str:
    """The ETag S3 gives a completed multipart object: md5 of the parts' binary md5s, '-', count."""
    digests = b"".join(binascii.unhexlify(e.strip('"')) for e in etags)
    return f'"{hashlib.md5(digests).hexdigest()}-{len(etags)}"'  # noqa: S324 - S3's definition, not security


def part_size_for(part_number: int) -> int:
    """Size of part ``part_number`` (1-based): PART_BYTES, doubling every PART_GROWTH_EVERY parts."""
    return PART_BYTES << ((part_number - 1) // PART_GROWTH_EVERY)


def s3_supported(storage: Storage) -> bool:
    """True when ``storage.fs`` is an s3fs filesystem this writer can drive (async ``_call_s3``)."""
    fs = storage.fs
    needed = ("_call_s3", "get_s3", "set_session", "_get_s3_method_kwargs", "split_path")
    return all(hasattr(fs, a) for a in needed) and getattr(fs, "loop", None) is not None


class PartBody(io.RawIOBase):
    """A part's bytes as a seekable file object, read without copying the buffer.

    Handed to botocore as a file rather than as bytes so that aiohttp streams it in 64 KiB reads:
    a bytes/bytearray body is sliced (a copy) and queued whole in the socket transport's buffer (a
    second copy), tripling the memory of every part in flight. botocore seeks back to 0 to
    checksum the body and to resend it on a retry.
    """

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, min(len(self._view), base + offset))
        return self._pos

    def readinto(self, b: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(b)]
        n = len(chunk)
        memoryview(b).cast("B")[:n] = chunk
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        data = bytes(self._view[self._pos : end])
        self._pos = end
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def remaining(self) -> memoryview:
        """The bytes from the current position on, without a copy (what a send starts from)."""
        return self._view[self._pos :]

    def close(self) -> None:
        # aiohttp closes the payload after sending; keep it readable for botocore's retries.
        pass


# Bytes handed to the socket per write when aiohttp sends a PartBody (see _register_part_payload).
SEND_CHUNK = 1 << 20
_payload_registered = False


def _register_part_payload() -> None:
    """Make aiohttp send a :class:`PartBody` straight from its buffer.

    aiohttp sends any other file object by reading 256 KiB at a time on a worker thread and handing
    each copy back to the event loop: two thread switches per chunk, all through the one event-loop
    thread that sends every part of the process, and each a wait for the GIL when other threads are
    busy (measured: a save next to an in-process S3 server ran 1.2x boto3's time). Registered for our
    own type only, so other aiohttp users are not affected. Memory stays bounded: the writer drains
    the socket transport after every chunk.
    """
    global _payload_registered
    if _payload_registered:
        return
    try:
        from aiohttp import payload as aiohttp_payload
    except ImportError:  # pragma: no cover - s3fs always brings aiohttp
        return

    class _PartPayload(aiohttp_payload.Payload):
        _autoclose = True

        def __init__(self, value: Any, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("content_type", "application/octet-stream")
            super().__init__(value, *args, **kwargs)
            self._size = len(value) - value.tell()

        def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
            return bytes(self._value.remaining()).decode(encoding, errors)

        async def write(self, writer: Any) -> None:
            await self.write_with_length(writer, None)

        async def write_with_length(self, writer: Any, content_length: int | None) -> None:
            view = self._value.remaining()
            if content_length is not None:
                view = view[:content_length]
            for i in range(0, len(view), SEND_CHUNK):
                await writer.write(view[i : i + SEND_CHUNK])

    aiohttp_payload.PAYLOAD_REGISTRY.register(_PartPayload, PartBody, order=aiohttp_payload.Order.try_first)
    _payload_registered = True


class S3MultipartWriter:
    """An AtomicWriter for S3: bounded-memory parallel multipart upload, aborted on failure.

    Created through ``Storage.writer(name)``; not thread-safe (one writer per thread), but any number
    of writers may run concurrently and share the process-wide in-flight limit.
    """

    def __init__(self, storage: Storage, name: str) -> None:
        _register_part_payload()
        self.storage = storage
        self.name = name
        self.written = 0
        self.fs = storage.fs
        self.bucket, self.key, _ = self.fs.split_path(storage.path(name))
        self.upload_id: str | None = None
        self.futures: list[concurrent.futures.Future] = []
        self.part_no = 1
        self.buf = bytearray()  # taken from the pool at the first write
        self.fill = 0
        self.done = False
        self._opened = False
        self._finished = False

    # ---------------------------------------------------------------- AtomicWriter protocol

    def write(self, data: bytes | memoryview) -> None:
        from ._storage import _write_error

        view = memoryview(data).cast("B")
        try:
            if not self._opened:
                _pool.open_user()
                self._opened = True
                self.buf = _pool.get(part_size_for(self.part_no))
            while view:
                n = min(len(self.buf) - self.fill, len(view))
                self.buf[self.fill : self.fill + n] = view[:n]
                self.fill += n
                view = view[n:]
                if self.fill == len(self.buf):
                    self._submit_part()
        except Exception as e:  # noqa: BLE001 - any backend error is a write failure
            raise _write_error(self.storage, self.name, e) from e
        self.written += len(memoryview(data).cast("B"))

    def commit(self) -> None:
        from ._storage import _write_error

        try:
            if self.upload_id is None:
                # Smaller than one part: a single PUT is atomic by itself.
                body = bytes(memoryview(self.buf)[: self.fill])
                self._release_buf()
                self._run(
                    lambda: self.fs._call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body), "PUT"
                )
            else:
                if self.fill:
                    self._submit_part()
                self._complete([f.result() for f in self.futures])
            self.done = True
            self._release_buf()
            self._finish()
            # s3fs caches listings; a cached listing of the directory from before this object existed
            # would make the next open() of it fail with FileNotFoundError without asking the server.
            self.fs.invalidate_cache(self.storage.path(self.name))
        except Exception as e:  # noqa: BLE001
            self.abort()
            raise _write_error(self.storage, self.name, e) from e

    def abort(self) -> None:
        """Wait for in-flight parts, then abort the multipart upload (best effort).

        The parts are drained rather than cancelled: a part still arriving at the server after the
        abort could otherwise be stored again. They stop retrying once ``done`` is set.
        """
        if self.done:
            return
        self.done = True
        self._release_buf()
        concurrent.futures.wait(self.futures)
        self._finish()
        if self.upload_id is None:
            return
        upload_id, self.upload_id = self.upload_id, None
        try:
            self._run(
                lambda: self.fs._call_s3(
                    "abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload_id
                ),
                "AbortMultipartUpload",
            )
        except Exception as e:  # noqa: BLE001 - the upload was never completed, so nothing is visible
            if "NoSuchUpload" not in str(e):
                logger.warning(
                    "Could not abort multipart upload %s of s3://%s/%s (%s); its parts stay invisible but "
                    "are stored until an AbortIncompleteMultipartUpload lifecycle rule removes them.",
                    upload_id,
                    self.bucket,
                    self.key,
                    e,
                )

    # ---------------------------------------------------------------- internals

    def _run(self, make: Callable[[], Awaitable[T]], what: str) -> T:
        return run_on_loop(self.fs, make, f"{what} s3://{self.bucket}/{self.key}")

    def _raise_failed_part(self) -> None:
        for f in self.futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()

    def _submit_part(self) -> None:
        self._raise_failed_part()
        if self.part_no > MAX_PARTS:
            raise OSError(f"More than {MAX_PARTS} parts for one S3 object; the object is too large.")
        if self.upload_id is None:
            self._create()
        # Back-pressure first: at most MAX_INFLIGHT_PARTS bodies exist beyond the writers' own buffers
        # (taking a fresh buffer before the slot would add one more per blocked writer).
        _inflight.acquire()
        try:
            # The filled buffer itself becomes the part body (no copy) and the writer takes another.
            buf, number, size = self.buf, self.part_no, self.fill
            # The part's CRC32 here, on the writer's thread (zlib releases the GIL), not on the one
            # event-loop thread that sends every part of the process.
            crc = base64.b64encode(zlib.crc32(memoryview(buf)[:size]).to_bytes(4, "big")).decode()
            self.part_no += 1
            self.buf = _pool.get(part_size_for(self.part_no))
            self.fill = 0
            fut = asyncio.run_coroutine_threadsafe(self._upload_part(number, buf, size, crc), self.fs.loop)
        except BaseException:
            _inflight.release()
            raise

        def done(_f: concurrent.futures.Future) -> None:
            _pool.put(buf)
            _inflight.release()

        fut.add_done_callback(done)
        self.futures.append(fut)

    def _release_buf(self) -> None:
        if self.buf:
            _pool.put(self.buf)
        self.buf = bytearray()

    def _finish(self) -> None:
        """Called once, after commit or abort: this writer no longer keeps the buffer pool alive."""
        if self._opened and not self._finished:
            self._finished = True
            _pool.close_user()

    def __del__(self) -> None:
        # A writer dropped without commit() or abort() (a caller's bug) must not pin the pool.
        try:
            self._finish()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def _create(self) -> None:
        # A CRC32 per part, as boto3's transfer manager sends: the server verifies every part and keeps a
        # composite checksum. Without an algorithm S3 (and moto) default to a full-object CRC64NVME,
        # which costs a server a second pass over the whole object at Complete.
        self.upload_id = self._run(
            lambda: self.fs._call_s3(
                "create_multipart_upload", Bucket=self.bucket, Key=self.key, ChecksumAlgorithm=CHECKSUM
            ),
            "CreateMultipartUpload",
        )["UploadId"]
        # A retried create (here or inside s3fs/botocore, invisible to us) may have left an upload whose
        # response was lost, and a killed earlier save of this file leaves one too. Both are invisible
        # but stored: abort every other pending upload of this exact key, which only this directory's
        # writer (one writer per directory) ever creates. One LIST per multipart file.
        self._abort_others()

    def _abort_others(self) -> None:
        try:
            resp = self._run(
                lambda: self.fs._call_s3("list_multipart_uploads", Bucket=self.bucket, Prefix=self.key),
                "ListMultipartUploads",
            )
        except Exception as e:  # noqa: BLE001 - best effort; the orphan is invisible either way
            logger.warning("Could not list pending uploads of s3://%s/%s: %s", self.bucket, self.key, e)
            return
        for upload in resp.get("Uploads", []):
            if upload.get("Key") != self.key or upload.get("UploadId") == self.upload_id:
                continue
            other = upload["UploadId"]
            try:
                self._run(
                    lambda u=other: self.fs._call_s3(
                        "abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=u
                    ),
                    "AbortMultipartUpload",
                )
            except Exception as e:  # noqa: BLE001
                logger.warning(
                    "Could not abort orphaned upload %s of s3://%s/%s: %s", other, self.bucket, self.key, e
                )

    async def _upload_part(self, number: int, buf: bytearray, size: int, crc: str) -> dict:
        """Upload one part; returns its entry for CompleteMultipartUpload (number, ETag, CRC32)."""
        upload_id = self.upload_id
        fs = self.fs

        async def attempt() -> dict:
            # Straight to the aiobotocore client, not through s3fs's _call_s3: s3fs retries a call with
            # the same Body object, whose position is then at its end (botocore would send 0 bytes).
            # Every attempt here gets a fresh PartBody; botocore's own retries rewind it to 0.
            await fs.set_session()
            s3 = await fs.get_s3(self.bucket)
            kwargs = fs._get_s3_method_kwargs(
                s3.upload_part,
                Bucket=self.bucket,
                Key=self.key,
                UploadId=upload_id,
                PartNumber=number,
                Body=PartBody(memoryview(buf)[:size]),
                ChecksumAlgorithm=CHECKSUM,
                ChecksumCRC32=crc,  # given, so botocore does not compute it on the event loop
            )
            return await s3.upload_part(**kwargs)

        resp = await retry_async(
            attempt, f"UploadPart {number} of s3://{self.bucket}/{self.key}", give_up=lambda: self.done
        )
        part = {"PartNumber": number, "ETag": resp["ETag"]}
        if resp.get(_CHECKSUM_FIELD):  # an upload created with an algorithm must list each part's checksum
            part[_CHECKSUM_FIELD] = resp[_CHECKSUM_FIELD]
        return part

    def _complete(self, parts_list: list[dict]) -> None:
        parts = {"Parts": parts_list}
        etags = [p["ETag"] for p in parts_list]
        upload_id = self.upload_id
        try:
            self._run(
                lambda: self.fs._call_s3(
                    "complete_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=upload_id,
                    MultipartUpload=parts,
                ),
                "CompleteMultipartUpload",
            )
        except Exception as e:
            # A retried Complete whose first attempt did finish (the response was lost) gets NoSuchUpload:
            # the object is there if its ETag is the one S3 computes from exactly our parts.
            if "NoSuchUpload" not in str(e) or not self._object_matches(etags):
                raise
        self.upload_id = None

    def _object_matches(self, etags: list[str]) -> bool:
        try:
            head = self._run(
                lambda: self.fs._call_s3("head_object", Bucket=self.bucket, Key=self.key), "HEAD"
            )
        except Exception:  # noqa: BLE001
            return False
        return head.get("ETag") == _multipart_etag(etags)


def discard_upload(f: Any) -> None:
    """Abandon an unfinished fsspec write handle so that nothing becomes visible (best effort).

    For gcsfs the resumable session is cancelled with one DELETE of its session URI instead of
    ``GCSFile.discard()``, which retries six times with up to 32 s of backoff; a session that is not
    cancelled is never visible either and expires by itself after a week. Other stores use
    ``discard()`` (s3fs: AbortMultipartUpload).
    """
    location = getattr(f, "location", None)
    fs = getattr(f, "fs", None)
    if type(fs).__module__.startswith("gcsfs") and isinstance(location, str):
        f.location = None

        async def cancel() -> int:
            import aiohttp

            session = await fs._set_session()
            url = location.replace("&ifGenerationMatch=0", "")
            timeout = aiohttp.ClientTimeout(total=30)
            async with session.request("DELETE", url, headers=fs._get_headers(None), timeout=timeout) as r:
                await r.read()
                return r.status

        try:
            status = asyncio.run_coroutine_threadsafe(cancel(), fs.loop).result()
            if status not in (204, 499, 404, 410):
                logger.debug("Cancelling GCS upload session answered HTTP %s", status)
        except Exception as e:  # noqa: BLE001 - best effort
            logger.debug("Could not cancel GCS upload session: %s", e)
        return
    f.discard()


class RetryingReader:
    """A read handle over an fsspec object-store file whose reads are retried on transient errors.

    A ranged GET that fails half-way (503, reset) is retried from the position the read started at,
    so restoring a multi-GiB checkpoint does not fail on one bad request.
    """

    def __init__(self, f: Any, what: str) -> None:
        self._f = f
        self._what = what

    def _retry(self, op: Callable[[], T]) -> T:
        pos = self._f.tell()

        def attempt() -> T:
            self._f.seek(pos)
            return op()

        return retry_call(attempt, f"read of {self._what} at offset {pos}")

    def readinto(self, b: Any) -> int:
        return self._retry(lambda: self._f.readinto(b))

    def read(self, n: int = -1) -> bytes:
        return self._retry(lambda: self._f.read(n))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RetryingReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
