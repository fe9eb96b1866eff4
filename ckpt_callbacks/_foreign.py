"""Checks before anything is written: a directory of another tool's checkpoints, an unwritable one.

Files this library did not write are never modified, replaced or deleted. TensorFlow's
``tf.train.CheckpointManager`` writes the very names this library writes (``checkpoint``,
``ckpt-N.index``, ``ckpt-N.data-00000-of-00001``); opening a manager on such a directory would
overwrite its ``checkpoint`` state file at the first save. :func:`check_not_foreign` refuses it at
construction instead. :func:`check_writable` lets a callback fail before training starts rather than
at its first save.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable

from ._names import INDEX_SUFFIX as _INDEX_SUFFIX
from ._state import _COMMENT_KEY, MAX_STATE_FILE_BYTES, STATE_FILE_NAME, parse_state
from ._storage import Storage
from .errors import CheckpointError, CheckpointWriteError, IncompatibleCheckpointError

_LISTED = 5


def check_not_foreign(storage: Storage, prefix: str, written_by_us: Callable[[str], bool]) -> None:
    """Raise IncompatibleCheckpointError when ``storage`` holds checkpoint files another tool wrote.

    Foreign: a ``checkpoint`` state file without this library's records line that names a checkpoint
    whose ``.index`` is not this format (TensorFlow's state file, whatever its prefix); or, when the
    directory has no state file of this library, a ``<prefix>-<step>.index`` together with a
    ``<prefix>-<step>.data-*`` file, neither in this format (TensorFlow's checkpoint files, its state
    file gone). Under this library's own state file such files are a damaged checkpoint (see "Resume" in the README:
    reported and skipped by restore); a lone file with one of our names is a user's file. Neither
    is ever deleted. Only file heads are read (64 bytes each); nothing is written.
    """
    names = set(storage.list_names())
    if not names:
        return
    own = re.compile(rf"{re.escape(prefix)}-\d+(?:\.data-\d{{5}}-of-\d{{5}}|\.index|\.meta)\Z")
    found: list[str] = []
    if STATE_FILE_NAME in names:
        evidence = _foreign_state_file(storage, names, written_by_us)
        if evidence is None:
            # This library's state file: a checkpoint file under it that is not this format is a
            # damaged checkpoint of ours (reported, and skipped, by restore), not another tool's.
            return
        found += evidence
    # Another tool's checkpoint: an index and its data file(s), neither in this format. A lone file
    # with one of our names (a user's notes, a backup) is not one: it is left alone, as always.
    theirs = [n for n in names if own.match(n) and not n.endswith(".meta") and not written_by_us(n)]
    indexed = {n[: -len(_INDEX_SUFFIX)] for n in theirs if n.endswith(_INDEX_SUFFIX)}
    with_data = {n.split(".data-")[0] for n in theirs if ".data-" in n}
    checkpoints = indexed & with_data
    # The state file first, then indexes: what a reader recognises another tool's checkpoints by.
    found += sorted(
        (n for n in theirs if n.split(".")[0] in checkpoints),
        key=lambda n: (not n.endswith(_INDEX_SUFFIX), n),
    )
    if not found:
        return
    shown = ", ".join(found[:_LISTED]) + (f", ... ({len(found)} in all)" if len(found) > _LISTED else "")
    raise IncompatibleCheckpointError(
        f"{storage.url!r} holds checkpoint files this library did not write ({shown}); they look like "
        "another tool's checkpoints (TensorFlow's tf.train.CheckpointManager uses the same names). They are "
        "left untouched: this library never modifies or deletes files it did not write, and a save here "
        f"would replace their '{STATE_FILE_NAME}' state file. Expected a new directory or one written by "
        f"ckpt_callbacks. Received: directory={storage.url!r}, prefix={prefix!r}. Use another directory, or "
        "move the other tool's files away (another prefix is enough only when no 'checkpoint' file of the "
        "other tool is listed above)."
    )


def _foreign_state_file(
    storage: Storage, names: set[str], written_by_us: Callable[[str], bool]
) -> list[str] | None:
    """None for this library's state file; else what marks it as another tool's (maybe nothing)."""
    try:
        data = storage.read_bytes(STATE_FILE_NAME, max_bytes=MAX_STATE_FILE_BYTES)
        if _COMMENT_KEY.encode() in data:
            return None  # this library's state file (its retention records line)
        state, _ = parse_state(data)
    except CheckpointError:
        return []  # unreadable or corrupt: the manager reports it with its own error
    listed = [state.model_checkpoint_path, *state.all_model_checkpoint_paths]
    for name in listed:
        index = os.path.basename(name or "") + _INDEX_SUFFIX
        if name and index in names and not written_by_us(index):
            return [f"{STATE_FILE_NAME} (names {os.path.basename(name)!r})"]
    return []


def check_writable(directory: str, storage_options: dict | None = None) -> None:
    """Raise CheckpointWriteError unless a file can be created in a local ``directory`` (made if missing).

    Object stores are not probed (a probe would cost a write and a delete per start); a save there
    fails with its own CheckpointWriteError.
    """
    storage = Storage(directory, storage_options)
    if not storage.is_local:
        return
    probe = os.path.join(storage.root, f".ckpt_callbacks-write-probe-{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(storage.root, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointWriteError(
            e.errno,
            f"Cannot write checkpoints to {storage.url!r}: {e.strerror or e}. Checked before training starts so "
            "that no work is lost at the first save. Expected a directory this process can create files in. "
            "Fix its permissions, or pass another directory.",
        ) from e
