"""Restoring in place (``into=``): which saved tensor lands in which existing array or tensor.

``load_checkpoint(path, into=tree)`` reads each saved tensor whose key path holds a numpy array or a
framework tensor (:mod:`._kinds`) in ``tree`` directly into that memory: no full-size intermediate
buffer, no second copy (``load_state_dict``), no freshly mapped pages (on VMs each first touch of a
page costs a host fault; restoring into a live model touches only memory it already has).
Destinations that cannot take the bytes as stored (non-contiguous views, big-endian arrays, GPU
tensors) go through one staging buffer per data file, reused for every such tensor of the file
(:func:`._checkpoint_read.read_data_file` does the reading).

Every destination is checked here (same shape, same dtype, writable, and a saved tensor at its key
path) before any byte is written, so an incompatible ``into`` raises and leaves the model untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .._format import _format as fmt
from .._format import _kinds
from .._format._dtypes import dtype_from_name, dtype_str
from .._format._index import Index
from ..errors import CorruptCheckpointError, IncompatibleCheckpointError

logger = logging.getLogger("ckpt_callbacks")


def in_place_or_plain(load: Callable[..., Any], into: Any) -> Any:
    """``load(into=into)``, or a plain ``load()`` when there is no ``into`` or it does not fit the
    checkpoint (``IncompatibleCheckpointError`` is raised before any byte is written, so the plain
    load starts from destinations left untouched). The framework adapters' resume uses this."""
    if not into:
        return load()
    try:
        return load(into=into)
    except IncompatibleCheckpointError as e:
        logger.debug("Not restoring in place: %s", e)
        return load()


def plan_from(index: Index, make_into: Callable[[Index], Any]) -> dict | None:
    """:func:`plan` for the tree ``make_into(index)`` gives; None (a plain load) when it gives none,
    or one that does not fit the checkpoint (as :func:`in_place_or_plain` falls back)."""
    try:
        into = make_into(index)
        return plan(index, into) if into else None
    except IncompatibleCheckpointError as e:
        logger.debug("Not restoring in place: %s", e)
        return None


def _is_tensor(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) or _kinds.kind_of(obj) is not None


def _key_path(path: tuple) -> str:
    return "into" + "".join(f"[{k!r}]" for k in path)


def _tensor_leaves(into: Any, path: tuple = (), out: list | None = None) -> list[tuple[tuple, Any]]:
    out = [] if out is None else out
    if _is_tensor(into):
        out.append((path, into))
    elif isinstance(into, Mapping):
        for k, v in into.items():
            _tensor_leaves(v, (*path, k), out)
    elif isinstance(into, (list, tuple)):
        for i, v in enumerate(into):
            _tensor_leaves(v, (*path, i), out)
    return out


def _matching(tree: Any, into: Any) -> dict[str, tuple[tuple, Any]]:
    """Saved tensor name -> (key path, destination), walking the saved tree and ``into`` side by side."""
    found: dict[str, tuple[tuple, Any]] = {}

    def walk(node: Any, dest: Any, path: tuple) -> None:
        kind, val = fmt.tree_view(node)
        if kind == "dict" and isinstance(dest, Mapping):
            for key, child in val:
                if key in dest:
                    walk(child, dest[key], (*path, key))
        elif kind in ("list", "tuple") and isinstance(dest, (list, tuple)):
            for i, v in enumerate(val[: len(dest)]):
                walk(v, dest[i], (*path, i))
        elif kind == "tensor" and _is_tensor(dest):
            found[val] = (path, dest)

    walk(tree, into, ())
    return found


def _refuse_unmatched(missing: list[tuple], index: Index) -> None:
    saved = sorted(index["tensors"])
    shown = ", ".join(_key_path(p) for p in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    names = ", ".join(repr(n) for n in saved[:8]) + (f" and {len(saved) - 8} more" if len(saved) > 8 else "")
    raise IncompatibleCheckpointError(
        f"The checkpoint has no tensor at {shown}{more}: every tensor in `into` must have a saved tensor "
        f"at the same key path (like load_state_dict(strict=True)). Saved tensors: {names or 'none'}. "
        "Nothing was written. Leave those keys out of `into` (they then keep their values), restore "
        "into a tree shaped like the saved state, or load without `into` to see it."
    )


def plan(index: Index, into: Any) -> dict[str, Any]:
    """Tensor name -> destination (numpy array or framework tensor) for every tensor leaf of ``into``.

    Raises IncompatibleCheckpointError, before anything is read or written, when ``into`` holds a
    tensor at a key path where the checkpoint has none, or a destination's shape or dtype differs
    from the saved tensor's; ValueError when a numpy destination is read-only.
    """
    found = _matching(index["tree"], into)
    used = {id(d) for _, d in found.values()}
    missing = [p for p, d in _tensor_leaves(into) if id(d) not in used]
    if missing:
        _refuse_unmatched(missing, index)
    dests: dict[str, Any] = {}
    for name, (path, dest) in found.items():
        t = index["tensors"].get(name)
        if t is None:
            raise CorruptCheckpointError(f"Checkpoint tree references unknown tensor {name!r}.")
        _check_destination(name, path, dest, dtype_from_name(t["dtype"]), tuple(t["shape"]))
        dests[name] = dest
    return dests


def _check_destination(name: str, path: tuple, dest: Any, saved_dtype: np.dtype, saved_shape: tuple) -> None:
    kind = _kinds.kind_of(dest)
    if kind is not None:
        try:
            dtype = kind.numpy_dtype(dest)
        except TypeError:
            dtype = None
    else:
        dtype = dest.dtype
        if not dest.flags.writeable:
            raise ValueError(
                f"{_key_path(path)} is a read-only numpy array; restoring in place needs writable "
                "memory. Pass a writable array (e.g. `arr.copy()`), or load without `into`."
            )
    shape = tuple(dest.shape)
    if shape != saved_shape or dtype is None or _le(dtype) != _le(saved_dtype):
        raise IncompatibleCheckpointError(
            f"Cannot restore tensor {name!r} into {_key_path(path)}: the checkpoint holds "
            f"{dtype_str(saved_dtype)} {list(saved_shape)}, the destination is "
            f"{dest.dtype} {list(shape)}. Nothing was written; pass a destination of the saved shape "
            "and dtype (build the model with the same configuration), or load without `into`."
        )


def _le(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def direct_view(dest: Any) -> memoryview | None:
    """The destination's own bytes when the saved (little-endian, C-order) bytes fit them as they
    are; None when they must be staged and copied in (:func:`fill_from`)."""
    kind = _kinds.kind_of(dest)
    if kind is not None:
        arr = kind.host_view(dest)
        if arr is None:
            return None
    else:
        arr = dest
        if not arr.flags.c_contiguous or arr.dtype.byteorder == ">":
            return None
    return memoryview(arr.reshape(-1).view(np.uint8))


def fill_from(dest: Any, staged: np.ndarray, t: dict) -> None:
    """Copy staged little-endian bytes of index entry ``t`` into a destination that could not take
    them directly."""
    arr = staged.view(_le(dtype_from_name(t["dtype"]))).reshape(t["shape"])
    kind = _kinds.kind_of(dest)
    if kind is not None:
        kind.copy_from(dest, arr)
    else:
        np.copyto(dest, arr, casting="unsafe")  # only the byte order differs (checked in plan())


def copy_into(dest: Any, value: Any) -> Any:
    """Copy a loaded tensor (numpy or a kind's, the saved shape and dtype) into ``dest``; returns ``dest``."""
    kind = _kinds.kind_of(value)
    arr = kind.to_numpy(value) if kind is not None else value
    dest_kind = _kinds.kind_of(dest)
    if dest_kind is not None:
        dest_kind.copy_from(dest, arr)
    else:
        np.copyto(dest, arr, casting="unsafe")  # only the byte order may differ (checked in plan())
    return dest
