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
# Inference also goes without XLA's tree-reduction rewrite, which splits
# every reduction over more than 32 elements (the softmax's rows of 64)
# into two that fuse with nothing (MedT inference another 10%); training
# keeps it for the BatchNorms' reductions over whole batches.
# Like the rematerialisation flag below, these are read when JAX starts its
# CPU backend. A user's own setting of a flag is kept;
# MEDT_KERAS_KEEP_XLA_FLAGS=1 adds nothing.
_LIBRARY_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_DISABLED_PASSES_FLAG = "--xla_disable_hlo_passes"
# Every flag each workload sets, as XLA_FLAGS tokens.
CPU_COMPILER_FLAGS = {
    "inference": (
        f"{_LIBRARY_FUSION_FLAG}=LIBRARY_FUSION_TYPE_DOT",
        # The CPU compiler's pass (GPU compilers name theirs differently).
        f"{_DISABLED_PASSES_FLAG}=tree_reduction_rewriter",
    ),
    "training": (f"{_LIBRARY_FUSION_FLAG}=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",),
}
# The jaxlib versions measured with it: XLA aborts the process on a flag it
# does not know (0.8 has none), so other versions get nothing.
_LIBRARY_FUSION_JAXLIB = ((0, 9), (0, 11))
# The tokens of XLA_FLAGS that medt-keras put there, also in the environment
# so that a process started from this one (a worker, medt-train launched by a
# script that imported medt_keras) tells them from the user's own.
_ADDED_FLAGS_VARIABLE = "MEDT_KERAS_ADDED_XLA_FLAGS"


def _added_flags():
    """flag name -> the token medt-keras put in XLA_FLAGS (in this process or the one that started it)."""
    return {token.split("=")[0]: token for token in os.environ.get(_ADDED_FLAGS_VARIABLE, "").split()}


def _jaxlib_version():
    try:
        import jaxlib

        return tuple(int(part) for part in jaxlib.__version__.split(".")[:2])
    except (ImportError, AttributeError, ValueError):
        return None


def _accelerator_plugin_installed():
    """Whether JAX may find a GPU or TPU here, whose compilers are unmeasured without the tree-reduction rewrite.

    Looks where JAX looks for accelerators: the ``jax_plugins`` namespace
    package and entry points (CUDA, ROCm, Metal plugins) and ``libtpu``,
    unless ``JAX_PLATFORMS`` is ``cpu``.
    """
    import importlib.util
    from importlib import metadata

    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    if importlib.util.find_spec("jax_plugins") is not None or importlib.util.find_spec("libtpu") is not None:
        return True
    return bool(metadata.entry_points(group="jax_plugins"))


def tune_cpu_compiler(workload="inference"):
    """Sets XLA's CPU compiler flags for ``workload`` ("inference" or "training") in ``XLA_FLAGS``.

    ``import medt_keras`` calls it for inference; ``medt-train`` for
    training, before it starts JAX. Only under the JAX backend, before JAX
    has started its backends, with a jaxlib known to have the flags, when
    ``MEDT_KERAS_KEEP_XLA_FLAGS`` is unset; a flag ``XLA_FLAGS`` already
    sets other than as this function did is left as it is, and flags set
    for another workload are taken back. The tree-reduction pass is left on
    where a GPU or TPU plugin is installed. Returns whether it changed
    ``XLA_FLAGS``. GPU and TPU compilers ignore the YNNPACK flag.
    """
    tokens = os.environ.get("XLA_FLAGS", "").split()
    if keras.backend.backend() != "jax" or os.environ.get("MEDT_KERAS_KEEP_XLA_FLAGS"):
        return False
    version = _jaxlib_version()
    low, high = _LIBRARY_FUSION_JAXLIB
    if version is None or not low <= version < high:
        return False
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return False
    wanted = {token.split("=")[0]: token for token in CPU_COMPILER_FLAGS[workload]}
    if _DISABLED_PASSES_FLAG in wanted and _accelerator_plugin_installed():
        del wanted[_DISABLED_PASSES_FLAG]
    added = _added_flags()
    for flag in sorted(set(wanted) | set(added)):
        present = [t for t in tokens if t.split("=")[0] == flag]
        if present and present != [added.get(flag)]:
            continue  # the user's own setting
        tokens = [t for t in tokens if t not in present]
        added.pop(flag, None)
        if flag in wanted:
            tokens.append(wanted[flag])
            added[flag] = wanted[flag]
    changed = " ".join(tokens) != os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join(tokens)
    os.environ[_ADDED_FLAGS_VARIABLE] = " ".join(added.values())
    return changed


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
