"""SPEC §8 P2 / P4 (Lightning): CheckpointCallback's save vs Lightning's own, same module and optimizer.

Inside a live ``Trainer.fit`` (one step taken, so Adam's state exists; every tensor then filled
with random values so nothing compresses by accident), times:

  callback          the save CheckpointCallback performs: Lightning's full checkpoint dict
                    (dump_checkpoint) + RNG states + counters, written and committed (fsync'd)
  lightning         trainer.save_checkpoint(path) with the default TorchCheckpointIO (torch.save,
                    pickle) + fsync of the file and directory: what ModelCheckpoint does
  safetensors       safetensors.torch.save_file of the same tensors + fsync (tensors only)
  raw               one sequential write + fsync of as many bytes as the callback's data file
  callback_async    time the training thread is blocked by an async_save=True save (P4) ...
  memcopy           ... vs a plain in-memory copy of the same tensors
  callback_resume   resume's restore (P7, cold page cache): the newest checkpoint read in place into
                    the live module, then load_state_dict, as CheckpointCallback(resume=True) does
  lightning_resume  ... vs torch.load of Lightning's checkpoint + load_state_dict (ckpt_path=...)

and prints the ratios the SPEC targets. Median of --repeats; the methods take turns.

Usage: python benchmarks/bench_lightning.py [--mib 128] [--repeats 5] [--dir bench_out/lightning]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_core  # noqa: E402 - its page-cache helpers (run as a script, this folder is on sys.path)

from ckpt_callbacks.lightning import CheckpointCallback  # noqa: E402

warnings.filterwarnings("ignore")
WIDTH = 2048  # one Linear(2048, 2048) weight is 16 MiB of float32


class Wide(L.LightningModule):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(path: str) -> None:
    """Evict a (clean) file, or every file under a directory, from the page cache."""
    (bench_core.drop_cache_tree if os.path.isdir(path) else bench_core.drop_cache)(path)


def timed_round_robin(
    methods: dict, repeats: int, after: dict | None = None, before=lambda: None
) -> dict[str, float]:
    """Median seconds per method; methods take turns, so disk-speed drift hits all of them alike.
    ``before`` runs untimed before every call (e.g. a change of every tensor, as a training step makes)."""
    after = after or {}
    for name, fn in methods.items():
        before()
        fn(repeats)  # warm-up: first-call allocations are not what is compared
        after.get(name, lambda: None)()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(repeats):
        for name, fn in methods.items():
            before()
            t0 = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - t0)
            after.get(name, lambda: None)()  # untimed: e.g. waiting for a background save
    return {name: statistics.median(t) for name, t in times.items()}


class Bench(L.Callback):
    def __init__(self, args, sync_cb: CheckpointCallback, async_cb: CheckpointCallback) -> None:
        self.args, self.sync_cb, self.async_cb = args, sync_cb, async_cb

    def on_train_end(self, trainer, pl_module) -> None:
        args = self.args
        ckpt = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        tensors = {f"p/{k}": v for k, v in ckpt["state_dict"].items()}
        for pid, st in ckpt["optimizer_states"][0]["state"].items():
            for k, v in st.items():
                if v.dim() > 0:
                    tensors[f"o/{pid}/{k}"] = v
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for t in tensors.values():
                t.copy_(torch.randn(t.shape, generator=g))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        print(
            f"lightning {L.__version__}, torch {torch.__version__}; params "
            f"{sum(p.numel() * 4 for p in pl_module.parameters()) / 2**20:.0f} MiB, params + Adam state "
            f"{total / 2**20:.0f} MiB; median of {args.repeats}; {os.cpu_count()} CPUs; {args.dir}"
        )
        progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total

        def callback(cb):
            def save(i: int) -> None:
                progress.completed += 1  # a new step number per save, as in training
                cb._save(trainer, pl_module)

            return save

        def lightning_save(i: int) -> None:
            path = os.path.join(args.dir, "pl", f"step={i}.ckpt")
            trainer.save_checkpoint(path)
            fsync_path(path)
            fsync_path(os.path.dirname(path))
            os.remove(path)

        def safetensors_save(i: int) -> None:
            from safetensors.torch import save_file

            path = os.path.join(args.dir, "st.safetensors")
            save_file({k: v.contiguous() for k, v in tensors.items()}, path)
            fsync_path(path)
            os.remove(path)

        payload = torch.randint(0, 255, (total,), dtype=torch.uint8, generator=g).numpy()

        def raw(i: int) -> None:
            path = os.path.join(args.dir, "raw.bin")
            with open(path, "wb") as f:
                f.write(memoryview(payload))
                f.flush()
                os.fsync(f.fileno())
            os.remove(path)

        buffers = {k: torch.empty_like(v) for k, v in tensors.items()}

        def memcopy(i: int) -> None:
            for k, v in tensors.items():
                buffers[k].copy_(v)

        os.makedirs(os.path.join(args.dir, "pl"), exist_ok=True)
        methods = {
            "callback": callback(self.sync_cb),
            "lightning": lightning_save,
            "safetensors": safetensors_save,
            "raw": raw,
            "callback_async": callback(self.async_cb),
            "memcopy": memcopy,
        }
        after = {"callback_async": self.async_cb._mgr.wait_until_finished}

        def changed() -> None:  # as a training step: the callback's incremental saves then write everything
            with torch.no_grad():
                for t in tensors.values():
                    t.add_(1.0)

        r = timed_round_robin(methods, args.repeats, after, changed)
        print("  (every tensor changes before each save, as in training: the callback's saves are full ones)")
        for name, t in r.items():
            print(f"  {name:<16} {t * 1000:8.1f} ms   {total / 2**20 / t:7.0f} MiB/s")
        print("ratios (SPEC §8 targets):")
        print(
            f"  P2 callback / lightning torch.save+fsync (TorchCheckpointIO)  {r['callback'] / r['lightning']:.2f}x  (<= 1.05)"
        )
        print(
            f"  P2 callback / safetensors save_file+fsync                    {r['callback'] / r['safetensors']:.2f}x  (<= 1.05)"
        )
        print(
            f"  P1 callback / raw write+fsync of the same bytes              {r['callback'] / r['raw']:.2f}x  (<= 1.10)"
        )
        print(
            f"  P4 async blocked time / in-memory copy                       {r['callback_async'] / r['memcopy']:.2f}x  (<= 1.5)"
        )
        self.resume_rows(trainer, pl_module)

    def resume_rows(self, trainer, pl_module) -> None:
        from ckpt_callbacks.lightning import _convert, _inplace

        mgr, directory = self.sync_cb._mgr, self.sync_cb.directory
        pl_path = os.path.join(self.args.dir, "pl", "resume.ckpt")
        trainer.save_checkpoint(pl_path)

        def callback_resume(i: int) -> None:
            drop_cache(directory)
            _, state = _inplace.load_into_module(mgr.restore_with_path, pl_module)
            pl_module.load_state_dict(_convert.from_tree(state)["state_dict"])

        def lightning_resume(i: int) -> None:
            drop_cache(pl_path)
            pl_module.load_state_dict(torch.load(pl_path, weights_only=False)["state_dict"])

        methods = {"callback_resume": callback_resume, "lightning_resume": lightning_resume}
        r = timed_round_robin(methods, self.args.repeats)
        for name, t in r.items():
            print(f"  {name:<16} {t * 1000:8.1f} ms")
        print(
            f"  P7 callback resume / torch.load+load_state_dict (cold)        "
            f"{r['callback_resume'] / r['lightning_resume']:.2f}x  (<= 0.8)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=128, help="parameter size in MiB (Adam adds 2x)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="bench_out/lightning")
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    torch.manual_seed(0)
    model = Wide(max(1, args.mib // 16))
    # Saves are triggered by Bench alone (a trigger that never fires keeps the callbacks valid).
    common = dict(max_to_keep=1, resume=False, save_on_train_end=False, save_every_n_steps=10**9)
    sync_cb = CheckpointCallback(os.path.join(args.dir, "cb"), **common)
    async_cb = CheckpointCallback(
        os.path.join(args.dir, "cb_async"), async_save=True, prefix="async", **common
    )
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Bench(args, sync_cb, async_cb), sync_cb, async_cb], default_root_dir=args.dir,
    )  # fmt: skip
    data = DataLoader(TensorDataset(torch.randn(2, WIDTH)), batch_size=2)
    trainer.fit(model, data)
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
