"""async_save: crash consistency, commit order, failures, snapshot buffers.

Nothing here is timed: blocking and ordering are observed through instrumented storage writers
(events, not sleeps), crashes through SIGKILL of a real child process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading

import ml_dtypes
import numpy as np
import pytest
import torch

from ckpt_callbacks import (
    CheckpointManager,
    CheckpointWriteError,
    latest_checkpoint,
    load_checkpoint,
)
from ckpt_callbacks._storage import Storage

TIMEOUT = 60  # seconds for any event wait: a hang fails the test instead of the suite


def _state(value: float, n: int = 4) -> dict:
    return {"w": np.full((64, 64), value, np.float32), "b": [np.full(n, value)], "step": int(value)}


# --------------------------------------------------------------------------- instrumented storage


class _Gate:
    """Blocks the background worker when it reaches a chosen storage operation.

    ``where`` is ("write", substring): during the first write() into a file whose name contains
    the substring (after its first bytes), ("commit", substring): just before that file is made
    visible, or ("remove", substring): before a delete. The worker waits on ``release``; the test
    waits on ``reached``.
    """

    def __init__(self, op: str, name_part: str) -> None:
        self.op, self.part = op, name_part
        self.reached = threading.Event()
        self.release = threading.Event()
        self.armed = False
        self.log: list[tuple[str, str]] = []  # (op, file name), in the order they happened

    def hit(self, op: str, name: str) -> None:
        self.log.append((op, name))
        if self.armed and op == self.op and self.part in name and not self.reached.is_set():
            self.reached.set()
            assert self.release.wait(TIMEOUT), "test never released the worker"


@pytest.fixture
def gate(monkeypatch):
    holder: dict[str, _Gate] = {}
    real_writer = Storage.writer
    real_remove = Storage.remove

    def writer(self, name):
        w = real_writer(self, name)
        g = holder.get("gate")
        if g is None:
            return w
        real_write, real_commit = w.write, w.commit

        def write(data):
            real_write(data)
            g.hit("write", name)

        def commit():
            g.hit("commit", name)
            real_commit()
            g.log.append(("visible", name))

        w.write, w.commit = write, commit
        return w

    def remove(self, names):
        names = list(names)
        g = holder.get("gate")
        if g is not None:
            for n in names:
                g.hit("remove", n)
        real_remove(self, names)

    monkeypatch.setattr(Storage, "writer", writer)
    monkeypatch.setattr(Storage, "remove", remove)

    def make(op: str, part: str) -> _Gate:
        holder["gate"] = _Gate(op, part)
        return holder["gate"]

    return make


# --------------------------------------------------------------------------- ordering


def test_commit_order_state_file_then_deletions_only_after_durable_checkpoint(tmp_path, gate):
    g = gate("commit", "checkpoint")
    d = tmp_path / "run"
    mgr = CheckpointManager(d, max_to_keep=1, async_save=True)
    mgr.save(_state(1), step=1)
    mgr.wait_until_finished()
    g.armed = True
    g.log.clear()
    mgr.save(_state(2), step=2)  # returns after the snapshot
    assert g.reached.wait(TIMEOUT)
    # The worker is about to replace the state file: the new checkpoint is complete and durable,
    # but not yet visible, and nothing old was deleted.
    files = set(os.listdir(d))
    assert {"ckpt-2.index", "ckpt-2.meta", "ckpt-2.data-00000-of-00001"} <= files
    assert {"ckpt-1.index", "ckpt-1.meta", "ckpt-1.data-00000-of-00001"} <= files
    assert latest_checkpoint(d) == str(d / "ckpt-1")
    # Readers on other threads are not blocked by the in-flight commit and see the old view.
    assert mgr.latest_checkpoint == str(d / "ckpt-1")
    assert mgr.checkpoints == [str(d / "ckpt-1")]
    assert not [e for e in g.log if e[0] == "remove"]
    g.release.set()
    mgr.wait_until_finished()
    assert latest_checkpoint(d) == mgr.latest_checkpoint == str(d / "ckpt-2")
    assert not any(f.startswith("ckpt-1.") for f in os.listdir(d))
    visible = [n for op, n in g.log if op == "visible"]
    assert visible == ["ckpt-2.data-00000-of-00001", "ckpt-2.meta", "ckpt-2.index", "checkpoint"]
    first_remove = next(i for i, e in enumerate(g.log) if e[0] == "remove")
    assert g.log.index(("visible", "checkpoint")) < first_remove
    removed = [n for op, n in g.log if op == "remove"]
    assert removed[0] == "ckpt-1.index"  # index first: the old checkpoint stops existing at once
    assert set(removed) == {"ckpt-1.index", "ckpt-1.meta", "ckpt-1.data-00000-of-00001"}
    mgr.close()


def test_save_returns_while_background_write_is_blocked(tmp_path, gate):
    g = gate("write", ".data-")
    g.armed = True
    mgr = CheckpointManager(tmp_path, async_save=True)
    path = mgr.save(_state(3), step=3)  # would hang here if the write ran on this thread
    assert g.reached.wait(TIMEOUT)
    assert path == str(tmp_path / "ckpt-3")
    assert mgr.latest_checkpoint is None and latest_checkpoint(tmp_path) is None
    g.release.set()
    mgr.close()
    assert latest_checkpoint(tmp_path) == path
    np.testing.assert_array_equal(load_checkpoint(path)["w"], _state(3)["w"])


def test_second_save_waits_for_the_first_and_is_counted(tmp_path, gate, caplog):
    g = gate("write", "ckpt-1.data-")
    g.armed = True
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(_state(1), step=1)
    assert g.reached.wait(TIMEOUT)
    done = threading.Event()

    def second():
        mgr.save(_state(2), step=2)
        done.set()

    with caplog.at_level(logging.INFO, logger="ckpt_callbacks"):
        t = threading.Thread(target=second)
        t.start()
        assert not done.wait(0.2)  # not a timing assertion: it cannot finish while the gate is shut
        g.release.set()
        t.join(TIMEOUT)
        mgr.wait_until_finished()
    assert done.is_set()
    assert mgr._waited_saves == 1
    assert any("waited" in r.getMessage() and "1 such wait" in r.getMessage() for r in caplog.records)
    assert [os.path.basename(p) for p in mgr.checkpoints] == ["ckpt-1", "ckpt-2"]  # not coalesced
    mgr.close()


# --------------------------------------------------------------------------- failures


@pytest.fixture
def failing_write(monkeypatch):
    """Make the next data-file write fail with ENOSPC, once."""
    real_writer = Storage.writer
    state = {"armed": False}

    def writer(self, name):
        w = real_writer(self, name)
        if state["armed"] and ".data-" in name:
            state["armed"] = False

            def boom(data):
                raise OSError(28, "No space left on device")

            w._write = boom
        return w

    monkeypatch.setattr(Storage, "writer", writer)
    return state


@pytest.mark.parametrize("surface", ["save", "wait_until_finished", "close"])
def test_background_failure_is_raised_on_next_call(tmp_path, failing_write, surface):
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(_state(1), step=1)
    mgr.wait_until_finished()
    failing_write["armed"] = True
    mgr.save(_state(2), step=2)  # the failure happens in the background
    with pytest.raises(CheckpointWriteError, match="No space left"):
        getattr(mgr, surface)(*((_state(3), 3) if surface == "save" else ()))
    # Raised once, then cleared; the previous checkpoint is intact and still the latest.
    assert mgr.latest_checkpoint == str(tmp_path / "ckpt-1")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-1")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(("ckpt-2", ".ckpt-2"))]
    if surface != "close":
        mgr.save(_state(4), step=4)
        mgr.wait_until_finished()
        assert mgr.latest_checkpoint == str(tmp_path / "ckpt-4")
    mgr.close()
    mgr.close()  # idempotent


def test_failure_in_background_is_logged_at_once(tmp_path, failing_write, caplog):
    mgr = CheckpointManager(tmp_path, async_save=True)
    failing_write["armed"] = True
    with caplog.at_level(logging.ERROR, logger="ckpt_callbacks"):
        mgr.save(_state(1), step=1)
        mgr._pending.result(TIMEOUT)
    assert any("Background save" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointWriteError):
        mgr.close()


def test_save_after_close_is_refused(tmp_path):
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.close()
    with pytest.raises(Exception, match="closed"):
        mgr.save(_state(1), step=1)


# --------------------------------------------------------------------------- snapshot buffers


def test_buffers_are_reused_between_saves(tmp_path):
    mgr = CheckpointManager(tmp_path, async_save=True, max_to_keep=2)
    mgr.save(_state(1), step=1)
    first = dict(mgr._buffers)
    assert first and all(isinstance(b, np.ndarray) for b in first.values())
    for step in (2, 3):
        mgr.save(_state(step), step=step)
        assert mgr._buffers.keys() == first.keys()
        assert all(mgr._buffers[k] is first[k] for k in first)  # the same ndarray objects
    mgr.close()
    assert load_checkpoint(tmp_path / "ckpt-3")["w"][0, 0] == 3


def test_buffer_replaced_when_shape_changes_and_dropped_when_tensor_goes(tmp_path):
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save({"a": np.zeros(4), "b": np.zeros(2)}, step=1)
    a = mgr._buffers["a"]
    mgr.save({"a": np.zeros(8)}, step=2)
    assert mgr._buffers["a"] is not a and mgr._buffers["a"].shape == (8,)
    assert "b" not in mgr._buffers
    mgr.close()
    assert load_checkpoint(tmp_path / "ckpt-2")["a"].shape == (8,)


def test_snapshot_copies_numpy_state_in_pieces_on_several_threads_bit_exactly(tmp_path, monkeypatch):
    """Large contiguous arrays are split into pieces, small ones batched, views copied whole; every
    byte lands where it belongs, whatever ran on which copy thread."""
    from ckpt_callbacks._manager import _async

    monkeypatch.setattr(_async, "_COPY_PIECE", 1 << 16)  # 64 KiB pieces: many tasks on small arrays
    monkeypatch.setattr(_async, "_COPY_THREADS", 3)
    threads = set()
    copy_task = _async._copy_task
    monkeypatch.setattr(
        _async, "_copy_task", lambda task: (threads.add(threading.get_ident()), copy_task(task))
    )
    rng = np.random.default_rng(0)
    big = rng.integers(0, 2**31, size=(300, 1000), dtype=np.int64)  # 2.3 MiB: 37 pieces
    state = {
        "big": big,
        "odd": rng.random(333_333).astype(np.float32),  # no multiple of a piece: a short last one
        "bf16": rng.random(70_000).astype(ml_dtypes.bfloat16),
        "view": big[::3, ::7],  # not contiguous: copied whole
        "small": [np.full(i + 1, i, dtype=np.int16) for i in range(300)],  # batched
    }
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(state, step=1)
    mgr.close()
    assert len(threads) >= 2
    got = load_checkpoint(tmp_path / "ckpt-1")
    for k in ("big", "odd", "bf16", "view"):
        assert got[k].dtype == state[k].dtype
        np.testing.assert_array_equal(got[k], state[k])
    for a, b in zip(got["small"], state["small"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_snapshot_isolates_saved_values_from_later_mutation(tmp_path, gate):
    g = gate("write", ".data-")
    g.armed = True
    w = np.arange(1000, dtype=np.float64)
    t = torch.arange(1000, dtype=torch.float32)
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save({"w": w, "t": t}, step=1)
    assert g.reached.wait(TIMEOUT)  # the worker is mid-write
    w += 1000  # the training loop keeps updating its state in place
    t.mul_(-1)
    g.release.set()
    mgr.close()
    got = load_checkpoint(tmp_path / "ckpt-1")
    np.testing.assert_array_equal(got["w"], np.arange(1000, dtype=np.float64))
    torch.testing.assert_close(got["t"], torch.arange(1000, dtype=torch.float32))


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),  # non-contiguous
        torch.arange(16, dtype=torch.float32).to(torch.bfloat16),
        torch.arange(16, dtype=torch.float32).to(torch.float8_e4m3fn),
        torch.tensor(3.5, dtype=torch.float64),  # 0-d
        torch.arange(8, dtype=torch.int64)[::2],
        torch.tensor([True, False]),
    ],
    ids=["transposed", "bfloat16", "float8", "scalar", "strided", "bool"],
)
def test_async_torch_snapshot_is_bit_identical(tmp_path, tensor):
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save({"x": tensor}, step=1)
    got = load_checkpoint(tmp_path / "ckpt-1")["x"]
    assert got.dtype == tensor.dtype and got.shape == tensor.shape

    def raw(x):
        return x.reshape(-1).contiguous().view(torch.uint8)

    assert torch.equal(raw(got), raw(tensor))


def test_async_and_sync_write_identical_files(tmp_path):
    state = {"a": np.arange(10, dtype=np.int32), "b": np.ones((3, 3), ml_dtypes.bfloat16), "c": [1.5, "x"]}
    for mode in (False, True):
        with CheckpointManager(tmp_path / str(mode), async_save=mode, clock=lambda: 100.0) as mgr:
            mgr.save(state, step=5)
    for suffix in (".data-00000-of-00001", ".index"):
        a = (tmp_path / "False" / f"ckpt-5{suffix}").read_bytes()
        b = (tmp_path / "True" / f"ckpt-5{suffix}").read_bytes()
        assert a == b


# --------------------------------------------------------------------------- crashes (SIGKILL)

_CHILD = textwrap.dedent(
    """
    import os, sys, threading
    import numpy as np
    from ckpt_callbacks import CheckpointManager
    from ckpt_callbacks._storage import Storage

    directory, op, part = sys.argv[1:4]
    mgr = CheckpointManager(directory, max_to_keep=1, async_save=True)
    mgr.save({"w": np.full(1 << 20, 1.0, np.float32), "step": 1}, step=1)
    mgr.wait_until_finished()

    real_writer, real_remove = Storage.writer, Storage.remove

    def park():
        # One write call per line: two threads' print() calls interleave text and newline.
        sys.stdout.write("REACHED\\n")
        sys.stdout.flush()
        threading.Event().wait()  # until SIGKILL

    def writer(self, name):
        w = real_writer(self, name)
        real_write, real_commit = w.write, w.commit
        def write(data):
            real_write(data)
            if op == "write" and part in name:
                park()
        def commit():
            if op == "commit" and part in name:
                park()
            real_commit()
        w.write, w.commit = write, commit
        return w

    def remove(self, names):
        names = list(names)
        if op == "remove" and any(part in n for n in names):
            park()
        real_remove(self, names)

    Storage.writer, Storage.remove = writer, remove
    # 4 MiB + 64 small tensors: the data file takes several writes, so "write" stops mid-file.
    state = {"w": np.full(1 << 20, 2.0, np.float32), "step": 2}
    state.update({f"s{i}": np.full(1000, float(i)) for i in range(64)})
    mgr.save(state, step=2)
    sys.stdout.write("SAVE_RETURNED\\n")
    sys.stdout.flush()
    threading.Event().wait()
    """
)

# (operation, file-name part) where the child is killed, and the step that must be latest after.
_KILL_POINTS = [
    (("write", ".data-"), 1),  # mid data file
    (("commit", ".data-"), 1),  # data written, not yet renamed into place
    (("commit", ".meta"), 1),
    (("commit", ".index"), 1),  # checkpoint complete but its index not yet visible
    (("commit", "checkpoint"), 1),  # checkpoint complete and visible, state file not yet replaced
    (("remove", "ckpt-1."), 2),  # committed; the old checkpoint not yet deleted
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where,latest_step", _KILL_POINTS, ids=[f"{o}-{p}" for (o, p), _ in _KILL_POINTS])
def test_sigkill_during_background_save_leaves_a_loadable_latest(tmp_path, where, latest_step):
    d = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(d), *where],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # The worker (REACHED) and the training thread (SAVE_RETURNED) print in either order.
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if {"REACHED", "SAVE_RETURNED"} <= set(lines):
                break
        assert "REACHED" in lines, (lines, proc.stderr.read() if proc.poll() is not None else "")
        assert "SAVE_RETURNED" in lines  # the training thread was not blocked by the write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
        proc.stdout.close()
        proc.stderr.close()
    latest = latest_checkpoint(d)
    assert latest == str(d / f"ckpt-{latest_step}")
    state = load_checkpoint(latest)  # complete and every checksum matches
    assert state["step"] == latest_step and state["w"][0] == float(latest_step)
    # A new manager cleans up the interrupted save and resumes from the same checkpoint.
    with CheckpointManager(d, max_to_keep=1) as mgr:
        path, restored = mgr.restore_with_path()
        assert path == latest and restored["step"] == latest_step
    leftovers = [f for f in os.listdir(d) if ".tmp-" in f]
    assert leftovers == []
    if latest_step == 1:
        assert not [f for f in os.listdir(d) if f.startswith("ckpt-2")]


def test_interpreter_exit_finishes_a_pending_save(tmp_path):
    """A script whose last statement is an async save() (no wait, no close) still commits it."""
    code = textwrap.dedent(
        """
        import sys, numpy as np
        from ckpt_callbacks import CheckpointManager
        mgr = CheckpointManager(sys.argv[1], async_save=True)
        mgr.save({"w": np.full(1 << 22, 7.0, np.float32)}, step=7)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, timeout=TIMEOUT)
    assert latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-7")
    assert load_checkpoint(tmp_path / "ckpt-7")["w"][-1] == 7.0


def test_interpreter_exit_reports_a_background_failure(tmp_path):
    code = textwrap.dedent(
        """
        import sys, numpy as np
        from ckpt_callbacks import CheckpointManager
        from ckpt_callbacks._storage import Storage
        real = Storage.writer
        def writer(self, name):
            w = real(self, name)
            if ".data-" in name:
                def boom(data):
                    raise OSError(28, "No space left on device")
                w._write = boom
            return w
        Storage.writer = writer
        mgr = CheckpointManager(sys.argv[1], async_save=True)
        mgr.save({"w": np.zeros(16)}, step=1)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, timeout=TIMEOUT, capture_output=True, text=True
    )
    assert "No space left on device" in r.stderr
    assert latest_checkpoint(tmp_path) is None
