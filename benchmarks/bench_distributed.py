"""Sharded saves (SPEC §2.5) with 2 ranks on gloo, same state, same run, alternating rep by rep.

  D1  save time of ckpt_callbacks.distributed.StorageWriter vs DCP's own FileSystemWriter
      (target <= 1.2x)
  D2  the same vs gathering a full state dict to rank 0 (get_state_dict(full_state_dict=True,
      cpu_offload=True)) and saving it there with save_checkpoint (target <= 0.5x)
  D3  peak extra RSS of rank 0 during our sharded save (/proc/self/statm sampled every millisecond)
      vs 64 MiB + the largest local tensor
  D4  async_save=True: how long ckpt_callbacks.distributed.save blocks the training thread vs the
      bare staging copy (each rank copying its local shards into preallocated CPU tensors)
      (target <= 1.5x); the write itself is waited for outside the timing; three pairs per rep;
      full saves (incremental=False): the state does not change between these saves

The state is an FSDP2 (fully_shard) MLP and its Adam state: about --mb MiB of parameters, three
times that with the optimizer. Every save writes a new checkpoint on the same local disk (fsync'd
by all three writers). Medians of --reps reps; rank 0 prints the figures.

Usage:
  python benchmarks/bench_distributed.py               # 128 MiB of parameters, 5 reps
  python benchmarks/bench_distributed.py --mb 32 --reps 3 --dir /mnt/fast/tmp
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size above the level at entry, sampled every millisecond on a thread."""

    def __enter__(self) -> PeakRSS:
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def rank_main(rank: int, world: int, port: str, directory: str, mb: int, reps: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import ckpt_callbacks
    import ckpt_callbacks.distributed as cd
    from ckpt_callbacks.distributed import StorageWriter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (world,))
    width = 2048
    layers = max(1, (mb << 20) // (width * width * 4))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    optim.step()
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    local = [t.to_local() if hasattr(t, "to_local") else t for t in _tensors(state)]
    local_bytes = sum(t.numel() * t.element_size() for t in local)
    largest = max(t.numel() * t.element_size() for t in local)

    def ours(i: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            dcp.save(state, storage_writer=StorageWriter(os.path.join(directory, "ours", f"ckpt-{i}")))
        dt = time.perf_counter() - t0
        extra.append(peak.extra)
        return dt

    def theirs(i: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(os.path.join(directory, "dcp", f"ckpt-{i}")))
        dt = time.perf_counter() - t0
        extra_dcp.append(peak.extra)
        return dt

    def gathered(i: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        with PeakRSS() as peak:
            fm, fo = get_state_dict(model, optim, options=opts)
            if rank == 0:
                ckpt_callbacks.save_checkpoint(
                    os.path.join(directory, "full", f"ckpt-{i}"), {"model": fm, "optim": fo}
                )
            del fm, fo
        extra_full.append(peak.extra)
        dist.barrier()
        return time.perf_counter() - t0

    # incremental=False: the same state saved again would write nothing; a training step changes it all
    amgr = cd.manager(os.path.join(directory, "async"), max_to_keep=1, async_save=True, incremental=False)
    bufs = [torch.empty_like(t, device="cpu") for t in local]

    def async_block(i: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        cd.save(amgr, state, i)
        dt = time.perf_counter() - t0
        amgr.wait_until_finished()
        return dt

    def staging(i: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for b, t in zip(bufs, local):
            b.copy_(t)
        return time.perf_counter() - t0

    extra: list[int] = []
    extra_dcp: list[int] = []
    extra_full: list[int] = []
    times: dict[str, list[float]] = {"ours": [], "dcp": [], "gathered": [], "async": [], "staging": []}
    # The first save of the process (fresh allocator): its extra memory is the honest peak; later
    # saves reuse memory the allocator kept and show less.
    ours(0), theirs(0), gathered(0)
    first = (extra[0], extra_dcp[0], extra_full[0])
    async_block(0), staging(0)  # the first async save allocates the staging buffers it then reuses
    for i in range(1, reps + 1):
        times["ours"].append(ours(i))
        times["dcp"].append(theirs(i))
        times["gathered"].append(gathered(i))
        for j in range(3):  # short and noisy on a shared machine: three pairs per rep
            times["async"].append(async_block(10 * i + j))
            times["staging"].append(staging(i))
        if rank == 0:
            for sub in ("ours", "dcp", "full"):
                shutil.rmtree(os.path.join(directory, sub), ignore_errors=True)
        dist.barrier()
    # Every rank's time matters (the save ends when the slowest rank does): take the max per rep.
    for k, v in times.items():
        gathered_v = [None] * world
        dist.all_gather_object(gathered_v, v)
        times[k] = [max(xs) for xs in zip(*gathered_v)]
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        mib = 2**20
        print(
            f"state: {3 * layers * (width * width + width) * 4 / mib:.0f} MiB total (model + Adam), "
            f"{local_bytes / mib:.0f} MiB per rank, largest local tensor {largest / mib:.1f} MiB, {reps} reps"
        )
        print(f"ours (StorageWriter)        median {med['ours']:.3f} s   {times['ours']}")
        print(f"DCP FileSystemWriter        median {med['dcp']:.3f} s")
        print(f"gather to rank 0 + save     median {med['gathered']:.3f} s")
        d1, d2 = med["ours"] / med["dcp"], med["ours"] / med["gathered"]
        print(
            f"D1 ours / FileSystemWriter       = {d1:.2f}x (target <= 1.2x) {'OK' if d1 <= 1.2 else 'MISSED'}"
        )
        print(
            f"D2 ours / gather-to-rank-0 save  = {d2:.2f}x (target <= 0.5x) {'OK' if d2 <= 0.5 else 'MISSED'}"
        )
        limit = 64 * mib + largest
        peak = max(extra)
        peak = max(peak, first[0])
        print(
            f"D3 peak extra RSS on rank 0 = {peak / mib:.1f} MiB (first save of the process "
            f"{first[0] / mib:.1f} MiB; target <= {limit / mib:.1f} MiB: 64 MiB + largest local tensor) "
            f"{'OK' if peak <= limit else 'MISSED'}"
        )
        d4 = med["async"] / med["staging"]
        print(
            f"D4 async save blocks {med['async'] * 1e3:.1f} ms vs staging copy {med['staging'] * 1e3:.1f} ms "
            f"= {d4:.2f}x (target <= 1.5x) {'OK' if d4 <= 1.5 else 'MISSED'}"
        )
        print(
            f"   for comparison, rank 0: FileSystemWriter {max(extra_dcp) / mib:.1f} MiB (first "
            f"{first[1] / mib:.1f}), gather + save {max(extra_full) / mib:.1f} MiB (first {first[2] / mib:.1f})"
        )
    amgr.close()
    dist.destroy_process_group()


def _tensors(tree):
    import torch

    if isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)
    elif isinstance(tree, torch.Tensor):
        yield tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=128, help="MiB of parameters (the optimizer adds twice that)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is not None:
        rank_main(args.rank, 2, args.port, args.dir, args.mb, args.reps)
        return
    directory = tempfile.mkdtemp(prefix="bench-dist-", dir=args.dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    try:
        cmd = [
            sys.executable,
            __file__,
            "--mb",
            str(args.mb),
            "--reps",
            str(args.reps),
            "--dir",
            directory,
            "--port",
            port,
        ]
        procs = [subprocess.Popen([*cmd, "--rank", str(r)]) for r in range(2)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"a rank failed: exit codes {codes}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
