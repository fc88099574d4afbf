"""Batch normalisation with PyTorch's semantics and per-group batch statistics."""

import math

import keras
from keras import ops


def _normalize_groups(x, gamma, beta, reduce_axes, count, epsilon):
    """Training-mode normalisation of grouped ``x`` with its backward pass written out.

    ``x``: ``(batch / groups, groups, ...)``; ``gamma``, ``beta``: the
    parameters broadcast to its rank; statistics over ``reduce_axes``
    (``count`` values each). Returns ``(out, mean, variance)``, the
    statistics with ``keepdims``. The backward pass is the closed form
    ``dx = gamma / std * (dy - mean(dy) - x_hat * mean(dy * x_hat))``: two
    sums and one elementwise pass over the activations, where automatic
    differentiation of the forward pass (through the centring and the
    variance) takes more (MedT's training step about 4% faster). Only the
    gradient of ``out`` is supported: the caller stops the statistics'.
    """

    @ops.custom_gradient
    def normalize(x, gamma, beta):
        # sum / count, not ops.mean: Keras' JAX mean accumulates float64 in
        # float32, which alone breaks float64 parity.
        mean = ops.sum(x, axis=reduce_axes, keepdims=True) / count
        centered = x - mean
        variance = ops.sum(ops.square(centered), axis=reduce_axes, keepdims=True) / count
        inverse_std = ops.rsqrt(variance + epsilon)
        out = centered * inverse_std * gamma + beta

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            d_out = upstream[0]
            normalized = centered * inverse_std
            d_shift = ops.sum(d_out, axis=reduce_axes, keepdims=True)
            d_scale = ops.sum(d_out * normalized, axis=reduce_axes, keepdims=True)
            d_x = (gamma * inverse_std) * (d_out - (d_shift + normalized * d_scale) / count)
            # gamma and beta are shared by the groups (axis 1).
            return d_x, ops.sum(d_scale, axis=1, keepdims=True), ops.sum(d_shift, axis=1, keepdims=True)

        return (out, mean, variance), grad

    return normalize(x, gamma, beta)


@keras.saving.register_keras_serializable(package="medt_keras")
class BatchNorm(keras.layers.Layer):
    """Batch normalisation as ``torch.nn.BatchNorm{1,2}d`` computes it.

    Differences from ``keras.layers.BatchNormalization``, each needed for
    parity with the official MedT code:

    * ``epsilon`` defaults to 1e-5 (PyTorch's), not 1e-3. MedT's gates act
      only through this epsilon, so it must be exact.
    * The moving variance is updated with the *unbiased* batch variance
      (``n / (n - 1)`` times the biased one), as PyTorch does; the
      normalisation itself uses the biased variance.
    * ``axis`` may name several axes, e.g. ``(2, 3)`` for a tensor whose
      channels are laid out as (term, head); the parameters then have the
      shape of those axes.
    * ``batch_groups``: in training the batch is split into this many
      interleaved groups along axis 0, item ``i`` in group ``i %
      batch_groups``, each normalised with its own statistics, and the
      moving statistics are updated once per group, in group order. This is
      what running the layer once per group does, and is how MedT's local
      branch (one call per image patch) is reproduced with all patches
      folded into the batch, each image's patches contiguous
      (``PatchFold``). Interleaved, not consecutive, groups keep a batch
      sharded over devices sharded: each device holds whole images, and the
      statistics are one cross-device sum.
    * ``num_batches_tracked`` counts updates as PyTorch does, so converted
      checkpoints round-trip exactly.

    ``momentum`` follows the Keras convention (PyTorch's 0.1 is 0.9 here):
    ``moving = momentum * moving + (1 - momentum) * batch_statistic``.

    Input: any tensor whose axis 0 is the batch; output: the same shape.
    Implements ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``.
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.9,
        epsilon=1e-5,
        batch_groups=1,
        unbiased_moving_variance=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.axis = tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.batch_groups = int(batch_groups)
        self.unbiased_moving_variance = bool(unbiased_moving_variance)
        if self.batch_groups < 1:
            raise ValueError(f"batch_groups must be >= 1, got {batch_groups}.")

    def build(self, input_shape):
        rank = len(input_shape)
        axes = sorted(a % rank for a in self.axis)
        if 0 in axes:
            raise ValueError(f"{self.name}: axis 0 is the batch axis and cannot be a channel axis.")
        for a in axes:
            if input_shape[a] is None:
                raise ValueError(
                    f"{self.name}: channel axis {a} of input shape {input_shape} must be known."
                )
        self._channel_axes = tuple(axes)
        self._rank = rank
        param_shape = tuple(input_shape[a] for a in axes)
        self.gamma = self.add_weight(name="gamma", shape=param_shape, initializer="ones")
        self.beta = self.add_weight(name="beta", shape=param_shape, initializer="zeros")
        self.moving_mean = self.add_weight(
            name="moving_mean", shape=param_shape, initializer="zeros", trainable=False
        )
        self.moving_variance = self.add_weight(
            name="moving_variance", shape=param_shape, initializer="ones", trainable=False
        )
        self.num_batches_tracked = self.add_weight(
            name="num_batches_tracked",
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            autocast=False,
        )

    def _broadcast_shape(self, rank, offset=0):
        # Parameter shape broadcast against a tensor of `rank` dims whose
        # channel axes are shifted by `offset` (1 for the grouped view).
        shape = [1] * rank
        for a, size in zip(self._channel_axes, self.gamma.shape):
            shape[a + offset] = size
        return shape

    def _param(self, variable, rank, offset=0):
        return ops.reshape(ops.cast(variable, self._stat_dtype), self._broadcast_shape(rank, offset))

    @property
    def _stat_dtype(self):
        # Statistics in the variable dtype (float32 under mixed precision,
        # float64 in a float64 model), never in float16/bfloat16.
        return self.variable_dtype

    def inference_affine(self):
        """``(scale, shift)`` with ``BN(x) = x * scale + shift`` in inference, in the parameter shape.

        Lets a caller fold this normalisation into neighbouring arithmetic
        (e.g. a sum of normalised terms) instead of materialising its input.
        """
        scale = ops.cast(self.gamma, self._stat_dtype) * ops.rsqrt(
            ops.cast(self.moving_variance, self._stat_dtype) + self.epsilon
        )
        shift = ops.cast(self.beta, self._stat_dtype) - ops.cast(self.moving_mean, self._stat_dtype) * scale
        return scale, shift

    def call(self, inputs, training=False):
        x = ops.cast(inputs, self._stat_dtype)
        if not training:
            mean = self._param(self.moving_mean, self._rank)
            variance = self._param(self.moving_variance, self._rank)
            out = (x - mean) * ops.rsqrt(variance + self.epsilon)
            out = out * self._param(self.gamma, self._rank) + self._param(self.beta, self._rank)
            return ops.cast(out, self.compute_dtype)

        out, group_mean, group_variance = self.normalize_batch(x)
        self.update_moving_statistics(group_mean, group_variance)
        return ops.cast(out, self.compute_dtype)

    def normalize_batch(self, inputs):
        """Training-mode normalisation without touching the moving statistics.

        Returns ``(outputs, group_mean, group_variance)``: the normalised
        inputs (statistics dtype), and per batch group the mean and the
        variance that update the moving statistics (unbiased when
        ``unbiased_moving_variance``), each ``(batch_groups,) + parameter
        shape``. Splitting the update from the computation lets a caller
        rematerialise the computation (``keras.remat``), which cannot
        contain variable assignments, and apply the update outside it.
        """
        x = ops.cast(inputs, self._stat_dtype)
        groups = self.batch_groups
        full_shape = ops.shape(x)
        # (batch / groups, groups, ...): item i is grouped[i // groups, i % groups].
        grouped = ops.reshape(x, (-1, groups) + tuple(full_shape[1:]))
        # Grouped axis a + 1 is input axis a; reduce over all but the groups
        # and the channels.
        reduce_axes = (0,) + tuple(a + 1 for a in range(1, self._rank) if a not in self._channel_axes)
        count = math.prod(grouped.shape[a] for a in reduce_axes)
        out, mean, variance = _normalize_groups(
            grouped,
            self._param(self.gamma, self._rank + 1, 1),
            self._param(self.beta, self._rank + 1, 1),
            reduce_axes,
            count,
            self.epsilon,
        )
        # The statistics only feed the moving averages: no gradient.
        mean, variance = ops.stop_gradient(mean), ops.stop_gradient(variance)
        out = ops.reshape(out, full_shape)

        param_shape = tuple(self.moving_mean.shape)
        group_mean = ops.reshape(mean, (groups,) + param_shape)
        group_variance = ops.reshape(variance, (groups,) + param_shape)
        return out, group_mean, self.moving_variance_estimate(group_variance, count)

    def moving_variance_estimate(self, variance, count):
        """The variance the moving average takes from a biased batch ``variance`` over ``count`` values."""
        if self.unbiased_moving_variance:
            return variance * (count / max(count - 1, 1))
        return variance

    def update_moving_statistics(self, group_mean, group_variance):
        """Update the moving statistics with ``(batch_groups,) + parameter shape`` statistics.

        Equivalent to one PyTorch update per group, in group order.
        """
        groups = self.batch_groups
        param_shape = tuple(self.moving_mean.shape)
        # Sequential update over the groups, in closed form:
        # m_G = momentum**G * m_0 + sum_t (1 - momentum) * momentum**(G-1-t) * s_t
        m = self.momentum
        weights = [(1.0 - m) * m ** (groups - 1 - t) for t in range(groups)]
        weights = ops.reshape(
            ops.convert_to_tensor(weights, dtype=self._stat_dtype), (groups,) + (1,) * len(param_shape)
        )
        decay = m**groups
        self.moving_mean.assign(
            decay * ops.cast(self.moving_mean, self._stat_dtype)
            + ops.sum(weights * ops.cast(group_mean, self._stat_dtype), axis=0)
        )
        self.moving_variance.assign(
            decay * ops.cast(self.moving_variance, self._stat_dtype)
            + ops.sum(weights * ops.cast(group_variance, self._stat_dtype), axis=0)
        )
        self.num_batches_tracked.assign_add(ops.cast(groups, "int32"))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "axis": list(self.axis),
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "batch_groups": self.batch_groups,
                "unbiased_moving_variance": self.unbiased_moving_variance,
            }
        )
        return config
