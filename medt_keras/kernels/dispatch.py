"""Which softmax attention an ``AxialAttention`` layer runs: the one place that decides.

``attention=`` on the layer and on the models is one of:

* ``"auto"`` (default): the fastest that can run the layer here. Under
  Keras' JAX backend, on one CPU device and in float32, the native kernel
  (``native_attention``, where it is built for this CPU); else, on the CPU,
  the blocked JAX kernel (``blocked_attention``) where the layer's
  attention maps fill at least one block in training and more than one in
  inference (smaller maps gain little and pay for compiling the loops; in
  inference ``keras.ops``' one fused pass won at exactly one block); else
  ``"keras_ops"`` (GPUs, TPUs, other Keras backends). A CPU kernel chosen
  this way holds only for programs lowered for the CPU: a program that
  this CPU host lowers for a TPU or a GPU (a compile for another target,
  ``jax.export`` for serving) takes ``"keras_ops"`` there
  (``by_lowering_platform``).
* ``"keras_ops"``: whole-tensor ``keras.ops``, on any backend and platform.
* ``"blocked"``: the pure-JAX kernel, on any JAX platform.
* ``"native"``: the native CPU kernel.

A named kernel that cannot run the layer raises ``KernelUnavailableError``
saying why, when the layer is first called; only ``"auto"`` falls back.
The kernels themselves hold no such rules: they compute what they are
given, and check only that their inputs agree.
"""

import keras

from medt_keras.errors import KernelUnavailableError

IMPLEMENTATIONS = ("auto", "keras_ops", "blocked", "native")


def check_name(attention):
    """Raises ``ValueError`` unless ``attention`` is one of ``IMPLEMENTATIONS``; returns it."""
    if attention not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {attention!r}.")
    return attention


def native_unavailable_reason(shape, dtype, value_channels=None):
    """``None`` where the native kernel can run queries of ``shape`` ``(batch, lines, heads, L, c)``, else why not.

    ``value_channels``: those of the values, if not ``c``. Builds the kernel
    the first time it is asked on a machine that can run it.
    """
    if keras.backend.backend() != "jax":
        return f"it is a JAX kernel and the Keras backend is {keras.backend.backend()!r}"
    import jax
    import jax.numpy as jnp

    from medt_keras.kernels import native_attention

    if jax.default_backend() != "cpu":
        return f"it runs on the CPU and JAX runs on {jax.default_backend()!r}"
    if len(jax.devices()) != 1:
        return f"it runs on one device and JAX has {len(jax.devices())} (it has no sharding rule)"
    if jnp.dtype(dtype) != jnp.float32:
        return f"it computes in float32 and the layer computes in {jnp.dtype(dtype).name}"
    channels = max(shape[4], value_channels or 0)
    if shape[3] > native_attention.MAX_LENGTH or channels > native_attention.MAX_CHANNELS:
        return (f"it takes lines of at most {native_attention.MAX_LENGTH} positions and "
                f"{native_attention.MAX_CHANNELS} channels per head; this layer has {shape[3]} and {channels}")
    return native_attention.build_reason()


def _blocked_pays(shape, training):
    from medt_keras.kernels import blocked_attention

    batch, lines, heads, length = shape[:4]
    elements = batch * lines * heads * length * length
    return elements >= blocked_attention.BLOCK_ELEMENTS if training else elements > blocked_attention.BLOCK_ELEMENTS


def choose(attention, shape, dtype, value_channels=None, training=False):
    """The implementation (``"keras_ops"``, ``"blocked"`` or ``"native"``) a layer runs.

    For queries of ``shape`` ``(batch, lines, heads, L, c)`` in ``dtype``
    with ``value_channels`` per head, in training or not, given the layer's
    ``attention``. Raises ``KernelUnavailableError`` where a named kernel
    cannot run them here.
    """
    check_name(attention)
    if attention == "keras_ops":
        return attention
    if attention == "blocked":
        if keras.backend.backend() != "jax":
            raise KernelUnavailableError(
                f'attention="blocked" is a JAX kernel and the Keras backend is {keras.backend.backend()!r}; '
                'use attention="keras_ops" or "auto".'
            )
        return attention
    if attention == "native":
        reason = native_unavailable_reason(shape, dtype, value_channels)
        if reason is not None:
            raise KernelUnavailableError(
                f'attention="native" cannot run this layer here: {reason}. Use attention="auto", which falls back.'
            )
        return attention
    if keras.backend.backend() != "jax":
        return "keras_ops"
    from medt_keras.kernels import native_attention

    if not native_attention.turned_off_reason() and native_unavailable_reason(shape, dtype, value_channels) is None:
        return "native"
    import jax

    if jax.default_backend() == "cpu" and _blocked_pays(shape, bool(training)):
        return "blocked"
    return "keras_ops"


def by_lowering_platform(cpu_function, other_function, *args):
    """``cpu_function(*args)`` in a program lowered for the CPU, ``other_function(*args)`` for any other platform.

    ``jax.lax.platform_dependent`` traces both and keeps the one for the
    platform the program is lowered for, which need not be the process's
    default: a CPU host compiling for a TPU topology or exporting for a GPU
    gets ``other_function``, and the CPU-only native kernel (an XLA FFI
    target registered for the CPU alone) never reaches a TPU or GPU
    program. Lowered for the CPU, the branch is a ``case`` on a constant,
    which XLA removes: the compiled CPU program is the one
    ``cpu_function`` alone gives (tested).
    """
    import jax

    return jax.lax.platform_dependent(*args, cpu=cpu_function, default=other_function)
