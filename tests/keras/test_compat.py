"""Every Keras internal this library relies on, checked against the installed Keras.

``ckpt_callbacks/keras/_compat.py`` is the only module allowed to touch Keras internals; a Keras
release that moves or changes one of them fails here, by name, instead of breaking resume silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
from keras_models import data, sequential

from ckpt_callbacks.keras import _compat

PACKAGE = Path(_compat.__file__).parent
PRIVATE = re.compile(
    r"keras\.src|\._initial_epoch\b|_single_device_array_to_np|\._flatten_layers\b|\._direction\b|global_seed_generator|compile_utils"
)


def test_no_module_but_compat_touches_keras_internals():
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != "_compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line.split("#")[0]) and "_compat." not in line
    ]
    assert offenders == []


def test_fit_starts_at_the_initial_epoch_compat_sets():
    x, y = data()
    model = sequential()
    _compat.set_initial_epoch(model, 2)
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert history.epoch == [2], "Keras' trainer no longer reads model._initial_epoch"
    _compat.set_initial_epoch(model, None)
    assert _compat.get_initial_epoch(model) is None


def test_global_seed_generator_is_what_unseeded_keras_random_draws_from():
    keras.random.normal((2,))  # creates it if nothing did
    gen = _compat.global_seed_generator_if_created()
    assert gen is not None and gen is _compat.global_seed_generator()
    state = keras.ops.convert_to_numpy(gen.state.value).copy()
    first = keras.ops.convert_to_numpy(keras.random.normal((4,)))
    gen.state.assign(state)
    again = keras.ops.convert_to_numpy(keras.random.normal((4,)))
    assert np.array_equal(first, again), "the global seed generator's state no longer decides keras.random"


def test_sub_layers_lists_every_layer():
    model = sequential()
    layers = _compat.sub_layers(model)
    assert layers is not None and model in layers and all(layer in layers for layer in model.layers)


def test_metric_direction_reads_compiled_metrics():
    x, y = data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse", metrics=["mean_absolute_error", keras.metrics.R2Score(name="fit")])
    # Before the first train step (when on_train_begin resolves mode="auto"): the objects given to compile.
    assert _compat.metric_direction(model, "fit") == "max"
    assert _compat.metric_direction(model, "mean_absolute_error") is None  # a string: the name rule decides
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # builds the compiled metrics
    assert _compat.metric_direction(model, "fit") == "max"
    assert _compat.metric_direction(model, "mean_absolute_error") == "min"
    assert _compat.metric_direction(model, "nope") is None


def test_backend_optimizer_modules_map_to_the_public_ones():
    desc = {
        "compile_config": {
            "optimizer": {"module": "keras.src.backend.torch.optimizers.torch_adam", "class_name": "Adam"}
        }
    }
    got = _compat.portable_description(desc)
    assert got["compile_config"]["optimizer"]["module"] == "keras.optimizers"
    restored = keras.saving.deserialize_keras_object({**got["compile_config"]["optimizer"], "config": {}})
    assert isinstance(restored, keras.optimizers.Adam)
    untouched = {"module": "keras.src.backend.torch.optimizers.torch_adam", "class_name": "NotAnOptimizer"}
    assert _compat.portable_description(untouched) == untouched


def test_single_device_jax_array_to_numpy_caches_no_host_copy():
    jax = __import__("pytest").importorskip("jax")
    arr = jax.numpy.arange(12.0).reshape(3, 4)
    assert hasattr(arr, "_single_device_array_to_np_array_did_copy"), "JAX moved the uncached host read"
    out = _compat.single_device_to_numpy(arr)
    assert np.array_equal(out, np.arange(12.0).reshape(3, 4)) and not out.flags.writeable
    assert arr._npy_value is None
