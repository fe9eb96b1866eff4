"""SPEC §8 P10: Keras on JAX, CheckpointCallback vs ``keras.callbacks.OrbaxCheckpoint``, same model.

One model (Dense(2048) layers) with a built Adam optimizer, so a save writes weights + 2 slots each.
Fresh processes, alternating: each worker builds the model, does one untimed warm-up of every
operation, then times ``--repeats`` of each, and reports medians:

  ours sync          CheckpointCallback save (its commit fsyncs data, index, state file, directory)
  orbax sync         OrbaxCheckpoint(save_on_background=False) save + fsync of every file it wrote
  ours async         the time fit is blocked by a CheckpointCallback(async_save=True) save
  orbax async        the time fit is blocked by an OrbaxCheckpoint(save_on_background=True) save
  save_weights       model.save_weights("x.weights.h5") + fsync (weights only: no optimizer)
  ours restore       ckpt_callbacks.keras.restore(model, directory) (weights + optimizer)
  orbax restore      model.load_weights(orbax_directory)

Every timed save (ours and Orbax alike) follows an untimed change of every float variable, as a
training step makes: ours would otherwise save incrementally (unchanged tensors are not written again)
while Orbax writes everything. Restores read files just written (warm page cache) for both. Ratios are ours / theirs (SPEC target
<= 1.0). Usage: python benchmarks/bench_keras_jax.py [--mib 128] [--rounds 2] [--repeats 3] [--dir D]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def build(mib: int):
    import keras
    import numpy as np

    width = 2048  # one Dense(2048) kernel is 16 MiB of float32
    model = keras.Sequential(
        [keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(max(1, mib // 16))]
    )
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    for v in model.variables + model.optimizer.variables:
        if v.dtype == "float32":  # non-trivial contents: nothing compresses or dedups by accident
            v.assign(rng.standard_normal(v.shape, dtype=np.float32))
    return model


def changed(model) -> None:
    """Change every float variable (untimed), as a training step does between two saves."""
    import jax

    for v in model.variables + model.optimizer.variables:
        if v.dtype == "float32":
            v.assign_add(1.0)
    jax.block_until_ready([v.value for v in model.variables + model.optimizer.variables])


def timed(fn, repeats: int, after=None, before=None) -> list[float]:
    out = []
    for i in range(repeats + 1):  # the first is the warm-up
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn(i)
        dt = time.perf_counter() - t0
        if after is not None:
            after()
        if i:
            out.append(dt)
    return out


def worker(kind: str, mib: int, repeats: int, directory: str) -> dict:
    import keras

    model = build(mib)
    nbytes = sum(v.numpy().nbytes for v in model.variables + model.optimizer.variables)
    res: dict = {"bytes": nbytes}
    if kind == "ours":
        from ckpt_callbacks.keras import CheckpointCallback, restore

        def saver(sub: str, async_save: bool):
            cb = CheckpointCallback(
                os.path.join(directory, sub),
                max_to_keep=1,
                resume=False,
                async_save=async_save,
                save_on_epoch_end=True,
            )
            cb.set_model(model)
            cb.on_train_begin()
            return cb

        cb = saver("sync", False)
        res["ours sync"] = timed(lambda i: cb._save(1000 + i, None), repeats, before=lambda: changed(model))
        cba = saver("async", True)
        res["ours async"] = timed(
            lambda i: cba._save(1000 + i, None),
            repeats,
            cba.manager.wait_until_finished,
            lambda: changed(model),
        )
        cba.on_train_end()
        res["ours restore"] = timed(lambda i: restore(model, os.path.join(directory, "sync")), repeats)
        cb.on_train_end()
    elif kind == "orbax":

        def saver(sub: str, background: bool):
            cb = keras.callbacks.OrbaxCheckpoint(
                os.path.join(directory, sub), max_to_keep=1, save_on_background=background
            )
            cb.set_model(model)
            return cb

        cb = saver("sync", False)

        def sync_save(i: int) -> None:
            cb._save_checkpoint(step=1000 + i)
            fsync_tree(os.path.join(directory, "sync"))

        res["orbax sync"] = timed(sync_save, repeats, before=lambda: changed(model))
        cba = saver("async", True)
        res["orbax async"] = timed(
            lambda i: cba._save_checkpoint(step=1000 + i),
            repeats,
            cba.wait_until_finished,
            lambda: changed(model),
        )
        cba.checkpointer.close()
        cb.checkpointer.close()
        res["orbax restore"] = timed(lambda i: model.load_weights(os.path.join(directory, "sync")), repeats)
    else:

        def save_weights(i: int) -> None:
            path = os.path.join(directory, f"w{i}.weights.h5")
            model.save_weights(path)
            fsync_tree(directory)
            os.remove(path)

        res["save_weights"] = timed(save_weights, repeats, before=lambda: changed(model))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=128, help="model weights in MiB; Adam's slots add 2x")
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per saver, alternating")
    ap.add_argument("--repeats", type=int, default=3, help="timed operations per process")
    ap.add_argument("--dir", default="bench_out/keras_jax")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.mib, args.repeats, args.dir)))
        return
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(HERE, ".."), env.get("PYTHONPATH", "")])
    times: dict[str, list[float]] = {}
    nbytes = 0
    for r in range(args.rounds):
        for kind in ("ours", "orbax", "save_weights") if r % 2 == 0 else ("orbax", "ours", "save_weights"):
            d = os.path.join(args.dir, f"{kind}-{r}")
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                kind,
                "--mib",
                str(args.mib),
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run([*cmd, "--dir", d], env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"worker {kind} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            nbytes = res.pop("bytes")
            for k, v in res.items():
                times.setdefault(k, []).extend(v)
            shutil.rmtree(d, ignore_errors=True)
    import jax
    import keras

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"keras {keras.__version__}, jax {jax.__version__} (CPU), {os.cpu_count()} CPUs")
    print(
        f"variables (weights + Adam slots): {nbytes / 2**20:.0f} MiB; medians of {args.rounds} x {args.repeats}"
    )
    for k, t in med.items():
        print(f"  {k:<15} {t * 1000:9.1f} ms  {nbytes / 2**20 / t:8.0f} MiB/s")
    print("every save follows a change of every variable (as in training): full saves on both sides")
    print("ratios, ours / theirs (SPEC P10 target <= 1.0):")
    for a, b in (
        ("ours sync", "orbax sync"),
        ("ours async", "orbax async"),
        ("ours restore", "orbax restore"),
    ):
        print(f"  {a:<13} / {b:<14} {med[a] / med[b]:.2f}x")
    print(
        f"  ours sync     / save_weights   {med['ours sync'] / med['save_weights']:.2f}x (save_weights: no optimizer)"
    )


if __name__ == "__main__":
    main()
