"""GCS: one resumable upload session per object, resumed from the server's offset after a failure.

Why a writer of our own for GCS: gcsfs's file object re-sends a chunk blindly when a request fails.
When the server had in fact stored it (only the reply was lost), the session refuses the repeat (the
offsets no longer match) and the save fails; when that chunk was the last one, the object is
complete and visible while the save reports a failure — for the state file, the manager then
removes the checkpoint the new state file names. Its ``discard()`` retries six times with up to
32 s of backoff. The lost-reply cases are what ``integration/test_store_faults.py`` injects (a proxy
that forwards a request and drops the reply). This writer speaks the resumable-upload protocol itself, on gcsfs's HTTP session and credentials
(``_compat.gcs_*``):

- bytes are buffered up to ``block_size`` (gcsfs's ``default_block_size``: 5 MiB unless
  ``storage_options`` set it); then every whole 256 KiB of the buffer goes up as one chunk, and
  the rest at ``commit()`` as the last chunk, which makes the object visible;
- every request is retried on transient errors (``_retry.retry_call``). A failed chunk is sent
  again; if the session refuses it because it holds more than the writer knew (a lost reply),
  it is asked how much (``Content-Range: bytes */*``) and the upload goes on from there;
- a lost reply to the last chunk: the repeat finds the session finished (200, or 404 once it is
  gone); the object is accepted only if it carries this writer's token (custom metadata
  ``ckpt-callbacks-upload``, set when the session is opened) and the expected size, so an older
  object of the same name (the previous ``checkpoint`` file) never passes for it;
- gcsfs's ``consistency`` option ("md5", "crc32c", "size") is checked on the finished object;
- ``abort()`` cancels the session (one ``DELETE``): nothing visible.

Zonal buckets (gcsfs's experimental gRPC appends) are left to gcsfs's own file object.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from . import _compat
from ._base import AtomicWriter, write_error
from ._retry import RETRY_ATTEMPTS, retry_call

if TYPE_CHECKING:
    from ._store import Storage

# Every chunk of a GCS resumable upload but the last is a multiple of 256 KiB.
_GCS_QUANTUM = 256 << 10
# Custom metadata key under which a GCS upload carries its writer's token (see GCSResumableWriter).
GCS_UPLOAD_TOKEN = "ckpt-callbacks-upload"


def drives(storage: Storage) -> bool | None:
    """Whether :class:`GCSResumableWriter` writes to ``storage``: gcsfs, and not a zonal bucket.

    Raises when that gcsfs lacks what the writer uses. None: unknown this time (the zonal probe
    failed): this save uses gcsfs's writer, as for a zonal bucket, and the caller asks again next time.
    """
    if storage.protocol not in ("gs", "gcs") or not _compat.is_gcsfs(storage.fs):
        return False
    _compat.require_gcsfs(storage.fs)
    bucket = storage.fs.split_path(storage.root)[0]
    try:
        return not _compat.gcs_is_zonal(storage.fs, bucket)
    except Exception:  # noqa: BLE001 - unknown this time: gcsfs's writer, asked again next save
        return None


class GCSResumableWriter(AtomicWriter):
    """An AtomicWriter for GCS: one resumable upload session, resumed after a failure (see above)."""

    def __init__(self, storage: Storage, name: str) -> None:
        super().__init__(storage, name)
        self.fs = storage.fs
        self.bucket, self.key, _ = self.fs.split_path(storage.path(name))
        self.block = max(_GCS_QUANTUM, int(getattr(self.fs, "default_block_size", 0) or 0))
        try:
            self.checker = _compat.gcs_consistency_checker(self.fs)
        except Exception as e:  # noqa: BLE001 - e.g. "crc32c" without crcmod installed
            raise write_error(storage, name, e) from e
        self.token = uuid.uuid4().hex
        self.location: str | None = None  # the session URI
        self.buf = bytearray()  # the bytes from self.offset on: not yet confirmed by the session
        self.offset = 0  # bytes the session has confirmed
        self.finished = False
        self._unsure = False  # the last request failed: the session may hold more than self.offset

    # ---------------------------------------------------------------- AtomicWriter protocol

    def _write(self, data: bytes | memoryview) -> None:
        try:
            self.buf += data
        except BufferError:  # a view of the buffer outlived a failed request: grow a copy instead
            self.buf = self.buf + data
        if len(self.buf) >= self.block:
            self._send(final=False)

    def _commit(self) -> None:
        self._send(final=True)
        # gcsfs caches listings; one from before this object existed would hide it.
        self.fs.invalidate_cache(self.storage.path(self.name))

    def abort(self) -> None:
        self.buf = bytearray()
        if self.finished or self.location is None:
            return
        location, self.location = self.location, None
        try:
            _compat.gcs_cancel_session(self.fs, location)
        except Exception:  # noqa: BLE001 - best effort; an unfinished session is never visible
            pass

    # ---------------------------------------------------------------- protocol

    def _what(self) -> str:
        return f"upload of {self.storage.url_of(self.name)}"

    def _send(self, final: bool) -> None:
        """Upload the buffer: its whole 256 KiB units, or (``final``) all of it, finishing the object."""
        if self.location is None:
            self.location = retry_call(
                lambda: _compat.gcs_initiate_upload(
                    self.fs, self.bucket, self.key, {GCS_UPLOAD_TOKEN: self.token}
                ),
                f"start {self._what()}",
            )
        total = self.offset + len(self.buf) if final else None
        stalled = 0
        try:
            while not self.finished and (final or len(self.buf) >= _GCS_QUANTUM):
                before = self.offset
                retry_call(lambda: self._chunk(total), f"{self._what()} at byte {self.offset}")
                stalled = 0 if self.offset > before or self.finished else stalled + 1
                if stalled >= RETRY_ATTEMPTS:
                    raise OSError(
                        f"GCS stored none of the bytes sent {stalled} times for the {self._what()}."
                    )
        except Exception:
            # Every reply to the last chunk was lost: the object may be complete, and then it is ours.
            obj = self._own_object(total) if total is not None and self._unsure else None
            if obj is None:
                raise
            self._finish(obj)

    def _chunk(self, total: int | None) -> None:
        """One request: the next chunk (``total`` known: the last one, finishing the object)."""
        view = memoryview(self.buf)
        n = len(view) if total is not None else len(view) // _GCS_QUANTUM * _GCS_QUANTUM
        if n:
            end = "*" if total is None else total
            content_range = f"bytes {self.offset}-{self.offset + n - 1}/{end}"
        else:  # nothing left to send: finish at the size the session already holds
            content_range = f"bytes */{total}"
        self._unsure = True
        status, headers, body = _compat.gcs_put(
            self.fs, self.location, content_range, view[:n] if n else None
        )
        del view
        # A lost reply shows up here too, not only on our own retry: aiohttp silently repeats a PUT
        # whose reused connection dropped, and the repeat is what answers.
        if status in (404, 410) and total is not None:
            obj = self._own_object(total)  # the session finished (the reply was lost) and is gone
            if obj is not None:
                self._unsure = False
                self._finish(obj)
                return
        elif 400 <= status < 500:
            # The session refuses a repeat of bytes it already holds: ask it how many it has.
            query = _compat.gcs_put(
                self.fs, self.location, "bytes */*" if total is None else f"bytes */{total}", None
            )
            if query[0] in (200, 201) or (query[0] == 308 and self._persisted(query[1]) > self.offset):
                status, headers, body = query
        if status not in (200, 201, 308):
            self._raise(status, body)
        self._unsure = False
        if status == 308:
            self._confirm(self._persisted(headers))
            return
        if total is None:
            raise OSError(f"GCS finished the {self._what()} before its last chunk was sent.")
        self._finish(json.loads(body))

    @staticmethod
    def _persisted(headers: Any) -> int:
        """Bytes a 308 answer says the session holds: "Range: bytes=0-N" is N + 1; no Range, none."""
        held = headers.get("Range")
        return int(held.rsplit("-", 1)[1]) + 1 if held else 0

    def _confirm(self, persisted: int) -> None:
        if not self.offset <= persisted <= self.offset + len(self.buf):
            raise OSError(
                f"GCS holds {persisted} bytes of the {self._what()}; {self.offset} were confirmed "
                f"and {self.offset + len(self.buf)} sent."
            )
        k = persisted - self.offset
        self.checker.update(memoryview(self.buf)[:k])
        self.buf = self.buf[k:]  # a copy: a buffer that a request may still see is never resized
        self.offset = persisted

    def _finish(self, obj: dict) -> None:
        """The object is complete: check it holds exactly the bytes written."""
        self._confirm(self.offset + len(self.buf))
        if str(obj.get("size")) != str(self.offset):
            raise OSError(
                f"GCS stored {obj.get('size')!r} bytes for the {self._what()}; {self.offset} were sent."
            )
        self.checker.validate_json_response(obj)
        self.finished = True

    def _raise(self, status: int, body: bytes) -> None:
        _compat.gcs_raise_for(status, body, self.location)  # HttpError / FileNotFoundError / ...
        raise OSError(f"GCS answered HTTP {status} to the {self._what()}: {body[:200]!r}")

    def _own_object(self, total: int) -> dict | None:
        """The object now stored under the name, if it is the one this writer's session finished."""
        try:
            obj = _compat.gcs_get_object(self.fs, self.bucket, self.key)
        except Exception:  # noqa: BLE001 - not found, or unknowable now: not ours
            return None
        mine = (obj.get("metadata") or {}).get(GCS_UPLOAD_TOKEN) == self.token
        return obj if mine and str(obj.get("size")) == str(total) else None
