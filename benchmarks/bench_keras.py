"""SPEC §8 P2 (Keras): CheckpointCallback's save vs Keras' and TensorFlow's own savers, same model.

Times, on one model + Adam optimizer (the optimizer built, so its slots exist):

  callback            the save CheckpointCallback performs (weights + optimizer + RNG + counters)
  callback_weights    the same with save_optimizer=False (weights only, what save_weights writes)
  save_weights        model.save_weights("x.weights.h5") + fsync           (weights only)
  tf.train.Checkpoint tf.train.Checkpoint(model=..., optimizer=...).write() + fsync of its files
  raw                 one sequential write + fsync of the same bytes as `callback`

and prints the ratios the SPEC targets (callback / baseline, <= 1.05 wanted). Median of --repeats.

Usage: python benchmarks/bench_keras.py [--mib 128] [--repeats 5] [--dir bench_out/keras]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ckpt_callbacks.keras import CheckpointCallback  # noqa: E402


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fsync_path(os.path.join(root, f))
        fsync_path(root)


def build(mib: int) -> keras.Model:
    width = 2048  # one Dense(2048) kernel is 16 MiB of float32
    layers = max(1, mib // 16)
    model = keras.Sequential([keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(layers)])
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.optimizer.build(model.trainable_variables)
    # Non-trivial contents, so nothing compresses or dedups by accident.
    rng = np.random.default_rng(0)
    for v in model.variables + model.optimizer.variables:
        if v.dtype == "float32":
            v.assign(rng.standard_normal(v.shape, dtype=np.float32))
    return model


def changed(model) -> None:
    """Change every float variable (untimed), as a training step does between two saves: the
    callback's incremental saves would otherwise write nothing again."""
    for v in model.variables + model.optimizer.variables:
        if v.dtype == "float32":
            v.assign_add(1.0)


def timed_round_robin(methods: dict, repeats: int, model) -> dict[str, float]:
    """Median seconds per method; methods take turns, so disk-speed drift hits all of them alike."""
    for fn in methods.values():
        changed(model)
        fn(repeats)  # warm-up: first-call allocations and tracing are not what is compared
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(repeats):
        for name, fn in methods.items():
            changed(model)
            t0 = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=128, help="model weight size in MiB (Adam adds 2x for slots)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="bench_out/keras")
    args = ap.parse_args()
    import tensorflow as tf

    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    model = build(args.mib)
    weight_bytes = sum(int(np.prod(v.shape)) * 4 for v in model.weights)
    all_bytes = weight_bytes + sum(int(np.prod(v.shape)) * 4 for v in model.optimizer.variables)
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, tensorflow {tf.__version__}")
    print(
        f"model weights {weight_bytes / 2**20:.0f} MiB, weights + Adam slots {all_bytes / 2**20:.0f} MiB, "
        f"median of {args.repeats}, {os.cpu_count()} CPUs; every variable changes before each save "
        "(as in training), so the callback's saves are full ones"
    )

    def callback_saver(save_optimizer: bool, sub: str):
        cb = CheckpointCallback(
            os.path.join(args.dir, sub), max_to_keep=1, save_optimizer=save_optimizer, resume=False
        )
        cb.set_model(model)
        cb.on_train_begin()
        return lambda i: cb._save(1000 + i, None)

    methods = {"callback": callback_saver(True, "cb"), "callback_weights": callback_saver(False, "cbw")}

    def save_weights(i: int) -> None:
        path = os.path.join(args.dir, f"w{i}.weights.h5")
        model.save_weights(path)
        fsync_path(path)
        os.remove(path)

    methods["save_weights"] = save_weights

    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)

    def tf_write(i: int) -> None:
        d = os.path.join(args.dir, f"tf{i}")
        ckpt.write(os.path.join(d, "ckpt"))
        fsync_tree(d)
        shutil.rmtree(d)

    methods["tf.train.Checkpoint"] = tf_write

    payload = np.random.default_rng(1).integers(0, 255, all_bytes, dtype=np.uint8)

    def raw(i: int) -> None:
        path = os.path.join(args.dir, "raw.bin")
        with open(path, "wb") as f:
            f.write(memoryview(payload))
            f.flush()
            os.fsync(f.fileno())
        os.remove(path)

    methods["raw"] = raw
    results = timed_round_robin(methods, args.repeats, model)

    for name, t in results.items():
        size = all_bytes if name in ("callback", "tf.train.Checkpoint", "raw") else weight_bytes
        print(f"  {name:<22} {t * 1000:8.1f} ms   {size / 2**20 / t:7.0f} MiB/s")
    print("ratios (target <= 1.05):")
    print(
        f"  callback(weights only) / save_weights+fsync        {results['callback_weights'] / results['save_weights']:.2f}x"
    )
    print(
        f"  callback / tf.train.Checkpoint.write+fsync         {results['callback'] / results['tf.train.Checkpoint']:.2f}x"
    )
    print(f"  callback / raw write+fsync of the same bytes       {results['callback'] / results['raw']:.2f}x")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
