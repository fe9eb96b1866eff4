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

``CKPT_SUITE_VIEW=pointers`` (with ``modelcheckpoint``), to classify failures: ``os.listdir`` leaves out
this format's own files (``ckpt-N.index`` / ``.meta`` / ``.data-*`` and the ``checkpoint`` state file)
and ``torch.load`` of a pointer file loads the checkpoint it names. A test that passes only with this
view differs from stock only in the file names or the bytes it reads; one that still fails differs in
behaviour.
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


def _pointer_view() -> None:
    import re

    import torch

    from ckpt_callbacks.lightning._io import load_any

    ours = re.compile(
        r"(?:ckpt-\d+(?:\.index|\.meta|\.data-\d{5}-of-\d{5})|checkpoint|\.ckpt_callbacks\.lock)\Z"
    )
    listdir, torch_load = os.listdir, torch.load

    def view_listdir(path="."):
        return [n for n in listdir(path) if not ours.match(n)]

    def view_load(f, *args, **kwargs):
        path = f if isinstance(f, (str, os.PathLike)) else getattr(f, "path", getattr(f, "name", None))
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
            with open(path, "rb") as fh:
                head = fh.read(40)
            if head.startswith(b'{"format":"ckpt_callbacks'):  # a pointer (also opened by Lightning's _load)
                return load_any(os.fspath(path), None, False)[1]
        return torch_load(f, *args, **kwargs)

    os.listdir, torch.load = view_listdir, view_load


def pytest_configure(config):
    mode = os.environ.get("CKPT_SUITE_IO")
    if mode == "modelcheckpoint":
        _substitute_model_checkpoint()
        if os.environ.get("CKPT_SUITE_VIEW") == "pointers":
            _pointer_view()
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
