"""Lightning ``Trainer.fit`` checkpointing to an object store, for the SIGKILL / resume tests (a subprocess).

Usage: python e2e_lightning_script.py DIRECTORY_URL OUT.pt [BLOCK_AT_STEP]
``CKPT_STORAGE_OPTIONS`` (JSON) holds the storage options. With BLOCK_AT_STEP the run prints
``READY <step>`` before that optimizer step and blocks until the parent SIGKILLs it.
Uses the tiny model and data of tests/lightning (on PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import sys
import time

import lightning as L
import torch
from lightning_helpers import TinyModel, make_loader, make_trainer, weights

from ckpt_callbacks.lightning import CheckpointCallback

directory, out = sys.argv[1], sys.argv[2]
block_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
storage_options = json.loads(os.environ["CKPT_STORAGE_OPTIONS"])


class BlockAt(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == block_at:
            print(f"READY {trainer.global_step}", flush=True)
            time.sleep(600)


L.seed_everything(0, verbose=False)
model = TinyModel(dropout=0.2)
cb = CheckpointCallback(directory, save_every_n_steps=4, max_to_keep=2, storage_options=storage_options)
trainer = make_trainer(out + ".root", [cb, BlockAt()], max_epochs=3)
trainer.fit(model, make_loader())
torch.save(
    {"weights": weights(model), "global_step": trainer.global_step, "resumed_from": trainer.ckpt_path}, out
)
