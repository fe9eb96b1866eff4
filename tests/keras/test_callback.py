"""CheckpointCallback with real model.fit (in-process, the default Keras backend)."""

from __future__ import annotations

import os
import re
import warnings

import keras
import numpy as np
import pytest
from keras_models import data, sequential

import ckpt_callbacks
from ckpt_callbacks.keras import CheckpointCallback, ResumableDataset


def saved_steps(directory) -> list[int]:
    state = ckpt_callbacks.get_checkpoint_state(str(directory))
    if state is None:
        return []
    return [int(re.search(r"-(\d+)$", p).group(1)) for p in state.all_model_checkpoint_paths]


def files_on_disk(directory) -> set[int]:
    return {int(m.group(1)) for f in os.listdir(directory) if (m := re.match(r"ckpt-(\d+)\.index$", f))}


@pytest.mark.parametrize(
    ("spe", "every", "epochs", "expected"),
    [
        # 40 samples / batch 4 = 10 batches per epoch.
        (1, 5, 2, [5, 10, 15, 20]),
        (1, 3, 1, [3, 6, 9, 10]),  # 10: save_on_train_end
        (1, 4, 2, [4, 8, 12, 16, 20]),
        # steps_per_execution=3: Keras reports steps 3, 6, 9, 10 (epoch end), 13, ...; a save happens at
        # the first reported step at or past each multiple of 5, once.
        (3, 5, 2, [6, 10, 16, 20]),
        (3, 2, 1, [3, 6, 9, 10]),
    ],
)
def test_saves_at_global_step_boundaries(tmp_path, spe, every, epochs, expected):
    x, y = data()
    model = sequential(steps_per_execution=spe)
    cb = CheckpointCallback(tmp_path, save_every_n_steps=every, max_to_keep=None)
    model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, callbacks=[cb], verbose=0)
    assert saved_steps(tmp_path) == expected
    assert files_on_disk(tmp_path) == set(expected)
    assert int(model.optimizer.iterations.numpy()) == 10 * epochs


def test_epoch_end_and_train_end_never_save_twice_at_one_step(tmp_path):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path, save_every_n_steps=10, save_on_epoch_end=True, max_to_keep=None)
    model.fit(x, y, batch_size=4, epochs=3, shuffle=False, callbacks=[cb], verbose=0)
    assert saved_steps(tmp_path) == [10, 20, 30]


def test_epoch_end_save_carries_validation_metrics_and_epoch(tmp_path):
    from ckpt_callbacks._api._resolve import read_meta

    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path, save_on_epoch_end=True, max_to_keep=None)
    model.fit(x, y, batch_size=4, epochs=2, validation_data=(x, y), shuffle=False, callbacks=[cb], verbose=0)
    meta = read_meta(str(tmp_path / "ckpt-10"))
    assert meta["epoch"] == 1 and meta["step"] == 10 and meta["framework"] == "keras"
    assert set(meta["metrics"]) >= {"loss", "val_loss"}
    assert meta["model"]["class_name"] == "Sequential"
    assert meta["framework_versions"]["keras"] == keras.__version__


def test_save_every_n_seconds_uses_the_clock(tmp_path, fake_clock):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(
        tmp_path, save_every_n_seconds=100, save_on_train_end=False, max_to_keep=None, clock=fake_clock
    )

    class Tick(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            fake_clock.now += 30  # a save is due every 4th batch (120 s >= 100 s)

    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[Tick(), cb], verbose=0)
    assert saved_steps(tmp_path) == [4, 8, 12, 16, 20]


def test_rotation_keeps_the_newest(tmp_path):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path, save_every_n_steps=2, max_to_keep=3)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[cb], verbose=0)
    assert saved_steps(tmp_path) == [16, 18, 20]
    assert files_on_disk(tmp_path) == {16, 18, 20}


def test_hourly_retention_with_injected_clock(tmp_path, fake_clock):
    x, y = data()
    model = sequential()
    start = fake_clock.now
    cb = CheckpointCallback(
        tmp_path, save_every_n_steps=1, max_to_keep=2, keep_checkpoint_every_n_hours=1, clock=fake_clock
    )

    class Tick(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            fake_clock.now += 1800  # half an hour per step

    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[Tick(), cb], verbose=0)

    # TensorFlow CheckpointManager semantics, simulated: a checkpoint leaving the newest-2 window is
    # preserved when it is at least an hour after the last preserved one.
    last_preserved, kept, preserved = start - 1.0, [], []
    for step in range(1, 11):
        kept.append((step, start + 1800 * step))
        while len(kept) > 2:
            old_step, ts = kept.pop(0)
            if ts - last_preserved >= 3600:
                preserved.append(old_step)
                last_preserved = ts
    expected = preserved + [s for s, _ in kept]
    assert saved_steps(tmp_path) == expected
    assert files_on_disk(tmp_path) == set(expected)
    state = ckpt_callbacks.get_checkpoint_state(str(tmp_path))
    assert state.all_model_checkpoint_timestamps == [start + 1800 * s for s in expected]


def test_keep_best_keeps_the_best_by_monitor(tmp_path):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path, save_on_epoch_end=True, max_to_keep=1, keep_best=1, monitor="loss")
    history = model.fit(x, y, batch_size=4, epochs=4, shuffle=False, callbacks=[cb], verbose=0)
    best_epoch = int(np.argmin(history.history["loss"]))
    assert saved_steps(tmp_path)[-1] == 40
    assert 10 * (best_epoch + 1) in saved_steps(tmp_path)


def test_resume_continues_at_the_saved_epoch_and_step(tmp_path):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path, save_on_epoch_end=True)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[cb], verbose=0)
    weights = [w.copy() for w in model.get_weights()]

    fresh = sequential()  # built twice in one process: variable paths differ ("sequential_1/...")
    cb2 = CheckpointCallback(tmp_path, save_on_epoch_end=True)
    history = fresh.fit(x, y, batch_size=4, epochs=5, shuffle=False, callbacks=[cb2], verbose=0)
    assert cb2.restored_from.endswith("ckpt-20")
    assert len(history.history["loss"]) == 3  # epochs 2, 3, 4
    assert int(fresh.optimizer.iterations.numpy()) == 50
    assert saved_steps(tmp_path)[-3:] == [30, 40, 50]
    assert fresh._initial_epoch is None  # a later fit without the callback starts at epoch 0 again
    assert not all(np.array_equal(a, b) for a, b in zip(weights, fresh.get_weights()))


def test_resume_after_completion_trains_no_more(tmp_path):
    x, y = data()
    model = sequential()
    model.fit(
        x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[CheckpointCallback(tmp_path)], verbose=0
    )
    again = sequential()
    with pytest.warns(UserWarning, match="trains nothing"):
        history = again.fit(
            x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[CheckpointCallback(tmp_path)], verbose=0
        )
    assert history.history == {} or len(history.history.get("loss", [])) == 0
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), again.get_weights()))
    assert saved_steps(tmp_path) == [20]


def test_resume_false_starts_over(tmp_path):
    x, y = data()
    model = sequential()
    model.fit(
        x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[CheckpointCallback(tmp_path)], verbose=0
    )
    again = sequential()
    cb = CheckpointCallback(tmp_path, resume=False)
    history = again.fit(x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    assert cb.restored_from is None and len(history.history["loss"]) == 1


def test_mid_epoch_resume_without_resumable_dataset_warns_and_restarts_the_epoch(tmp_path):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path, save_every_n_steps=3, save_on_train_end=False)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    assert saved_steps(tmp_path)[-1] == 9
    again = sequential()
    with pytest.warns(UserWarning, match="ResumableDataset"):
        history = again.fit(
            x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[CheckpointCallback(tmp_path)], verbose=0
        )
    assert len(history.history["loss"]) == 1
    assert int(again.optimizer.iterations.numpy()) == 19  # 9 restored + a full epoch of 10


def test_resumable_dataset_in_process_mid_epoch_exact(tmp_path):
    x, y = data()

    def run(directory, stop_at=None):
        keras.utils.set_random_seed(3)
        model = sequential()
        cb = CheckpointCallback(directory, save_every_n_steps=3, max_to_keep=None)
        ds = ResumableDataset(x, y, batch_size=4, callback=cb, seed=5)

        class Stop(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if stop_at is not None and int(self.model.optimizer.iterations.numpy()) == stop_at:
                    raise KeyboardInterrupt  # an interruption right after the save at this step

        try:
            model.fit(ds, epochs=3, shuffle=False, callbacks=[cb, Stop()], verbose=0)
        except KeyboardInterrupt:
            pass
        return model

    reference = run(tmp_path / "ref")
    run(tmp_path / "run", stop_at=15)  # mid epoch 1 (10 batches per epoch)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Your input ran out")  # the shortened epoch is expected
        resumed = run(tmp_path / "run")
    for a, b in zip(
        reference.variables + reference.optimizer.variables, resumed.variables + resumed.optimizer.variables
    ):
        assert np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)), a.path
    assert saved_steps(tmp_path / "run") == saved_steps(tmp_path / "ref")


def test_async_save_is_durable_when_fit_returns(tmp_path):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path, save_every_n_steps=5, async_save=True, max_to_keep=None)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[cb], verbose=0)
    assert saved_steps(tmp_path) == [5, 10, 15, 20]
    state = ckpt_callbacks.load_checkpoint(str(tmp_path / "ckpt-20"))
    kernel = model.layers[0].kernel
    assert np.array_equal(state["model"][kernel.path], kernel.numpy())


def test_memory_filesystem_and_storage_options(tmp_path):
    import fsspec

    x, y = data()
    model = sequential()
    cb = CheckpointCallback("memory://keras-test/run", save_on_epoch_end=True, storage_options={})
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/keras-test/run/checkpoint")
    assert ckpt_callbacks.latest_checkpoint("memory://keras-test/run").endswith("ckpt-10")


def test_counters_persist_in_the_checkpoint(tmp_path):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path, save_every_n_steps=4)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    trainer = ckpt_callbacks.load_checkpoint(str(tmp_path / "ckpt-8"))["trainer"]
    assert trainer == {
        "epoch": 0,
        "batches_in_epoch": 8,
        "global_step": 8,
        "steps_per_epoch": 10,
        "save_count": 2,
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"save_every_n_steps": 0}, "save_every_n_steps must be an int >= 1"),
        ({"save_every_n_steps": 2.5}, "save_every_n_steps must be an int >= 1"),
        ({"save_every_n_steps": True}, "save_every_n_steps must be an int >= 1"),
        ({"save_every_n_seconds": -1}, "save_every_n_seconds must be a positive number"),
        ({"save_every_n_seconds": float("nan")}, "save_every_n_seconds must be a positive number"),
        ({"save_on_epoch_end": "yes"}, "save_on_epoch_end must be True or False"),
        ({"resume": 1}, "resume must be True or False"),
        ({"max_to_keep": 0}, "max_to_keep must be an int >= 1"),
        ({"keep_checkpoint_every_n_hours": 0}, "keep_checkpoint_every_n_hours must be a positive number"),
        ({"keep_best": 2, "monitor": ""}, "keep_best needs the metric"),
        ({"mode": "best"}, "mode must be 'auto', 'min' or 'max'"),
        ({"prefix": "a/b"}, "prefix must be a plain file-name prefix"),
        ({"storage_options": "anon"}, "storage_options must be a dict"),
        ({"save_on_train_end": False}, "would never save"),
    ],
)
def test_constructor_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        CheckpointCallback(tmp_path, **kwargs)
    assert "Received" in str(info.value)


def test_directory_must_be_given():
    with pytest.raises(ValueError, match="directory must be a non-empty path"):
        CheckpointCallback("")


def test_resumable_dataset_validation(tmp_path):
    x, y = data()
    with pytest.raises(ValueError, match="needs the CheckpointCallback"):
        ResumableDataset(x, y, callback=None)
    cb = CheckpointCallback(tmp_path)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        ResumableDataset(x, y, batch_size=0, callback=cb)
    with pytest.raises(ValueError, match="same number of samples"):
        ResumableDataset(x, y[:-1], callback=cb)


def test_resumable_dataset_order_depends_only_on_seed_and_epoch(tmp_path):
    x, y = data()
    cb = CheckpointCallback(tmp_path)
    a = ResumableDataset(x, y, batch_size=4, callback=cb, seed=1)
    b = ResumableDataset(x, y, batch_size=4, callback=cb, seed=1)
    a._set_position(2, 0)
    b._set_position(2, 3)
    assert len(a) == 10 and len(b) == 7
    a_batches = [a[i][0] for i in range(10)]
    b_batches = [b[i][0] for i in range(7)]
    for i in range(7):
        assert np.array_equal(a_batches[i + 3], b_batches[i])
    seen = np.concatenate(a_batches)
    assert sorted(map(tuple, seen)) == sorted(map(tuple, x))
    a._set_position(3, 0)
    assert not np.array_equal(np.concatenate([a[i][0] for i in range(10)]), seen)


def test_resumable_dataset_refuses_keras_shuffling(tmp_path):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path)
    ds = ResumableDataset(x, y, batch_size=2, callback=cb)  # 20 batches: a shuffled order shows at once
    with pytest.raises(Exception, match="shuffle=False"):
        model.fit(ds, epochs=1, shuffle=True, callbacks=[cb], verbose=0)


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path, save_on_epoch_end=True, max_to_keep=None)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[cb], verbose=0)
    (data_file,) = tmp_path.glob("ckpt-20.data-*")
    raw = bytearray(data_file.read_bytes())
    raw[-1] ^= 0xFF  # flip a bit of the last tensor
    data_file.write_bytes(bytes(raw))

    again = sequential()
    cb2 = CheckpointCallback(tmp_path, save_on_epoch_end=True, max_to_keep=None)
    with pytest.warns(UserWarning, match="ckpt-20"):
        history = again.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[cb2], verbose=0)
    assert cb2.restored_from.endswith("ckpt-10")
    assert len(history.history["loss"]) == 1


def test_save_optimizer_false_keeps_counting_steps(tmp_path):
    x, y = data()
    model = sequential()
    cb = CheckpointCallback(tmp_path, save_on_epoch_end=True, save_optimizer=False)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    assert "optimizer" not in ckpt_callbacks.load_checkpoint(str(tmp_path / "ckpt-10"))
    again = sequential()
    cb2 = CheckpointCallback(tmp_path, save_on_epoch_end=True, save_optimizer=False)
    again.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[cb2], verbose=0)
    assert int(again.optimizer.iterations.numpy()) == 20
    assert saved_steps(tmp_path)[-1] == 20
