"""Every private use of s3fs, gcsfs, aiohttp and fsspec internals, in one place.

Our S3 and GCS writers drive the libraries below their public file objects (see ``_s3`` and
``_gcs`` for why). What they need that no public API offers is wrapped here in one small named
function each, importing the library lazily (``import ckpt_callbacks`` imports none of them), and
``tests/test_storage_compat.py`` checks each one against the installed version.

No silent fallback: when an s3fs / gcsfs filesystem lacks what our writer needs (a renamed or
removed internal), :func:`require_s3fs` / :func:`require_gcsfs` raise
:class:`UnsupportedStorageLibraryError` naming the installed version and the supported range,
instead of switching to the library's own writer (whose failure modes are why ours exist). A
filesystem that is not s3fs / gcsfs at all (another implementation registered for ``s3://``)
is not ours to drive and gets the generic fsspec file-object writer, as any other store does.

Public entry points are used where they exist: the aiobotocore client from ``S3FileSystem.get_s3``
(not ``_call_s3``, which would also stack s3fs's retries under ours), ``s3fs.errors.
translate_boto_error``, ``gcsfs.core.initiate_upload``, ``gcsfs.retry.validate_response``,
``gcsfs.checkers.get_consistency_checker``, ``aiohttp.payload.register_payload`` and
``fsspec.core.strip_protocol``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

# Defined in errors.py with the rest of the exception tree; importable from here as before.
from ..errors import UnsupportedStorageLibraryError

T = TypeVar("T")

# The ranges the `s3` / `gcs` extras in pyproject.toml allow; tested: s3fs 2026.9.0, gcsfs 2026.10.1,
# fsspec 2026.9.0, aiohttp 3.14.5.
SUPPORTED = {"s3fs": ">=2024.2,<2027", "gcsfs": ">=2024.2,<2027", "aiohttp": ">=3.9,<4"}

# What our S3 writer uses of an s3fs filesystem (``_get_s3_method_kwargs`` is the private one).
S3FS_NEEDS = ("get_s3", "set_session", "_get_s3_method_kwargs", "split_path", "loop")
# What our GCS writer uses of a gcsfs filesystem (``_call``, ``_set_session``, ``_get_headers``
# are private).
GCSFS_NEEDS = ("_call", "_set_session", "_get_headers", "split_path", "requests_timeout", "loop")


def version_of(lib: str) -> str:
    try:
        return importlib.metadata.version(lib)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def unsupported(lib: str, what: str) -> UnsupportedStorageLibraryError:
    return UnsupportedStorageLibraryError(
        f"ckpt_callbacks cannot drive {lib} {version_of(lib)}: {what}. Supported: {lib}{SUPPORTED[lib]} "
        f"(the range of the ckpt-callbacks extras); install a version in that range, e.g. "
        f"pip install 'ckpt-callbacks[{'s3' if lib == 's3fs' else 'gcs'}]'."
    )


def on_loop(fs: Any, make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on the filesystem's event loop (fsspec's IO thread) and wait for it."""
    return asyncio.run_coroutine_threadsafe(make(), fs.loop).result()


# ---------------------------------------------------------------------------------------------- fsspec


def strip_protocol(url: str) -> str:
    """The path fsspec makes of ``url`` (the public spelling of ``fs._strip_protocol``)."""
    import fsspec.core

    return fsspec.core.strip_protocol(url)


# ---------------------------------------------------------------------------------------------- s3fs


def is_s3fs(fs: Any) -> bool:
    return type(fs).__module__.split(".")[0] == "s3fs"


def require_s3fs(fs: Any) -> None:
    """Raise if this s3fs filesystem lacks what our S3 writer uses."""
    missing = [a for a in S3FS_NEEDS if getattr(fs, a, None) is None]
    if missing:
        raise unsupported("s3fs", f"S3FileSystem has no {', '.join(missing)}")


def s3_method_kwargs(fs: Any, method: Any, **kwargs: Any) -> dict:
    """The request's arguments plus the filesystem's own (``s3_additional_kwargs``, requester pays,
    SSE settings), filtered to what ``method`` accepts: exactly what s3fs sends for its own calls."""
    return fs._get_s3_method_kwargs(method, **kwargs)


async def s3_call(fs: Any, method: str, *, translate: bool = True, **kwargs: Any) -> Any:
    """One S3 request on s3fs's aiobotocore client (credentials, endpoint, ``storage_options``).

    Unlike ``fs._call_s3`` this does not retry (ours does, see ``_retry``); botocore's own retries,
    configured by the user's ``config_kwargs``, still apply. ``translate``: a ``ClientError`` becomes
    the ``OSError`` s3fs raises for it (``PermissionError``, ``FileNotFoundError``, ...), with the
    original as ``__cause__``, as ``_call_s3`` did.
    """
    await fs.set_session()
    s3 = await fs.get_s3(kwargs.get("Bucket"))
    call = getattr(s3, method)
    try:
        return await call(**s3_method_kwargs(fs, call, **kwargs))
    except Exception as e:
        if not translate:
            raise
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        if isinstance(e, ClientError):
            raise translate_boto_error(e) from e
        raise


# ---------------------------------------------------------------------------------------------- aiohttp


def register_payload(body_type: type, remaining: Callable[[Any], memoryview], send_chunk: int) -> None:
    """Make aiohttp send a ``body_type`` file object straight from its buffer.

    aiohttp sends any other file object by reading 256 KiB at a time on a worker thread and handing
    each copy back to the event loop: two thread switches per chunk, all through the one event-loop
    thread that sends every part of the process, and each a wait for the GIL when other threads are
    busy (measured: a save next to an in-process S3 server ran 1.2x boto3's time). Registered for
    ``body_type`` only, so other aiohttp users are not affected. Memory stays bounded: the writer
    drains the socket transport after every chunk. ``Payload``'s constructor, ``_value``, ``_size``
    and ``_autoclose`` are aiohttp internals (documented for subclasses, not as API).
    """
    from aiohttp import payload as aiohttp_payload

    class PartPayload(aiohttp_payload.Payload):
        _autoclose = True

        def __init__(self, value: Any, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("content_type", "application/octet-stream")
            super().__init__(value, *args, **kwargs)
            self._size = len(value) - value.tell()

        def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
            return bytes(remaining(self._value)).decode(encoding, errors)

        async def write(self, writer: Any) -> None:
            await self.write_with_length(writer, None)

        async def write_with_length(self, writer: Any, content_length: int | None) -> None:
            view = remaining(self._value)
            if content_length is not None:
                view = view[:content_length]
            for i in range(0, len(view), send_chunk):
                await writer.write(view[i : i + send_chunk])

    aiohttp_payload.register_payload(PartPayload, body_type, order=aiohttp_payload.Order.try_first)


# ---------------------------------------------------------------------------------------------- gcsfs


def is_gcsfs(fs: Any) -> bool:
    return type(fs).__module__.split(".")[0] == "gcsfs"


def require_gcsfs(fs: Any) -> None:
    """Raise if this gcsfs filesystem (or gcsfs's module API) lacks what our GCS writer uses."""
    missing = [a for a in GCSFS_NEEDS if not hasattr(fs, a) or (a == "loop" and fs.loop is None)]
    import gcsfs.checkers
    import gcsfs.core
    import gcsfs.retry

    for module, name in (
        (gcsfs.core, "initiate_upload"),
        (gcsfs.retry, "validate_response"),
        (gcsfs.checkers, "get_consistency_checker"),
    ):
        if not callable(getattr(module, name, None)):
            missing.append(f"{module.__name__}.{name}")
    if missing:
        raise unsupported("gcsfs", f"GCSFileSystem has no {', '.join(missing)}")


def gcs_is_zonal(fs: Any, bucket: str) -> bool:
    """Whether ``bucket`` is a zonal bucket (gcsfs's experimental gRPC appends); False where gcsfs
    has no zonal support. Raises when the probe itself fails."""
    probe = getattr(fs, "_is_zonal_bucket", None)
    if probe is None:
        return False
    return bool(on_loop(fs, lambda: probe(bucket)))


def gcs_consistency_checker(fs: Any) -> Any:
    """gcsfs's checker for the filesystem's ``consistency`` option ("md5", "crc32c", "size", None)."""
    from gcsfs.checkers import get_consistency_checker

    return get_consistency_checker(getattr(fs, "consistency", None))


def gcs_initiate_upload(fs: Any, bucket: str, key: str, metadata: dict[str, str]) -> str:
    """Open a resumable upload session (gcsfs's public ``initiate_upload``); returns its URI."""
    from gcsfs.core import initiate_upload

    location = on_loop(fs, lambda: initiate_upload(fs, bucket, key, metadata=metadata))
    if not isinstance(location, str) or not location:
        raise OSError(f"GCS opened no upload session for {key!r} (Location: {location!r}).")
    return location


def gcs_put(fs: Any, location: str, content_range: str, data: Any) -> tuple[int, Any, bytes]:
    """One PUT to a session URI on gcsfs's HTTP session and credentials, without gcsfs's retries
    (which would repeat a chunk blindly). Returns (status, headers, body)."""

    async def go() -> tuple[int, Any, bytes]:
        session = await fs._set_session()
        headers = fs._get_headers(
            {"Content-Range": content_range, "Content-Type": "application/octet-stream"}
        )
        async with session.put(
            location, data=data, headers=headers, timeout=fs.requests_timeout, allow_redirects=False
        ) as r:
            return r.status, r.headers, await r.read()

    return on_loop(fs, go)


def gcs_get_object(fs: Any, bucket: str, key: str) -> dict:
    """The object resource (JSON API ``GET b/{bucket}/o/{key}``), with its custom metadata."""
    return on_loop(fs, lambda: fs._call("GET", "b/{}/o/{}", bucket, key, json_out=True))


def gcs_cancel_session(fs: Any, location: str) -> int:
    """Cancel a resumable upload session: one DELETE of its URI (gcsfs's ``discard()`` retries six
    times with up to 32 s of backoff). Returns the HTTP status."""

    async def cancel() -> int:
        import aiohttp

        session = await fs._set_session()
        url = location.replace("&ifGenerationMatch=0", "")
        timeout = aiohttp.ClientTimeout(total=30)
        async with session.request("DELETE", url, headers=fs._get_headers(None), timeout=timeout) as r:
            await r.read()
            return r.status

    return on_loop(fs, cancel)


def gcs_raise_for(status: int, body: bytes, location: str | None) -> None:
    """Raise gcsfs's exception for an error answer (HttpError, FileNotFoundError, ...)."""
    from gcsfs.retry import validate_response

    validate_response(status, body, location)
