"""Every use of Keras internals, in one place (checked against the installed Keras by
``tests/keras/test_compat.py``, which fails loudly when a Keras release moves one of them).

Each entry is something Keras 3 offers no public API for:

- ``model._initial_epoch``: the epoch ``fit`` starts at, read by every backend's trainer right after
  ``on_train_begin`` (Keras' own ``BackupAndRestore`` sets it the same way). Public alternative: none.
- ``Layer._flatten_layers()``: every sub-layer, to tell whether each is built (what Keras' trainers
  test before building a model). Falls back to ``model.built`` alone.
- Keras' global seed generator (``keras.src.backend.common.global_state`` attribute
  ``"global_seed_generator"``, created by ``keras.src.random.seed_generator.global_seed_generator``):
  the state unseeded ``keras.random`` calls draw from; a bit-exact resume restores it.
- ``keras.src.trainers.compile_utils.CompileMetrics`` / ``MetricsList`` and ``Metric._direction``: how
  Keras' ``ModelCheckpoint(mode="auto")`` finds whether a compiled metric is maximised; before the
  first train step, ``CompileMetrics._user_metrics`` / ``_user_weighted_metrics`` (what compile got).
- ``keras.src.backend.<backend>.optimizers``: the module a backend-specific optimizer class (the torch
  backend's ``Adam``) is serialized under; another backend cannot import it, so ``load_model`` maps it
  to the public ``keras.optimizers``.
- JAX: ``jax.Array._single_device_array_to_np_array_did_copy()``: a single-device array's host
  bytes without keeping them cached on the array (``np.asarray`` caches a device-to-host copy on it
  for as long as the array lives). Falls back to ``np.asarray``.
- JAX: ``jax._src.distributed.global_state.client``: the coordination service's client of a
  ``jax.distributed`` job, whose key-value store carries a multi-process save's reports and outcome
  (``key_value_set``, ``blocking_key_value_get``). Public alternative: none (``multihost_utils``
  offers only device collectives, which would run beside training).
"""

from __future__ import annotations

import re
from typing import Any

import keras

GLOBAL_SEED_ATTRIBUTE = "global_seed_generator"
_BACKEND_OPTIMIZER_MODULE = re.compile(r"keras\.src\.backend\.[a-z_]+\.optimizers(\.[A-Za-z0-9_.]+)?\Z")


def _global_state() -> Any:
    from keras.src.backend.common import global_state

    return global_state


def global_seed_generator_if_created() -> Any:
    """Keras' global ``SeedGenerator``, or None when nothing has used it yet (creating it would draw)."""
    return _global_state().get_global_attribute(GLOBAL_SEED_ATTRIBUTE)


def global_seed_generator() -> Any:
    """Keras' global ``SeedGenerator``, created when missing."""
    from keras.src.random.seed_generator import global_seed_generator as get

    return get()


def get_initial_epoch(model: Any) -> Any:
    return getattr(model, "_initial_epoch", None)


def set_initial_epoch(model: Any, epoch: Any) -> None:
    model._initial_epoch = epoch


def sub_layers(model: Any) -> list | None:
    """Every layer inside ``model`` (itself included), or None when this Keras cannot list them."""
    flatten = getattr(model, "_flatten_layers", None)
    return None if flatten is None else list(flatten())


def metric_direction(model: Any, name: str) -> str | None:
    """``"max"`` / ``"min"`` for a compiled metric called ``name`` (Keras' ``mode="auto"`` lookup), else None."""
    from keras.src.trainers import compile_utils

    found = None
    for m in getattr(model, "metrics", None) or []:
        inner = m.metrics if isinstance(m, (compile_utils.CompileMetrics, compile_utils.MetricsList)) else []
        if isinstance(m, compile_utils.CompileMetrics) and not m.built:
            # Before the first train step (TensorFlow builds them then) only the metric objects the
            # user passed to compile() exist; strings become metrics at build time.
            user = (getattr(m, "_user_metrics", None), getattr(m, "_user_weighted_metrics", None))
            inner = [x for x in keras.tree.flatten(user) if isinstance(x, keras.metrics.Metric)]
        for metric in inner:
            if getattr(metric, "name", None) == name and hasattr(metric, "_direction"):
                found = "max" if metric._direction == "up" else "min"
    return found


def portable_description(desc: Any) -> Any:
    """A model description with backend-specific optimizer modules replaced by ``keras.optimizers``."""
    if isinstance(desc, dict):
        out = {k: portable_description(v) for k, v in desc.items()}
        module, cls = out.get("module"), out.get("class_name")
        if (
            isinstance(module, str)
            and _BACKEND_OPTIMIZER_MODULE.match(module)
            and isinstance(cls, str)
            and isinstance(getattr(keras.optimizers, cls, None), type)
        ):
            out["module"] = "keras.optimizers"
        return out
    if isinstance(desc, list):
        return [portable_description(v) for v in desc]
    return desc


def single_device_to_numpy(arr: Any) -> Any:
    """The host bytes of a single-device ``jax.Array`` (a view of a CPU buffer), not cached on it."""
    import numpy as np

    to_numpy = getattr(arr, "_single_device_array_to_np_array_did_copy", None)
    if to_numpy is None:
        return np.asarray(arr)
    out = to_numpy()[0]
    out.flags.writeable = False
    return out


def jax_coordination_client() -> Any:
    """The ``jax.distributed`` coordination service client of this process (None before ``initialize``)."""
    from jax._src.distributed import global_state

    return global_state.client
