"""Backend selection: medt-keras runs on JAX unless the user chose otherwise.

Imported before anything imports Keras, so that ``import medt_keras`` on a
fresh machine selects JAX without the user setting ``KERAS_BACKEND``.
"""

import contextlib
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


# XLA's CPU compiler by default schedules for parallelism and moves the
# recomputation of rematerialised layers forward, next to the original
# forward pass, which keeps everything alive again: rematerialisation then
# saves no memory. This flag keeps the memory-minimising order. It is read
# when JAX starts its CPU backend, so it must be in XLA_FLAGS before then.
CPU_REMAT_XLA_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_warned_late_flag = False


def prepare_rematerialization():
    """Makes rematerialisation save memory on CPU; called by models built with ``rematerialize=True``.

    Adds ``CPU_REMAT_XLA_FLAG`` to ``XLA_FLAGS`` while JAX has not started;
    if it has, and runs on CPU without the flag, warns once with the
    setting to use. Harmless on GPU and TPU, whose compilers ignore it.
    """
    global _warned_late_flag
    if keras.backend.backend() != "jax" or CPU_REMAT_XLA_FLAG in os.environ.get("XLA_FLAGS", ""):
        return
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_REMAT_XLA_FLAG).strip()
        return
    import jax

    if jax.default_backend() == "cpu" and not _warned_late_flag:
        _warned_late_flag = True
        warnings.warn(
            "rematerialize=True saves memory on CPU only with "
            f"XLA_FLAGS={CPU_REMAT_XLA_FLAG}, and JAX has already started without it: "
            "set it in the environment before the first JAX computation (or build the "
            "model first). The results are the same either way.",
            stacklevel=3,
        )
