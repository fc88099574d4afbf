"""XLA compiler options for the models' programs: given per program, never set for the process.

XLA's CPU compiler (jaxlib 0.9 and later) hands matrix products,
reductions, elementwise operations and convolutions to the YNNPACK library.
For MedT its elementwise operations and convolutions run slower than XLA's
own code, and so do its reductions in inference (the attention's softmax
sums over rows of 64); in training its reductions win (the BatchNorms' long
ones). Inference also goes without XLA's tree-reduction rewrite, which
splits every reduction over more than 32 elements into two that fuse with
nothing; training keeps it for the BatchNorms' reductions over whole
batches. Measurements: docs/performance.md.

These options travel with each compiled program (``jax.jit``'s
``compiler_options``), not in ``XLA_FLAGS``: the models' ``fit`` /
``evaluate`` / ``predict`` functions (``medt_keras.models``), the sliding
window's program and ``medt-bench``'s get them, and every other JAX program
in the process compiles as it would without medt-keras. Only on the CPU,
only with the jaxlib versions they were measured with (a jaxlib without an
option rejects the compile), never over the user's own setting of the same
flag in ``XLA_FLAGS``; ``MEDT_KERAS_KEEP_XLA_FLAGS=1`` in the environment
asks for XLA's defaults.

Use them in your own jitted functions with ``medt_keras.compiler.jit(fun,
"training")`` or ``jax.jit(fun, compiler_options=compiler_options("training"))``.
"""

import contextlib
import functools
import os
import threading

import keras

WORKLOADS = ("training", "inference")

CPU_OPTIONS = {
    "inference": {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
        "xla_disable_hlo_passes": "tree_reduction_rewriter",
    },
    "training": {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    },
}

# XLA's CPU compiler by default schedules for parallelism and moves the
# recomputation of rematerialised layers forward, next to the original
# forward pass, which keeps everything alive again: rematerialisation then
# saves no memory. This keeps the memory-minimising order; training
# programs of models built with ``rematerialize=True`` get it.
REMATERIALIZATION_OPTIONS = {"xla_cpu_enable_concurrency_optimized_scheduler": False}

# The jaxlib versions the YNNPACK and pass options were measured with (0.8
# has no YNNPACK option).
MEASURED_JAXLIB = ((0, 9), (0, 11))
KEEP_DEFAULTS_VARIABLE = "MEDT_KERAS_KEEP_XLA_FLAGS"


def _jaxlib_version():
    try:
        import jaxlib

        return tuple(int(part) for part in jaxlib.__version__.split(".")[:2])
    except (ImportError, AttributeError, ValueError):
        return None


def _flags_set_by_user():
    """The names of the XLA flags in ``XLA_FLAGS``, without their leading dashes."""
    return {token.split("=")[0].lstrip("-") for token in os.environ.get("XLA_FLAGS", "").split()}


def compiler_options(workload, *, rematerialize=False, platform=None):
    """The XLA options for a program of ``workload`` ("training" or "inference"), or ``None`` for none.

    ``platform``: the one the program is compiled for (JAX's default
    backend if ``None``); only "cpu" gets options. ``rematerialize``: the
    program recomputes rematerialised layers (a training program of a model
    built with ``rematerialize=True``). The result is for ``jax.jit``'s
    ``compiler_options``.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if keras.backend.backend() != "jax":
        return None
    if platform is None:
        import jax

        platform = jax.default_backend()
    if platform != "cpu":
        return None
    options = {}
    low, high = MEASURED_JAXLIB
    version = _jaxlib_version()
    if not os.environ.get(KEEP_DEFAULTS_VARIABLE) and version is not None and low <= version < high:
        options.update(CPU_OPTIONS[workload])
    if rematerialize:
        options.update(REMATERIALIZATION_OPTIONS)
    user = _flags_set_by_user()
    options = {name: value for name, value in options.items() if name not in user}
    return options or None


def jit(fun, workload, *, rematerialize=False, **jit_arguments):
    """``jax.jit(fun, **jit_arguments)`` with ``compiler_options(workload, rematerialize=...)``."""
    import jax

    return jax.jit(fun, compiler_options=compiler_options(workload, rematerialize=rematerialize), **jit_arguments)


_keras_jit_lock = threading.Lock()


@contextlib.contextmanager
def keras_jit_options(workload, *, rematerialize=False):
    """Within the block, the functions Keras jits for ``fit`` / ``evaluate`` / ``predict`` get these options.

    The models' ``make_train_function`` and its two siblings run Keras' own
    under it. Keras jits those functions through the name ``jit`` of its
    JAX trainer module and offers no argument for compiler options, so the
    name is bound, for the few microseconds Keras takes to create its jitted
    functions (nothing is traced or compiled then), to ``jax.jit`` with the
    options; the lock keeps two models doing so at once from restoring the
    wrong one. Nothing changes where Keras jits otherwise (Flax NNX) or
    where there are no options.
    """
    options = compiler_options(workload, rematerialize=rematerialize)
    if options is None:
        yield
        return
    import jax
    from keras.src.backend.jax import trainer

    with _keras_jit_lock:
        original = getattr(trainer, "jit", None)
        if original is not jax.jit:
            yield
            return
        trainer.jit = functools.partial(jax.jit, compiler_options=options)
        try:
            yield
        finally:
            trainer.jit = original
