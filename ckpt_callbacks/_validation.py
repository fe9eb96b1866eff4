"""Constructor argument checks shared by CheckpointManager and both callbacks.

Every message says what is wrong, what was expected, the value received and how to fix it. A value
of the wrong type raises :class:`ArgumentTypeError`, which is both a ``TypeError`` and a
``ValueError``: callers catching either (bad arguments raise ValueError / TypeError) see it.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from .errors import ArgumentTypeError

_PREFIX_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*\Z")


def _fail(name: str, value: Any, expected: str, fix: str, wrong_type: bool = False) -> None:
    error = ArgumentTypeError if wrong_type else ValueError
    raise error(f"{name} must be {expected}. Received: {name}={value!r}. {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_directory(directory: Any) -> None:
    if not isinstance(directory, (str, os.PathLike)):
        _fail(
            "directory",
            directory,
            "a non-empty path or fsspec URL",
            "Pass e.g. 'runs/exp1' or 's3://bucket/exp1'.",
            wrong_type=True,
        )
    if not os.fspath(directory):
        _fail("directory", directory, "a non-empty path or fsspec URL", "Pass e.g. 'runs/exp1'.")
    path = os.fspath(directory)
    if "://" not in path and os.path.isfile(path):  # os.makedirs would fail with "File exists"
        from ._manager import _foreign  # reads the file's head: what it is

        kind = _foreign.identify_file(*_foreign.split_file(path))
        parent = os.path.dirname(path) or "."
        _fail(
            "directory",
            directory,
            "a directory to write checkpoints into (existing or not), not a file",
            f"The path is an existing file{': ' + kind.what if kind else ''}. Pass a directory, e.g. "
            f"{os.path.join(parent, 'checkpoints')!r}; checkpoints are named inside it (ckpt-<step>).",
        )


def check_storage_options(storage_options: Any) -> None:
    if storage_options is not None and not isinstance(storage_options, dict):
        _fail(
            "storage_options",
            storage_options,
            "a dict or None",
            "Pass the fsspec filesystem options as a dict, e.g. {'anon': False}.",
            wrong_type=True,
        )


def check_flags(**flags: Any) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            _fail(name, value, "True or False", f"Pass {name}=True or {name}=False.", wrong_type=True)


def check_manager_args(
    prefix: Any, max_to_keep: Any, hours: Any, keep_best: Any, monitor: Any, mode: Any, clock: Any
) -> None:
    """Prefix, retention and clock: the same rules (and words) for the manager and both callbacks."""
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        _fail(
            "prefix",
            prefix,
            "a plain file-name prefix (letters, digits, '_', '.', '-', '=', '+'; not starting with '.')",
            "Use for example prefix='ckpt'.",
            wrong_type=not isinstance(prefix, str),
        )
    if max_to_keep is not None and (not _is_int(max_to_keep) or max_to_keep < 1):
        _fail(
            "max_to_keep",
            max_to_keep,
            "an int >= 1 or None",
            "Use e.g. max_to_keep=5, or max_to_keep=None to keep every checkpoint.",
            wrong_type=not _is_int(max_to_keep),
        )
    if hours is not None and (not _is_number(hours) or not math.isfinite(hours) or hours <= 0):
        _fail(
            "keep_checkpoint_every_n_hours",
            hours,
            "a positive number of hours or None",
            "Use e.g. keep_checkpoint_every_n_hours=1.0, or None to keep no hourly checkpoints.",
            wrong_type=not _is_number(hours),
        )
    if keep_best is not None:
        if not _is_int(keep_best) or keep_best < 1:
            _fail(
                "keep_best",
                keep_best,
                "an int >= 1 or None",
                "Use e.g. keep_best=3 with monitor='val_loss', or keep_best=None.",
                wrong_type=not _is_int(keep_best),
            )
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                f"keep_best needs the metric to rank by. Received: monitor={monitor!r}. "
                "Pass e.g. monitor='val_loss' and metrics={'val_loss': ...} to save()."
            )
    if mode not in ("auto", "min", "max"):
        _fail(
            "mode",
            mode,
            "'auto', 'min' or 'max'",
            "Use mode='auto' (Keras' rule: max for accuracy-like names, else min), mode='min' when lower "
            "is better (a loss), mode='max' when higher is (an accuracy).",
        )
    if not callable(clock):
        _fail(
            "clock",
            clock,
            "a zero-argument callable returning POSIX seconds",
            "Pass e.g. clock=time.time.",
            wrong_type=True,
        )


def check_triggers(steps: Any, seconds: Any, on_epoch_end: bool, on_train_end: bool) -> None:
    """The callbacks' save triggers (after check_flags has checked the two booleans)."""
    if steps is not None and (not _is_int(steps) or steps < 1):
        _fail(
            "save_every_n_steps",
            steps,
            "an int >= 1 or None",
            "Use e.g. save_every_n_steps=1000, or None to save only at the end of training.",
            wrong_type=not _is_int(steps),
        )
    if seconds is not None and (not _is_number(seconds) or not math.isfinite(seconds) or seconds <= 0):
        _fail(
            "save_every_n_seconds",
            seconds,
            "a positive number of seconds or None",
            "Use e.g. save_every_n_seconds=600.",
            wrong_type=not _is_number(seconds),
        )
    if not (steps or seconds or on_epoch_end or on_train_end):
        raise ValueError(
            "CheckpointCallback would never save: every trigger is off. Received: save_every_n_steps=None, "
            "save_every_n_seconds=None, save_on_epoch_end=False, save_on_train_end=False. "
            "Enable at least one, e.g. save_every_n_steps=1000."
        )


CHECKPOINT_CHOICES = ("latest", "best")


def check_checkpoint_choice(checkpoint: Any) -> None:
    """``checkpoint=``: which checkpoint of a directory a reader picks."""
    if checkpoint not in CHECKPOINT_CHOICES:
        _fail(
            "checkpoint",
            checkpoint,
            '"latest" or "best"',
            'Use "latest" for the newest valid checkpoint, "best" for the best one kept by keep_best, '
            "or pass the checkpoint's own path instead of its directory.",
            wrong_type=not isinstance(checkpoint, str),
        )
