"""Axial attention in native code on x86-64 CPUs with AVX-512 or AVX2, forward and backward.

``AxialAttention(attention="native")`` calls ``attention``, in training and
in inference, and so does ``attention="auto"`` where it can run
(``dispatch``): Keras on JAX, one CPU device, float32, lines of at most 512
positions and at most 64 channels, and this module's C++ kernel
(``native_attention.cc``, XLA FFI custom calls) built and loaded. The
tests check the kernel's outputs and gradients against the blocked kernel
and a float64 reference.

Why: on the CPU the blocked kernel runs in XLA as a chain of small
operations, most of them on one thread; this kernel computes each line's
logits, softmax and weighted sums in one pass and shares the lines between
XLA's own threads (MedT's largest layer in inference about 50 -> 14 ms
with AVX-512, about 45 -> 22 ms with AVX2 on a 2-core AMD EPYC;
docs/performance.md and benchmarks/RESULTS.md have the numbers).

The kernel is compiled on first use, once per machine, with the C++
compiler on the path (``$CXX``, else ``g++`` or ``c++``) against the XLA
FFI headers that jaxlib ships, and kept in
``$MEDT_KERAS_CACHE_DIR/native`` (default ``~/.cache/medt_keras/native``),
keyed by the source, jaxlib's version, the compiler and the instruction
set. It is built for the best instruction set the CPU has
(``instruction_set``): AVX-512 (16 lanes), else AVX2 with FMA (8 lanes, the
same source); ``MEDT_KERAS_NATIVE_ISA=avx2`` (or ``avx512``) asks for one,
e.g. to test the AVX2 build on an AVX-512 machine. Without a compiler, either
instruction set or glibc's vector math library the layer falls back
silently (``unavailable_reason`` says why); a compiler that fails on this
source is reported once as a warning. ``MEDT_KERAS_NATIVE_ATTENTION=0``
turns the kernel off, and so does ``with turned_off():`` within a block.
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from medt_keras.errors import KernelUnavailableError

SWITCH = "MEDT_KERAS_NATIVE_ATTENTION"
CACHE_ENVIRONMENT = "MEDT_KERAS_CACHE_DIR"
ISA_ENVIRONMENT = "MEDT_KERAS_NATIVE_ISA"

SOURCE = Path(__file__).with_name("native_attention.cc")
MAX_LENGTH = 512
MAX_CHANNELS = 64

_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-w")
# Best first: (the /proc/cpuinfo flags it needs, the compiler flags that select it in the source).
_INSTRUCTION_SETS = {
    "avx512": ({"avx512f", "fma"}, ("-mavx512f", "-mfma")),
    "avx2": ({"avx2", "fma"}, ("-mavx2", "-mfma")),
}
_LIBRARIES = ("-lmvec",)
_TARGETS = {
    False: ("medt_native_attention_without_position", "MedtNativeAttentionWithoutPosition"),
    True: ("medt_native_attention_positional", "MedtNativeAttentionPositional"),
}
_BACKWARD_TARGETS = {
    False: ("medt_native_attention_without_position_backward", "MedtNativeAttentionWithoutPositionBackward"),
    True: ("medt_native_attention_positional_backward", "MedtNativeAttentionPositionalBackward"),
}


def cache_dir():
    """Where compiled kernels are kept: ``$MEDT_KERAS_CACHE_DIR/native`` or ``~/.cache/medt_keras/native``."""
    root = os.environ.get(CACHE_ENVIRONMENT)
    if root:
        return Path(root) / "native"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "medt_keras" / "native"


def _cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return flags


def _instruction_set_or_reason():
    """``(name, None)``, or ``(None, why not)`` where the CPU has no instruction set the kernel is built for."""
    flags = _cpu_flags()
    wanted = os.environ.get(ISA_ENVIRONMENT, "").strip().lower()
    if wanted:
        if wanted not in _INSTRUCTION_SETS:
            return None, f"{ISA_ENVIRONMENT}={wanted} is not one of {', '.join(_INSTRUCTION_SETS)}"
        missing = sorted(_INSTRUCTION_SETS[wanted][0] - flags)
        if missing:
            return None, f"{ISA_ENVIRONMENT}={wanted}, but this CPU lacks {' and '.join(missing)}"
        return wanted, None
    for name, (needs, _) in _INSTRUCTION_SETS.items():
        if needs <= flags:
            return name, None
    return None, "this CPU has neither AVX-512 (avx512f) nor AVX2 with FMA (avx2, fma)"


def instruction_set():
    """The instruction set the kernel is built for here: ``"avx512"``, ``"avx2"``, or ``None`` where neither.

    The best the CPU has, unless ``$MEDT_KERAS_NATIVE_ISA`` names one
    (``None`` if the CPU lacks that one).
    """
    return _instruction_set_or_reason()[0]


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_version(compiler):
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.splitlines()[0] if done.stdout else ""


def _build(compiler, isa, rebuild=False, announce=None):
    """The path of the library for instruction set ``isa``, building it if this machine has none (or ``rebuild``).

    ``announce(message)`` is called before a compilation, if given.
    """
    import jaxlib

    include = jax.ffi.include_dir()
    source = SOURCE.read_bytes()
    flags = _FLAGS + _INSTRUCTION_SETS[isa][1]
    key = hashlib.sha256(
        b"\0".join(
            [source, jaxlib.__version__.encode(), compiler.encode(), _compiler_version(compiler).encode()]
            + [flag.encode() for flag in flags + _LIBRARIES]
        )
    ).hexdigest()[:20]
    folder = cache_dir()
    library = folder / f"native_attention-{isa}-{key}.so"
    if library.exists() and not rebuild:
        return library
    if announce is not None:
        announce(f"medt-keras: compiling the native attention kernel for this CPU ({isa}; once, a few seconds)")
    folder.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed into place: processes that
    # build at once (test workers) each finish with a whole file.
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(handle)
    command = [compiler, *flags, "-I", include, str(SOURCE), "-o", temporary, *_LIBRARIES]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise BuildError(f"{' '.join(command)} failed:\n{done.stderr.strip()[-2000:]}")
        # mkstemp made the file private; a shared cache folder needs it readable.
        os.chmod(temporary, 0o755)
        os.replace(temporary, library)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return library


class BuildError(RuntimeError):
    """The C++ compiler failed on the kernel's source (the message has its command and errors)."""


def _machine_reason():
    """``(instruction set, compiler, None)``, or ``(None, None, why this machine gets no kernel)``."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return None, None, f"it is built for x86-64 Linux; this is {sys.platform} on {platform.machine()}"
    isa, reason = _instruction_set_or_reason()
    if reason is not None:
        return None, None, reason
    compiler = _compiler()
    if compiler is None:
        return None, None, "no C++ compiler found ($CXX, g++ or c++)"
    return isa, compiler, None


def build(rebuild=False, announce=print):
    """Builds the kernel for this CPU into the cache, ahead of its first use: ``(path, None)`` or ``(None, why not)``.

    What ``python -m medt_keras.kernels build`` and the commands
    (``medt-train``, ``medt-predict``, ``medt-evaluate``) run first, so that
    no model trace waits for a compiler. A library already in the cache is
    only found (unless ``rebuild``); ``announce(message)`` is called before
    a compilation. Raises ``BuildError`` where the compiler fails.
    """
    isa, compiler, reason = _machine_reason()
    if reason is not None:
        return None, reason
    return _build(compiler, isa, rebuild=rebuild, announce=announce), None


_turned_off = []


@contextlib.contextmanager
def turned_off():
    """Within this block layers with ``attention="auto"`` traced do not take the kernel.

    For XLA's cost analysis, which counts no operations in a custom call:
    ``medt-bench`` counts a model's FLOPs with the kernel turned off.
    """
    _turned_off.append(True)
    try:
        yield
    finally:
        _turned_off.pop()


def turned_off_reason():
    """Why ``attention="auto"`` is not to take the kernel now (``SWITCH`` or ``turned_off``), else ``None``.

    The switches concern "auto" only: ``attention="native"`` names the
    kernel and gets it wherever it is built.
    """
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"turned off by {SWITCH}={os.environ[SWITCH]}"
    if _turned_off:
        return "turned off by native_attention.turned_off()"
    return None


def build_reason():
    """``None`` where the kernel is built for this CPU and registered with XLA, else why not (a sentence).

    Builds the kernel the first time it is called on a machine that can run
    it (a few seconds); later processes load the cached library.
    """
    return _built_reason()


def unavailable_reason():
    """``None`` where ``attention="auto"`` may take the kernel (built, not turned off), else why not."""
    return turned_off_reason() or build_reason()


_registered = []


def _announce_fallback(message):
    # Building while a model is traced is the fallback; said once (the
    # function that builds is cached per process).
    warnings.warn(
        f"{message}, while a model is traced. `python -m medt_keras.kernels build` does this ahead of time.",
        RuntimeWarning,
        stacklevel=4,
    )


@functools.cache
def _built_reason():
    isa, compiler, reason = _machine_reason()
    if reason is not None:
        return reason
    try:
        try:
            library = ctypes.cdll.LoadLibrary(str(_build(compiler, isa, announce=_announce_fallback)))
        except OSError:
            # A cached file that does not load (truncated, or another user's
            # unreadable one): build it again once.
            library = ctypes.cdll.LoadLibrary(str(_build(compiler, isa, rebuild=True)))
        # XLA keeps the first registration of a name for the process (a
        # second one from another copy of the library is an error), so a
        # process registers once, for the instruction set it first built.
        if not _registered:
            for target, symbol in (*_TARGETS.values(), *_BACKWARD_TARGETS.values()):
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
            _registered.append(str(library._name))
    except (BuildError, OSError, subprocess.SubprocessError, AttributeError) as error:
        warnings.warn(
            f"medt-keras: the native attention kernel could not be built or loaded, so the attention layers "
            f"use the slower JAX kernel on this CPU. {error}",
            RuntimeWarning,
            stacklevel=2,
        )
        return f"building or loading it failed: {error}"
    return None


def attention(q, k, v, positional=None):
    """``blocked_attention.blocked_attention``'s function, in native code; same arguments and outputs.

    Float32 only; ``dispatch.native_unavailable_reason`` says where it
    runs. Differentiable: the backward pass is native too and recomputes
    the weights from each query's log-sum-exp, as the blocked kernel does.
    Raises ``KernelUnavailableError`` (a ``RuntimeError``) where the kernel
    is not built (``build_reason``) and ``ValueError`` for inputs whose
    shapes or dtypes do not agree.
    """
    reason = build_reason()
    if reason is not None:
        raise KernelUnavailableError(f"the native attention kernel is not available: {reason}")
    _check_inputs(q, k, v, positional)
    return _native_attention(q, k, v, positional)


def _check_inputs(q, k, v, positional):
    shape = tuple(q.shape)
    if len(shape) != 5 or v.ndim != 5:
        raise ValueError(
            f"native attention: q and v must be (batch, lines, heads, L, channels); got {shape} and {tuple(v.shape)}"
        )
    length = shape[3]
    expected = {"q": (q, shape), "k": (k, shape), "v": (v, shape[:4] + (v.shape[-1],))}
    if positional is not None:
        if len(positional) != 5:
            raise ValueError(f"positional must be (p, r, q_table, k_table, v_table); got {len(positional)} arrays")
        p, r, q_table, k_table, v_table = positional
        channels, value_channels = shape[4], v.shape[-1]
        expected.update(
            p=(p, shape),
            r=(r, shape),
            q_table=(q_table, (length, length, channels)),
            k_table=(k_table, (length, length, channels)),
            v_table=(v_table, (length, length, value_channels)),
        )
    for name, (x, want) in expected.items():
        if tuple(x.shape) != want:
            raise ValueError(f"native attention: {name} has shape {tuple(x.shape)}, expected {want}")
        if jnp.dtype(x.dtype) != jnp.float32:
            raise ValueError(f"native attention: {name} is {jnp.dtype(x.dtype).name}; the kernel takes float32")
    if length > MAX_LENGTH or max(shape[4], v.shape[-1]) > MAX_CHANNELS:
        raise ValueError(
            f"native attention: lines of at most {MAX_LENGTH} positions and {MAX_CHANNELS} channels; "
            f"got L={length}, c={shape[4]}, value channels={v.shape[-1]}"
        )


def _per_line_layout(x):
    """``(n, b, G, L, c)`` -> ``(rows, c, L)``: channels first, as the C++ kernel takes every per-line input."""
    return jnp.swapaxes(jnp.reshape(x, (-1,) + x.shape[3:]), 1, 2)


def _from_per_line_layout(x, shape):
    """``(rows, c, L)`` -> ``(n, b, G, L, c)`` with ``shape``'s first three axes."""
    return jnp.reshape(jnp.swapaxes(x, 1, 2), shape[:3] + (x.shape[2], x.shape[1]))


def _per_line_inputs(q, k, v, positional):
    args = [_per_line_layout(x) for x in (q, k, v)]
    if positional is not None:
        args += [_per_line_layout(x) for x in positional[:2]]
    return args


def _forward_tables(positional):
    # [c][j][i], the query position contiguous: q_table and v_table are
    # indexed [i, j, c], k_table [j, i, c].
    q_table, k_table, v_table = positional[2:]
    return [jnp.transpose(q_table, (2, 1, 0)), jnp.transpose(k_table, (2, 0, 1)), jnp.transpose(v_table, (2, 1, 0))]


def _backward_tables(positional):
    # [i][c][j], the key position contiguous.
    q_table, k_table, v_table = positional[2:]
    return [jnp.transpose(q_table, (0, 2, 1)), jnp.transpose(k_table, (1, 2, 0)), jnp.transpose(v_table, (0, 2, 1))]


def _call(target, args, shapes):
    outputs = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    return jax.ffi.ffi_call(target, outputs, vmap_method="sequential")(*args)


def _forward(q, k, v, positional):
    """``(outputs, log_sum_exp)``; log_sum_exp ``(rows, L)``."""
    args = _per_line_inputs(q, k, v, positional)
    if positional is not None:
        args += _forward_tables(positional)
    rows, length = args[0].shape[0], args[0].shape[2]
    terms = 1 + (positional is not None)
    y_shape = (rows, v.shape[-1], length)
    results = _call(_TARGETS[positional is not None][0], args, [y_shape] * terms + [(rows, length)])
    return tuple(_from_per_line_layout(y, v.shape) for y in results[:terms]), results[terms]


@jax.custom_vjp
def _native_attention(q, k, v, positional):
    return _forward(q, k, v, positional)[0]


def _native_forward(q, k, v, positional):
    outputs, log_sum_exp = _forward(q, k, v, positional)
    return outputs, (q, k, v, positional, log_sum_exp)


def _native_backward(residuals, cotangents):
    q, k, v, positional, log_sum_exp = residuals
    args = _per_line_inputs(q, k, v, positional)
    if positional is not None:
        args += _backward_tables(positional)
    rows, length = args[0].shape[0], args[0].shape[2]
    cotangents = [jnp.reshape(dy, (rows, length, v.shape[-1])) for dy in cotangents]
    shapes = [arg.shape for arg in args]
    grads = _call(_BACKWARD_TARGETS[positional is not None][0], args + [log_sum_exp] + cotangents, shapes)
    dq, dk, dv = (_from_per_line_layout(g, x.shape) for g, x in zip(grads[:3], (q, k, v)))
    if positional is None:
        return dq, dk, dv, None
    d_positional = (
        _from_per_line_layout(grads[3], q.shape),
        _from_per_line_layout(grads[4], k.shape),
        jnp.transpose(grads[5], (0, 2, 1)),  # [i, c, j] -> [i, j, c]
        jnp.transpose(grads[6], (2, 0, 1)),  # [i, c, j] -> [j, i, c]
        jnp.transpose(grads[7], (0, 2, 1)),
    )
    return dq, dk, dv, d_positional


_native_attention.defvjp(_native_forward, _native_backward)
