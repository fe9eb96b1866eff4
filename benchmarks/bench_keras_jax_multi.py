"""SPEC §8 P14 / P15: Keras on JAX past one device, CheckpointCallback vs ``keras.callbacks.OrbaxCheckpoint``.

Two jobs, each a fresh launch, same model (Dense(2048) layers, Adam built by one training step):

  2 processes   ``jax.distributed`` on 127.0.0.1 (gloo CPU collectives), 2 CPU devices per process,
                ``ModelParallel`` with the kernels split over a "model" axis that spans both processes
  1 process     4 CPU devices, the same ``ModelParallel`` layout (P15 only; timings shown for information)

In each job every process times, alternating ours and Orbax rep by rep (one untimed warm-up each):

  ours sync      CheckpointCallback save (its commit fsyncs data, index, state file, directory)
  orbax sync     OrbaxCheckpoint(save_on_background=False) save + fsync of every file in its directory
  ours async     the time the training thread is blocked by a CheckpointCallback(async_save=True) save
  orbax async    the time it is blocked by an OrbaxCheckpoint(save_on_background=True) save
  ours restore   ckpt_callbacks.keras.restore(model, directory) (weights + optimizer, every process)
  orbax restore  model.load_weights(orbax_directory)

Every save follows an untimed training step (``train_on_batch``), so every tensor changed and our
incremental saves write everything, as Orbax does. A timing spans a barrier before and after, so it is
the slowest process's. P15: the peak resident memory above the level before the save (sampled every
millisecond on a thread) of each process during our sync save, against 64 MiB + its largest local
shard. Restores read files just written (warm page cache) for both. Medians; ratios ours / theirs.

Usage: python benchmarks/bench_keras_jax_multi.py [--state-mib 512] [--repeats 3] [--dir D]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_distributed import PeakRSS  # noqa: E402 - this folder is on sys.path when run as a script
from bench_keras_jax import fsync_tree  # noqa: E402

MiB = 2**20
WIDTH = 2048  # a Dense(2048) kernel is 16 MiB of float32; with Adam's two slots, 48 MiB of state


def setup(processes: int):
    import jax
    import numpy as np

    if processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["COORDINATOR"],
            num_processes=processes,
            process_id=int(os.environ["PROCESS_ID"]),
            coordinator_bind_address=os.environ["COORDINATOR"],
        )
    from keras import distribution as kd

    devices = jax.devices()
    # (batch, model) with the model axis across processes: [p0d0, p0d1, p1d0, p1d1] -> columns
    grid = np.array(devices).reshape(processes, -1).T if processes > 1 else np.array(devices)
    mesh = kd.DeviceMesh((2, len(devices) // 2), ("batch", "model"), devices=grid.reshape(2, -1))
    layouts = kd.LayoutMap(mesh)
    layouts[".*dense.*kernel"] = (None, "model")
    layouts[".*dense.*bias"] = ("model",)
    kd.set_distribution(
        kd.ModelParallel(layout_map=layouts, batch_dim_name="batch", auto_shard_dataset=False)
    )


def barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def worker(processes: int, state_mib: int, repeats: int, directory: str) -> dict:
    setup(processes)
    import jax
    import keras
    import numpy as np

    from ckpt_callbacks.keras import CheckpointCallback, restore

    keras.utils.set_random_seed(0)
    layers = max(1, round(state_mib / 48))
    model = keras.Sequential([keras.Input((WIDTH,))] + [keras.layers.Dense(WIDTH) for _ in range(layers)])
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, WIDTH), dtype=np.float32)

    def step() -> None:  # a training step changes every weight and slot, as between two saves in training
        model.train_on_batch(x, x)
        jax.block_until_ready([v.value for v in model.variables + model.optimizer.variables])

    step()
    variables = model.variables + model.optimizer.variables
    state = sum(v.value.size * v.value.dtype.itemsize for v in variables)
    largest = max(s.data.nbytes for v in variables for s in v.value.addressable_shards)
    local = sum(s.data.nbytes for v in variables for s in v.value.addressable_shards if s.replica_id == 0)
    me = jax.process_index()
    res: dict = {"state": state, "largest": largest, "local": local, "process": me}

    def timed(key: str, fn, before=step, after=None) -> None:
        before()
        barrier(key + "-start")
        t0 = time.perf_counter()
        fn()
        barrier(key + "-end")
        res.setdefault(key, []).append(time.perf_counter() - t0)
        if after is not None:
            after()

    def ours_cb(sub: str, async_save: bool):
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

    def orbax_cb(sub: str, background: bool):
        cb = keras.callbacks.OrbaxCheckpoint(
            os.path.join(directory, sub), max_to_keep=1, save_on_background=background
        )
        cb.set_model(model)
        return cb

    ours, ours_a = ours_cb("ours", False), ours_cb("ours_async", True)
    orbax, orbax_a = orbax_cb("orbax", False), orbax_cb("orbax_async", True)
    peaks: list[int] = []

    def ours_save(i: int) -> None:
        with PeakRSS() as peak:
            ours._save(1000 + i, None)
        peaks.append(peak.extra)

    def orbax_save(i: int) -> None:
        orbax._save_checkpoint(step=1000 + i)
        fsync_tree(os.path.join(directory, "orbax"))

    for i in range(repeats + 1):  # rep 0 is the warm-up (dropped below)
        first = ("ours", "orbax") if i % 2 == 0 else ("orbax", "ours")
        for who in first:
            if who == "ours":
                timed("ours sync", lambda: ours_save(i))
                timed(
                    "ours async",
                    lambda: ours_a._save(1000 + i, None),
                    after=ours_a.manager.wait_until_finished,
                )
            else:
                timed("orbax sync", lambda: orbax_save(i))
                timed(
                    "orbax async",
                    lambda: orbax_a._save_checkpoint(step=1000 + i),
                    after=orbax_a.wait_until_finished,
                )
    ours_a.on_train_end()
    orbax_a.wait_until_finished()
    for i in range(repeats + 1):
        for who in ("ours", "orbax") if i % 2 == 0 else ("orbax", "ours"):
            if who == "ours":
                timed(
                    "ours restore",
                    lambda: restore(model, os.path.join(directory, "ours")),
                    before=lambda: None,
                )
            else:
                timed(
                    "orbax restore",
                    lambda: model.load_weights(os.path.join(directory, "orbax")),
                    before=lambda: None,
                )
    ours.on_train_end()
    for cb in (orbax, orbax_a):
        cb.checkpointer.close()
    for k in [k for k in res if isinstance(res[k], list)]:
        res[k] = res[k][1:]
    res["peak"] = peaks[1:] or peaks
    res["peak first"] = peaks[0]
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, devices: int, args) -> list[dict]:
    d = os.path.join(os.path.abspath(args.dir), f"job-{processes}")  # Orbax takes absolute paths only
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(HERE, ".."), env.get("PYTHONPATH", "")])
    env["COORDINATOR"] = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, __file__, "--worker", str(processes), "--state-mib", str(args.state_mib)]
    cmd += ["--repeats", str(args.repeats), "--dir", d]
    procs = [
        subprocess.Popen(
            cmd, env={**env, "PROCESS_ID": str(p)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for p in range(processes)
    ]
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=args.timeout)
            if p.returncode:
                sys.exit(f"worker failed ({p.returncode}):\n{e.decode()[-4000:]}")
            out.append(json.loads(o.decode().strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(d, ignore_errors=True)
    return out


def report(title: str, results: list[dict], timings: bool) -> None:
    r0 = results[0]
    med = {k: statistics.median(v) for k, v in r0.items() if isinstance(v, list) and k != "peak"}
    print(
        f"{title}: state {r0['state'] / MiB:.0f} MiB (weights + Adam slots); per process "
        f"{r0['local'] / MiB:.0f} MiB of own shards, largest local shard {r0['largest'] / MiB:.0f} MiB"
    )
    for k, t in med.items():
        print(f"  {k:<14} {t * 1000:9.1f} ms  {r0['state'] / MiB / t:8.0f} MiB/s (whole state)")
    if timings:
        print("  ratios, ours / theirs (SPEC P14 targets <= 1.0):")
        for a, b in (
            ("ours sync", "orbax sync"),
            ("ours restore", "orbax restore"),
            ("ours async", "orbax async"),
        ):
            print(f"    {a:<13} / {b:<14} {med[a] / med[b]:.2f}x")
    for r in results:
        limit = 64 * MiB + r["largest"]
        peak = max([r["peak first"], *r["peak"]])
        print(
            f"  P15 process {r['process']}: peak extra RSS during our sync save {peak / MiB:.1f} MiB "
            f"(first save {r['peak first'] / MiB:.1f}) vs 64 MiB + largest local shard = {limit / MiB:.0f} MiB "
            f"-> {peak / limit:.2f} (target <= 1.0)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-mib", type=int, default=512, help="weights + Adam slots, in MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="bench_out/keras_jax_multi")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--skip-single", action="store_true", help="only the 2-process job")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.state_mib, args.repeats, args.dir)))
        return
    import jax
    import keras

    print(
        f"keras {keras.__version__}, jax {jax.__version__} (CPU), {os.cpu_count()} CPUs; medians of "
        f"{args.repeats}; every save follows a training step (full saves on both sides)"
    )
    t0 = time.perf_counter()
    report("P14/P15 2 processes x 2 devices, ModelParallel across them", launch(2, 2, args), True)
    if not args.skip_single:
        report("P15 1 process x 4 devices, ModelParallel (timings for information)", launch(1, 4, args), True)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
