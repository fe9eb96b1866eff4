"""Re-saving an existing step: the old copy stays listed and whole until the new one commits.

The new copy's data files get other names (another shard count) and a failure writes the old .meta and
.index back, so a failure or a SIGKILL at any step of the commit protocol leaves a loadable ckpt-1:
the old copy until the new .index is in place, the new one from then on. The one exception is a kill between
the two small writes of the new .meta and .index: the old index then no longer matches its .meta, and
the step is reported corrupt (restore() falls back to an older checkpoint when there is one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from ckpt_callbacks import CheckpointManager, CorruptCheckpointError, load_checkpoint
from ckpt_callbacks._checkpoint import _checkpoint_io as checkpoint_io
from ckpt_callbacks._manager import _state as state_module
from ckpt_callbacks._manager._lock import LOCK_FILE_NAME

OLD = {"w": np.arange(6, dtype=np.float32), "version": "old"}
NEW = {"w": np.arange(6, dtype=np.float32) * -1, "b": np.ones(3), "version": "new"}
BEFORE_COMMIT = ["before_data", "after_data", "after_meta", "after_index", "before_state"]
# Once the new .index is in place the new copy exists (the .index is written last), state file or not.
NEW_EXISTS = ["after_index", "before_state", "after_state"]


def _files(directory: str) -> dict[str, bytes]:
    out = {}
    for n in sorted(os.listdir(directory)):
        if n != LOCK_FILE_NAME:
            with open(os.path.join(directory, n), "rb") as f:
                out[n] = f.read()
    return out


@pytest.mark.parametrize("point", BEFORE_COMMIT)
def test_failure_at_any_step_keeps_the_old_copy(tmp_path, monkeypatch, point):
    directory = str(tmp_path / "run")
    with CheckpointManager(directory, max_to_keep=1) as mgr:
        mgr.save(OLD, step=1)
        before = _files(directory)

        def fail(name: str) -> None:
            if name == point:
                raise OSError(f"injected failure at {name}")

        monkeypatch.setattr(checkpoint_io, "_crash_point", fail)
        with pytest.raises(OSError, match="injected"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mgr.save(NEW, step=1)
        assert [os.path.basename(p) for p in mgr.checkpoints] == ["ckpt-1"]
        assert mgr.restore()["version"] == "old"
    assert _files(directory) == before
    assert load_checkpoint(os.path.join(directory, "ckpt-1"))["version"] == "old"


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, warnings
    import numpy as np
    from ckpt_callbacks import CheckpointManager
    from ckpt_callbacks._checkpoint import _checkpoint_io

    directory, point = sys.argv[1], sys.argv[2]
    new = {"w": np.arange(6, dtype=np.float32) * -1, "b": np.ones(3), "version": "new"}

    def die(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    warnings.simplefilter("ignore")
    mgr = CheckpointManager(directory, max_to_keep=1)
    _checkpoint_io._crash_point = die
    mgr.save(new, step=1)
    """
)


@pytest.mark.parametrize("point", ["before_data", "after_data", *NEW_EXISTS])
def test_sigkill_at_any_step_leaves_a_loadable_copy(tmp_path, point):
    directory = str(tmp_path / "run")
    with CheckpointManager(directory, max_to_keep=1) as mgr:
        mgr.save(OLD, step=1)
    before = _files(directory)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, directory, point], env=env, timeout=120)
    assert proc.returncode == -9
    expected = "new" if point in NEW_EXISTS else "old"
    with CheckpointManager(directory, max_to_keep=1) as mgr:  # the start removes the interrupted save's files
        assert [os.path.basename(p) for p in mgr.checkpoints] == ["ckpt-1"]
        assert mgr.restore()["version"] == expected
    after = _files(directory)
    if expected == "old":
        assert after == before
    else:  # exactly the new copy's files: the old data files are gone
        index = load_checkpoint(os.path.join(directory, "ckpt-1"))
        assert index["version"] == "new"
        assert {n for n in after if n.startswith("ckpt-1.data-")} == {
            "ckpt-1.data-00000-of-00002",
            "ckpt-1.data-00001-of-00002",
        }


def test_sigkill_between_new_meta_and_index_is_reported_corrupt(tmp_path):
    """The documented window: old index, new .meta. Reported as corrupt, never loaded as garbage."""
    directory = str(tmp_path / "run")
    with CheckpointManager(directory, max_to_keep=1) as mgr:
        mgr.save(OLD, step=1)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, directory, "after_meta"], timeout=120)
    assert proc.returncode == -9
    with pytest.raises(CorruptCheckpointError, match="meta"):
        load_checkpoint(os.path.join(directory, "ckpt-1"))


# ---------------------------------------------------------------- a state-file write that reports failure


def test_state_file_write_reported_failed_but_committed_is_a_success(tmp_path, monkeypatch, caplog):
    """The store committed the state file, then the call failed (a lost reply, an interrupt after the
    rename): the checkpoint it names must not be removed. The save is a success."""
    directory = str(tmp_path / "run")
    with CheckpointManager(directory, max_to_keep=1) as mgr:
        mgr.save(OLD, step=1)

        def fail_after_commit(name: str) -> None:
            if name == "after_state":
                raise OSError("injected failure after the state file was written")

        monkeypatch.setattr(checkpoint_io, "_crash_point", fail_after_commit)
        path = mgr.save(NEW, step=2)
        assert "the save succeeded" in caplog.text
        assert [os.path.basename(p) for p in mgr.checkpoints] == ["ckpt-2"] and path == mgr.latest_checkpoint
    assert load_checkpoint(directory)["version"] == "new"
    assert not [n for n in os.listdir(directory) if n.startswith("ckpt-1.")]  # rotated as usual


def test_state_file_unreadable_after_a_failed_write_removes_nothing(tmp_path, monkeypatch):
    """Whether the state file was committed is unknown: the new files stay (the next start removes
    them only if no state file names them) and the error is raised."""
    directory = str(tmp_path / "run")
    with CheckpointManager(directory, max_to_keep=1) as mgr:
        mgr.save(OLD, step=1)

        def fail(name: str) -> None:
            if name == "after_state":
                raise OSError("injected failure after the state file was written")

        monkeypatch.setattr(checkpoint_io, "_crash_point", fail)

        def unreadable(storage):
            raise OSError("injected: the state file cannot be read back")

        with monkeypatch.context() as m, pytest.raises(OSError, match="injected"):
            m.setattr(state_module, "read_state_bytes", unreadable)
            mgr.save(NEW, step=2)
        assert os.path.exists(os.path.join(directory, "ckpt-2.index"))
    # The state file did commit: a new manager sees ckpt-2 as the latest and keeps its files.
    with CheckpointManager(directory, max_to_keep=1) as mgr:
        assert mgr.restore()["version"] == "new"
