"""Crash-test harness: the crash-child zygote fixture and the after-crash invariants (not a conftest:
integration/ imports its own conftest by name)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import rel_workload as wl

from ckpt_callbacks import CheckpointManager, latest_checkpoint, load_checkpoint
from ckpt_callbacks._manager._lock import LOCK_FILE_NAME
from ckpt_callbacks._manager._state import STATE_FILE_NAME, parse_state

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_crash_child.py")


class Zygote:
    """A child process that has imported ckpt_callbacks and forks one worker per trial."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def _ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"crash child died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, **cmd) -> int:
        return self._ask({"cmd": "run", **cmd})["pid"]

    def kill(self) -> dict:
        return self._ask({"cmd": "kill"})

    def wait(self) -> dict:
        return self._ask({"cmd": "wait"})

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _step(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def verify_after_crash(directory: str, min_latest: int, max_latest: int) -> dict:
    """Check every after-crash invariant of the commit protocol on ``directory``; then start a manager on it.

    - the state file parses (also as TensorFlow would) and names a latest checkpoint in
      [min_latest, max_latest] (0: none); every checkpoint it lists loads, verifies, and is
      bit-identical to what was saved; the listed set is exactly TF retention's survivors, so no
      committed checkpoint was lost;
    - foreign files are untouched;
    - the next manager start removes exactly the files no state file names (the leftovers of the
      interrupted save) and leaves every listed checkpoint's bytes as they were.

    Returns {"latest": step, "leftovers": number of files the manager start removed}.
    """
    state_path = os.path.join(directory, STATE_FILE_NAME)
    if os.path.exists(state_path):
        with open(state_path, "rb") as f:
            state, records = parse_state(f.read())
        assert records is not None, "the retention comment line was lost"
        latest = _step(state.model_checkpoint_path)
        listed = [_step(n) for n in state.all_model_checkpoint_paths]
    else:
        latest, listed = 0, []
    assert min_latest <= latest <= max_latest, (min_latest, latest, max_latest)
    assert set(listed) == wl.reference_survivors(latest), (latest, sorted(listed))
    assert len(listed) == len(set(listed))
    if latest:
        assert latest in listed
        assert latest_checkpoint(directory) == os.path.join(
            os.path.abspath(directory), f"{wl.PREFIX}-{latest}"
        )
    for s in listed:
        loaded = load_checkpoint(os.path.join(directory, f"{wl.PREFIX}-{s}"))
        wl.assert_same_tree(loaded, wl.state_for(s))
    wl.assert_foreign_files_intact(directory)

    expected = set(wl.FOREIGN_FILES)
    for s in listed:
        expected |= set(wl.checkpoint_files(directory, f"{wl.PREFIX}-{s}"))
    for r in records or () if latest else ():  # data files of dropped checkpoints that kept ones point into
        expected |= set(r.refs)
    if latest:
        expected.add(STATE_FILE_NAME)
    before = set(os.listdir(directory)) - {LOCK_FILE_NAME}
    assert expected <= before
    hashes = {f: _sha(os.path.join(directory, f)) for f in expected}
    step_box = [latest + 1]
    mgr = CheckpointManager(
        directory,
        prefix=wl.PREFIX,
        max_to_keep=wl.MAX_TO_KEEP,
        keep_checkpoint_every_n_hours=wl.HOURS,
        clock=lambda: wl.clock_for(step_box[0]),
    )
    try:
        after = set(os.listdir(directory)) - {LOCK_FILE_NAME}
        assert after == expected, f"left: {sorted(after - expected)}, lost: {sorted(expected - after)}"
        assert sorted(mgr.removed_leftovers) == sorted(before - expected)
        assert {f: _sha(os.path.join(directory, f)) for f in expected} == hashes
        assert [_step(p) for p in mgr.checkpoints] == listed
    finally:
        mgr.close()
    assert LOCK_FILE_NAME not in os.listdir(directory)
    return {"latest": latest, "leftovers": len(before - expected)}
