"""One writer per checkpoint directory: a lock file on local disk, a lease object on object stores.

Two managers saving into one directory would delete each other's in-flight files (the leftovers
cleanup at manager start) and overwrite each other's state file, so the second one is refused with
``CheckpointWriteError`` (errno ``EBUSY``) naming the holder and how to fix it.

- Local disk: ``.ckpt_callbacks.lock`` holds ``{"pid", "host", ...}`` and is ``flock``-ed. The kernel
  drops the flock when its process dies, so a lock left by a killed run is taken over at once; the
  recorded pid and host only feed the messages. Where ``flock`` is unavailable the file is created
  exclusively instead, and taken over when its pid is dead on this host.
- Object stores: the same name is a lease object written with a conditional create where the backend
  supports it (S3 ``If-None-Match``, GCS ``ifGenerationMatch=0``), refreshed by a daemon thread, and
  taken over once it has not been refreshed for ``LEASE_SECONDS`` (or its pid is dead on this host).

Within one process the lock is re-entrant per directory: managers that the Keras / Lightning
callbacks re-create after closing (or dropping) an earlier one share it, and it is released when the
last of them is closed or garbage-collected. A forked child does not inherit it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from typing import Any

from ..errors import CheckpointWriteError

logger = logging.getLogger("ckpt_callbacks")

LOCK_FILE_NAME = ".ckpt_callbacks.lock"
# An object-store lease not refreshed for this long belongs to a dead writer.
LEASE_SECONDS = 300.0
_REFRESH_SECONDS = 60.0
_MAX_LOCK_BYTES = 4096

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_registry_lock = threading.Lock()
_held: dict[str, _Held] = {}
_pending: list[tuple[str, WriterLock]] = []  # releases queued by close() / finalizers


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another writer"
    return f"process {holder.get('pid')!r} on host {holder.get('host')!r}"


def _busy(url: str, lock_url: str, holder: dict | None, extra: str = "") -> CheckpointWriteError:
    err = CheckpointWriteError(
        f"Another CheckpointManager is writing to {url!r}: {_describe(holder)} holds {lock_url!r}{extra}. "
        "Two writers in one directory would delete each other's checkpoints. Use a different directory, "
        "or stop the other run; if it is no longer running, delete the lock file and try again."
    )
    err.errno = errno.EBUSY
    return err


def _parse_holder(data: bytes) -> dict | None:
    try:
        holder = json.loads(data[:_MAX_LOCK_BYTES])
    except (ValueError, RecursionError):
        return None
    return holder if isinstance(holder, dict) else None


class _Held:
    """The process's hold on one directory, shared by every manager of it in this process."""

    def __init__(self, key: str, release: Any, after_fork: Any) -> None:
        self.key = key
        self.count = 0
        self._release = release
        self._after_fork = after_fork

    def drop(self) -> None:
        self._release()

    def forget_after_fork(self) -> None:
        self._after_fork()


class WriterLock:
    """One manager's share of the directory lock; ``release()`` is idempotent."""

    def __init__(self, key: str, held: _Held) -> None:
        self.key = key
        self.held = held
        self._released = False

    def release(self) -> None:
        _release(self.key, self)


def _release(key: str, token: WriterLock) -> None:
    # Called from close() and from weakref finalizers, which the garbage collector may run inside
    # acquire() on this very thread: so never block on the registry lock here. Queue the release;
    # whoever holds the lock drains the queue on its way out.
    _pending.append((key, token))
    _drain()


def _drain() -> None:
    while _pending:
        if not _registry_lock.acquire(blocking=False):
            return  # its holder drains the queue before letting go
        try:
            _pending_under_lock()
        finally:
            _registry_lock.release()


def acquire(storage: Any, owner: object) -> WriterLock:
    """Take (or share, within this process) the writer lock of ``storage``'s directory.

    The share is released by ``WriterLock.release()`` or when ``owner`` is garbage-collected.
    Raises CheckpointWriteError (errno EBUSY) when another process holds it.
    """
    key = os.path.realpath(storage.root) if storage.is_local else storage.url
    try:
        with _registry_lock:
            # Queued releases first: a manager dropped without close() must not keep a share.
            _pending_under_lock()
            held = _held.get(key)
            if held is None:
                try:
                    held = _acquire_local(storage, key) if storage.is_local else _acquire_remote(storage, key)
                except CheckpointWriteError as e:
                    if e.errno == errno.EBUSY:
                        raise
                    # A read-only directory or bucket (a manager that only restores) cannot hold a lock
                    # but has nothing to protect either: a save there fails on its own, with its own error.
                    logger.warning("No writer lock for %s (%s); continuing without one.", storage.url, e)
                    held = _Held(key, lambda: None, lambda: None)
                _held[key] = held
            held.count += 1
            token = WriterLock(key, held)
    finally:
        _drain()  # releases queued (by other threads or the GC) while the lock was held
    weakref.finalize(owner, _release, key, token)
    return token


def _pending_under_lock() -> None:
    while _pending:
        key, token = _pending.pop()
        if token._released:
            continue
        token._released = True
        held = _held.get(key)
        if held is None or held is not token.held:
            continue
        held.count -= 1
        if held.count <= 0:
            del _held[key]
            try:
                held.drop()  # under the lock: a concurrent acquire of this key must see it gone
            except Exception as e:  # noqa: BLE001 - best effort; a dead lock is taken over later
                logger.warning("Could not release the writer lock of %s: %s", key, e)


# ------------------------------------------------------------------ local disk


def _holder_doc() -> bytes:
    return json.dumps(
        {"pid": os.getpid(), "host": _host(), "token": uuid.uuid4().hex, "time": time.time()},
        separators=(",", ":"),
    ).encode()


def _acquire_local(storage: Any, key: str) -> _Held:
    storage.makedirs()
    path = storage.path(LOCK_FILE_NAME)
    if fcntl is None:
        return _acquire_exclusive(storage, key, path)
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointWriteError(f"Cannot create the writer lock {path!r}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse_holder(os.pread(fd, _MAX_LOCK_BYTES, 0))
            os.close(fd)
            raise _busy(storage.url, path, holder) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return _acquire_exclusive(storage, key, path)
            raise CheckpointWriteError(f"Cannot lock {path!r}: {e}") from e
        # A releasing holder unlinks the file before closing it: make sure we locked the live one.
        try:
            st = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        fst = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
            os.close(fd)
            continue
        previous = _parse_holder(os.pread(fd, _MAX_LOCK_BYTES, 0))
        if previous:
            logger.info(
                "Taking over the writer lock of %s left by %s (no longer running)",
                storage.url,
                _describe(previous),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_doc(), 0)
        return _Held(key, lambda fd=fd: _release_local(fd, path), lambda fd=fd: os.close(fd))
    raise CheckpointWriteError(f"Could not take the writer lock {path!r}: it keeps being replaced.")


def _release_local(fd: int, path: str) -> None:
    try:
        os.unlink(path)  # while still locked, so no one locks a file that is about to vanish
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _acquire_exclusive(storage: Any, key: str, path: str) -> _Held:
    """Lock-file protocol without flock: exclusive create; a dead pid on this host is stale."""
    for _ in range(3):
        doc = _holder_doc()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(path, "rb") as f:
                    holder = _parse_holder(f.read(_MAX_LOCK_BYTES))
            except FileNotFoundError:
                continue
            if holder and holder.get("host") == _host() and not _pid_alive(holder.get("pid")):
                logger.warning(
                    "Taking over the stale writer lock of %s left by %s", storage.url, _describe(holder)
                )
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                continue
            raise _busy(storage.url, path, holder) from None
        except OSError as e:
            raise CheckpointWriteError(f"Cannot create the writer lock {path!r}: {e}") from e
        try:
            os.write(fd, doc)
        finally:
            os.close(fd)
        token = json.loads(doc)["token"]

        def release(token: str = token) -> None:
            try:
                with open(path, "rb") as f:
                    mine = (_parse_holder(f.read(_MAX_LOCK_BYTES)) or {}).get("token") == token
                if mine:
                    os.unlink(path)
            except FileNotFoundError:
                pass

        return _Held(key, release, lambda: None)
    raise CheckpointWriteError(f"Could not take the writer lock {path!r}: it keeps being replaced.")


# ------------------------------------------------------------------ object stores


class _Lease:
    def __init__(self, storage: Any) -> None:
        self.fs = storage.fs
        self._retrying = storage._retrying  # transient object-store errors are retried like saves
        self.path = storage.path(LOCK_FILE_NAME)
        self.url = storage.url_of(LOCK_FILE_NAME)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def doc(self) -> bytes:
        return json.dumps(
            {
                "pid": os.getpid(),
                "host": _host(),
                "token": self.token,
                "time": time.time(),
                "lease_s": LEASE_SECONDS,
            },
            separators=(",", ":"),
        ).encode()

    def read(self) -> dict | None:
        try:
            self.fs.invalidate_cache(self.path)
            return _parse_holder(self._retrying(lambda: self.fs.cat_file(self.path), "read the writer lease"))
        except FileNotFoundError:
            return None

    def put(self, **kwargs: Any) -> None:
        self._retrying(lambda: self.fs.pipe_file(self.path, self.doc(), **kwargs), "write the writer lease")

    def start_refreshing(self) -> None:
        self._thread = threading.Thread(target=self._refresh_loop, name="ckpt-lease", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(_REFRESH_SECONDS):
            try:
                if (self.read() or {}).get("token") != self.token:
                    logger.error("The writer lease %s was taken over by another writer", self.url)
                    return
                self.put()
            except Exception as e:  # noqa: BLE001 - retried at the next tick
                logger.warning("Could not refresh the writer lease %s: %s", self.url, e)

    def release(self) -> None:
        self._stop.set()
        if (self.read() or {}).get("token") == self.token:
            self.fs.rm_file(self.path)

    def forget(self) -> None:
        self._stop.set()


def _acquire_remote(storage: Any, key: str) -> _Held:
    lease = _Lease(storage)
    try:
        holder = lease.read()
        if holder is not None:
            same_host = holder.get("host") == _host()
            age = (
                time.time() - holder["time"] if isinstance(holder.get("time"), (int, float)) else float("inf")
            )
            if (same_host and _pid_alive(holder.get("pid"))) or (not same_host and 0 <= age < LEASE_SECONDS):
                raise _busy(
                    storage.url,
                    lease.url,
                    holder,
                    ""
                    if same_host
                    else f" (refreshed {age:.0f} s ago; it expires {LEASE_SECONDS:.0f} s after that)",
                )
            logger.warning("Taking over the writer lease of %s left by %s", storage.url, _describe(holder))
            lease.put()
        else:
            try:
                lease.put(mode="create")
            except FileExistsError:
                holder = lease.read()
                if holder is None:
                    logger.warning("Replacing the unreadable writer lease %s", lease.url)
                    lease.put()
                elif holder.get("token") != lease.token:  # our own when a retried create lost its reply
                    raise _busy(storage.url, lease.url, holder) from None
            except (TypeError, NotImplementedError):  # a backend without exclusive create
                lease.put()
        # Without a conditional write two writers can both get here; the last PUT wins and the
        # other one sees a foreign token.
        now = lease.read()
        if (now or {}).get("token") != lease.token:
            raise _busy(storage.url, lease.url, now)
    except CheckpointWriteError:
        raise
    except Exception as e:  # noqa: BLE001 - any backend error
        raise CheckpointWriteError(
            f"Cannot take the writer lease {lease.url!r}: {type(e).__name__}: {e}"
        ) from e
    lease.start_refreshing()
    return _Held(key, lease.release, lease.forget)


# ------------------------------------------------------------------ fork


def _after_fork_in_child() -> None:
    # The child is another process: it must neither keep the parent's flock alive (closing its copy
    # of the descriptor does not unlock the parent's) nor believe it holds the lock.
    global _registry_lock
    _registry_lock = threading.Lock()
    _pending.clear()
    for held in list(_held.values()):
        try:
            held.forget_after_fork()
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
