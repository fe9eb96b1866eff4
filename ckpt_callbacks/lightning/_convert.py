"""Lightning's checkpoint dict <-> the core state tree, without pickle.

The core stores dict (str/int keys), OrderedDict, list, tuple, scalars, bytes, numpy and torch
tensors. A Lightning checkpoint also holds containers the core does not know: the hparams
``AttributeDict``, ``argparse.Namespace``, ``torch.Size``, sets, ``torch.dtype`` / ``torch.device``
values, ``pathlib`` paths, enums, named tuples, class objects (the omegaconf hparams type, legacy
callback-state keys) and the ``_metadata`` attribute of a module ``state_dict``. Each is turned into a
plain tree node, and its original type is recorded in a side table stored under the reserved
top-level key ``RESERVED_KEY``: a list of ``[key_path, tag, extra]`` rows. Decoding replays the table
deepest-first, so the tree itself stays readable by ``ckpt-callbacks inspect`` and any other reader.

Class objects are written as ``"module:qualname"`` and resolved back only through ``sys.modules``:
loading never imports a module or runs code. A class whose module is not imported comes back as
its name, with a warning.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import importlib
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .. import _warn
from ..errors import CorruptCheckpointError

RESERVED_KEY = "__ckpt_callbacks__"
_CONVERTER_VERSION = 1

# Lightning's AttributeDict (hparams), per tag: the module holding it in each namespace. The tag is
# namespace-neutral; it decodes to the class of the namespace doing the load.
_ATTRIBUTE_DICTS = {
    "AttributeDict": {
        "lightning": "lightning.pytorch.utilities.parsing",
        "pytorch_lightning": "pytorch_lightning.utilities.parsing",
    },
    "fabric.AttributeDict": {
        "lightning": "lightning.fabric.utilities.data",
        "pytorch_lightning": "lightning_fabric.utilities.data",
    },
}
_SCALAR_TYPES = (type(None), bool, int, float, str, bytes)
# Top-level keys whose unrepresentable leaves are dropped (with a warning) instead of failing the save:
# stock Lightning saves any object there, and a model in the hparams must not stop training.
_HPARAMS_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")
_DROP = object()


class _Ctx:
    def __init__(self, allow_pickle: bool) -> None:
        self.table: list[list[Any]] = []
        self.seen: set[int] = set()
        self.allow_pickle = allow_pickle
        self.dropped: list[tuple[str, str]] = []


def _attribute_dict_tag(t: type) -> str | None:
    if t.__name__ != "AttributeDict":
        return None
    for tag, modules in _ATTRIBUTE_DICTS.items():
        if t.__module__ in modules.values():
            return tag
    return None


def _attribute_dict_class(tag: str, ns: str | None) -> type:
    modules = _ATTRIBUTE_DICTS[tag]
    order = [ns] if ns in modules else []
    order += [n for n in modules if n not in order]
    for n in order:
        module = sys.modules.get(modules[n])
        if module is not None:
            return module.AttributeDict
    for n in order:  # neither imported yet: import the first installed (a fixed, known module)
        try:
            return importlib.import_module(modules[n]).AttributeDict
        except ImportError:
            continue
    return dict  # pragma: no cover - Lightning absent


def _omegaconf() -> Any:
    """The omegaconf module if the process uses it (it is never imported just to check)."""
    return sys.modules.get("omegaconf")


def class_path(cls: type) -> str:
    """``"module:qualname"`` of a class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_class(path: str) -> type | None:
    """The class named by :func:`class_path` if its module is already imported, else None.

    Never imports anything: a checkpoint must not be able to make the loader run code.
    """
    if not isinstance(path, str) or ":" not in path:
        return None
    module_name, qualname = path.split(":", 1)
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        if obj is None or part.startswith("<"):
            return None
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def to_tree(
    checkpoint: Mapping[str, Any], allow_pickle: bool = False, warned: set[str] | None = None
) -> dict[str, Any]:
    """A Lightning checkpoint dict as a core state tree (plus the type table under ``RESERVED_KEY``).

    Tensors are not copied. Leaves the core cannot store are left in place so that the core raises
    its ``TypeError`` naming the key path with the ``allow_pickle`` hint, except under the hparams
    keys: there (unless ``allow_pickle``) such a value is left out of the checkpoint with one
    warning naming its key path, and recorded, so that a load that needs it says what is missing.
    ``warned``: key paths already warned about (a callback passes its own set: one warning per run).

    Example:
        >>> tree = to_tree({"state_dict": model.state_dict(), "hyper_parameters": model.hparams})
        >>> from_tree(tree)["hyper_parameters"].lr
        0.1
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(
            f"A Lightning checkpoint must be a dict. Received: {type(checkpoint).__name__}. "
            "Pass the dict that Trainer.save_checkpoint / CheckpointIO.save_checkpoint produces."
        )
    if RESERVED_KEY in checkpoint:
        raise ValueError(
            f"The checkpoint dict already has the reserved key {RESERVED_KEY!r}; it is used by "
            "ckpt_callbacks to record container types. Rename that key."
        )
    ctx = _Ctx(allow_pickle)
    tree = _encode(checkpoint, (), ctx)
    tree = dict(tree) if not isinstance(tree, dict) else tree
    tree[RESERVED_KEY] = {"version": _CONVERTER_VERSION, "types": ctx.table}
    if ctx.dropped:
        tree[RESERVED_KEY]["dropped"] = [[p, kind] for p, kind in ctx.dropped]
        _warn_dropped(ctx.dropped, set() if warned is None else warned)
    return tree


def _warn_dropped(dropped: list[tuple[str, str]], warned: set[str]) -> None:
    new = [f"{p} ({kind})" for p, kind in dropped if p not in warned]
    if not new:
        return
    warned.update(p for p, _ in dropped)
    _warn.warn(
        f"Hyper-parameters that cannot be saved without pickle are left out of the checkpoint: "
        f"{', '.join(new)}. Training goes on; loading the model from the checkpoint will need them as "
        "keyword arguments. Fix: save_hyperparameters(ignore=[...]) with their names, or "
        "allow_pickle=True on both the saving and the loading side."
    )


def _encode(obj: Any, path: tuple, ctx: _Ctx) -> Any:
    table, seen = ctx.table, ctx.seen
    t = type(obj)
    if t in _SCALAR_TYPES or isinstance(obj, torch.Tensor):
        return obj
    oc = _omegaconf()
    if oc is not None and isinstance(obj, (oc.DictConfig, oc.ListConfig)):
        # Kept as Lightning keeps them (torch.save pickles the config): interpolations unresolved.
        tag = "DictConfig" if isinstance(obj, oc.DictConfig) else "ListConfig"
        container = oc.OmegaConf.to_container(obj, resolve=False, enum_to_str=False)
        table.append([list(path), tag, None])
        return _encode(container, path, ctx)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        table.append([list(path), "dataclass", class_path(t)])
        return {f.name: _encode(getattr(obj, f.name), (*path, f.name), ctx) for f in dataclasses.fields(obj)}
    if t is dict or t is collections.OrderedDict or isinstance(obj, Mapping):
        if id(obj) in seen:
            raise ValueError(f"The checkpoint contains a reference cycle at {_path_str(path)}.")
        seen.add(id(obj))
        out: dict[Any, Any] = collections.OrderedDict() if t is collections.OrderedDict else {}
        type_keys = []
        for k, v in obj.items():
            key = k
            if isinstance(k, type):  # legacy callback-state keys were the callback classes
                key = class_path(k)
                type_keys.append(key)
            elif type(k) is not str and isinstance(k, str):
                key = str(k)
            value = _encode(v, (*path, key), ctx)
            if value is not _DROP:
                out[key] = value
        seen.discard(id(obj))
        if type_keys:
            table.append([list(path), "typekeys", type_keys])
        metadata = getattr(obj, "_metadata", None)
        if t is collections.OrderedDict and isinstance(metadata, dict):
            # nn.Module.state_dict() carries per-submodule versions used by _load_from_state_dict.
            table.append(
                [list(path), "state_dict_metadata", _encode(metadata, (*path, "_metadata"), _Ctx(False))]
            )
        attr_tag = _attribute_dict_tag(t)
        if attr_tag is not None:
            table.append([list(path), attr_tag, None])
        elif isinstance(obj, collections.Counter):
            table.append([list(path), "Counter", None])
        elif isinstance(obj, collections.defaultdict):
            factory = obj.default_factory
            table.append(
                [list(path), "defaultdict", class_path(factory) if isinstance(factory, type) else None]
            )
        return out
    if isinstance(obj, argparse.Namespace):
        table.append([list(path), "Namespace", None])
        return {k: _encode(v, (*path, k), ctx) for k, v in vars(obj).items()}
    if t is list or t is tuple:
        if id(obj) in seen:
            raise ValueError(f"The checkpoint contains a reference cycle at {_path_str(path)}.")
        seen.add(id(obj))
        out_seq = t(_keep(_encode(v, (*path, i), ctx)) for i, v in enumerate(obj))
        seen.discard(id(obj))
        return out_seq
    if isinstance(obj, torch.Size):
        table.append([list(path), "torch.Size", None])
        return tuple(int(d) for d in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        table.append([list(path), "namedtuple", class_path(t)])
        return tuple(_keep(_encode(v, (*path, i), ctx)) for i, v in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        table.append([list(path), "frozenset" if isinstance(obj, frozenset) else "set", None])
        items = list(obj)
        try:
            items.sort()
        except TypeError:
            pass
        return [_keep(_encode(v, (*path, i), ctx)) for i, v in enumerate(items)]
    if isinstance(obj, list):
        return [_keep(_encode(v, (*path, i), ctx)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_keep(_encode(v, (*path, i), ctx)) for i, v in enumerate(obj))
    if isinstance(obj, torch.dtype):
        table.append([list(path), "torch.dtype", None])
        return str(obj).removeprefix("torch.")
    if isinstance(obj, torch.device):
        table.append([list(path), "torch.device", None])
        return str(obj)
    if isinstance(obj, pathlib.PurePath):
        table.append([list(path), "Path", None])
        return str(obj)
    if isinstance(obj, enum.Enum):
        table.append([list(path), "enum", class_path(t)])
        return _encode(obj.value, path, ctx)
    if isinstance(obj, type):
        table.append([list(path), "type", None])
        return class_path(obj)
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj
    for base in (int, float, str, bytes):  # subclasses of plain scalars (not numpy, not enums)
        if isinstance(obj, base):
            return base(obj)
    if path and path[0] in _HPARAMS_KEYS and not ctx.allow_pickle:
        ctx.dropped.append((_path_str(path), f"{t.__module__}.{t.__qualname__}"))
        return _DROP
    return obj  # unknown leaves: the core stores them with allow_pickle or raises TypeError naming them


def _keep(value: Any) -> Any:
    return None if value is _DROP else value  # a dropped list item keeps the positions of the others


def from_tree(tree: Any, dropped: list | None = None, ns: str | None = None) -> dict[str, Any]:
    """The Lightning checkpoint dict of a tree written by :func:`to_tree` (types restored).

    A tree without the reserved key (a plain core checkpoint) is returned as is. ``dropped``, if
    given, receives ``(key path, type name)`` of the hparams values the save had to leave out;
    ``ns`` picks the Lightning namespace of the restored ``AttributeDict`` objects.
    """
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(
            f"A Lightning checkpoint's state must be a dict; this one is a {type(tree).__name__}."
        )
    info = tree.pop(RESERVED_KEY, None)
    if info is None:
        return tree
    if not isinstance(info, dict) or not isinstance(info.get("types"), list):
        raise CorruptCheckpointError(f"Invalid {RESERVED_KEY!r} entry in the checkpoint.")
    if info.get("version", 0) > _CONVERTER_VERSION:
        _warn.warn(
            f"The checkpoint was written by a newer ckpt_callbacks (Lightning converter version "
            f"{info.get('version')}); some container types may come back as plain dicts or lists."
        )
    if dropped is not None:
        dropped.extend(
            tuple(row) for row in info.get("dropped") or [] if isinstance(row, list) and len(row) == 2
        )
    rows = info["types"]
    tags: dict[tuple, list[tuple[str, Any]]] = {}
    for row in rows:
        if not (isinstance(row, (list, tuple)) and len(row) == 3 and isinstance(row[0], (list, tuple))):
            raise CorruptCheckpointError(f"Invalid type-table row in the checkpoint: {str(row)[:80]!r}.")
        path, tag, extra = row
        if not all(type(k) in (str, int) for k in path):
            raise CorruptCheckpointError(
                f"Invalid key path in the checkpoint's type table: {str(path)[:80]!r}."
            )
        tags.setdefault(tuple(path), []).append((tag, extra))
    # Every prefix of a tagged path: only those subtrees are rebuilt, children first (a dict whose
    # keys are classes, or a tuple holding a torch.Size, is rebuilt after what it contains).
    on_the_way = {path[:n] for path in tags for n in range(len(path) + 1)}
    found: set[tuple] = set()

    def rebuild(node: Any, path: tuple) -> Any:
        if path not in on_the_way:
            return node
        if isinstance(node, dict):
            node = type(node)((k, rebuild(v, (*path, k))) for k, v in node.items())
        elif type(node) in (list, tuple):
            node = type(node)(rebuild(v, (*path, i)) for i, v in enumerate(node))
        for tag, extra in tags.get(path, ()):
            found.add(path)
            node = _decode_node(node, tag, extra, ns)
        return node

    out = rebuild(tree, ())
    missing = set(tags) - found
    if missing:
        raise CorruptCheckpointError(
            f"The checkpoint's type table names a missing key path {list(min(missing, key=len))!r}."
        )
    return out


def _decode_node(node: Any, tag: str, extra: Any, ns: str | None = None) -> Any:
    if tag in _ATTRIBUTE_DICTS and isinstance(node, dict):
        return _attribute_dict_class(tag, ns)(node)
    if tag in ("DictConfig", "ListConfig") and isinstance(node, (dict, list)):
        import omegaconf  # a fixed library, never a module named by the checkpoint

        return omegaconf.OmegaConf.create(node)
    if tag == "Counter" and isinstance(node, dict):
        return collections.Counter(node)
    if tag == "defaultdict" and isinstance(node, dict):
        factory = resolve_class(extra) if extra is not None else None
        return collections.defaultdict(factory, node)
    if tag == "dataclass" and isinstance(node, dict):
        cls = resolve_class(extra)
        if cls is None or not dataclasses.is_dataclass(cls):
            _warn.warn(f"Dataclass {extra!r} is not imported; keeping its fields as a dict.")
            return node
        obj = object.__new__(cls)  # no __init__ / __post_init__: the fields are the saved ones
        for k, v in node.items():
            object.__setattr__(obj, k, v)
        return obj
    if tag == "Namespace" and isinstance(node, dict):
        return argparse.Namespace(**{str(k): v for k, v in node.items()})
    if tag == "state_dict_metadata" and isinstance(node, collections.OrderedDict):
        node._metadata = extra  # type: ignore[attr-defined]
        return node
    if tag == "typekeys" and isinstance(node, dict) and isinstance(extra, list):
        out = type(node)()
        for k, v in node.items():
            if k in extra:
                cls = resolve_class(k)
                if cls is None:
                    _warn.warn(f"Class {k!r} (a checkpoint dict key) is not imported; keeping its name.")
                out[cls if cls is not None else k] = v
            else:
                out[k] = v
        return out
    if tag == "torch.Size" and isinstance(node, tuple):
        return torch.Size(node)
    if tag == "namedtuple" and isinstance(node, tuple):
        cls = resolve_class(extra)
        return cls(*node) if cls is not None and issubclass(cls, tuple) else node
    if tag in ("set", "frozenset") and isinstance(node, list):
        return set(node) if tag == "set" else frozenset(node)
    if tag == "torch.dtype" and isinstance(node, str):
        dtype = getattr(torch, node, None)
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpointError(f"Unknown torch dtype {node!r} in the checkpoint.")
        return dtype
    if tag == "torch.device" and isinstance(node, str):
        return torch.device(node)
    if tag == "Path" and isinstance(node, str):
        return pathlib.Path(node)
    if tag == "enum":
        cls = resolve_class(extra)
        if cls is not None and issubclass(cls, enum.Enum):
            return cls(node)
        _warn.warn(f"Enum class {extra!r} is not imported; keeping the raw value {node!r}.")
        return node
    if tag == "type" and isinstance(node, str):
        if node.startswith("omegaconf.") and "omegaconf" not in sys.modules:
            import omegaconf  # noqa: F401 - the hparams type of a Hydra config
        cls = resolve_class(node)
        if cls is None:
            _warn.warn(f"Class {node!r} named in the checkpoint is not imported; keeping its name.")
            return node
        return cls
    raise CorruptCheckpointError(
        f"Invalid type-table entry {tag!r} for a {type(node).__name__} in the checkpoint."
    )


def _path_str(path: tuple) -> str:
    return "state" + "".join(f"[{k!r}]" for k in path)
