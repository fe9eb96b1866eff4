"""Storage through fsspec: whole-object writes that are never visible half-written.

- Local disk: a temp file in the same directory, fsync, ``os.replace``, fsync of the directory.
- Object stores (S3, GCS, Azure): one streamed upload that the store makes visible only when it
  completes (a multipart upload / resumable session); a failed one is aborted, never completed.
  S3 and GCS use writers of our own (``_cloud.S3MultipartWriter``, :class:`_GCSResumableWriter`)
  that retry every request and resolve a lost reply; others use the fsspec file object.
- Anything else (``memory://``, ...): the bytes are assembled and written with one ``pipe_file``.
"""

from __future__ import annotations

import asyncio
import io
import json
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
        self._gcs_json: bool | None = None  # see _gcs_json_uploads
        if self.is_local:
            self.url = os.path.abspath(directory) if "://" not in directory else self.root
        else:
            self.url = self.fs.unstrip_protocol(self.root)
            # Paths come back in the spelling the caller used ("memory://x/run", not fsspec's
            # "memory:///x/run") when that spelling names the same place.
            given = directory.rstrip("/")
            if given != self.url and "://" in given and "::" not in given and "?" not in given:
                if self.fs._strip_protocol(given).rstrip("/") == self.root:
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
        if self.protocol in ("gs", "gcs") and self._gcs_json_uploads():
            return _GCSResumableWriter(self, name)
        if self.streaming:
            return _StreamWriter(self, name)
        return _BufferWriter(self, name)

    @property
    def parallel_parts(self) -> bool:
        """Whether one object's upload is itself parallel (our S3 multipart writer)."""
        if self.protocol not in ("s3", "s3a"):
            return False
        from . import _cloud

        return _cloud.s3_supported(self)

    def _gcs_json_uploads(self) -> bool:
        """True when ``fs`` is a gcsfs filesystem that :class:`_GCSResumableWriter` can drive.

        Zonal buckets (gcsfs's experimental gRPC appends) are left to gcsfs's own file object.
        """
        if self._gcs_json is not None:
            return self._gcs_json
        fs = self.fs
        needed = ("_call", "_set_session", "_get_headers", "split_path", "_location")
        ok = (
            type(fs).__module__.startswith("gcsfs")
            and all(hasattr(fs, a) for a in needed)
            and getattr(fs, "loop", None) is not None
        )
        if ok and hasattr(fs, "_is_zonal_bucket"):
            bucket = fs.split_path(self.root)[0]
            try:
                zonal = asyncio.run_coroutine_threadsafe(fs._is_zonal_bucket(bucket), fs.loop).result()
            except Exception:  # noqa: BLE001 - unknown this time: gcsfs's writer, asked again next save
                return False
            ok = not zonal
        self._gcs_json = ok
        return ok

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

            # One ranged GET (open() would first ask for the object's size, or not, depending on
            # the listing cache).
            return self._retrying(
                lambda: self.fs.cat_file(self.path(name), start=0, end=max_bytes + 1), f"read {name}"
            )
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


# Every chunk of a GCS resumable upload but the last is a multiple of 256 KiB.
_GCS_QUANTUM = 256 << 10
# Custom metadata key under which a GCS upload carries its writer's token (see _GCSResumableWriter).
GCS_UPLOAD_TOKEN = "ckpt-callbacks-upload"


class _GCSResumableWriter(AtomicWriter):
    """GCS: one resumable upload session per object, resumed from the server's offset after a failure.

    gcsfs's file object re-sends a chunk blindly when a request fails. When the server had in fact
    stored it (only the reply was lost), the session refuses the repeat (the offsets no longer match)
    and the save fails; when that chunk was the last one, the object is complete and visible while
    the save reports a failure — for the state file, the manager then removes the checkpoint the new
    state file names. This writer speaks the resumable-upload protocol itself, on gcsfs's HTTP
    session and credentials:

    - bytes are buffered up to ``block_size`` (gcsfs's ``default_block_size``: 5 MiB unless
      ``storage_options`` set it); then every whole 256 KiB of the buffer goes up as one chunk, and
      the rest at ``commit()`` as the last chunk, which makes the object visible;
    - every request is retried on transient errors (``_cloud.retry_call``). A failed chunk is sent
      again; if the session refuses it because it holds more than the writer knew (a lost reply),
      it is asked how much (``Content-Range: bytes */*``) and the upload goes on from there;
    - a lost reply to the last chunk: the repeat finds the session finished (200, or 404 once it is
      gone); the object is accepted only if it carries this writer's token (custom metadata
      ``ckpt-callbacks-upload``, set when the session is opened) and the expected size, so an older
      object of the same name (the previous ``checkpoint`` file) never passes for it;
    - gcsfs's ``consistency`` option ("md5", "crc32c", "size") is checked on the finished object;
    - ``abort()`` cancels the session (one ``DELETE``, ``_cloud.discard_upload``): nothing visible.
    """

    def __init__(self, storage: Storage, name: str) -> None:
        super().__init__(storage, name)
        from gcsfs.checkers import get_consistency_checker

        self.fs = storage.fs
        self.bucket, self.key, _ = self.fs.split_path(storage.path(name))
        self.block = max(_GCS_QUANTUM, int(getattr(self.fs, "default_block_size", 0) or 0))
        try:
            self.checker = get_consistency_checker(getattr(self.fs, "consistency", None))
        except Exception as e:  # noqa: BLE001 - e.g. "crc32c" without crcmod installed
            raise _write_error(storage, name, e) from e
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
        from . import _cloud

        try:
            _cloud.discard_upload(self)  # cancels the session (and sets self.location to None)
        except Exception:  # noqa: BLE001 - best effort; an unfinished session is never visible
            pass
        self.location = None

    # ---------------------------------------------------------------- protocol

    def _what(self) -> str:
        return f"upload of {self.storage.url_of(self.name)}"

    def _send(self, final: bool) -> None:
        """Upload the buffer: its whole 256 KiB units, or (``final``) all of it, finishing the object."""
        from . import _cloud

        if self.location is None:
            self.location = _cloud.retry_call(self._initiate, f"start {self._what()}")
        total = self.offset + len(self.buf) if final else None
        stalled = 0
        try:
            while not self.finished and (final or len(self.buf) >= _GCS_QUANTUM):
                before = self.offset
                _cloud.retry_call(lambda: self._chunk(total), f"{self._what()} at byte {self.offset}")
                stalled = 0 if self.offset > before or self.finished else stalled + 1
                if stalled >= _cloud.RETRY_ATTEMPTS:
                    raise OSError(
                        f"GCS stored none of the bytes sent {stalled} times for the {self._what()}."
                    )
        except Exception:
            # Every reply to the last chunk was lost: the object may be complete, and then it is ours.
            obj = self._own_object(total) if total is not None and self._unsure else None
            if obj is None:
                raise
            self._finish(obj)

    def _initiate(self) -> str:
        from gcsfs.core import quote

        fs = self.fs
        url = f"{fs._location}/upload/storage/v1/b/{quote(self.bucket)}/o?name={quote(self.key)}"
        doc = {"name": self.key, "metadata": {GCS_UPLOAD_TOKEN: self.token}}

        async def go() -> str:
            headers, _ = await fs._call(
                "POST",
                url,
                uploadType="resumable",
                json=doc,
                headers={"X-Upload-Content-Type": "application/octet-stream"},
            )
            location = headers.get("Location")
            if not location:
                raise OSError(f"GCS opened no upload session for {self.key!r} (no Location header).")
            return location

        return asyncio.run_coroutine_threadsafe(go(), fs.loop).result()

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
        status, headers, body = self._request(content_range, view[:n] if n else None)
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
            query = self._request("bytes */*" if total is None else f"bytes */{total}", None)
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

    def _request(self, content_range: str, data: Any) -> tuple[int, Any, bytes]:
        """One PUT to the session URI, straight on gcsfs's HTTP session (gcsfs would repeat it blindly)."""
        fs = self.fs
        location = self.location

        async def go() -> tuple[int, Any, bytes]:
            session = await fs._set_session()
            headers = fs._get_headers(
                {"Content-Range": content_range, "Content-Type": "application/octet-stream"}
            )
            async with session.put(
                location, data=data, headers=headers, timeout=fs.requests_timeout, allow_redirects=False
            ) as r:
                return r.status, r.headers, await r.read()

        return asyncio.run_coroutine_threadsafe(go(), fs.loop).result()

    def _raise(self, status: int, body: bytes) -> None:
        from gcsfs.retry import validate_response

        validate_response(status, body, self.location)  # HttpError / FileNotFoundError / ...
        raise OSError(f"GCS answered HTTP {status} to the {self._what()}: {body[:200]!r}")

    def _own_object(self, total: int) -> dict | None:
        """The object now stored under the name, if it is the one this writer's session finished."""
        fs = self.fs

        async def go() -> dict:
            return await fs._call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)

        try:
            obj = asyncio.run_coroutine_threadsafe(go(), fs.loop).result()
        except Exception:  # noqa: BLE001 - not found, or unknowable now: not ours
            return None
        mine = (obj.get("metadata") or {}).get(GCS_UPLOAD_TOKEN) == self.token
        return obj if mine and str(obj.get("size")) == str(total) else None


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
