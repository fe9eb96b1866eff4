"""SPEC §8 P10 peer: Orbax (``orbax-checkpoint``, CPU ``jax``) on the same numpy pytree, side by side.

A 512 MiB pytree of 16 float32 numpy arrays. Every measurement runs in a fresh process, ours and
Orbax alternating rep by rep; medians reported. Run twice: default allocator settings, and with
glibc keeping freed memory (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>``).

  sync save       CheckpointManager(d).save(tree)  vs  ocp.Checkpointer(StandardCheckpointHandler)
                  .save() + fsync of every file it wrote (ours fsyncs already)
  async blocking  CheckpointManager(d, async_save=True).save() returning  vs
                  ocp.AsyncCheckpointer(StandardCheckpointHandler).save() returning
                  (both then waited for, untimed); first large save of a fresh process
                  (each side first saves a tiny tree, untimed, so backend start-up is excluded)
  restore         cold page cache: load_checkpoint(d) (fresh arrays) and load_checkpoint(d, into=tree)
                  vs Orbax restore with the tree as target (fresh arrays)

Usage:
  python benchmarks/bench_orbax.py [--size-mib 512] [--reps 5] [--dir /mnt/disk/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import bench_core  # noqa: E402 - its page-cache helpers (run as a script, this folder is on sys.path)

MiB = 1 << 20
KEPT_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
N_ARRAYS = 16


def make_tree(size: int):
    import numpy as np

    n = size // N_ARRAYS // 4
    block = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    tree = {}
    for i in range(N_ARRAYS):
        a = np.empty(n, np.float32)
        for j in range(0, n, len(block)):
            m = min(len(block), n - j)
            a[j : j + m] = block[:m] * (i + 1)
        tree[f"layer{i:02d}"] = {"kernel": a.reshape(-1, 1024)}
    return tree


def files_under(d: str) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]


def fsync_tree(d: str) -> None:
    for p in [*files_under(d), *[r for r, _, _ in os.walk(d)]]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def drop_cache(d: str) -> None:
    bench_core.drop_cache_tree(d)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass


def worker(case: str, d: str, size: int) -> None:
    tree = make_tree(size)
    out = os.path.join(d, case)
    if case.startswith("orbax"):
        import orbax.checkpoint as ocp

        handler = ocp.StandardCheckpointHandler()
    from ckpt_callbacks import CheckpointManager, load_checkpoint, save_checkpoint

    # First-call costs (JAX backend start, TensorStore, thread pools; our imports) stay out of the
    # timings: each side saves a tiny tree once before its measured call.
    tiny = {"w": {"kernel": tree["layer00"]["kernel"][:2].copy()}}
    warm = os.path.join(d, f"warm-{case}")
    if case.startswith("orbax"):
        ocp.Checkpointer(handler).save(os.path.join(warm, "0"), args=ocp.args.StandardSave(tiny))
        if case == "orbax_async":
            w = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
            w.save(os.path.join(warm, "1"), args=ocp.args.StandardSave(tiny))
            w.wait_until_finished()
            w.close()
    else:
        save_checkpoint(os.path.join(warm, "ckpt-0"), tiny)
    shutil.rmtree(warm, ignore_errors=True)

    if case == "ours_sync":
        mgr = CheckpointManager(out, max_to_keep=None)
        t0 = time.perf_counter()
        mgr.save(tree, step=1)
        s = time.perf_counter() - t0
        mgr.close()
    elif case == "orbax_sync":
        ck = ocp.Checkpointer(handler)
        t0 = time.perf_counter()
        ck.save(os.path.join(out, "1"), args=ocp.args.StandardSave(tree))
        fsync_tree(out)
        s = time.perf_counter() - t0
    elif case == "ours_async":
        mgr = CheckpointManager(out, max_to_keep=None, async_save=True)
        t0 = time.perf_counter()
        mgr.save(tree, step=1)
        s = time.perf_counter() - t0
        mgr.close()
    elif case == "orbax_async":
        ck = ocp.AsyncCheckpointer(handler)
        t0 = time.perf_counter()
        ck.save(os.path.join(out, "1"), args=ocp.args.StandardSave(tree))
        s = time.perf_counter() - t0
        ck.wait_until_finished()
        ck.close()
    elif case in ("ours_restore", "ours_restore_into"):
        src = os.path.join(d, "ours_sync")
        drop_cache(src)
        t0 = time.perf_counter()
        got = load_checkpoint(src, into=tree if case == "ours_restore_into" else None)
        s = time.perf_counter() - t0
        assert got["layer00"]["kernel"].shape == tree["layer00"]["kernel"].shape
    elif case == "orbax_restore":
        src = os.path.join(d, "orbax_sync", "1")
        drop_cache(src)
        ck = ocp.Checkpointer(handler)
        t0 = time.perf_counter()
        got = ck.restore(src, args=ocp.args.StandardRestore(tree))
        s = time.perf_counter() - t0
        assert got["layer00"]["kernel"].shape == tree["layer00"]["kernel"].shape
    else:
        raise ValueError(case)
    if case in ("ours_async", "orbax_async"):
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"s": s}))


def run_case(case: str, d: str, size: int, env: dict) -> float:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_worker", case, d, str(size)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["s"]


PAIRS = [
    ("sync save (+ fsync)", "ours_sync", "orbax_sync"),
    ("async save: blocking time", "ours_async", "orbax_async"),
    ("restore, cold cache (fresh arrays)", "ours_restore", "orbax_restore"),
    ("restore, cold cache (ours in place)", "ours_restore_into", "orbax_restore"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--modes", default="default,kept")
    ap.add_argument("--_worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        worker(args._worker[0], args._worker[1], int(args._worker[2]))
        return
    size = args.size_mib * MiB
    import orbax.checkpoint as ocp

    print(
        f"bench_orbax: {args.size_mib} MiB numpy pytree ({N_ARRAYS} arrays), orbax-checkpoint "
        f"{getattr(ocp, '__version__', '?')}, {args.reps} reps, {os.cpu_count()} CPUs, fresh process each",
        flush=True,
    )
    rows = []
    for mode in args.modes.split(","):
        env = KEPT_ENV if mode == "kept" else {}
        times: dict[str, list[float]] = {}
        for rep in range(args.reps):
            d = tempfile.mkdtemp(prefix="bench_orbax-", dir=args.dir)
            try:
                # Saves first (the restores read what they wrote), ours and Orbax alternating first place.
                for group in (("ours_sync", "orbax_sync"), ("ours_async", "orbax_async")):
                    for case in group if rep % 2 == 0 else group[::-1]:
                        times.setdefault(case, []).append(run_case(case, d, size, env))
                os.sync()
                group = ("ours_restore", "orbax_restore", "ours_restore_into")
                for case in group if rep % 2 == 0 else group[::-1]:
                    times.setdefault(case, []).append(run_case(case, d, size, env))
            finally:
                shutil.rmtree(d, ignore_errors=True)
        med = {c: statistics.median(v) for c, v in times.items()}
        print(f"  [{mode}] medians: " + ", ".join(f"{c} {v:.3f}s" for c, v in med.items()), flush=True)
        rows += [(mode, what, med[a], med[b], med[a] / med[b]) for what, a, b in PAIRS]
    print("\nSummary (ours / Orbax, medians; target <= 1.0)")
    for mode, what, a, b, ratio in rows:
        print(
            f"  {mode:<8} {what:<40} ours {a:7.3f}s  orbax {b:7.3f}s  {ratio:5.2f}  "
            f"{'met' if ratio <= 1.0 else 'GAP'}"
        )


if __name__ == "__main__":
    main()
