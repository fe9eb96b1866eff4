"""restore() into live models, IncompatibleCheckpointError, dtypes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras_models import data, functional, sequential

import ckpt_callbacks
from ckpt_callbacks.errors import CheckpointNotFoundError, IncompatibleCheckpointError
from ckpt_callbacks.keras import CheckpointCallback, restore


@pytest.fixture
def trained(tmp_path):
    x, y = data()
    model = sequential()
    model.fit(
        x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[CheckpointCallback(tmp_path)], verbose=0
    )
    return tmp_path, model


def weights_equal(a, b) -> bool:
    return all(np.array_equal(p, q) for p, q in zip(a.get_weights(), b.get_weights()))


def test_restore_weights_and_optimizer_into_a_fresh_model(trained):
    directory, model = trained
    fresh = sequential()
    path = restore(fresh, directory)
    assert path.endswith("ckpt-10")
    assert weights_equal(model, fresh)
    assert int(fresh.optimizer.iterations.numpy()) == 10
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables):
        assert np.array_equal(a.numpy(), b.numpy())


def test_restore_accepts_a_checkpoint_path_and_an_uncompiled_model(trained):
    directory, model = trained
    fresh = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(1),
        ]
    )
    restore(fresh, directory / "ckpt-10")
    assert weights_equal(model, fresh)


def test_restore_from_a_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        restore(sequential(), tmp_path / "nothing-here")


def _incompatible_models():
    return {
        "extra layer": lambda: keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8),
                keras.layers.Dropout(0.2),
                keras.layers.Dense(3),
                keras.layers.Dense(1),
            ]
        ),
        "wider layer": lambda: sequential(hidden=16),
        "other inputs": lambda: sequential(features=5),
        "float64 weights": lambda: sequential(dtype="float64"),
        "missing layer": lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]),
    }


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("extra layer", "missing from the checkpoint"),
        ("wider layer", "wrong shape: .*kernel: model \\(4, 16\\), checkpoint \\(4, 8\\)"),
        ("other inputs", "wrong shape"),
        ("float64 weights", "wrong dtype: .*model float64, checkpoint float32"),
        ("missing layer", "unexpected in the checkpoint"),
    ],
)
def test_incompatible_checkpoint_lists_what_does_not_fit(trained, name, expect):
    directory, _ = trained
    model = _incompatible_models()[name]()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(IncompatibleCheckpointError, match=expect) as info:
        restore(model, directory)
    assert isinstance(info.value, ValueError)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # nothing written


def test_checkpoint_without_keras_state_is_incompatible(tmp_path):
    ckpt_callbacks.save_checkpoint(str(tmp_path / "ckpt-1"), {"w": np.zeros(3)})
    with pytest.raises(IncompatibleCheckpointError, match="no Keras model variables"):
        restore(sequential(), tmp_path / "ckpt-1")


def test_functional_model_with_batchnorm_round_trips(tmp_path):
    x, y = data()
    model = functional()
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[CheckpointCallback(tmp_path)], verbose=0)
    fresh = functional()
    restore(fresh, tmp_path)
    assert weights_equal(model, fresh)
    np.testing.assert_array_equal(model.predict(x, verbose=0), fresh.predict(x, verbose=0))


def test_bfloat16_variables_are_stored_as_bfloat16(tmp_path):
    import ml_dtypes

    x, y = data()
    model = sequential(dtype="bfloat16")
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[CheckpointCallback(tmp_path)], verbose=0)
    names = {n: d for n, d, _ in ckpt_callbacks.list_variables(str(tmp_path))}
    assert "bfloat16" in names.values()
    fresh = sequential(dtype="bfloat16")
    restore(fresh, tmp_path)
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        assert a.dtype == b.dtype
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
    assert any(w.dtype == ml_dtypes.bfloat16 for w in fresh.get_weights())


def test_load_model_in_process_without_compiling(trained):
    from ckpt_callbacks.keras import load_model

    directory, model = trained
    loaded = load_model(directory, compile=False)
    assert getattr(loaded, "optimizer", None) is None
    x, _ = data()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    compiled = load_model(directory)
    assert type(compiled.optimizer) is type(model.optimizer)
    assert int(compiled.optimizer.iterations.numpy()) == 10


def test_load_model_needs_a_model_description(tmp_path):
    from ckpt_callbacks.keras import load_model

    ckpt_callbacks.save_checkpoint(str(tmp_path / "ckpt-1"), {"model": {}})
    with pytest.raises(IncompatibleCheckpointError, match="no Keras model description"):
        load_model(tmp_path / "ckpt-1")


def test_restore_into_an_unbuilt_model_explains(trained):
    directory, _ = trained
    unbuilt = keras.Sequential([keras.layers.Dense(8), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="unbuilt model"):
        restore(unbuilt, directory)


def test_other_optimizer_is_incompatible_and_says_how_to_load_weights_only(trained):
    directory, model = trained
    sgd = sequential()
    sgd.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    with pytest.raises(
        IncompatibleCheckpointError, match="optimizer variables do not fit.*uncompiled"
    ) as info:
        restore(sgd, directory)
    assert "unexpected in the checkpoint" in str(info.value) or "missing" in str(info.value)


def test_resumable_dataset_with_sample_weights_and_dict_inputs(tmp_path):
    from ckpt_callbacks.keras import ResumableDataset

    x, y = data(n=10)
    sw = np.arange(10, dtype="float32")
    cb = CheckpointCallback(tmp_path)
    ds = ResumableDataset({"a": x, "b": x[:, :2]}, y, sw, batch_size=4, callback=cb, shuffle=False)
    assert len(ds) == 3
    bx, by, bw = ds[0]
    assert set(bx) == {"a", "b"} and bx["b"].shape == (4, 2)
    np.testing.assert_array_equal(bw, sw[:4])
    bx, by, bw = ds[1]
    bx, by, bw = ds[2]
    assert by.shape == (2, 1)  # the last batch is smaller
