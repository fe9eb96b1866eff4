"""``torch.distributed.checkpoint`` storage writer in this library's format (files and commit as in docs/INTERNALS.md).

DCP's own ``FileSystemWriter`` pickles its metadata, ``torch.save``s every item and writes in place,
so a crash mid-save destroys the previous checkpoint. Here every rank streams its own
``<name>.data-<rank>-of-<N>`` safetensors file through the core's atomic writers (checksummed as it
passes, one PUT / completed multipart upload on object stores); DCP hands the coordinator every
rank's results in ``finish``, and only then, after all ranks reported success, does the coordinator
write ``.meta``, ``.index`` (JSON: global shapes, each chunk's file / offset / checksum, non-tensor
leaves inline) and commit the ``checkpoint`` state file. No pickle is stored (the reader, which
rebuilds DCP's ``Metadata`` from that JSON, is :mod:`._reader`).

Through a manager (:class:`._manager.DcpWriter`) a save is incremental (:mod:`ckpt_callbacks._checkpoint.
_incremental`): each rank writes only the chunks that changed since the manager's latest checkpoint
and reports the others (where their bytes already are) to the coordinator, whose index points them
into those earlier data files.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .._checkpoint import _incremental
from .._checkpoint._checkpoint_io import meta_doc as _meta_doc
from .._checkpoint._checkpoint_io import meta_file as _meta_file
from .._checkpoint._checkpoint_io import remove_quietly as _remove_quietly
from .._checkpoint._checkpoint_io import write_data_file as _write_data_file
from .._checkpoint._checkpoint_read import files_of, written_by_us
from .._format import _chunks, _torch
from .._format import _format as fmt
from .._format._names import INDEX_SUFFIX, META_SUFFIX
from .._format._names import split_url as _split
from .._format._names import step_of as _step_of
from .._manager._retention import Record
from .._manager._state import commit_state, dump_state, parse_state, read_state_bytes, restart_records
from .._storage import Storage
from ..errors import (
    CheckpointWriteError,
    CorruptCheckpointError,
)

# The WriteResult that carries a rank's data file description (size, header) to the coordinator.
_FILE_RESULT = "__ckpt_callbacks_data_file__"


def _crash_point(where: str, rank: int) -> None:
    """Test seam, a no-op: crash tests replace it (in the rank's own process) to fail or be killed."""


@dataclasses.dataclass(frozen=True)
class _RankFile:
    """What the coordinator's global plan tells each rank: its number and the world size."""

    rank: int
    world: int


def _torch_dtype_to_numpy(dtype: torch.dtype) -> np.dtype:
    return _torch.numpy_dtype(torch.empty(0, dtype=dtype))


_TORCH_DTYPES = {
    _torch_dtype_to_numpy(d).name: d
    for d in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.uint16,
        torch.uint32,
        torch.uint64,
    )
}


def _checkpoint_path(path: str | os.PathLike) -> tuple[str, str, str]:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(
            f"The checkpoint path must be a non-empty path or URL such as 's3://b/run/ckpt-1000'. Received: {path!r}."
        )
    p = os.fspath(path).rstrip("/")
    directory, name = _split(p)
    try:
        fmt.check_name(name)
    except CorruptCheckpointError:
        raise ValueError(
            f"The checkpoint name must be a plain file name like 'ckpt-1000'. Received: path={path!r}."
        ) from None
    return p, directory, name


class _AtCheckpoint:
    """The checkpoint a writer or reader works on: set at construction, rebound by DCP's ``reset``."""

    _storage_options: dict | None

    def _set_path(self, path: str | os.PathLike) -> None:
        self.path, self._directory, self._name = _checkpoint_path(path)
        self._storage = Storage(self._directory, self._storage_options)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self._set_path(checkpoint_id)


class StorageWriter(_AtCheckpoint, dcp.StorageWriter):
    """Writes a DCP save as one checkpoint of this library's format; collective, like ``dcp.save``.

    Args:
        path: the checkpoint, ``<directory>/<prefix>-<step>`` (a local path or any fsspec URL); the
            step recorded is the trailing number of the name.
        storage_options: passed to fsspec (credentials, endpoint, ...).

    Rank r writes ``<name>.data-<r>-of-<N>``; the coordinator, after every rank reported success,
    writes ``.meta``, ``.index`` and then the directory's ``checkpoint`` state file (the commit). An
    existing checkpoint of that name is never overwritten. A failure on any rank raises DCP's
    ``CheckpointException`` on every rank and commits nothing
    (:func:`ckpt_callbacks.distributed.save` raises ``CheckpointWriteError`` instead).

    A save through this writer alone is always a full one: every chunk is written. Saves through a
    manager (:func:`ckpt_callbacks.distributed.manager`, or a ``CheckpointManager`` given sharded
    state) are incremental: a chunk unchanged since the manager's latest checkpoint is not written
    again, the index points into the earlier data file that holds it.

    Example:
        >>> dcp.save({"model": model.state_dict()}, storage_writer=StorageWriter("s3://b/run/ckpt-1000"))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        storage_options: dict | None = None,
        _commit: Callable[[Storage, str, int, int, tuple[str, ...]], None] | None = None,
        _meta: dict | None = None,
        _plan: _incremental.Plan | None = None,
    ) -> None:
        super().__init__()
        self._storage_options = storage_options
        self._set_path(path)
        self._commit = _commit or _add_to_state_file
        self._meta = _meta
        self._plan = _plan  # this rank's incremental plan (a manager's save), or None: write every chunk
        self._rank = 0
        self._is_coordinator = False

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        try:
            _checkpoint_path(checkpoint_id)
        except ValueError:
            return False
        return True

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._is_coordinator = is_coordinator
        self._rank = kwargs.get("rank") or 0

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self._storage.makedirs()
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # Before any rank writes: the data files of a committed checkpoint would be overwritten in
        # place, and a failure would then leave it unreadable.
        if self._storage.exists(self._name + INDEX_SUFFIX):
            raise CheckpointWriteError(
                f"Checkpoint {self._storage.url_of(self._name)!r} already exists; a sharded save never "
                "overwrites one. Save at another step, or delete it first."
            )
        self._remove_failed_attempt()
        return [dataclasses.replace(p, storage_data=_RankFile(i, len(plans))) for i, p in enumerate(plans)]

    def _remove_failed_attempt(self) -> None:
        """Data files of an earlier, failed save of this very checkpoint (no index: never committed).

        When a rank fails in ``write_data``, DCP calls no writer method again on any rank, so the
        other ranks' finished data files stay; a save retried under the same name removes them here,
        before any rank writes (a CheckpointManager's start removes them too).
        """
        own = re.compile(re.escape(self._name) + r"\.data-\d{5}-of-\d{5}\Z")
        stale = [n for n in self._storage.list_names() if own.match(n)]
        _remove_quietly(self._storage, [n for n in stale if written_by_us(self._storage, n)])

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        info: _RankFile = plan.storage_data
        fname = fmt.data_file_name(self._name, info.rank, info.world)
        results: list[WriteResult] = []
        entries: list[fmt.TensorEntry] = []
        items = {}
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                results.append(_value_result(planner, item))
                continue
            chunk = item.tensor_data.chunk
            dtype = _torch_dtype_to_numpy(item.tensor_data.properties.dtype)
            tname = _chunks.piece_name(item.index.fqn, chunk.offsets)
            lazy = fmt.LazyArray(tuple(chunk.sizes), dtype, functools.partial(_resolve, planner, item))
            entries.append(fmt.TensorEntry(tname, dtype, tuple(chunk.sizes), lazy))
            items[tname] = item
        plan = self._plan
        if plan is not None:
            entries = plan.split(entries, None)
        _crash_point("before_data", info.rank)
        # A rank with nothing to write still writes its (empty) file: the index names all N.
        written = _write_data_file(self._storage, fname, entries, None, plan=plan)
        try:
            _crash_point("after_data", info.rank)
        except BaseException:
            _remove_quietly(self._storage, [fname])
            raise
        for tname, e in written.tensors.items():
            item = items[tname]
            results.append(
                WriteResult(
                    index=item.index,
                    size_in_bytes=e["length"],
                    storage_data={k: e[k] for k in ("offset", "length", "checksum")} | {"file": info.rank},
                )
            )
        if plan is not None:
            plan.learn([(written.entry(), written.tensors)])
            for tname, where in plan.report().items():
                results.append(
                    WriteResult(index=items[tname].index, size_in_bytes=0, storage_data={"reused": where})
                )
        results.append(
            WriteResult(
                index=MetadataIndex(_FILE_RESULT, [info.rank]),
                size_in_bytes=written.size,
                storage_data=written.entry(),
            )
        )
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        storage, name = self._storage, self._name
        step = _step_of(name)
        written = [fmt.data_file_name(name, r, len(results)) for r in range(len(results))]
        try:
            index = _build_index(metadata, results, step)
            meta_doc = self._meta or _meta_doc(
                step,
                time.time(),
                None,
                None,
                {"framework": "torch", "framework_versions": {"torch": torch.__version__}},
            )
            meta_bytes, meta_entry = _meta_file(name, meta_doc)
            storage.write_bytes(name + META_SUFFIX, meta_bytes)
            written.append(name + META_SUFFIX)
            index["files"].append(meta_entry)
            storage.sync_dir()
            fmt.validate_index(index)  # what every reader will check, before it is committed
            storage.write_bytes(name + INDEX_SUFFIX, fmt.dump_index(index))
            written.append(name + INDEX_SUFFIX)
            storage.sync_dir()
            _crash_point("after_index", self._rank)
        except BaseException:
            # Index first: without it the checkpoint does not exist for any reader.
            _remove_quietly(storage, sorted(written, key=lambda n: not n.endswith(INDEX_SUFFIX)))
            raise
        # The commit cleans up after itself: it removes these files when it surely failed, and
        # leaves them when the store may have committed the state file after all.
        self._commit(storage, name, step, len(results), tuple(_incremental.referenced_files(index, name)))


def _resolve(planner: SavePlanner, item: Any) -> np.ndarray:
    return _torch.to_numpy(planner.resolve_data(item))


def _value_result(planner: SavePlanner, item: Any) -> WriteResult:
    """A non-tensor leaf, as this format's JSON tree (the coordinator puts it inline in the index).

    DCP's own ``resolve_data`` would hand over ``torch.save`` (pickle) bytes; the object itself
    comes from the planner instead.
    """
    lookup = getattr(planner, "lookup_object", None)
    if lookup is None:
        raise TypeError(
            f"The save planner {type(planner).__name__} cannot give the object {item.index.fqn!r} itself "
            "(no lookup_object); use torch.distributed.checkpoint's DefaultSavePlanner (the default)."
        )
    obj = lookup(item.index)
    try:
        enc = fmt.encode_tree(obj)
    except TypeError as e:
        raise TypeError(f"Cannot save state entry {item.index.fqn!r} without pickle: {e}") from None
    if enc.tensors:
        raise TypeError(
            f"State entry {item.index.fqn!r} holds arrays inside a non-tensor value; make them torch tensors "
            "(DCP stores tensors as tensor items) or plain Python values."
        )
    return WriteResult(index=item.index, size_in_bytes=0, storage_data={"value": enc.tree})


def _rank_results(results: list[list[WriteResult]]) -> tuple[list, dict[str, dict], dict[str, Any]]:
    """Every rank's write results: the data files (the ranks', then the earlier ones that chunks a
    rank reused are in), each chunk's place by piece name, and the non-tensor values."""
    files: list[dict | None] = [None] * len(results)
    locs: dict[str, dict] = {}
    reused: dict[str, dict] = {}
    values: dict[str, Any] = {}
    for rank_results in results:
        for r in rank_results:
            sd = r.storage_data
            if r.index.fqn == _FILE_RESULT:
                files[r.index.offset[0]] = sd
            elif "value" in sd:
                values[r.index.fqn] = sd["value"]
            elif "reused" in sd:
                reused[_chunks.piece_name(r.index.fqn, r.index.offset or ())] = sd["reused"]
            else:
                locs[_chunks.piece_name(r.index.fqn, r.index.offset or ())] = sd
    if any(f is None for f in files):
        raise CheckpointWriteError(
            f"Ranks {[i for i, f in enumerate(files) if f is None]} reported no data file; nothing was committed."
        )
    _incremental.place_reused(files, locs, reused)
    return files, locs, values


def _build_index(metadata: Metadata, results: list[list[WriteResult]], step: int) -> dict:
    """This format's index from DCP's global metadata and every rank's write results."""
    files, locs, values = _rank_results(results)
    tensors: dict[str, dict] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            if fqn not in values:
                raise CheckpointWriteError(f"No rank wrote the value of {fqn!r}; nothing was committed.")
            continue
        shape = list(md.size)
        entry: dict[str, Any] = {
            "dtype": _torch_dtype_to_numpy(md.properties.dtype).name,
            "shape": shape,
            "kind": "torch",
        }
        chunks = []
        for c in md.chunks:
            loc = locs.get(_chunks.piece_name(fqn, c.offsets))
            if loc is None:
                raise CheckpointWriteError(
                    f"No rank wrote the chunk at offsets {list(c.offsets)} of {fqn!r}; nothing was committed."
                )
            where = {k: loc[k] for k in ("file", "offset", "length", "checksum")}
            chunks.append({**where, "offsets": list(c.offsets), "sizes": list(c.sizes)})
        if len(chunks) == 1 and chunks[0]["sizes"] == shape:
            # One whole piece: a plain entry, which every reader of this format understands.
            c = chunks[0]
            entry.update(file=c["file"], offset=c["offset"], length=c["length"], checksum=c["checksum"])
        else:
            entry["chunks"] = chunks
        tensors[fqn] = entry
    mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else None
    mappings = {fqn: list(path) for fqn, path in (mappings or {}).items()}
    for fqn in list(tensors) + list(values):
        mappings.setdefault(fqn, [fqn])
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "step": step,
        "files": files,
        "tensors": tensors,
        "tree": _tree(mappings, tensors, values),
        # DCP's flattened names (fqn -> key path into the tree): a later dcp.load plans by them.
        "dcp": {"mappings": mappings},
    }


def _tree(mappings: dict[str, list], tensors: dict, values: dict) -> Any:
    """The nested state (this format's JSON tree) from DCP's flattened names and their key paths."""
    root: dict = {}
    for fqn, path in mappings.items():
        leaf = {"x": fqn} if fqn in tensors else values.get(fqn)
        if fqn not in tensors and fqn not in values:
            continue
        cur: Any = root
        for k, nk in zip(path, path[1:]):
            new = [] if isinstance(nk, int) else {}
            if isinstance(cur, dict):
                cur = cur.setdefault(k, new)
            else:
                cur.extend([None] * (k + 1 - len(cur)))
                if cur[k] is None:
                    cur[k] = new
                cur = cur[k]
        if isinstance(cur, dict):
            cur[path[-1]] = _Leaf(leaf)
        else:
            cur.extend([None] * (path[-1] + 1 - len(cur)))
            cur[path[-1]] = _Leaf(leaf)

    def enc(node: Any) -> Any:
        if isinstance(node, _Leaf):
            return node.tree
        if isinstance(node, dict):
            return {"d": [[k, enc(v)] for k, v in node.items()]}
        if isinstance(node, list):
            return {"l": [enc(v) for v in node]}
        return node  # None: a list slot no leaf filled

    return enc(root)


@dataclasses.dataclass
class _Leaf:
    tree: Any


def _add_to_state_file(
    storage: Storage, name: str, step: int, shards: int, refs: tuple[str, ...] = ()
) -> None:
    """The commit of a save without a manager: the state file lists the new checkpoint as newest
    (earlier ones stay listed; nothing is deleted without a manager's retention).

    On failure the checkpoint's files are removed, unless the state file's write failed in a way
    that may have committed it (then they stay and the state file decides, like the manager's).
    """
    files = [name + INDEX_SUFFIX, *files_of(name, shards)]
    try:
        new = _listing_with(storage, name, step, shards, refs)
    except BaseException:
        _remove_quietly(storage, files)
        raise
    commit_state(storage, new, lambda: _remove_quietly(storage, files))


def _listing_with(storage: Storage, name: str, step: int, shards: int, refs: tuple[str, ...]) -> bytes:
    """The directory's state file with ``name`` added as the newest checkpoint."""
    now = time.time()
    data = read_state_bytes(storage)
    records: list[Record] = []
    last_preserved = now - 1.0
    if data is not None:
        state, parsed = parse_state(data)
        last_preserved = state.last_preserved_timestamp
        records = [r for r in restart_records(state, parsed, now, last_preserved) if r.name != name]
    records.append(Record(name, step, now, "active", None, shards, refs))
    return dump_state(name, records, last_preserved)
