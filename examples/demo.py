"""The ckpt_callbacks demo: train, checkpoint, get killed, resume, and show what is on storage.

Three short runs, each killed mid-training with SIGKILL (a real preemption, not an exception) and
started again with the same command:

1. the core alone: a numpy "training" loop with an accelerated clock (20 minutes per step), to show
   rotation (max_to_keep) and hourly retention (keep_checkpoint_every_n_hours);
2. Keras 3 ``model.fit`` with ``ckpt_callbacks.keras.CheckpointCallback``, killed mid-epoch;
3. PyTorch Lightning ``Trainer.fit`` with ``ckpt_callbacks.lightning.CheckpointCallback``.

Each resumed run is compared with an uninterrupted one: the final weights must be bit-identical.

    python examples/demo.py                     # under ./demo_runs
    python examples/demo.py --url s3://bucket/demo --storage-option key=... --storage-option secret=...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def child(*args: str, storage_options: dict | None) -> int:
    """Run this file as a child process; returns its exit status (-9 when it was SIGKILLed)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0", PYTHONHASHSEED="0")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "_child",
        *args,
        "--opts",
        json.dumps(storage_options or {}),
    ]
    return subprocess.run(cmd, env=env).returncode


def kill_self() -> None:
    """A preemption: no exception handlers, no atexit, no flush — the process is just gone."""
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- 1. the core


class AcceleratedClock:
    """10 minutes pass per training step, so hourly retention shows in a few seconds."""

    def __init__(self, step: int = 0) -> None:
        self.step = step

    def __call__(self) -> float:
        return 1_764_000_000.0 + self.step * 600.0


def core_child(directory: str, kill_at: int, opts: dict) -> None:
    from ckpt_callbacks import CheckpointManager, latest_checkpoint

    # The simulated time goes on from the last saved step, as wall time would after a restart.
    latest = latest_checkpoint(directory, storage_options=opts or None)
    clock = AcceleratedClock(int(latest.rsplit("-", 1)[1]) if latest else 0)
    with CheckpointManager(
        directory, max_to_keep=3, keep_checkpoint_every_n_hours=1, clock=clock, storage_options=opts or None
    ) as mgr:
        state = mgr.restore()
        if state is None:
            state = {
                "w": np.zeros(1000, np.float64),
                "step": 0,
                "rng": np.random.default_rng(0).bit_generator.state,
            }
            print("  [core] fresh start", flush=True)
        else:
            print(f"  [core] resumed from {mgr.latest_checkpoint} at step {state['step']}", flush=True)
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        w, step = state["w"], state["step"]
        while step < 60:
            step += 1
            clock.step = step
            w = w - 0.01 * (w - rng.normal(size=w.shape))  # one "SGD step" on a noisy target
            if step % 2 == 0:
                mgr.save(
                    {"w": w, "step": step, "rng": rng.bit_generator.state},
                    step=step,
                    metrics={"loss": float(np.mean(w**2))},
                )
            if step == kill_at:
                print(f"  [core] step {step}: SIGKILL", flush=True)
                kill_self()
        np.save(os.path.join(os.environ["DEMO_OUT"], "core.npy"), w)


# ----------------------------------------------------------------------------- 2. Keras


def keras_child(directory: str, kill_at: int, opts: dict) -> None:
    import keras

    from ckpt_callbacks.keras import CheckpointCallback, ResumableDataset

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    cb = CheckpointCallback(directory, save_every_n_steps=10, max_to_keep=3, storage_options=opts or None)
    # Skips the batches that a mid-epoch checkpoint already consumed, in the same shuffled order.
    data = ResumableDataset(x, y, batch_size=32, callback=cb, seed=0)

    class Preempt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == kill_at:
                print(f"  [keras] global step {kill_at} (mid-epoch): SIGKILL", flush=True)
                kill_self()

    model.fit(data, epochs=4, shuffle=False, callbacks=[cb, Preempt()], verbose=0)
    if cb.restored_from:
        print(f"  [keras] resumed from {cb.restored_from}", flush=True)
    print(f"  [keras] finished at global step {int(model.optimizer.iterations.numpy())}", flush=True)
    np.savez(os.path.join(os.environ["DEMO_OUT"], "keras.npz"), *[v.numpy() for v in model.weights])


# ----------------------------------------------------------------------------- 3. Lightning


def lightning_child(directory: str, kill_at: int, opts: dict) -> None:
    import logging
    import warnings

    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from ckpt_callbacks.lightning import CheckpointCallback

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1)
            )

        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.global_step == kill_at:
                print(f"  [lightning] global step {kill_at}: SIGKILL", flush=True)
                kill_self()
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log(
                "loss", loss
            )  # what Lightning logged at a save is that checkpoint's metrics (ls shows it)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    # Keep the demo's output to what it is about: Lightning's banners and tips are not.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = Regressor()
    trainer = L.Trainer(
        max_epochs=4,
        callbacks=[
            CheckpointCallback(directory, save_every_n_steps=10, max_to_keep=3, storage_options=opts or None)
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
    )
    trainer.fit(model, loader)
    if trainer.ckpt_path:
        print(f"  [lightning] resumed from {trainer.ckpt_path}", flush=True)
    print(f"  [lightning] finished at global step {trainer.global_step}", flush=True)
    torch.save(
        {k: v.clone() for k, v in model.state_dict().items()},
        os.path.join(os.environ["DEMO_OUT"], "lightning.pt"),
    )


# ----------------------------------------------------------------------------- driver


def same_weights(kind: str, ref_dir: str, run_dir: str) -> bool:
    if kind == "core":
        return np.array_equal(
            np.load(os.path.join(ref_dir, "core.npy")), np.load(os.path.join(run_dir, "core.npy"))
        )
    if kind == "keras":
        a, b = np.load(os.path.join(ref_dir, "keras.npz")), np.load(os.path.join(run_dir, "keras.npz"))
        return all(np.array_equal(a[k], b[k]) for k in a.files)
    import torch

    a = torch.load(os.path.join(ref_dir, "lightning.pt"), weights_only=True)
    b = torch.load(os.path.join(run_dir, "lightning.pt"), weights_only=True)
    return all(torch.equal(a[k], b[k]) for k in a)


def demo(kind: str, base: str, out: str, kill_at: int, opts: dict) -> bool:
    directory = f"{base.rstrip('/')}/{kind}"
    reference = f"{base.rstrip('/')}/{kind}-uninterrupted"
    ref_out, run_out = os.path.join(out, f"{kind}-ref"), os.path.join(out, kind)
    for d in (ref_out, run_out):
        os.makedirs(d, exist_ok=True)
    print(f"  uninterrupted reference run -> {reference}", flush=True)
    os.environ["DEMO_OUT"] = ref_out
    child(kind, reference, "-1", storage_options=opts)
    print(f"  the run that gets killed    -> {directory}", flush=True)
    os.environ["DEMO_OUT"] = run_out
    rc = child(kind, directory, str(kill_at), storage_options=opts)
    print(f"  -> the first run died with exit status {rc} (SIGKILL is -9); starting it again", flush=True)
    child(kind, directory, "-1", storage_options=opts)
    same = same_weights(kind, ref_out, run_out)
    print(
        f"  -> final weights {'IDENTICAL to' if same else 'DIFFERENT from'} an uninterrupted run", flush=True
    )
    print(f"\n$ ckpt-callbacks ls {directory}", flush=True)
    from ckpt_callbacks._cli._main import main as cli

    cli(["ls", directory, *[f"--storage-option={k}={json.dumps(v)}" for k, v in opts.items()]])
    return same


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        p = argparse.ArgumentParser()
        p.add_argument("kind")
        p.add_argument("directory")
        p.add_argument("kill_at", type=int)
        p.add_argument("--opts", default="{}")
        a = p.parse_args(argv[1:])
        {"core": core_child, "keras": keras_child, "lightning": lightning_child}[a.kind](
            a.directory, a.kill_at, json.loads(a.opts)
        )
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--url", default=os.path.join(os.getcwd(), "demo_runs"), help="where checkpoints go (any fsspec URL)"
    )
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--only", choices=["core", "keras", "lightning"], action="append")
    a = p.parse_args(argv)
    from ckpt_callbacks._cli._main import _options

    opts = _options(a.storage_option)
    if a.url.startswith("memory://"):
        p.error(
            "memory:// does not outlive a process, and the demo kills one; use a local path or a cloud URL"
        )
    if "://" not in a.url:
        shutil.rmtree(a.url, ignore_errors=True)
    else:
        import fsspec

        fs, root = fsspec.core.url_to_fs(a.url, **opts)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    out = os.path.join(os.getcwd(), "demo_runs", ".weights")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    results = {}
    kinds = a.only or ["core", "keras", "lightning"]
    titles = {
        "core": "1. The core: numpy training loop, save every 2 steps, max_to_keep=3, one kept per hour "
        "(10 simulated minutes per step)",
        "keras": "2. Keras 3 model.fit with CheckpointCallback(save_every_n_steps=10, max_to_keep=3)",
        "lightning": "3. PyTorch Lightning Trainer.fit with CheckpointCallback(save_every_n_steps=10, max_to_keep=3)",
    }
    kill_at = {"core": 37, "keras": 23, "lightning": 27}
    for kind in kinds:
        banner(titles[kind])
        results[kind] = demo(kind, a.url, out, kill_at[kind], opts)
    banner(f"done in {time.time() - t0:.0f} s")
    for kind, ok in results.items():
        print(f"  {kind:10s} resumed exactly: {'yes' if ok else 'NO'}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
