"""Backend selection: medt-keras runs on JAX unless the user chose otherwise.

Imported before anything imports Keras, so that ``import medt_keras`` on a
fresh machine selects JAX without the user setting ``KERAS_BACKEND``.
"""

import os
import sys
import warnings

if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402

if keras.backend.backend() != "jax":
    warnings.warn(
        f"medt_keras runs with the Keras backend {keras.backend.backend()!r}; "
        "it is developed and tested on 'jax'. Set KERAS_BACKEND=jax before "
        "importing keras to use it.",
        stacklevel=2,
    )


def enable_float64():
    """Lets JAX hold float64 arrays (``jax_enable_x64``); needed for float64 models."""
    if keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            jax.config.update("jax_enable_x64", True)
