"""A 2-process CPU DDP run (gloo) of ``ckpt_callbacks.lightning.ModelCheckpoint``; each rank writes its
public state to ``<out>/rank<r>.json`` for ``test_lightning_model_checkpoint.py``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta

from lightning.pytorch.strategies import DDPStrategy
from lightning_helpers import TinyModel, make_loader, make_trainer

from ckpt_callbacks.lightning import ModelCheckpoint

RANK = int(os.environ.get("LOCAL_RANK", "0"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    # Every 2 steps with a validation metric: saves between validations wait for the next one; the
    # newest window of 2 drops top-k pointers the ranks must forget together (a broadcast).
    cb = ModelCheckpoint(
        dirpath=a.dir,
        monitor="val_loss",
        save_top_k=-1,
        every_n_train_steps=2,
        save_last=True,
        max_to_keep=None,
    )
    trainer = make_trainer(
        a.out,
        [cb],
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
        max_epochs=2,
    )
    trainer.fit(TinyModel(), make_loader(), make_loader())
    result = {
        "rank": RANK,
        "global_step": trainer.global_step,
        "best_model_path": cb.best_model_path,
        "best_k_models": sorted(cb.best_k_models),
        "last_model_path": cb.last_model_path,
        "kth_best_model_path": cb.kth_best_model_path,
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{RANK}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
