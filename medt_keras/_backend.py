"""Backend selection: medt-keras runs on JAX unless the user chose otherwise.

Imported before anything imports Keras, so that ``import medt_keras`` on a
fresh machine selects JAX without the user setting ``KERAS_BACKEND`` (and
without leaving it set). Nothing here sets a compiler flag: the XLA options
the models need travel with their programs (``medt_keras.compiler``).
"""

import contextlib
import os
import sys
import warnings

if "keras" not in sys.modules and "KERAS_BACKEND" not in os.environ:
    # Keras reads KERAS_BACKEND once, when it is first imported; the
    # variable is taken back at once, so that the environment (and every
    # process started from this one) is as the user left it.
    os.environ["KERAS_BACKEND"] = "jax"
    try:
        import keras
    finally:
        del os.environ["KERAS_BACKEND"]

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


@contextlib.contextmanager
def highest_matmul_precision():
    """Matrix products and convolutions at full float32 (or float64) precision inside the block.

    ``jax.default_matmul_precision("highest")`` under JAX, nothing on other
    backends; usable as a decorator. JAX's default lets GPUs multiply
    float32 in TF32 (10-bit mantissa) and TPUs in bfloat16 passes; parity
    measurements need the products the reference computed. On the CPU it
    changes nothing. Functions jitted inside the block compile with it.
    """
    if keras.backend.backend() != "jax":
        yield
        return
    import jax

    with jax.default_matmul_precision("highest"):
        yield
