"""What the Lightning callback reads from, or does to, a ``Trainer`` outside its hooks: the batches to
skip on a mid-epoch resume, metrics, the ``.meta`` description, rank-zero messages, and the strategy
guard. Either Lightning namespace's ``Trainer``; private Lightning names only through ``_compat``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    IncompatibleCheckpointError,
)
from . import _compat
from ._io import _jsonable

Trainer = LightningModule = Any  # either namespace's (see _compat)


# Errors re-raised on the other ranks under their own class; anything else becomes CheckpointWriteError.
_REMOTE_ERRORS: dict[str, type[BaseException]] = {
    "IncompatibleCheckpointError": IncompatibleCheckpointError,
    "TypeError": TypeError,
    "ValueError": ValueError,
    "CheckpointError": CheckpointError,
    "CheckpointWriteError": CheckpointWriteError,
    "CheckpointNotFoundError": CheckpointNotFoundError,
}


def _no_trainer() -> None:
    return None


def raise_everywhere(trainer: Trainer, error: BaseException | None, what: str) -> None:
    """Rank zero's outcome, broadcast: every rank raises, or none does (no rank waits forever)."""
    status = None if error is None else (type(error).__name__, str(error))
    if trainer.world_size > 1:
        status = trainer.strategy.broadcast(status, src=0)
    if status is None:
        return
    if error is not None:
        raise error
    name, message = status
    cls = _REMOTE_ERRORS.get(name, CheckpointWriteError)
    raise cls(f"{what} failed on global rank 0 ({name}): {message}")


def time_due_everywhere(trainer: Trainer, trigger: Any, seconds: float | None) -> bool:
    """Whether ``save_every_n_seconds`` is due, by rank zero's clock on every rank (a collective)."""
    if seconds is None:
        return False
    due = bool(trainer.is_global_zero and trigger.time_due())
    if trainer.world_size > 1:
        due = bool(trainer.strategy.broadcast(due, src=0))
    return due


def position(trainer: Trainer) -> tuple[bool, int]:
    """(saved between two batches of an epoch?, batches of that epoch already trained on)."""
    epoch = trainer.fit_loop.epoch_progress.current
    progress = trainer.fit_loop.epoch_loop.batch_progress
    # Lightning resumes mid-epoch only when the epoch was started but not processed.
    if epoch.processed >= epoch.ready or progress.is_last_batch or progress.current.ready == 0:
        return False, 0
    return True, int(progress.current.ready)


class WarningFilters:
    """The callback's own entries in ``warnings.filters``, removed once they no longer apply."""

    def __init__(self) -> None:
        self.added: list[Any] = []

    def ignore(self, message: str) -> None:
        warnings.filterwarnings("ignore", message=message)
        self.added.append(warnings.filters[0])

    def drop(self) -> None:
        for f in self.added:
            with contextlib.suppress(ValueError):
                warnings.filters.remove(f)
        self.added = []


def _fast_forward(trainer: Trainer, consumed: int) -> bool:
    """Skip the batches of the interrupted epoch that were already trained on.

    Lightning re-creates the epoch's data iterator on resume and would replay the epoch from its
    first batch (unless the loader is stateful: then Lightning restores its position itself).
    """
    fit_loop = trainer.fit_loop
    loader, fetcher, stateful = _compat.fit_data(trainer)
    if loader is None or fetcher is None or stateful:
        return False
    if getattr(fetcher, "batches", None) or getattr(fetcher, "iterator", None) is None:
        _rank_zero(
            trainer,
            "CheckpointCallback: cannot skip the already-trained batches of the interrupted epoch "
            "(the train data iterator has no length, so Lightning pre-fetched from it); the epoch is replayed.",
            warn=True,
        )
        return False
    # Lightning sets the samplers' epoch (DistributedSampler's shuffling seed) only later, in
    # on_advance_start; the skipped batches must come from this epoch's order.
    for dl in loader.flattened:
        _compat.set_sampler_epoch(trainer, dl, fit_loop.epoch_progress.current.processed)
    for _ in range(consumed):
        try:
            next(fetcher.iterator)
        except StopIteration:
            break
    return True


def _gather(trainer: Trainer, local: Any) -> list[Any]:
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, local)
        return out
    return [local]


def _metrics(trainer: Trainer) -> dict[str, float]:
    out = {}
    for k, v in trainer.callback_metrics.items():
        try:
            value = float(v.item() if isinstance(v, torch.Tensor) else v)
        except (TypeError, ValueError, RuntimeError):
            continue
        out[str(k)] = value
    return out


def _info(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    cls = type(pl_module)
    ns = _compat.namespace_of(trainer)
    return {
        "framework": "lightning",
        "framework_versions": {ns: _compat.version(ns), "torch": torch.__version__},
        "model": {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "hparams": _jsonable(dict(pl_module.hparams)),
        },
        "epoch": trainer.current_epoch,
    }


def _fn(trainer: Trainer) -> str:
    """The running stage ("fit", "validate", ...) as a string, whichever namespace's enum holds it."""
    fn = trainer.state.fn
    return str(getattr(fn, "value", fn))


def _rank_zero(trainer: Trainer, message: str, warn: bool = False) -> None:
    rank_zero = _compat.submodule(_compat.namespace_of(trainer), "pytorch", "utilities.rank_zero")
    (rank_zero.rank_zero_warn if warn else rank_zero.rank_zero_info)(message)


# Strategies whose model state Lightning gathers in full on rank zero (``lightning_module_state_dict``)
# and loads back whole (``load_model_state_dict``): the only ones a resume restores exactly today.
_EXACT_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
# Subclasses of those that shard state (or keep it outside the module's state_dict).
_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def check_strategy(strategy: Any, sharded: bool = False) -> None:
    """Refuse a strategy whose state this library cannot save and restore exactly.

    ``sharded=True`` is for a save path that writes each rank's shards (`ckpt_callbacks.distributed`): it then accepts
    the sharded strategies too.
    """
    names = [c.__name__ for c in type(strategy).__mro__]
    refused = [n for n in _SHARDED_STRATEGIES if n in names]
    if sharded and refused:
        return
    if refused or not any(n in names for n in _EXACT_STRATEGIES):
        raise ValueError(
            f"CheckpointCallback cannot save and restore the state of {type(strategy).__name__} exactly: "
            "its model or optimizer state is sharded across ranks (or held outside the module's state_dict), "
            "so a resume would restore the step but not the weights. Expected a single-device or DDP "
            f"strategy, or ModelParallelStrategy. Received: strategy={type(strategy).__name__}. Use "
            "strategy='ddp' (or a single device), ModelParallelStrategy with fully_shard in configure_model "
            "(saved sharded), or Lightning's own ModelCheckpoint for this strategy."
        )
