"""Reading and verifying ONE checkpoint: bounded small-file reads, the checked index, data files.

Every reader goes through here: ``load_checkpoint``, ``CheckpointManager.restore``, the CLI's
``inspect`` / ``verify`` / ``export``, the startup sweep (which reads indexes to know a checkpoint's
files). Tensors come back as numpy arrays, or as their framework's type when the index records one
(``"kind": "torch"``) and that framework is importable (:mod:`._kinds`).
"""

from __future__ import annotations

import io
import mmap
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from .. import _warn
from .._format import _chunks, _kinds
from .._format import _format as fmt
from .._format._index import Index
from .._format._names import INDEX_SUFFIX, META_SUFFIX, may_reference
from .._storage import Storage
from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from . import _readinto

MAX_META_BYTES = 64 * 1024 * 1024
# Files at least this big are verified with chunk N hashed on a helper thread while N+1 is read.
HASH_BEHIND_BYTES = 32 << 20
# 64 MiB per read(): as fast as one read of the whole tensor on a cold cache (the kernel's readahead
# keeps up), and small enough that hashing one chunk overlaps reading the next.
READ_CHUNK = 64 << 20
# Without a destination, a local tensor at an offset aligned to this many bytes is returned as a
# copy-on-write view of the data file's mapping (verified by reading it through a small buffer).
MAP_ALIGN = 8
MAP_VERIFY_CHUNK = 8 << 20
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


def read_index(storage: Storage, name: str, verify: bool = True, data: bytes | None = None) -> Index:
    """The checked index of checkpoint ``name`` (``data``: its bytes, when already read)."""
    if data is None:
        data = read_bounded(storage, name + INDEX_SUFFIX, fmt.MAX_INDEX_BYTES)
    index = fmt.parse_index(data, verify=verify)
    for f in index["files"]:
        fname = fmt.check_name(f["name"])
        own = fname.startswith(name + ".")
        # An incremental checkpoint's data may live in a data file of an earlier checkpoint of its prefix.
        if not own and (f.get("kind") == "meta" or not may_reference(name, fname)):
            raise CorruptCheckpointError(
                f"Checkpoint index {name + INDEX_SUFFIX!r} names file {fname!r}, which belongs to another checkpoint."
            )
    _check_placement(index)
    return index


def _check_placement(index: Index) -> None:
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
    index: Index,
    out: dict,
    *,
    verify: bool,
    on_file: Callable[[int], None] | None = None,
    dests: dict[str, Any] | None = None,
) -> None:
    """Read every data file of a checked index into ``out`` (tensor name -> raw uint8 array); with
    ``verify`` the ``.meta`` and every checksum are checked too. ``on_file(size)`` follows each data
    file. An ``out`` that drops what it is given verifies a checkpoint in bounded memory. Tensors
    named in ``dests`` (see :func:`._readinto.plan`) are read into that destination, which ``out``
    then holds.

    A sharded save's chunked tensors (:mod:`._chunks`) are read chunk by chunk, each as a plain
    entry of its own: ``index`` is changed in place by that (:func:`read_tensors` joins them)."""
    _chunks.split(index)
    by_file: dict[int, list[tuple[str, dict]]] = {}
    for tname, t in index["tensors"].items():
        by_file.setdefault(t["file"], []).append((tname, t))
    files = list(enumerate(index["files"]))
    if dests:  # every missing or cut file is found before the first byte lands in a destination
        for file_no, f in files:
            if f.get("kind") != "meta":
                _check_size(storage, f, by_file.get(file_no, []))
    for file_no, f in sorted(files, key=lambda x: x[1].get("kind") != "meta"):  # the small .meta first
        if f.get("kind") == "meta":
            if verify:
                read_meta_file(storage, f)
            continue
        tensors = sorted(by_file.get(file_no, []), key=lambda x: x[1]["offset"])
        read_data_file(storage, f, tensors, out, verify, dests)
        if on_file is not None:
            on_file(f["size"])


def read_tensors(
    storage: Storage, index: Index, *, verify: bool, dests: dict | None = None
) -> dict[str, Any]:
    """Every tensor of a checked index by name, as stored (numpy) or as its recorded kind; those in
    ``dests`` are read into (and given back as) their destination (a chunked one is assembled,
    then copied in)."""
    chunked = _chunks.split(index)
    raw: dict[str, Any] = {}
    read_files(storage, index, raw, verify=verify, dests=dests)
    tensors = {}
    for tname, t in index["tensors"].items():
        if dests and tname in dests:
            tensors[tname] = dests[tname]
            continue
        arr = raw[tname].view(fmt.dtype_from_name(t["dtype"]).newbyteorder("<")).reshape(t["shape"])
        if t.get("byteorder") == ">":  # saved from a big-endian array: given back as one
            arr = arr.astype(arr.dtype.newbyteorder(">"))
        tensors[tname] = _kinds.from_numpy(t.get("kind", "numpy"), arr)
    _chunks.assemble(index, chunked, tensors)
    for tname in chunked.keys() & (dests or {}).keys():  # pieces of several files: assembled, then copied in
        tensors[tname] = _readinto.copy_into(dests[tname], tensors[tname])
    return tensors


def load(
    storage: Storage,
    name: str,
    *,
    verify: bool,
    allow_pickle: bool,
    into: Any = None,
    index: Index | None = None,
) -> dict:
    """The state tree of checkpoint ``name``; with ``verify`` every checksum is checked. Tensors of
    ``into`` are restored in place (see :mod:`._readinto`; checked before anything is read).

    ``index``: the checked index, when the caller read it already (each byte is read once).
    ``into`` may also be a function of the checked index giving the tree to fill, or None (the
    framework adapters pair their variables with the index): when that tree does not fit, the
    checkpoint is loaded plainly, from the same index (:func:`._readinto.plan_from`)."""
    if index is None:
        index = read_index(storage, name, verify=verify)
    if callable(into):
        dests = _readinto.plan_from(index, into)
    else:
        dests = _readinto.plan(index, into) if into is not None else None
    tensors = read_tensors(storage, index, verify=verify, dests=dests)
    try:
        return fmt.decode_tree(index["tree"], tensors, allow_pickle=allow_pickle)
    except RecursionError:  # nesting the JSON parser accepted but the interpreter stack cannot decode
        raise CorruptCheckpointError("Checkpoint tree is nested too deeply.") from None


def read_data_file(
    storage: Storage, f: dict, tensors: list, out: dict, verify: bool, dests: dict[str, Any] | None = None
) -> None:
    """Read the tensors ``[(name, entry), ...]`` (by offset) of data file ``f`` into ``out[name]``: raw
    uint8 arrays, or for a name in ``dests`` that destination, filled in place. With ``verify`` the
    header and every tensor checksum are checked (a mismatch after bytes landed in a destination
    says which ones were overwritten)."""
    fname = f["name"]
    actual = _check_size(storage, f, tensors)
    header_size = f.get("header_size")
    if not isinstance(header_size, int) or not 8 <= header_size <= min(actual, fmt.MAX_HEADER_BYTES + 8):
        raise CorruptCheckpointError(f"Invalid header size for {fname!r} in the checkpoint index.")
    dests = {n: dests[n] for n, _ in tensors if n in dests} if dests else {}
    with storage.open_read(fname) as fh:
        mapped = None
        if storage.is_local:
            _advise_sequential(fh)
            if len(dests) < len(tensors):
                mapped = _map_private(fh)
        if verify:
            _verify_header(storage, fh, f, header_size)
        # Big files: chunk N is hashed on a helper thread while chunk N+1 is read (xxhash and
        # readinto both release the GIL), so verifying costs no wall time. Small ones hash inline.
        behind = verify and actual >= HASH_BEHIND_BYTES
        pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-verify") if behind else None
        try:
            reader = _DataFileReader(storage, fh, fname, pool, verify, dests, mapped)
            reader.read(tensors, out, header_size)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _advise_sequential(fh: Any) -> None:
    try:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError, ValueError):  # not on every platform / file object; only a hint
        pass


def _map_private(fh: Any) -> Any:
    """A private (copy-on-write) mapping of a local data file, or None where there is none.

    Tensors returned without a destination are views of it, as safetensors' loader returns: their
    pages are the page cache's, so a load maps no fresh memory (on a VM every fresh page can cost a
    host fault), and a page is copied only if the caller writes to it. Files this library commits are
    never changed in place (a save of the same step writes a new file and renames it), so a view keeps
    the bytes it was verified with, even after retention deletes the file.
    """
    if os.name != "posix":  # a mapped file could not be deleted by retention on Windows
        return None
    try:
        return mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


class _DataFileReader:
    """The tensors of one open data file, each read into its destination's own memory, (a destination
    that cannot take the bytes as stored) one staging buffer reused per file, or without a destination
    a view of the file's private mapping (``mapped``) where there is one, else a fresh array."""

    def __init__(
        self, storage: Storage, fh: Any, fname: str, pool: Any, verify: bool, dests: dict, mapped: Any = None
    ) -> None:
        self.storage, self.fh, self.fname, self.pool, self.verify = storage, fh, fname, pool, verify
        self.dests, self.mapped = dests, mapped
        self.direct = {n: _readinto.direct_view(d) for n, d in dests.items()}
        self.scratch: memoryview | None = None  # verifies mapped tensors

    def read(self, tensors: list, out: dict, header_size: int) -> None:
        staged = [t["length"] for n, t in tensors if n in self.direct and self.direct[n] is None]
        staging = np.empty(max(staged), np.uint8) if staged else None
        pending: tuple[str, Future] | None = None  # the previous tensor, hashed while this one is read
        for tname, t in tensors:
            if t["offset"] < header_size:
                raise CorruptCheckpointError(f"Tensor {tname!r} overlaps the header of {self.fname!r}.")
            if self._mappable(tname, t):
                if not self._verify_mapped(t):
                    _raise_mismatch(self.storage, self.fname, tname, in_place=bool(self.dests))
                out[tname] = np.frombuffer(self.mapped, np.uint8, t["length"], t["offset"])
                continue
            dest, view, buf = self.dests.get(tname), self.direct.get(tname), None
            if view is None:
                buf = staging[: t["length"]] if dest is not None else np.empty(t["length"], np.uint8)
                view = memoryview(buf)
            if len(view) != t["length"]:
                raise CorruptCheckpointError(
                    f"Tensor {tname!r} in {self.fname!r} is {t['length']} bytes in the index, which does "
                    "not match its dtype and shape."
                )
            ok = _read_hashing(self.fh, t["offset"], view, self.fname, self.pool, self.verify, t["checksum"])
            if pending is not None:
                self._check(*pending)
                pending = None
            if isinstance(ok, Future):
                if buf is not None and dest is not None:
                    ok = ok.result()  # staged: verified before the staging buffer is copied or reused
                else:
                    pending, ok = (tname, ok), True
            if not ok:
                _raise_mismatch(self.storage, self.fname, tname, in_place=bool(self.dests))
            if buf is not None and dest is not None:
                _readinto.fill_from(dest, buf, t)
            out[tname] = buf if dest is None else dest
        if pending is not None:
            self._check(*pending)

    def _mappable(self, tname: str, t: dict) -> bool:
        return (
            self.mapped is not None
            and tname not in self.dests
            and t["length"] > 0
            and t["offset"] % MAP_ALIGN == 0
            and t["offset"] + t["length"] <= len(self.mapped)
        )

    def _verify_mapped(self, t: dict) -> bool:
        """Read a mapped tensor's bytes through a small reused buffer, hashing them: the read fills the
        page cache the mapping shows, so the view's later page faults find its pages there."""
        if not self.verify:
            return True
        if self.scratch is None or len(self.scratch) < min(t["length"], MAP_VERIFY_CHUNK):
            self.scratch = memoryview(np.empty(min(t["length"], MAP_VERIFY_CHUNK), np.uint8))
        hasher = fmt.new_hasher()
        self.fh.seek(t["offset"])
        left = t["length"]
        while left:
            piece = self.scratch[: min(left, len(self.scratch))]
            _fill(self.fh, piece, self.fname)
            hasher.update(piece)
            left -= len(piece)
        return fmt.checksum_str(hasher) == t["checksum"]

    def _check(self, tname: str, match: Future) -> None:
        if not match.result():
            _raise_mismatch(self.storage, self.fname, tname, in_place=bool(self.dests))


def _read_hashing(
    fh: Any, offset: int, view: memoryview, fname: str, pool: Any, verify: bool, checksum: str
) -> bool | Future:
    """Read ``len(view)`` bytes at ``offset`` into ``view`` in ``READ_CHUNK`` pieces, hashing them.

    Without a pool: whether the checksum matches. With one: chunk N is hashed on the pool while
    chunk N+1 is read, and the result is a Future of the match, completed after the last chunk is
    hashed (the pool's one thread runs its tasks in order): the caller resolves it while reading the
    next tensor, so the last chunk's hashing overlaps a read too.
    """
    hasher = fmt.new_hasher() if verify else None
    hashing: Future | None = None
    fh.seek(offset)
    pos, n = 0, len(view)
    while pos < n:
        end = min(n, pos + READ_CHUNK)
        _fill(fh, view[pos:end], fname)
        if hasher is not None and pool is not None:
            if hashing is not None:
                hashing.result()
            hashing = pool.submit(hasher.update, view[pos:end])
        elif hasher is not None:
            hasher.update(view[pos:end])
        pos = end
    if hasher is None:
        return True
    if pool is None:
        return fmt.checksum_str(hasher) == checksum
    return pool.submit(lambda: fmt.checksum_str(hasher) == checksum)


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
    header = bytearray(header_size)
    fh.seek(0)
    _fill(fh, memoryview(header), fname)
    if fmt.checksum_bytes(header) != f["checksum"]:
        raise CorruptCheckpointError(f"{storage.url_of(fname)!r}: safetensors header checksum mismatch.")
    if int.from_bytes(header[:8], "little") != header_size - 8:  # still a valid safetensors file
        raise CorruptCheckpointError(f"{storage.url_of(fname)!r}: safetensors header length is wrong.")


def _raise_mismatch(storage: Storage, fname: str, tname: str, in_place: bool = False) -> None:
    msg = f"Checksum mismatch for tensor {tname!r} in {storage.url_of(fname)!r}: the file is corrupt."
    if in_place:
        msg += (
            " It was being restored in place: the tensors of `into` read before it (and possibly the one "
            "after it) hold this checkpoint's values, this one holds its corrupt bytes (when it is read in "
            "place) and the rest are unchanged; restore them again from another checkpoint before using them."
        )
    raise CorruptCheckpointError(msg)


def _fill(fh: Any, view: memoryview, fname: str) -> None:
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


T = TypeVar("T")


def newest_first(names: Iterable[str], latest: str | None) -> list[str]:
    """A state file's checkpoint names, newest first: ``latest`` (the one it names as newest), then
    the others from the last listed back."""
    older = [n for n in names if n != latest]
    return ([latest] if latest else []) + older[::-1]


def newest_valid(
    storage: Storage,
    names: Iterable[str],
    open_one: Callable[[str], T],
    *,
    skip: tuple[type[BaseException], ...] = (CheckpointError,),
) -> tuple[str, T] | None:
    """The first checkpoint of ``names`` (newest first) that ``open_one`` opens, and what it returned;
    one that fails with a ``skip`` error is passed over with a warning. None when none opens."""
    for name in names:
        try:
            return name, open_one(name)
        except skip as e:
            _warn.warn(
                f"Checkpoint {storage.url_of(name)!r} is unusable ({e}); falling back to an older one."
            )
    return None
