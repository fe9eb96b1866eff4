"""The ``torch.distributed.checkpoint`` storage reader of this library's format (files and commit as in docs/INTERNALS.md).

DCP's ``Metadata`` is rebuilt from the checkpoint's JSON index (global shapes, each chunk's file /
offset / checksum, DCP's key names under ``"dcp"``): no pickle is read. Each rank reads only the byte
ranges of the chunks DCP plans for it, after checking that every data file is there whole.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
)
from torch.futures import Future

from .._checkpoint._checkpoint_read import read_index as _read_index
from .._format import _format as fmt
from .._format import _torch
from .._storage import Storage
from ..errors import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from ._dcp import _TORCH_DTYPES, StorageWriter, _AtCheckpoint


def check_files(storage: Storage, name: str, index: dict) -> None:
    """Every data file the index names exists with its recorded size (before anything is read)."""
    for f in index["files"]:
        if f.get("kind") == "meta":
            continue
        actual = storage.size(f["name"])
        if actual is None:
            raise CorruptCheckpointError(
                f"Data file {storage.url_of(f['name'])!r} of checkpoint {name!r} is missing."
            )
        if actual != f["size"]:
            raise CorruptCheckpointError(
                f"Data file {storage.url_of(f['name'])!r} is {actual} bytes; the index expects {f['size']} "
                "(truncated or extended)."
            )


class StorageReader(_AtCheckpoint, dcp.StorageReader):
    """Reads a checkpoint of this format in ``dcp.load``, on any number of ranks (resharding).

    Args:
        path: the checkpoint (``.../ckpt-1000``), local or any fsspec URL.
        storage_options: passed to fsspec.

    Before anything is read every rank checks the index (its checksum, that the chunks of every
    tensor cover it exactly) and that all data files exist with their recorded sizes; a defect is
    ``CorruptCheckpointError`` (inside DCP's ``CheckpointException``). Each chunk read is checked
    against its checksum. Only the byte ranges a rank needs are read.

    Example:
        >>> dcp.load(state, storage_reader=StorageReader("s3://b/run/ckpt-1000"))
    """

    def __init__(self, path: str | os.PathLike, *, storage_options: dict | None = None) -> None:
        super().__init__()
        self._storage_options = storage_options
        self._set_path(path)
        self._locs: dict[tuple[str, tuple[int, ...]], dict] = {}
        self._values: dict[str, Any] = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return StorageWriter.validate_checkpoint_id(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        storage, name = self._storage, self._name
        index = _read_index(storage, name)
        check_files(storage, name, index)
        dcp_doc = index.get("dcp")
        if not isinstance(dcp_doc, dict) or not isinstance(dcp_doc.get("mappings"), dict):
            raise IncompatibleCheckpointError(
                f"{storage.url_of(name)!r} was not written through torch.distributed.checkpoint, so it has no "
                "DCP key names; load it with ckpt_callbacks.load_checkpoint instead."
            )
        mappings = dcp_doc["mappings"]
        sd_meta: dict[str, Any] = {}
        self._locs = {}
        for fqn, t in index["tensors"].items():
            shape = t["shape"]
            chunks = t["chunks"] if "chunks" in t else [{**t, "offsets": [0] * len(shape), "sizes": shape}]
            dtype = _TORCH_DTYPES.get(t["dtype"])
            if dtype is None:
                raise IncompatibleCheckpointError(
                    f"Tensor {fqn!r} has dtype {t['dtype']!r}, which torch lacks."
                )
            sd_meta[fqn] = TensorStorageMetadata(
                TensorProperties(dtype=dtype),
                torch.Size(shape),
                [ChunkStorageMetadata(torch.Size(c["offsets"]), torch.Size(c["sizes"])) for c in chunks],
            )
            for c in chunks:
                fname = index["files"][c["file"]]["name"]
                self._locs[(fqn, tuple(c["offsets"]))] = {**c, "name": fname, "dtype": t["dtype"]}
        tree = fmt.decode_tree(index["tree"], _AnyTensor())
        self._values = {}
        for fqn, path in mappings.items():
            if fqn in index["tensors"]:
                continue
            if not isinstance(path, list) or not path:
                raise CorruptCheckpointError(f"Invalid DCP key path for {fqn!r} in the checkpoint index.")
            try:
                node = tree
                for k in path:
                    node = node[k]
            except (KeyError, IndexError, TypeError):
                raise CorruptCheckpointError(
                    f"The index names {fqn!r} but its tree has no such value."
                ) from None
            self._values[fqn] = node
            sd_meta[fqn] = BytesStorageMetadata()
        return Metadata(
            state_dict_metadata=sd_meta,
            planner_data={fqn: tuple(p) for fqn, p in mappings.items()},
            storage_meta=StorageMeta(checkpoint_id=self.path),
        )

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self._is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_chunk: dict[tuple[str, tuple[int, ...]], list] = {}
        for req in plan.items:
            if req.type == LoadItemType.BYTE_IO:
                # DCP's planner takes values only as torch.save bytes; these are made here from the
                # JSON the index holds (nothing pickled is ever read from storage).
                buf = io.BytesIO()
                torch.save(self._values[req.storage_index.fqn], buf)
                buf.seek(0)
                planner.load_bytes(req, buf)
                continue
            key = (req.storage_index.fqn, tuple(req.storage_index.offset))
            by_chunk.setdefault(key, []).append(req)
        by_file: dict[str, list] = {}
        for key, reqs in by_chunk.items():
            by_file.setdefault(self._locs[key]["name"], []).append((key, reqs))
        for fname, chunks in by_file.items():
            with self._storage.open_read(fname) as fh:
                for key, reqs in sorted(chunks, key=lambda x: self._locs[x[0]]["offset"]):
                    loc = self._locs[key]
                    chunk = self._read_chunk(fh, fname, key[0], loc)
                    for req in reqs:
                        src = chunk
                        for dim, (o, n) in enumerate(zip(req.storage_offsets, req.lengths)):
                            src = src.narrow(dim, o, n)
                        target = planner.resolve_tensor(req).detach()
                        if target.size() != src.size():
                            raise CorruptCheckpointError(
                                f"Chunk of {key[0]!r} is {tuple(src.size())}, expected {tuple(target.size())}."
                            )
                        target.copy_(src)
                        planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_chunk(self, fh: Any, fname: str, fqn: str, loc: dict) -> torch.Tensor:
        buf = np.empty(loc["length"], dtype=np.uint8)
        fh.seek(loc["offset"])
        view, got = memoryview(buf), 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                raise CorruptCheckpointError(
                    f"Data file {self._storage.url_of(fname)!r} ends early (truncated)."
                )
            got += n
        if fmt.checksum_bytes(view) != loc["checksum"]:
            raise CorruptCheckpointError(
                f"Checksum mismatch for a chunk of tensor {fqn!r} in {self._storage.url_of(fname)!r}: the file is corrupt."
            )
        arr = buf.view(fmt.dtype_from_name(loc["dtype"]).newbyteorder("<")).reshape(loc["sizes"])
        return _torch.from_numpy(arr)


class _AnyTensor(dict):
    """Tensor lookup for decoding only the tree's non-tensor values: every reference is a placeholder."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> None:
        return None
