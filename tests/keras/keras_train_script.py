"""A tiny deterministic training run for the kill / resume tests (run as a subprocess).

Usage: python train_script.py DIRECTORY OUT.npz TRIGGER [KILL_AT_STEP]
TRIGGER is "steps" (save every 4 steps: mid-epoch checkpoints) or "epoch" (save at epoch ends).
ASYNC_SAVE=1 in the environment turns on async_save. With KILL_AT_STEP, the process SIGKILLs itself after that global step, once (a marker file in
DIRECTORY remembers it), so rerunning the same command resumes instead of dying again.
"""

from __future__ import annotations

import os
import signal
import sys

import keras
import numpy as np

from ckpt_callbacks.keras import CheckpointCallback, ResumableDataset

directory, out, trigger = sys.argv[1], sys.argv[2], sys.argv[3]
kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
spe = int(os.environ.get("STEPS_PER_EXECUTION", "1"))

keras.utils.set_random_seed(1)
rng = np.random.RandomState(0)
x = rng.randn(40, 6).astype("float32")
y = (x @ rng.randn(6, 1)).astype("float32")

model = keras.Sequential(
    [
        keras.Input((6,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(0.25),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(1),
    ]
)
model.compile(keras.optimizers.Adam(1e-2), "mse", steps_per_execution=spe)

async_save = os.environ.get("ASYNC_SAVE") == "1"
if trigger == "steps":
    cb = CheckpointCallback(directory, save_every_n_steps=4, max_to_keep=2, async_save=async_save)
else:
    cb = CheckpointCallback(directory, save_on_epoch_end=True, max_to_keep=2, async_save=async_save)
data = ResumableDataset(x, y, batch_size=8, callback=cb, seed=7)


class Killer(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        marker = os.path.join(directory, "killed")
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if kill_at is not None and step >= kill_at and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


model.fit(data, epochs=4, shuffle=False, callbacks=[cb, Killer()], verbose=0)
np.savez(
    out,
    *[keras.ops.convert_to_numpy(v.value) for v in model.variables],
    *[keras.ops.convert_to_numpy(v.value) for v in model.optimizer.variables],
    resumed=np.array(cb.restored_from or ""),
)
