"""Keras layers of the Medical Transformer."""

from medt_keras.layers.axial_attention import AxialAttention
from medt_keras.layers.axial_block import AxialBlock
from medt_keras.layers.batch_norm import BatchNorm
from medt_keras.layers.patch_fold import PatchFold
from medt_keras.layers.patch_product_conv2d import PatchProductConv2D
from medt_keras.layers.patch_unfold import PatchUnfold
from medt_keras.layers.unused_official_weights import UnusedOfficialWeights

__all__ = [
    "AxialAttention",
    "AxialBlock",
    "BatchNorm",
    "PatchFold",
    "PatchProductConv2D",
    "PatchUnfold",
    "UnusedOfficialWeights",
]
