"""S3: a parallel, bounded-memory multipart writer, its part bodies, and the abort of leftover uploads.

Why a writer of our own for S3: s3fs's file object uploads one part at a time from a buffer of
``block_size`` bytes, so a multi-GiB save runs at the speed of one HTTP stream. boto3's transfer
manager is parallel but wants a file or an in-memory payload. This writer takes the checkpoint as a
stream of ``write()`` calls, cuts it into parts and uploads up to ``MAX_INFLIGHT_PARTS`` of them at
once on fsspec's event loop (the same aiobotocore client, credentials and ``storage_options`` that
s3fs uses, reached through ``_compat.s3_call``). Memory stays bounded: the in-flight limit is one
semaphore for the whole process, so the manager's concurrent data shards share it instead of
multiplying it, and ``write()`` blocks (back-pressure) while every slot is taken. A part in flight is
handed to botocore as a file over the filled buffer (:class:`PartBody`), so it is neither copied nor
queued whole in the socket transport; aiohttp sends it straight from that buffer (no worker-thread
reads, see ``_compat.register_payload``), and each part's CRC32 is computed on the writer's thread,
so the one event-loop thread that sends every part does little else than sign and send.
Peak extra memory is about ``(MAX_INFLIGHT_PARTS + concurrent writers) * PART_BYTES`` plus the
manager's 4 MiB coalescing buffer per writer — measured 68-85 MiB for a 512 MiB save (one writer)
and ~120 MiB for a 2 GiB one (4 shards), within the sync-save memory budget of 0.1·S + 64 MiB
(P6 in docs/performance.md).

Visibility: parts are invisible until ``CompleteMultipartUpload``; a failed or aborted save calls
``AbortMultipartUpload`` (after draining its in-flight parts, so no late part re-creates storage)
and nothing is ever visible. Objects smaller than one part are one PUT. An ambiguous
``CompleteMultipartUpload`` (the connection dropped after the server finished it) is resolved by
comparing the object's ETag with the one S3 derives from the part ETags. Every request is retried by
``_retry`` (the one retry layer; see there for what botocore still does underneath).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import io
import logging
import threading
import zlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import _compat
from ._base import AtomicWriter
from ._retry import retry_async, run_on_loop

if TYPE_CHECKING:
    from ._store import Storage

logger = logging.getLogger("ckpt_callbacks")

T = TypeVar("T")

# S3 parts must be >= 5 MiB except the last; 8 MiB matches boto3's default multipart chunk size.
PART_BYTES = 8 << 20
# S3 allows at most 10,000 parts; the part size doubles every PART_GROWTH_EVERY parts so that a
# stream of unknown length never runs out (8 MiB * 1000 + 16 MiB * 1000 + ... passes the 5 TiB object limit).
MAX_PARTS = 10_000
PART_GROWTH_EVERY = 1_000
# Parts being uploaded at once, process-wide (boto3's transfer manager uses 10 threads). Bounded by
# the sync-save memory budget (0.1·S + 64 MiB, P6 in docs/performance.md) at the smallest sharded size
# (256 MiB: 89.6 MiB of extra memory).
MAX_INFLIGHT_PARTS = 6
# The checksum every part carries (boto3's transfer-manager default), and its field in responses.
CHECKSUM = "CRC32"
_CHECKSUM_FIELD = "ChecksumCRC32"
# Bytes handed to the socket per write when aiohttp sends a PartBody (see _compat.register_payload).
SEND_CHUNK = 1 << 20

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


def is_s3(storage: Storage) -> bool:
    """Whether ``storage`` is on S3 through s3fs: our writer's; raises if that s3fs is unsupported."""
    if storage.protocol not in ("s3", "s3a") or not _compat.is_s3fs(storage.fs):
        return False
    _compat.require_s3fs(storage.fs)
    return True


def abort_leftover_uploads(storage: Storage, is_ours: Callable[[str], bool]) -> list[str]:
    """Abort the pending multipart uploads of this format's files directly in the directory.

    A process killed in the middle of a multipart upload leaves it pending: invisible, but its parts
    are stored (and billed) until someone aborts it. The directory has one writer (the manager holds
    the writer lock when this runs), so a pending upload of one of our file names is a leftover.
    Uploads of other names, and anything in sub-directories, are not touched. Best effort: a failure
    is logged, never raised (nothing is visible either way). Returns the file names aborted.
    """
    if not is_s3(storage):
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
                lambda m=dict(markers): _compat.s3_call(
                    fs, "list_multipart_uploads", Bucket=bucket, Prefix=prefix, Delimiter="/", **m
                ),
                f"ListMultipartUploads s3://{bucket}/{prefix}",
            )
            for upload in resp.get("Uploads", []):
                key = upload.get("Key", "")
                name = key[len(prefix) :]
                if not key.startswith(prefix) or "/" in name or not is_ours(name):
                    continue
                if _abort_upload(fs, bucket, key, upload["UploadId"], "pending upload"):
                    aborted.append(name)
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


def _abort_upload(fs: Any, bucket: str, key: str, upload_id: str, what: str, note: str = "") -> bool:
    """AbortMultipartUpload (retried); False, logged, if it failed (NoSuchUpload: already gone)."""
    try:
        run_on_loop(
            fs,
            lambda: _compat.s3_call(fs, "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id),
            f"AbortMultipartUpload s3://{bucket}/{key}",
        )
        return True
    except Exception as e:  # noqa: BLE001 - invisible either way
        if "NoSuchUpload" not in str(e):
            logger.warning(
                "Could not abort %s %s of s3://%s/%s (%s)%s", what, upload_id, bucket, key, e, note
            )
        return False


def _multipart_etag(etags: list[str]) -> str:
    """The ETag S3 gives a completed multipart object: md5 of the parts' binary md5s, '-', count."""
    digests = b"".join(binascii.unhexlify(e.strip('"')) for e in etags)
    return f'"{hashlib.md5(digests).hexdigest()}-{len(etags)}"'  # noqa: S324 - S3's definition, not security


def part_size_for(part_number: int) -> int:
    """Size of part ``part_number`` (1-based): PART_BYTES, doubling every PART_GROWTH_EVERY parts."""
    return PART_BYTES << ((part_number - 1) // PART_GROWTH_EVERY)


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


_payload_registered = False


def _register_part_payload() -> None:
    global _payload_registered
    if not _payload_registered:
        _compat.register_payload(PartBody, PartBody.remaining, SEND_CHUNK)
        _payload_registered = True


class S3MultipartWriter(AtomicWriter):
    """An AtomicWriter for S3: bounded-memory parallel multipart upload, aborted on failure.

    Created through ``Storage.writer(name)``; not thread-safe (one writer per thread), but any number
    of writers may run concurrently and share the process-wide in-flight limit.
    """

    def __init__(self, storage: Storage, name: str) -> None:
        _register_part_payload()
        super().__init__(storage, name)
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

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
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

    def _commit(self) -> None:
        if self.upload_id is None:
            # Smaller than one part: a single PUT is atomic by itself.
            body = bytes(memoryview(self.buf)[: self.fill])
            self._release_buf()
            self._run(
                lambda: _compat.s3_call(self.fs, "put_object", Bucket=self.bucket, Key=self.key, Body=body),
                "PUT",
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
        # Best effort: the upload was never completed, so nothing is visible either way.
        _abort_upload(
            self.fs,
            self.bucket,
            self.key,
            upload_id,
            "multipart upload",
            "; its parts stay invisible but are stored until an AbortIncompleteMultipartUpload "
            "lifecycle rule removes them.",
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
            lambda: _compat.s3_call(
                self.fs,
                "create_multipart_upload",
                Bucket=self.bucket,
                Key=self.key,
                ChecksumAlgorithm=CHECKSUM,
            ),
            "CreateMultipartUpload",
        )["UploadId"]
        # A retried create (here or inside botocore, invisible to us) may have left an upload whose
        # response was lost, and a killed earlier save of this file leaves one too. Both are invisible
        # but stored: abort every other pending upload of this exact key, which only this directory's
        # writer (one writer per directory: the writer lock) ever creates. One LIST per multipart file.
        self._abort_others()

    def _abort_others(self) -> None:
        try:
            resp = self._run(
                lambda: _compat.s3_call(
                    self.fs, "list_multipart_uploads", Bucket=self.bucket, Prefix=self.key
                ),
                "ListMultipartUploads",
            )
        except Exception as e:  # noqa: BLE001 - best effort; the orphan is invisible either way
            logger.warning("Could not list pending uploads of s3://%s/%s: %s", self.bucket, self.key, e)
            return
        for upload in resp.get("Uploads", []):
            if upload.get("Key") != self.key or upload.get("UploadId") == self.upload_id:
                continue
            _abort_upload(self.fs, self.bucket, self.key, upload["UploadId"], "orphaned upload")

    async def _upload_part(self, number: int, buf: bytearray, size: int, crc: str) -> dict:
        """Upload one part; returns its entry for CompleteMultipartUpload (number, ETag, CRC32)."""
        upload_id = self.upload_id

        def attempt() -> Awaitable[dict]:
            # Every attempt gets a fresh PartBody (one re-sent after a failure would start at its end);
            # botocore's own retries rewind it to 0. Untranslated, as botocore raises them.
            return _compat.s3_call(
                self.fs,
                "upload_part",
                translate=False,
                Bucket=self.bucket,
                Key=self.key,
                UploadId=upload_id,
                PartNumber=number,
                Body=PartBody(memoryview(buf)[:size]),
                ChecksumAlgorithm=CHECKSUM,
                ChecksumCRC32=crc,  # given, so botocore does not compute it on the event loop
            )

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
                lambda: _compat.s3_call(
                    self.fs,
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
                lambda: _compat.s3_call(self.fs, "head_object", Bucket=self.bucket, Key=self.key), "HEAD"
            )
        except Exception:  # noqa: BLE001
            return False
        return head.get("ETag") == _multipart_etag(etags)
