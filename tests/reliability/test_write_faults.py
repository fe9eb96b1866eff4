"""Write faults (a CheckpointWriteError, the previous checkpoint intact): ENOSPC / EIO / EACCES at the k-th write of a save.

Local disk: the ``os`` module seen by ``ckpt_callbacks._storage._local`` is replaced by a proxy that fails the
k-th ``open`` (of a file), ``write``, ``fsync`` (of a file) or ``replace`` with a real ``OSError``
errno. This reaches exactly the calls a full or failing disk fails (the tests run as root, for whom a
read-only directory is not read-only, and no tiny tmpfs can be mounted here). Directory fsyncs are
left alone: the library deliberately tolerates filesystems that cannot fsync a directory.

Object stores: an fsspec ``MemoryFileSystem`` subclass failing the k-th object PUT (``pipe_file``).

After every fault: CheckpointWriteError with that errno, the state file byte-identical, every
previous checkpoint byte-identical and loadable, no file of the failed save left, and the same
manager saves successfully once the fault is gone.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import threading

import fsspec
import numpy as np
import pytest
import rel_workload as wl
from fsspec.implementations.memory import MemoryFileSystem

from ckpt_callbacks import CheckpointManager, CheckpointWriteError, load_checkpoint
from ckpt_callbacks._manager._lock import LOCK_FILE_NAME
from ckpt_callbacks._storage import _local

ERRNOS = [errno.ENOSPC, errno.EIO, errno.EACCES]
OPS = ["open", "write", "fsync", "replace"]


class FaultyOS:
    """Proxy of ``os`` failing the ``fail_at``-th call of ``op`` (counting only file operations)."""

    def __init__(self, op: str | None = None, fail_at: int = -1, err: int = errno.EIO) -> None:
        self.op, self.fail_at, self.err = op, fail_at, err
        self.counts = dict.fromkeys(OPS + ["remove"], 0)
        self.file_fds: set[int] = set()
        self.injected = 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(os, name)

    def _tick(self, op: str, target: str = "") -> None:
        with self.lock:  # a save fsyncs several temp files at once, from several threads
            n = self.counts[op]
            self.counts[op] += 1
        if op == self.op and n == self.fail_at:
            self.injected += 1
            raise OSError(self.err, os.strerror(self.err), target)

    def open(self, path, flags, *args, **kwargs):
        is_file = bool(flags & os.O_CREAT)
        if is_file:
            self._tick("open", path)
        fd = os.open(path, flags, *args, **kwargs)
        if is_file:
            self.file_fds.add(fd)
        return fd

    def write(self, fd, data):
        self._tick("write")
        return os.write(fd, data)

    def fsync(self, fd):
        if fd in self.file_fds:
            self._tick("fsync")
        return os.fsync(fd)

    def close(self, fd):
        self.file_fds.discard(fd)
        return os.close(fd)

    def replace(self, src, dst):
        self._tick("replace", dst)
        return os.replace(src, dst)

    def remove(self, path):
        self._tick("remove", path)
        return os.remove(path)


def _sha_tree(directory: str) -> dict[str, str]:
    out = {}
    for f in sorted(os.listdir(directory)):
        if f == LOCK_FILE_NAME:
            continue
        with open(os.path.join(directory, f), "rb") as fh:
            out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _manager(directory, **kw):
    box = kw.pop("box", [10])
    kw.setdefault("max_to_keep", 3)
    return CheckpointManager(directory, clock=lambda: wl.clock_for(box[0]), **kw), box


def _prepared(tmp_path, name="d") -> str:
    d = str(tmp_path / name)
    wl.write_foreign_files(d)
    mgr, box = _manager(d)
    for s in (1, 2, 3):
        box[0] = s
        mgr.save(wl.state_for(s), step=s)
    mgr.close()
    return d


def _counts_for_one_save(tmp_path) -> dict[str, int]:
    d = _prepared(tmp_path, "count")
    proxy = FaultyOS()
    mgr, box = _manager(d)
    _local.os = proxy
    try:
        box[0] = 4
        mgr.save(wl.state_for(4), step=4)
    finally:
        _local.os = os
    mgr.close()
    return proxy.counts


def test_every_kth_write_fault_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    counts = _counts_for_one_save(tmp_path)
    # data file, meta, index, state file: 4 opens / fsyncs / replaces, and at least 4 writes
    assert counts["open"] == counts["fsync"] == counts["replace"] == 4 and counts["write"] >= 4, counts
    template = _prepared(tmp_path, "template")
    faults = 0
    for op in OPS:
        for k in range(counts[op]):
            for err in ERRNOS:
                d = str(tmp_path / f"{op}-{k}-{err}")
                shutil.copytree(template, d)
                before = _sha_tree(d)
                mgr, box = _manager(d)
                proxy = FaultyOS(op, k, err)
                monkeypatch.setattr(_local, "os", proxy)
                box[0] = 4
                with pytest.raises(CheckpointWriteError) as info:
                    mgr.save(wl.state_for(4), step=4)
                monkeypatch.setattr(_local, "os", os)
                assert proxy.injected == 1
                faults += 1
                assert info.value.errno == err, (op, k, err, info.value)
                assert "previous checkpoint is intact" in str(info.value)
                # nothing of the failed save remains; everything that was there is byte-identical
                assert _sha_tree(d) == before, (op, k, err)
                assert mgr.latest_checkpoint.endswith("ckpt-3")
                wl.assert_same_tree(load_checkpoint(os.path.join(d, "ckpt-3")), wl.state_for(3))
                # the fault is gone: the same manager saves, and retention resumes
                mgr.save(wl.state_for(4), step=4)
                assert [p.rsplit("-", 1)[1] for p in mgr.checkpoints] == ["2", "3", "4"]
                mgr.close()
                wl.assert_foreign_files_intact(d)
                shutil.rmtree(d)
    print(f"local write faults injected: {faults}")
    assert faults == 3 * sum(counts[op] for op in OPS)


@pytest.mark.parametrize("err", ERRNOS)
def test_failed_deletion_is_logged_and_cleaned_up_at_next_start(tmp_path, monkeypatch, caplog, err):
    d = _prepared(tmp_path)
    mgr, box = _manager(d)
    monkeypatch.setattr(_local, "os", FaultyOS("remove", 0, err))
    box[0] = 4
    with caplog.at_level(logging.WARNING, logger="ckpt_callbacks"):
        mgr.save(wl.state_for(4), step=4)  # committed: a failed deletion does not fail the save
    monkeypatch.setattr(_local, "os", os)
    assert "Could not remove" in caplog.text
    mgr.close()
    assert os.path.exists(os.path.join(d, "ckpt-1.data-00000-of-00001"))  # dropped, not yet deleted
    mgr, box = _manager(d)
    # its data file stays: the kept checkpoints point into it for the workload's frozen tensor
    assert [f for f in os.listdir(d) if f.startswith("ckpt-1.")] == ["ckpt-1.data-00000-of-00001"]
    assert sorted(mgr.removed_leftovers) == ["ckpt-1.index", "ckpt-1.meta"]
    mgr.close()
    wl.assert_foreign_files_intact(d)


def test_async_save_fault_is_raised_by_wait_and_previous_stays(tmp_path, monkeypatch):
    d = _prepared(tmp_path)
    before = _sha_tree(d)
    mgr, box = _manager(d, async_save=True)
    monkeypatch.setattr(_local, "os", FaultyOS("write", 0, errno.ENOSPC))
    box[0] = 4
    mgr.save(wl.state_for(4), step=4)
    with pytest.raises(CheckpointWriteError) as info:
        mgr.wait_until_finished()
    monkeypatch.setattr(_local, "os", os)
    assert info.value.errno == errno.ENOSPC
    assert _sha_tree(d) == before
    mgr.save(wl.state_for(4), step=4)
    mgr.close()
    assert mgr.latest_checkpoint.endswith("ckpt-4")


# ---------------------------------------------------------------- preflight: free space


def test_preflight_refuses_a_save_that_cannot_fit_before_anything_is_deleted(tmp_path, monkeypatch):
    d = _prepared(tmp_path)
    before = _sha_tree(d)
    mgr, box = _manager(d)
    usage = shutil.disk_usage(d)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100_000))
    big = {"w": np.zeros(1 << 20, dtype=np.float32)}  # 4 MiB
    box[0] = 4
    with pytest.raises(CheckpointWriteError, match="Not enough free space") as info:
        mgr.save(big, step=4)
    msg = str(info.value)
    assert "4194304 bytes" in msg and "100000" in msg and "Nothing was written or deleted" in msg
    assert _sha_tree(d) == before
    # re-saving an existing step: refused before the old checkpoint is un-listed
    with pytest.raises(CheckpointWriteError, match="Not enough free space"):
        mgr.save(big, step=3)
    assert _sha_tree(d) == before
    assert mgr.latest_checkpoint.endswith("ckpt-3")
    monkeypatch.undo()
    mgr.close()
    mgr, box = _manager(d)  # a restart finds ckpt-3 intact and does not treat it as a leftover
    assert mgr.removed_leftovers == []
    wl.assert_same_tree(mgr.restore(), wl.state_for(3))
    mgr.close()


# ---------------------------------------------------------------- object stores: failing PUTs


class FaultyMemoryFS(MemoryFileSystem):
    """memory:// whose k-th object PUT fails (a full bucket, a 500, a dropped connection)."""

    protocol = "faultymem"
    fail_at = -1
    err = errno.EIO
    puts = 0
    store: dict = {}
    pseudo_dirs = [""]

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        n = FaultyMemoryFS.puts
        FaultyMemoryFS.puts += 1
        if n == FaultyMemoryFS.fail_at:
            raise OSError(FaultyMemoryFS.err, os.strerror(FaultyMemoryFS.err), path)
        return super().pipe_file(path, value, mode=mode, **kwargs)


@pytest.fixture
def faulty_fs():
    fsspec.register_implementation("faultymem", FaultyMemoryFS, clobber=True)
    FaultyMemoryFS.store.clear()
    yield FaultyMemoryFS
    FaultyMemoryFS.fail_at = -1
    FaultyMemoryFS.store.clear()


def _objects(fs_cls) -> dict[str, bytes]:
    return {k: bytes(v.getvalue()) for k, v in fs_cls.store.items()}


def test_object_store_put_faults(faulty_fs):
    url = "faultymem://bucket/run"
    mgr, box = _manager(url)
    for s in (1, 2, 3):
        box[0] = s
        mgr.save(wl.state_for(s), step=s)
    start = faulty_fs.puts
    box[0] = 4
    mgr.save(wl.state_for(4), step=4)  # data, meta, index, state
    puts_per_save = faulty_fs.puts - start
    assert puts_per_save == 4
    faults = 0
    for k in range(puts_per_save):
        for err in ERRNOS:
            before = {n: d for n, d in _objects(faulty_fs).items() if not n.endswith(LOCK_FILE_NAME)}
            faulty_fs.fail_at = faulty_fs.puts + k
            faulty_fs.err = err
            box[0] += 1
            with pytest.raises(CheckpointWriteError) as info:
                mgr.save(wl.state_for(box[0]), step=box[0])
            faulty_fs.fail_at = -1
            faults += 1
            assert info.value.errno == err
            after = {n: d for n, d in _objects(faulty_fs).items() if not n.endswith(LOCK_FILE_NAME)}
            assert after == before, (k, err)
            latest = mgr.latest_checkpoint
            wl.assert_same_tree(load_checkpoint(latest), wl.state_for(int(latest.rsplit("-", 1)[1])))
            box[0] -= 1
    mgr.close()
    print(f"object-store PUT faults injected: {faults}")
