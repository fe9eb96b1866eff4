"""Restore in place on the PyTorch backend: each variable's CPU tensor is the destination of its bytes.

The ``into`` tree mirrors the key paths :func:`._adapter.model_state` saves (``model/<key>``,
``optimizer/<key>``) for the variables :func:`._adapter.match_variables` pairs with the checkpoint's
(read from its index alone, before any tensor), so a checkpoint that does not fit the model is reported
by the usual path with the model untouched. TensorFlow and JAX variables are not writable host memory:
those backends keep loading and assigning.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np

from .._format import _format as fmt
from ..errors import IncompatibleCheckpointError
from . import _adapter

logger = logging.getLogger(__name__)


def variable_tensor(v: Any) -> Any:
    """The torch tensor holding ``v``'s value when it can be written in place (CPU, dense), else None."""
    value = getattr(v, "value", None)
    device = getattr(value, "device", None)
    if getattr(device, "type", None) != "cpu" or not value.is_contiguous():
        return None
    return value


def stored_names(tree: Any) -> dict[str, dict[str, str]]:
    """``{"model": {key: tensor name}, ...}`` from an index's tree: the saved tensors of the model's
    and the optimizer's variables."""
    out: dict[str, dict[str, str]] = {}
    kind, entries = fmt.tree_view(tree)
    for top, node in entries if kind == "dict" else []:
        kind, leaves = fmt.tree_view(node)
        if top in (_adapter.MODEL_KEY, _adapter.OPTIMIZER_KEY) and kind == "dict":
            out[top] = {
                key: name for key, leaf in leaves for k, name in [fmt.tree_view(leaf)] if k == "tensor"
            }
    return out


def variables_into(model: Any, index: dict, *, restore_optimizer: bool = True) -> dict[str, Any] | None:
    """The ``into`` tree restoring ``model``'s variables from the checkpoint of ``index`` in place, or
    None (not the torch backend, an unbuilt model, or variables that do not fit the checkpoint)."""
    if keras.backend.backend() != "torch" or not model.built:
        return None
    tensors = index.get("tensors") or {}
    stored = stored_names(index.get("tree"))
    if _adapter.MODEL_KEY not in stored:
        return None
    groups = [(_adapter.MODEL_KEY, model.variables)]
    opt = getattr(model, "optimizer", None)
    if restore_optimizer and opt is not None and _adapter.OPTIMIZER_KEY in stored:
        _adapter.ensure_optimizer_built(model)
        groups.append((_adapter.OPTIMIZER_KEY, opt.variables))
    into: dict[str, Any] = {}
    for top, variables in groups:
        placeholders, keys = {}, {}
        for key, tensor_name in stored[top].items():
            spec = tensors.get(tensor_name) or {}
            try:
                dtype = _adapter._np_dtype(spec["dtype"])
                shape = tuple(spec["shape"])
            except (KeyError, TypeError, ValueError):
                return None
            arr = np.lib.stride_tricks.as_strided(
                np.zeros(1, dtype), shape, (0,) * len(shape), writeable=False
            )
            placeholders[key] = arr
            keys[id(arr)] = key
        try:
            pairs = _adapter.match_variables(variables, placeholders, top)
        except IncompatibleCheckpointError:
            return None  # the usual path reports it, before writing anything
        dest = into.setdefault(top, {})
        for v, arr in pairs:
            tensor = variable_tensor(v)
            # Other dtypes (an int64 counter saved by TensorFlow) are cast by the usual assignment.
            if tensor is not None and arr.dtype == _adapter._np_dtype(v.dtype):
                dest[keys[id(arr)]] = tensor
    return into


def into_for(model: Any, *, restore_optimizer: bool = True) -> Any:
    """What ``into=`` takes to restore ``model`` in place: a function of the checkpoint's checked
    index (read once, by the load itself) giving the tree of the model's own tensors, or None when
    nothing can be written in place (not the torch backend, an unbuilt model)."""
    if keras.backend.backend() != "torch" or not model.built:
        return None

    def make_into(index: dict) -> dict[str, Any] | None:
        try:
            return variables_into(model, index, restore_optimizer=restore_optimizer)
        except Exception as e:  # noqa: BLE001 - an index the pairing cannot read: the usual load reports it
            logger.debug("Not restoring in place: %s", e)
            return None

    return make_into


def restore_with_path(
    manager: Any, model: Any, storage_options: dict | None = None
) -> tuple[str | None, Any]:
    """``manager.restore_with_path()``, restoring in place into ``model`` (see :func:`into_for`); a JAX
    model over several devices is placed shard by shard (every process of a JAX job agrees)."""
    shards = _adapter.jax_shards()
    if shards is not None and shards.model_spans_devices(model):
        return shards.restore_with_path(manager, storage_options)
    return manager.restore_with_path(into=into_for(model))
