"""A Lightning run for the crash tests: trains TinyModel, optionally blocks at a step to be SIGKILLed.

python lightning_train_script.py --out W.pt [--ours DIR] [--pl DIR] [--kill-at STEP] [--ckpt-path P]
"""

from __future__ import annotations

import argparse
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import TinyModel, make_loader, make_trainer, weights

from ckpt_callbacks.lightning import CheckpointCallback


class BlockAt(L.Callback):
    """Prints READY and blocks before the optimizer step of ``step``; the parent then sends SIGKILL."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            print(f"READY {trainer.global_step}", flush=True)
            time.sleep(600)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ours")
    p.add_argument("--pl")
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--max-epochs", type=int, default=3)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--ckpt-path")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--no-rng", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--shuffle", action="store_true")
    a = p.parse_args()

    L.seed_everything(0, verbose=False)
    model = TinyModel(dropout=a.dropout)
    callbacks: list = []
    if a.kill_at >= 0:
        callbacks.append(BlockAt(a.kill_at))
    if a.ours:
        cb = CheckpointCallback(
            a.ours, save_every_n_steps=a.save_every, max_to_keep=3, resume=not a.no_resume
        )
        cb._restore_rng = not a.no_rng
        callbacks.append(cb)
    if a.pl:  # Lightning's own checkpointing: torch.save through TorchCheckpointIO, at epoch ends
        callbacks.append(ModelCheckpoint(dirpath=a.pl, every_n_epochs=1, save_top_k=-1, save_last=True))
    trainer = make_trainer(
        a.out + ".root", callbacks, max_epochs=a.max_epochs, enable_checkpointing=bool(callbacks)
    )
    trainer.fit(model, make_loader(shuffle=a.shuffle), ckpt_path=a.ckpt_path)
    torch.save(
        {"weights": weights(model), "global_step": trainer.global_step, "resumed_from": trainer.ckpt_path},
        a.out,
    )


if __name__ == "__main__":
    sys.exit(main())
