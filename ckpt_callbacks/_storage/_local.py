"""Local disk: a temp file in the same directory, fsync, ``os.replace``, fsync of the directory.

Several temp files can be fsync'd at once (:func:`concurrently`: one fsync's latency for all of
them), and a directory fsync can run in the background (:func:`in_background`) while the next temp
file is written and fsync'd; :class:`Storage` makes every later rename wait for it.

Every local file operation of :class:`~ckpt_callbacks._storage.Storage` is here, so that the
write-fault tests reach all of them by replacing this module's ``os``.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._base import AtomicWriter, temp_name, write_error

if TYPE_CHECKING:
    from ._store import Storage


class LocalWriter(AtomicWriter):
    def __init__(self, storage: Storage, name: str) -> None:
        super().__init__(storage, name)
        self.tmp = os.path.join(storage.root, temp_name(name))
        try:
            self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise write_error(storage, name, e) from e

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def _write_many(self, views: list[memoryview]) -> None:
        """``os.writev`` of up to 512 views at a time (IOV_MAX is 1024 on Linux), partial writes resumed."""
        if not hasattr(os, "writev"):
            super()._write_many(views)
            return
        pending = [v.cast("B") if v.format != "B" or v.ndim != 1 else v for v in views if v.nbytes]
        while pending:
            batch = pending[:512]
            n = os.writev(self.fd, batch)
            done = 0
            while done < len(batch) and n >= batch[done].nbytes:
                n -= batch[done].nbytes
                done += 1
            pending = pending[done:]
            if n:  # a view written in part: the rest goes first next time
                pending[0] = pending[0][n:]

    def _prepare(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None

    def _commit(self) -> None:
        self._prepare()
        self.storage.settle()  # a directory fsync in flight covers earlier renames: they come first
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


def sync_dir(path: str) -> None:
    """Make renames in the directory durable; filesystems that cannot fsync a directory are tolerated."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Background:
    """One call running on its own thread (a plain thread: fork-safe, unlike a shared pool)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self._fn = fn
        self._thread = threading.Thread(target=self._run, name="ckpt-fsync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller by result()
            self.error = e

    def result(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error


def in_background(fn: Callable[[], None]) -> Background:
    return Background(fn)


def concurrently(fns: list[Callable[[], None]]) -> None:
    """Run ``fns`` at once (the first on this thread); every one finishes, then the first error is raised."""
    others = [Background(fn) for fn in fns[1:]]
    errors: list[BaseException] = []
    try:
        fns[0]()
    except BaseException as e:  # noqa: BLE001 - raised below, after the others finished
        errors.append(e)
    for b in others:
        try:
            b.result()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    if errors:
        raise errors[0]


def free_bytes(path: str) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def remove(path: str) -> None:
    os.remove(path)


def list_names(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def read_bytes(path: str, max_bytes: int | None) -> bytes:
    with open(path, "rb") as f:
        if max_bytes is None:
            return f.read()
        # read(n) allocates n bytes up front: never ask for more than the file holds.
        return f.read(min(os.fstat(f.fileno()).st_size, max_bytes) + 1)


def size(path: str) -> int:
    return os.stat(path).st_size


def open_read(path: str) -> Any:
    return open(path, "rb", buffering=0)
