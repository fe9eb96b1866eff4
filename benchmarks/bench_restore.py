"""SPEC §8 P7: restore with a cold page cache into a live torch module, side by side.

Every measurement runs in a fresh process (a model already built and touched, as in a resumed
training job; the page cache of the files dropped), cases alternating rep by rep; medians reported.
The whole set runs twice: with the default allocator settings, and with glibc told to keep freed
memory (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>``), because on VMs every freshly mapped
page costs a host fault and the two settings rank allocation-heavy readers differently.

  ours (in place)   load_checkpoint(path, into={"state_dict": model.state_dict()})
  ours (fresh)      model.load_state_dict(load_checkpoint(path)["state_dict"])
  safetensors       model.load_state_dict(safetensors.torch.load_file(path))
  torch.load        model.load_state_dict(torch.load(path, weights_only=True))
  raw read          our own data file read (readinto, 64 MiB at a time) into memory already touched

Figures: in place vs safetensors (<= 1.0), vs torch.load (<= 0.8), raw read speed / ours (>= 0.8),
and the peak extra RSS of the in-place restore (ru_maxrss over the model's own memory; limit
64 MiB + the largest tensor).

Usage:
  python benchmarks/bench_restore.py               # 512 MiB model, 5 reps per case and mode
  python benchmarks/bench_restore.py --size-mib 2048 --reps 3 --dir /mnt/disk/tmp
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
WIDTH = 4096  # a Linear(4096, 4096) weight is 64 MiB
KEPT_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
CASES = ("ours_into", "ours_fresh", "safetensors", "torch_load", "raw")


def build_model(layers: int):
    import torch

    model = torch.nn.Sequential(
        *[torch.nn.utils.skip_init(torch.nn.Linear, WIDTH, WIDTH) for _ in range(layers)]
    )
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # touched: a live model's memory is mapped already
    return model


def drop_cache(paths: list[str]) -> None:
    for p in paths:
        bench_core.drop_cache(p)
    try:  # as root, also the rest of the page cache (metadata), like a fresh machine
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass


def worker(case: str, d: str, layers: int) -> None:
    import numpy as np
    import safetensors.torch
    import torch

    import ckpt_callbacks._format._torch  # noqa: F401 - imported before the cache drop, like safetensors
    from ckpt_callbacks import load_checkpoint

    model = build_model(layers)
    ckpt = os.path.join(d, "ckpt-1")
    data = sorted(os.path.join(d, f) for f in os.listdir(d) if f.startswith("ckpt-1.data-"))
    files = {
        "ours_into": [*data, ckpt + ".index", ckpt + ".meta"],
        "ours_fresh": [*data, ckpt + ".index", ckpt + ".meta"],
        "safetensors": [os.path.join(d, "model.safetensors")],
        "torch_load": [os.path.join(d, "model.pt")],
        "raw": data,
    }[case]
    raw_buf = None
    if case == "raw":
        raw_buf = np.empty(sum(os.path.getsize(p) for p in data), np.uint8)
        raw_buf[::4096] = 1
    check = model[0].weight
    drop_cache(files)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if case == "ours_into":
        load_checkpoint(ckpt, into={"state_dict": model.state_dict()})
    elif case == "ours_fresh":
        model.load_state_dict(load_checkpoint(ckpt)["state_dict"])
    elif case == "safetensors":
        model.load_state_dict(safetensors.torch.load_file(files[0]))
    elif case == "torch_load":
        model.load_state_dict(torch.load(files[0], weights_only=True))
    else:
        view = memoryview(raw_buf)
        pos = 0
        for p in data:
            with open(p, "rb", buffering=0) as f:
                while True:
                    n = f.readinto(view[pos : pos + 64 * MiB])
                    if not n:
                        break
                    pos += n
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if case != "raw":
        assert model[0].weight is check and float(check[0, 0]) != 0.5, "restore did not land in the model"
    print(json.dumps({"s": elapsed, "extra_rss": max(0, after - before)}))


def run_case(case: str, d: str, layers: int, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_worker", case, d, str(layers)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(d: str, layers: int) -> None:
    import safetensors.torch
    import torch

    from ckpt_callbacks import save_checkpoint

    gen = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(layers):
        sd[f"{i}.weight"] = torch.randn(WIDTH, WIDTH, generator=gen)
        sd[f"{i}.bias"] = torch.randn(WIDTH, generator=gen)
    save_checkpoint(os.path.join(d, "ckpt-1"), {"state_dict": sd, "epoch": 1})
    safetensors.torch.save_file(sd, os.path.join(d, "model.safetensors"))
    torch.save(sd, os.path.join(d, "model.pt"))
    os.sync()


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
    layers = max(1, args.size_mib * MiB // (WIDTH * WIDTH * 4))
    d = tempfile.mkdtemp(prefix="bench_restore-", dir=args.dir)
    rows = []
    try:
        prepare(d, layers)
        size = layers * WIDTH * (WIDTH + 1) * 4
        print(
            f"bench_restore: {size / MiB:.0f} MiB torch model ({layers} x Linear({WIDTH}, {WIDTH})), "
            f"{args.reps} reps, {os.cpu_count()} CPUs, fresh process per measurement",
            flush=True,
        )
        for mode in args.modes.split(","):
            env = KEPT_ENV if mode == "kept" else {}
            times: dict[str, list[float]] = {c: [] for c in CASES}
            rss: list[int] = []
            for rep in range(args.reps):
                order = CASES[rep % len(CASES) :] + CASES[: rep % len(CASES)]
                for case in order:
                    r = run_case(case, d, layers, env)
                    times[case].append(r["s"])
                    if case == "ours_into":
                        rss.append(r["extra_rss"])
            med = {c: statistics.median(v) for c, v in times.items()}
            print(f"  [{mode}] medians: " + ", ".join(f"{c} {v:.3f}s" for c, v in med.items()), flush=True)
            limit = 64 * MiB + WIDTH * WIDTH * 4
            rows += [
                (
                    mode,
                    "in place vs safetensors load_file + load_state_dict",
                    med["ours_into"] / med["safetensors"],
                    "<= 1.0",
                ),
                (
                    mode,
                    "in place vs torch.load + load_state_dict",
                    med["ours_into"] / med["torch_load"],
                    "<= 0.8",
                ),
                (
                    mode,
                    "in place: speed as a fraction of a raw cold read",
                    med["raw"] / med["ours_into"],
                    ">= 0.8",
                ),
                (
                    mode,
                    "fresh load_checkpoint + load_state_dict vs safetensors",
                    med["ours_fresh"] / med["safetensors"],
                    "(info)",
                ),
                (mode, "in place: peak extra RSS / (64 MiB + largest tensor)", max(rss) / limit, "<= 1.0"),
            ]
            print(
                f"  [{mode}] in place peak extra RSS: max {max(rss) / MiB:.1f} MiB (limit {limit / MiB:.0f} MiB)"
            )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print("\nSummary (ratios of medians)")
    for mode, what, ratio, target in rows:
        ok = "" if target == "(info)" else ("met" if eval(f"{ratio} {target}") else "GAP")  # noqa: S307
        print(f"  {mode:<8} {what:<58} {ratio:6.2f}  {target:<7} {ok}")


if __name__ == "__main__":
    main()
