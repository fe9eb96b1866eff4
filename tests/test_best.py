"""The best checkpoint (SPEC §2.1): ``best_checkpoint``, and ``"best"`` wherever a checkpoint is chosen."""

from __future__ import annotations

import numpy as np
import pytest

from ckpt_callbacks import (
    CheckpointManager,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    list_variables,
    load_checkpoint,
)


def _save_all(directory, scores, **kwargs):
    """One save per score (None: a save without the monitored value); returns the manager's paths."""
    with CheckpointManager(directory, max_to_keep=2, keep_best=1, monitor="val_acc", **kwargs) as mgr:
        paths = []
        for step, score in enumerate(scores, start=1):
            metrics = {"loss": 1.0 / step} if score is None else {"val_acc": score}
            paths.append(mgr.save({"w": np.full(3, step, np.float32)}, step=step, metrics=metrics))
        return mgr.best_checkpoint, mgr.checkpoints, paths


def test_best_checkpoint_is_kept_and_named(tmp_path):
    # val_acc measured at steps 2, 4, 6, 8; saves in between carry none (a mid-epoch save).
    best, kept, paths = _save_all(tmp_path, [None, 0.5, None, 0.9, None, 0.6, None, 0.7, None])
    assert best == paths[3]  # ckpt-4, scored 0.9
    assert best in kept
    assert load_checkpoint(tmp_path, checkpoint="best")["w"][0] == 4
    assert load_checkpoint(tmp_path, checkpoint="latest")["w"][0] == 9
    assert list_variables(tmp_path, checkpoint="best") == [("w", "float32", (3,))]


def test_best_survives_a_restart_and_ties_keep_the_first(tmp_path):
    _save_all(tmp_path, [0.5, 0.9])
    with CheckpointManager(tmp_path, max_to_keep=1, keep_best=1, monitor="val_acc") as mgr:
        assert mgr.best_checkpoint.endswith("ckpt-2")
        mgr.save({"w": np.zeros(3, np.float32)}, step=3, metrics={"val_acc": 0.9})
        mgr.save({"w": np.zeros(3, np.float32)}, step=4, metrics={"val_acc": 0.1})
        assert mgr.best_checkpoint.endswith("ckpt-2")
        assert [p.rsplit("/", 1)[-1] for p in mgr.checkpoints] == ["ckpt-2", "ckpt-4"]
        assert mgr.restore("best")["w"][0] == 2
        assert mgr.restore("latest")["w"][0] == 0


def test_best_without_keep_best(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save({"w": np.zeros(2)}, step=1, metrics={"val_acc": 1.0})
        assert mgr.best_checkpoint is None
        with pytest.raises(CheckpointNotFoundError, match="keep_best"):
            mgr.restore("best")
    with pytest.raises(CheckpointNotFoundError, match="keep_best=1 and monitor="):
        load_checkpoint(tmp_path, checkpoint="best")


def test_best_that_is_corrupt_is_an_error_not_a_fallback(tmp_path):
    best, _, _ = _save_all(tmp_path, [0.9, 0.1, 0.2])
    data = next(tmp_path.glob(best.rsplit("/", 1)[-1] + ".data-*"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint(tmp_path, checkpoint="best")


@pytest.mark.parametrize("bad", ["newest", "", 3])
def test_checkpoint_choice_is_checked(tmp_path, bad):
    _save_all(tmp_path, [0.5])
    with pytest.raises(ValueError, match='"latest" or "best"'):
        load_checkpoint(tmp_path, checkpoint=bad)


def test_best_of_one_checkpoint_path_is_refused(tmp_path):
    _, _, paths = _save_all(tmp_path, [0.5])
    with pytest.raises(ValueError, match="Pass its directory"):
        load_checkpoint(paths[0], checkpoint="best")


def test_saves_between_evaluations_do_not_warn_once_the_metric_was_seen(tmp_path, caplog):
    with CheckpointManager(tmp_path, keep_best=1, monitor="val_acc") as mgr:
        mgr.save({"w": np.zeros(2)}, step=1, metrics={"val_acc": 0.5})
        mgr.save({"w": np.zeros(2)}, step=2, metrics={"loss": 0.3})  # a save between evaluations
    assert not [r for r in caplog.records if "ranks checkpoints by" in r.message]
