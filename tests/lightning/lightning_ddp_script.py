"""A 2-process CPU DDP run (gloo) for the DDP tests; each rank writes ``<out>/rank<r>.json``.

Rank 1 runs with a tripwire: any write, rename or delete under the checkpoint directory raises
and is recorded. Rank 0's clock races ahead while rank 1's is frozen, so a time-based decision
taken locally would differ between the ranks. ``--fail-at STEP`` makes rank 0 replace the
checkpoint directory with a file just before the save of that step; ``--crash-at STEP`` makes
every rank raise at that step.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import shutil
import sys
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning_helpers import TinyModel, make_loader, make_trainer

from ckpt_callbacks.lightning import CheckpointCallback

RANK = int(os.environ.get("LOCAL_RANK", "0"))
VIOLATIONS: list[str] = []


def install_tripwire(directory: str) -> None:
    root = os.path.realpath(directory)

    def inside(path) -> bool:
        try:
            p = os.path.realpath(os.fspath(path))
        except TypeError:
            return False
        return p == root or p.startswith(root + os.sep)

    def guard(name, fn, is_write=lambda *a, **k: True):
        def wrapper(*args, **kwargs):
            if args and inside(args[0]) and is_write(*args, **kwargs):
                VIOLATIONS.append(f"{name}({args[0]!r})")
                raise PermissionError(f"rank {RANK} must not {name} {args[0]!r}")
            return fn(*args, **kwargs)

        return wrapper

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    os.open = guard("os.open", os.open, lambda p, flags, *a, **k: bool(flags & write_flags))
    builtins.open = guard("open", builtins.open, lambda p, mode="r", *a, **k: any(c in mode for c in "wax+"))
    for name in ("replace", "rename", "remove", "unlink", "rmdir", "mkdir", "makedirs"):
        setattr(os, name, guard(f"os.{name}", getattr(os, name)))
    shutil.rmtree = guard("shutil.rmtree", shutil.rmtree)


class RaceClock:
    """Rank 0: +400 s per call. Other ranks: frozen."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        if RANK == 0:
            self.t += 400.0
        return self.t


class BreakDirectory(L.Callback):
    def __init__(self, directory: str, step: int) -> None:
        self.directory, self.step = directory, step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            shutil.rmtree(self.directory)
            with open(self.directory, "w") as f:
                f.write("not a directory")


class CrashAt(L.Callback):
    """Every rank raises at this global step: a crash after the last periodic save."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--fail-at", type=int, default=-1)
    p.add_argument("--crash-at", type=int, default=-1)
    a = p.parse_args()
    if RANK != 0:
        install_tripwire(a.dir)

    L.seed_everything(0, verbose=False)
    cb = CheckpointCallback(
        a.dir, save_every_n_steps=a.save_every, save_every_n_seconds=1000, max_to_keep=2, clock=RaceClock()
    )
    saved_at: list[int] = []
    save = cb._save

    def recording_save(trainer, pl_module):
        saved_at.append(trainer.global_step)
        save(trainer, pl_module)

    cb._save = recording_save
    callbacks = [cb] + ([BreakDirectory(a.dir, a.fail_at)] if a.fail_at >= 0 else [])
    callbacks += [CrashAt(a.crash_at)] if a.crash_at >= 0 else []
    trainer = make_trainer(
        a.out,
        callbacks,
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
        max_steps=a.max_steps,
        max_epochs=-1,
    )
    result = {"rank": RANK}
    try:
        trainer.fit(TinyModel(), make_loader(shuffle=True))
    except Exception as e:  # noqa: BLE001 - recorded for the test
        result["error"] = f"{type(e).__name__}: {e}"
    result.update(
        global_step=trainer.global_step,
        resumed_from=trainer.ckpt_path,
        saved_at=saved_at,
        violations=VIOLATIONS,
        weights_sum=float(sum(p.detach().double().sum() for p in trainer.lightning_module.parameters())),
    )
    os.makedirs(a.out, exist_ok=True)
    torch.save(
        {k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()},
        os.path.join(a.out, f"rank{RANK}.pt"),
    )
    with builtins.open(os.path.join(a.out, f"rank{RANK}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
