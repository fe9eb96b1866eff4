"""Fresh processes: SIGKILL + rerun resumes bit-exactly, load_model without model code, on TensorFlow,
PyTorch and JAX."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from keras_helpers import BACKENDS, HERE, run_python

SCRIPT = HERE / "keras_train_script.py"


def _reference(backend, tmp_path_factory, env=None):
    out = tmp_path_factory.mktemp(f"ref-{backend}")
    run_python(SCRIPT, out / "ckpt", out / "final.npz", "epoch", backend=backend, env=env)
    return np.load(out / "final.npz")


@pytest.fixture(scope="module", params=BACKENDS)
def reference(request, tmp_path_factory):
    """Final state of an uninterrupted run (the checkpoint trigger does not change training)."""
    return request.param, _reference(request.param, tmp_path_factory)


def _assert_same_state(got, expected, backend):
    names = [k for k in expected.files if k != "resumed"]
    assert names == [k for k in got.files if k != "resumed"]
    for k in names:
        assert got[k].dtype == expected[k].dtype
        assert np.array_equal(got[k], expected[k]), f"{backend}: variable {k} differs after resume"


@pytest.mark.parametrize(
    ("trigger", "kill_at", "resumed_from", "async_save"),
    [
        # 40 samples / batch 8 = 5 batches per epoch, 4 epochs.
        ("epoch", 7, ("ckpt-5",), False),  # checkpoint at the end of epoch 0, killed in epoch 1
        ("steps", 10, ("ckpt-8",), False),  # checkpoint after batch 3 of epoch 1, killed at its end
        # async: the kill may land before the background write of ckpt-8 commits.
        ("steps", 10, ("ckpt-8", "ckpt-4"), True),
    ],
)
def test_sigkill_then_rerun_resumes_bit_exactly(
    reference, tmp_path, trigger, kill_at, resumed_from, async_save
):
    backend, expected = reference
    env = {"ASYNC_SAVE": "1" if async_save else "0"}
    args = (tmp_path / "ckpt", tmp_path / "final.npz", trigger, kill_at)
    killed = run_python(SCRIPT, *args, backend=backend, check=False, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "final.npz").exists()
    run_python(SCRIPT, *args, backend=backend, env=env)  # the same command again
    got = np.load(tmp_path / "final.npz")
    assert str(got["resumed"]).endswith(resumed_from)
    _assert_same_state(got, expected, backend)


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_sigkill_mid_epoch_with_steps_per_execution_3(tmp_path, tmp_path_factory, backend):
    # TensorFlow and JAX: the PyTorch backend requires steps_per_execution=1. Reported steps are
    # 3, 5 | 8, 10 | ...; saves at 5 (epoch end), 8 (inside epoch 1), ...; killed at 10.
    env = {"STEPS_PER_EXECUTION": "3"}
    expected = _reference(backend, tmp_path_factory, env=env)
    args = (tmp_path / "ckpt", tmp_path / "final.npz", "steps", 10)
    killed = run_python(SCRIPT, *args, env=env, check=False, backend=backend)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_python(SCRIPT, *args, env=env, backend=backend)
    got = np.load(tmp_path / "final.npz")
    assert str(got["resumed"]).endswith("ckpt-8")
    _assert_same_state(got, expected, backend)


KINDS = ["sequential", "functional", "custom"]

TRAIN_AND_PREDICT = r"""
import os, sys, keras, numpy as np
import keras_models as models, keras_custom_layers as custom_layers
from ckpt_callbacks.keras import CheckpointCallback
x, y = models.data()
for kind in ("sequential", "functional", "custom"):
    directory = os.path.join(sys.argv[1], kind)
    model = {"sequential": models.sequential, "functional": models.functional, "custom": custom_layers.model}[kind]()
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[CheckpointCallback(directory)], verbose=0)
    np.save(os.path.join(directory, "pred.npy"), model.predict(x, verbose=0))
"""

LOAD_AND_PREDICT = r"""
import os, sys, keras, numpy as np
from ckpt_callbacks.keras import load_model
x = np.random.RandomState(0).randn(40, 4).astype("float32")
for kind in ("sequential", "functional", "custom"):
    directory = os.path.join(sys.argv[1], kind)
    if kind == "custom":
        import keras_custom_layers  # registers the layer; builds no model
    model = load_model(directory)
    np.testing.assert_array_equal(model.predict(x, verbose=0), np.load(os.path.join(directory, "pred.npy")))
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations.value)) == 10
    print("OK", kind, type(model).__name__, type(model.optimizer).__name__)
assert "keras_models" not in sys.modules
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_model_in_a_fresh_process_predicts_identically(tmp_path, backend):
    """Sequential, functional and custom-layer models; the loading process never defines them."""
    run_python(TRAIN_AND_PREDICT, tmp_path, HERE, backend=backend)
    out = run_python(LOAD_AND_PREDICT, tmp_path, backend=backend, cwd=tmp_path)
    assert [line.split()[:2] for line in out.stdout.strip().splitlines()] == [["OK", k] for k in KINDS]


STEPS_ON_TORCH = r"""
import sys, re, numpy as np, keras
import ckpt_callbacks
from ckpt_callbacks.keras import CheckpointCallback
import keras_models as models
x, y = models.data()
model = models.sequential()
cb = CheckpointCallback(sys.argv[1], save_every_n_steps=4, max_to_keep=3)
model.fit(x, y, batch_size=4, epochs=2, callbacks=[cb], verbose=0)
state = ckpt_callbacks.get_checkpoint_state(sys.argv[1])
print([int(re.search(r"-(\d+)$", p).group(1)) for p in state.all_model_checkpoint_paths])
"""


def test_torch_backend_step_schedule_and_rotation(tmp_path):
    out = run_python(STEPS_ON_TORCH, tmp_path, HERE, backend="torch")
    assert out.stdout.strip().splitlines()[-1] == "[12, 16, 20]"


CLOUD_WITHOUT_TENSORFLOW = r"""
import sys
sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
import fsspec, keras, numpy as np
from ckpt_callbacks.keras import CheckpointCallback, load_model
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
model.compile("sgd", "mse")
x = np.ones((8, 3), "float32")
model.fit(x, np.zeros((8, 2), "float32"), batch_size=4, epochs=1, verbose=0,
          callbacks=[CheckpointCallback("memory://bucket/run", save_every_n_steps=1)])
assert fsspec.filesystem("memory").exists("/bucket/run/ckpt-2.index")
np.testing.assert_array_equal(load_model("memory://bucket/run").predict(x, verbose=0), model.predict(x, verbose=0))
print("OK")
"""


def test_saving_to_object_storage_never_needs_tensorflow(tmp_path):
    out = run_python(CLOUD_WITHOUT_TENSORFLOW, backend="torch")
    assert out.stdout.strip().endswith("OK")


def test_importing_the_core_imports_no_keras():
    out = run_python(
        "import sys, ckpt_callbacks; print(sorted(m for m in ('keras', 'tensorflow', 'torch', "
        "'ckpt_callbacks.keras') if m in sys.modules))"
    )
    assert out.stdout.strip() == "[]"
