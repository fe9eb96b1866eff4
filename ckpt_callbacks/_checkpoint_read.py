"""Reading and verifying ONE checkpoint: bounded small-file reads, the checked index, data files.

Every reader goes through here: ``load_checkpoint``, ``CheckpointManager.restore``, the CLI's
``inspect`` / ``verify`` / ``export``, the startup sweep (which reads indexes to know a checkpoint's
files). Tensors come back as numpy arrays, or as their framework's type when the index records one
(``"kind": "torch"``) and that framework is importable (:mod:`._kinds`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from . import _chunks, _kinds
from . import _format as fmt
from ._names import INDEX_SUFFIX, META_SUFFIX
from ._storage import Storage
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError

MAX_META_BYTES = 64 * 1024 * 1024
# Files at least this big are verified with tensor N hashed on a helper thread while N+1 is read.
HASH_BEHIND_BYTES = 32 << 20
# The head of a file this format wrote: an index or .meta starts with it, a data file's metadata too.
FORMAT_HEAD = b'{"format":"' + fmt.FORMAT_NAME.encode() + b'"'


def read_bounded(storage: Storage, name: str, limit: int) -> bytes:
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


def written_by_us(storage: Storage, fname: str) -> bool:
    """Whether ``fname`` is a file this format wrote: an index or .meta (JSON that starts with our
    format name) or a data file (safetensors whose metadata does)."""
    try:
        head = storage.read_bytes(fname, max_bytes=64)[:64]
    except CheckpointError:
        return False
    return head.startswith(FORMAT_HEAD) or head[8:].startswith(b'{"__metadata__":' + FORMAT_HEAD)


def read_index(storage: Storage, name: str, verify: bool = True, data: bytes | None = None) -> dict:
    """The checked index of checkpoint ``name`` (``data``: its bytes, when already read)."""
    if data is None:
        data = read_bounded(storage, name + INDEX_SUFFIX, fmt.MAX_INDEX_BYTES)
    index = fmt.parse_index(data, verify=verify)
    for f in index["files"]:
        fname = fmt.check_name(f["name"])
        if not fname.startswith(name + "."):
            raise CorruptCheckpointError(
                f"Checkpoint index {name + INDEX_SUFFIX!r} names file {fname!r}, which belongs to another checkpoint."
            )
    _check_placement(index)
    return index


def _check_placement(index: dict) -> None:
    """Header sizes and tensor placement, checked for every reader (list_variables reads no data file)."""
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
        for loc in t["chunks"] if _chunks.is_chunked(t) else [t]:  # a sharded save's pieces: each
            if loc["file"] not in header_sizes or loc["offset"] < header_sizes[loc["file"]]:
                raise CorruptCheckpointError(
                    f"Tensor {tname!r:.120} is not inside the data section of a data file."
                )


def read_meta_file(storage: Storage, f: dict) -> None:
    """Check the ``.meta`` file an index names against its recorded size and checksum."""
    try:
        data = read_bounded(storage, f["name"], MAX_META_BYTES)
    except CheckpointNotFoundError:  # the index exists: a missing file means corrupt
        raise CorruptCheckpointError(
            f"Meta file {storage.url_of(f['name'])!r} of the checkpoint is missing."
        ) from None
    if len(data) != f["size"] or fmt.checksum_bytes(data) != f["checksum"]:
        raise CorruptCheckpointError(
            f"{storage.url_of(f['name'])!r} is corrupt: its size or checksum does not match the index."
        )


def read_files(
    storage: Storage,
    index: dict,
    out: dict,
    *,
    verify: bool,
    on_file: Callable[[int], None] | None = None,
) -> None:
    """Read every data file of a checked index into ``out`` (tensor name -> raw uint8 array); with
    ``verify`` the ``.meta`` and every checksum are checked too. ``on_file(size)`` follows each data
    file. An ``out`` that drops what it is given verifies a checkpoint in bounded memory.

    A sharded save's chunked tensors (:mod:`._chunks`) are read chunk by chunk, each as a plain
    entry of its own: ``index`` is changed in place by that (:func:`read_tensors` joins them)."""
    _chunks.split(index)
    by_file: dict[int, list[tuple[str, dict]]] = {}
    for tname, t in index["tensors"].items():
        by_file.setdefault(t["file"], []).append((tname, t))
    for file_no, f in enumerate(index["files"]):
        if f.get("kind") == "meta":
            if verify:
                read_meta_file(storage, f)
            continue
        tensors = sorted(by_file.get(file_no, []), key=lambda x: x[1]["offset"])
        read_data_file(storage, f, tensors, out, verify)
        if on_file is not None:
            on_file(f["size"])


def read_tensors(storage: Storage, index: dict, *, verify: bool) -> dict[str, Any]:
    """Every tensor of a checked index by name, as stored (numpy) or as its recorded kind."""
    chunked = _chunks.split(index)
    raw: dict[str, Any] = {}
    read_files(storage, index, raw, verify=verify)
    tensors = {}
    for tname, t in index["tensors"].items():
        arr = raw[tname].view(fmt.dtype_from_name(t["dtype"]).newbyteorder("<")).reshape(t["shape"])
        if t.get("byteorder") == ">":  # saved from a big-endian array: given back as one
            arr = arr.astype(arr.dtype.newbyteorder(">"))
        tensors[tname] = _kinds.from_numpy(t.get("kind", "numpy"), arr)
    _chunks.assemble(index, chunked, tensors)
    return tensors


def load(storage: Storage, name: str, *, verify: bool, allow_pickle: bool) -> dict:
    """The state tree of checkpoint ``name``; with ``verify`` every checksum is checked."""
    index = read_index(storage, name, verify=verify)
    tensors = read_tensors(storage, index, verify=verify)
    try:
        return fmt.decode_tree(index["tree"], tensors, allow_pickle=allow_pickle)
    except RecursionError:  # nesting the JSON parser accepted but the interpreter stack cannot decode
        raise CorruptCheckpointError("Checkpoint tree is nested too deeply.") from None


def read_data_file(storage: Storage, f: dict, tensors: list, out: dict, verify: bool) -> None:
    """Read the tensors ``[(name, entry), ...]`` (by offset) of data file ``f`` into ``out[name]`` as
    raw uint8 arrays; with ``verify`` the header and every tensor checksum are checked."""
    fname = f["name"]
    actual = _check_size(storage, f, tensors)
    header_size = f.get("header_size")
    if not isinstance(header_size, int) or not 8 <= header_size <= min(actual, fmt.MAX_HEADER_BYTES + 8):
        raise CorruptCheckpointError(f"Invalid header size for {fname!r} in the checkpoint index.")
    with storage.open_read(fname) as fh:
        if verify:
            _verify_header(storage, fh, f, header_size)
        # Big files: tensor N is hashed on a helper thread while tensor N+1 is read (xxhash and
        # readinto both release the GIL), so verifying costs no wall time. Small ones hash inline.
        behind = verify and actual >= HASH_BEHIND_BYTES
        pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-verify") if behind else None
        checks: list[tuple[str, Future]] = []
        try:
            for tname, t in tensors:
                if t["offset"] < header_size:
                    raise CorruptCheckpointError(f"Tensor {tname!r} overlaps the header of {fname!r}.")
                buf = np.empty(t["length"], dtype=np.uint8)
                _read_into(fh, t["offset"], memoryview(buf), fname)
                if pool is not None:
                    checks.append((tname, pool.submit(_matches, buf, t["checksum"])))
                elif verify and not _matches(buf, t["checksum"]):
                    _raise_mismatch(storage, fname, tname)
                out[tname] = buf
            for tname, check in checks:
                if not check.result():
                    _raise_mismatch(storage, fname, tname)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _check_size(storage: Storage, f: dict, tensors: list) -> int:
    fname = f["name"]
    actual = storage.size(fname)
    if actual is None:
        raise CorruptCheckpointError(f"Data file {storage.url_of(fname)!r} of the checkpoint is missing.")
    if actual != f["size"]:
        cut = [t for t, e in tensors if e["offset"] + e["length"] > actual]
        which = f"; tensor(s) past its end: {', '.join(repr(t) for t in cut[:3])}" if cut else ""
        which += f" and {len(cut) - 3} more" if len(cut) > 3 else ""
        raise CorruptCheckpointError(
            f"Data file {storage.url_of(fname)!r} is {actual} bytes; the index expects {f['size']} "
            f"(truncated or extended){which}."
        )
    return actual


def _verify_header(storage: Storage, fh: Any, f: dict, header_size: int) -> None:
    fname = f["name"]
    header = _read_exact(fh, 0, header_size, fname)
    if fmt.checksum_bytes(header) != f["checksum"]:
        raise CorruptCheckpointError(f"{storage.url_of(fname)!r}: safetensors header checksum mismatch.")
    if int.from_bytes(header[:8], "little") != header_size - 8:  # still a valid safetensors file
        raise CorruptCheckpointError(f"{storage.url_of(fname)!r}: safetensors header length is wrong.")


def _matches(buf: np.ndarray, checksum: str) -> bool:
    return fmt.checksum_bytes(memoryview(buf)) == checksum


def _raise_mismatch(storage: Storage, fname: str, tname: str) -> None:
    raise CorruptCheckpointError(
        f"Checksum mismatch for tensor {tname!r} in {storage.url_of(fname)!r}: the file is corrupt."
    )


def _read_exact(fh: Any, offset: int, n: int, fname: str) -> bytes:
    buf = bytearray(n)
    _read_into(fh, offset, memoryview(buf), fname)
    return bytes(buf)


def _read_into(fh: Any, offset: int, view: memoryview, fname: str) -> None:
    fh.seek(offset)
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise CorruptCheckpointError(f"Data file {fname!r} ends early (truncated).")
        got += n


def files_of(name: str, shards: int | None, storage: Storage | None = None) -> list[str]:
    """Data and meta files of a checkpoint; reads the index when the shard count is unknown."""
    if shards is None and storage is not None:
        try:
            return [f["name"] for f in read_index(storage, name, verify=False)["files"]]
        except CheckpointError:
            shards = 1
    n = shards or 1
    return [fmt.data_file_name(name, i, n) for i in range(n)] + [name + META_SUFFIX]
