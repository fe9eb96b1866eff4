"""SPEC §8 P8 (and P6 on S3): save to a local S3 server vs boto3 and Lightning, same bytes, same run.

Starts a real moto S3 server (``python -m moto.server``) on 127.0.0.1 in its own process, so its CPU
and memory are not the client's (``--server thread``: a ``ThreadedMotoServer`` inside each worker
process instead, sharing the client's GIL), then times, in fresh worker processes, alternating and
repeated:

- ``ckpt``: ``CheckpointManager("s3://...").save(state)`` — the streamed, parallel multipart path.
- ``boto3``: ``upload_file`` of a local file holding the same bytes, default ``TransferConfig``
  (8 MiB parts, 10 threads) — the P8 baseline.
- ``lightning``: Lightning's ``TorchCheckpointIO.save_checkpoint`` of the same tensors as torch
  tensors (``torch.save`` into a ``BytesIO``, then one fsspec ``pipe``), credentials from the
  environment because it takes no ``storage_options``.

Each worker also reports its peak extra RSS during the save (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus the RSS just before the save), for SPEC §8 P6:
sync ≤ 0.1·S + 64 MiB.

Usage::

    .venv/bin/python benchmarks/bench_s3.py                 # 2 GiB, 3 repeats
    .venv/bin/python benchmarks/bench_s3.py --size-mib 512 --repeat 2
    .venv/bin/python benchmarks/bench_s3.py --server thread --skip lightning

Figures are printed; nothing is asserted (timed assertions do not belong in tests).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

BUCKET = "bench"
KEY, SECRET, REGION = "bench-key", "bench-secret", "us-east-1"
N_TENSORS = 16


# ============================================================================ worker side


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _PeakSampler:
    """Fallback peak-RSS sampler where clear_refs is not writable."""

    def __init__(self) -> None:
        self.peak = _rss_kib("VmRSS")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_kib("VmRSS"))

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, _rss_kib("VmRSS"))


def _measure(fn) -> tuple[float, int, float]:
    """(seconds, peak extra RSS in bytes, CPU seconds of this process) of ``fn()``."""
    import gc
    import resource

    gc.collect()
    before = _rss_kib("VmRSS")
    exact = _reset_peak()
    sampler = None if exact else _PeakSampler()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = _rss_kib("VmHWM") if exact else sampler.stop()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return dt, (peak - before) * 1024, cpu


def _numpy_state(size: int) -> dict:
    import numpy as np

    per = size // N_TENSORS // 4
    rng = np.random.default_rng(0)
    # Random bits: incompressible, and every page really allocated before the timer starts.
    return {
        f"layer{i}": rng.integers(0, 2**31, per, dtype=np.int32).view(np.float32) for i in range(N_TENSORS)
    }


def _s3_options(endpoint: str) -> dict:
    return {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION}}


def worker(kind: str, endpoint: str, size: int, tmpdir: str) -> dict:
    if endpoint == "thread":  # --server thread: the S3 server runs in this process, sharing its GIL
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        try:
            endpoint = f"http://127.0.0.1:{port}"
            _reset_bucket(endpoint)
            return worker(kind, endpoint, size, tmpdir)
        finally:
            server.stop()
    run = uuid.uuid4().hex[:8]
    if kind == "ckpt":
        from ckpt_callbacks import CheckpointManager

        state = _numpy_state(size)
        mgr = CheckpointManager(f"s3://{BUCKET}/ckpt-{run}", storage_options=_s3_options(endpoint))
        dt, peak, cpu = _measure(lambda: mgr.save(state, step=1))
        mgr.close()
        nbytes = sum(a.nbytes for a in state.values())
    elif kind == "boto3":
        import boto3

        path = Path(tmpdir, "payload.bin")
        nbytes = path.stat().st_size
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
            region_name=REGION,
        )
        dt, peak, cpu = _measure(lambda: client.upload_file(str(path), BUCKET, f"boto3-{run}/payload.bin"))
    elif kind == "lightning":
        import torch
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        os.environ.update(
            AWS_ACCESS_KEY_ID=KEY,
            AWS_SECRET_ACCESS_KEY=SECRET,
            AWS_DEFAULT_REGION=REGION,
            AWS_ENDPOINT_URL=endpoint,
        )
        checkpoint = {"state_dict": {k: torch.from_numpy(v) for k, v in _numpy_state(size).items()}}
        nbytes = sum(t.numel() * 4 for t in checkpoint["state_dict"].values())
        io = TorchCheckpointIO()
        dt, peak, cpu = _measure(
            lambda: io.save_checkpoint(checkpoint, f"s3://{BUCKET}/lightning-{run}/last.ckpt")
        )
    else:
        raise ValueError(kind)
    return {"kind": kind, "seconds": dt, "peak_extra_rss": peak, "bytes": nbytes, "cpu": cpu}


# ============================================================================ driver side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _reset_bucket(endpoint: str) -> None:
    """Empty the bucket between runs so the server's memory does not grow with every repeat."""
    import boto3

    s3 = boto3.resource(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
    )
    bucket = s3.Bucket(BUCKET)
    if bucket.creation_date is None:
        bucket.create()
    bucket.objects.all().delete()


def _write_payload(tmpdir: str, size: int) -> None:
    """The boto3 baseline uploads a file with exactly the bytes of the state's tensors."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    state = _numpy_state(size)
    with open(Path(tmpdir, "payload.bin"), "wb") as f:
        for arr in state.values():
            f.write(memoryview(arr).cast("B"))


def _run_worker(kind: str, endpoint: str, size: int, tmpdir: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--endpoint",
            endpoint,
            "--size",
            str(size),
            "--tmpdir",
            tmpdir,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], choices=["boto3", "lightning"])
    parser.add_argument(
        "--server",
        choices=["process", "thread"],
        default="process",
        help="moto in its own process (default), or a ThreadedMotoServer inside each worker process",
    )
    parser.add_argument("--worker")
    parser.add_argument("--endpoint")
    parser.add_argument("--size", type=int)
    parser.add_argument("--tmpdir")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.endpoint, args.size, args.tmpdir)))
        return

    size = args.size_mib << 20
    kinds = [k for k in ("ckpt", "boto3", "lightning") if k not in args.skip]
    proc, endpoint = _start_server() if args.server == "process" else (None, "thread")
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            if "boto3" in kinds:
                _write_payload(tmpdir, size)
            for rep in range(args.repeat):
                order = kinds if rep % 2 == 0 else kinds[::-1]
                for kind in order:
                    if proc is not None:
                        _reset_bucket(endpoint)
                    r = _run_worker(kind, endpoint, size, tmpdir)
                    results[kind].append(r)
                    print(
                        f"  rep {rep + 1} {kind:9s} {r['seconds']:7.2f} s  {r['bytes'] / r['seconds'] / 2**20:7.1f} MiB/s"
                        f"  peak extra RSS {r['peak_extra_rss'] / 2**20:7.1f} MiB  client CPU {r['cpu']:6.2f} s",
                        flush=True,
                    )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    med = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    print(
        f"\nS3 save of {args.size_mib} MiB ({N_TENSORS} tensors) to a local moto server, median of {args.repeat}:"
    )
    for k in kinds:
        peak = max(r["peak_extra_rss"] for r in results[k])
        print(
            f"  {k:9s} {med[k]:7.2f} s   {size / med[k] / 2**20:7.1f} MiB/s   max peak extra RSS {peak / 2**20:7.1f} MiB"
        )
    if "boto3" in med:
        print(f"P8  ckpt / boto3 upload_file       = {med['ckpt'] / med['boto3']:.2f}x   (target <= 1.10x)")
    if "lightning" in med:
        print(f"    ckpt / Lightning TorchCheckpointIO = {med['ckpt'] / med['lightning']:.2f}x")
    if args.server == "thread":
        print("P6  not measured with --server thread: the in-process server's own memory is in the RSS")
        return
    budget = 0.1 * size + (64 << 20)
    peak = max(r["peak_extra_rss"] for r in results["ckpt"])
    print(
        f"P6  ckpt peak extra RSS {peak / 2**20:.1f} MiB vs budget 0.1*S + 64 MiB = {budget / 2**20:.1f} MiB "
        f"({'within' if peak <= budget else 'OVER'})"
    )


if __name__ == "__main__":
    main()
