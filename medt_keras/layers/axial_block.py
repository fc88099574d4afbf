"""The axial-attention residual block (Axial-DeepLab's bottleneck, as in MedT)."""

import keras
from keras import ops

from medt_keras.initializers import FanInUniform
from medt_keras.layers.axial_attention import AxialAttention
from medt_keras.layers.batch_norm import BatchNorm


@keras.saving.register_keras_serializable(package="medt_keras")
class AxialBlock(keras.layers.Layer):
    """Residual block with height then width axial attention (expansion 2).

    ``out = relu(BN(conv_up(relu(W(H(relu(BN(conv_down(x)))))))) + shortcut(x))``
    where ``H`` and ``W`` are ``AxialAttention`` along height and width (no
    activation between them), the 1x1 ``conv_down`` maps to ``filters``
    channels, the 1x1 ``conv_up`` to ``2 * filters``, and the shortcut is a
    strided 1x1 convolution plus BatchNorm when the stride or the channel
    count changes (identity otherwise). Only the width attention carries the
    stride, as average pooling after attention.

    Args:
        filters: bottleneck width (the official ``planes``); the block
            outputs ``2 * filters`` channels.
        num_heads: heads of both attention layers.
        span: attention span of both layers (see ``AxialAttention``).
        strides: spatial downsampling factor.
        positional_encoding, gated, gates_trainable: passed to both
            attention layers; ``gated`` is MedT's gated axial attention.
        batch_groups: see ``BatchNorm``.
        rematerialize: passed to both attention layers (see
            ``AxialAttention``): recompute their attention maps in the
            backward pass instead of storing them.
        attention: passed to both attention layers: "auto", "keras_ops" or
            "blocked" (see ``AxialAttention``).

    Input shape: ``(batch, height, width, channels)``.
    Output shape: ``(batch, height // strides, width // strides, 2 * filters)``.
    """

    expansion = 2

    def __init__(
        self,
        filters,
        num_heads=8,
        span=None,
        strides=1,
        positional_encoding=True,
        gated=False,
        gates_trainable=False,
        batch_groups=1,
        rematerialize=False,
        attention="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.num_heads = int(num_heads)
        self.span = None if span is None else int(span)
        self.strides = int(strides)
        self.positional_encoding = bool(positional_encoding)
        self.gated = bool(gated)
        self.gates_trainable = bool(gates_trainable)
        self.batch_groups = int(batch_groups)
        self.rematerialize = bool(rematerialize)
        self.attention = attention
        out_channels = self.expansion * self.filters
        common = dict(dtype=self.dtype_policy)
        norm = dict(batch_groups=self.batch_groups, **common)
        attention = dict(
            num_heads=self.num_heads,
            span=self.span,
            positional_encoding=self.positional_encoding,
            gated=self.gated,
            gates_trainable=self.gates_trainable,
            batch_groups=self.batch_groups,
            rematerialize=self.rematerialize,
            attention=self.attention,
            **common,
        )
        conv = dict(use_bias=False, kernel_initializer=FanInUniform(), **common)
        self.reduce_conv = keras.layers.Conv2D(self.filters, 1, name="reduce_conv", **conv)
        self.reduce_norm = BatchNorm(name="reduce_norm", **norm)
        self.height_attention = AxialAttention(
            self.filters, axis="height", name="height_attention", **attention
        )
        self.width_attention = AxialAttention(
            self.filters, axis="width", strides=self.strides, name="width_attention", **attention
        )
        self.expand_conv = keras.layers.Conv2D(out_channels, 1, name="expand_conv", **conv)
        self.expand_norm = BatchNorm(name="expand_norm", **norm)

    def build(self, input_shape):
        batch, height, width, channels = input_shape
        out_channels = self.expansion * self.filters
        self.has_shortcut_projection = self.strides != 1 or channels != out_channels
        self.reduce_conv.build(input_shape)
        inner = (batch, height, width, self.filters)
        self.reduce_norm.build(inner)
        self.height_attention.build(inner)
        self.width_attention.build(inner)
        pooled = self.width_attention.compute_output_shape(inner)
        self.expand_conv.build(pooled)
        self.expand_norm.build(pooled[:3] + (out_channels,))
        if self.has_shortcut_projection:
            self.shortcut_conv = keras.layers.Conv2D(
                out_channels,
                1,
                strides=self.strides,
                use_bias=False,
                kernel_initializer=FanInUniform(),
                name="shortcut_conv",
                dtype=self.dtype_policy,
            )
            self.shortcut_norm = BatchNorm(
                batch_groups=self.batch_groups, name="shortcut_norm", dtype=self.dtype_policy
            )
            self.shortcut_conv.build(input_shape)
            self.shortcut_norm.build(pooled[:3] + (out_channels,))

    def call(self, inputs, training=False):
        x = self.reduce_conv(inputs)
        x = ops.relu(self.reduce_norm(x, training=training))
        x = self.height_attention(x, training=training)
        x = ops.relu(self.width_attention(x, training=training))
        x = self.expand_norm(self.expand_conv(x), training=training)
        shortcut = inputs
        if self.has_shortcut_projection:
            shortcut = self.shortcut_norm(self.shortcut_conv(inputs), training=training)
        return ops.relu(x + shortcut)

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        s = self.strides
        return (
            batch,
            None if height is None else height // s,
            None if width is None else width // s,
            self.expansion * self.filters,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "num_heads": self.num_heads,
                "span": self.span,
                "strides": self.strides,
                "positional_encoding": self.positional_encoding,
                "gated": self.gated,
                "gates_trainable": self.gates_trainable,
                "batch_groups": self.batch_groups,
                "rematerialize": self.rematerialize,
                "attention": self.attention,
            }
        )
        return config
