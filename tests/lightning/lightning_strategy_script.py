"""Runs a CheckpointCallback under a strategy given by name (2 CPU processes); prints the outcome."""

from __future__ import annotations

import importlib
import sys

from lightning_helpers import make_loader, make_trainer, model_class

from ckpt_callbacks.lightning import CheckpointCallback


def main() -> None:
    namespace, strategy_name, directory = sys.argv[1:4]
    pl = importlib.import_module("lightning.pytorch" if namespace == "lightning" else namespace)
    strategy = getattr(pl.strategies, strategy_name)()
    cb = CheckpointCallback(directory, save_every_n_steps=1)
    trainer = make_trainer(directory + ".root", [cb], pl=pl, strategy=strategy, devices=2, max_steps=2)
    try:
        trainer.fit(model_class(pl)(), make_loader())
    except ValueError as e:
        print(f"REFUSED rank={trainer.global_rank}: {e}", flush=True)
        return
    print("TRAINED", flush=True)


if __name__ == "__main__":
    main()
