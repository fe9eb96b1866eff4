"""Keras ``model.fit`` checkpointing to an object store, for the SIGKILL / resume tests (a subprocess).

Usage: python e2e_keras_script.py DIRECTORY_URL OUT.npz [BLOCK_AT_STEP]
``CKPT_STORAGE_OPTIONS`` (JSON) holds the storage options; KERAS_BACKEND picks the backend. With
BLOCK_AT_STEP the run prints ``READY <step>`` after that global step and blocks until the parent
SIGKILLs it. Saves every 4 steps (mid-epoch); ResumableDataset makes mid-epoch resume exact.
"""

from __future__ import annotations

import json
import os
import sys
import time

import keras
import numpy as np

from ckpt_callbacks.keras import CheckpointCallback, ResumableDataset

directory, out = sys.argv[1], sys.argv[2]
block_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
storage_options = json.loads(os.environ["CKPT_STORAGE_OPTIONS"])

keras.utils.set_random_seed(1)
rng = np.random.RandomState(0)
x = rng.randn(40, 6).astype("float32")
y = (x @ rng.randn(6, 1)).astype("float32")
model = keras.Sequential(
    [
        keras.Input((6,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(0.25),
        keras.layers.Dense(1),
    ]
)
model.compile(keras.optimizers.Adam(1e-2), "mse")
cb = CheckpointCallback(directory, save_every_n_steps=4, max_to_keep=2, storage_options=storage_options)
data = ResumableDataset(x, y, batch_size=8, callback=cb, seed=7)


class BlockAt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if block_at is not None and step == block_at:
            print(f"READY {step}", flush=True)
            time.sleep(600)


model.fit(data, epochs=3, shuffle=False, callbacks=[cb, BlockAt()], verbose=0)
np.savez(
    out,
    *[keras.ops.convert_to_numpy(v.value) for v in model.variables],
    *[keras.ops.convert_to_numpy(v.value) for v in model.optimizer.variables],
    resumed=np.array(cb.restored_from or ""),
)
