"""pytest plugin for scripts/lightning_suite.sh: ``FsspecCheckpointIO`` as every Trainer's default CheckpointIO.

Lightning's ``Strategy.checkpoint_io`` makes a ``TorchCheckpointIO()`` when none was configured (and
for the inner IO of ``AsyncCheckpointIO``). Replacing that module global with our class makes every
Trainer in Lightning's own tests read and write this library's format, while a plugin a test passes
explicitly still wins. Loaded with ``-p lightning_suite_plugin`` when ``CKPT_SUITE_IO=ours``.
"""

from __future__ import annotations

import os
import sys

try:
    import cloudpickle  # noqa: F401 - in Lightning's test requirements
except ImportError:
    # Several of the checkpoint test modules import it only to pickle a callback or a model. With
    # the standard pickle in its place they collect and run (the same in both runs); install
    # cloudpickle for a run exactly like Lightning's CI.
    import pickle

    sys.modules["cloudpickle"] = pickle


def pytest_configure(config):
    if os.environ.get("CKPT_SUITE_IO") != "ours":
        return
    import lightning.pytorch.strategies.strategy as strategy_module

    from ckpt_callbacks.lightning import FsspecCheckpointIO

    # Legacy checkpoints in the tests (torch.save files) are loaded as Lightning would load them.
    def default_io():
        return FsspecCheckpointIO(allow_pickle=os.environ.get("CKPT_SUITE_PICKLE") == "1")

    bound = type(default_io())
    strategy_module.TorchCheckpointIO = type(
        "TorchCheckpointIO", (bound,), {"__new__": lambda cls: default_io()}
    )
    config.addinivalue_line("markers", "ckpt_callbacks_io: run with FsspecCheckpointIO as the default")
