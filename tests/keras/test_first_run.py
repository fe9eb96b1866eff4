"""A first run that cannot go wrong: mode="auto", foreign and unwritable directories refused before
training, the train-end-only warning, the resume log line, the mismatch hint, install errors."""

from __future__ import annotations

import logging
import os

import keras
import numpy as np
import pytest
from keras_helpers import run_python
from keras_models import data, sequential

import ckpt_callbacks
from ckpt_callbacks import CheckpointManager, CheckpointWriteError, IncompatibleCheckpointError
from ckpt_callbacks.keras import CheckpointCallback


def kept_steps(directory) -> list[int]:
    state = ckpt_callbacks.get_checkpoint_state(str(directory))
    return sorted(int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths)


def classifier(metrics) -> keras.Model:
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(
        keras.optimizers.SGD(0.05), keras.losses.BinaryCrossentropy(from_logits=True), metrics=metrics
    )
    return model


def fit_keep_best(
    tmp_path, metrics, monitor: str, epochs: int = 6, expected_mode: str | None = None
) -> tuple[list[float], list[int]]:
    """Train with keep_best=1, max_to_keep=1 and one save per epoch; returns the monitored values and
    the steps kept. The best may be the newest epoch too, so the direction the callback resolved is
    checked as well."""
    keras.utils.set_random_seed(0)
    x, _ = data(n=64)
    y = (x[:, :1] + 0.3 * x[:, 1:2] > 0).astype("float32")
    xv, yv = x[:32] + 0.5, y[:32]
    model = classifier(metrics)
    cb = CheckpointCallback(tmp_path, save_on_epoch_end=True, keep_best=1, monitor=monitor, max_to_keep=1)
    h = model.fit(
        x, y, batch_size=16, epochs=epochs, validation_data=(xv, yv), shuffle=False, callbacks=[cb], verbose=0
    )
    if expected_mode is not None:
        assert cb._resolved_mode == expected_mode
    return [float(v) for v in h.history[monitor]], kept_steps(tmp_path)


def best_steps(values: list[float], best, steps_per_epoch: int = 4) -> set[int]:
    """Steps of the epochs with the best value (ties included); 64 samples / batch 16: 4 per epoch."""
    return {steps_per_epoch * (i + 1) for i, v in enumerate(values) if v == best(values)}


def test_keep_best_val_accuracy_keeps_the_highest_accuracy(tmp_path):
    """The issue's case: mode defaults to "auto", which maximises an accuracy."""
    values, kept = fit_keep_best(tmp_path, ["accuracy"], "val_accuracy", expected_mode="max")
    assert len(set(values)) > 1, values  # the ranking is not decided by ties
    assert best_steps(values, max) & set(kept), (values, kept)
    assert kept[-1] == 24  # the newest, kept by max_to_keep=1


def test_auto_follows_the_compiled_metric_objects_direction(tmp_path):
    # Named so that the name rule alone would pick "min"; Keras' AUC metric has direction "up".
    values, kept = fit_keep_best(
        tmp_path, [keras.metrics.AUC(name="separation")], "val_separation", expected_mode="max"
    )
    assert len(set(values)) > 1, values
    assert best_steps(values, max) & set(kept), (values, kept)


def test_auto_minimises_a_metric_whose_direction_is_down_whatever_its_name(tmp_path):
    # Named like a maximised metric; Keras' Hinge metric has direction "down".
    values, kept = fit_keep_best(
        tmp_path, [keras.metrics.Hinge(name="recall_like")], "val_recall_like", expected_mode="min"
    )
    assert len(set(values)) > 1, values
    assert best_steps(values, min) & set(kept), (values, kept)


def test_auto_minimises_the_loss(tmp_path):
    values, kept = fit_keep_best(tmp_path, [], "val_loss", expected_mode="min")
    assert best_steps(values, min) & set(kept), (values, kept)


def test_explicit_mode_wins_over_auto(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(
        tmp_path, save_on_epoch_end=True, keep_best=1, monitor="loss", mode="max", max_to_keep=1
    )
    h = model.fit(x, y, batch_size=8, epochs=4, shuffle=False, callbacks=[cb], verbose=0)
    losses = h.history["loss"]
    assert best_steps(losses, max, steps_per_epoch=5) & set(kept_steps(tmp_path)), losses


# ---------------------------------------------------------------- foreign and unwritable directories


def snapshot(directory) -> dict[str, tuple[bytes, int]]:
    return {
        n: (open(os.path.join(directory, n), "rb").read(), os.stat(os.path.join(directory, n)).st_mtime_ns)
        for n in sorted(os.listdir(directory))
    }


def tensorflow_directory(directory, name: str = "ckpt") -> None:
    tf = pytest.importorskip("tensorflow", reason="TensorFlow writes the foreign checkpoints")
    ckpt = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0]))
    manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=3, checkpoint_name=name)
    for step in (1, 2, 3):
        manager.save(checkpoint_number=step)


@pytest.mark.parametrize("tf_name", ["ckpt", "model"])
def test_a_tensorflow_checkpoint_directory_is_refused_and_left_untouched(tmp_path, tf_name):
    """Same prefix (ckpt-N.index collide) and another prefix (TF's 'checkpoint' file would be overwritten)."""
    directory = tmp_path / "tf"
    tensorflow_directory(directory, tf_name)
    before = snapshot(directory)
    assert "checkpoint" in before and f"{tf_name}-3.index" in before
    with pytest.raises(IncompatibleCheckpointError) as info:
        CheckpointManager(str(directory))
    message = str(info.value)
    assert "did not write" in message and "another directory" in message and "prefix" in message
    assert f"checkpoint (names '{tf_name}-3')" in message
    if tf_name == "ckpt":
        assert "ckpt-1.index" in message

    model = sequential()
    cb = CheckpointCallback(directory, save_every_n_steps=1)
    x, y = data()
    with pytest.raises(IncompatibleCheckpointError):
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 0  # refused before the first batch
    assert snapshot(directory) == before  # not one byte or timestamp changed, nothing added


def test_an_unwritable_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    model = sequential()
    cb = CheckpointCallback(blocker / "run", save_every_n_steps=1, resume=False)
    x, y = data()
    with pytest.raises(CheckpointWriteError, match="Cannot write checkpoints to .*before training") as info:
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0)
    assert isinstance(info.value, OSError) and "another directory" in str(info.value)
    assert int(model.optimizer.iterations.numpy()) == 0


# ---------------------------------------------------------------- defaults and messages


def test_only_a_train_end_save_warns(tmp_path):
    with pytest.warns(UserWarning, match="saves only when fit returns.*save_every_n_steps"):
        CheckpointCallback(tmp_path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CheckpointCallback(tmp_path, save_on_epoch_end=True)
        CheckpointCallback(tmp_path, save_every_n_seconds=60)


def test_every_resume_logs_checkpoint_epoch_and_step(tmp_path, caplog):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path, save_on_epoch_end=True)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[cb], verbose=0)
    with caplog.at_level(logging.INFO, logger="ckpt_callbacks"):
        sequential().fit(x, y, batch_size=8, epochs=3, callbacks=[cb], verbose=0)
    lines = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "ckpt-10" in lines[0] and "epoch 2" in lines[0] and "global step 10" in lines[0]


def test_a_shape_mismatch_on_resume_names_the_ways_out(tmp_path):
    x, y = data()
    sequential(hidden=8).fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        callbacks=[CheckpointCallback(tmp_path, save_on_epoch_end=True)],
        verbose=0,
    )
    other = sequential(hidden=16)
    with pytest.raises(
        IncompatibleCheckpointError, match=r"wrong shape.*pass resume=False or use a new directory"
    ):
        other.fit(
            x,
            y,
            batch_size=8,
            epochs=2,
            callbacks=[CheckpointCallback(tmp_path, save_on_epoch_end=True)],
            verbose=0,
        )
    # The failed fit released the directory: a fresh start with resume=False works.
    cb = CheckpointCallback(tmp_path, save_on_epoch_end=True, resume=False)
    other.fit(x, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0)
    assert cb.restored_from is None and cb.last_checkpoint.endswith("ckpt-5")


@pytest.mark.parametrize(("name", "value"), [("allow_pickle", "yes"), ("clock", 5.0), ("mode", "maximum")])
def test_constructor_checks_clock_allow_pickle_and_mode(tmp_path, name, value):
    with pytest.raises((TypeError, ValueError), match=name):
        CheckpointCallback(tmp_path, save_on_epoch_end=True, **{name: value})


def test_allow_pickle_and_clock_reach_the_manager(tmp_path, fake_clock):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path, save_on_epoch_end=True, clock=fake_clock, allow_pickle=True)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0)
    state = ckpt_callbacks.get_checkpoint_state(str(tmp_path))
    assert state.all_model_checkpoint_timestamps == [fake_clock.now]
    with CheckpointManager(str(tmp_path), allow_pickle=True) as mgr:  # what the callback's manager can store
        mgr.save({"obj": {1, 2}}, step=99)
        assert mgr.restore()["obj"] == {1, 2}


# ---------------------------------------------------------------- install errors

BLOCK = "import sys\nfor m in {blocked!r}: sys.modules[m] = None\nimport ckpt_callbacks.keras\n"


@pytest.mark.parametrize(
    ("backend_env", "blocked", "expected"),
    [
        # No backend at all: name the three backends and the extras, and the source-checkout form.
        (
            "",
            ("tensorflow", "torch", "jax"),
            ["tensorflow-cpu", "[keras,tensorflow]", "[keras,jax]", "[keras,torch]", "pip install -e"],
        ),
        # KERAS_BACKEND names a backend that is missing: name it and its extra.
        ("jax", ("jax",), ["KERAS_BACKEND='jax'", "[keras,jax]", "tensorflow"]),
        # KERAS_BACKEND unset and Keras' default backend (TensorFlow) missing: name an installed one.
        (
            "",
            ("tensorflow",),
            ["configured backend is 'tensorflow'", "KERAS_BACKEND=torch", "tensorflow-cpu"],
        ),
        # No Keras: name it.
        ("", ("keras",), ["needs Keras 3", "[keras,tensorflow]"]),
    ],
)
def test_import_errors_name_the_missing_piece(tmp_path, backend_env, blocked, expected):
    # KERAS_BACKEND="" is what an unset variable means to the check; an empty KERAS_HOME has no
    # keras.json, so Keras' default backend is TensorFlow.
    env = {"KERAS_BACKEND": backend_env, "KERAS_HOME": str(tmp_path)}
    proc = run_python(
        BLOCK.format(blocked=blocked), check=False, env=env, backend=backend_env or "tensorflow"
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError"), proc.stderr[-2000:]
    for part in expected:
        assert part in last, (part, last)


def test_tensorflow_files_without_their_state_file_are_refused_but_a_lone_file_is_not(tmp_path):
    directory = tmp_path / "tf"
    tensorflow_directory(directory)
    os.remove(directory / "checkpoint")
    before = snapshot(directory)
    with pytest.raises(IncompatibleCheckpointError, match=r"ckpt-1\.index, ckpt-2\.index"):
        CheckpointManager(str(directory))
    assert snapshot(directory) == before
    # One file with one of our names and other content (a user's backup, notes) is no other tool's
    # checkpoint: the manager opens, and leaves it alone.
    other = tmp_path / "user"
    other.mkdir()
    (other / "ckpt-7.index").write_bytes(b"my notes\n")
    with CheckpointManager(str(other)) as mgr:
        mgr.save({"w": np.zeros(2)}, step=1)
    assert (other / "ckpt-7.index").read_bytes() == b"my notes\n"
