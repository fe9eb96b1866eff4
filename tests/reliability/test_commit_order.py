"""The local commit order, observed on the real calls while a save runs (its fsyncs run concurrently).

A save's temp files are fsync'd at once and a directory fsync may still be running while the state
file's temp is written; what must hold regardless (README, "Crash safety"): a file is renamed into
place only after its temp file's fsync returned; the ``.index`` only after a directory fsync that
started after the data and ``.meta`` renames returned; the ``checkpoint`` state file only after one
that started after the index rename; deletions only after the state file is durable.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from ckpt_callbacks import CheckpointManager, load_checkpoint, save_checkpoint
from ckpt_callbacks._storage import _local


class RecordingOS:
    """Proxy of ``os`` for ``_storage._local`` recording opens, fsyncs, renames and removes in order."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.events: list[tuple[str, str]] = []
        self.paths: dict[int, str] = {}
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(os, name)

    def _add(self, kind: str, what: str) -> None:
        with self.lock:
            self.events.append((kind, what))

    def open(self, path, flags, *args, **kwargs):
        fd = os.open(path, flags, *args, **kwargs)
        self.paths[fd] = os.path.basename(path) if os.path.abspath(path) != self.directory else "<dir>"
        return fd

    def fsync(self, fd):
        what = self.paths.get(fd, "?")
        self._add("fsync-start", what)
        if what == "<dir>":
            time.sleep(0.03)  # a slow directory fsync: whatever must wait for it, waits
        os.fsync(fd)
        self._add("fsync-end", what)

    def replace(self, src, dst):
        os.replace(src, dst)
        self._add("replace", os.path.basename(dst))
        self._add("replaced-temp", os.path.basename(src))

    def remove(self, path):
        os.remove(path)
        self._add("remove", os.path.basename(path))


def _index_of(events, kind, what) -> int:
    return events.index((kind, what))


def _dir_sync_between(events, after: int, before: int) -> bool:
    """A directory fsync that started after event ``after`` and ended before event ``before``."""
    starts = [i for i, e in enumerate(events) if e == ("fsync-start", "<dir>") and i > after]
    ends = [i for i, e in enumerate(events) if e == ("fsync-end", "<dir>") and i < before]
    return any(any(s < e for e in ends) for s in starts)


def _check_order(events: list[tuple[str, str]], name: str, state_written: bool) -> None:
    renamed = {e[1]: i for i, e in enumerate(events) if e[0] == "replace"}
    temps = {events[i + 1][1]: e[1] for i, e in enumerate(events) if e[0] == "replace"}
    for temp, final in temps.items():  # every rename after its own temp file's fsync ended
        assert _index_of(events, "fsync-end", temp) < renamed[final], (final, events)
    index = renamed[name + ".index"]
    payload = [f for f in renamed if f.startswith(name + ".data-") or f == name + ".meta"]
    assert len(payload) == 2, renamed
    assert _dir_sync_between(events, max(renamed[f] for f in payload), index), events
    if state_written:
        state = renamed["checkpoint"]
        assert _dir_sync_between(events, index, state), events
        removes = [i for i, e in enumerate(events) if e[0] == "remove"]
        assert removes and all(_dir_sync_between(events, state, i) for i in removes), events


def test_manager_save_renames_in_protocol_order_with_concurrent_fsyncs(tmp_path, monkeypatch):
    d = str(tmp_path.resolve())
    state = {"w": np.arange(300_000, dtype=np.float32), "b": np.ones(10)}
    with CheckpointManager(d, max_to_keep=1) as mgr:
        mgr.save(state, step=1)
        for step in (2, 3):
            proxy = RecordingOS(d)
            monkeypatch.setattr(_local, "os", proxy)
            mgr.save(state, step=step)
            monkeypatch.setattr(_local, "os", os)
            _check_order(proxy.events, f"ckpt-{step}", state_written=True)
        assert mgr.latest_checkpoint.endswith("ckpt-3")
    assert np.array_equal(load_checkpoint(d)["w"], state["w"])


def test_one_shot_save_is_durable_when_it_returns(tmp_path, monkeypatch):
    d = str(tmp_path.resolve())
    proxy = RecordingOS(d)
    monkeypatch.setattr(_local, "os", proxy)
    save_checkpoint(os.path.join(d, "ckpt-7"), {"w": np.ones(5)})
    monkeypatch.setattr(_local, "os", os)
    _check_order(proxy.events, "ckpt-7", state_written=False)
    index = _index_of(proxy.events, "replace", "ckpt-7.index")
    # the index's own rename is durable before save_checkpoint returns: a directory fsync after it
    assert _dir_sync_between(proxy.events, index, len(proxy.events))
