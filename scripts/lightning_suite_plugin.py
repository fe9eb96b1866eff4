"""pytest plugin for scripts/lightning_suite.sh: Lightning's own tests with this library substituted.

``CKPT_SUITE_IO=ours``: ``FsspecCheckpointIO`` as every Trainer's default CheckpointIO. Lightning's
``Strategy.checkpoint_io`` makes a ``TorchCheckpointIO()`` when none was configured (and for the inner
IO of ``AsyncCheckpointIO``). Replacing that module global with our class makes every Trainer in
Lightning's own tests read and write this library's format, while a plugin a test passes explicitly
still wins.

``CKPT_SUITE_IO=modelcheckpoint``: ``lightning.pytorch.callbacks.ModelCheckpoint`` (the names the
tests import, and the default callback a Trainer adds) is ``ckpt_callbacks.lightning.ModelCheckpoint``.
Set before the test modules are collected, so their ``from lightning.pytorch.callbacks import
ModelCheckpoint`` gets ours; Lightning's own ``isinstance`` checks still hold (ours is a subclass).
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

try:
    import jsonargparse  # noqa: F401 - in Lightning's test requirements
except ImportError:
    # test_model_checkpoint.py imports it for one test (a ModelCheckpoint built from a parser). Without
    # it that one test fails in both runs and the other tests of the module collect.
    import types

    def _missing(*args, **kwargs):
        raise ImportError("jsonargparse is not installed (pip install jsonargparse for Lightning's CI setup)")

    sys.modules["jsonargparse"] = types.SimpleNamespace(ArgumentParser=_missing)


def _substitute_model_checkpoint() -> None:
    import lightning.pytorch.callbacks as callbacks
    import lightning.pytorch.callbacks.model_checkpoint as model_checkpoint
    import lightning.pytorch.trainer.connectors.callback_connector as callback_connector

    from ckpt_callbacks.lightning import ModelCheckpoint as Ours
    from ckpt_callbacks.lightning import _compat

    bound = _compat.bound_class(Ours, "callback", ("lightning",))  # bound to the stock class, first
    for module in (callbacks, model_checkpoint, callback_connector):
        module.ModelCheckpoint = bound


def pytest_configure(config):
    mode = os.environ.get("CKPT_SUITE_IO")
    if mode == "modelcheckpoint":
        _substitute_model_checkpoint()
        return
    if mode != "ours":
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
