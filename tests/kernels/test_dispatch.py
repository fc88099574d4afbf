"""The one place that decides which attention a layer runs (medt_keras.kernels.dispatch)."""

import jax
import numpy as np
import pytest

import medt_keras
from medt_keras.errors import KernelUnavailableError
from medt_keras.kernels import blocked_attention, dispatch, native_attention
from medt_keras.layers import AxialAttention
from tests.conftest import TINY_IMG_SIZE
from tests.conftest import TINY_MODEL as TINY

ON_ONE_CPU = jax.default_backend() == "cpu" and len(jax.devices()) == 1
SMALL = (1, 2, 2, 8, 4)  # (batch, lines, heads, L, c): less than one block
LARGE = (4, 64, 8, 64, 8)  # many blocks


@pytest.fixture
def built(monkeypatch):
    """The native kernel as if built for this CPU: the decisions only, nothing runs."""
    monkeypatch.setattr(native_attention, "build_reason", lambda: None)
    monkeypatch.delenv(native_attention.SWITCH, raising=False)


@pytest.fixture
def not_built(monkeypatch):
    monkeypatch.setattr(native_attention, "build_reason", lambda: "no C++ compiler found ($CXX, g++ or c++)")


def test_names_are_checked_on_the_layer_and_the_model():
    assert dispatch.IMPLEMENTATIONS == ("auto", "keras_ops", "blocked", "native")
    with pytest.raises(ValueError, match="attention must be one of"):
        AxialAttention(8, attention="nativ")
    with pytest.raises(ValueError, match="attention must be one of"):
        medt_keras.GatedAxialUNet(img_size=TINY_IMG_SIZE, attention="fast", **TINY)
    model = medt_keras.MedT(img_size=TINY_IMG_SIZE, patch_grid=1, attention="native", **TINY)
    layers = [layer for layer in model._flatten_layers() if isinstance(layer, AxialAttention)]
    assert layers and {layer.attention for layer in layers} == {"native"}
    assert model.get_config()["attention"] == "native"


def test_named_implementations_run_as_named(built):
    for shape in (SMALL, LARGE):
        for training in (False, True):
            assert dispatch.choose("keras_ops", shape, "float32", training=training) == "keras_ops"
            assert dispatch.choose("blocked", shape, "float64", training=training) == "blocked"
            if ON_ONE_CPU:
                assert dispatch.choose("native", shape, "float32", training=training) == "native"


@pytest.mark.skipif(not ON_ONE_CPU, reason="the native kernel's decisions on one CPU device")
def test_a_named_native_kernel_that_cannot_run_says_why(built):
    cases = [
        ((1, 2, 2, 64, 2), "float64", None, "float32"),
        ((1, 2, 2, 513, 2), "float32", None, "512"),
        ((1, 2, 2, 64, 65), "float32", None, "64 channels"),
        ((1, 2, 2, 64, 32), "float32", 65, "64 channels"),
    ]
    for shape, dtype, value_channels, reason in cases:
        assert dispatch.native_unavailable_reason(shape, dtype, value_channels) is not None
        with pytest.raises(KernelUnavailableError, match=reason):
            dispatch.choose("native", shape, dtype, value_channels)
        # "auto" falls back instead.
        assert dispatch.choose("auto", shape, dtype, value_channels) in ("blocked", "keras_ops")
    assert dispatch.native_unavailable_reason((1, 2, 2, 512, 64), "float32") is None


def test_a_named_native_kernel_that_is_not_built_says_why(not_built):
    with pytest.raises(KernelUnavailableError, match=r'attention="native" cannot run .* no C\+\+ compiler'):
        dispatch.choose("native", SMALL, "float32")


@pytest.mark.skipif(not ON_ONE_CPU, reason="auto's choice on one CPU device")
def test_auto_takes_native_then_blocked_where_it_pays_then_keras_ops(built, monkeypatch):
    assert dispatch.choose("auto", SMALL, "float32") == "native"
    assert dispatch.choose("auto", LARGE, "float32", training=True) == "native"
    # Float64 (parity) takes the JAX kernels: blocked from one block in training, above one in inference.
    monkeypatch.setattr(blocked_attention, "BLOCK_ELEMENTS", 2 * 4 * 3 * 5 * 5)
    for training in (True, False):
        assert dispatch.choose("auto", (2, 5, 3, 5, 1), "float64", training=training) == "blocked"  # 5 lines
        assert dispatch.choose("auto", (2, 3, 3, 5, 1), "float64", training=training) == "keras_ops"  # < 1 block
    assert dispatch.choose("auto", (2, 4, 3, 5, 1), "float64", training=True) == "blocked"  # exactly one block
    assert dispatch.choose("auto", (2, 4, 3, 5, 1), "float64", training=False) == "keras_ops"
    monkeypatch.undo()
    monkeypatch.setattr(native_attention, "build_reason", lambda: None)
    # The switches turn auto's native choice off, not a named kernel.
    monkeypatch.setenv(native_attention.SWITCH, "0")
    assert dispatch.choose("auto", LARGE, "float32", training=True) == "blocked"
    assert dispatch.choose("native", LARGE, "float32") == "native"
    monkeypatch.delenv(native_attention.SWITCH)
    with native_attention.turned_off():
        assert dispatch.choose("auto", SMALL, "float32") == "keras_ops"
        assert dispatch.choose("native", SMALL, "float32") == "native"
    assert dispatch.choose("auto", SMALL, "float32") == "native"


def test_a_layer_named_native_raises_when_called_where_it_cannot_run(not_built):
    layer = AxialAttention(8, num_heads=2, span=8, attention="native")
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 8)).astype("float32")
    with pytest.raises(KernelUnavailableError, match="no C\\+\\+ compiler"):
        layer(x)
    # The same layer with auto runs (and is finite).
    auto = AxialAttention(8, num_heads=2, span=8)
    assert np.all(np.isfinite(np.asarray(auto(x))))


def _training_gradient(attention):
    """A gated positional ``AxialAttention`` layer's training gradient, as a function of the input, and an input."""
    layer = AxialAttention(16, num_heads=2, span=16, gated=True, gates_trainable=True, attention=attention)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 8)).astype("float32")
    layer.build(x.shape)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def gradient(inputs):
        def loss(weights, inputs):
            out, _ = layer.stateless_call(weights, non_trainable, inputs, training=True)
            return (out ** 2).mean()

        return jax.grad(loss, argnums=(0, 1))(trainable, inputs)

    return jax.jit(gradient), x


@pytest.mark.skipif(not ON_ONE_CPU, reason="auto takes a CPU kernel on one CPU device")
def test_auto_chooses_by_the_platform_a_program_is_lowered_for():
    # From this CPU host: lowered for a TPU or a GPU (a compile for another target,
    # jax.export for serving) "auto" takes keras_ops; for the CPU, the CPU kernel, whose
    # compiled program then holds no conditional.
    from jax import export

    native = native_attention.build_reason() is None
    gradient, x = _training_gradient("auto")
    for platform in ("tpu", "cuda"):
        module = export.export(gradient, platforms=[platform])(x).mlir_module()
        assert "medt_native_attention" not in module
        assert "while" not in module or not native  # no blocked kernel's loops either (native: none at all)
    lowered = gradient.lower(x)
    if native:
        assert "medt_native_attention" in lowered.as_text()
    compiled = lowered.compile().as_text()
    assert "conditional(" not in compiled
    # The same compiled CPU program as the kernel named directly.
    named, _ = _training_gradient("native" if native else "blocked")
    expected = named.lower(x).compile().as_text()
    count = lambda text, op: text.count(f" {op}(")  # noqa: E731
    for op in ("custom-call", "fusion", "while", "dot", "convolution"):
        assert count(compiled, op) == count(expected, op), op
    # A named native kernel does not fall back: a TPU program cannot hold it.
    if native:
        named_native, _ = _training_gradient("native")
        with pytest.raises(Exception, match="medt_native_attention|lowering|platform"):
            export.export(named_native, platforms=["tpu"])(x)
