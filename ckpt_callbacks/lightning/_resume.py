"""The Lightning callback's resume: the newest valid checkpoint, read once, on every rank."""

from __future__ import annotations

from typing import Any

from .._api._resolve import load_checkpoint as _core_load
from . import _compat, _convert, _inplace, _sharded
from ._io import refuse_stock_checkpoints
from ._trainer import _rank_zero, raise_everywhere

Trainer = Any  # either namespace's (see _compat)


def auto_resume(cb: Any, trainer: Trainer, mgr: Any, sharded: bool, shown_suffix: str = "") -> None:
    """Restore the newest valid checkpoint of callback ``cb`` into ``trainer`` before training starts
    (``resume=True`` and ``fit(ckpt_path="last")``): weights in place, then Lightning's own restore of
    the rest; a directory of stock ``.ckpt`` files and no checkpoint of ours is refused. ``mgr``: the
    callback's manager (rank zero's); ``sharded``: a sharded strategy, where every rank restores its shards."""
    if sharded:
        if _sharded.auto_resume(cb, trainer) is None:
            refuse_stock_checkpoints(cb.directory, cb.storage_options)  # on every rank
        return
    path, state, error = None, None, None
    if trainer.is_global_zero:
        try:
            assert mgr is not None
            path, state = _inplace.load_into_module(mgr.restore_with_path, trainer.lightning_module)
            if path is None:
                refuse_stock_checkpoints(cb.directory, cb.storage_options)
        except Exception as e:  # noqa: BLE001 - broadcast, then raised on every rank
            error = e
    raise_everywhere(trainer, error, "Restoring the newest checkpoint")
    if trainer.world_size > 1:
        path = trainer.strategy.broadcast(path, src=0)
    if path is None:
        return
    if state is None:
        state = _inplace.load_into_module(
            lambda **kw: _core_load(
                path, storage_options=cb.storage_options, allow_pickle=cb.allow_pickle, **kw
            ),
            trainer.lightning_module,
        )
    checkpoint = _convert.from_tree(state)
    _compat.restore_before_setup(trainer, path + shown_suffix, checkpoint)
    _rank_zero(
        trainer,
        f"CheckpointCallback: resuming from {path} (global step {checkpoint.get('global_step')}).",
    )
