"""What a newcomer meets with Keras: warnings at their own line, a file passed as the directory named as
such, one path form from restore."""

from __future__ import annotations

import os
import warnings

import pytest
from keras_models import data, sequential

from ckpt_callbacks import CheckpointManager
from ckpt_callbacks.keras import CheckpointCallback, restore


def test_a_warning_raised_during_fit_names_the_users_line(tmp_path):
    x, y = data()
    model = sequential()
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        callbacks=[CheckpointCallback(tmp_path, save_on_epoch_end=True)],
    )
    again = sequential()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again.fit(
            x,
            y,
            batch_size=8,
            epochs=1,
            verbose=0,
            callbacks=[CheckpointCallback(tmp_path, save_on_epoch_end=True)],
        )
    ours = [w for w in caught if "this fit trains nothing" in str(w.message)]
    assert ours, [str(w.message) for w in caught]
    assert [w.filename for w in ours] == [os.path.abspath(__file__)], [(w.filename, w.lineno) for w in ours]


@pytest.mark.parametrize("make", [CheckpointCallback, CheckpointManager], ids=["callback", "manager"])
def test_a_file_passed_as_the_directory_is_named_as_a_file(tmp_path, make):
    weights = tmp_path / "model.weights.h5"
    sequential().save_weights(str(weights))
    with pytest.raises(ValueError, match="not a file") as info:
        make(str(weights))
    message = str(info.value)
    assert "existing file: an HDF5 file" in message and repr(str(weights)) in message
    assert "Errno" not in message and "permissions" not in message
    assert weights.stat().st_size > 0


def test_restore_returns_one_path_form_whatever_the_argument_form(tmp_path, monkeypatch):
    x, y = data()
    model = sequential()
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        callbacks=[CheckpointCallback(tmp_path / "runC", save_on_epoch_end=True)],
    )
    monkeypatch.chdir(tmp_path)
    with CheckpointManager("runC") as mgr:
        expected = mgr.latest_checkpoint
    name = os.path.basename(expected)
    forms = ["runC", f"runC/{name}", f"runC/{name}.index", str(tmp_path / "runC" / name), f"./runC/{name}"]
    assert [restore(model, form) for form in forms] == [expected] * len(forms)
    assert os.path.isabs(expected)
