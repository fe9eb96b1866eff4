"""The `checkpoint` state file: TensorFlow's text format, read by TensorFlow itself."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ckpt_callbacks import CheckpointManager, get_checkpoint_state, latest_checkpoint
from ckpt_callbacks._manager._state import CheckpointState, parse_state
from ckpt_callbacks.errors import CorruptCheckpointError, IncompatibleCheckpointError


def test_tensorflow_parses_the_state_file(tmp_path, fake_clock):
    tf = pytest.importorskip("tensorflow", reason="tensorflow-cpu is a test dependency")
    clock = fake_clock
    with CheckpointManager(str(tmp_path), max_to_keep=2, keep_checkpoint_every_n_hours=1, clock=clock) as mgr:
        for step in range(100, 1100, 100):
            clock.t += 1800.5
            mgr.save({"w": np.full(3, step, np.float32)}, step=step)
        ours = get_checkpoint_state(str(tmp_path))
    theirs = tf.train.get_checkpoint_state(str(tmp_path))
    assert (
        theirs.model_checkpoint_path == ours.model_checkpoint_path == os.path.join(str(tmp_path), "ckpt-1000")
    )
    assert list(theirs.all_model_checkpoint_paths) == ours.all_model_checkpoint_paths == mgr.checkpoints
    assert list(theirs.all_model_checkpoint_timestamps) == ours.all_model_checkpoint_timestamps
    assert theirs.last_preserved_timestamp == ours.last_preserved_timestamp > 0
    assert (
        tf.train.latest_checkpoint(str(tmp_path)) == latest_checkpoint(str(tmp_path)) == mgr.latest_checkpoint
    )


def test_exact_text(tmp_path, fake_clock_cls):
    clock = fake_clock_cls(1000.0)
    with CheckpointManager(str(tmp_path), max_to_keep=2, clock=clock) as mgr:
        for step in (600, 800, 1000):
            clock.t += 100.5
            mgr.save({}, step=step)
    text = (tmp_path / "checkpoint").read_text().splitlines()
    assert text[:6] == [
        'model_checkpoint_path: "ckpt-1000"',
        'all_model_checkpoint_paths: "ckpt-800"',
        'all_model_checkpoint_paths: "ckpt-1000"',
        "all_model_checkpoint_timestamps: 1201.0",
        "all_model_checkpoint_timestamps: 1301.5",
        "last_preserved_timestamp: 999.0",
    ]
    assert text[6].startswith("# ckpt_callbacks: ")


def test_reads_a_state_file_tensorflow_wrote(tmp_path):
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-1"\n'
        'all_model_checkpoint_paths: "ckpt-2"\nall_model_checkpoint_timestamps: 10.5\n'
        "all_model_checkpoint_timestamps: 20.25\nlast_preserved_timestamp: 1.0\n"
    )
    state, records = parse_state((tmp_path / "checkpoint").read_bytes())
    assert state == CheckpointState("ckpt-2", ["ckpt-1", "ckpt-2"], [10.5, 20.25], 1.0)
    assert records is None


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../victim", "s3://bucket/ckpt-1", "file:///etc/passwd", "a/../../b", "..", "C:\\x"],
)
def test_paths_leaving_the_directory_are_refused(tmp_path, path):
    (tmp_path / "checkpoint").write_text(f'model_checkpoint_path: "{path}"\n')
    with pytest.raises(CorruptCheckpointError):
        get_checkpoint_state(str(tmp_path))
    with pytest.raises(CorruptCheckpointError):
        latest_checkpoint(str(tmp_path))


def test_a_tensorflow_directory_is_refused_and_none_of_its_files_touched(tmp_path):
    """SPEC §7: TensorFlow's CheckpointManager writes the same names; the manager refuses the directory at
    construction (its 'checkpoint' state file would be overwritten by the first save) and changes nothing."""
    import tensorflow as tf

    directory = str(tmp_path / "run")
    ckpt = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0]))
    tf_manager = tf.train.CheckpointManager(ckpt, directory, max_to_keep=3, checkpoint_name="ckpt")
    for step in (1, 2, 3):
        tf_manager.save(checkpoint_number=step)
    before = {n: (tmp_path / "run" / n).read_bytes() for n in os.listdir(directory)}
    assert any(n.startswith("ckpt-3.data-") for n in before)
    for prefix in ("ckpt", "other"):  # another prefix still collides on the 'checkpoint' state file
        with pytest.raises(IncompatibleCheckpointError, match="did not write.*another directory"):
            CheckpointManager(directory, prefix=prefix)
    assert {n: (tmp_path / "run" / n).read_bytes() for n in os.listdir(directory)} == before
    assert tf.train.latest_checkpoint(directory).endswith("ckpt-3")  # TensorFlow still reads its directory
