"""The arguments both framework callbacks share (their constructor signatures), validated once.

Each callback keeps its own public signature and passes its arguments here; what it then needs of
them (the save trigger, the checkpoint manager) is built from this one object, so the two callbacks
cannot drift apart in how they check or use them.
"""

from __future__ import annotations

import dataclasses
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

from .. import _validation
from .._manager._manager import CheckpointManager
from ._trigger import SaveTrigger


@dataclasses.dataclass
class CallbackConfig:
    directory: str
    save_every_n_steps: int | None = None
    save_every_n_seconds: float | None = None
    save_on_epoch_end: bool = False
    save_on_train_end: bool = True
    max_to_keep: int | None = 5
    keep_checkpoint_every_n_hours: float | None = None
    keep_best: int | None = None
    monitor: str | None = "val_loss"
    mode: str = "auto"
    save_optimizer: bool = True
    resume: bool = True
    async_save: bool = False
    storage_options: dict | None = None
    prefix: str = "ckpt"
    allow_pickle: bool = False
    clock: Callable[[], float] = time.time

    @classmethod
    def validated(cls, arguments: dict[str, Any]) -> CallbackConfig:
        """The config of a callback constructor's ``locals()`` (its other names are ignored), or the
        error naming the first bad argument, in the manager's words."""
        a = {f.name: arguments[f.name] for f in dataclasses.fields(cls)}
        _validation.check_directory(a["directory"])
        flags = ("save_on_epoch_end", "save_on_train_end", "save_optimizer", "resume", "async_save")
        _validation.check_flags(**{k: a[k] for k in (*flags, "allow_pickle")})
        _validation.check_triggers(
            a["save_every_n_steps"], a["save_every_n_seconds"], a["save_on_epoch_end"], a["save_on_train_end"]
        )
        _validation.check_storage_options(a["storage_options"])
        _validation.check_manager_args(
            a["prefix"],
            a["max_to_keep"],
            a["keep_checkpoint_every_n_hours"],
            a["keep_best"],
            a["monitor"],
            a["mode"],
            a["clock"],
        )
        a["directory"] = os.fspath(a["directory"])
        # A copy: the caller's dict may change after the callback is made.
        a["storage_options"] = dict(a["storage_options"]) if a["storage_options"] else None
        return cls(**a)

    def apply_to(self, callback: Any) -> None:
        """Set every argument as a public attribute of ``callback`` (``cb.directory``, ``cb.mode``, ...),
        the clock as ``cb._clock``."""
        for field in dataclasses.fields(self):
            name = "_clock" if field.name == "clock" else field.name
            setattr(callback, name, getattr(self, field.name))

    def make_trigger(self) -> SaveTrigger:
        return SaveTrigger(self.save_every_n_steps, self.save_every_n_seconds, self.clock)

    def make_manager(self, **extra: Any) -> CheckpointManager:
        """The callback's CheckpointManager; ``extra`` overrides an argument (e.g. the resolved ``mode``)."""
        kwargs: dict[str, Any] = {
            "prefix": self.prefix,
            "max_to_keep": self.max_to_keep,
            "keep_checkpoint_every_n_hours": self.keep_checkpoint_every_n_hours,
            "keep_best": self.keep_best,
            "monitor": self.monitor,
            "mode": self.mode,
            "storage_options": self.storage_options,
            "async_save": self.async_save,
            "allow_pickle": self.allow_pickle,
            "clock": self.clock,
        }
        kwargs.update(extra)
        return CheckpointManager(self.directory, **kwargs)


# Async managers whose snapshot buffers were prepared after the first optimizer step (held weakly: a
# manager closed and collected leaves the set, and a later one is prepared again).
_PREPARED: weakref.WeakSet = weakref.WeakSet()


def prepare_snapshot_once(manager: Any, state: Callable[[], Any]) -> None:
    """Start mapping ``manager``'s async snapshot buffers for ``state()`` (the tree the callback saves),
    once per manager: after the first optimizer step every saved tensor (optimizer slots too) exists,
    so the first save copies into memory already mapped. Cheap to call on every batch."""
    if manager is None or not getattr(manager, "_async", False) or manager in _PREPARED:
        return
    _PREPARED.add(manager)
    manager._prepare_snapshot(state())
