"""Initializers of the official code, drawn with NumPy.

The official model keeps PyTorch's default initialisation for every
convolution (``kaiming_uniform_(a=sqrt(5))`` for weights, which is
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, and the same bound for biases) and
draws the attention projection and relative encodings from normal
distributions (see ``AxialAttention``). These initializers reproduce those
distributions.

They draw with NumPy rather than the backend's random ops: under JAX every
distinct shape of a backend random op compiles a program, which made
building a model take tens of seconds. NumPy's global generator is seeded
by ``keras.utils.set_random_seed``, so runs stay reproducible; a ``seed``
argument gives a fixed draw.
"""

import math

import keras
import numpy as np


class _NumpyInitializer(keras.initializers.Initializer):
    def __init__(self, seed=None):
        self.seed = seed

    def _generator(self):
        return np.random if self.seed is None else np.random.default_rng(self.seed)

    def __call__(self, shape, dtype=None):
        values = self._draw(self._generator(), tuple(shape))
        return np.asarray(values).astype(keras.backend.standardize_dtype(dtype or keras.config.floatx()))

    def get_config(self):
        return {"seed": self.seed}


@keras.saving.register_keras_serializable(package="medt_keras")
class FanInUniform(_NumpyInitializer):
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: PyTorch's default Conv2d weight and bias init.

    ``fan_in`` defaults to the product of all but the last dimension (a
    Keras kernel's inputs); pass it explicitly for a bias.
    """

    def __init__(self, fan_in=None, seed=None):
        super().__init__(seed)
        self.fan_in = fan_in

    def _draw(self, rng, shape):
        fan_in = self.fan_in or math.prod(shape[:-1])
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape)

    def get_config(self):
        return {"fan_in": self.fan_in, "seed": self.seed}


@keras.saving.register_keras_serializable(package="medt_keras")
class Normal(_NumpyInitializer):
    """``N(0, stddev**2)``."""

    def __init__(self, stddev=1.0, seed=None):
        super().__init__(seed)
        self.stddev = float(stddev)

    def _draw(self, rng, shape):
        return rng.normal(0.0, self.stddev, shape)

    def get_config(self):
        return {"stddev": self.stddev, "seed": self.seed}
