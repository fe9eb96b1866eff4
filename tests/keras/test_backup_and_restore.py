"""ckpt_callbacks.keras.BackupAndRestore, the drop-in for keras.callbacks.BackupAndRestore, with real
model.fit (the default backend in-process; PyTorch and JAX in fresh processes). Keras' own tests for
its callback run against ours through scripts/keras_suite.sh."""

from __future__ import annotations

import os
import warnings

import fsspec
import keras
import numpy as np
import pytest
from keras_helpers import HERE, run_python
from keras_models import data, sequential

import ckpt_callbacks
from ckpt_callbacks.keras import BackupAndRestore, restore


class Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch=None, batch=None):
        super().__init__()
        self.at_epoch, self.at_batch, self.batches = epoch, batch, 0

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise RuntimeError("interrupted")

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        if self.batches == self.at_batch:
            raise RuntimeError("interrupted")


def fit(model, callbacks, epochs=4):
    x, y = data()  # 10 batches per epoch
    return model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, callbacks=callbacks, verbose=0)


def weights(model):
    return [np.array(v) for v in model.get_weights()]


def test_interrupted_fit_resumes_at_the_epoch_and_ends_as_an_uninterrupted_one(tmp_path):
    keras.utils.set_random_seed(1)
    reference = sequential()
    fit(reference, [])
    keras.utils.set_random_seed(1)
    model = sequential()
    backup = BackupAndRestore(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(model, [backup, Interrupt(epoch=2)])
    assert backup._current_epoch == 2 and os.path.isdir(tmp_path / "backup")
    history = fit(model, [backup])
    assert history.epoch == [2, 3]  # only the epochs not done before
    assert int(model.optimizer.iterations.numpy()) == 40
    for got, want in zip(weights(model), weights(reference)):
        np.testing.assert_array_equal(got, want)
    assert not os.path.exists(tmp_path / "backup")  # delete_checkpoint=True: removed after success


def test_int_save_freq_backs_up_every_n_batches_and_restarts_that_epoch_silently(tmp_path):
    model = sequential()
    backup = BackupAndRestore(tmp_path, save_freq=3, delete_checkpoint=False)
    with pytest.raises(RuntimeError):
        fit(model, [backup, Interrupt(batch=14)])  # batch 4 of epoch 1: the last backup is step 12
    assert (backup._current_epoch, backup._last_batch_seen) == (1, 3)
    assert ckpt_callbacks.latest_checkpoint(str(tmp_path)).endswith("ckpt-12")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Keras' semantics: no warning about the repeated batches
        history = fit(model, [backup], epochs=2)
    assert history.epoch == [1]
    # Restored at step 12, then epoch 1 again from its first batch: 10 more steps.
    assert int(model.optimizer.iterations.numpy()) == 22
    assert [
        os.path.basename(p)
        for p in ckpt_callbacks.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths
    ] == ["ckpt-21"]


@pytest.mark.parametrize(("double", "kept"), [(False, ["ckpt-30"]), (True, ["ckpt-20", "ckpt-30"])])
def test_double_checkpoint_keeps_the_previous_backup(tmp_path, double, kept):
    fit(
        sequential(),
        [BackupAndRestore(tmp_path, double_checkpoint=double, delete_checkpoint=False)],
        epochs=3,
    )
    state = ckpt_callbacks.get_checkpoint_state(str(tmp_path))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == kept


def test_a_corrupt_newest_backup_falls_back_to_the_previous_one(tmp_path):
    model = sequential()
    backup = BackupAndRestore(tmp_path, double_checkpoint=True)
    with pytest.raises(RuntimeError):
        fit(model, [backup, Interrupt(epoch=2)])
    with open(backup._weights_path, "wb") as f:  # the newest backup's data file (ckpt-20)
        f.write(b"0")
    with pytest.warns(UserWarning, match="ckpt-20.*falling back"):
        history = fit(model, [backup])
    assert history.epoch == [1, 2, 3]


def test_backups_on_an_fsspec_url_and_deleted_there_after_success(tmp_path):
    url = "memory://backup-test/run"
    model = sequential()
    backup = BackupAndRestore(url, save_freq=5, delete_checkpoint=False)
    fit(model, [backup], epochs=1)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/backup-test/run/ckpt-10.index")
    fresh = sequential()
    restore(fresh, url)
    for got, want in zip(weights(fresh), weights(model)):
        np.testing.assert_array_equal(got, want)
    fit(model, [BackupAndRestore(url)], epochs=2)  # resumes at epoch 1, then deletes
    assert not [p for p in fs.find("/backup-test/run") if "ckpt" in p or p.endswith("checkpoint")]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backup_dir": ""}, "Empty `backup_dir` argument passed"),
        ({"backup_dir": None}, "Empty `backup_dir` argument passed"),
        ({"backup_dir": "d", "save_freq": "batch"}, "Invalid value for argument `save_freq`"),
        ({"backup_dir": "d", "save_freq": 0.15}, "Invalid value for argument `save_freq`"),
        ({"backup_dir": "d", "save_freq": None}, "Invalid value for argument `save_freq`"),
    ],
)
def test_bad_arguments_raise_keras_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BackupAndRestore(**kwargs)


def test_a_directory_of_foreign_files_is_kept_when_backups_are_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    fit(sequential(), [BackupAndRestore(tmp_path)], epochs=1)
    assert os.listdir(tmp_path) == ["notes.txt"]


OTHER_BACKEND = r"""
import os, sys, numpy as np, keras
sys.path.insert(0, sys.argv[2])
from ckpt_callbacks.keras import BackupAndRestore
from keras_models import data, sequential

class Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("interrupted")

x, y = data()
keras.utils.set_random_seed(1)
ref = sequential()
ref.fit(x, y, batch_size=4, epochs=4, shuffle=False, verbose=0)
keras.utils.set_random_seed(1)
model = sequential()
backup = BackupAndRestore(sys.argv[1] + "/backup")
try:
    model.fit(x, y, batch_size=4, epochs=4, shuffle=False, verbose=0, callbacks=[backup, Interrupt()])
except RuntimeError:
    pass
h = model.fit(x, y, batch_size=4, epochs=4, shuffle=False, verbose=0, callbacks=[backup])
same = all(np.array_equal(a, b) for a, b in zip(model.get_weights(), ref.get_weights()))
print(h.epoch, same, os.path.exists(sys.argv[1] + "/backup"))
"""


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_interrupt_and_resume_on_other_backends(tmp_path, backend):
    out = run_python(OTHER_BACKEND, tmp_path, HERE, backend=backend).stdout.strip().splitlines()
    assert out[-1] == "[2, 3] True False"
