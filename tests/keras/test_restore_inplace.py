"""restore() and resume on the PyTorch backend read each variable's bytes into its own tensor (SPEC §2.1);
TensorFlow and JAX keep loading and assigning. One fresh process per backend."""

from __future__ import annotations

import json

import pytest
from keras_helpers import BACKENDS, HERE, run_python

SCRIPT = r"""
import json, os, sys, keras, numpy as np
import keras_models as models
from ckpt_callbacks import load_checkpoint
from ckpt_callbacks._api._resolve import read_index
from ckpt_callbacks.keras import CheckpointCallback, restore
from ckpt_callbacks.keras import _inplace

directory = sys.argv[1]
keras.utils.set_random_seed(3)
x, y = models.data()
trained = models.sequential()
trained.fit(x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[CheckpointCallback(directory)], verbose=0)
path = os.path.join(directory, "ckpt-10")
saved = load_checkpoint(path)
expected = [keras.ops.convert_to_numpy(v.value) for v in trained.variables + trained.optimizer.variables]

def state(model):
    return [keras.ops.convert_to_numpy(v.value) for v in model.variables + model.optimizer.variables]

def ptrs(model):
    return [v.value.data_ptr() for v in model.variables + model.optimizer.variables]

out = {}
fresh = models.sequential()
fresh.optimizer.build(fresh.trainable_variables)
into = _inplace.variables_into(fresh, read_index(path))
out["into_count"] = None if into is None else sum(len(group) for group in into.values())
out["variable_count"] = len(fresh.variables) + len(fresh.optimizer.variables)
before = ptrs(fresh) if keras.backend.backend() == "torch" else None
restore(fresh, path)
out["restore_exact"] = all(np.array_equal(a, b) for a, b in zip(state(fresh), expected))
out["restore_same_memory"] = before is None or ptrs(fresh) == before

# Resume through the callback: in place too, and bit-exact with the checkpoint at train begin.
class Probe(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        out["resume_exact"] = all(np.array_equal(a, b) for a, b in zip(state(self.model), expected))
        out["resume_same_memory"] = before2 is None or ptrs(self.model) == before2

resumed = models.sequential()
resumed.optimizer.build(resumed.trainable_variables)
before2 = ptrs(resumed) if keras.backend.backend() == "torch" else None
resumed.fit(x, y, batch_size=4, epochs=2, shuffle=False,
            callbacks=[CheckpointCallback(directory), Probe()], verbose=0)
print("RESULT" + json.dumps(out))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_in_place_on_torch_and_unchanged_elsewhere(backend, tmp_path):
    proc = run_python(SCRIPT, tmp_path, HERE, backend=backend)
    out = json.loads(proc.stdout.rsplit("RESULT", 1)[1])
    if backend == "torch":
        assert out["into_count"] == out["variable_count"]  # every variable is a destination
    else:
        assert out["into_count"] is None  # not writable host memory: loaded and assigned as before
    assert out["restore_exact"] and out["restore_same_memory"]
    assert out["resume_exact"] and out["resume_same_memory"]
