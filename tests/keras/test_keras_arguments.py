"""Keras users' own arguments on CheckpointCallback (save_freq, save_best_only, initial_value_threshold),
and keep_best on a validation metric, with real model.fit (the default backend in-process; the
PyTorch and JAX backends in fresh processes)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from keras_helpers import HERE, run_python
from keras_models import ScriptedValScore, data, sequential

import ckpt_callbacks
from ckpt_callbacks._api._resolve import read_meta
from ckpt_callbacks.keras import CheckpointCallback, load_model, restore


def saved_steps(directory) -> list[int]:
    state = ckpt_callbacks.get_checkpoint_state(str(directory))
    return [int(re.search(r"-(\d+)$", p).group(1)) for p in state.all_model_checkpoint_paths] if state else []


def fit(cb, epochs=2, scores=None, initial_epoch=0, **kwargs):
    """10 batches per epoch; ``scores``: the val_score of each epoch."""
    x, y = data()
    model = kwargs.pop("model", None) or sequential()
    callbacks = ([ScriptedValScore(scores)] if scores else []) + [cb]
    model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, callbacks=callbacks, verbose=0, **kwargs)
    return model


@pytest.mark.parametrize(
    ("save_freq", "expected"),
    [("epoch", [10, 20, 30]), (4, [4, 8, 12, 16, 20, 24, 28, 30]), (10, [10, 20, 30])],
)
def test_save_freq_is_the_epoch_or_step_trigger(tmp_path, save_freq, expected):
    cb = CheckpointCallback(tmp_path, save_freq=save_freq, max_to_keep=None)
    assert (cb.save_on_epoch_end, cb.save_every_n_steps) == (
        (True, None) if save_freq == "epoch" else (False, save_freq)
    )
    fit(cb, epochs=3)
    assert saved_steps(tmp_path) == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"save_freq": "epoch", "save_every_n_steps": 5}, "save_freq='epoch', save_every_n_steps=5"),
        ({"save_freq": 4, "save_every_n_steps": 5}, "save_freq=4, save_every_n_steps=5"),
        ({"save_freq": "batch"}, "Unrecognized save_freq.*save_freq='batch'"),
        ({"save_freq": 0}, "Unrecognized save_freq.*save_freq=0"),
        ({"save_freq": 0.5}, "Unrecognized save_freq.*save_freq=0.5"),
        ({"save_freq": True}, "Unrecognized save_freq.*save_freq=True"),
        ({"save_best_only": 1}, "save_best_only must be True or False"),
        ({"initial_value_threshold": 0.5}, "save_best_only is False"),
        ({"save_best_only": True, "initial_value_threshold": "0.5"}, "initial_value_threshold='0.5'"),
        ({"save_best_only": True, "monitor": None}, "save_best_only needs the metric"),
    ],
)
def test_conflicting_or_bad_keras_arguments_raise(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckpointCallback(tmp_path, **kwargs)


def test_save_freq_agreeing_with_save_every_n_steps_is_accepted(tmp_path):
    cb = CheckpointCallback(tmp_path, save_freq=5, save_every_n_steps=5)
    assert cb.save_every_n_steps == 5


@pytest.mark.parametrize(
    ("scores", "mode", "threshold", "expected"),
    [
        ([0.5, 0.9, 0.6, 0.95], "max", None, [10, 20, 40]),
        ([0.5, 0.9, 0.6, 0.7], "max", None, [10, 20]),  # train end: judged at the epoch end, no save
        ([0.5, 0.9, 0.6, 0.95], "max", 0.8, [20, 40]),
        ([0.5, 0.9, 0.4, 0.45], "min", None, [10, 30]),
        ([0.5, 0.5, 0.5, 0.5], "max", None, [10]),  # equal is no improvement, as in Keras
    ],
)
def test_save_best_only_saves_only_improvements(tmp_path, scores, mode, threshold, expected):
    cb = CheckpointCallback(
        tmp_path,
        save_freq="epoch",
        save_best_only=True,
        monitor="val_score",
        mode=mode,
        initial_value_threshold=threshold,
        max_to_keep=None,
    )
    fit(cb, epochs=4, scores=scores)
    assert saved_steps(tmp_path) == expected
    best = max(scores) if mode == "max" else min(scores)
    if threshold is None or (best > threshold if mode == "max" else best < threshold):
        assert cb.best == best
        assert read_meta(str(tmp_path / f"ckpt-{expected[-1]}"))["metrics"]["val_score"] == best


def test_save_best_only_keeps_its_best_value_across_a_resume(tmp_path):
    kwargs = {
        "save_freq": "epoch",
        "save_best_only": True,
        "monitor": "val_score",
        "mode": "max",
        "max_to_keep": None,
    }
    fit(CheckpointCallback(tmp_path, **kwargs), epochs=2, scores=[0.5, 0.9])
    assert saved_steps(tmp_path) == [10, 20]
    cb = CheckpointCallback(tmp_path, **kwargs)
    fit(cb, epochs=4, scores=[0.0, 0.0, 0.8, 0.95])  # epochs 2 and 3 run; 0.8 does not beat 0.9
    assert saved_steps(tmp_path) == [10, 20, 40]


def test_save_best_only_without_the_metric_warns_and_saves_as_keras_does(tmp_path):
    cb = CheckpointCallback(tmp_path, save_freq=5, save_best_only=True, max_to_keep=None)  # val_loss
    with pytest.warns(UserWarning, match="Can save best model only with val_loss available"):
        fit(cb, epochs=1)
    assert saved_steps(tmp_path) == [5, 10]


def test_keep_best_on_a_validation_metric_keeps_the_best_epoch_with_step_saves(tmp_path):
    # Steps 3, 6, 9, ... never land on an epoch end (10, 20, ...): before, no save but the one at train
    # end carried val_score, so keep_best kept the last epoch (0.7) and the best one (0.9, epoch 1) was
    # never saved. Now every validated epoch ends with a save carrying its own value.
    cb = CheckpointCallback(
        tmp_path, save_every_n_steps=3, max_to_keep=1, keep_best=1, monitor="val_score", mode="max"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # in particular no missing-metric warning
        fit(cb, epochs=4, scores=[0.5, 0.9, 0.6, 0.7])
    assert saved_steps(tmp_path) == [20, 40]
    metrics = read_meta(str(tmp_path / "ckpt-20"))["metrics"]
    assert metrics["val_score"] == 0.9


def test_keep_best_step_saves_between_validations_carry_no_validation_value(tmp_path):
    x, y = data()
    cb = CheckpointCallback(tmp_path, save_every_n_steps=3, max_to_keep=None, keep_best=2, monitor="val_loss")
    model = sequential()
    history = model.fit(
        x, y, batch_size=4, epochs=3, shuffle=False, validation_data=(x[:8], y[:8]), callbacks=[cb], verbose=0
    )
    steps = saved_steps(tmp_path)
    assert {10, 20, 30} <= set(steps)  # every epoch's validation is saved
    for step in steps:
        metrics = read_meta(str(tmp_path / f"ckpt-{step}"))["metrics"]
        if step % 10:
            assert "val_loss" not in metrics, step
        else:
            assert metrics["val_loss"] == pytest.approx(history.history["val_loss"][step // 10 - 1])


def test_restore_and_load_model_choose_the_best_checkpoint(tmp_path):
    cb = CheckpointCallback(
        tmp_path, save_every_n_steps=3, max_to_keep=1, keep_best=1, monitor="val_score", mode="max"
    )
    trained = fit(cb, epochs=4, scores=[0.5, 0.9, 0.6, 0.7])
    x, _ = data()
    model = sequential()
    assert restore(model, tmp_path, checkpoint="best") == str(tmp_path / "ckpt-20")
    assert int(model.optimizer.iterations.numpy()) == 20
    assert not np.array_equal(model.predict(x, verbose=0), trained.predict(x, verbose=0))
    np.testing.assert_array_equal(
        load_model(tmp_path, checkpoint="best").predict(x, verbose=0), model.predict(x, verbose=0)
    )
    assert restore(sequential(), tmp_path) == str(tmp_path / "ckpt-40")  # "latest", the default
    assert restore(sequential(), tmp_path, checkpoint="latest") == str(tmp_path / "ckpt-40")


def test_save_best_only_names_its_best_checkpoint(tmp_path):
    cb = CheckpointCallback(tmp_path, save_freq="epoch", save_best_only=True, monitor="val_score", mode="min")
    fit(cb, epochs=4, scores=[0.5, 0.9, 0.4, 0.45])
    assert restore(sequential(), tmp_path, checkpoint="best") == str(tmp_path / "ckpt-30")


def test_best_of_an_unranked_directory_or_a_bad_choice_raises(tmp_path):
    fit(CheckpointCallback(tmp_path, save_freq="epoch"), epochs=1)
    with pytest.raises(ckpt_callbacks.CheckpointNotFoundError, match="not ranked"):
        restore(sequential(), tmp_path, checkpoint="best")
    with pytest.raises(ckpt_callbacks.CheckpointNotFoundError, match="not ranked"):
        load_model(tmp_path, checkpoint="best")
    with pytest.raises(ValueError, match="checkpoint='newest'"):
        restore(sequential(), tmp_path, checkpoint="newest")


OTHER_BACKEND = r"""
import re, sys, warnings
sys.path.insert(0, sys.argv[2])
import ckpt_callbacks
from ckpt_callbacks._api._resolve import read_meta
from ckpt_callbacks.keras import CheckpointCallback, load_model, restore
from keras_models import ScriptedValScore, data, sequential

def steps(d):
    s = ckpt_callbacks.get_checkpoint_state(d)
    return [int(re.search(r"-(\d+)$", p).group(1)) for p in s.all_model_checkpoint_paths]

x, y = data()
d = sys.argv[1]
cb = CheckpointCallback(d + "/best_only", save_freq="epoch", save_best_only=True, monitor="val_score", mode="max",
                        max_to_keep=None)
sequential().fit(x, y, batch_size=4, epochs=4, shuffle=False, verbose=0,
                 callbacks=[ScriptedValScore([0.5, 0.9, 0.6, 0.7]), cb])
print("best_only", steps(d + "/best_only"))
cb = CheckpointCallback(d + "/keep_best", save_freq=3, max_to_keep=1, keep_best=1, monitor="val_score", mode="max")
sequential().fit(x, y, batch_size=4, epochs=4, shuffle=False, verbose=0,
                 callbacks=[ScriptedValScore([0.5, 0.9, 0.6, 0.7]), cb])
print("keep_best", steps(d + "/keep_best"))
from ckpt_callbacks.keras import load_model, restore
print("best", restore(sequential(), d + "/keep_best", checkpoint="best")[len(d):],
      load_model(d + "/keep_best", checkpoint="best").optimizer.iterations.numpy())
"""


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_keras_arguments_on_other_backends(tmp_path, backend):
    out = run_python(OTHER_BACKEND, tmp_path, HERE, backend=backend).stdout.strip().splitlines()
    assert out[-3:] == ["best_only [10, 20]", "keep_best [20, 40]", "best /keep_best/ckpt-20 20"]
