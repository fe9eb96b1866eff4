"""``load_from_checkpoint(MyModule, path)``: Lightning's ``MyModule.load_from_checkpoint`` for our format.

Lightning's own ``LightningModule.load_from_checkpoint`` opens the path itself (``core.saving`` ->
``fabric.utilities.cloud_io._load``: ``fsspec.open`` then ``torch.load``) with no hook for another
format or a ``CheckpointIO``, so it cannot read this library's checkpoints. This function reads one
without pickle and then runs Lightning's own code for the rest (``_load_state``: hparams ->
``__init__``, ``on_load_checkpoint``, ``load_state_dict(strict=...)``), so the semantics are Lightning's.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

import torch

from .._manager import _foreign
from ..errors import CheckpointNotFoundError
from . import _compat
from ._io import _to_map_location, load_any


def load_from_checkpoint(
    cls: type,
    checkpoint_path: str | os.PathLike,
    map_location: Any = None,
    hparams_file: str | os.PathLike | None = None,
    strict: bool | None = None,
    *,
    storage_options: dict | None = None,
    allow_pickle: bool = False,
    checkpoint: str = "latest",
    **kwargs: Any,
) -> Any:
    """A ``LightningModule`` / ``LightningDataModule`` of class ``cls`` from a ckpt_callbacks checkpoint.

    The arguments are those of Lightning's ``cls.load_from_checkpoint``: the saved hyper-parameters
    go to ``cls.__init__`` (``hparams_file``, a ``.yaml`` or ``.csv``, replaces them; keyword
    arguments override them), ``on_load_checkpoint`` runs, and the weights are loaded with
    ``strict`` (default: the module's ``strict_loading``).

    Args:
        cls: the LightningModule or LightningDataModule class (of ``lightning`` or ``pytorch_lightning``).
        checkpoint_path: a checkpoint path (``.../ckpt-100``), its ``.index`` file, a marker written by
            ``FsspecCheckpointIO`` (``.../last.ckpt``), or a checkpoint directory (its newest valid
            checkpoint); local or any fsspec URL.
        map_location: device for the loaded tensors (``"cpu"``, ``"cuda:0"``, a ``torch.device``,
            or a ``{"cpu": device}`` dict).
        storage_options: passed to fsspec.
        allow_pickle: load leaves that were stored with pickle (only if saved with ``allow_pickle=True``).
        checkpoint: for a directory, ``"latest"`` (its newest valid checkpoint) or ``"best"`` (the best
            one its callback or manager kept with ``keep_best``).

    Example:
        >>> model = load_from_checkpoint(MyModule, "s3://bucket/run", map_location="cpu", lr=0.01)
        >>> model = load_from_checkpoint(MyModule, "s3://bucket/run", checkpoint="best")
    """
    ns, pl = _module_namespace(cls)
    dropped: list[tuple[str, str]] = []
    found = load_any(
        checkpoint_path, storage_options, allow_pickle, dropped=dropped, ns=ns, checkpoint=checkpoint
    )
    if found is None:
        _not_found(checkpoint_path, storage_options)
    path, checkpoint = found
    checkpoint = _to_map_location(checkpoint, _device_of(map_location))
    checkpoint = _compat.migrate_checkpoint(ns, checkpoint, path)
    if hparams_file is not None:
        checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY] = _read_hparams_file(ns, hparams_file)
        dropped = []
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(kwargs)
    model = _build(cls, pl, checkpoint, strict, dropped, kwargs)
    if issubclass(cls, pl.LightningDataModule):
        return model
    tensors = (t for t in checkpoint.get("state_dict", {}).values() if isinstance(t, torch.Tensor))
    first = next(tensors, None)
    return model.to(first.device) if first is not None else model


def _not_found(checkpoint_path: str | os.PathLike, storage_options: dict | None) -> NoReturn:
    _foreign.refuse_foreign(checkpoint_path, storage_options)  # a torch.save file: what reads it
    raise CheckpointNotFoundError(
        f"No ckpt_callbacks checkpoint at {os.fspath(checkpoint_path)!r}: expected a checkpoint path "
        "(with a '.index' file), its '.index' file, a marker file written by FsspecCheckpointIO, or a "
        "directory with a 'checkpoint' state file. For a torch.save file use cls.load_from_checkpoint."
    )


def _module_namespace(cls: Any) -> tuple[str, Any]:
    """``(namespace, its lightning.pytorch module)`` of a LightningModule / LightningDataModule class."""
    if not isinstance(cls, type):
        raise TypeError(
            "load_from_checkpoint takes the class first, as in load_from_checkpoint(MyModule, path). "
            f"Received: cls={cls!r}."
        )
    ns = _compat.namespace_of(cls)
    pl = _compat.pytorch(ns)
    if not issubclass(cls, (pl.LightningModule, pl.LightningDataModule)):
        raise TypeError(
            f"Expected a LightningModule or LightningDataModule subclass. Received: cls={cls.__qualname__}."
        )
    return ns, pl


def _build(cls: type, pl: Any, checkpoint: dict, strict: bool | None, dropped: list, kwargs: dict) -> Any:
    """Lightning's own ``_load_state``; a TypeError from ``__init__`` names the hyper-parameters that
    could not be saved without pickle."""
    try:
        if issubclass(cls, pl.LightningDataModule):
            return _compat.load_state(cls, checkpoint, None, **kwargs)
        return _compat.load_state(cls, checkpoint, strict, **kwargs)
    except TypeError as e:
        missing = [key for key, _ in dropped if key.rsplit("'", 2)[-2] not in kwargs]
        if missing:
            raise TypeError(
                f"{cls.__qualname__}.__init__ failed ({e}). These hyper-parameters could not be saved "
                f"without pickle and are missing from the checkpoint: {', '.join(missing)}. Pass them as "
                "keyword arguments (load_from_checkpoint(cls, path, name=value)), or save and load with "
                "allow_pickle=True."
            ) from e
        raise


def _device_of(map_location: Any) -> Any:
    if isinstance(map_location, dict):
        return map_location.get("cpu")
    if map_location is None or isinstance(map_location, (str, torch.device)):
        return map_location
    raise TypeError(
        "map_location must be a device string, a torch.device or a {'cpu': device} dict (tensors of this "
        f"format are read on the CPU). Received: map_location={map_location!r}."
    )


def _read_hparams_file(ns: str, hparams_file: str | os.PathLike) -> Any:
    saving = _compat.submodule(ns, "pytorch", "core.saving")
    extension = os.fspath(hparams_file).rsplit(".", 1)[-1].lower()
    if extension == "csv":
        return saving.load_hparams_from_tags_csv(hparams_file)
    if extension in ("yml", "yaml"):
        return saving.load_hparams_from_yaml(hparams_file)
    raise ValueError(
        f"hparams_file must be a .csv, .yml or .yaml file. Received: {os.fspath(hparams_file)!r}."
    )
