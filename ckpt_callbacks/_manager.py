"""CheckpointManager and the one-checkpoint functions: save, load, rotate, the state file."""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import _buffers, _lock, _readinto, _validation
from . import _format as fmt
from ._retention import BestN, EveryNHours, LatestN, Retention
from ._state import (
    MAX_STATE_FILE_BYTES,
    STATE_FILE_NAME,
    CheckpointState,
    Record,
    checked_name,
    dump_state,
    parse_state,
)
from ._storage import TEMP_MARK, Storage
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
)

logger = logging.getLogger("ckpt_callbacks")

INDEX_SUFFIX = ".index"
META_SUFFIX = ".meta"
MAX_META_BYTES = 64 * 1024 * 1024
# Small tensors are gathered into one write of this size; big ones go straight to storage.
_COALESCE_BYTES = 4 << 20
# Big tensors are written (and hashed) in chunks of this size: large enough that per-call costs
# vanish, small enough that hashing chunk N overlaps writing it with little left at the end.
_WRITE_CHUNK = 16 << 20
# Above this many bytes an object-store save is split into data shards uploaded concurrently.
_SHARD_BYTES = 256 << 20
# S3's writer uploads the parts of one object in parallel already: there shards only overlap the
# per-object work (Complete) and each one holds a part buffer of its own, so they are larger
# (measured on the local S3 server: 4 shards of 512 MiB beat 8 of 256 MiB for 2 GiB, with 35% less
# memory, and one file beats two for 512 MiB).
_SHARD_BYTES_PARALLEL_PARTS = 512 << 20
_MAX_SHARDS = 8


def _crash_point(name: str) -> None:
    """Test seam, a no-op: crash tests replace it to kill the process at this step of a save."""


def _split(path: str) -> tuple[str, str]:
    """(directory, checkpoint name) of a checkpoint path or URL."""
    path = os.fspath(path).rstrip("/")
    cut = max(path.rfind("/"), path.rfind(os.sep) if os.sep != "/" else -1)
    if cut < 0:
        return ".", path
    if path[:cut].endswith(":/"):  # "memory://ckpt-1"
        return path[: cut + 1], path[cut + 1 :]
    return path[:cut] or "/", path[cut + 1 :]


_TEMP_RE = re.compile(r"\.(?P<base>.+)" + re.escape(TEMP_MARK) + r"[0-9a-f]{8,32}\Z")


def _own_file_re(prefix: str) -> re.Pattern:
    p = re.escape(prefix)
    return re.compile(rf"(?P<ckpt>{p}-\d+)(?:\.data-\d{{5}}-of-\d{{5}}|\.index|\.meta)\Z")


# ===================================================================== writing one checkpoint


def _write_checkpoint(
    storage: Storage,
    name: str,
    encoded: fmt.EncodedState,
    step: int,
    meta_doc: dict,
    arrays: dict[str, np.ndarray] | None = None,
    replacing: _Replaced | None = None,
) -> int:
    """Write data file(s), then .meta, then .index. Returns the number of data shards.

    On any failure every file of this checkpoint that was written is removed again and
    CheckpointWriteError is raised. ``replacing`` (a re-save of an existing checkpoint): its data
    files keep their names (the new ones get another shard count), and on failure its .meta and
    .index are written back instead of removed, so the old checkpoint stays whole.
    """
    tensors = encoded.tensors
    total = _preflight(storage, name, encoded)
    num_shards = 1
    shard_bytes = _SHARD_BYTES_PARALLEL_PARTS if storage.parallel_parts else _SHARD_BYTES
    if storage.streaming and total > shard_bytes:
        num_shards = min(_MAX_SHARDS, len(tensors), math.ceil(total / shard_bytes))
    shards = fmt.plan_shards(tensors, num_shards)
    if replacing is not None and len(shards) == replacing.shards:
        shards.append([])  # an empty safetensors file: the new data files must not overwrite the old
    num_shards = len(shards)
    written: list[str] = []
    index_tensors: dict[str, dict] = {}
    files: list[dict] = []
    try:
        _crash_point("before_data")
        results = _run_shards(storage, name, shards, arrays)
        written += [r[0] for r in results]
        _crash_point("after_data")
        for shard_no, (fname, size, header_size, header_sum, entries) in enumerate(results):
            files.append(
                {
                    "name": fname,
                    "kind": "data",
                    "size": size,
                    "header_size": header_size,
                    "checksum": header_sum,
                }
            )
            for entry in entries:
                entry["file"] = shard_no
                index_tensors[entry.pop("name")] = entry
        meta_bytes = (json.dumps(meta_doc, separators=(",", ":"), allow_nan=False) + "\n").encode()
        meta_name = name + META_SUFFIX
        storage.write_bytes(meta_name, meta_bytes)
        written.append(meta_name)
        files.append(
            {
                "name": meta_name,
                "kind": "meta",
                "size": len(meta_bytes),
                "checksum": fmt.checksum_bytes(meta_bytes),
            }
        )
        storage.sync_dir()
        _crash_point("after_meta")
        index = {
            "format": fmt.FORMAT_NAME,
            "format_version": fmt.FORMAT_VERSION,
            "step": step,
            "files": files,
            "tensors": index_tensors,
            "tree": encoded.tree,
        }
        storage.write_bytes(name + INDEX_SUFFIX, fmt.dump_index(index))
        written.append(name + INDEX_SUFFIX)
        storage.sync_dir()
        _crash_point("after_index")
    except BaseException:
        if replacing is not None:
            replacing.roll_back(storage, written)
        else:
            _remove_quietly(storage, written)
        raise
    return num_shards


@dataclass
class _Replaced:
    """What a re-save of an existing checkpoint must be able to put back: its small files' bytes."""

    name: str
    shards: int
    data_files: list[str]
    small: dict[str, bytes]  # .meta and .index contents

    @classmethod
    def read(cls, storage: Storage, name: str) -> _Replaced | None:
        """The committed checkpoint ``name`` as it is now, or None when it is unreadable anyway."""
        try:
            small = {name + INDEX_SUFFIX: _read_bounded(storage, name + INDEX_SUFFIX, fmt.MAX_INDEX_BYTES)}
            index = _read_index(storage, name, data=small[name + INDEX_SUFFIX])
            for f in index["files"]:
                if f.get("kind") == "meta":
                    small[f["name"]] = _read_bounded(storage, f["name"], MAX_META_BYTES)
        except CheckpointError:
            return None
        data = [f["name"] for f in index["files"] if f.get("kind") != "meta"]
        return cls(name, len(data), data, small)

    def roll_back(self, storage: Storage, written: list[str]) -> None:
        """Undo a failed re-save: new data files removed, the old .meta then .index written back."""
        _remove_quietly(storage, [n for n in written if n not in self.small])
        for fname in sorted(self.small, key=lambda n: n.endswith(INDEX_SUFFIX)):
            if fname in written:
                try:
                    storage.write_bytes(fname, self.small[fname])
                except Exception as e:  # noqa: BLE001 - reported; the original error is raised
                    logger.error("Could not restore %s after a failed re-save: %s", storage.url_of(fname), e)


def _preflight(storage: Storage, name: str, encoded: fmt.EncodedState) -> int:
    """Refuse a save that cannot fit in the free space (local disks), before anything changes."""
    total = sum(t.nbytes for t in encoded.tensors)
    free = storage.free_bytes()
    if free is not None and total + (1 << 20) > free:
        raise CheckpointWriteError(
            f"Not enough free space to save {name!r}: it needs {total} bytes plus 1 MiB of headroom and "
            f"{storage.url!r} has {free} bytes free. Nothing was written or deleted; free some space (or "
            "save to another directory), then save again."
        )
    return total


def _run_shards(storage, name, shards, arrays):
    if len(shards) == 1:
        return [_write_data_file(storage, fmt.data_file_name(name, 0, 1), shards[0], arrays)]
    with ThreadPoolExecutor(len(shards), thread_name_prefix="ckpt-shard") as pool:
        futures = [
            pool.submit(_write_data_file, storage, fmt.data_file_name(name, i, len(shards)), shard, arrays)
            for i, shard in enumerate(shards)
        ]
        results, error = [], None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as e:  # noqa: BLE001 - collect, clean up, re-raise the first
                error = error or e
        if error is not None:
            _remove_quietly(storage, [r[0] for r in results])
            raise error
        return results


def _write_data_file(storage: Storage, fname: str, tensors: list[fmt.TensorEntry], arrays) -> tuple:
    """Stream one safetensors file: header, then each tensor's bytes, hashing as they pass."""
    header, spans = fmt.safetensors_header(tensors)
    # Big chunks are hashed on a helper thread while the same chunk is being written (xxhash and
    # os.write both release the GIL): the checksum then costs no wall time. One helper thread keeps
    # each tensor's updates in order; small tensors hash inline.
    big = bool(spans) and spans[-1][1] - spans[0][0] >= _HASH_BEHIND_BYTES
    pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash") if big else None
    writer = storage.writer(fname)
    entries = []
    try:
        writer.write(header)
        pending = bytearray()
        for t, (begin, end) in zip(tensors, spans):
            arr = arrays[t.name] if arrays is not None else t.array()
            if arr.nbytes != end - begin:
                raise ValueError(
                    f"Tensor {t.name!r} changed while saving: expected {end - begin} bytes, got {arr.nbytes}."
                )
            hasher = fmt.new_hasher()
            hashing: Future | None = None
            for chunk in fmt.iter_tensor_bytes(arr, _WRITE_CHUNK):
                if pool is not None and len(chunk) >= _COALESCE_BYTES:
                    hashing = pool.submit(hasher.update, chunk)
                else:
                    if hashing is not None:
                        hashing.result()
                        hashing = None
                    hasher.update(chunk)
                if len(chunk) >= _COALESCE_BYTES:
                    if pending:
                        writer.write(pending)
                        pending = bytearray()
                    writer.write(chunk)
                else:
                    pending += chunk
                    if len(pending) >= _COALESCE_BYTES:
                        writer.write(pending)
                        pending = bytearray()
            if hashing is not None:
                hashing.result()
            del arr
            entries.append(
                {
                    "name": t.name,
                    "dtype": fmt.dtype_str(t.dtype),
                    "shape": list(t.shape),
                    "offset": begin,
                    "length": end - begin,
                    "checksum": fmt.checksum_str(hasher),
                    **({"kind": t.kind} if t.kind != "numpy" else {}),
                    **({"byteorder": t.byteorder} if t.byteorder != "<" else {}),
                }
            )
        if pending:
            writer.write(pending)
        size = writer.written
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return fname, size, len(header), fmt.checksum_bytes(header), entries


def _remove_quietly(storage: Storage, names: list[str]) -> None:
    try:
        storage.remove(names)
    except Exception as e:  # noqa: BLE001 - the save already failed; report that one
        logger.warning("Could not remove partial checkpoint files %s: %s", names, e)


# ===================================================================== reading one checkpoint


def _read_bounded(storage: Storage, name: str, limit: int) -> bytes:
    """A whole small file, refused above ``limit`` bytes before reading it.

    A local read of ``max_bytes`` allocates that much up front, so a hostile or sparse file is
    sized first (one stat; object stores stream and need no HEAD).
    """
    if storage.is_local:
        size = storage.size(name)
        if size is None:
            raise CheckpointNotFoundError(f"No file {storage.url_of(name)!r}.")
        if size > limit:
            raise CorruptCheckpointError(
                f"{storage.url_of(name)!r} is {size} bytes, over the {limit}-byte limit for this kind of file: "
                "it was not written by this library, or is corrupt."
            )
        limit = size
    data = storage.read_bytes(name, max_bytes=limit)
    if len(data) > limit:
        raise CorruptCheckpointError(
            f"{storage.url_of(name)!r} is over the {limit}-byte limit for this kind of file."
        )
    return data


def _read_index(storage: Storage, name: str, verify: bool = True, data: bytes | None = None) -> dict:
    """The checked index of checkpoint ``name`` (``data``: its bytes, when already read)."""
    if data is None:
        data = _read_bounded(storage, name + INDEX_SUFFIX, fmt.MAX_INDEX_BYTES)
    index = fmt.parse_index(data, verify=verify)
    for f in index["files"]:
        fname = fmt.check_name(f["name"])
        if not fname.startswith(name + "."):
            raise CorruptCheckpointError(
                f"Checkpoint index {name + INDEX_SUFFIX!r} names file {fname!r}, which belongs to another checkpoint."
            )
    # Header sizes and tensor placement, checked for every reader (list_variables reads no data file).
    header_sizes = {}
    for i, f in enumerate(index["files"]):
        if f.get("kind") != "meta":
            hs = f.get("header_size")
            if type(hs) is not int or not 8 <= hs <= min(f["size"], fmt.MAX_HEADER_BYTES + 8):
                raise CorruptCheckpointError(
                    f"Invalid header size {hs!r:.40} for {f['name']!r} in the checkpoint index."
                )
            header_sizes[i] = hs
    for tname, t in index["tensors"].items():
        if t["file"] not in header_sizes or t["offset"] < header_sizes[t["file"]]:
            raise CorruptCheckpointError(
                f"Tensor {tname!r:.120} is not inside the data section of a data file."
            )
    return index


def _load(storage: Storage, name: str, *, verify: bool, allow_pickle: bool, into: Any = None) -> dict:
    index = _read_index(storage, name, verify=verify)
    by_file: dict[int, list[tuple[str, dict]]] = {}
    for tname, t in index["tensors"].items():
        by_file.setdefault(t["file"], []).append((tname, t))
    dests = _readinto.plan(index, into) if into is not None else None
    if dests:  # every mismatch and missing / cut file is found before the first byte lands in `into`
        _readinto.check_data_files(storage, index, by_file)
    arrays: dict[str, Any] = {}
    for file_no, f in enumerate(index["files"]):
        if f.get("kind") == "meta":
            if verify:
                try:
                    data = _read_bounded(storage, f["name"], MAX_META_BYTES)
                except CheckpointNotFoundError:  # the index exists: a missing file means corrupt
                    raise CorruptCheckpointError(
                        f"Meta file {storage.url_of(f['name'])!r} of the checkpoint is missing."
                    ) from None
                if len(data) != f["size"] or fmt.checksum_bytes(data) != f["checksum"]:
                    raise CorruptCheckpointError(
                        f"{storage.url_of(f['name'])!r} is corrupt: its size or checksum does not match the index."
                    )
            continue
        _read_data_file(
            storage, f, sorted(by_file.get(file_no, []), key=lambda x: x[1]["offset"]), arrays, verify, dests
        )
    tensors = {}
    for tname, t in index["tensors"].items():
        if dests and tname in dests:
            tensors[tname] = dests[tname]
            continue
        arr = arrays[tname].view(fmt.dtype_from_name(t["dtype"]).newbyteorder("<")).reshape(t["shape"])
        if t.get("byteorder") == ">":  # saved from a big-endian array: given back as one
            arr = arr.astype(arr.dtype.newbyteorder(">"))
        if t.get("kind") == "torch":
            from . import _torch

            arr = _torch.from_numpy(arr)
        tensors[tname] = arr
    try:
        return fmt.decode_tree(index["tree"], tensors, allow_pickle=allow_pickle)
    except RecursionError:  # nesting the JSON parser accepted but the interpreter stack cannot decode
        raise CorruptCheckpointError("Checkpoint tree is nested too deeply.") from None


def _read_data_file(storage: Storage, f: dict, tensors: list, out: dict, verify: bool, dests=None) -> None:
    _readinto.read_data_file(storage, f, tensors, out, verify, dests)


_HASH_BEHIND_BYTES = 32 << 20


# ===================================================================== public one-shot functions


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

    The step recorded in the index and meta is the trailing number of the name (``ckpt-1000``), or
    ``_step``; ``_info`` is the adapters' framework description (see ``CheckpointManager.save``).

    Example:
        >>> save_checkpoint("runs/a/ckpt-10", {"w": np.zeros(3)})
        >>> load_checkpoint("runs/a/ckpt-10")["w"]
        array([0., 0., 0.])
    """
    directory, name = _split(os.fspath(path))
    fmt.check_name(name)
    storage = Storage(directory, storage_options)
    storage.makedirs()
    encoded = fmt.encode_tree(state, allow_pickle=allow_pickle)
    step = _step_of(name) if _step is None else int(_step)
    _write_checkpoint(storage, name, encoded, step, _meta_doc(step, time.time(), None, meta, _info))


def load_checkpoint(
    path: str | os.PathLike,
    *,
    storage_options: dict | None = None,
    verify: bool = True,
    allow_pickle: bool = False,
    into: Any = None,
) -> dict:
    """Load one checkpoint's state tree; with ``verify`` every checksum is checked.

    ``into``: a tree of existing numpy arrays / CPU torch tensors (e.g. ``{"state_dict":
    module.state_dict()}``) to restore in place: each saved tensor at the same key path is read straight
    into that memory and the same objects are returned in the result; other keys load as usual. A shape
    or dtype mismatch raises IncompatibleCheckpointError before anything is written; a checksum failure
    raises CorruptCheckpointError with `into` partly overwritten (see ``_readinto``).

    ``path`` is a checkpoint (``.../ckpt-100``, its ``.index``, or a marker file written by
    ``FsspecCheckpointIO``) or, like ``tf.train.load_checkpoint``, a directory (its newest valid one).
    Raises CheckpointNotFoundError, CorruptCheckpointError or IncompatibleCheckpointError.
    """
    directory, name = _split(resolve_checkpoint(path, storage_options))
    storage = Storage(directory, storage_options)
    return _load(storage, name, verify=verify, allow_pickle=allow_pickle, into=into)


def list_variables(
    path: str | os.PathLike, storage_options: dict | None = None
) -> list[tuple[str, str, tuple]]:
    """``(name, dtype, shape)`` of every tensor in a checkpoint (or a directory's latest), by name."""
    path = resolve_checkpoint(path, storage_options, verify=False)
    directory, name = _split(path)
    index = _read_index(Storage(directory, storage_options), name)
    return sorted((n, t["dtype"], tuple(t["shape"])) for n, t in index["tensors"].items())


def read_meta(path: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """The ``.meta`` JSON of a checkpoint (any form :func:`resolve_one` accepts)."""
    path = resolve_one(path, storage_options) or os.fspath(path)
    directory, name = _split(path)
    data = _read_bounded(Storage(directory, storage_options), name + META_SUFFIX, MAX_META_BYTES)
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(f"{os.fspath(path) + META_SUFFIX!r} is not valid JSON.") from None


def read_index(path: str | os.PathLike, storage_options: dict | None = None, verify: bool = True) -> dict:
    directory, name = _split(resolve_one(path, storage_options) or os.fspath(path))
    return _read_index(Storage(directory, storage_options), name, verify=verify)


def get_checkpoint_state(
    directory: str | os.PathLike, storage_options: dict | None = None
) -> CheckpointState | None:
    """The directory's ``checkpoint`` state file with paths joined to the directory, or None."""
    storage = Storage(directory, storage_options)
    try:
        data = _read_bounded(storage, STATE_FILE_NAME, MAX_STATE_FILE_BYTES)
    except CheckpointNotFoundError:
        return None
    state, _ = parse_state(data)
    return CheckpointState(
        model_checkpoint_path=storage.url_of(checked_name(state.model_checkpoint_path)),
        all_model_checkpoint_paths=[
            storage.url_of(checked_name(p)) for p in state.all_model_checkpoint_paths
        ],
        all_model_checkpoint_timestamps=list(state.all_model_checkpoint_timestamps),
        last_preserved_timestamp=state.last_preserved_timestamp,
    )


def latest_checkpoint(directory: str | os.PathLike, storage_options: dict | None = None) -> str | None:
    """Path of the checkpoint the state file names as newest, or None (like ``tf.train.latest_checkpoint``)."""
    storage = Storage(directory, storage_options)
    try:
        data = _read_bounded(storage, STATE_FILE_NAME, MAX_STATE_FILE_BYTES)
    except CheckpointNotFoundError:
        return None
    state, _ = parse_state(data)
    if not state.model_checkpoint_path:
        return None
    name = checked_name(state.model_checkpoint_path)
    return storage.url_of(name) if storage.exists(name + INDEX_SUFFIX) else None


# The marker file Lightning's ModelCheckpoint sees when it saves through FsspecCheckpointIO
# (``.../last.ckpt``): small JSON naming the checkpoint next to it (``last.ckpt.3f9a0c1e``).
MARKER_FORMAT = "ckpt_callbacks.lightning"
MARKER_VERSION = 1
MAX_MARKER_BYTES = 4096
_MARKER_HEAD = b'{"format":"' + MARKER_FORMAT.encode() + b'"'
_INDEX_HEAD = b'{"format":"' + fmt.FORMAT_NAME.encode() + b'"'


def marker_target(storage: Storage, name: str) -> str | None:
    """The checkpoint name a marker file names; None when ``name`` is no marker (or missing)."""
    try:
        data = storage.read_bytes(name, max_bytes=MAX_MARKER_BYTES)
    except CheckpointError:
        return None
    if not data.startswith(_MARKER_HEAD):
        return None
    try:
        doc = json.loads(data[: MAX_MARKER_BYTES + 1])
    except ValueError:
        raise CorruptCheckpointError(
            f"Checkpoint marker {storage.url_of(name)!r} is not valid JSON."
        ) from None
    target = doc.get("checkpoint") if isinstance(doc, dict) else None
    if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z0-9_.=+-]+", target) or ".." in target:
        raise CorruptCheckpointError(
            f"Checkpoint marker {storage.url_of(name)!r} names an invalid checkpoint {str(target)[:80]!r}."
        )
    return target


def _written_by_us(storage: Storage, fname: str) -> bool:
    """Whether ``fname`` is a file this format wrote: an index or .meta (JSON that starts with our
    format name) or a data file (safetensors whose metadata does)."""
    try:
        head = storage.read_bytes(fname, max_bytes=64)[:64]
    except CheckpointError:
        return False
    return head.startswith(_INDEX_HEAD) or head[8:].startswith(b'{"__metadata__":' + _INDEX_HEAD)


def _join(directory: str, name: str) -> str:
    if "://" in directory:
        return directory + name if directory.endswith("/") else directory + "/" + name
    return os.path.join(directory, name)


def resolve_one(path: str | os.PathLike, storage_options: dict | None = None) -> str | None:
    """The checkpoint prefix ``path`` names, or None when it names no checkpoint of this format.

    Accepted: a checkpoint prefix (``.../ckpt-100``, which has a ``.index``), its ``.index`` file, and a
    marker file written by ``FsspecCheckpointIO`` (``.../last.ckpt``).
    """
    p = os.fspath(path)
    directory, name = _split(p)
    if not name:
        return None
    storage = Storage(directory, storage_options)
    if storage.exists(name + INDEX_SUFFIX):
        return p
    target = marker_target(storage, name)
    if target is not None:
        return _join(directory, target)
    if name.endswith(INDEX_SUFFIX) and _written_by_us(storage, name):
        return p[: -len(INDEX_SUFFIX)]
    return None


def resolve_checkpoint(
    path_or_directory: str | os.PathLike, storage_options: dict | None = None, verify: bool = True
) -> str:
    """A checkpoint path: the checkpoint ``path_or_directory`` names (see :func:`resolve_one`), or
    the newest valid checkpoint of a directory with a ``checkpoint`` state file."""
    p = os.fspath(path_or_directory)
    one = resolve_one(p, storage_options)
    if one is not None:
        return one
    d = Storage(p, storage_options)
    try:
        data = _read_bounded(d, STATE_FILE_NAME, MAX_STATE_FILE_BYTES)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(
            f"No checkpoint at {p!r}: expected a checkpoint path (with a '.index' file) or a directory with a "
            "'checkpoint' state file."
        ) from None
    state, _ = parse_state(data)
    names = [checked_name(n) for n in state.all_model_checkpoint_paths]
    if state.model_checkpoint_path:
        latest = checked_name(state.model_checkpoint_path)
        names = [n for n in names if n != latest] + [latest]
    for cname in reversed(names):
        if not verify:
            if d.exists(cname + INDEX_SUFFIX):
                return d.url_of(cname)
            continue
        try:
            _read_index(d, cname)
            return d.url_of(cname)
        except CheckpointError as e:
            warnings.warn(f"Skipping checkpoint {d.url_of(cname)!r}: {e}", stacklevel=2)
    raise CheckpointNotFoundError(f"No valid checkpoint in {p!r}.")


def _step_of(name: str) -> int:
    m = re.search(r"-(\d+)\Z", name)
    return int(m.group(1)) if m else 0


def _jsonable(x: Any) -> Any:
    """Metrics and user meta as strict JSON: non-finite floats become strings, numpy scalars numbers."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # 0-d framework tensors
        return _jsonable(x.item())
    raise TypeError(
        f"meta and metrics must be JSON-like (dict, list, str, numbers); got {type(x).__name__}: {x!r:.80}"
    )


def _meta_doc(
    step: int, timestamp: float, metrics: dict | None, meta: dict | None, info: dict | None
) -> dict:
    """The ``.meta`` JSON (SPEC §3.1). Every key is always there: a save through the core API has
    ``framework`` and ``model`` null (no adapter describes a model), and takes ``epoch`` from the
    user's ``meta`` when it has an integer one."""
    doc: dict[str, Any] = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION}
    doc.update(_jsonable(info or {}))
    user_epoch = (meta or {}).get("epoch")
    doc.setdefault("framework", None)
    doc.setdefault("framework_versions", {})
    doc.setdefault("model", None)
    doc.setdefault(
        "epoch", user_epoch if isinstance(user_epoch, int) and not isinstance(user_epoch, bool) else None
    )
    doc.update(
        {
            "step": step,
            "time": timestamp,
            "metrics": _jsonable(metrics or {}),
            "user": _jsonable(meta or {}),
            "library": {
                "ckpt_callbacks": _version(),
                "python": sys.version.split()[0],
                "numpy": np.__version__,
            },
        }
    )
    return doc


def _version() -> str:
    from . import __version__

    return __version__


# ===================================================================== the manager


class CheckpointManager:
    """Saves numbered checkpoints into a directory, rotates them, and restores the newest valid one.

    Args:
        directory: local path or any fsspec URL (``"runs/a"``, ``"s3://b/run"``, ``"gs://b/run"``,
            ``"memory://x"``).
        prefix: checkpoint names are ``f"{prefix}-{step}"``.
        max_to_keep: the newest N checkpoints are kept; ``None`` keeps all. Must be >= 1.
        keep_checkpoint_every_n_hours: also keep one checkpoint per N hours, forever.
        keep_best: also keep the best K checkpoints by ``metrics[monitor]`` (``mode`` "min" or "max").
        storage_options: passed to fsspec (credentials, endpoint, ...).
        async_save: ``save()`` returns after an in-memory snapshot; writing, committing and rotation
            continue on a background thread. A save requested while one is in flight first waits for it
            (saves are never coalesced or dropped; each wait is counted in the log). A background
            failure is raised by the next ``save``, ``wait_until_finished`` or ``close``; at interpreter
            exit a pending save is finished (and a failure logged) before the process ends.
        allow_pickle: store (and load) leaves that are not plain tree types with pickle. Off by default:
            loading never executes code unless this is passed on both sides.
        clock: zero-argument callable returning POSIX seconds; tests inject a fake one.

    Example:
        >>> with CheckpointManager("runs/a", max_to_keep=3, keep_checkpoint_every_n_hours=1) as mgr:
        ...     state = mgr.restore() or {"w": np.zeros(4), "step": 0}
        ...     for step in range(state["step"] + 1, 1001):
        ...         state = {"w": state["w"] + 1, "step": step}
        ...         if step % 100 == 0:
        ...             mgr.save(state, step=step, metrics={"loss": 1.0 / step})
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        prefix: str = "ckpt",
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        storage_options: dict | None = None,
        async_save: bool = False,
        allow_pickle: bool = False,
        clock: Callable[[], float] = time.time,
        _allow_concurrent_writers: bool = False,
    ) -> None:
        _validation.check_directory(directory)
        _validation.check_storage_options(storage_options)
        _validation.check_flags(async_save=async_save, allow_pickle=allow_pickle)
        _validation.check_manager_args(
            prefix, max_to_keep, keep_checkpoint_every_n_hours, keep_best, monitor, mode, clock
        )
        self._storage = Storage(directory, storage_options)
        self._storage_options = storage_options
        self.directory = self._storage.url
        self._prefix = prefix
        self._max_to_keep = max_to_keep
        self._hours = keep_checkpoint_every_n_hours
        self._keep_best = keep_best
        self._monitor = monitor
        self._mode = mode
        self._async = async_save
        self._allow_pickle = allow_pickle
        self._clock = clock
        self._lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._error: BaseException | None = None
        self._buffers = _buffers.SnapshotBuffers()  # async snapshot buffers, kept between saves
        self._waited_saves = 0  # async saves that had to wait for the previous one
        self._warned_unranked = False
        self._commit_lock = threading.Lock()
        self.resumed_from: str | None = None
        self._closed = False
        # One writer per directory: the leftovers cleanup below would delete another writer's
        # in-flight files. `_allow_concurrent_writers` (private, for readers such as non-zero DDP
        # ranks) skips the lock and, for the same reason, the cleanup.
        self._writer_lock = None if _allow_concurrent_writers else _lock.acquire(self._storage, self)
        try:
            self._load_state()
            self.aborted_uploads: list[str] = []  # names whose pending multipart upload was aborted
            self.removed_leftovers = [] if _allow_concurrent_writers else self._remove_leftovers()
        except BaseException:
            self._release_writer_lock()
            raise

    def _release_writer_lock(self) -> None:
        lock, self._writer_lock = self._writer_lock, None
        if lock is not None:
            lock.release()

    # ------------------------------------------------------------------ state

    def _load_state(self) -> None:
        now = float(self._clock())
        self._latest: str | None = None
        self._records: list[Record] = []
        try:
            data = _read_bounded(self._storage, STATE_FILE_NAME, MAX_STATE_FILE_BYTES)
        except CheckpointNotFoundError:
            # Like TensorFlow: a second in the past, so a quickly re-created manager does not race.
            self._last_preserved = now - 1.0
            self._state_found = False
            self._state_bytes: bytes | None = None
            return
        self._state_found = True
        self._state_bytes = data
        state, records = parse_state(data)
        for n in [state.model_checkpoint_path, *state.all_model_checkpoint_paths]:
            if n:
                checked_name(n)
        self._latest = state.model_checkpoint_path or None
        last_preserved = state.last_preserved_timestamp
        if now < last_preserved:
            logger.warning(
                "The clock (%s) is before the last preserved checkpoint time (%s); time went backwards. "
                "Preservation restarts from now and nothing is deleted because of it.",
                now,
                last_preserved,
            )
            last_preserved = now
        self._last_preserved = last_preserved
        if records is None:  # a state file TensorFlow (or an older writer) wrote: TF's restart rule
            stamps = state.all_model_checkpoint_timestamps or [last_preserved] * len(
                state.all_model_checkpoint_paths
            )
            records = [
                Record(n, _step_of(n), min(ts, now), "active" if min(ts, now) > last_preserved else "hourly")
                for n, ts in zip(state.all_model_checkpoint_paths, stamps)
            ]
        else:
            records = [replace(r, timestamp=min(r.timestamp, now)) for r in records]
        self._records = records

    def _remove_leftovers(self) -> list[str]:
        """Delete files of interrupted saves: ours (by name and content), named by no state file."""
        names = self._storage.list_names()
        keep = {r.name for r in self._records}
        if self._latest:
            keep.add(self._latest)
        own = _own_file_re(self._prefix)
        doomed = []
        kept_data: dict[str, list[str]] = {}  # data files of listed checkpoints
        for fname in names:
            # Only the exact temp-name shape Storage writes: a user's ".ckpt-5.index.tmp-x.keep" stays.
            tmp = _TEMP_RE.match(fname)
            base = tmp.group("base") if tmp else fname
            if tmp and base == STATE_FILE_NAME:  # a state-file rewrite that never reached os.replace
                doomed.append(fname)
                continue
            m = own.match(base)
            if m is not None and not tmp and m.group("ckpt") in keep:
                if ".data-" in fname:
                    kept_data.setdefault(m.group("ckpt"), []).append(fname)
                continue
            # A temp file is never part of a committed checkpoint, listed or not.
            if m is None:
                continue
            if tmp or self._written_by_us(fname):
                doomed.append(fname)
        doomed += self._stale_data_files(kept_data)
        if not self._state_found:
            doomed = self._spare_complete_checkpoints(doomed, set(names), own)
        # Index first: once it is gone the checkpoint no longer exists for any reader.
        doomed.sort(key=lambda n: not n.endswith(INDEX_SUFFIX))
        if doomed:
            logger.info(
                "Removing %d leftover file(s) of interrupted saves in %s", len(doomed), self.directory
            )
            _remove_quietly(self._storage, doomed)
        # A save killed mid-upload on S3 also leaves its multipart upload pending (invisible, stored).
        self.aborted_uploads = self._storage.abort_pending_uploads(
            lambda n: n == STATE_FILE_NAME or own.match(n) is not None
        )
        return doomed

    def _spare_complete_checkpoints(self, doomed: list[str], names: set[str], own: re.Pattern) -> list[str]:
        """Without any state file, several complete checkpoints are kept: the ``checkpoint`` file was
        lost or not copied, and deleting every checkpoint of the directory for that would be the worst
        possible answer. One complete checkpoint is what a first save interrupted before its state file
        leaves (SPEC §3.3: a leftover, removed); temp files and incomplete checkpoints always are."""
        complete = set()
        for fname in doomed:
            m = own.match(fname)
            if m is not None and m.group("ckpt") + INDEX_SUFFIX in names:
                complete.add(m.group("ckpt"))
        spared = complete if len(complete) > 1 else set()
        if spared:
            logger.warning(
                "%s has no 'checkpoint' state file but %d complete checkpoint(s) (%s); they are left in "
                "place and not managed by this manager (never restored by restore(), never deleted). "
                "Load one explicitly with load_checkpoint(path), or delete them by hand.",
                self.directory,
                len(spared),
                ", ".join(sorted(spared, key=_step_of)[:5]),
            )
        return [f for f in doomed if (m := own.match(f)) is None or m.group("ckpt") not in spared]

    def _stale_data_files(self, kept_data: dict[str, list[str]]) -> list[str]:
        """Data files of listed checkpoints that their index does not name: an interrupted re-save's.

        The index on storage is the truth (a re-save that wrote its new .index and then died before
        the state file still has the old shard count in its record), so it is read whenever the files
        differ from what the record expects; an unreadable index deletes nothing.
        """
        stale = []
        for i, r in enumerate(self._records):
            files = kept_data.get(r.name, [])
            n = r.shards or 0
            if r.shards and set(files) == {fmt.data_file_name(r.name, k, n) for k in range(n)}:
                continue
            try:
                index = _read_index(self._storage, r.name)
            except CheckpointError:
                continue
            named = [f["name"] for f in index["files"] if f.get("kind") != "meta"]
            stale += [f for f in files if f not in named and self._written_by_us(f)]
            self._records[i] = replace(r, shards=len(named))
        return stale

    def _written_by_us(self, fname: str) -> bool:
        return _written_by_us(self._storage, fname)

    # ------------------------------------------------------------------ properties

    @property
    def latest_checkpoint(self) -> str | None:
        """Path of the newest committed checkpoint, or None."""
        with self._lock:
            return self._storage.url_of(self._latest) if self._latest else None

    @property
    def checkpoints(self) -> list[str]:
        """Every committed checkpoint the manager keeps (preserved ones included), oldest first."""
        with self._lock:
            return [self._storage.url_of(r.name) for r in self._records]

    def _retention(self, committing: str) -> Retention:
        """The policy for the save that commits ``committing``.

        The checkpoint the run resumed from is protected until the run commits another one: this
        very commit ends the protection, so the same save may already delete it (as one uninterrupted
        manager would have).
        """
        resumed = self.resumed_from
        protected = frozenset({resumed} if resumed and resumed == committing else ())
        return Retention(
            LatestN(self._max_to_keep),
            EveryNHours(self._hours) if self._hours else None,
            BestN(self._keep_best, self._monitor, self._mode) if self._keep_best else None,
            protected,
        )

    # ------------------------------------------------------------------ save

    def save(
        self,
        state: Any,
        step: int,
        metrics: dict | None = None,
        meta: dict | None = None,
        *,
        _info: dict | None = None,
    ) -> str:
        """Save ``state`` as ``f"{prefix}-{step}"`` and apply retention. Returns the checkpoint path.

        Sync: returns once the checkpoint is committed. Async: returns after the snapshot.
        """
        if self._closed:
            raise CheckpointError("This CheckpointManager is closed; create a new one to save.")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0. Received: step={step!r}.")
        step = int(step)
        name = f"{self._prefix}-{step}"
        timestamp = float(self._clock())
        metric = self._metric(metrics)
        meta_doc = _meta_doc(step, timestamp, metrics, meta, _info)
        if self._async:
            self._wait_previous(name)
            encoded = fmt.encode_tree(state, allow_pickle=self._allow_pickle)
            arrays = self._snapshot(encoded)
            args = (name, step, timestamp, metric, encoded, meta_doc, arrays)
            with self._lock:
                if self._closed:
                    raise CheckpointError("This CheckpointManager is closed; create a new one to save.")
                try:
                    if self._executor is None:
                        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ckpt-save")
                        _ASYNC_MANAGERS.add(self)
                    self._pending = self._executor.submit(self._save_background, *args)
                except RuntimeError:
                    # The interpreter is shutting down (e.g. save() from an atexit handler) and
                    # refuses new threads: write it here rather than lose the save.
                    self._pending = None
                    self._save_now(*args)
        else:
            self._raise_pending_error()
            encoded = fmt.encode_tree(state, allow_pickle=self._allow_pickle)
            self._save_now(name, step, timestamp, metric, encoded, meta_doc, None)
        return self._storage.url_of(name)

    def _metric(self, metrics: dict | None) -> float | None:
        if not self._monitor or not metrics or self._monitor not in metrics:
            if self._keep_best and not self._warned_unranked:
                self._warned_unranked = True  # once: saves between evaluations legitimately lack it
                logger.warning(
                    "keep_best=%d ranks checkpoints by metrics[%r], but this save has no such metric "
                    "(metrics: %s); it is kept only by max_to_keep / hourly retention. Log %r (e.g. pass "
                    "validation data) or change monitor.",
                    self._keep_best,
                    self._monitor,
                    sorted(metrics or {}),
                    self._monitor,
                )
            return None
        try:
            return float(metrics[self._monitor])
        except (TypeError, ValueError):
            raise TypeError(
                f"metrics[{self._monitor!r}] must be a number. Received: {metrics[self._monitor]!r}."
            ) from None

    def _wait_previous(self, name: str) -> None:
        """A save requested while one is in flight waits for it: never coalesced, every step is written.

        Each such wait is counted and logged, so a save interval shorter than the write time shows up.
        """
        pending = self._pending
        if pending is not None and not pending.done():
            t0 = time.perf_counter()
            self._wait(raise_error=True)
            self._waited_saves += 1
            logger.info(
                "Async save of %s waited %.3f s for the previous save to finish (%d such wait(s) so far); "
                "save less often or to faster storage to avoid blocking training.",
                self._storage.url_of(name),
                time.perf_counter() - t0,
                self._waited_saves,
            )
        else:
            self._wait(raise_error=True)

    def _snapshot(self, encoded: fmt.EncodedState) -> dict[str, np.ndarray]:
        """Copy every tensor into host buffers reused between saves (the only work async blocks on).

        Called only when no save is in flight, so the worker never reads a buffer being refilled.
        """
        self._buffers.wait()
        arrays = {}
        for t in encoded.tensors:
            buf = self._buffers.get(t.name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = np.empty(t.shape, dtype=t.dtype)
                self._buffers[t.name] = buf
            src = t.source
            if t.kind == "torch" and not (src.is_conj() or src.is_neg()):
                from . import _torch

                # One copy straight from the tensor (any device, any strides) into the host buffer:
                # to_numpy() would first make a CPU / contiguous copy of its own. torch also copies
                # with all its threads, np.copyto with one.
                _torch.from_numpy(buf).copy_(src.detach())
            else:
                src = t.array()
                if src.shape != buf.shape or src.dtype != buf.dtype:
                    raise ValueError(
                        f"Tensor {t.name!r} changed while saving: expected {t.dtype} {t.shape}, "
                        f"got {src.dtype} {src.shape}."
                    )
                np.copyto(buf, src, casting="no")
            arrays[t.name] = buf
        for stale in set(self._buffers) - set(arrays):
            del self._buffers[stale]
        return arrays

    def _save_now(self, name, step, timestamp, metric, encoded, meta_doc, arrays) -> None:
        t0 = time.perf_counter()
        storage = self._storage
        storage.makedirs()
        with self._lock:
            resave = any(r.name == name for r in self._records)
        replacing = None
        if resave:
            # Re-saving a step: the old copy stays listed and whole until the state file commits the
            # new one. New data files get other names (another shard count); a failure writes the
            # old .meta and .index back. Only a crash between the two small writes of the new .meta
            # and .index leaves the step unreadable (restore() then falls back to the one before).
            logger.warning("Replacing existing checkpoint %s", storage.url_of(name))
            replacing = _Replaced.read(storage, name)
        shards = _write_checkpoint(storage, name, encoded, step, meta_doc, arrays, replacing)
        nbytes = sum(t.nbytes for t in encoded.tensors)
        # _commit_lock orders commits; self._lock only guards the in-memory view, and is not held
        # across the state file's write + fsync, so readers of latest_checkpoint / checkpoints on
        # other threads never wait for storage.
        with self._commit_lock:
            self._follow_other_writer()
            with self._lock:
                records = [r for r in self._records if r.name != name]  # a re-saved step: the new copy
                records.append(Record(name, step, timestamp, "active", metric, shards))
                decision = self._retention(name).apply(records, self._last_preserved)
            state_bytes = dump_state(name, decision.kept, decision.last_preserved)
            try:
                _crash_point("before_state")
                self._commit_state(state_bytes)
                _crash_point("after_state")
            except BaseException as e:
                # The write reported a failure, but the store may have committed it (a reply lost
                # after the retries, an interrupt after the rename): look before removing anything.
                committed = self._state_file_is(state_bytes)
                if committed:
                    logger.warning(
                        "Writing the state file reported %s: %s, but the new state file is committed "
                        "and names %s; the save succeeded.",
                        type(e).__name__,
                        e,
                        storage.url_of(name),
                    )
                elif committed is None:  # unknown: leave the files; a next start removes them if unnamed
                    raise
                elif replacing is not None:
                    replacing.roll_back(storage, [name + INDEX_SUFFIX, *_files_of(name, shards)])
                    raise
                else:
                    # Index first: without it the checkpoint does not exist for any reader.
                    _remove_quietly(storage, [name + INDEX_SUFFIX, *_files_of(name, shards)])
                    raise
            with self._lock:
                self._records = decision.kept
                self._latest = name
                self._last_preserved = decision.last_preserved
                self._state_bytes = state_bytes
                if self.resumed_from is not None and self.resumed_from != name:
                    self.resumed_from = None  # a newer checkpoint is committed: no longer protected
        if replacing is not None:  # the replaced copy's data files (its .meta and .index were overwritten)
            new = set(_files_of(name, shards))
            _remove_quietly(storage, [n for n in replacing.data_files if n not in new])
        for r in decision.deleted:
            if r.shards is None and not self._written_by_us(r.name + INDEX_SUFFIX):
                # Listed by a state file another writer (TensorFlow) wrote, in another format: only
                # files of this format are ever deleted (SPEC §3.3). It just stops being listed.
                logger.info("Not deleting %s: not a ckpt_callbacks checkpoint", storage.url_of(r.name))
                continue
            _crash_point("before_delete")
            _remove_quietly(storage, [r.name + INDEX_SUFFIX, *_files_of(r.name, r.shards, storage)])
            _crash_point("after_delete")
        dt = time.perf_counter() - t0
        logger.info(
            "Saved %s (%d bytes in %.3f s, %.1f MiB/s)",
            storage.url_of(name),
            nbytes,
            dt,
            nbytes / 2**20 / max(dt, 1e-9),
        )

    def _commit_state(self, data: bytes) -> None:
        """Write the state file: the commit point of a save (SPEC §3.3)."""
        self._storage.write_bytes(STATE_FILE_NAME, data)
        self._storage.sync_dir()

    def _follow_other_writer(self) -> None:
        """Continue from the state file on storage if another writer changed it since this manager
        last read or wrote it (a second manager on this directory in this process: the writer lock
        is per process). Without this, this commit would drop the other writer's checkpoints from
        the state file and the next start would delete them as leftovers. One small read per save."""
        try:
            data = self._stored_state()
        except CheckpointError:
            return  # unreadable now: the commit itself will tell
        if data == self._state_bytes:
            return
        logger.warning(
            "The state file of %s was changed by another writer since this manager read it; continuing "
            "from the checkpoints it lists. Use one CheckpointManager per directory.",
            self.directory,
        )
        with self._lock:
            self._load_state()

    def _stored_state(self) -> bytes | None:
        """The state file's bytes on storage; None when there is none."""
        try:
            return _read_bounded(self._storage, STATE_FILE_NAME, MAX_STATE_FILE_BYTES)
        except CheckpointNotFoundError:
            return None

    def _state_file_is(self, data: bytes) -> bool | None:
        """Whether the state file on storage is exactly ``data``; None when it cannot be read."""
        try:
            return self._stored_state() == data
        except Exception:  # noqa: BLE001 - unreadable now: unknown
            return None

    # ------------------------------------------------------------------ async plumbing

    def _save_background(self, *args: Any) -> None:
        """The worker's job: write, commit, rotate. A failure is kept for the next save / wait / close
        and logged at once, so it is seen even if the program never calls the manager again."""
        _lower_thread_priority()
        try:
            self._save_now(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
            logger.error(
                "Background save of %s failed: %s: %s", self._storage.url_of(args[0]), type(e).__name__, e
            )
            with self._lock:
                self._error = self._error or e

    def _wait(self, raise_error: bool) -> None:
        # Never wait while holding self._lock: the worker takes it to commit.
        pending = self._pending
        if pending is not None:
            pending.result()  # _save_background never raises
            with self._lock:
                if self._pending is pending:
                    self._pending = None
        if raise_error:
            self._raise_pending_error()

    def _raise_pending_error(self) -> None:
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointWriteError(f"A background save failed: {type(err).__name__}: {err}") from err

    def wait_until_finished(self) -> None:
        """Block until every pending save is durable; re-raise a background failure."""
        self._wait(raise_error=True)

    def close(self) -> None:
        """Wait for pending saves, then release the background thread."""
        if self._closed:
            return
        try:
            self._wait(raise_error=True)
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            _ASYNC_MANAGERS.discard(self)
            self._buffers.close()
            self._release_writer_lock()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ restore

    def restore(self, path: str | os.PathLike | None = None, *, into: Any = None) -> Any:
        """The state of ``path``, or of the newest valid checkpoint (None when there is none).

        With a path, missing or corrupt checkpoints raise CheckpointNotFoundError /
        CorruptCheckpointError. Without one, corrupt checkpoints are skipped with a warning.
        Pending async saves are waited for first (a path save() just returned is then readable); a
        background failure is not raised here but kept for the next save, wait or close, so the
        checkpoints that did commit can still be restored.
        """
        self._wait(raise_error=False)
        if path is not None:
            directory, name = _split(os.fspath(path))
            storage = Storage(directory, self._storage_options) if directory != "." else self._storage
            return _load(storage, name, verify=True, allow_pickle=self._allow_pickle, into=into)
        return self.restore_with_path(into=into)[1]

    def restore_with_path(self, *, into: Any = None) -> tuple[str | None, Any]:
        """``(path, state)`` of the newest valid checkpoint, or ``(None, None)``."""
        self._wait(raise_error=False)
        with self._lock:
            names = [r.name for r in self._records]
            if self._latest and self._latest not in names:
                names.append(self._latest)
            elif self._latest:
                names = [n for n in names if n != self._latest] + [self._latest]
        for name in reversed(names):
            try:
                state = _load(self._storage, name, verify=True, allow_pickle=self._allow_pickle, into=into)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                warnings.warn(
                    f"Checkpoint {self._storage.url_of(name)!r} is unusable ({e}); falling back to an older one.",
                    stacklevel=2,
                )
                logger.warning("Skipping corrupt checkpoint %s: %s", self._storage.url_of(name), e)
                continue
            self.resumed_from = name
            if self._async:  # the first save after a resume then copies into memory already mapped
                self._buffers.prepare_like(state)
            return self._storage.url_of(name), state
        return None, None

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, prefix={self._prefix!r}, max_to_keep={self._max_to_keep!r})"


_WORKER_NICENESS = 10


def _lower_thread_priority() -> None:
    """Run the calling (worker) thread at a lower CPU priority than the training threads.

    Writing a checkpoint is memcpy into the page cache plus hashing, about one core's worth; on a
    machine whose cores the training step keeps busy it would otherwise slow every step (SPEC §8
    P5). The kernel's own write-back is unaffected, so the disk stays as busy as before. Linux
    applies setpriority(PRIO_PROCESS, tid) to that one thread; elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < _WORKER_NICENESS:
            os.setpriority(os.PRIO_PROCESS, tid, _WORKER_NICENESS)
    except (AttributeError, OSError):  # pragma: no cover - no permission / no such call
        pass


# Async managers with a background worker. Python joins the worker threads at exit, so a pending
# save still completes after `fit` returns; this hook then reports a failure that nobody waited for.
_ASYNC_MANAGERS: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()


@atexit.register
def _finish_pending_saves() -> None:
    for mgr in list(_ASYNC_MANAGERS):
        try:
            mgr._wait(raise_error=True)
        except BaseException as e:  # noqa: BLE001 - nobody is left to raise to
            logger.error("A background checkpoint save in %s failed before exit: %s", mgr.directory, e)
            print(
                f"ckpt_callbacks: background save in {mgr.directory} failed before exit: {e}", file=sys.stderr
            )


def _files_of(name: str, shards: int | None, storage: Storage | None = None) -> list[str]:
    """Data and meta files of a checkpoint; reads the index when the shard count is unknown."""
    if shards is None and storage is not None:
        try:
            return [f["name"] for f in _read_index(storage, name, verify=False)["files"]]
        except CheckpointError:
            shards = 1
    n = shards or 1
    return [fmt.data_file_name(name, i, n) for i in range(n)] + [name + META_SUFFIX]
