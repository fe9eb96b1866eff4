"""A registered custom layer: load_model finds it once this module is imported."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="ckpt_tests")
class Scale(keras.layers.Layer):
    def __init__(self, init: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.init = init

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(input_shape[-1],), initializer=keras.initializers.Constant(self.init)
        )

    def call(self, x):
        return x * self.scale

    def get_config(self):
        return {**super().get_config(), "init": self.init}


def model(features: int = 4) -> keras.Model:
    m = keras.Sequential([keras.Input((features,)), Scale(3.0), keras.layers.Dense(1)])
    m.compile("adam", "mse")
    return m
