"""A tiny deterministic JAX training run under ``keras.distribution`` (run as a subprocess).

Usage: python keras_jax_sharded_script.py DIRECTORY OUT.npz LAYOUT [KILL_AT_STEP]
LAYOUT: "model" (ModelParallel: kernels split over the "model" axis of a (2, D/2) mesh; on 2
processes that axis spans both), "data" (DataParallel) or "none" (one device). The number of devices
per process comes from XLA_FLAGS; NUM_PROCESSES / PROCESS_ID / COORDINATOR make it one process of a
``jax.distributed`` job (gloo CPU collectives; OUT.npz gets the process id appended). ASYNC_SAVE=1 turns
on async_save; FREEZE=1 freezes the first layer (SGD); CALLBACK_ONLY_ON=P runs the callback on process P alone. CRASH_AT="P:N:POINT[:raise]" SIGKILLs process P (or raises OSError there) at crash point POINT of its
N-th save. With KILL_AT_STEP the process SIGKILLs itself after that global step, once (a marker
file in DIRECTORY remembers it), so rerunning the same command resumes. OUT.npz gets every model and
optimizer variable, the checkpoint resumed from, each variable's sharding spec and whether any
variable holds a cached host copy after training.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
import keras
import numpy as np
from keras import distribution as kd

from ckpt_callbacks.keras import CheckpointCallback, ResumableDataset

directory, out, layout = sys.argv[1], sys.argv[2], sys.argv[3]
kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
processes = int(os.environ.get("NUM_PROCESSES", "1"))
if processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["COORDINATOR"],
        num_processes=processes,
        process_id=int(os.environ["PROCESS_ID"]),
        coordinator_bind_address=os.environ["COORDINATOR"],
        heartbeat_timeout_seconds=10,
        shutdown_timeout_seconds=10,
    )
    from ckpt_callbacks.keras import _jax_processes

    _jax_processes.BARRIER_TIMEOUT_S = 30.0
    out = out.removesuffix(".npz") + f".{jax.process_index()}.npz"

devices = jax.devices()
if layout == "model":
    # (batch, model) with the model axis across processes: devices [p0d0, p0d1, p1d0, p1d1] -> columns
    grid = np.array(devices).reshape(processes, -1).T if processes > 1 else np.array(devices)
    mesh = kd.DeviceMesh((2, len(devices) // 2), ("batch", "model"), devices=grid.reshape(2, -1))
    layouts = kd.LayoutMap(mesh)
    layouts[".*dense.*kernel"] = (None, "model")
    layouts[".*dense.*bias"] = ("model",)
    kd.set_distribution(
        kd.ModelParallel(layout_map=layouts, batch_dim_name="batch", auto_shard_dataset=False)
    )
elif layout == "data":
    kd.set_distribution(kd.DataParallel(devices=devices, auto_shard_dataset=False))

keras.utils.set_random_seed(1)
rng = np.random.RandomState(0)
x = rng.randn(40, 6).astype("float32")
y = (x @ rng.randn(6, 2)).astype("float32")
model = keras.Sequential(
    [
        keras.Input((6,)),
        # FREEZE: a wide frozen layer, most of each process's bytes (beside its RNG states)
        keras.layers.Dense(
            2048 if os.environ.get("FREEZE") == "1" else 16, activation="relu", name="dense_in"
        ),
        keras.layers.Dropout(0.25),
        keras.layers.Dense(2, name="dense_out"),
    ]
)
optimizer = keras.optimizers.Adam(1e-2)
if os.environ.get("FREEZE") == "1":  # a frozen first layer: its pieces never change
    model.get_layer("dense_in").trainable = False
    optimizer = keras.optimizers.SGD(1e-2)
model.compile(optimizer, "mse")
cb = CheckpointCallback(
    directory, save_every_n_steps=4, max_to_keep=2, async_save=os.environ.get("ASYNC_SAVE") == "1"
)
# CALLBACK_ONLY_ON=P: only process P runs the callback (a mistake the callback must name).
only_on = os.environ.get("CALLBACK_ONLY_ON")
if only_on is not None:
    _jax_processes.ROLL_CALL_TIMEOUT_S = 5.0
    if int(only_on) != jax.process_index():
        cb = None
data = ResumableDataset(x, y, batch_size=8, callback=cb, seed=7) if cb is not None else (x, y)


if os.environ.get("CRASH_AT"):  # "PROCESS:SAVE:POINT": that process dies at that point of its n-th save
    from ckpt_callbacks._checkpoint import _checkpoint_io

    who, nth, point, how = (os.environ["CRASH_AT"] + ":kill").split(":")[:4]
    seen = []

    def crash(name):
        if name == "before_data":
            seen.append(1)
        if name == point and len(seen) == int(nth) and jax.process_index() == int(who):
            if how == "raise":
                raise OSError("injected write failure")
            os.kill(os.getpid(), signal.SIGKILL)

    _checkpoint_io._crash_point = crash


class Killer(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        marker = os.path.join(directory, f"killed-{jax.process_index()}")
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if kill_at is not None and step >= kill_at and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


inputs = {"x": data} if cb is not None else {"x": data[0], "y": data[1], "batch_size": 8}
model.fit(
    **inputs, epochs=4, shuffle=False, callbacks=[c for c in (cb, Killer()) if c is not None], verbose=0
)
cb.manager.wait_until_finished()
variables = list(model.variables) + list(model.optimizer.variables)
cached = any(getattr(v.value, "_npy_value", None) is not None for v in variables)
if processes > 1:
    from jax.experimental import multihost_utils

    values = [np.asarray(multihost_utils.process_allgather(v.value, tiled=True)) for v in variables]
else:
    values = [np.asarray(jax.device_get(v.value)) for v in variables]
np.savez(
    out,
    *values,
    resumed=np.array(cb.restored_from or ""),
    specs=np.array([str(getattr(v.value.sharding, "spec", "")) for v in variables]),
    cached=np.array(cached),
)
