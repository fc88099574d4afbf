"""A 2-D convolution that computes images smaller than its window as one matrix product."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="medt_keras")
class PatchProductConv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` that multiplies patches where the image is smaller than the window.

    The same layer, weights and results as ``keras.layers.Conv2D``
    (``kernel`` ``(kernel_height, kernel_width, in_channels, filters)``,
    optional ``bias`` ``(filters,)``); only how the product is computed
    differs. Where the output is smaller than the kernel along both spatial
    axes (the 3x3 convolutions of the deepest decoders, on 2x2 and 1x1
    feature maps), most of each window lies in the zero padding, and XLA's
    CPU convolution of such shapes takes a slow generic path: gathering the
    ``kernel_height * kernel_width`` shifted views of the padded input into
    patches and multiplying them by the kernel as one matrix is several
    times faster (timings in docs/performance.md):

        y[n, i, j, o] = sum_{a, b, c} x_pad[n, i*s + a, j*s + b, c] w[a, b, c, o]
                      = (patches @ reshape(w, (a*b*c, o)))[n, i, j, o]

    The patches hold ``kernel_height * kernel_width`` copies of an input
    that small, so they cost no memory worth counting. Larger images, dilated kernels and
    ``channels_first`` use ``keras.ops.conv`` as the parent class does.

    Input shape: ``(batch, height, width, channels)``.
    Output shape: ``(batch, out_height, out_width, filters)``.
    """

    def convolution_op(self, inputs, kernel):
        if not self._patches_are_faster(inputs.shape):
            return super().convolution_op(inputs, kernel)
        _, height, width, channels = inputs.shape
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        (top, bottom), out_height = _padding(height, kh, sh, self.padding)
        (left, right), out_width = _padding(width, kw, sw, self.padding)
        padded = ops.pad(inputs, ((0, 0), (top, bottom), (left, right), (0, 0)))
        views = [
            padded[:, a : a + sh * (out_height - 1) + 1 : sh, b : b + sw * (out_width - 1) + 1 : sw, :]
            for a in range(kh)
            for b in range(kw)
        ]
        # Channel order (a, b, c) matches the kernel's row-major reshape.
        patches = ops.concatenate(views, axis=-1)
        return ops.matmul(patches, ops.reshape(kernel, (kh * kw * channels, self.filters)))

    def _patches_are_faster(self, input_shape):
        if self.data_format != "channels_last" or tuple(self.dilation_rate) != (1, 1):
            return False
        if self.groups != 1 or any(d is None for d in input_shape[1:]):
            return False
        for size, k, s in zip(input_shape[1:3], self.kernel_size, self.strides):
            if _padding(size, k, s, self.padding)[1] >= k:
                return False
        return True


@keras.saving.register_keras_serializable(package="medt_keras", name="Conv2D")
class Conv2D(PatchProductConv2D):
    """``PatchProductConv2D`` under its old name, for ``.keras`` files saved before the rename.

    The layer was ``medt_keras.layers.Conv2D`` (registered as
    ``"medt_keras>Conv2D"``), which shadowed ``keras.layers.Conv2D``. A
    ``.keras`` file names a layer's class in its config and keeps its weights
    under the snake-cased Python class name (``layers/conv2d``); this
    subclass matches both, so old files load with their weights. It is not
    exported from ``medt_keras.layers``; new models use
    ``PatchProductConv2D``. Old ``.weights.h5`` files, which hold no config,
    are mapped by ``medt_keras.loading`` instead.
    """


def _padding(size, kernel, stride, mode):
    """``((before, after), output_size)`` along one axis, as ``keras.ops.conv`` pads."""
    if mode == "valid":
        return (0, 0), (size - kernel) // stride + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2), out
