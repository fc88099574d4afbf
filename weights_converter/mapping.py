"""The one table from official MedT names to Keras variables, and the layouts.

Walking a Keras model built by ``medt_keras``, ``official_entries(model)``
lists every tensor of the official state_dict the model corresponds to:
its official key, its PyTorch shape, the Keras variable that holds it, and
how to convert between the two layouts. Loading and exporting both use
this list, so the two directions cannot disagree.
"""

import dataclasses
import re
from typing import Callable, Optional

import numpy as np

from medt_keras.layers import AxialAttention, AxialBlock, BatchNorm, UnusedOfficialWeights

# Keras layer name (model level) -> official module name.
MODEL_LAYER_NAMES = [
    (r"stem_conv(\d)", r"conv\1"),
    (r"stem_norm(\d)", r"bn\1"),
    (r"stage(\d)_block(\d+)", r"layer\1.\2"),
    (r"decoder(\d)", r"decoder\1"),
    (r"local_stem_conv(\d)", r"conv\1_p"),
    (r"local_stem_norm(\d)", r"bn\1_p"),
    (r"local_stage(\d)_block(\d+)", r"layer\1_p.\2"),
    (r"local_decoder(\d)", r"decoder\1_p"),
    (r"fusion_conv", r"decoderf"),
    (r"head", r"adjust"),
]

# AxialBlock sublayer -> official child of AxialBlock{,_dynamic,_wopos}.
BLOCK_CHILDREN = [
    ("reduce_conv", "conv_down"),
    ("reduce_norm", "bn1"),
    ("height_attention", "hight_block"),  # sic: the official spelling
    ("width_attention", "width_block"),
    ("expand_conv", "conv_up"),
    ("expand_norm", "bn2"),
    ("shortcut_conv", "downsample.0"),
    ("shortcut_norm", "downsample.1"),
]

# AxialAttention variable or sublayer -> official parameter or child.
ATTENTION_GATES = [
    ("gate_query_position", "f_qr"),
    ("gate_key_position", "f_kr"),
    ("gate_value_position", "f_sve"),
    ("gate_value", "f_sv"),
]
ATTENTION_CHILDREN = [
    ("qkv_norm", "bn_qkv"),
    ("similarity_norm", "bn_similarity"),
    ("output_norm", "bn_output"),
]

# BatchNorm variable -> official BatchNorm{1,2}d tensor. Multi-axis Keras
# parameters, e.g. (term, head) of the similarity norm, flatten row-major
# into the official channel order.
NORM_VARIABLES = [
    ("gamma", "weight"),
    ("beta", "bias"),
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
    ("num_batches_tracked", "num_batches_tracked"),
]


@dataclasses.dataclass
class Entry:
    """One official tensor and the Keras variable holding it.

    ``variable`` is None for derived buffers (``flatten_index``), whose
    value ``derived`` is recomputed, checked on load and written on export.
    """

    key: str
    official_shape: tuple
    variable: Optional[object]
    to_keras: Callable = None
    to_official: Callable = None
    derived: Optional[np.ndarray] = None


def _same(shape):
    return lambda a: np.reshape(a, shape)


def _conv_entries(prefix, conv):
    kh, kw, cin, cout = conv.kernel.shape
    entries = [
        Entry(
            f"{prefix}.weight",
            (cout, cin, kh, kw),
            conv.kernel,
            to_keras=lambda a: np.transpose(a, (2, 3, 1, 0)),
            to_official=lambda a: np.transpose(a, (3, 2, 0, 1)),
        )
    ]
    if conv.use_bias:
        entries.append(Entry(f"{prefix}.bias", (cout,), conv.bias, _same((cout,)), _same((cout,))))
    return entries


def _norm_entries(prefix, norm):
    keras_shape = tuple(norm.gamma.shape)
    size = int(np.prod(keras_shape))
    entries = []
    for attribute, name in NORM_VARIABLES:
        variable = getattr(norm, attribute)
        if attribute == "num_batches_tracked":
            entries.append(
                Entry(
                    f"{prefix}.{name}",
                    (),
                    variable,
                    to_keras=lambda a: np.asarray(a, np.int64).reshape(()),
                    to_official=lambda a: np.asarray(a, np.int64).reshape(()),
                )
            )
        else:
            entries.append(
                Entry(f"{prefix}.{name}", (size,), variable, _same(keras_shape), _same((size,)))
            )
    return entries


def relative_index(span):
    """The official ``flatten_index``: ``key - query + span - 1`` over (span, span), flattened."""
    positions = np.arange(span)
    return (positions[:, None] - positions[None, :] + span - 1).reshape(-1).astype(np.int64)


def _attention_entries(prefix, attention):
    entries = []
    if attention.gated:
        for attribute, name in ATTENTION_GATES:
            entries.append(
                Entry(f"{prefix}.{name}", (), getattr(attention, attribute), _same(()), _same(()))
            )
    if attention.positional_encoding:
        offsets, channels = attention.relative_embedding.shape
        entries.append(
            Entry(
                f"{prefix}.relative",
                (channels, offsets),
                attention.relative_embedding,
                to_keras=np.transpose,
                to_official=np.transpose,
            )
        )
        span = attention.span
        entries.append(Entry(f"{prefix}.flatten_index", (span * span,), None, derived=relative_index(span)))
    cin, cout = attention.qkv_kernel.shape
    entries.append(
        Entry(
            f"{prefix}.qkv_transform.weight",
            (cout, cin, 1),
            attention.qkv_kernel,
            to_keras=lambda a: np.transpose(a[:, :, 0]),
            to_official=lambda a: np.transpose(a)[:, :, None],
        )
    )
    for attribute, name in ATTENTION_CHILDREN:
        entries += _norm_entries(f"{prefix}.{name}", getattr(attention, attribute))
    return entries


def _block_entries(prefix, block):
    entries = []
    for attribute, name in BLOCK_CHILDREN:
        child = getattr(block, attribute, None)
        if child is None or not child.built:
            continue
        entries += _layer_entries(f"{prefix}.{name}", child)
    return entries


def _layer_entries(prefix, layer):
    if isinstance(layer, AxialBlock):
        return _block_entries(prefix, layer)
    if isinstance(layer, AxialAttention):
        return _attention_entries(prefix, layer)
    if isinstance(layer, BatchNorm):
        return _norm_entries(prefix, layer)
    if hasattr(layer, "kernel") and len(layer.kernel.shape) == 4:
        return _conv_entries(prefix, layer)
    raise TypeError(f"no official counterpart is known for layer {layer.name} ({type(layer).__name__})")


def official_module_name(keras_name):
    """``local_stage2_block0`` -> ``layer2_p.0`` etc.; None for layers without one."""
    for pattern, replacement in MODEL_LAYER_NAMES:
        if re.fullmatch(pattern, keras_name):
            return re.sub(pattern, replacement, keras_name)
    return None


def official_entries(model):
    """Every official state_dict tensor of ``model``, in the model's layer order."""
    entries = []
    for layer in model.layers:
        if isinstance(layer, UnusedOfficialWeights):
            for key, variable in layer.tensors.items():
                shape = tuple(variable.shape)
                entries.append(Entry(key, shape, variable, _same(shape), _same(shape)))
            continue
        name = official_module_name(layer.name)
        if name is None:
            if layer.weights:
                raise TypeError(f"layer {layer.name} has weights but no official name in the table")
            continue
        entries += _layer_entries(name, layer)
    return entries
