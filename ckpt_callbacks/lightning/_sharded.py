"""``CheckpointCallback`` under ``ModelParallelStrategy``: every rank writes its own shards.

Under ``ModelParallelStrategy`` (FSDP2 ``fully_shard``, tensor parallelism) Lightning's checkpoint dict
already holds DTensor state dicts (``get_model_state_dict`` / ``get_optimizer_state_dict``). Saving it
from rank zero would gather nothing and restore nothing; instead every rank hands the same dict to
:func:`ckpt_callbacks.distributed.save`, a collective in which each rank writes its data file and the
coordinator commits. A failure on any rank raises ``CheckpointWriteError`` on every rank.

Resume (after ``strategy.setup``: the module is sharded and the optimizers exist): the template is
the checkpoint dict Lightning would dump now (same keys, same DTensor layout), DCP fills it in place
from the newest valid checkpoint, ``set_model_state_dict`` / ``set_optimizer_state_dict`` put the
shards into the module and optimizers, and the rest (loops, schedulers, callbacks, precision plugin)
goes through Lightning's checkpoint connector as for any resume.

``FSDPStrategy`` (FSDP1) is not wired here: Lightning 2.6 refuses it on CPU, so it cannot be tested
on this project's CPU test setup, and its state dicts are ShardedTensors, untested with the writer.
"""

from __future__ import annotations

from typing import Any

from . import _compat, _convert, _rng

_SUPPORTED = ("ModelParallelStrategy",)


def applies(strategy: Any) -> bool:
    """Whether ``strategy`` saves and restores through this module."""
    if not any(c.__name__ in _SUPPORTED for c in type(strategy).__mro__):
        return False
    try:
        import torch.distributed.checkpoint.state_dict  # noqa: F401

        from .. import distributed  # noqa: F401
    except ImportError:  # a torch without distributed support: the guard refuses the strategy
        return False
    return True


def manager(cb: Any) -> Any:
    """The callback's manager on every rank (rank 0 holds the writer lock and applies retention)."""
    from .. import distributed as cd

    return cd.manager(
        cb.directory,
        prefix=cb.prefix,
        max_to_keep=cb.max_to_keep,
        keep_checkpoint_every_n_hours=cb.keep_checkpoint_every_n_hours,
        keep_best=cb.keep_best,
        monitor=cb.monitor if cb.keep_best else None,
        mode=cb.mode,
        storage_options=cb.storage_options,
        async_save=cb.async_save,
        allow_pickle=cb.allow_pickle,
        clock=cb._clock,
    )


def dump(trainer: Any) -> dict[str, Any]:
    """Lightning's checkpoint dict with the model and optimizer states sharded (DTensors), on every rank.

    The same for either ``save_distributed_checkpoint``: each rank writes its own shards, and the
    checkpoint still loads as full tensors in one process (``load_checkpoint``), which is what
    ``save_distributed_checkpoint=False`` asks of Lightning's own format.
    """
    with _compat.sharded_state_dicts(trainer.strategy):
        return _compat.dump_checkpoint(trainer)


def save(cb: Any, checkpoint: dict[str, Any], step: int, metrics: dict, info: dict) -> str:
    """Collective save of Lightning's checkpoint dict (DTensors stay sharded); on every rank."""
    from .. import distributed as cd

    tree = _convert.to_tree(checkpoint, allow_pickle=cb.allow_pickle, warned=cb._warned_hparams)
    return cd.save(cb._mgr, tree, step, metrics=metrics, _info=info)


def auto_resume(cb: Any, trainer: Any) -> str | None:
    """Restore the newest valid checkpoint into the sharded module, optimizers, loops and callbacks.

    Collective: every rank calls it (from ``on_fit_start``, after ``strategy.setup``). Returns the
    checkpoint's path, or None when there is none.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from .. import distributed as cd

    world = max(int(trainer.world_size), 1)
    # The template must name every key of the checkpoint DCP should load. The callback's own state
    # carries every rank's RNG states (saved as a list gathered from all ranks); a fresh capture
    # per rank gives the list its saved shape, with tensors DCP fills in place.
    cb._rng_for_save = [{"save": _rng.capture(), "epoch": _rng.capture()} for _ in range(world)]
    try:
        checkpoint = dump(trainer)
    finally:
        cb._rng_for_save = None
    if not cb.save_optimizer:
        checkpoint.pop("optimizer_states", None)
    template = _convert.to_tree(checkpoint, allow_pickle=cb.allow_pickle, warned=cb._warned_hparams)
    path = cd.restore(cb._mgr, template)
    if path is None:
        return None
    module = trainer.strategy.model
    set_model_state_dict(module, template["state_dict"])
    for optimizer, state in zip(trainer.optimizers, template.get("optimizer_states") or []):
        set_optimizer_state_dict(module, optimizer, state)
    restored = _convert.from_tree(template, ns=_compat.namespace_of(trainer))
    # The strategy's load_model_state_dict / load_optimizer_state_dict do nothing (the shards are in
    # place already); the connector restores the rest and calls the on_load_checkpoint hooks.
    _compat.restore_before_setup(trainer, path, restored)
    return path
