"""Retention under restarts, crashes, clock jumps and foreign files, against a reference model.

The reference model is written here from TensorFlow ``CheckpointManager`` semantics,
independently of ``ckpt_callbacks._manager._retention``: an ordered queue of active checkpoints swept oldest
first; one leaving the window is preserved forever when its timestamp is >= ``hours`` after
``last_preserved`` (which moves to it), else deleted. A restart continues the same queue (our state
file carries it), with TF's restart rule for clocks: ``last_preserved`` and the timestamps are
clamped to the restart's clock. A crash is simulated in-process by snapshotting the directory at a
``_crash_point`` and restoring that snapshot after abandoning the manager, i.e. exactly the files a
SIGKILL at that point leaves (the SIGKILL version runs in test_crash.py).
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ckpt_callbacks import CheckpointManager
from ckpt_callbacks._checkpoint import _checkpoint_io
from ckpt_callbacks._manager._lock import LOCK_FILE_NAME
from ckpt_callbacks._manager._state import STATE_FILE_NAME, parse_state

H = 3600.0
COMMITTED_POINTS = ("after_state", "before_delete", "after_delete")
CRASH_POINTS = ("before_data", "after_data", "after_meta", "after_index", "before_state") + COMMITTED_POINTS
FOREIGN = {
    "ckpt-99999.meta": b"mine, not the library's\n",
    "ckpt-7.index.bak": b"backup\n",
    "notes.txt": b"hello\n",
    ".ckpt-2.index.tmp-zz": b"not our temp shape\n",
    "model-3.index": b"another prefix\n",
    "ckpt-5.data-00000-of-00001.orig": b"x\n",
}


class SimulatedCrash(BaseException):
    """Raised at a crash point; BaseException so no library handler treats it as a save failure."""


class Reference:
    """Retention as TensorFlow's CheckpointManager does it, by the book."""

    def __init__(self) -> None:
        self.active: collections.OrderedDict[int, float] = collections.OrderedDict()
        self.hourly: dict[int, float] = {}
        self.last_preserved: float | None = None
        self.committed_any = False
        self.max_to_keep: int | None = 5
        self.hours: float | None = None

    def start(self, now: float, max_to_keep, hours) -> None:
        self.max_to_keep, self.hours = max_to_keep, hours
        if not self.committed_any:
            self.last_preserved = now - 1.0  # like TF: a second in the past
            return
        # A restart reads what the last commit wrote: clamps made by a manager that never
        # committed are not carried over.
        self.active = collections.OrderedDict(self.saved[0])
        self.hourly = dict(self.saved[1])
        self.last_preserved = self.saved[2]
        if now < self.last_preserved:
            self.last_preserved = now
        for s in self.active:
            self.active[s] = min(self.active[s], now)

    def save(self, step: int, ts: float) -> None:
        self.committed_any = True
        self.active.pop(step, None)
        self.hourly.pop(step, None)
        self.active[step] = ts
        while self.max_to_keep is not None and len(self.active) > self.max_to_keep:
            old, t = self.active.popitem(last=False)
            if self.hours and t - self.hours * H >= self.last_preserved:
                self.last_preserved = t
                self.hourly[old] = t
        self.saved = (collections.OrderedDict(self.active), dict(self.hourly), self.last_preserved)

    @property
    def survivors(self) -> set[int]:
        return set(self.active) | set(self.hourly)


def _steps_on_storage(d: str) -> set[int]:
    return {
        int(f[len("ckpt-") : -len(".index")])
        for f in os.listdir(d)
        if f.startswith("ckpt-") and f.endswith(".index") and f[5:-6].isdigit()
    }


def _snapshot(d: str) -> dict[str, bytes]:
    out = {}
    for f in os.listdir(d):
        if f != LOCK_FILE_NAME:
            with open(os.path.join(d, f), "rb") as fh:
                out[f] = fh.read()
    return out


def _restore_snapshot(d: str, snap: dict[str, bytes]) -> None:
    for f in os.listdir(d):
        if f != LOCK_FILE_NAME and f not in snap:
            os.remove(os.path.join(d, f))
    for f, data in snap.items():
        with open(os.path.join(d, f), "wb") as fh:
            fh.write(data)


class RetentionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="retention-")
        self.now = 1_000_000.0
        self.model = Reference()
        self.mgr: CheckpointManager | None = None
        self.crash_at: str | None = None
        self.crashed = False
        self.next_step = 1
        self.foreign: dict[str, bytes] = {}
        self.saves = self.restarts = self.crashes = 0
        self._real_point = _checkpoint_io._crash_point
        _checkpoint_io._crash_point = self._point

    def _point(self, name: str) -> None:
        if name == self.crash_at:
            self.crash_at = None
            self.snapshot = _snapshot(self.dir)
            raise SimulatedCrash(name)

    def _start(self, max_to_keep, hours) -> None:
        self.mgr = CheckpointManager(
            self.dir, max_to_keep=max_to_keep, keep_checkpoint_every_n_hours=hours, clock=lambda: self.now
        )
        self.model.start(self.now, max_to_keep, hours)
        self.crashed = False

    @initialize(max_to_keep=st.sampled_from([1, 2, 3, 5, None]), hours=st.sampled_from([None, 0.5, 1.0, 2.0]))
    def first_start(self, max_to_keep, hours):
        self._start(max_to_keep, hours)

    @precondition(lambda self: not self.crashed)
    @rule(data=st.data(), n=st.integers(1, 4), dt=st.sampled_from([0.0, 60.0, 1200.0, 3600.0]))
    def save(self, data, n, dt):
        for _ in range(n):
            step = self.next_step
            if self.model.committed_any and data.draw(st.integers(0, 9)) == 0:
                step = max(self.model.active or self.model.survivors)  # re-save the newest step
            else:
                self.next_step += 1
            self.mgr.save({"w": np.full(3, step, np.float32), "step": step}, step=step)
            self.model.save(step, self.now)
            self.saves += 1
            self.now += dt

    @precondition(lambda self: not self.crashed)
    @rule(point=st.sampled_from(CRASH_POINTS))
    def crash_during_save(self, point):
        step = self.next_step
        self.next_step += 1
        self.crash_at = point
        try:
            self.mgr.save({"w": np.full(3, step, np.float32), "step": step}, step=step)
        except SimulatedCrash:
            pass
        if self.crash_at is not None:  # the save never reached that point (e.g. nothing to delete)
            self.crash_at = None
            self.model.save(step, self.now)
            return
        _restore_snapshot(self.dir, self.snapshot)  # what the disk holds after a SIGKILL there
        if point in COMMITTED_POINTS:
            self.model.save(step, self.now)
        self.mgr = None  # abandoned, like a killed process (its lock share goes with it)
        self.crashed = True
        self.crashes += 1

    @rule(dt=st.sampled_from([1.0, 59.0, 600.0, 1799.0, 1800.0, 3600.0, 3601.0, 7200.0, 86400.0]))
    def clock_forward(self, dt):
        self.now += dt

    @rule(dt=st.sampled_from([1.0, 600.0, 3600.0, 5 * 3600.0, 86400.0 * 3]))
    def clock_backward(self, dt):
        self.now -= dt

    @rule(
        max_to_keep=st.sampled_from([1, 2, 3, 5, None]),
        hours=st.sampled_from([None, 0.5, 1.0, 2.0]),
        close=st.booleans(),
    )
    def restart(self, max_to_keep, hours, close):
        if self.mgr is not None and close:
            self.mgr.close()
        self.mgr = None
        self._start(max_to_keep, hours)
        self.restarts += 1

    @rule(name=st.sampled_from(sorted(FOREIGN)))
    def drop_foreign_file(self, name):
        with open(os.path.join(self.dir, name), "wb") as f:
            f.write(FOREIGN[name])
        self.foreign[name] = FOREIGN[name]

    @invariant()
    def survivors_match_the_model(self):
        for name, data in self.foreign.items():
            with open(os.path.join(self.dir, name), "rb") as f:
                assert f.read() == data, f"foreign file {name} changed"
        if self.crashed:
            return  # leftovers of the interrupted save stay until the next start
        assert _steps_on_storage(self.dir) == self.model.survivors
        if self.model.committed_any:
            with open(os.path.join(self.dir, STATE_FILE_NAME), "rb") as f:
                state, records = parse_state(f.read())
            assert {
                int(n.rsplit("-", 1)[1]) for n in state.all_model_checkpoint_paths
            } == self.model.survivors
            assert records is not None
            # no leftovers either: every file of ours belongs to a survivor
            own = {f for f in os.listdir(self.dir) if f.startswith("ckpt-") and f not in self.foreign}
            assert {int(f.split(".")[0][5:]) for f in own} == self.model.survivors

    def teardown(self):
        _checkpoint_io._crash_point = self._real_point
        if self.mgr is not None:
            self.mgr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


RetentionMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestRetentionUnderRestarts = pytest.mark.timeout(600)(RetentionMachine.TestCase)


# ---------------------------------------------------------------- parity with real TensorFlow


def _tf_parity_run(tmp_path, seed: int, backwards: bool) -> tuple[list, list]:
    tf = pytest.importorskip("tensorflow", reason="tensorflow-cpu is needed for the parity test")
    from tensorflow.python.checkpoint import checkpoint_management

    rng = np.random.default_rng(seed)
    clock = [1_000_000.0]

    class FakeTime:
        @staticmethod
        def time():
            return clock[0]

    real_time = checkpoint_management.time
    checkpoint_management.time = FakeTime
    try:
        tf_dir, our_dir = str(tmp_path / f"tf{seed}"), str(tmp_path / f"ours{seed}")
        ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))
        k, h = 3, 1.0
        tf_mgr = tf.train.CheckpointManager(ckpt, tf_dir, max_to_keep=k, keep_checkpoint_every_n_hours=h)
        ours = CheckpointManager(
            our_dir, max_to_keep=k, keep_checkpoint_every_n_hours=h, clock=lambda: clock[0]
        )
        log, divergences = [], []
        for step in range(1, 41):
            r = rng.random()
            if r < 0.15:
                k = [1, 2, 3, 5, None][rng.integers(5)]
                h = [None, 0.5, 1.0, 2.0][rng.integers(4)]
                tf_mgr = tf.train.CheckpointManager(
                    ckpt, tf_dir, max_to_keep=k, keep_checkpoint_every_n_hours=h
                )
                ours.close()
                ours = CheckpointManager(
                    our_dir, max_to_keep=k, keep_checkpoint_every_n_hours=h, clock=lambda: clock[0]
                )
                log.append(("restart", k, h))
            dt = float(rng.choice([60.0, 600.0, 1800.0, 3600.0, 5400.0]))
            if backwards and rng.random() < 0.1:
                dt = -float(rng.choice([600.0, 3600.0, 7200.0]))
            clock[0] += dt
            tf_mgr.save(checkpoint_number=step)
            ours.save({"v": np.float32(1.0)}, step=step)
            log.append(("save", step, clock[0]))
            tf_steps = _steps_on_storage(tf_dir)
            our_steps = _steps_on_storage(our_dir)
            if tf_steps != our_steps:
                divergences.append((step, sorted(tf_steps), sorted(our_steps)))
        ours.close()
        return log, divergences
    finally:
        checkpoint_management.time = real_time


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", range(6))
def test_retention_parity_with_tensorflow(tmp_path, seed):
    """Same saves, same clock readings, restarts with a changed max_to_keep / hours: same survivors."""
    log, divergences = _tf_parity_run(tmp_path, seed, backwards=False)
    assert not divergences, (divergences[0], log)


def test_known_divergence_clock_behind_last_preserved_across_a_restart(tmp_path):
    """Documented divergence from TensorFlow (found by the parity test with backward clock jumps).

    Clock 1e6 at the first start (last_preserved = 1e6 - 1), then the clock steps back and ckpt-1 is
    saved at 999400. A restart (max_to_keep=1, hours=2) and a save of ckpt-2 at 1003000 follow.
    TensorFlow's state file does not say which checkpoints are active, so its restart treats ckpt-1
    (timestamp <= last_preserved) as preserved forever. Ours knows ckpt-1 is active and, like one
    uninterrupted manager (the same survivors as one uninterrupted manager), drops it.
    """
    clock = [1_000_000.0]
    d = str(tmp_path / "run")
    mgr = CheckpointManager(d, max_to_keep=3, keep_checkpoint_every_n_hours=1.0, clock=lambda: clock[0])
    clock[0] = 999_400.0
    mgr.save({"v": 1}, step=1)
    mgr.close()
    mgr = CheckpointManager(d, max_to_keep=1, keep_checkpoint_every_n_hours=2.0, clock=lambda: clock[0])
    clock[0] = 1_003_000.0
    mgr.save({"v": 2}, step=2)
    mgr.close()
    assert _steps_on_storage(d) == {2}  # TensorFlow: {1, 2}
