"""SPEC §8 P16: incremental checkpoints, side by side in one run.

A model whose bytes are 90 % frozen (a backbone of 8 tensors) and 10 % trained (a head of 8 tensors)
is saved every step for 10 steps, each step changing the head in place (an optimizer step). Timed:

- ``full``: ``CheckpointManager(d, incremental=False)``, every save writes every tensor;
- ``incremental``: ``CheckpointManager(d)`` (the default), saves 2-10 write the head only.

Printed: the mean time per save (saves 2-10) of each and their ratio (target ≤ 0.15×), and the bytes
on storage after 10 saves (``max_to_keep=None``) vs the full model + 9 × the trained part (target
≤ 1.2×). On local disk (each save fsync'd) and on a local S3 server (moto, its own process).

Usage::

    .venv/bin/python benchmarks/bench_incremental.py                 # 1 GiB, local disk and S3
    .venv/bin/python benchmarks/bench_incremental.py --size-mib 256 --skip s3

Figures are printed; nothing is asserted (timed assertions do not belong in tests).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_s3  # noqa: E402 - the local S3 server helpers

from ckpt_callbacks import CheckpointManager  # noqa: E402

N_TENSORS = 8
STEPS = 10
FROZEN_FRACTION = 0.9


def _model(size: int) -> dict:
    rng = np.random.default_rng(0)
    frozen = int(size * FROZEN_FRACTION) // N_TENSORS // 4
    trained = (size - frozen * N_TENSORS * 4) // N_TENSORS // 4
    return {
        "backbone": {f"w{i}": rng.standard_normal(frozen, dtype=np.float32) for i in range(N_TENSORS)},
        "head": {f"w{i}": rng.standard_normal(trained, dtype=np.float32) for i in range(N_TENSORS)},
    }


def _run(
    directory: str, storage_options: dict | None, size: int, incremental: bool
) -> tuple[list[float], int]:
    """Per-save seconds of 10 saves, and the bytes on storage after them."""
    state = _model(size)
    times = []
    with CheckpointManager(
        directory, max_to_keep=None, storage_options=storage_options, incremental=incremental
    ) as mgr:
        for step in range(1, STEPS + 1):
            for w in state["head"].values():
                w += 1e-3  # the trained part changes in place
            t0 = time.perf_counter()
            mgr.save(state, step=step)
            times.append(time.perf_counter() - t0)
        stored = _stored_bytes(mgr)
    return times, stored


def _stored_bytes(mgr: CheckpointManager) -> int:
    storage = mgr._storage
    return sum(storage.size(n) or 0 for n in storage.list_names() if not n.startswith("."))


def _row(where: str, size: int, full: tuple, inc: tuple) -> None:
    (t_full, b_full), (t_inc, b_inc) = full, inc
    trained = sum(w.nbytes for w in _model(size)["head"].values())
    model = size
    mean_full, mean_inc = statistics.mean(t_full[1:]), statistics.mean(t_inc[1:])
    budget = model + (STEPS - 1) * trained
    print(
        f"P16 {where:<6} save: full {mean_full * 1e3:8.1f} ms  incremental {mean_inc * 1e3:8.1f} ms  "
        f"ratio {mean_inc / mean_full:5.3f}x (<= 0.15)   first save {t_inc[0] * 1e3:.0f} ms",
        flush=True,
    )
    print(
        f"P16 {where:<6} bytes after {STEPS} saves: full {b_full / 2**20:8.1f} MiB  incremental "
        f"{b_inc / 2**20:8.1f} MiB  vs full + {STEPS - 1} x trained ({budget / 2**20:.1f} MiB): "
        f"{b_inc / budget:5.3f}x (<= 1.2)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--skip", action="append", default=[], choices=["local", "s3"])
    args = parser.parse_args()
    size = args.size_mib << 20
    print(f"P16: {args.size_mib} MiB model, {FROZEN_FRACTION:.0%} frozen, {STEPS} saves", flush=True)
    if "local" not in args.skip:
        scratch = tempfile.mkdtemp(prefix="bench-incr-")
        try:
            full = _run(os.path.join(scratch, "full"), None, size, incremental=False)
            inc = _run(os.path.join(scratch, "inc"), None, size, incremental=True)
            _row("local", size, full, inc)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if "s3" not in args.skip:
        proc, endpoint = bench_s3._start_server()
        try:
            bench_s3._reset_bucket(endpoint)
            options = bench_s3._s3_options(endpoint)
            run = uuid.uuid4().hex[:8]
            full = _run(f"s3://{bench_s3.BUCKET}/full-{run}", options, size, incremental=False)
            bench_s3._reset_bucket(endpoint)
            inc = _run(f"s3://{bench_s3.BUCKET}/inc-{run}", options, size, incremental=True)
            _row("s3", size, full, inc)
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
