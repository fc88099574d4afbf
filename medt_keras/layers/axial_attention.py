"""Axial self-attention along the height or width of a feature map."""

import functools
import math

import keras
from keras import ops

from medt_keras.initializers import Normal
from medt_keras.kernels import dispatch
from medt_keras.layers import _attention_ops as attention_ops
from medt_keras.layers.batch_norm import BatchNorm

_AXES = ("height", "width")

# The implementations of the softmax attention ``AxialAttention`` chooses
# from (its ``attention`` argument).
ATTENTION_IMPLEMENTATIONS = dispatch.IMPLEMENTATIONS


@keras.saving.register_keras_serializable(package="medt_keras")
class AxialAttention(keras.layers.Layer):
    """Multi-head self-attention along one spatial axis (Axial-DeepLab / MedT).

    Every line of the feature map along ``axis`` (a column for "height", a
    row for "width") attends to itself. With ``G = num_heads`` heads of
    ``d = filters / G`` channels, queries and keys have ``d/2`` channels and
    values ``d``, from one 1x1 projection followed by BatchNorm.

    Three forms, the three of the official code:

    * ``positional_encoding=True`` (Axial-DeepLab, eq. 2 of the MedT paper):
      learned relative positional encodings ``r^q, r^k, r^v`` for query, key
      and value, shared by all heads, indexed by the offset ``i - j``::

          y_i = sum_j softmax_j(BN(q_i.k_j) + BN(q_i.r^q_ij) + BN(k_j.r^k_ji))
                     (BN'(v_j) + BN'(r^v_ij))

      where each BN is a per-head BatchNorm over that term (the official
      code normalises instead of scaling by 1/sqrt(d)), and BN' normalises
      the two value terms per output channel before they are summed.
    * ``gated=True`` as well (MedT's gated axial attention, eq. 3): the four
      positional terms are scaled by learned scalar gates before their
      BatchNorms: ``G_Q q.r^q``, ``G_K k.r^k``, ``G_V1 v`` and ``G_V2 r^v``
      (``gate_query_position``, ``gate_key_position``, ``gate_value``,
      ``gate_value_position``; initialised 0.1, 0.1, 1.0, 0.1). As in the
      official code they are frozen unless ``gates_trainable=True``; the
      official train.py unfreezes them after epoch 10.
    * ``positional_encoding=False`` (MedT's local branch): only
      ``softmax(BN(q.k)) v``, then BatchNorm; works for any length.

    With ``strides > 1`` the output is average-pooled by ``strides`` over
    height and width, as the official code does after its width pass.

    Args:
        filters: output channels, divisible by ``num_heads``, with an even
            number of channels per head.
        num_heads: attention heads (the official ``groups``).
        span: length of the attended axis; positional encodings have
            ``2 * span - 1`` offsets and the input length must equal it.
            Ignored without positional encodings. Defaults to the input's
            length along ``axis`` at build time.
        axis: "height" or "width".
        strides: average-pooling factor applied after attention.
        batch_groups: see ``BatchNorm``; used by MedT's local branch.
        rematerialize: in training, keep only this layer's input for the
            backward pass and recompute its attention maps there
            (``keras.remat``): less memory for larger images, at the cost of
            a second forward pass of the layer. The same computation: equal in
            float64, float32 rounding may differ. (Keras'
            ``RematScope`` cannot wrap this layer: its BatchNorms update
            variables, which a rematerialised function may not; this option
            rematerialises the computation and applies the updates outside.)
            On CPU the training program needs an XLA option to save memory
            by it (``medt_keras.compiler.REMATERIALIZATION_OPTIONS``), which
            the models' training functions carry; in a model of your own,
            jit with ``compiler.jit(fun, "training", rematerialize=True)``.
        attention: how the softmax attention is computed, the same
            function either way (equal in float64): ``"auto"`` (default:
            the fastest that runs here), ``"keras_ops"`` (whole-tensor
            ``keras.ops``, any backend and platform), ``"blocked"`` (the
            pure-JAX kernel ``medt_keras.kernels.blocked_attention``) or
            ``"native"`` (the native CPU kernel
            ``medt_keras.kernels.native_attention``).
            ``medt_keras.kernels.dispatch`` says which ``"auto"`` takes
            where; a named kernel that cannot run the layer raises
            ``medt_keras.errors.KernelUnavailableError`` saying why.

    Numerics: when the compute dtype is float16 or bfloat16 (a
    ``mixed_*`` policy), both implementations compute the logits, the
    softmax, its normaliser and the weighted sums in float32 from the
    low-precision queries, keys and values, and every BatchNorm takes its
    statistics in float32; the layer's output is in the compute dtype.

    Input shape: ``(batch, height, width, channels)``.
    Output shape: ``(batch, height // strides, width // strides, filters)``.
    """

    def __init__(
        self,
        filters,
        num_heads=8,
        span=None,
        axis="height",
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
        dispatch.check_name(attention)
        if axis not in _AXES:
            raise ValueError(f"axis must be one of {_AXES}, got {axis!r}.")
        if filters % num_heads:
            raise ValueError(f"filters ({filters}) must be divisible by num_heads ({num_heads}).")
        head_channels = filters // num_heads
        if head_channels % 2:
            raise ValueError(
                f"filters / num_heads = {head_channels} channels per head must be even "
                "(queries and keys get half of them each)."
            )
        if gated and not positional_encoding:
            raise ValueError("gated=True needs positional_encoding=True: the gates scale the positional terms.")
        self.filters = int(filters)
        self.num_heads = int(num_heads)
        self.span = None if span is None else int(span)
        self.axis = axis
        self.strides = int(strides)
        self.positional_encoding = bool(positional_encoding)
        self.gated = bool(gated)
        self.gates_trainable = bool(gates_trainable)
        self.batch_groups = int(batch_groups)
        self.rematerialize = bool(rematerialize)
        self.attention = attention
        self.head_channels = head_channels

        norm_kwargs = dict(batch_groups=self.batch_groups, dtype=self.dtype_policy)
        terms = 3 if self.positional_encoding else 1
        # Channels of the stacked similarity are (term, head): qk, qr, kr.
        self.qkv_norm = BatchNorm(axis=-1, name="qkv_norm", **norm_kwargs)
        self.similarity_norm = BatchNorm(
            axis=(2, 3) if terms > 1 else 2, name="similarity_norm", **norm_kwargs
        )
        # Output channels are (channel, term) with term 0 = s.v, 1 = s.r^v:
        # the official code interleaves them the same way.
        self.output_norm = BatchNorm(
            axis=(-2, -1) if self.positional_encoding else -1, name="output_norm", **norm_kwargs
        )

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"{self.name} expects (batch, height, width, channels), got shape {input_shape}."
            )
        _, height, width, channels = input_shape
        length = height if self.axis == "height" else width
        if self.span is None:
            self.span = length
        if self.positional_encoding and length is not None and length != self.span:
            raise ValueError(
                f"{self.name}: input {self.axis} is {length} but the positional encodings "
                f"span {self.span} positions; the two must be equal."
            )
        d = self.head_channels
        self.qkv_kernel = self.add_weight(
            name="qkv_kernel",
            shape=(channels, 2 * self.filters),
            initializer=Normal(math.sqrt(1.0 / channels)),
        )
        if self.positional_encoding:
            # Rows are offsets i - j + span - 1; columns are the query (d/2),
            # key (d/2) and value (d) encodings.
            self.relative_embedding = self.add_weight(
                name="relative_embedding",
                shape=(2 * self.span - 1, 2 * d),
                initializer=Normal(math.sqrt(1.0 / d)),
            )
        if self.gated:
            for name, value in (
                ("gate_query_position", 0.1),
                ("gate_key_position", 0.1),
                ("gate_value", 1.0),
                ("gate_value_position", 0.1),
            ):
                setattr(
                    self,
                    name,
                    self.add_weight(
                        name=name,
                        shape=(),
                        initializer=keras.initializers.Constant(value),
                        trainable=self.gates_trainable,
                    ),
                )
        lines = (None, None, length, 2 * self.filters)
        self.qkv_norm.build(lines)
        terms = 3 if self.positional_encoding else 1
        sim_shape = (None, None, terms, self.num_heads, length, length)
        if terms == 1:
            sim_shape = (None, None, self.num_heads, length, length)
        self.similarity_norm.build(sim_shape)
        if self.positional_encoding:
            self.output_norm.build((None, None, length, self.filters, 2))
        else:
            self.output_norm.build((None, None, length, self.filters))

    def call(self, inputs, training=False):
        if not training:
            return self._forward(inputs, training=False)[0]
        forward = functools.partial(self._forward, training=True)
        if self.rematerialize:
            # Recompute the attention maps in the backward pass instead of
            # keeping them; the moving statistics are updated out here
            # because a rematerialised function cannot assign variables.
            forward = keras.remat(forward)
        out, statistics = forward(inputs)
        for norm, (mean, variance) in zip(self._norms(), statistics):
            norm.update_moving_statistics(mean, variance)
        return out

    def _norms(self):
        return (self.qkv_norm, self.similarity_norm, self.output_norm)

    def _forward(self, inputs, training):
        """The attention as a pure function: ``(outputs, batch statistics)``.

        In training, ``batch statistics`` holds ``(group_mean,
        group_variance)`` for each of ``_norms()``, in that order; in
        inference it is empty and the moving statistics are used.
        """
        x = inputs
        if self.axis == "height":
            # Lines are columns: (batch, width, height, channels).
            x = ops.transpose(x, (0, 2, 1, 3))
        batch, lines, length = ops.shape(x)[:3]
        heads, d = self.num_heads, self.head_channels
        half = d // 2
        statistics = []

        work = self._work_dtype
        qkv = ops.matmul(x, ops.cast(self.qkv_kernel, self.compute_dtype))
        if training:
            qkv, mean, variance = self.qkv_norm.normalize_batch(qkv)
            statistics.append((mean, variance))
        else:
            qkv = self.qkv_norm(qkv, training=False)
        # From here to the output BatchNorm in the working dtype: float32
        # under a float16/bfloat16 policy (see the class docstring).
        qkv = ops.cast(qkv, work)
        qkv = ops.reshape(qkv, (batch, lines, length, heads, 2 * d))
        # Heads before positions, (n, b, G, L, c): the batch axes of every
        # product below lead, in the order of the (n, b, G, L, L) maps.
        q, k, v = (attention_ops.swap_heads_and_positions(t) for t in (qkv[..., :half], qkv[..., half:d], qkv[..., d:]))

        tables = None
        if self.positional_encoding:
            table = ops.cast(attention_ops.relative_table(self.relative_embedding, length, self.span), work)
            tables = table[..., :half], table[..., half:d], table[..., d:]
        # The similarity BatchNorm and the gates scale each term; the scales
        # go into the query (q.k, q.r^q) or key (k.r^k) before the products.
        # Its shifts are constant along the attended axis and cancel in the
        # softmax, so they are left out.
        if training:
            scales, mean, variance = self._similarity_scales_training(q, k, tables)
            statistics.append((mean, variance))
        else:
            scales = self._similarity_scales_inference()
        positional = None
        if self.positional_encoding:
            positional = (q * scales[1], k * scales[2]) + tables
        outputs = self._attend(q * scales[0], k, v, positional, training)

        def to_channels(y):  # (n, b, G, L, c) -> (n, b, L, filters)
            return ops.reshape(attention_ops.swap_heads_and_positions(y), (batch, lines, length, self.filters))

        terms = [to_channels(y) for y in outputs]
        if self.gated:
            terms[0] = terms[0] * self._gate(self.gate_value)
            terms[1] = terms[1] * self._gate(self.gate_value_position)
        # Output: the per-(channel, term) BatchNorm of s.v and s.r^v, summed.
        if training:
            stacked = ops.stack(terms, axis=-1) if len(terms) > 1 else terms[0]
            out, mean, variance = self.output_norm.normalize_batch(stacked)
            if len(terms) > 1:
                out = ops.sum(out, axis=-1)
            out = ops.cast(out, self.compute_dtype)
            statistics.append((mean, variance))
        else:
            out = ops.cast(self._normalized_output_inference(terms), self.compute_dtype)

        if self.axis == "height":
            out = ops.transpose(out, (0, 2, 1, 3))
        if self.strides > 1:
            out = ops.average_pool(
                out, pool_size=self.strides, strides=self.strides, padding="valid"
            )
        return out, statistics

    @property
    def _work_dtype(self):
        # The dtype of the attention itself: at least float32. A softmax
        # over up to hundreds of logits in bfloat16 (8 significant bits)
        # rounds its normaliser and weights by up to 2^-8 each; see
        # tests/models/test_mixed_precision.py for what that does to MedT.
        if self.compute_dtype in ("float16", "bfloat16"):
            return "float32"
        return self.compute_dtype

    def _gate(self, gate, dtype=None):
        return ops.cast(gate, dtype or self._work_dtype)

    def _attend(self, q, k, v, positional, training):
        """Softmax attention along L: ``(y,)``, or ``(y, y_position)`` with positional encodings.

        ``q``, ``k`` ``(n, b, G, L, c)`` and ``v`` ``(n, b, G, L, d)``, with
        the similarity scales already in ``q``; ``positional`` is ``None`` or
        ``(q_position, k_position, q_table, k_table, v_table)``, the scaled
        query and key of the positional terms and the ``(L, L, .)`` tables::

            s_ij = q_i.k_j + q_position_i.q_table_ij + k_position_j.k_table_ji
            y_i = sum_j softmax_j(s_ij) v_j
            y_position_i = sum_j softmax_j(s_ij) v_table_ij

        Each output ``(n, b, G, L, d)``. ``medt_keras.kernels.native_attention``
        (float32 on one CPU device, see ``attention="auto"``),
        ``medt_keras.kernels.blocked_attention`` (a block of lines at a
        time, so the maps stay in cache and are never stored for the
        backward pass) or ``attention_ops.softmax_attention`` in
        ``keras.ops``, which the kernels' tests check them against, as the
        ``attention`` argument chooses.
        """
        implementation = dispatch.choose(self.attention, q.shape, q.dtype, v.shape[-1], training=bool(training))
        # Inference writes the logits as broadcast sums (see
        # attention_ops.BROADCAST_CHANNELS); training keeps the einsums, whose
        # backward pass is the faster one.
        keras_ops = functools.partial(attention_ops.softmax_attention, broadcast=not training)
        if implementation == "keras_ops":
            return keras_ops(q, k, v, positional)
        if implementation == "native":
            from medt_keras.kernels.native_attention import attention as kernel
        else:
            from medt_keras.kernels.blocked_attention import blocked_attention as kernel
        if self.attention == "auto":
            # A CPU kernel, for programs lowered for the CPU only (a TPU compile from this host takes keras_ops).
            return dispatch.by_lowering_platform(kernel, keras_ops, q, k, v, positional)
        return kernel(q, k, v, positional)

    def _term_gates(self, dtype):
        # The gates G_Q, G_K of the positional similarity terms (eq. 3).
        if not self.gated:
            return [None] * 3
        return [None, self._gate(self.gate_query_position, dtype), self._gate(self.gate_key_position, dtype)]

    def _similarity_scales_inference(self):
        """The similarity BatchNorm's scales times the gates, one ``(1, 1, G, 1, 1)`` per term."""
        scale, _ = self.similarity_norm.inference_affine()
        scale = ops.reshape(ops.cast(scale, self._work_dtype), (-1, self.num_heads))
        return attention_ops.term_scales(scale, self._term_gates(self._work_dtype), 1, self.num_heads, self._work_dtype)

    def _similarity_scales_training(self, q, k, tables):
        """The similarity BatchNorm in training, without materialising the terms.

        Its batch statistics come from ``attention_ops.similarity_statistics``
        (sums and ``c x c`` outer products, never the ``(n, b, G, L, L)``
        maps). BatchNorm is then affine per (group, term, head), and its
        scale is folded into the query or key before the one product per
        term (``_attend``): the three maps are added as they are made, and
        the stacked similarity (three maps, plus the BatchNorm's copies of
        it, in the backward pass too) is never built.

        Returns ``(scales, group_mean, group_variance)``: one
        ``(n, 1, G, 1, 1)`` scale per term (the BatchNorm's times the
        gate), statistics ``(batch_groups, terms, G)`` (or
        ``(batch_groups, G)`` with one term) for the moving averages.
        """
        norm = self.similarity_norm
        stat_dtype = norm.variable_dtype
        gates = self._term_gates(stat_dtype)
        qs, ks = ops.cast(q, stat_dtype), ops.cast(k, stat_dtype)
        if tables is not None:
            tables = tuple(ops.cast(t, stat_dtype) for t in tables[:2])
        mean, variance, count = attention_ops.similarity_statistics(qs, ks, tables, gates, self.batch_groups)
        terms = ops.shape(mean)[1]
        gamma = ops.reshape(ops.cast(norm.gamma, stat_dtype), (terms, self.num_heads))
        scale = gamma * ops.rsqrt(variance + norm.epsilon)  # (groups, terms, G)
        scales = attention_ops.term_scales(scale, gates, ops.shape(q)[0], self.num_heads, self._work_dtype)
        param_shape = tuple(norm.moving_mean.shape)
        mean = ops.reshape(mean, (self.batch_groups,) + param_shape)
        variance = ops.reshape(norm.moving_variance_estimate(variance, count), (self.batch_groups,) + param_shape)
        return scales, mean, variance

    def _normalized_output_inference(self, terms):
        """``sum_t BN(stack(terms))[.., t]`` in inference (``attention_ops.folded_output_norm``)."""
        scale, shift = self.output_norm.inference_affine()
        return attention_ops.folded_output_norm(terms, scale, shift, self._work_dtype)

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        s = self.strides
        return (
            batch,
            None if height is None else height // s,
            None if width is None else width // s,
            self.filters,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "num_heads": self.num_heads,
                "span": self.span,
                "axis": self.axis,
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
