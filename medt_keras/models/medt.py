"""The Local-Global networks: MedT and LoGo (the official ``medt_net``)."""

import keras

from medt_keras.layers import PatchFold, PatchUnfold, UnusedOfficialWeights
from medt_keras.models.axial_unet import (
    DECODER_WIDTHS,
    STAGE_WIDTHS,
    STEM_WIDTH,
    OfficialModel,
    GraphBuilder,
    axial_unet_features,
    check_blocks,
    image_input,
    image_size,
)


def _unused_official_shapes(width_scale, blocks, num_classes, local_positional):
    # adjust_p in both; MedT's AxialBlock_wopos also carries a dead 1x1 conv1.
    s = width_scale
    shapes = {
        "adjust_p.weight": (num_classes, int(DECODER_WIDTHS[4] * s), 1, 1),
        "adjust_p.bias": (num_classes,),
    }
    if not local_positional:
        for stage, (planes, count) in enumerate(zip(STAGE_WIDTHS, blocks), start=1):
            width = int(planes * s)
            for b in range(count):
                shapes[f"layer{stage}_p.{b}.conv1.weight"] = (width, width, 1, 1)
                shapes[f"layer{stage}_p.{b}.conv1.bias"] = (width,)
    return shapes


@keras.saving.register_keras_serializable(package="medt_keras")
class LoGo(OfficialModel):
    """Local-Global network (the official ``logo``): axial attention in both branches.

    Global branch: the stem, two axial stages over the whole image, two
    decoders back to full resolution. Local branch: the image cut into a
    ``patch_grid x patch_grid`` grid of patches (4x4 of img_size/4, the
    official layout), each run through a full axial U-Net (stem, four
    stages, five decoders). The patches are folded into the batch, so one
    graph serves them all; in training each patch position is normalised
    with its own batch statistics and every local BatchNorm updates its
    moving statistics once per patch position, as the official loop does.
    The two branches are added, then a 3x3 convolution and the 1x1 head.

    Args: as ``AxialUNet`` (``attention`` applies to both branches), plus ``patch_grid`` (patches per side; height
    and width must be divisible by 32 * patch_grid).
    Input: ``(batch, height, width, in_channels)``.
    Output: logits ``(batch, height, width, num_classes)``.
    """

    gated = False
    local_positional = True

    def __init__(
        self,
        img_size=128,
        in_channels=3,
        num_classes=2,
        width_scale=0.125,
        groups=8,
        blocks=(1, 2, 4, 1),
        gates_trainable=False,
        patch_grid=4,
        rematerialize=False,
        attention="auto",
        dtype=None,
        **kwargs,
    ):
        blocks = check_blocks(blocks)
        s = width_scale
        img_size = image_size(img_size)
        inputs = image_input(img_size, in_channels, dtype, 32 * int(patch_grid))

        global_builder = GraphBuilder(dtype)
        global_config = dict(
            num_heads=groups,
            positional_encoding=True,
            gated=self.gated,
            gates_trainable=gates_trainable,
            rematerialize=bool(rematerialize),
            attention=attention,
        )
        x = global_builder.stem(inputs, int(STEM_WIDTH * s))
        x1 = global_builder.stage(x, 1, int(STAGE_WIDTHS[0] * s), blocks[0], 1, global_config)
        x2 = global_builder.stage(x1, 2, int(STAGE_WIDTHS[1] * s), blocks[1], 2, global_config)
        x = global_builder.decode(x2, 4, int(DECODER_WIDTHS[3] * s), skip=x1)
        x = global_builder.decode(x, 5, int(DECODER_WIDTHS[4] * s))

        groups_of_patches = int(patch_grid) ** 2
        local_builder = GraphBuilder(dtype, prefix="local_", batch_groups=groups_of_patches)
        local_config = dict(
            num_heads=groups,
            positional_encoding=self.local_positional,
            rematerialize=bool(rematerialize),
            attention=attention,
        )
        patches = PatchFold(patch_grid, name="local_patch_fold", dtype=dtype)(inputs)
        # The official local stem is as wide as the global branch's output,
        # 2 * int(256 * s), an artefact of its shared `inplanes` counter.
        local = axial_unet_features(
            patches, local_builder, s, blocks, local_config, stem_width=2 * int(STAGE_WIDTHS[1] * s)
        )
        local = PatchUnfold(patch_grid, name="local_patch_unfold", dtype=dtype)(local)

        x = global_builder.add(x, local)
        x = global_builder.relu(global_builder.conv(x, int(DECODER_WIDTHS[4] * s), 3, "fusion_conv"))
        x = UnusedOfficialWeights(
            _unused_official_shapes(s, blocks, num_classes, self.local_positional),
            name="unused_official_weights",
            dtype=dtype,
        )(x)
        outputs = global_builder.conv(global_builder.relu(x), num_classes, 1, "head")
        hyperparameters = dict(
            img_size=img_size,
            in_channels=int(in_channels),
            num_classes=int(num_classes),
            width_scale=float(s),
            groups=int(groups),
            blocks=blocks,
            gates_trainable=bool(gates_trainable),
            patch_grid=int(patch_grid),
            rematerialize=bool(rematerialize),
            attention=attention,
        )
        super().__init__(inputs, outputs, hyperparameters, dtype=dtype, **kwargs)


@keras.saving.register_keras_serializable(package="medt_keras")
class MedT(LoGo):
    """Medical Transformer (the official ``MedT``).

    ``LoGo`` with gated axial attention (positional encodings and gates) in
    the global branch and axial attention without positional encodings in
    the local branch. See ``LoGo`` for the arguments and shapes.
    """

    gated = True
    local_positional = False
