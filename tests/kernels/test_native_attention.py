"""The native attention kernel against the blocked JAX kernel and a float64 reference: outputs and gradients."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medt_keras.errors import KernelUnavailableError
from tests.conftest import fast_first
from medt_keras.kernels import blocked_attention, native_attention
from medt_keras.layers import AxialAttention
from medt_keras.layers._attention_ops import softmax_attention
from tests.kernels.test_blocked_attention import _inputs as blocked_inputs
from tests.layers.test_axial_attention import _gradients_and_updates, _twin_layers


@pytest.fixture(scope="module")
def kernel():
    reason = native_attention.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the native kernel is not available here: {reason}")
    return native_attention.attention


def _inputs(rng, batch, lines, heads, length, channels, value_channels, positional):
    return blocked_inputs(rng, batch, lines, heads, length, channels, value_channels, positional, dtype="float32")


def _float64_reference(inputs):
    # keras.ops' whole-tensor form, evaluated in float64 with NumPy.
    def to64(x):
        return None if x is None else np.asarray(x, np.float64)

    q, k, v, positional = inputs
    q, k, v = to64(q), to64(k), to64(v)
    logits = np.einsum("nblic,nbljc->nblij", q, k)
    if positional is not None:
        p, r, q_table, k_table, v_table = (to64(t) for t in positional)
        logits = logits + np.einsum("nblic,ijc->nblij", p, q_table) + np.einsum("nbljc,jic->nblij", r, k_table)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    outputs = [np.einsum("nblij,nbljd->nblid", weights, v)]
    if positional is not None:
        outputs.append(np.einsum("nblij,ijd->nblid", weights, v_table))
    return outputs


# Lengths that end in a partial vector of 8 lanes (the AVX2 build) and of
# 16 (AVX-512), or are shorter than one vector.
ODD_SHAPES = [
    (1, 2, 1, 3, 2, 3),
    (1, 1, 2, 7, 3, 2),
    (1, 2, 1, 9, 2, 5),
    (1, 1, 2, 15, 4, 3),
    (2, 1, 1, 17, 2, 2),
    (1, 2, 1, 23, 3, 4),
]

# (batch, lines, heads, L, c, cv): MedT's global 64-pixel layer shape in
# small, the local branch's 16, the gated U-Net's 8, lengths that end in a
# partial vector, a line of one position, odd channel counts, the longest
# line the kernel takes.
SHAPES = [
    (2, 3, 2, 16, 2, 4),
    (2, 3, 2, 8, 2, 4),
    (1, 2, 2, 21, 3, 5),
    (2, 2, 1, 1, 2, 3),
    (1, 5, 1, 32, 1, 3),
    (2, 4, 8, 64, 2, 4),
    (1, 2, 3, 48, 5, 7),
    (1, 1, 1, 512, 2, 2),
    *ODD_SHAPES,
]


@pytest.mark.parametrize("shape", fast_first(SHAPES, 2))
@pytest.mark.parametrize("positional", [False, True])
def test_matches_float64_reference_and_blocked_kernel(kernel, shape, positional):
    inputs = _inputs(np.random.default_rng(sum(shape)), *shape, positional)
    actual = jax.jit(kernel)(*inputs)
    blocked = jax.jit(blocked_attention.blocked_attention)(*inputs)
    reference = _float64_reference(inputs)
    assert len(actual) == len(reference) == len(blocked) == 1 + positional
    for a, b, r in zip(actual, blocked, reference):
        assert a.shape == r.shape and a.dtype == jnp.float32
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), r, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def test_matches_keras_ops_form(kernel):
    inputs = _inputs(np.random.default_rng(1), 2, 3, 2, 32, 2, 4, True)
    for a, e in zip(kernel(*inputs), softmax_attention(*inputs, broadcast=False)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-5, atol=2e-5)


def test_large_logits_do_not_overflow(kernel):
    # Logits in the hundreds: the row maximum is subtracted before exp.
    q, k, v, positional = _inputs(np.random.default_rng(2), 1, 2, 2, 16, 2, 3, True)
    inputs = (q * 30, k * 30, v, positional)
    actual = kernel(*inputs)
    for a, r in zip(actual, _float64_reference(inputs)):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length", fast_first([9, 17]))
@pytest.mark.parametrize("with_position", [False, True])
def test_very_negative_logits_keep_their_gradients(kernel, length, with_position):
    # Every logit below -100, so exp(-log_sum_exp) overflows: the backward's
    # weights of the missing lanes must come from logits of -inf, not from
    # their zeros (inf times the 0 of a masked read would be NaN in dq).
    q, k, v, positional = _inputs(np.random.default_rng(13), 1, 2, 2, length, 2, 3, with_position)
    inputs = (-(jnp.abs(q) + 8), jnp.abs(k) + 8, v)

    def loss(attention):
        return lambda q, k, v: sum(jnp.sum(jnp.sin(y)) for y in attention(q, k, v, positional))

    grads = jax.grad(loss(kernel), argnums=(0, 1, 2))(*inputs)
    expected = jax.grad(loss(blocked_attention.blocked_attention), argnums=(0, 1, 2))(*inputs)
    for g, e in zip(grads, expected):
        g, e = np.asarray(g), np.asarray(e)
        assert np.isfinite(g).all()
        # Looser than elsewhere: the weights exp(s - log_sum_exp) carry the
        # rounding of a log-sum-exp near -130 (float32 steps of 1.5e-5 there),
        # so they sum to 1 within about 1e-5, and dq multiplies that by keys
        # that share an offset of 8 (5e-4 of the largest dq against float64;
        # the blocked kernel 2e-5).
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=2e-3 * np.abs(e).max())


# At lengths 9 and 17 the last vector of line 0 (of 8 or 16 lanes) has 7
# or more lanes past its end, over the start of line 1 in memory and the
# NaN at position 5 there: a missing lane must read nothing from it.
NAN_LENGTHS = [16, 9, 17]


@pytest.mark.parametrize("length", NAN_LENGTHS)
def test_nan_query_gives_nan_for_that_query_only(kernel, length):
    q, k, v, positional = _inputs(np.random.default_rng(3), 1, 2, 1, length, 2, 3, True)
    q = q.at[0, 1, 0, 5, 0].set(jnp.nan)
    for y in kernel(q, k, v, positional):
        y = np.asarray(y)
        assert np.isnan(y[0, 1, 0, 5]).all()
        finite = np.ones(y.shape[:4], bool)
        finite[0, 1, 0, 5] = False
        assert np.isfinite(y[finite]).all()


# No line of one position: its weight is 1 whatever the logits, so most gradients are 0.
@pytest.mark.parametrize(
    "shape", fast_first([(1, 3, 2, 16, 2, 3), (2, 3, 2, 8, 1, 2), (2, 4, 8, 64, 2, 4), (1, 2, 3, 21, 5, 7), *ODD_SHAPES],
                        2)
)
@pytest.mark.parametrize("positional", [False, True])
def test_gradients_match_the_blocked_kernels(kernel, shape, positional):
    # Every input's gradient: q, k, v, and with positional terms p, r and
    # the three tables (summed over all lines).
    inputs = _inputs(np.random.default_rng(sum(shape) + 4), *shape, positional)
    weights = [jnp.asarray(np.random.default_rng(t).normal(size=shape[:4] + shape[5:]), jnp.float32) for t in (5, 6)]

    def loss(attention):
        return lambda *a: sum(jnp.sum(jnp.sin(y) * w) for y, w in zip(attention(*a), weights))

    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2, 3)))(*inputs)
    expected = jax.jit(jax.grad(loss(blocked_attention.blocked_attention), argnums=(0, 1, 2, 3)))(*inputs)
    leaves, expected_leaves = jax.tree.leaves(grads), jax.tree.leaves(expected)
    assert len(leaves) == len(expected_leaves) == (8 if positional else 3)
    for g, e in zip(leaves, expected_leaves):
        g, e = np.asarray(g), np.asarray(e)
        assert g.shape == e.shape and np.isfinite(g).all() and np.abs(g).max() > 0
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * np.abs(e).max())


@pytest.mark.parametrize("length", NAN_LENGTHS)
def test_nan_query_gives_nan_gradients_for_its_line_only(kernel, length):
    q, k, v, positional = _inputs(np.random.default_rng(8), 1, 2, 1, length, 2, 3, True)
    q = q.at[0, 1, 0, 5, 0].set(jnp.nan)
    dq, dk = jax.grad(lambda q, k: sum(jnp.sum(y) for y in kernel(q, k, v, positional)), argnums=(0, 1))(q, k)
    for g in (np.asarray(dq), np.asarray(dk)):
        assert np.isnan(g[0, 1]).any()
        assert np.isfinite(g[0, 0]).all()


@pytest.mark.parametrize("length", NAN_LENGTHS)
def test_nan_key_gives_nan_for_its_line_only(kernel, length):
    # Every query of line 1 attends to the NaN key, so that line is NaN;
    # line 0's gradients read the keys as sums across lanes (dq), where a
    # NaN from line 1 in a missing lane would not be cancelled by its weight of 0.
    q, k, v, positional = _inputs(np.random.default_rng(12), 1, 2, 1, length, 2, 3, True)
    k = k.at[0, 1, 0, 5, 0].set(jnp.nan)
    for y in kernel(q, k, v, positional):
        y = np.asarray(y)
        assert np.isnan(y[0, 1]).all() and np.isfinite(y[0, 0]).all()

    def loss(q, k, v, p, r):
        return sum(jnp.sum(y) for y in kernel(q, k, v, (p, r) + positional[2:]))

    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, *positional[:2])
    for g in map(np.asarray, grads):
        assert np.isnan(g[0, 1]).all() and np.isfinite(g[0, 0]).all()


def _twins(x):
    # A gated positional layer with the native kernel ("auto") and its twin on the blocked kernel.
    return _twin_layers(x, "height", True, True, [{}, {"attention": "blocked"}], dtype="float32", batch_groups=1)


def test_layer_uses_it_in_float32_training_and_inference(kernel, monkeypatch):
    calls = []
    original = native_attention.attention
    monkeypatch.setattr(native_attention, "attention", lambda *a: calls.append(1) or original(*a))
    x = np.random.default_rng(6).normal(size=(2, 16, 16, 8)).astype("float32")
    layer, blocked = _twins(x)
    y = np.asarray(layer(x, training=False))
    assert calls == [1]
    np.testing.assert_allclose(y, np.asarray(blocked(x, training=False)), rtol=1e-4, atol=1e-5)
    layer(x, training=True)
    assert calls == [1, 1]
    blocked(x, training=False)
    AxialAttention(8, num_heads=2, attention="keras_ops")(x, training=True)
    assert calls == [1, 1]


def test_layer_training_step_matches_the_blocked_kernel(kernel):
    # Outputs, every trainable variable's gradient (tables and gates among
    # them) and the BatchNorm updates of one training call, float32.
    x = np.random.default_rng(9).normal(size=(2, 16, 16, 8)).astype("float32")
    results = []
    for layer in _twins(x):
        y, grads, _, updated = _gradients_and_updates(layer, x)
        y = np.asarray(y, np.float64)
        # The loss _gradients_and_updates differentiates.
        value = np.sum(np.sin(y) * np.arange(y.size).reshape(y.shape) / y.size)
        results.append((value, grads, updated))
    (value, grads, updated), (expected_value, expected_grads, expected_updated) = results
    np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-5)
    assert len(grads) == len(expected_grads) > 5
    for g, e in zip(grads + updated, expected_grads + expected_updated):
        g, e = np.asarray(g), np.asarray(e)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(e).max()))


def test_switch_turns_it_off_for_auto(kernel, monkeypatch):
    monkeypatch.setenv(native_attention.SWITCH, "0")
    try:
        assert "turned off" in native_attention.unavailable_reason()
        assert native_attention.build_reason() is None  # attention="native" still runs it
    finally:
        monkeypatch.delenv(native_attention.SWITCH)
    assert native_attention.unavailable_reason() is None
    with native_attention.turned_off():
        assert "turned off" in native_attention.unavailable_reason()
    assert native_attention.unavailable_reason() is None


def _fake_compiler(tmp_path, body):
    path = tmp_path / "fake-c++"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_failing_compiler_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv(native_attention.CACHE_ENVIRONMENT, str(tmp_path / "cache"))
    compiler = _fake_compiler(tmp_path, 'echo "native_attention.cc:1: error: no such header" >&2; exit 1')
    with pytest.raises(native_attention.BuildError, match="no such header"):
        native_attention._build(compiler, "avx2")
    assert os.listdir(tmp_path / "cache" / "native") == []


def test_a_built_library_is_reused_without_compiling(tmp_path, monkeypatch):
    monkeypatch.setenv(native_attention.CACHE_ENVIRONMENT, str(tmp_path / "cache"))
    marker = tmp_path / "compiled"
    # A "compiler" that writes its output file (the argument after -o) and counts its calls.
    compiler = _fake_compiler(
        tmp_path,
        'case "$1" in --version) echo fake 1.0; exit 0;; esac\n'
        'while [ $# -gt 0 ]; do if [ "$1" = -o ]; then out=$2; fi; shift; done\n'
        f'echo built > "$out"; echo x >> "{marker}"',
    )
    first = native_attention._build(compiler, "avx2")
    second = native_attention._build(compiler, "avx2")
    assert first == second and first.read_text() == "built\n"
    assert marker.read_text().count("x") == 1
    assert [p.name for p in first.parent.iterdir()] == [first.name]
    # Another instruction set is another file, built with its own flags.
    other = native_attention._build(compiler, "avx512")
    assert first.name.startswith("native_attention-avx2-") and other.name.startswith("native_attention-avx512-")
    assert marker.read_text().count("x") == 2


def test_build_ahead_of_use_then_the_first_trace_only_loads(tmp_path, monkeypatch):
    # What `python -m medt_keras.kernels build` and the commands run first: one compilation,
    # announced; a later build finds the cached file. Building at a trace instead says so once.
    monkeypatch.setenv(native_attention.CACHE_ENVIRONMENT, str(tmp_path / "cache"))
    compiler = _fake_compiler(
        tmp_path,
        'case "$1" in --version) echo fake 1.0; exit 0;; esac\n'
        'while [ $# -gt 0 ]; do if [ "$1" = -o ]; then out=$2; fi; shift; done\n'
        'echo built > "$out"',
    )
    monkeypatch.setattr(native_attention, "_compiler", lambda: compiler)
    monkeypatch.setattr(native_attention, "_instruction_set_or_reason", lambda: ("avx2", None))
    said = []
    path, reason = native_attention.build(announce=said.append)
    assert reason is None and path.read_text() == "built\n"
    assert len(said) == 1 and "compiling the native attention kernel for this CPU (avx2" in said[0]
    assert native_attention.build(announce=said.append) == (path, None) and len(said) == 1
    monkeypatch.setattr(native_attention, "_instruction_set_or_reason", lambda: (None, "this CPU has neither"))
    assert native_attention.build(announce=said.append) == (None, "this CPU has neither")
    with pytest.warns(RuntimeWarning, match="while a model is traced. `python -m medt_keras.kernels build`"):
        native_attention._announce_fallback("medt-keras: compiling the native attention kernel")


def test_the_build_command_says_what_it_did(tmp_path, monkeypatch, capsys):
    from medt_keras.kernels.__main__ import main

    monkeypatch.setattr(native_attention, "build", lambda rebuild=False: (None, "this CPU has neither"))
    assert main(["build"]) == 0
    assert "no native attention kernel here (this CPU has neither)" in capsys.readouterr().out

    def failing(rebuild=False):
        raise native_attention.BuildError("g++ failed: no such header")

    monkeypatch.setattr(native_attention, "build", failing)
    assert main(["build", "--rebuild"]) == 1
    assert "no such header" in capsys.readouterr().err
    monkeypatch.setattr(native_attention, "build", lambda rebuild=False: (tmp_path / "k.so", None))
    assert main(["build"]) == 0
    assert f"ready: {tmp_path / 'k.so'}" in capsys.readouterr().out


def test_unavailable_without_a_compiler_falls_back_with_a_reason(kernel, monkeypatch):
    calls = []
    original = native_attention._native_attention
    monkeypatch.setattr(native_attention, "_native_attention", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(native_attention, "_compiler", lambda: None)
    native_attention._built_reason.cache_clear()
    try:
        assert "no C++ compiler" in native_attention.unavailable_reason()
        x = np.random.default_rng(7).normal(size=(1, 16, 16, 8)).astype("float32")
        y = AxialAttention(8, num_heads=2)(x, training=False)
        assert np.isfinite(np.asarray(y)).all()
        assert calls == []
        with pytest.raises(KernelUnavailableError, match="not available: no C\\+\\+ compiler"):
            native_attention.attention(*_inputs(np.random.default_rng(7), 1, 1, 1, 16, 2, 3, False))
    finally:
        monkeypatch.undo()
        native_attention._built_reason.cache_clear()
        native_attention.unavailable_reason()


def test_inputs_that_do_not_agree_are_a_clear_error(kernel):
    q, k, v, positional = _inputs(np.random.default_rng(10), 1, 2, 2, 16, 2, 3, True)
    with pytest.raises(ValueError, match=r"k has shape \(1, 2, 2, 8, 4\), expected \(1, 2, 2, 16, 2\)"):
        kernel(q, jnp.reshape(k, (1, 2, 2, 8, 4)), v, positional)
    with pytest.raises(ValueError, match="v_table has shape"):
        kernel(q, k, v, positional[:4] + (positional[4][:, :8],))
    with pytest.raises(ValueError, match="v is float16; the kernel takes float32"):
        kernel(q, k, v.astype(jnp.float16), None)
    with pytest.raises(ValueError, match="must be"):
        kernel(q[0], k, v, None)


@pytest.mark.slow
def test_a_cached_library_that_does_not_load_is_built_again(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv(native_attention.CACHE_ENVIRONMENT, str(tmp_path / "cache"))
    compiler = native_attention._compiler()
    path = native_attention._build(compiler, native_attention.instruction_set())
    assert oct(path.stat().st_mode & 0o777) == oct(0o755)
    path.write_bytes(b"not a library")
    native_attention._built_reason.cache_clear()
    try:
        assert native_attention.unavailable_reason() is None
        assert path.read_bytes()[:4] == b"\x7fELF"
    finally:
        native_attention._built_reason.cache_clear()
        native_attention.unavailable_reason()



def test_instruction_set_is_the_best_the_cpu_has(monkeypatch):
    monkeypatch.delenv(native_attention.ISA_ENVIRONMENT, raising=False)
    flags = native_attention._cpu_flags()
    expected = "avx512" if {"avx512f", "fma"} <= flags else "avx2" if {"avx2", "fma"} <= flags else None
    assert native_attention.instruction_set() == expected
    for flags, expected in [
        ({"avx512f", "avx2", "fma"}, "avx512"),
        ({"avx2", "fma"}, "avx2"),
        ({"avx2"}, None),
        ({"sse4_2"}, None),
    ]:
        monkeypatch.setattr(native_attention, "_cpu_flags", lambda flags=flags: flags)
        assert native_attention.instruction_set() == expected
    assert "neither AVX-512" in native_attention._instruction_set_or_reason()[1]


def test_the_instruction_set_can_be_asked_for_and_is_refused_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(native_attention, "_cpu_flags", lambda: {"avx512f", "avx2", "fma"})
    monkeypatch.setenv(native_attention.ISA_ENVIRONMENT, "avx2")
    assert native_attention.instruction_set() == "avx2"
    monkeypatch.setenv(native_attention.ISA_ENVIRONMENT, " AVX512 ")
    assert native_attention.instruction_set() == "avx512"
    monkeypatch.setenv(native_attention.ISA_ENVIRONMENT, "sse")
    assert native_attention.instruction_set() is None
    assert "is not one of avx512, avx2" in native_attention._instruction_set_or_reason()[1]
    monkeypatch.setattr(native_attention, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setenv(native_attention.ISA_ENVIRONMENT, "avx512")
    assert native_attention.instruction_set() is None
    native_attention._built_reason.cache_clear()
    try:
        assert native_attention.unavailable_reason() == "MEDT_KERAS_NATIVE_ISA=avx512, but this CPU lacks avx512f"
    finally:
        monkeypatch.undo()
        native_attention._built_reason.cache_clear()
        native_attention.unavailable_reason()


def test_the_avx2_build_asked_for_is_the_one_that_runs(kernel):
    # In a fresh process: a process registers the kernel once, so on an
    # AVX-512 machine this one already runs the AVX-512 build.
    if not {"avx2", "fma"} <= native_attention._cpu_flags():
        pytest.skip("this CPU has no AVX2 with FMA")
    script = """
import numpy as np, jax
from medt_keras.errors import KernelUnavailableError
from medt_keras.kernels import blocked_attention, native_attention
from tests.kernels.test_native_attention import _inputs
assert native_attention.instruction_set() == "avx2"
assert native_attention.unavailable_reason() is None, native_attention.unavailable_reason()
assert "native_attention-avx2-" in native_attention._registered[0], native_attention._registered
inputs = _inputs(np.random.default_rng(11), 1, 2, 2, 23, 3, 4, True)
for a, b in zip(native_attention.attention(*inputs), blocked_attention.blocked_attention(*inputs)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
print("ok")
"""
    root = Path(__file__).resolve().parents[2]
    environment = dict(os.environ, **{native_attention.ISA_ENVIRONMENT: "avx2"})
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
