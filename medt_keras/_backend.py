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


# XLA's CPU compiler (jaxlib 0.9 and later) hands matrix products,
# reductions, elementwise operations and convolutions to the YNNPACK
# library. For MedT its elementwise operations and convolutions run slower
# than XLA's own code, and so do its reductions in inference (the
# attention's softmax sums over rows of 64); in training its reductions
# win (the BatchNorms' long ones). So a process gets the products only,
# and ``medt-train`` the products and reductions: MedT inference about 16%
# less time, MedT training about 10% (measurements in docs/performance.md).
# Like the rematerialisation flag below, it is read when JAX starts its CPU
# backend. A user's own setting of the flag is kept;
# MEDT_KERAS_KEEP_XLA_FLAGS=1 adds nothing.
_LIBRARY_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_LIBRARY_FUSION_TYPES = {
    "inference": "LIBRARY_FUSION_TYPE_DOT",
    "training": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}
CPU_LIBRARY_FUSION_XLA_FLAG = f"{_LIBRARY_FUSION_FLAG}={CPU_LIBRARY_FUSION_TYPES['inference']}"
# The jaxlib versions measured with it: XLA aborts the process on a flag it
# does not know (0.8 has none), so other versions get nothing.
_LIBRARY_FUSION_JAXLIB = ((0, 9), (0, 11))
_added_library_fusion_flag = None  # what this process put in XLA_FLAGS, if anything


def _jaxlib_version():
    try:
        import jaxlib

        return tuple(int(part) for part in jaxlib.__version__.split(".")[:2])
    except (ImportError, AttributeError, ValueError):
        return None


def tune_cpu_compiler(workload="inference"):
    """Sets XLA's YNNPACK library fusions for ``workload`` ("inference" or "training") in ``XLA_FLAGS``.

    ``import medt_keras`` calls it for inference; ``medt-train`` for
    training, before it starts JAX. Only under the JAX backend, before JAX
    has started its backends, with a jaxlib known to have the flag, when
    ``MEDT_KERAS_KEEP_XLA_FLAGS`` is unset and ``XLA_FLAGS`` has no setting
    of the flag other than one this function made. Returns whether it set
    the flag. GPU and TPU compilers ignore it.
    """
    global _added_library_fusion_flag
    wanted = f"{_LIBRARY_FUSION_FLAG}={CPU_LIBRARY_FUSION_TYPES[workload]}"
    tokens = os.environ.get("XLA_FLAGS", "").split()
    if keras.backend.backend() != "jax" or os.environ.get("MEDT_KERAS_KEEP_XLA_FLAGS"):
        return False
    present = [t for t in tokens if t.startswith(_LIBRARY_FUSION_FLAG)]
    if present and present != [_added_library_fusion_flag]:
        return False  # the user's own setting
    version = _jaxlib_version()
    low, high = _LIBRARY_FUSION_JAXLIB
    if version is None or not low <= version < high:
        return False
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return False
    os.environ["XLA_FLAGS"] = " ".join([t for t in tokens if t not in present] + [wanted])
    _added_library_fusion_flag = wanted
    return True


tune_cpu_compiler()


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
