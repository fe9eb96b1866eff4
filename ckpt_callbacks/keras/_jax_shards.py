"""JAX arrays over several devices (``keras.distribution``): saved shard by shard, restored onto the
variable's current layout.

Save: a variable whose array spans several devices becomes a :class:`~.._chunks.ChunkedArray`, one
piece per shard this process addresses (one replica of each: ``replica_id == 0``), each the shard's
own host bytes. Nothing is gathered into one host array and nothing stays cached on the arrays
(``np.asarray`` of a sharded ``jax.Array`` assembles the whole value and keeps it on the array).

Restore: each model and optimizer tensor of the checkpoint is a :class:`StoredTensor` until it is
assigned: then every device of the variable's current sharding gets its box, read from the stored
chunks that overlap it (checked against their checksums), so a checkpoint of any layout and any
number of writers restores on this one. Only the chunks a process's own devices need are read.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from .._api._resolve import open_checkpoint
from .._checkpoint._checkpoint_read import (
    _check_size,
    newest_first,
    newest_valid,
    read_data_file,
    read_files,
    read_index,
)
from .._format import _chunks
from .._format import _format as fmt
from .._storage import Storage
from . import _compat

_MODEL_GROUPS = ("model", "optimizer")


def spans_devices(value: Any) -> bool:
    """Whether ``value`` is a ``jax.Array`` laid out over more than one device."""
    return isinstance(value, jax.Array) and len(value.sharding.device_set) > 1


def model_spans_devices(model: Any) -> bool:
    return any(spans_devices(getattr(v, "value", None)) for v in model.variables)


# ---------------------------------------------------------------- save


def _box(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offsets, sizes)`` of a shard's index (a tuple of slices) in an array of ``shape``."""
    offsets, sizes = [], []
    for sl, dim in zip(index, shape):
        start, stop, _ = sl.indices(dim)
        offsets.append(start)
        sizes.append(stop - start)
    return tuple(offsets), tuple(sizes)


def chunked_leaf(v: Any, dtype: np.dtype) -> _chunks.ChunkedArray:
    """Variable ``v`` as the pieces this process writes: one per shard it holds the first replica of."""
    value = v.value
    shape = tuple(value.shape)
    pieces = []
    for shard in value.addressable_shards:
        if shard.replica_id != 0:
            continue
        offsets, sizes = _box(shard.index, shape)
        lazy = fmt.LazyArray(
            sizes, dtype, lambda v=v, o=offsets: _shard_bytes(v.value, o, dtype), immutable=True
        )
        pieces.append((offsets, lazy))
    return _chunks.ChunkedArray(shape, dtype, pieces)


def _shard_bytes(value: Any, offsets: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The host bytes of ``value``'s first-replica shard at ``offsets`` (a view of a CPU buffer)."""
    for shard in value.addressable_shards:
        if shard.replica_id == 0 and _box(shard.index, value.shape)[0] == offsets:
            arr = _compat.single_device_to_numpy(shard.data)
            if arr.dtype != dtype:
                arr = arr.astype(dtype)
            return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
    raise ValueError(
        f"The variable's layout changed during the save: no shard at offsets {list(offsets)} any more."
    )


# ---------------------------------------------------------------- restore


class StoredTensor:
    """A tensor of a checkpoint, read only when placed (:meth:`place_on`) or converted (``np.asarray``)."""

    def __init__(self, reader: _Reader, tname: str, entry: dict) -> None:
        self._reader, self._tname = reader, tname
        self.dtype = fmt.dtype_from_name(entry["dtype"]).newbyteorder("<")
        self.shape = tuple(entry["shape"])
        if _chunks.is_chunked(entry):
            plain = _chunks.validate(tname, entry, self.dtype.itemsize)
            self._chunks = [
                (tuple(c["offsets"]), tuple(c["sizes"]), p) for c, p in zip(entry["chunks"], plain)
            ]
        else:
            self._chunks = [((0,) * len(self.shape), self.shape, entry)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.read_box((0,) * len(self.shape), self.shape, {})
        return arr if dtype is None else arr.astype(dtype)

    def place_on(self, value: Any) -> Any:
        """This tensor as a ``jax.Array`` of ``value``'s sharding and dtype: each addressable device
        gets its box (boxes shared by replicas read once)."""
        sharding = value.sharding
        want = np.dtype(value.dtype)
        boxes: dict[tuple, np.ndarray] = {}
        cache: dict[int, np.ndarray] = {}
        arrays = []
        for device, index in sharding.addressable_devices_indices_map(self.shape).items():
            box = _box(index, self.shape)
            if box not in boxes:
                host = self.read_box(*box, cache)
                boxes[box] = host if host.dtype == want else host.astype(want)
            arrays.append(jax.device_put(boxes[box], device))
        return jax.make_array_from_single_device_arrays(self.shape, sharding, arrays)

    def read_box(self, offsets: tuple[int, ...], sizes: tuple[int, ...], cache: dict) -> np.ndarray:
        """The box ``offsets``/``sizes`` of this tensor, from the stored chunks that overlap it."""
        out = None
        for i, (c_off, c_size, _) in enumerate(self._chunks):
            if c_off == tuple(offsets) and c_size == tuple(sizes):
                return self._chunk(i, cache)  # the box is one stored chunk: no copy
            lo = [max(a, b) for a, b in zip(offsets, c_off)]
            hi = [min(a + s, b + t) for a, s, b, t in zip(offsets, sizes, c_off, c_size)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            if out is None:
                out = np.empty(sizes, self.dtype)
            src = tuple(slice(a - b, h - b) for a, h, b in zip(lo, hi, c_off))
            dst = tuple(slice(a - b, h - b) for a, h, b in zip(lo, hi, offsets))
            out[dst] = self._chunk(i, cache)[src]
        return out if out is not None else np.empty(sizes, self.dtype)

    def _chunk(self, i: int, cache: dict) -> np.ndarray:
        if i not in cache:
            _, size, plain = self._chunks[i]
            cache[i] = self._reader.read(f"{self._tname} [chunk {i}]", plain).view(self.dtype).reshape(size)
        return cache[i]


class _Reader:
    """One checkpoint's data files, read entry by entry (checked against the entry's checksum)."""

    def __init__(self, storage: Any, index: dict, verify: bool) -> None:
        self.storage, self.files, self.verify = storage, index["files"], verify

    def read(self, key: str, entry: dict) -> np.ndarray:
        out: dict[str, Any] = {}
        read_data_file(self.storage, self.files[entry["file"]], [(key, entry)], out, self.verify)
        return out[key]


def load_state(path: str, storage_options: dict | None, *, verify: bool = True, tensors: bool = True) -> Any:
    """The state tree of checkpoint ``path`` with its model and optimizer tensors as
    :class:`StoredTensor` (read when assigned); everything else read now. Every data file is checked
    to exist with its recorded size first (``tensors=False``: only that, and the index)."""
    storage, name = open_checkpoint(path, storage_options)
    index = read_index(storage, name, verify=verify)
    for f in index["files"]:
        if f.get("kind") != "meta":
            _check_size(storage, f, [])
    if not tensors:
        return None
    deferred = _deferred_names(index["tree"])
    reader = _Reader(storage, index, verify)
    stored: dict[str, Any] = {n: StoredTensor(reader, n, index["tensors"][n]) for n in deferred}
    rest = {**index, "tensors": {n: t for n, t in index["tensors"].items() if n not in deferred}}
    raw: dict[str, Any] = {}
    parts = _chunks.split(rest)
    read_files(storage, rest, raw, verify=verify)
    for n, t in rest["tensors"].items():
        raw[n] = raw[n].view(fmt.dtype_from_name(t["dtype"]).newbyteorder("<")).reshape(t["shape"])
    _chunks.assemble(rest, parts, raw)
    stored.update(raw)
    return fmt.decode_tree(index["tree"], stored)


def _deferred_names(tree: Any) -> set[str]:
    from ._inplace import stored_names

    return {name for group in stored_names(tree).values() for name in group.values()}


def process_manager_kwargs(directory: str, storage_options: dict | None) -> dict:
    """Extra arguments of the callback's manager: on a multi-process job, saves through
    :mod:`._jax_processes` (process 0 commits), once every process has said it runs the callback;
    none in one process."""
    if jax.process_count() == 1:
        return {}
    from . import _jax_processes

    _jax_processes.roll_call(directory, storage_options)
    return _jax_processes.manager_kwargs()


def restore_with_path(manager: Any, storage_options: dict | None) -> tuple[str | None, Any]:
    """``(path, state)`` of the manager's newest valid checkpoint (a corrupt or incomplete newer one
    skipped with a warning), its tensors placed when assigned; ``(None, None)`` when there is none.
    On a multi-process job process 0 picks it and every process loads the same one."""
    storage = Storage(manager.directory, storage_options)
    latest = manager.latest_checkpoint
    names = newest_first([_basename(p) for p in manager.checkpoints], latest and _basename(latest))

    def pick() -> str | None:
        found = newest_valid(
            storage, names, lambda n: load_state(storage.url_of(n), storage_options, tensors=False)
        )
        return storage.url_of(found[0]) if found else None

    if jax.process_count() > 1:
        from . import _jax_processes

        path = _jax_processes.agree_on_checkpoint(manager.directory, storage_options, pick)
    else:
        path = pick()
    if path is None:
        return None, None
    state = load_state(path, storage_options)
    manager.resumed_from = _basename(path)
    return path, state


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
