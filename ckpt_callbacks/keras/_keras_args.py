"""Keras' own checkpoint arguments (``save_freq``, ``save_best_only``, ``initial_value_threshold``) in
terms of this library's triggers, and the "did the monitored value improve?" rule of Keras'
``ModelCheckpoint`` (strict improvement over the best value seen, starting from the threshold)."""

from __future__ import annotations

import math
from typing import Any

from .._validation import _fail, _is_int, _is_number
from ..errors import ArgumentTypeError


def check_save_freq(save_freq: Any, *, owner: str = "CheckpointCallback") -> None:
    """``"epoch"`` or an int >= 1 (``None`` too for ``CheckpointCallback``, where it is optional)."""
    ok_none = owner == "CheckpointCallback" and save_freq is None
    if ok_none or save_freq == "epoch" or (_is_int(save_freq) and save_freq >= 1):
        return
    # Keras' own words first (BackupAndRestore's, ModelCheckpoint's), which code written for Keras may match.
    words = (
        "Invalid value for argument `save_freq`" if owner == "BackupAndRestore" else "Unrecognized save_freq"
    )
    error = ValueError if _is_int(save_freq) or isinstance(save_freq, str) else ArgumentTypeError
    raise error(
        f"{words} of {owner}: expected 'epoch' (save at the end of every "
        f"epoch) or an int >= 1 (save every that many batches). Received: save_freq={save_freq!r}. "
        "Pass e.g. save_freq='epoch' or save_freq=100."
    )


def triggers(save_freq: Any, save_every_n_steps: Any, save_on_epoch_end: bool) -> tuple[Any, bool]:
    """``(save_every_n_steps, save_on_epoch_end)`` with ``save_freq`` folded in; a ``save_freq`` that
    says something else than ``save_every_n_steps`` raises ValueError."""
    check_save_freq(save_freq)
    if save_freq is None:
        return save_every_n_steps, save_on_epoch_end
    if save_freq == "epoch":
        if save_every_n_steps is not None:
            raise ValueError(
                "save_freq='epoch' saves only at epoch ends, but save_every_n_steps asks for step saves too. "
                f"Received: save_freq='epoch', save_every_n_steps={save_every_n_steps!r}. Pass one of them "
                "(save_freq='epoch' is save_on_epoch_end=True)."
            )
        return None, True
    if save_every_n_steps is not None and save_every_n_steps != save_freq:
        raise ValueError(
            "save_freq and save_every_n_steps name two different step intervals. Received: "
            f"save_freq={save_freq!r}, save_every_n_steps={save_every_n_steps!r}. Pass one of them "
            "(an int save_freq is save_every_n_steps)."
        )
    return save_freq, save_on_epoch_end


def check_best_only(save_best_only: Any, initial_value_threshold: Any, monitor: Any) -> None:
    if not isinstance(save_best_only, bool):
        _fail("save_best_only", save_best_only, "True or False", "Pass save_best_only=True.", wrong_type=True)
    if initial_value_threshold is not None and (
        not _is_number(initial_value_threshold) or math.isnan(initial_value_threshold)
    ):
        _fail(
            "initial_value_threshold",
            initial_value_threshold,
            "a number or None",
            "Pass e.g. initial_value_threshold=0.5 (a first save needs a better value than this).",
            wrong_type=not _is_number(initial_value_threshold),
        )
    if initial_value_threshold is not None and not save_best_only:
        raise ValueError(
            "initial_value_threshold is the value a save must beat under save_best_only=True, and "
            f"save_best_only is False. Received: initial_value_threshold={initial_value_threshold!r}, "
            "save_best_only=False. Pass save_best_only=True too, or drop initial_value_threshold."
        )
    if save_best_only and (not isinstance(monitor, str) or not monitor):
        raise ValueError(
            f"save_best_only needs the metric to compare. Received: monitor={monitor!r}. "
            "Pass e.g. monitor='val_loss'."
        )


def improved(current: float, best: float | None, mode: str) -> bool:
    """Keras' rule: the first value always improves (unless a threshold is set), then only a strictly
    better one; NaN never does."""
    if best is None:
        return not math.isnan(current)
    return current < best if mode == "min" else current > best
