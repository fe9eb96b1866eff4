"""Every use of Lightning's private API, and the choice between its two package names, in one place.

Lightning ships the same code under two names with separate class hierarchies: ``lightning``
(``lightning.pytorch`` + ``lightning.fabric``) and ``pytorch_lightning`` (+ ``lightning_fabric``).
A Trainer of one accepts only callbacks and plugins that subclass *its* ``ModelCheckpoint`` /
``CheckpointIO``. The public classes of this package are therefore plain mixins; constructing one
returns an instance of a subclass bound to Lightning's base class of every namespace imported at that
moment (:func:`bound_class`), so ``isinstance`` holds for whichever Trainer it is handed to.

Nothing here is imported at module import time: a rename in Lightning breaks the feature that uses
it, with an error naming the Lightning version, never ``import ckpt_callbacks.lightning``.
``tests/lightning/test_lightning_compat.py`` checks each use against both installed namespaces.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

NAMESPACES = ("lightning", "pytorch_lightning")
_PYTORCH = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}
_FABRIC = {"lightning": "lightning.fabric", "pytorch_lightning": "lightning_fabric"}
# Base class per role: (module under the pytorch / fabric package, class name).
_BASES = {
    "callback": ("pytorch", "callbacks", "ModelCheckpoint"),
    "checkpoint_io": ("fabric", "plugins.io.checkpoint_io", "CheckpointIO"),
}
_bound: dict[tuple[type, tuple[str, ...]], type] = {}


def installed() -> list[str]:
    """The Lightning namespaces that can be imported here."""
    return [ns for ns in NAMESPACES if importlib.util.find_spec(ns) is not None]


def imported_namespaces() -> tuple[str, ...]:
    """The namespaces whose Trainer may be in use: those already imported, else the first installed."""
    found = tuple(ns for ns in NAMESPACES if _PYTORCH[ns] in sys.modules)
    if found:
        return found
    available = installed()
    if not available:
        raise ImportError(
            "ckpt_callbacks.lightning needs PyTorch Lightning: pip install 'ckpt-callbacks[lightning]'."
        )
    importlib.import_module(_PYTORCH[available[0]])
    return (available[0],)


def pytorch(ns: str) -> types.ModuleType:
    """``lightning.pytorch`` or ``pytorch_lightning``."""
    return importlib.import_module(_PYTORCH[ns])


def fabric(ns: str) -> types.ModuleType:
    """``lightning.fabric`` or ``lightning_fabric``."""
    return importlib.import_module(_FABRIC[ns])


def submodule(ns: str, kind: str, name: str) -> types.ModuleType:
    root = _PYTORCH[ns] if kind == "pytorch" else _FABRIC[ns]
    return importlib.import_module(f"{root}.{name}")


def namespace_of(obj: Any) -> str:
    """The namespace a Lightning object (Trainer, strategy, module class) comes from."""
    cls = obj if isinstance(obj, type) else type(obj)
    for klass in cls.__mro__:
        top = klass.__module__.split(".", 1)[0]
        if top in ("lightning_fabric",):
            return "pytorch_lightning"
        if top in NAMESPACES:
            return top
    raise TypeError(
        f"Expected an object of PyTorch Lightning ('lightning' or 'pytorch_lightning'). "
        f"Received: {cls.__module__}.{cls.__qualname__}."
    )


def version(ns: str) -> str:
    return str(getattr(pytorch(ns), "__version__", "unknown"))


def base_class(role: str, ns: str) -> type:
    kind, module, name = _BASES[role]
    return getattr(submodule(ns, kind, module), name)


def bound_class(public: type, role: str, namespaces: tuple[str, ...]) -> type:
    """``public`` combined with Lightning's ``role`` base class of each namespace (cached).

    With both namespaces the two base hierarchies are independent, so the MRO is
    ``public, <lightning bases>, <pytorch_lightning bases>, object`` and ``isinstance`` holds for both.
    """
    key = (public, namespaces)
    cls = _bound.get(key)
    if cls is None:
        bases = (public, *(base_class(role, ns) for ns in namespaces))
        cls = types.new_class(public.__name__, bases, {}, lambda d: d.update(_namespaces=namespaces))
        cls.__module__ = public.__module__
        cls.__qualname__ = public.__qualname__
        cls.__doc__ = public.__doc__
        _bound[key] = cls
    return cls


def rebuild(public: type, role: str, namespaces: tuple[str, ...], state: dict[str, Any]) -> Any:
    """Unpickle an instance of a bound class (the class itself is made at runtime)."""
    obj = object.__new__(bound_class(public, role, namespaces))
    obj.__dict__.update(state)
    return obj


class Bound:
    """Mixin of the public classes: constructing one binds it to Lightning's base classes.

    The namespaces are those imported when the object is made (the user's ``import lightning`` or
    ``import pytorch_lightning`` came first); ``setup`` checks the Trainer's is among them.
    """

    _role = ""
    _namespaces: tuple[str, ...] = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if not cls._namespaces:
            cls = bound_class(cls, cls._role, imported_namespaces())
        return object.__new__(cls)

    def __reduce__(self) -> tuple:
        public = type(self).__mro__[1] if type(self).__dict__.get("_namespaces") else type(self)
        return (rebuild, (public, self._role, self._namespaces, self.__getstate__()))

    def _check_namespace(self, obj: Any) -> str:
        ns = namespace_of(obj)
        if ns not in self._namespaces:
            raise TypeError(
                f"{type(self).__name__} was created when only {', '.join(self._namespaces)} was imported, "
                f"but is used with a {type(obj).__module__}.{type(obj).__name__}. Import {ns!r} before "
                f"creating the {type(self).__name__} (or create it after the Trainer's package is imported)."
            )
        return ns


# ---------------------------------------------------------------------- private Lightning uses


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """The full checkpoint dict ``trainer.save_checkpoint`` would write (``_checkpoint_connector``)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


@contextlib.contextmanager
def sharded_state_dicts(strategy: Any) -> Iterator[None]:
    """Within it, ``ModelParallelStrategy`` dumps sharded (DTensor) model and optimizer state dicts.

    With ``save_distributed_checkpoint=False`` it would gather full state dicts on rank zero and hand
    the other ranks empty ones (``_save_distributed_checkpoint``), which a per-rank sharded save
    cannot restore.
    """
    saved = strategy._save_distributed_checkpoint
    strategy._save_distributed_checkpoint = True
    try:
        yield
    finally:
        strategy._save_distributed_checkpoint = saved


def migrate_checkpoint(ns: str, checkpoint: dict[str, Any], path: str | None) -> dict[str, Any]:
    """Lightning's upgrade of older checkpoint dicts (``_pl_migrate_checkpoint``)."""
    utils = submodule(ns, "pytorch", "utilities.migration.utils")
    return utils._pl_migrate_checkpoint(checkpoint, checkpoint_path=path)


def restore_before_setup(trainer: Any, path: str, checkpoint: dict[str, Any]) -> None:
    """Hand ``checkpoint`` to Lightning's restore as if ``ckpt_path=path`` had been given.

    What Lightning's own restore does before ``strategy.setup``; Lightning then restores the
    precision plugin, loops, optimizers and schedulers right after ``on_fit_start``.
    """
    connector = trainer._checkpoint_connector
    connector._ckpt_path = path
    connector._loaded_checkpoint = migrate_checkpoint(namespace_of(trainer), checkpoint, path)
    connector.restore_model()
    connector.restore_datamodule()
    connector.restore_callbacks()


def evaluation_metric_names(trainer: Any) -> set[str]:
    """The ``callback_metrics`` names the running validation logged (``trainer._results``)."""
    results = trainer._results
    if results is None:
        return set()
    names: set[str] = set()
    for metric in results.values():
        for on_step in (False, True):
            names.update(results._forked_name(metric, on_step))
    return names


def fit_data(trainer: Any) -> tuple[Any, Any, bool]:
    """(combined loader, data fetcher, whether the loader restores its own position)."""
    fit_loop = trainer.fit_loop
    loader, fetcher = fit_loop._combined_loader, fit_loop._data_fetcher
    stateful = bool(loader._state_dicts()) if loader is not None else False
    return loader, fetcher, stateful


def set_sampler_epoch(trainer: Any, dataloader: Any, epoch: int) -> None:
    submodule(namespace_of(trainer), "fabric", "utilities.data")._set_sampler_epoch(dataloader, epoch)


def load_state(cls: type, checkpoint: dict[str, Any], strict: bool | None, **kwargs: Any) -> Any:
    """Lightning's ``load_from_checkpoint`` body after the file is read (``core.saving._load_state``):
    hparams -> ``__init__``, ``on_load_checkpoint``, ``load_state_dict(strict=...)``."""
    saving = submodule(namespace_of(cls), "pytorch", "core.saving")
    return saving._load_state(cls, checkpoint, strict=strict, **kwargs)


# Lightning's SLURM requeue (``_CheckpointConnector.__max_ckpt_version_in_folder``) takes every file
# name in the folder that contains this key and reads the digits after it as a version number.
HPC_NAME_KEY = "ckpt_"


# ---------------------------------------------------------------------- ModelCheckpoint's own privates


def resolve_ckpt_dir(callback: Any, trainer: Any) -> Any:
    """``ModelCheckpoint``'s ``dirpath`` rule: its own, else the logger's dir, else
    ``default_root_dir``, plus ``checkpoints`` (``ModelCheckpoint.__resolve_ckpt_dir``)."""
    return callback._ModelCheckpoint__resolve_ckpt_dir(trainer)


def warn_if_dir_not_empty(callback: Any, dirpath: Any) -> None:
    callback._ModelCheckpoint__warn_if_dir_not_empty(dirpath)


_AS_VALUE_ERROR: dict[type, type] = {}


def as_value_error(error: BaseException) -> BaseException:
    """Lightning's ``MisconfigurationException`` (an ``Exception``) as one that is also a ``ValueError``,
    so callers of either library catch it; any other error unchanged."""
    cls = type(error)
    if cls.__name__ != "MisconfigurationException" or isinstance(error, ValueError):
        return error
    if cls not in _AS_VALUE_ERROR:
        _AS_VALUE_ERROR[cls] = type(cls.__name__, (cls, ValueError), {"__module__": cls.__module__})
    return _AS_VALUE_ERROR[cls](*error.args)
