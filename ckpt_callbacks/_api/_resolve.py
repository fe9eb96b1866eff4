"""Path forms and the one-shot functions: which checkpoint a path names, and save / load / list /
read one checkpoint without a manager.

A path names a checkpoint as its prefix (``.../ckpt-100``, which has a ``.index``), its ``.index``
file, or a pointer file (``.../last.ckpt``: small JSON naming the checkpoint next to it, written by
``FsspecCheckpointIO``); a directory names its newest valid checkpoint (its ``checkpoint`` state
file says which).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from .. import _validation
from .._checkpoint._checkpoint_io import meta_doc, write_checkpoint
from .._checkpoint._checkpoint_read import (
    MAX_META_BYTES,
    load,
    newest_first,
    newest_valid,
    read_bounded,
    read_tensors,
    written_by_us,
)
from .._checkpoint._checkpoint_read import read_index as _read_index
from .._format import _format as fmt
from .._format import _kinds
from .._format._index import Index
from .._format._names import INDEX_SUFFIX, META_SUFFIX, join_url, split_url, step_of
from .._manager import _sharding
from .._manager._state import CheckpointState, best_of, checked_name, no_best_error, read_state
from .._storage import Storage
from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError

# Pointer files: ``{"format": POINTER_FORMAT, "version": 1, "checkpoint": "<name>"}``. Files written
# before pointers had a neutral name carry ``"ckpt_callbacks.lightning"`` and are read the same.
POINTER_FORMAT = "ckpt_callbacks.pointer"
POINTER_FORMATS = (POINTER_FORMAT, "ckpt_callbacks.lightning")
POINTER_VERSION = 1
MAX_POINTER_BYTES = 4096
_POINTER_HEADS = tuple(b'{"format":"' + f.encode() + b'"' for f in POINTER_FORMATS)


def pointer_bytes(checkpoint: str) -> bytes:
    """The bytes of a pointer file naming ``checkpoint`` (a name in the same directory)."""
    doc = {"format": POINTER_FORMAT, "version": POINTER_VERSION, "checkpoint": checkpoint}
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def pointer_target(storage: Storage, name: str) -> str | None:
    """The checkpoint name a pointer file names; None when ``name`` is no pointer (or missing)."""
    try:
        data = storage.read_bytes(name, max_bytes=MAX_POINTER_BYTES)
    except CheckpointError:
        return None
    if not data.startswith(_POINTER_HEADS):
        return None
    try:
        doc = json.loads(data[: MAX_POINTER_BYTES + 1])
    except ValueError:
        raise CorruptCheckpointError(
            f"Checkpoint marker {storage.url_of(name)!r} is not valid JSON."
        ) from None
    target = doc.get("checkpoint") if isinstance(doc, dict) else None
    if not fmt.is_plain_name(target):
        raise CorruptCheckpointError(
            f"Checkpoint marker {storage.url_of(name)!r} names an invalid checkpoint {str(target)[:80]!r}."
        )
    return target


def resolve_one(path: str | os.PathLike, storage_options: dict | None = None) -> str | None:
    """The checkpoint prefix ``path`` names, or None when it names no checkpoint of this format.

    Accepted: a checkpoint prefix (``.../ckpt-100``, which has a ``.index``), its ``.index`` file, and a
    pointer file written by ``FsspecCheckpointIO`` (``.../last.ckpt``).
    """
    p = os.fspath(path)
    directory, name = split_url(p)
    if not name:
        return None
    storage = Storage(directory, storage_options)
    if storage.exists(name + INDEX_SUFFIX):
        return p
    target = pointer_target(storage, name)
    if target is not None:
        return join_url(directory, target)
    if name.endswith(INDEX_SUFFIX) and written_by_us(storage, name):
        return p[: -len(INDEX_SUFFIX)]
    return None


def resolve_checkpoint(
    path_or_directory: str | os.PathLike,
    storage_options: dict | None = None,
    verify: bool = True,
    checkpoint: str = "latest",
) -> str:
    """A checkpoint path: the checkpoint ``path_or_directory`` names (see :func:`resolve_one`), or
    for a directory with a ``checkpoint`` state file its newest valid checkpoint (``checkpoint="latest"``)
    or the best one its manager kept by ``keep_best`` (``checkpoint="best"``)."""
    return _resolved(path_or_directory, storage_options, verify, checkpoint)[0]


def _resolved(
    path_or_directory: str | os.PathLike,
    storage_options: dict | None,
    verify: bool,
    checkpoint: str = "latest",
) -> tuple[str, dict | None]:
    """:func:`resolve_checkpoint`, and the checked index when choosing the checkpoint read it (a
    directory's newest valid one, or its best), so that the load which follows does not read it again."""
    _validation.check_checkpoint_choice(checkpoint)
    p = os.fspath(path_or_directory)
    one = resolve_one(p, storage_options)
    if one is not None:
        if checkpoint == "best":
            raise ValueError(
                f"checkpoint='best' chooses among the checkpoints of a directory, but {p!r} is one "
                "checkpoint. Pass its directory, or leave checkpoint at its default."
            )
        return one, None
    d = Storage(p, storage_options)
    found = read_state(d)
    if found is None:
        raise CheckpointNotFoundError(
            f"No checkpoint at {p!r}: expected a checkpoint path (with a '.index' file) or a directory with a "
            "'checkpoint' state file."
        )
    state = found[0]
    if checkpoint == "best":
        best = best_of(found[2])
        if best is None:
            raise no_best_error(p, ranked=False)
        if verify:  # best means this one: corrupt is an error, not a fallback
            return d.url_of(best), _read_index(d, best)
        if not d.exists(best + INDEX_SUFFIX):
            raise CheckpointNotFoundError(f"The best checkpoint {d.url_of(best)!r} has no index file.")
        return d.url_of(best), None
    latest = checked_name(state.model_checkpoint_path) if state.model_checkpoint_path else None
    names = newest_first([checked_name(n) for n in state.all_model_checkpoint_paths], latest)
    if verify:
        chosen = newest_valid(d, names, lambda cname: _read_index(d, cname))
        if chosen is not None:
            return d.url_of(chosen[0]), chosen[1]
    else:
        for cname in names:
            if d.exists(cname + INDEX_SUFFIX):
                return d.url_of(cname), None
    raise CheckpointNotFoundError(f"No valid checkpoint in {p!r}.")


def open_checkpoint(path: str | os.PathLike, storage_options: dict | None = None) -> tuple[Storage, str]:
    """``(storage of its directory, checkpoint name)`` for a checkpoint path (no resolving)."""
    directory, name = split_url(path)
    return Storage(directory, storage_options), name


# ===================================================================== the one-shot functions


def save_checkpoint(
    path: str | os.PathLike,
    state: Any,
    *,
    meta: dict | None = None,
    storage_options: dict | None = None,
    allow_pickle: bool = False,
    _step: int | None = None,
    _info: dict | None = None,
) -> None:
    """Write one checkpoint (``<path>.data-*``, ``<path>.meta``, ``<path>.index``) without a manager.

    No state file is written and no retention applied: the checkpoint is read back by its path. The
    ``.index`` is written last, so a reader never sees a half-written checkpoint.

    Args:
        path: the checkpoint path without suffix, local or any fsspec URL (``"runs/a/ckpt-10"``,
            ``"s3://bucket/run/ckpt-10"``); its directory is created if needed.
        state: a tree of dicts, lists, tuples, numpy arrays, torch tensors, numbers, strings, bytes and
            ``None``.
        meta: JSON-like values stored in the ``.meta`` file under ``"user"``.
        storage_options: passed to fsspec (credentials, endpoint, ...).
        allow_pickle: store leaves of other types with pickle (off by default).

    The step recorded in the index and meta is the trailing number of the name (``ckpt-1000``), or
    ``_step``; ``_step`` and ``_info`` (a framework description) are for the framework adapters.

    Raises:
        TypeError: a leaf of a type the format does not store (naming its key path).
        CheckpointWriteError: the storage refused a write.

    Example:
        >>> save_checkpoint("runs/a/ckpt-10", {"w": np.zeros(3)})
        >>> load_checkpoint("runs/a/ckpt-10")["w"]
        array([0., 0., 0.])
    """
    directory, name = split_url(os.fspath(path))
    fmt.check_name(name)
    storage = Storage(directory, storage_options)
    storage.makedirs()
    encoded = fmt.encode_tree(state, allow_pickle=allow_pickle)
    step = step_of(name) if _step is None else int(_step)
    write_checkpoint(storage, name, encoded, step, meta_doc(step, time.time(), None, meta, _info))


def load_checkpoint(
    path: str | os.PathLike,
    *,
    storage_options: dict | None = None,
    verify: bool = True,
    allow_pickle: bool = False,
    into: Any = None,
    checkpoint: str = "latest",
) -> dict:
    """Load one checkpoint's state tree; with ``verify`` every checksum is checked.

    Args:
        path: a checkpoint (``.../ckpt-100``, its ``.index``, or a pointer file written by
            ``FsspecCheckpointIO``) or, like ``tf.train.load_checkpoint``, a directory with a
            ``checkpoint`` state file (its newest valid checkpoint; corrupt newer ones are skipped with
            a warning). Local path or any fsspec URL.
        storage_options: passed to fsspec (credentials, endpoint, ...).
        verify: check every tensor's checksum (and those of the index and meta) while reading.
        allow_pickle: unpickle leaves saved with ``allow_pickle=True``; refused by default, since
            unpickling can execute code.
        into: restore in place: a tree of existing numpy arrays / CPU or GPU torch tensors (e.g.
            ``{"state_dict": module.state_dict()}``). Each saved tensor at the same key path (dict
            keys, list positions) is read straight into that memory, and the result holds those
            same objects; keys not in ``into`` load as usual. Strict, like
            ``load_state_dict(strict=True)``: every tensor in ``into`` must have a saved tensor of the
            same shape and dtype at its key path, else IncompatibleCheckpointError names the key
            paths and nothing is written (leave such keys out of ``into`` to keep their values).
            Saved tensors with no destination in ``into`` are simply loaded. An ``into`` holding
            ``DTensor`` leaves (sharded state) is filled by ``torch.distributed.checkpoint.load``, a
            collective call on every rank, whatever the number of ranks that wrote the checkpoint.
        checkpoint: for a directory, which checkpoint: ``"latest"`` (the newest valid one) or
            ``"best"`` (the best one its manager kept by ``keep_best``).

    Returns:
        The state tree as saved: dicts, lists, tuples, numpy arrays, numbers, strings. Tensors saved
        from torch come back as torch tensors when torch is importable, else as numpy arrays; those
        restored in place are the objects of ``into``. From local disk, the others are writable
        copy-on-write views of the data file's mapping (as safetensors loads): no fresh memory is
        mapped until a tensor is written to, and the checkpoint's files never change.

    Raises:
        CheckpointNotFoundError: nothing at ``path`` (also a ``FileNotFoundError``).
        CorruptCheckpointError: a checksum, size or structure does not match. Restoring in place,
            a checksum failure found after bytes were written leaves ``into`` partly overwritten
            (the message says so): restore it again from another checkpoint.
        IncompatibleCheckpointError: written by a newer, incompatible format version, or ``into``
            does not fit the checkpoint (nothing written).
        ValueError: a numpy array of ``into`` is read-only.

    Example:
        >>> state = load_checkpoint("runs/mnist")         # the newest valid checkpoint of a directory
        >>> state = load_checkpoint("s3://bucket/run/ckpt-1000", storage_options={"anon": False})
        >>> state = load_checkpoint("runs/a", into={"state_dict": module.state_dict()})  # in place
        >>> state = load_checkpoint("runs/a", checkpoint="best")  # the best kept by keep_best
    """
    return load_with_path(
        path, storage_options, verify=verify, allow_pickle=allow_pickle, into=into, checkpoint=checkpoint
    )[1]


def load_with_path(
    path: str | os.PathLike,
    storage_options: dict | None = None,
    *,
    verify: bool = True,
    allow_pickle: bool = False,
    into: Any = None,
    checkpoint: str = "latest",
) -> tuple[str, dict]:
    """``(checkpoint path, state)``: :func:`load_checkpoint`, also saying which checkpoint a directory
    named (read once: the index read to choose it is the one loaded). ``into`` may also be a
    function of the index (see :func:`._checkpoint_read.load`)."""
    resolved, index = _resolved(path, storage_options, True, checkpoint)
    storage, name = open_checkpoint(resolved, storage_options)
    collective = _sharding.collective_for(into)
    if collective is not None:
        return resolved, collective.backend.load_into(storage.url_of(name), into, storage_options, None)
    return resolved, load(storage, name, verify=verify, allow_pickle=allow_pickle, into=into, index=index)


def list_variables(
    path: str | os.PathLike, storage_options: dict | None = None, *, checkpoint: str = "latest"
) -> list[tuple[str, str, tuple]]:
    """``(name, dtype, shape)`` of every tensor in a checkpoint (or a directory's latest), by name.

    Reads only the index (no tensor data), like ``tf.train.list_variables``. Names are key paths in the
    state tree joined with ``/``; ``path`` is anything :func:`load_checkpoint` accepts.

    Example:
        >>> save_checkpoint("runs/a/ckpt-10", {"model": {"w": np.zeros((4, 4), np.float32)}, "epoch": 3})
        >>> list_variables("runs/a/ckpt-10")
        [('model/w', 'float32', (4, 4))]
    """
    path = resolve_checkpoint(path, storage_options, verify=False, checkpoint=checkpoint)
    index = _read_index(*open_checkpoint(path, storage_options))
    return sorted((n, t["dtype"], tuple(t["shape"])) for n, t in index["tensors"].items())


def read_meta(path: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """The ``.meta`` JSON of a checkpoint (any form :func:`resolve_one` accepts)."""
    path = resolve_one(path, storage_options) or os.fspath(path)
    storage, name = open_checkpoint(path, storage_options)
    data = read_bounded(storage, name + META_SUFFIX, MAX_META_BYTES)
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(f"{os.fspath(path) + META_SUFFIX!r} is not valid JSON.") from None


def read_index(path: str | os.PathLike, storage_options: dict | None = None, verify: bool = True) -> Index:
    """The checked ``.index`` of a checkpoint (any form :func:`resolve_one` accepts)."""
    storage, name = open_checkpoint(resolve_one(path, storage_options) or os.fspath(path), storage_options)
    return _read_index(storage, name, verify=verify)


def get_checkpoint_state(
    directory: str | os.PathLike, storage_options: dict | None = None
) -> CheckpointState | None:
    """The directory's ``checkpoint`` state file, like ``tf.train.get_checkpoint_state``; None without one.

    Returns:
        A :class:`CheckpointState`: ``model_checkpoint_path`` (the newest checkpoint) and
        ``all_model_checkpoint_paths`` (every kept one, oldest first) joined to the directory, their
        save times in ``all_model_checkpoint_timestamps`` (POSIX seconds) and
        ``last_preserved_timestamp``. None when the directory has no state file.

    Raises:
        CorruptCheckpointError: the file cannot be parsed, or names a path outside the directory.
    """
    storage = Storage(directory, storage_options)
    found = read_state(storage)
    if found is None:
        return None
    state = found[0]
    return CheckpointState(
        model_checkpoint_path=storage.url_of(checked_name(state.model_checkpoint_path)),
        all_model_checkpoint_paths=[
            storage.url_of(checked_name(p)) for p in state.all_model_checkpoint_paths
        ],
        all_model_checkpoint_timestamps=list(state.all_model_checkpoint_timestamps),
        last_preserved_timestamp=state.last_preserved_timestamp,
    )


def latest_checkpoint(directory: str | os.PathLike, storage_options: dict | None = None) -> str | None:
    """Path of the checkpoint the state file names as newest, or None (like ``tf.train.latest_checkpoint``).

    None also when that checkpoint's ``.index`` is missing. Checksums are not checked: to read the
    newest *valid* checkpoint, pass the directory to :func:`load_checkpoint`.
    """
    storage = Storage(directory, storage_options)
    found = read_state(storage)
    if found is None or not found[0].model_checkpoint_path:
        return None
    name = checked_name(found[0].model_checkpoint_path)
    return storage.url_of(name) if storage.exists(name + INDEX_SUFFIX) else None


def copy_checkpoint(
    path: str | os.PathLike, out: str | os.PathLike, storage_options: dict | None = None
) -> None:
    """Copy one checkpoint (any form :func:`resolve_checkpoint` accepts) to the checkpoint path ``out``
    (local or any fsspec URL), self-contained: every tensor, those it points into earlier data files
    for included (incremental checkpoints), in data files of its own; its tree and ``.meta`` as they
    are. Every checksum is verified on the way. ``out`` is read back by its path, as a
    :func:`save_checkpoint` one is (no state file is written)."""
    storage, name = open_checkpoint(resolve_checkpoint(path, storage_options), storage_options)
    index = _read_index(storage, name)
    entries = {n: dict(t) for n, t in index["tensors"].items()}  # read_tensors rewrites chunked ones
    tensors = read_tensors(storage, index, verify=True)
    meta = json.loads(read_bounded(storage, name + META_SUFFIX, MAX_META_BYTES))
    encoded = fmt.EncodedState(index["tree"])
    arrays = {}
    for tname, t in entries.items():
        arr, kind = tensors[tname], t.get("kind", _kinds.NUMPY)
        arr = (
            _kinds.get(kind).to_numpy(arr)
            if kind != _kinds.NUMPY and not isinstance(arr, np.ndarray)
            else arr
        )
        arrays[tname] = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        dtype = fmt.dtype_from_name(t["dtype"])
        encoded.tensors.append(
            fmt.TensorEntry(tname, dtype, tuple(t["shape"]), None, kind, t.get("byteorder", "<"))
        )
    directory, out_name = split_url(os.fspath(out))
    target = Storage(directory, storage_options)
    target.makedirs()
    write_checkpoint(target, fmt.check_name(out_name), encoded, index["step"], meta, arrays)
