"""Checkpoints move between Keras backends: saved under one, restored / rebuilt / resumed under another.

One process saves per backend, one process loads per backend (all three sources each): six fresh
processes check nine (source, target) pairs, optimizer included.
"""

from __future__ import annotations

import json

import pytest
from keras_helpers import BACKENDS, HERE, backend_available, run_python

SAVE = r"""
import os, sys, keras, numpy as np
import keras_models as models
from ckpt_callbacks.keras import CheckpointCallback
keras.utils.set_random_seed(3)
x, y = models.data()
model = models.sequential()
cb = CheckpointCallback(sys.argv[1], save_on_epoch_end=True)
model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[cb], verbose=0)
np.savez(os.path.join(sys.argv[1], "expected.npz"),
         *[keras.ops.convert_to_numpy(v.value) for v in model.variables + model.optimizer.variables])
"""

LOAD = r"""
import json, os, shutil, sys, keras, numpy as np
import keras_models as models
from ckpt_callbacks.keras import CheckpointCallback, load_model, restore
x, y = models.data()
out = {}
for source in sys.argv[3].split(","):
    directory = os.path.join(sys.argv[1], source)
    expected = np.load(os.path.join(directory, "expected.npz"))
    expected = [expected[f"arr_{i}"] for i in range(len(expected.files))]

    def same(model):
        got = [keras.ops.convert_to_numpy(v.value) for v in model.variables + model.optimizer.variables]
        # Counters are int64 on TensorFlow and int32 elsewhere: compare values; floats bit for bit.
        return len(got) == len(expected) and all(
            np.array_equal(g, e) and (g.dtype == e.dtype or g.dtype.kind in "iu") for g, e in zip(got, expected)
        )

    loaded = load_model(directory)  # rebuilt from the .meta description, optimizer included
    live = models.sequential()
    restore(live, directory)  # into a model built in code
    # The callback resumes the other backend's run (a copy: the source stays as saved) and trains on.
    copy = os.path.join(sys.argv[1], f"{source}-resumed-on-{keras.backend.backend()}")
    shutil.copytree(directory, copy)
    resumed = models.sequential()
    cb = CheckpointCallback(copy, save_on_epoch_end=True)
    h = resumed.fit(x, y, batch_size=8, epochs=3, shuffle=False, callbacks=[cb], verbose=0)
    out[source] = {
        "load_model": same(loaded),
        "optimizer": type(loaded.optimizer).__name__,
        "iterations": int(keras.ops.convert_to_numpy(loaded.optimizer.iterations.value)),
        "restore": same(live),
        "resumed": os.path.basename(cb.restored_from or ""),
        "trains_on": h.epoch == [2] and bool(np.isfinite(h.history["loss"][-1]))
        and int(keras.ops.convert_to_numpy(resumed.optimizer.iterations.value)) == 15,
    }
print(json.dumps(out))
"""

AVAILABLE = [b for b in BACKENDS if backend_available(b)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    for backend in AVAILABLE:
        run_python(SAVE, root / backend, HERE, backend=backend)
    return root


@pytest.mark.parametrize("target", BACKENDS)
def test_checkpoint_saved_on_any_backend_loads_on_this_one(saved, target):
    out = run_python(LOAD, saved, HERE, ",".join(AVAILABLE), backend=target)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for source in AVAILABLE:
        assert got[source] == {
            "load_model": True,
            "optimizer": "Adam",
            "iterations": 10,
            "restore": True,
            "resumed": "ckpt-10",
            "trains_on": True,
        }, (source, target, got[source])
