"""Tensor kinds: framework tensor types the format stores, registered by import string.

The core names no framework. A kind is a class that knows one framework's tensor type; it is
registered here as ``"<module>:<attr>"`` under the top-level module of that type (as fsspec's
registry does for backends) and imported only when needed:

- saving: when that top-level module is already imported (a tensor of it can exist only then) and
  a leaf is not a numpy array;
- loading: when the index records a leaf of that kind. If the framework cannot be imported, the
  leaf is given back as the numpy array it was stored as, so every checkpoint reads without torch.

A kind provides ``name``, ``tensor_type``, ``numpy_dtype(t)``, ``to_numpy(t)``, ``from_numpy(arr)``
``copy_into(buf, t) -> bool`` (a direct copy into a host buffer for async snapshots; False when
it cannot, so the caller converts with ``to_numpy``), and for restoring in place ``host_view(t)`` (a
numpy view of the tensor's own memory, or None) and ``copy_from(t, arr)``.

Sharded leaves (a tensor whose bytes are spread over processes) are registered the same way, with
the package that writes and reads them (:data:`SHARDED`): it is imported the first time a state
holds such a leaf, and registers itself with :mod:`._sharding` when imported.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

# top-level module of the tensor type -> "module:attr" of its kind
KINDS: dict[str, str] = {"torch": "ckpt_callbacks._format._torch:TorchKind"}
# "module:attr" of a sharded leaf type -> the package that registers its backend with _sharding
SHARDED: dict[str, str] = {"torch.distributed.tensor:DTensor": "ckpt_callbacks.distributed"}
NUMPY = "numpy"
_loaded: dict[str, Any] = {}
_missing: set[str] = set()


def known_kinds() -> frozenset[str]:
    """Every kind name an index may record (``"numpy"`` included)."""
    return frozenset({NUMPY, *KINDS})


def get(name: str) -> Any:
    """The kind registered as ``name``, imported now (ImportError when its framework is missing)."""
    kind = _loaded.get(name)
    if kind is None:
        module, _, attr = KINDS[name].partition(":")
        kind = getattr(importlib.import_module(module), attr)()
        _loaded[name] = kind
    return kind


def kind_of(obj: Any) -> Any | None:
    """The kind of a framework tensor ``obj``, or None when no registered kind claims it."""
    for name in KINDS:
        if sys.modules.get(name) is None:
            continue  # that framework is not imported: obj cannot be one of its tensors
        kind = get(name)
        if isinstance(obj, kind.tensor_type):
            return kind
    return None


def from_numpy(name: str, arr: Any) -> Any:
    """A loaded array as the kind the index recorded; numpy when that framework is not importable."""
    if name == NUMPY or name in _missing:
        return arr
    try:
        kind = get(name)
    except ImportError:
        _missing.add(name)
        return arr
    return kind.from_numpy(arr)


def sharded_types() -> dict[type, str]:
    """Each sharded leaf type whose module is already imported (no leaf can exist otherwise) -> its key
    in :data:`SHARDED`. Nothing is imported."""
    out = {}
    for key in SHARDED:
        module, _, attr = key.partition(":")
        found = getattr(sys.modules.get(module), attr, None)
        if isinstance(found, type):
            out[found] = key
    return out


def load_sharded(key: str) -> None:
    """Import the package that handles the sharded leaves ``key`` names (it registers itself)."""
    importlib.import_module(SHARDED[key])
