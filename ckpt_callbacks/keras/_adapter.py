"""Keras 3 state <-> the core tree: variables keyed by path, global RNG states, model description.

Backend-neutral: everything goes through ``keras.Variable`` and ``keras.ops``, so the same code serves
the TensorFlow, PyTorch and JAX backends.
"""

from __future__ import annotations

import random
import re
from typing import Any

import keras
import numpy as np

from .._callbacks import _rng as _core_rng
from .._format._format import LazyArray
from ..errors import IncompatibleCheckpointError
from . import _compat

MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
RNG_KEY = "rng"
TRAINER_KEY = "trainer"
# Paths differ between processes only by Keras' automatic name numbering ("dense_3" vs "dense");
# stripping it gives a key that identifies a variable's role independently of creation order.
_AUTO_SUFFIX = re.compile(r"_\d+(?=[_/]|\Z)")
_MAX_LISTED = 10


def _variable_array(v: Any) -> np.ndarray:
    arr = _host_array(v.value)
    want = np.dtype(_np_dtype(v.dtype))
    if arr.dtype != want:  # e.g. a backend that upcasts bfloat16 on the way to numpy; the cast is exact
        arr = arr.astype(want)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _host_array(value: Any) -> np.ndarray:
    """The variable's bytes as numpy, without a copy where the backend allows (CPU tensors)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        tensor = value.read_value() if hasattr(value, "read_value") else value
        try:
            # A read-only view of the tensor's buffer (TensorFlow's documented zero-copy route);
            # `.numpy()` would copy every variable once more before it is written.
            return np.asarray(memoryview(tensor))
        except (TypeError, ValueError):  # bfloat16 and other dtypes the buffer protocol cannot name
            return np.asarray(tensor.numpy())
    if backend == "jax":
        # A read-only view of a CPU array's buffer (a device-to-host copy elsewhere); JAX arrays never
        # change, and while this view lives the next training step cannot donate (reuse) the buffer.
        # `convert_to_numpy` would copy.
        return np.asarray(value)
    if backend == "torch" and value.device.type == "cpu":
        try:
            return value.detach().numpy()
        except (TypeError, RuntimeError):  # bfloat16 / float8 have no numpy view
            pass
    return keras.ops.convert_to_numpy(value)


def _np_dtype(keras_dtype: str) -> np.dtype:
    import ml_dtypes

    name = keras.backend.standardize_dtype(keras_dtype)
    return (
        np.dtype(getattr(ml_dtypes, name))
        if hasattr(ml_dtypes, name) and not hasattr(np, name)
        else np.dtype(name)
    )


def variables_to_tree(variables: list) -> dict[str, LazyArray]:
    """``{variable.path: LazyArray}`` in variable order; repeated paths get a ``#n`` suffix."""
    out: dict[str, LazyArray] = {}
    # JAX replaces a variable's array on every assignment and never writes into one: an async snapshot
    # may keep the arrays read at save time rather than copy them (LazyArray.immutable).
    immutable = keras.backend.backend() == "jax"
    sharded = immutable and jax_shards() is not None
    for v in variables:
        key, n = v.path, 1
        while key in out:
            key = f"{v.path}#{n}"
            n += 1
        if sharded and jax_shards().spans_devices(v.value):
            # One piece per shard: no gather into one host array (see keras/_jax_shards.py).
            out[key] = jax_shards().chunked_leaf(v, _np_dtype(v.dtype))
            continue
        out[key] = LazyArray(
            tuple(v.shape), _np_dtype(v.dtype), lambda v=v: _variable_array(v), immutable=immutable
        )
    return out


def jax_shards() -> Any:
    """:mod:`._jax_shards` on the JAX backend, else None."""
    if keras.backend.backend() != "jax":
        return None
    from . import _jax_shards

    return _jax_shards


def _normalized(path: str) -> str:
    return _AUTO_SUFFIX.sub("", path)


def _role(path: str) -> str:
    """What a variable is to its layer ("kernel", "bias", "momentum", "state"), independent of names."""
    return _normalized(path.rsplit("/", 1)[-1]).rsplit("_", 1)[-1]


def _tail(path: str) -> str:
    """Layer name and variable name without automatic numbering: "sequential_1/dense_2/kernel" -> "dense/kernel"."""
    return "/".join(_normalized(path).split("/")[-2:])


def match_variables(variables: list, stored: dict[str, Any], what: str) -> list[tuple[Any, Any]]:
    """Pair each variable with its stored array, or raise IncompatibleCheckpointError listing the misfits.

    Variables are matched by path when the paths are the same set. Paths also depend on how and in
    which process the model was built (a model built twice in one process is
    "sequential_1/dense_2/kernel"; a model rebuilt from its config has no "sequential/" scope), so
    otherwise they are matched by position, provided the counts are equal and every pair plays the
    same role (kernel, bias, ...); shapes and dtypes are then checked pair by pair.
    """
    keys = list(variables_to_tree(variables))
    stored_keys = list(stored)
    if set(keys) == set(stored_keys):
        pairs = [(v, stored[k]) for v, k in zip(variables, keys)]
    elif len(keys) == len(stored_keys) and all(_role(a) == _role(b) for a, b in zip(keys, stored_keys)):
        pairs = [(v, stored[k]) for v, k in zip(variables, stored_keys)]
    else:
        # Report by layer-and-variable name, which survives renumbering and scoping.
        pending: dict[str, list[str]] = {}
        for k in stored_keys:
            pending.setdefault(_tail(k), []).append(k)
        pairs, missing = [], []
        for v, k in zip(variables, keys):
            bucket = pending.get(_tail(k))
            if bucket:
                pairs.append((v, stored[bucket.pop(0)]))
            else:
                missing.append(k)
        unexpected = [k for bucket in pending.values() for k in bucket]
        _check_pairs(pairs, what, missing, unexpected)
    _check_pairs(pairs, what, [], [])
    return pairs


def _check_pairs(pairs: list, what: str, missing: list[str], unexpected: list[str]) -> None:
    bad_shape, bad_dtype = [], []
    for v, arr in pairs:
        if arr is getattr(v, "value", None):
            continue  # restored in place: the core checked its shape and dtype before writing
        arr_shape = tuple(np.shape(arr))
        if arr_shape != tuple(v.shape):
            bad_shape.append(f"{v.path}: model {tuple(v.shape)}, checkpoint {arr_shape}")
        elif not _dtype_fits(arr, _np_dtype(v.dtype)):
            bad_dtype.append(f"{v.path}: model {_np_dtype(v.dtype).name}, checkpoint {_dtype_of(arr).name}")
    if not (missing or unexpected or bad_shape or bad_dtype):
        return
    parts = []
    for label, items in (
        ("missing from the checkpoint", missing),
        ("unexpected in the checkpoint", unexpected),
        ("wrong shape", bad_shape),
        ("wrong dtype", bad_dtype),
    ):
        if items:
            shown = ", ".join(items[:_MAX_LISTED]) + (
                f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else ""
            )
            parts.append(f"{label}: {shown}")
    if what == "optimizer":
        fix = (
            "Compile the model with the optimizer it was trained with, or restore into an uncompiled "
            "model to load the weights only."
        )
    else:
        fix = (
            "Build the model exactly as when it was saved, or use ckpt_callbacks.keras.load_model() to "
            "rebuild it from the checkpoint."
        )
    raise IncompatibleCheckpointError(
        f"The checkpoint's {what} variables do not fit this model ({'; '.join(parts)}). Expected the "
        f"same {'optimizer' if what == 'optimizer' else 'architecture'} the checkpoint was saved from. {fix}"
    )


def _dtype_of(arr: Any) -> np.dtype:
    return arr.dtype if isinstance(getattr(arr, "dtype", None), np.dtype) else np.asarray(arr).dtype


def _dtype_fits(arr: Any, want: np.dtype) -> bool:
    """Whether ``arr`` (read only when its values decide) fits a variable of dtype ``want``."""
    if _dtype_of(arr) == want:
        return True
    arr = np.asarray(arr)
    # Counters and seed states are int64 on TensorFlow and int32 on PyTorch; a value-preserving cast
    # keeps checkpoints portable between backends. Float dtypes must match exactly.
    if arr.dtype.kind in "iu" and want.kind in "iu":
        return arr.size == 0 or bool(np.array_equal(arr.astype(want).astype(arr.dtype), arr))
    return False


def assign_pairs(pairs: list[tuple[Any, np.ndarray]]) -> None:
    for v, arr in pairs:
        if arr is getattr(v, "value", None):
            continue  # restored in place (torch backend): the bytes are already the variable's
        if jax_shards() is not None and jax_shards().spans_devices(arr):
            v.assign(arr)  # a variable's own earlier array, laid out as it is
            continue
        place_on = getattr(arr, "place_on", None)
        if place_on is not None and _dtype_of(arr) == _np_dtype(v.dtype):
            v.assign(place_on(v.value))  # read box by box onto the variable's own layout
            continue
        arr = np.asarray(arr)
        want = _np_dtype(v.dtype)
        if arr.dtype != want:
            arr = arr.astype(want)
        v.assign(arr)


def is_built(model: Any) -> bool:
    """Whether every layer of the model has its variables (the test Keras' trainers build by)."""
    if not model.built:
        return False
    layers = _compat.sub_layers(model)
    return layers is None or all(layer.built for layer in layers)


def ensure_optimizer_built(model: Any) -> Any:
    opt = getattr(model, "optimizer", None)
    if opt is not None and not opt.built:
        opt.build(model.trainable_variables)
    return opt


def model_state(model: Any, save_optimizer: bool) -> dict[str, Any]:
    state: dict[str, Any] = {MODEL_KEY: variables_to_tree(model.variables)}
    opt = getattr(model, "optimizer", None) if save_optimizer else None
    if opt is not None:
        ensure_optimizer_built(model)
        state[OPTIMIZER_KEY] = variables_to_tree(opt.variables)
    return state


def restore_model_state(model: Any, state: dict, *, restore_optimizer: bool = True) -> None:
    """Assign weights (and optimizer variables when both sides have them); all checks before any write."""
    if not isinstance(state, dict) or not isinstance(state.get(MODEL_KEY), dict):
        raise IncompatibleCheckpointError(
            "The checkpoint has no Keras model variables (no 'model' entry in its state). Expected a checkpoint "
            "written by ckpt_callbacks.keras.CheckpointCallback; inspect it with `ckpt-callbacks inspect PATH`."
        )
    if not model.built:
        raise ValueError(
            f"Cannot restore into an unbuilt model. Received: model={model.name!r} with no variables yet. "
            "Build it first, e.g. by calling it on a batch or passing keras.Input(...) as its first layer."
        )
    pairs = match_variables(model.variables, state[MODEL_KEY], "model")
    opt = getattr(model, "optimizer", None)
    if restore_optimizer and opt is not None and isinstance(state.get(OPTIMIZER_KEY), dict):
        ensure_optimizer_built(model)
        pairs += match_variables(opt.variables, state[OPTIMIZER_KEY], "optimizer")
    assign_pairs(pairs)


# ---------------------------------------------------------------- global RNG states


def capture_rng() -> dict[str, Any]:
    """Process-global RNG states that input pipelines and user code draw from (python, numpy, torch)."""
    out: dict[str, Any] = {**_core_rng.capture_python_numpy(), "keras_global_seed": None, "torch": None}
    gen = _compat.global_seed_generator_if_created()
    if gen is not None:
        out["keras_global_seed"] = _variable_array(gen.state).copy()
    if keras.backend.backend() == "torch":
        import torch

        out["torch"] = torch.get_rng_state().numpy().copy()
    return out


def seed_rng(seed: int, epoch: int) -> None:
    """Seed Python's, NumPy's and (on the PyTorch backend) torch's global RNGs from ``(seed, epoch)``."""
    words = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    value = (int(words[0]) << 32) | int(words[1])
    random.seed(value)
    np.random.seed(words)
    if keras.backend.backend() == "torch":
        import torch

        torch.manual_seed(value & 0x7FFF_FFFF_FFFF_FFFF)


def restore_rng(rng: Any) -> None:
    if not isinstance(rng, dict):
        return
    _core_rng.restore_python_numpy(rng)
    if rng.get("keras_global_seed") is not None:
        state = _compat.global_seed_generator().state
        state.assign(np.asarray(rng["keras_global_seed"]).astype(_np_dtype(state.dtype)))
    if rng.get("torch") is not None and keras.backend.backend() == "torch":
        import torch

        torch.set_rng_state(torch.from_numpy(np.asarray(rng["torch"], dtype=np.uint8).copy()))


# ---------------------------------------------------------------- model description (.meta)


def framework_info(model: Any) -> dict[str, Any]:
    versions = {"keras": keras.__version__, "backend": keras.backend.backend()}
    backend_module = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}.get(keras.backend.backend())
    if backend_module:
        import importlib

        versions[backend_module] = getattr(importlib.import_module(backend_module), "__version__", None)
    return {"framework": "keras", "framework_versions": versions, "model": describe_model(model)}


def describe_model(model: Any) -> dict[str, Any] | None:
    """Keras' own serialization of the model (config, build and compile config), or None if it has none.

    Subclassed models without ``get_config`` cannot be described; their checkpoints still resume and
    ``restore()`` into a live model, only ``load_model`` needs the description.
    """
    try:
        desc = keras.saving.serialize_keras_object(model)
        _jsonable_or_raise(desc)
    except Exception:  # noqa: BLE001 - a model that cannot describe itself still checkpoints fine
        return None
    return desc


def _jsonable_or_raise(x: Any) -> None:
    import json

    json.dumps(x, allow_nan=True)
