"""Fits a tiny FSDP2 model under ModelParallelStrategy (2 CPU processes, gloo) with CheckpointCallback.

Usage: ``lightning_sharded_script.py NAMESPACE DIRECTORY MAX_STEPS KILL_AT [async] [consolidated]``. With
``KILL_AT`` > 0 every rank SIGKILLs itself at the start of the batch where ``global_step == KILL_AT``;
``async`` saves with ``async_save=True``; ``consolidated`` builds the strategy with
``save_distributed_checkpoint=False``; ``last`` resumes through ``fit(ckpt_path="last")`` with ``resume=False``.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import torch
from lightning_helpers import _TinyModel, make_loader, make_trainer

from ckpt_callbacks.lightning import CheckpointCallback


class _ShardedModel(_TinyModel):
    """TinyModel (with dropout, so a resume must restore every rank's RNG) sharded with fully_shard."""

    def __init__(self) -> None:
        super().__init__(dropout=0.1)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if getattr(self, "_sharded_done", False):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        self._sharded_done = True


def main() -> None:
    namespace, directory, max_steps, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pl = importlib.import_module("lightning.pytorch" if namespace == "lightning" else namespace)
    pl.seed_everything(0, verbose=False)

    class Kill(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            print(f"START rank={trainer.global_rank} step={trainer.global_step}", flush=True)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if kill_at and trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    model_cls = type("ShardedModel", (_ShardedModel, pl.LightningModule), {"__module__": __name__})
    flags = sys.argv[5:]
    strategy = pl.strategies.ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint="consolidated" not in flags
    )
    async_save = "async" in flags
    last = "last" in flags
    cb = CheckpointCallback(
        directory, save_every_n_steps=2, max_to_keep=2, async_save=async_save, resume=not last
    )
    trainer = make_trainer(
        directory + ".root", [Kill(), cb], pl=pl, strategy=strategy, devices=2, max_steps=max_steps
    )
    trainer.fit(model_cls(), make_loader(shuffle=True), ckpt_path="last" if last else None)
    print(f"TRAINED rank={trainer.global_rank} step={trainer.global_step}", flush=True)


if __name__ == "__main__":
    main()
