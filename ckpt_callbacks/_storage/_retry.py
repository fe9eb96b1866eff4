"""The one retry layer: transient-error classification, bounded backoff, retried calls and reads.

Which layer retries: this one. It is the only layer that sees whole operations, so it is the one that
can retry them correctly: a part is re-sent with a fresh body (s3fs's ``_call_s3`` re-sent the same,
already-read one), a GCS session resumes from the offset the server reports (gcsfs repeats a chunk
blindly), a ranged read restarts at the position it started from, and every attempt is logged.
Bounded: ``RETRY_ATTEMPTS`` attempts in total, exponential backoff with jitter
(``BACKOFF_BASE_S`` doubling, at most ``BACKOFF_MAX_S``); errors that are not transient by nature
(403, 404, a bad request) fail at once.

What the libraries below still do, and why it is left as it is:

- Our own S3 requests (the multipart writer, leftover-upload aborts) go straight to s3fs's aiobotocore
  client (``_compat.s3_call``), so s3fs's retry loop is no longer stacked under ours. botocore's own
  retries stay: they are the user's (``storage_options={"config_kwargs": {"retries": ...}}``), the
  client is shared with every other s3fs call (listing, reads, deletes), and they rewind the body
  and re-sign correctly. Lowering them would take a second client per filesystem (a second
  connection pool and credential refresher).
- Our own GCS chunk PUTs and session DELETEs go straight to gcsfs's aiohttp session: no gcsfs retry.
  Opening a session (``gcsfs.core.initiate_upload``) and reading an object resource keep gcsfs's
  ``retry_request`` (up to 6 attempts) underneath, as do reads, listings and deletes through the
  public fsspec API on both stores: those retry counts are fixed in the library (gcsfs) or a
  class-wide attribute of a filesystem instance fsspec caches and shares with the user's own code
  (s3fs ``retries``), so changing them here would change the user's filesystem too. Worst case
  under a persistent fault is therefore ``RETRY_ATTEMPTS`` x the library's attempts, each bounded.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

logger = logging.getLogger("ckpt_callbacks")

T = TypeVar("T")

# Bounded retries for transient errors: attempts in total, and the backoff between them.
RETRY_ATTEMPTS = 5
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 2.0

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
# Transient errors by library, matched by module and class name (the libraries are imported lazily,
# and their exception classes are not all public).
_TRANSIENT_BY_MODULE = {
    "botocore": frozenset(
        {
            "HTTPClientError",
            "ConnectionError",
            "ConnectionClosedError",
            "EndpointConnectionError",
            "ReadTimeoutError",
            "ConnectTimeoutError",
            "ResponseStreamingError",
            "IncompleteReadError",
            "ResponseParserError",
        }
    ),
    "aiohttp": frozenset(
        {
            "ServerDisconnectedError",
            "ClientOSError",
            "ClientConnectionError",
            "ClientPayloadError",
            "ServerTimeoutError",
            "ClientConnectorError",
            "ConnectionTimeoutError",
            "SocketTimeoutError",
        }
    ),
    # gcsfs raises these from ``requests`` for some answers (a 502 becomes ProxyError); they are
    # OSErrors, not the builtin ConnectionError.
    "requests": frozenset(
        {"ConnectionError", "ProxyError", "ConnectTimeout", "ReadTimeout", "Timeout", "ChunkedEncodingError"}
    ),
}


def _transient_itself(exc: BaseException) -> bool | None:
    """True / False when ``exc`` alone decides; None to look at the error it was raised from."""
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
    name = type(exc).__name__
    code = getattr(exc, "code", None)  # gcsfs HttpError
    if name == "HttpError" and str(code).isdigit() and int(code) in _TRANSIENT_HTTP:
        return True
    module = (type(exc).__module__ or "").split(".")[0]
    if name in _TRANSIENT_BY_MODULE.get(module, ()) or name == "FSTimeoutError":
        return True
    return None


def is_transient(exc: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is worth retrying: 5xx/429, timeouts, resets.

    s3fs translates botocore's ``ClientError`` into ``OSError`` and gcsfs raises its own
    ``HttpError``, keeping the original as ``__cause__``; so the whole chain is inspected.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        verdict = _transient_itself(exc)
        if verdict is not None:
            return verdict
        exc = exc.__cause__ or exc.__context__
    return False


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter, capped: 0.1, 0.2, 0.4, ... seconds, at most BACKOFF_MAX_S."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * (0.5 + random.random() / 2)


def _should_retry(e: Exception, attempt: int, attempts: int, what: str) -> float | None:
    """The delay before the next attempt, or None to give up (and re-raise ``e``)."""
    if attempt == attempts - 1 or not is_transient(e):
        return None
    delay = backoff(attempt)
    logger.warning("%s failed (%s: %s); retrying in %.2f s", what, type(e).__name__, e, delay)
    return delay


def retry_call(fn: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS) -> T:
    """``fn()``, retried with bounded backoff while it fails with a transient error."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            delay = _should_retry(e, attempt, attempts, what)
            if delay is None:
                raise
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
            delay = None if give_up() else _should_retry(e, attempt, attempts, what)
            if delay is None:
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def run_on_loop(fs: Any, make: Callable[[], Awaitable[T]], what: str) -> T:
    """Run one request (with retries) on fsspec's event loop and wait for it."""
    return asyncio.run_coroutine_threadsafe(retry_async(make, what), fs.loop).result()


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
