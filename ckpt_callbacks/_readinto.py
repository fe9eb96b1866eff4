"""Reading a checkpoint's tensor bytes, optionally straight into existing memory (``into=``).

``load_checkpoint(path, into=tree)`` reads each saved tensor whose key path holds a numpy array or
a torch tensor in ``tree`` directly into that array's memory: no full-size intermediate buffer, no
second copy (``load_state_dict``), and no freshly mapped pages (on VMs each first touch of a page
costs a host fault; restoring into a live model touches only memory it already has). Destinations
that cannot take the bytes as they are (non-contiguous views, big-endian arrays, GPU tensors) go
through one staging buffer per data file, reused for every such tensor of the file.

Every destination is checked (same shape, same dtype, writable) before any byte is written, so an
incompatible ``into`` raises IncompatibleCheckpointError and leaves the model untouched. Checksums
are verified while the bytes land: a CorruptCheckpointError raised during the read means the
destinations were partly overwritten (the ones before the corrupt tensor with the checkpoint's
values, the corrupt one with its corrupt bytes) and must be restored again from a good checkpoint;
the error says so.

Reads are large (``_READ_CHUNK``) with the kernel told the access is sequential; each chunk is hashed
on a helper thread while the next one is read (xxhash and readinto release the GIL), so verifying
costs no wall time on big files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from . import _format as fmt
from .errors import CorruptCheckpointError, IncompatibleCheckpointError

# 64 MiB per read(): as fast as one read of the whole tensor on a cold cache (the kernel's readahead
# keeps up), and small enough that hashing one chunk overlaps reading the next.
_READ_CHUNK = 64 << 20
_HASH_BEHIND_BYTES = 32 << 20


# ---------------------------------------------------------------- planning the destinations


def _is_torch(obj: Any) -> bool:
    return fmt._is_torch_tensor(obj)


def _key_path(path: tuple) -> str:
    return "into" + "".join(f"[{k!r}]" for k in path)


def _tensor_leaves(into: Any, path: tuple = (), out: list | None = None) -> list[tuple[tuple, Any]]:
    out = [] if out is None else out
    if isinstance(into, np.ndarray) or _is_torch(into):
        out.append((path, into))
    elif isinstance(into, Mapping):
        for k, v in into.items():
            _tensor_leaves(v, (*path, k), out)
    elif isinstance(into, (list, tuple)):
        for i, v in enumerate(into):
            _tensor_leaves(v, (*path, i), out)
    return out


def plan(index: dict, into: Any) -> dict[str, Any]:
    """Tensor name -> destination (numpy array or torch tensor) for every tensor leaf of ``into``.

    Walks the saved tree and ``into`` side by side (dict keys, list / tuple positions). Raises
    IncompatibleCheckpointError, before anything is read or written, when a destination's shape or
    dtype differs from the saved tensor's, when ``into`` holds a tensor at a key path where the
    checkpoint has none, or ValueError when a destination is read-only.
    """
    found: dict[str, tuple[tuple, Any]] = {}

    def walk(node: Any, dest: Any, path: tuple) -> None:
        if not isinstance(node, dict) or len(node) != 1:
            return
        ((tag, val),) = node.items()
        if tag in ("d", "od") and isinstance(val, list) and isinstance(dest, Mapping):
            for item in val:
                if isinstance(item, list) and len(item) == 2 and item[0] in dest:
                    walk(item[1], dest[item[0]], (*path, item[0]))
        elif tag in ("l", "t") and isinstance(val, list) and isinstance(dest, (list, tuple)):
            for i, v in enumerate(val[: len(dest)]):
                walk(v, dest[i], (*path, i))
        elif tag == "x" and isinstance(val, str) and (isinstance(dest, np.ndarray) or _is_torch(dest)):
            found[val] = (path, dest)

    walk(index["tree"], into, ())
    used = {id(d) for _, d in found.values()}
    missing = [p for p, d in _tensor_leaves(into) if id(d) not in used]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise IncompatibleCheckpointError(
            f"The checkpoint has no tensor at {', '.join(_key_path(p) for p in missing[:5])}{more}: every "
            "tensor in `into` must have a saved tensor at the same key path. Nothing was written; pass an "
            "`into` tree that matches the saved state (load without `into` and inspect it, or "
            "`list_variables(path)`)."
        )
    dests: dict[str, Any] = {}
    for name, (path, dest) in found.items():
        t = index["tensors"].get(name)
        if t is None:
            raise CorruptCheckpointError(f"Checkpoint tree references unknown tensor {name!r}.")
        saved_dtype = fmt.dtype_from_name(t["dtype"])
        saved_shape = tuple(t["shape"])
        if _is_torch(dest):
            from . import _torch

            try:
                dtype = _torch.numpy_dtype(dest)
            except TypeError:
                dtype = None
            shape = tuple(dest.shape)
        else:
            dtype, shape = dest.dtype, dest.shape
            if not dest.flags.writeable:
                raise ValueError(
                    f"{_key_path(path)} is a read-only numpy array; restoring in place needs writable "
                    "memory. Pass a writable array (e.g. `arr.copy()`), or load without `into`."
                )
        same_dtype = dtype is not None and _le(dtype) == _le(saved_dtype)
        if shape != saved_shape or not same_dtype:
            raise IncompatibleCheckpointError(
                f"Cannot restore tensor {name!r} into {_key_path(path)}: the checkpoint holds "
                f"{fmt.dtype_str(saved_dtype)} {list(saved_shape)}, the destination is "
                f"{dest.dtype} {list(shape)}. Nothing was written; pass a destination of the saved shape "
                "and dtype (build the model with the same configuration), or load without `into`."
            )
        dests[name] = dest
    return dests


def _le(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def _direct_view(dest: Any) -> memoryview | None:
    """The destination's own bytes when the saved (little-endian, C-order) bytes fit them as they are."""
    if _is_torch(dest):
        if (
            dest.device.type != "cpu"
            or str(dest.layout) != "torch.strided"
            or not dest.is_contiguous()
            or dest.is_conj()
            or dest.is_neg()
        ):
            return None
        from . import _torch

        arr = _torch.to_numpy(dest)  # a view of the tensor's memory (contiguous CPU: no copy)
    else:
        arr = dest
        if not arr.flags.c_contiguous or arr.dtype.byteorder == ">":
            return None
    return memoryview(arr.reshape(-1).view(np.uint8))


def _fill_from(dest: Any, staged: np.ndarray, t: dict) -> None:
    """Copy staged little-endian bytes into a destination that could not take them directly."""
    arr = staged.view(_le(fmt.dtype_from_name(t["dtype"]))).reshape(t["shape"])
    if _is_torch(dest):
        import torch

        from . import _torch

        with torch.no_grad():
            dest.copy_(_torch.from_numpy(arr))
    else:
        np.copyto(dest, arr, casting="unsafe")  # only the byte order differs (checked in plan())


# ---------------------------------------------------------------- reading


def check_data_files(storage: Any, index: dict, by_file: dict[int, list]) -> None:
    """Every data file present with the size the index records (one stat each)."""
    for file_no, f in enumerate(index["files"]):
        if f.get("kind") != "meta":
            check_data_file(storage, f, by_file.get(file_no, []))


def check_data_file(storage: Any, f: dict, tensors: list) -> None:
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


def read_data_file(
    storage: Any, f: dict, tensors: list, out: dict, verify: bool, dests: dict[str, Any] | None = None
) -> None:
    """Read one data file's tensors (``(name, entry)`` sorted by offset) into ``out[name]``.

    A tensor named in ``dests`` lands in that destination (``out`` gets the destination itself);
    the others get a fresh uint8 array.
    """
    dests = dests or {}
    fname = f["name"]
    check_data_file(storage, f, tensors)
    header_size = f.get("header_size")
    if not isinstance(header_size, int) or not 8 <= header_size <= min(f["size"], fmt.MAX_HEADER_BYTES + 8):
        raise CorruptCheckpointError(f"Invalid header size for {fname!r} in the checkpoint index.")
    direct = {n: _direct_view(d) for n, d in dests.items()}
    staged_sizes = [t["length"] for n, t in tensors if n in dests and direct[n] is None]
    # One staging buffer per file, sized for its largest tensor that cannot be read in place.
    staging = np.empty(max(staged_sizes), np.uint8) if staged_sizes else None
    with storage.open_read(fname) as fh:
        if storage.is_local:
            try:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (AttributeError, OSError):  # not on every platform; only a hint
                pass
        if verify:
            header = bytearray(header_size)
            _read_into(fh, 0, memoryview(header), fname)
            if fmt.checksum_bytes(header) != f["checksum"]:
                raise CorruptCheckpointError(
                    f"{storage.url_of(fname)!r}: safetensors header checksum mismatch."
                )
            if int.from_bytes(header[:8], "little") != header_size - 8:  # still a valid safetensors file
                raise CorruptCheckpointError(
                    f"{storage.url_of(fname)!r}: safetensors header length is wrong."
                )
        behind = verify and f["size"] >= _HASH_BEHIND_BYTES
        pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-verify") if behind else None
        pending: tuple[str, Future] | None = None
        try:
            for tname, t in tensors:
                if t["offset"] < header_size:
                    raise CorruptCheckpointError(f"Tensor {tname!r} overlaps the header of {fname!r}.")
                dest = dests.get(tname)
                view = direct.get(tname)
                buf = None
                if view is None:
                    buf = staging[: t["length"]] if dest is not None else np.empty(t["length"], np.uint8)
                    view = memoryview(buf)
                if len(view) != t["length"]:
                    raise CorruptCheckpointError(
                        f"Tensor {tname!r} in {fname!r} is {t['length']} bytes in the index, which does not "
                        "match its dtype and shape."
                    )
                ok = _read_hashing(fh, t["offset"], view, fname, pool, verify, t["checksum"])
                if pending is not None:  # the previous tensor, hashed while this one was read
                    if not pending[1].result():
                        _raise_mismatch(storage, fname, pending[0], in_place=bool(dests))
                    pending = None
                if isinstance(ok, Future):
                    if buf is not None and dest is not None:
                        ok = ok.result()  # staged: verified before the staging buffer is copied or reused
                    else:
                        pending, ok = (tname, ok), True
                if not ok:
                    _raise_mismatch(storage, fname, tname, in_place=bool(dests))
                if dest is None:
                    out[tname] = buf
                    continue
                if buf is not None:
                    _fill_from(dest, buf, t)
                out[tname] = dest
            if pending is not None and not pending[1].result():
                _raise_mismatch(storage, fname, pending[0], in_place=bool(dests))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _read_hashing(
    fh: Any,
    offset: int,
    view: memoryview,
    fname: str,
    pool: ThreadPoolExecutor | None,
    verify: bool,
    checksum: str,
) -> bool | Future:
    """Read ``len(view)`` bytes at ``offset`` into ``view`` in large chunks, hashing them.

    Without a pool: True when the checksum matches. With one: chunk N is hashed on the pool while
    chunk N+1 is read, and the result is a Future of the match, completed after this tensor's last
    chunk is hashed (the pool runs its one thread's tasks in order) — the caller resolves it while
    reading the next tensor, so the last chunk's hashing overlaps a read too.
    """
    hasher = fmt.new_hasher() if verify else None
    hashing: Future | None = None
    fh.seek(offset)
    pos = 0
    n = len(view)
    while pos < n:
        end = min(n, pos + _READ_CHUNK)
        _fill(fh, view[pos:end], fname)
        if hasher is not None:
            if pool is not None:
                if hashing is not None:
                    hashing.result()
                hashing = pool.submit(hasher.update, view[pos:end])
            else:
                hasher.update(view[pos:end])
        pos = end
    if hasher is None:
        return True
    if pool is None:
        return fmt.checksum_str(hasher) == checksum
    return pool.submit(lambda: fmt.checksum_str(hasher) == checksum)


def _fill(fh: Any, view: memoryview, fname: str) -> None:
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise CorruptCheckpointError(f"Data file {fname!r} ends early (truncated).")
        got += n


def _read_into(fh: Any, offset: int, view: memoryview, fname: str) -> None:
    fh.seek(offset)
    _fill(fh, view, fname)


def _raise_mismatch(storage: Any, fname: str, tname: str, in_place: bool) -> None:
    msg = f"Checksum mismatch for tensor {tname!r} in {storage.url_of(fname)!r}: the file is corrupt."
    if in_place:
        msg += (
            " It was being restored in place: the tensors of `into` read before it (and possibly the one "
            "after it) hold this checkpoint's values, this one holds its corrupt bytes (when it is read in "
            "place) and the rest are unchanged; restore them again from another checkpoint before using them."
        )
    raise CorruptCheckpointError(msg)
