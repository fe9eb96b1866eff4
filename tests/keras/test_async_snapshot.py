"""An async save writes the values of the moment of the save, while training goes on changing them.

On JAX the snapshot keeps the variables' own (immutable) arrays instead of copying them, and the
next training step donates the state it is given: this checks that the arrays kept are still the
ones of the save, on every backend, in a real ``fit``.
"""

from __future__ import annotations

import json

import pytest
from keras_helpers import BACKENDS, HERE, run_python

SCRIPT = r"""
import json, os, sys, keras, numpy as np
import keras_models as models
from ckpt_callbacks import load_checkpoint
from ckpt_callbacks.keras import CheckpointCallback

keras.utils.set_random_seed(5)
x, y = models.data()
model = models.sequential()
seen = {}


class Record(keras.callbacks.Callback):
    # Runs after the checkpoint callback at the same batch end: the values the save was asked for.
    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step % 2 == 0:
            seen[step] = [np.array(keras.ops.convert_to_numpy(v.value)) for v in self.model.trainable_variables]


cb = CheckpointCallback(sys.argv[1], save_every_n_steps=2, async_save=True, max_to_keep=None)
model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[cb, Record()], verbose=0)
paths = [v.path for v in model.trainable_variables]
out = {"steps": sorted(seen), "same": {}, "moved": {}}
for step, values in seen.items():
    stored = load_checkpoint(os.path.join(sys.argv[1], f"ckpt-{step}"))["model"]
    out["same"][step] = all(np.array_equal(np.asarray(stored[p]), v) for p, v in zip(paths, values))
    out["moved"][step] = any(not np.array_equal(v, keras.ops.convert_to_numpy(w.value))
                             for v, w in zip(values, model.trainable_variables))
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_save_holds_the_values_of_the_save_while_training_goes_on(tmp_path, backend):
    proc = run_python(SCRIPT, tmp_path / "ckpt", HERE, backend=backend)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["steps"]) >= 4
    # Training changed the weights after every save but the last ...
    assert sum(out["moved"].values()) >= len(out["steps"]) - 1
    # ... and every checkpoint holds exactly the weights of its own step.
    assert all(out["same"].values()), out["same"]
