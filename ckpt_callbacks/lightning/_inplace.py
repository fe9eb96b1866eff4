"""Resume in place: read a checkpoint's weights straight into the live module's parameters.

The ``into`` tree mirrors the key paths :func:`._convert.to_tree` saves (``state_dict/<name>``). Its
values are the module's Parameters and buffers themselves (``keep_vars=True``), so Lightning's later
``load_state_dict`` copies each tensor onto itself, which torch skips.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._checkpoint._readinto import in_place_or_plain


def module_into(module: Any) -> dict[str, Any] | None:
    """The ``into`` tree for restoring ``module``'s weights in place, or None without a module."""
    if module is None:
        return None
    return {"state_dict": module.state_dict(keep_vars=True)}


def load_into_module(load: Callable[..., Any], module: Any) -> Any:
    """``load(into=...)`` into ``module``'s own tensors; ``load()`` when they do not fit.

    The strict check runs before any byte is written, so the fallback (a module with keys the
    checkpoint lacks, e.g. ``strict_loading=False``, or changed shapes / dtypes) starts from the
    module untouched and leaves the usual ``load_state_dict`` to report or tolerate the mismatch.
    """
    return in_place_or_plain(load, module_into(module))


def snapshot_like(trainer: Any, save_optimizer: bool) -> dict[str, Any]:
    """A tree shaped like the tensors the callback saves (weights and optimizer states), for
    ``CheckpointManager._prepare_snapshot``; nothing is copied."""
    tree: dict[str, Any] = {"state_dict": trainer.lightning_module.state_dict()}
    if save_optimizer:
        tree["optimizer_states"] = [opt.state_dict() for opt in trainer.optimizers]
    return tree
