"""The axial-attention U-Nets: AxialUNet and GatedAxialUNet.

The official ``ResAxialAttentionUNet`` (builders ``axialunet`` and
``gated``), and the encoder-decoder both it and MedT's local branch use.
"""

import keras

from medt_keras import compiler
from medt_keras.initializers import FanInUniform
from medt_keras.layers import AxialBlock, BatchNorm, PatchProductConv2D
from medt_keras.preprocessing import check_preprocessing

# The official channel widths before scaling by s (ResAxialAttentionUNet): the stem, stages 1-4 and
# decoders 1-5. MedT/LoGo, the converter (which reads s back from decoder1) and these builders share them.
STEM_WIDTH = 64
STAGE_WIDTHS = (128, 256, 512, 1024)
DECODER_WIDTHS = (2048, 1024, 512, 256, 128)


class GraphBuilder:
    """Creates the model's layers with one dtype policy and the naming scheme.

    Layer names are what ``weights_converter.mapping`` translates into the
    official module names, e.g. ``local_stage2_block0`` <-> ``layer2_p.0``.
    """

    def __init__(self, dtype, prefix="", batch_groups=1):
        self.dtype = dtype
        self.prefix = prefix
        self.batch_groups = batch_groups

    def relu(self, x):
        return keras.layers.ReLU(dtype=self.dtype)(x)

    def add(self, a, b):
        return keras.layers.Add(dtype=self.dtype)([a, b])

    def upsample(self, x):
        # PyTorch's F.interpolate(scale_factor=2, mode="bilinear"),
        # align_corners=False: half-pixel centres, as Keras' bilinear resize.
        return keras.layers.UpSampling2D(2, interpolation="bilinear", dtype=self.dtype)(x)

    def conv(self, x, filters, kernel_size, name, strides=1, use_bias=True):
        # PyTorch pads (k - 1) / 2 on every side. Keras' "same" pads
        # asymmetrically when strided, so strided convolutions pad explicitly.
        padding = (kernel_size - 1) // 2
        if strides > 1 and padding:
            x = keras.layers.ZeroPadding2D(padding, dtype=self.dtype)(x)
            mode = "valid"
        else:
            mode = "same"
        return PatchProductConv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=mode,
            use_bias=use_bias,
            # PyTorch's default initialisation, which the official model keeps.
            kernel_initializer=FanInUniform(),
            bias_initializer=FanInUniform(fan_in=kernel_size * kernel_size * x.shape[-1]),
            name=self.prefix + name,
            dtype=self.dtype,
        )(x)

    def conv_norm_relu(self, x, filters, kernel_size, index, strides=1):
        x = self.conv(x, filters, kernel_size, f"stem_conv{index}", strides=strides, use_bias=False)
        x = BatchNorm(
            batch_groups=self.batch_groups, name=f"{self.prefix}stem_norm{index}", dtype=self.dtype
        )(x)
        return self.relu(x)

    def stem(self, x, width):
        """Conv 7x7/2, conv 3x3 to 128 channels, conv 3x3 back to ``width``."""
        x = self.conv_norm_relu(x, width, 7, 1, strides=2)
        x = self.conv_norm_relu(x, 128, 3, 2)
        return self.conv_norm_relu(x, width, 3, 3)

    def stage(self, x, index, filters, blocks, strides, block_config):
        for b in range(blocks):
            x = AxialBlock(
                filters,
                strides=strides if b == 0 else 1,
                batch_groups=self.batch_groups,
                name=f"{self.prefix}stage{index}_block{b}",
                dtype=self.dtype,
                **block_config,
            )(x)
        return x

    def decode(self, x, index, filters, skip=None, strides=1):
        """``relu(upsample(conv3x3(x))) + skip``, the official decoder step."""
        x = self.relu(self.upsample(self.conv(x, filters, 3, f"decoder{index}", strides=strides)))
        return x if skip is None else self.add(x, skip)


def check_blocks(blocks):
    blocks = tuple(int(b) for b in blocks)
    if len(blocks) != 4 or min(blocks) < 1:
        raise ValueError(f"blocks must be four positive block counts per stage, got {blocks}.")
    return blocks


def axial_unet_features(x, builder, width_scale, blocks, block_config, stem_width=None):
    """Stem, four axial stages and five decoders of ``ResAxialAttentionUNet``.

    Input ``(batch, H, W, C)``, output ``(batch, H, W, int(128 * s))`` with
    ``s = width_scale``; H and W must be divisible by 32.
    """
    s = width_scale
    x = builder.stem(x, int(STEM_WIDTH * s) if stem_width is None else stem_width)
    features = []
    for index, (width, count) in enumerate(zip(STAGE_WIDTHS, blocks), start=1):
        x = builder.stage(x, index, int(width * s), count, 1 if index == 1 else 2, block_config)
        features.append(x)
    x1, x2, x3, x4 = features
    d = DECODER_WIDTHS
    x = builder.decode(x4, 1, int(d[0] * s), skip=x4, strides=2)
    x = builder.decode(x, 2, int(d[1] * s), skip=x3)
    x = builder.decode(x, 3, int(d[2] * s), skip=x2)
    x = builder.decode(x, 4, int(d[3] * s), skip=x1)
    return builder.decode(x, 5, int(d[4] * s))


def image_size(img_size):
    """``img_size`` as the config keeps it: an int when square, else [height, width]."""
    if isinstance(img_size, (list, tuple)):
        height, width = (int(v) for v in img_size)
        return height if height == width else [height, width]
    return int(img_size)


def image_input(img_size, in_channels, dtype, multiple):
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    for size, axis in ((height, "height"), (width, "width")):
        if size % multiple:
            raise ValueError(f"img_size: {axis} {size} must be divisible by {multiple}.")
    compute_dtype = None if dtype is None else keras.dtype_policies.get(dtype).compute_dtype
    return keras.Input((height, width, in_channels), dtype=compute_dtype, name="image")


class OfficialModel(keras.Model):
    """Base of the four models: keeps the official builder's hyperparameters.

    Subclasses build their graph and pass it here with the hyperparameters,
    which become attributes and the model's config. ``preprocessing``
    (every model takes it) records what the model expects of its input
    images (channel order, normalisation; see ``medt_keras.preprocessing``),
    saved with the model so ``medt-predict`` needs no flags.
    """

    def __init__(self, inputs, outputs, hyperparameters, dtype=None, preprocessing=None, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, dtype=dtype, **kwargs)
        # A functional model keeps float32 as its own policy whatever its
        # layers use, so the policy the layers were built with is kept here
        # for the config (else a mixed_bfloat16 model reloads as float32).
        self._layers_policy = None if dtype is None else keras.dtype_policies.get(dtype).name
        self.hyperparameters = dict(hyperparameters)
        for key, value in self.hyperparameters.items():
            setattr(self, key, value)
        self.preprocessing = check_preprocessing(preprocessing)

    # Keras' functions for fit / evaluate / predict, each compiled with the
    # XLA options of its workload (medt_keras.compiler): per program, so a
    # user's own fit gets what medt-train gets and nothing else in the
    # process changes.
    def make_train_function(self, force=False):
        rematerialize = bool(self.hyperparameters.get("rematerialize"))
        with compiler.keras_jit_options("training", rematerialize=rematerialize):
            return super().make_train_function(force)

    def make_test_function(self, force=False):
        with compiler.keras_jit_options("inference"):
            return super().make_test_function(force)

    def make_predict_function(self, force=False):
        with compiler.keras_jit_options("inference"):
            return super().make_predict_function(force)

    def get_config(self):
        config = {"name": self.name, "trainable": self.trainable}
        config.update(self.hyperparameters)
        config["blocks"] = list(config["blocks"])
        config["dtype"] = self._layers_policy or self.dtype_policy.name
        if self.preprocessing is not None:
            config["preprocessing"] = dict(self.preprocessing)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("dtype"), dict):  # a serialized policy
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"]).name
        return cls(**config)


@keras.saving.register_keras_serializable(package="medt_keras")
class AxialUNet(OfficialModel):
    """Axial-attention U-Net (the official ``axialunet``).

    Stem (conv 7x7/2, two 3x3 convs), four stages of ``AxialBlock`` with
    relative positional encodings (strides 1, 2, 2, 2), five decoder
    convolutions with bilinear upsampling and additive skips, and a 1x1
    head. The attention span of each block is the feature size it sees
    (img_size / 2, / 4, / 8, / 16), as the official ``kernel_size``; the
    height and width attention layers each span their own axis, so
    non-square inputs work.

    Args:
        img_size: input size, an int (square, as the official code) or a
            (height, width) pair; each divisible by 32.
        in_channels: input channels (3 for BGR images, 1 for grayscale).
        num_classes: output channels (logits).
        width_scale: the official ``s``; channel widths scale with it.
        groups: attention heads per layer.
        blocks: residual blocks per stage (the official ``layers``).
        gates_trainable: for the gated models, whether the gates train.
        rematerialize: in training, recompute every attention layer's
            attention maps in the backward pass instead of storing them
            (less memory, about one more forward pass of the attention;
            the same computation up to rounding). See ``AxialAttention``.
        attention: the attention implementation of every attention layer:
            "auto" (the fastest that runs here), "keras_ops", "blocked" or
            "native" (see ``AxialAttention`` and
            ``medt_keras.kernels.dispatch``).
        dtype: dtype or policy of every layer ("float64" needs JAX x64).

    Input: ``(batch, height, width, in_channels)`` float.
    Output: logits ``(batch, height, width, num_classes)``.
    """

    gated = False

    def __init__(
        self,
        img_size=128,
        in_channels=3,
        num_classes=2,
        width_scale=0.125,
        groups=8,
        blocks=(1, 2, 4, 1),
        gates_trainable=False,
        rematerialize=False,
        attention="auto",
        dtype=None,
        **kwargs,
    ):
        blocks = check_blocks(blocks)
        img_size = image_size(img_size)
        inputs = image_input(img_size, in_channels, dtype, 32)
        builder = GraphBuilder(dtype)
        block_config = dict(
            num_heads=groups,
            positional_encoding=True,
            gated=self.gated,
            gates_trainable=gates_trainable,
            rematerialize=bool(rematerialize),
            attention=attention,
        )
        x = axial_unet_features(inputs, builder, width_scale, blocks, block_config)
        outputs = builder.conv(builder.relu(x), num_classes, 1, "head")
        hyperparameters = dict(
            img_size=img_size,
            in_channels=int(in_channels),
            num_classes=int(num_classes),
            width_scale=float(width_scale),
            groups=int(groups),
            blocks=blocks,
            gates_trainable=bool(gates_trainable),
            rematerialize=bool(rematerialize),
            attention=attention,
        )
        super().__init__(inputs, outputs, hyperparameters, dtype=dtype, **kwargs)


@keras.saving.register_keras_serializable(package="medt_keras")
class GatedAxialUNet(AxialUNet):
    """Gated axial-attention U-Net (the official ``gated``).

    ``AxialUNet`` with MedT's gated axial attention in every block; see
    ``AxialUNet`` for the arguments and shapes.
    """

    gated = True
