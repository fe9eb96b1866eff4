"""Every restore path reads and verifies the index once and each data byte once (counted on the
storage layer's reads of real files: the ``storage_reads`` fixture)."""

from __future__ import annotations

import numpy as np
import pytest

from ckpt_callbacks import CheckpointManager, load_checkpoint
from ckpt_callbacks.errors import IncompatibleCheckpointError

STATE = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(5, np.int64), "step": 3}


def _into():
    return {"w": np.zeros((8, 8), np.float32), "b": np.zeros(5, np.int64)}


RESTORES = {
    "restore": lambda mgr, d: mgr.restore(),
    "restore_path": lambda mgr, d: mgr.restore(mgr.latest_checkpoint),
    "restore_into": lambda mgr, d: mgr.restore(into=_into()),
    "restore_path_into": lambda mgr, d: mgr.restore(mgr.latest_checkpoint, into=_into()),
    "restore_with_path_into": lambda mgr, d: mgr.restore_with_path(into=_into())[1],
    "load_checkpoint": lambda mgr, d: load_checkpoint(mgr.latest_checkpoint),
    "load_checkpoint_directory": lambda mgr, d: load_checkpoint(d),
    "load_checkpoint_directory_into": lambda mgr, d: load_checkpoint(d, into=_into()),
    # a function of the index, as the framework adapters pass (here one that does not fit: plain load)
    "load_checkpoint_directory_into_unfit": lambda mgr, d: load_checkpoint(
        d, into=lambda index: {"w": np.zeros(3, np.float32)}
    ),
}


@pytest.mark.parametrize("how", sorted(RESTORES))
@pytest.mark.parametrize("async_save", [False, True])
def test_each_restore_path_reads_each_file_once(how, async_save, tmp_path, storage_reads):
    directory = str(tmp_path / "run")
    with CheckpointManager(directory, async_save=async_save) as mgr:
        mgr.save({**STATE, "step": 1}, step=1)
        mgr.save(STATE, step=3)
        mgr.wait_until_finished()
        storage_reads.reset()
        state = RESTORES[how](mgr, directory)
        storage_reads.assert_each_read_once()
    assert np.array_equal(state["w"], STATE["w"]) and state["step"] == 3
    # w and b are unchanged since step 1: ckpt-3 points into ckpt-1's data file (incremental), read once too
    assert set(storage_reads.counts) <= {
        "ckpt-3.index",
        "ckpt-3.data-00000-of-00001",
        "ckpt-1.data-00000-of-00001",
    }


def test_an_unfit_into_tree_is_still_refused(tmp_path):
    """A plain ``into`` tree that does not fit stays an error (only a function of the index falls back)."""
    directory = str(tmp_path / "run")
    with CheckpointManager(directory) as mgr:
        mgr.save(STATE, step=3)
        with pytest.raises(IncompatibleCheckpointError):
            mgr.restore(into={"w": np.zeros(3, np.float32)})


def test_the_fixture_catches_a_second_read(tmp_path, storage_reads):
    directory = str(tmp_path / "run")
    with CheckpointManager(directory) as mgr:
        mgr.save(STATE, step=3)
        storage_reads.reset()
        mgr.restore()
        mgr.restore()
    with pytest.raises(AssertionError, match="more than once"):
        storage_reads.assert_each_read_once()


@pytest.mark.parametrize(
    "how",
    [
        lambda mgr, d: mgr.restore("best"),
        lambda mgr, d: load_checkpoint(d, checkpoint="best"),
    ],
    ids=["restore_best", "load_checkpoint_directory_best"],
)
def test_best_checkpoint_is_read_once(how, tmp_path, storage_reads):
    directory = str(tmp_path / "run")
    with CheckpointManager(directory, keep_best=1, monitor="loss") as mgr:
        mgr.save({**STATE, "step": 1}, step=1, metrics={"loss": 0.5})
        mgr.save(STATE, step=3, metrics={"loss": 0.1})
        mgr.save({**STATE, "step": 4}, step=4, metrics={"loss": 0.9})
        storage_reads.reset()
        state = how(mgr, directory)
        storage_reads.assert_each_read_once()
    assert state["step"] == 3
    # ckpt-3 points into ckpt-1's data file for the tensors that did not change (incremental).
    assert set(storage_reads.counts) <= {
        "ckpt-3.index",
        "ckpt-3.data-00000-of-00001",
        "ckpt-1.data-00000-of-00001",
    }
