"""``restore`` into a live model and ``load_model`` from the checkpoint's own model description."""

from __future__ import annotations

import os
from typing import Any

import keras

from .._api._resolve import _resolved, load_with_path, open_checkpoint, read_meta, resolve_checkpoint
from .._checkpoint._checkpoint_read import load
from ..errors import IncompatibleCheckpointError
from . import _adapter, _compat, _inplace


def restore(
    model: keras.Model,
    path_or_directory: str | os.PathLike,
    *,
    storage_options: dict | None = None,
    checkpoint: str = "latest",
) -> str:
    """Load a checkpoint's weights (and optimizer variables, when the model is compiled) into ``model``.

    ``path_or_directory`` is one checkpoint (``"runs/a/ckpt-1000"``) or a directory, meaning its newest
    valid checkpoint (``checkpoint="latest"``, the default) or, with ``checkpoint="best"``, the best
    one its callback kept by ``keep_best`` / ``save_best_only`` (CheckpointNotFoundError when its
    checkpoints are not ranked). Every variable is checked before any is written, so a mismatch leaves the model
    untouched. Training position and global RNG states are not touched: that is what
    ``CheckpointCallback(resume=True)`` is for.

    Returns the checkpoint that was loaded in one form whatever the argument's form (a directory, a
    relative or absolute checkpoint path, its ``.index`` file): an absolute path, or the full URL on
    other storage, as ``CheckpointManager.latest_checkpoint`` gives it.

    Raises IncompatibleCheckpointError when the variables do not fit (listing the missing, unexpected
    and wrongly shaped or typed ones), CheckpointNotFoundError, CorruptCheckpointError.

    Example:
        >>> model = build_model()
        >>> model.compile(optimizer="adam", loss="mse")
        >>> restore(model, "runs/a")          # newest valid checkpoint of runs/a
        '/home/me/runs/a/ckpt-1200'
        >>> restore(model, "runs/a", checkpoint="best")   # the best by the callback's monitor
        '/home/me/runs/a/ckpt-800'
    """
    shards = _adapter.jax_shards()
    if shards is not None and shards.model_spans_devices(model):
        path = resolve_checkpoint(path_or_directory, storage_options, checkpoint=checkpoint)
        _adapter.restore_model_state(model, shards.load_state(path, storage_options))
    else:
        path, state = load_with_path(
            path_or_directory, storage_options, into=_inplace.into_for(model), checkpoint=checkpoint
        )
        _adapter.restore_model_state(model, state)
    storage, name = open_checkpoint(path, storage_options)
    return storage.url_of(name)


def load_model(
    path_or_directory: str | os.PathLike,
    *,
    compile: bool = True,
    custom_objects: dict[str, Any] | None = None,
    storage_options: dict | None = None,
    checkpoint: str = "latest",
) -> keras.Model:
    """Rebuild a model from a checkpoint alone: its ``.meta`` model description plus its variables.

    Works without the code that built the model for Sequential and functional models of built-in
    layers; custom layers need to be importable and registered with
    ``@keras.saving.register_keras_serializable()`` (or passed in ``custom_objects``). Keras' safe
    mode is on: a description that would run code (a ``Lambda`` layer's bytecode) is refused.

    With ``compile=True`` and a compiled model in the checkpoint, the model is compiled again with
    the same optimizer, loss and metrics, and the optimizer variables are restored too.

    A directory means its newest valid checkpoint, or with ``checkpoint="best"`` the best one kept by
    ``keep_best`` / ``save_best_only`` (as for :func:`restore`).

    Example:
        >>> model = load_model("s3://bucket/run")     # newest valid checkpoint
        >>> model.predict(x)
        >>> best = load_model("s3://bucket/run", checkpoint="best")
    """
    # Read once: the index read to choose (and check) the checkpoint is the one loaded below.
    path, index = _resolved(path_or_directory, storage_options, True, checkpoint)
    meta = read_meta(path, storage_options)
    desc = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(desc, dict) or "class_name" not in desc:
        raise IncompatibleCheckpointError(
            f"Checkpoint {path!r} has no Keras model description in its .meta file, so load_model cannot "
            "rebuild the model. Expected a checkpoint written by ckpt_callbacks.keras.CheckpointCallback from "
            "a model with get_config(). Build the model in code and use ckpt_callbacks.keras.restore(model, path)."
        )
    if not compile:
        desc = {k: v for k, v in desc.items() if k != "compile_config"}
    # Saved under another backend, the optimizer may be that backend's subclass (torch's Adam).
    desc = _compat.portable_description(desc)
    model = keras.saving.deserialize_keras_object(desc, custom_objects=custom_objects, safe_mode=True)
    if not model.built:
        raise IncompatibleCheckpointError(
            f"The model described in {path!r} could not be built from its config (no input shape). "
            "Build the model in code and use ckpt_callbacks.keras.restore(model, path)."
        )
    storage, name = open_checkpoint(path, storage_options)
    state = load(storage, name, verify=True, allow_pickle=False, index=index)
    _adapter.restore_model_state(model, state, restore_optimizer=compile)
    return model
