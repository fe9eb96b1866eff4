"""Small models and data shared by the Keras tests (importable in subprocesses too)."""

from __future__ import annotations

import keras
import numpy as np


def data(n: int = 40, features: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    x = rng.randn(n, features).astype("float32")
    y = (x @ rng.randn(features, 1)).astype("float32")
    return x, y


def sequential(features: int = 4, hidden: int = 8, steps_per_execution: int = 1, dtype=None) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(hidden, activation="relu", dtype=dtype),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(1, dtype=dtype),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-2), "mse", steps_per_execution=steps_per_execution)
    return model


def functional(features: int = 4) -> keras.Model:
    inp = keras.Input((features,), name="x")
    h = keras.layers.Dense(8, activation="tanh")(inp)
    h = keras.layers.BatchNormalization()(h)
    out = keras.layers.Add()([keras.layers.Dense(1)(h), keras.layers.Dense(1)(inp)])
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.SGD(1e-2, momentum=0.9), "mse", metrics=["mae"])
    return model


class TwoDense(keras.Model):
    """A subclassed model: it has no variables until it is first called."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))


def unbuilt(kind: str) -> keras.Model:
    """A compiled model whose variables do not exist yet ("subclassed" or "sequential_no_input")."""
    if kind == "subclassed":
        model = TwoDense()
    else:
        model = keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model


class ScriptedValScore(keras.callbacks.Callback):
    """Puts ``scores[epoch]`` into the epoch's logs as ``val_score`` (a validation metric whose values a
    test chooses). Listed before the checkpoint callback, which then sees it in the same logs dict."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = scores

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None and epoch < len(self.scores):
            logs["val_score"] = self.scores[epoch]
