"""Official MedT checkpoints to Keras models and back."""

import collections
import re

import numpy as np

from medt_keras import enable_float64
from medt_keras.models.axial_unet import DECODER_WIDTHS
from medt_keras.models.registry import MODELS, get_spec
from medt_keras.preprocessing import OFFICIAL_PREPROCESSING
from weights_converter.mapping import official_entries
from weights_converter.state_dict_io import CheckpointError, read_state_dict

# Model name -> Keras class, from the one table of models.
ARCHITECTURES = {spec.name: spec.model_class for spec in MODELS}


def _require(state_dict, key, source):
    if key not in state_dict:
        raise CheckpointError(
            f"{source}: key {key!r} is missing; it is needed to tell the architecture. "
            "Is this a checkpoint of the official axialunet, gated, MedT or logo model?"
        )
    return state_dict[key]


def _blocks_per_stage(state_dict, suffix):
    pattern = re.compile(rf"layer([1-4]){suffix}\.(\d+)\.")
    blocks = collections.defaultdict(set)
    for key in state_dict:
        match = pattern.match(key)
        if match:
            blocks[int(match.group(1))].add(int(match.group(2)))
    return tuple(len(blocks[stage]) for stage in range(1, 5))


def infer_architecture(state_dict, source="state_dict"):
    """Which official model a state_dict belongs to, and its hyperparameters.

    Returns ``(name, hyperparameters)`` with name one of ``ARCHITECTURES``
    and the keyword arguments of that Keras class.
    """
    conv1 = _require(state_dict, "conv1.weight", source)
    head = _require(state_dict, "adjust.weight", source)
    local = "conv1_p.weight" in state_dict
    # Widths are int(k * s) for k = 64 ... 2048 (powers of two); the widest,
    # decoder1's int(2048 * s), pins s down closely enough to give every
    # other width exactly, even for an s whose stem width is rounded.
    widest = _require(state_dict, "decoder1_p.weight" if local else "decoder1.weight", source)
    width_scale = widest.shape[0] / float(DECODER_WIDTHS[0])
    attention = "layer1.0.hight_block"
    gated = f"{attention}.f_qr" in state_dict
    (name,) = [spec.name for spec in MODELS if (spec.local_global, spec.gated) == (local, gated)]

    # layer1 attends over img_size / 2 positions along each axis.
    height = _require(state_dict, f"{attention}.relative", source).shape[1] + 1
    width = _require(state_dict, "layer1.0.width_block.relative", source).shape[1] + 1
    img_size = height if height == width else [height, width]
    similarity = _require(state_dict, f"{attention}.bn_similarity.weight", source)
    groups = similarity.shape[0] // 3

    # MedT/LoGo's global branch has only stages 1-2; their local one has all four.
    blocks = _blocks_per_stage(state_dict, "_p" if local else "")
    if min(blocks) < 1:
        raise CheckpointError(f"{source}: could not find blocks of every stage; found {blocks} per stage.")
    return name, dict(
        img_size=img_size,
        in_channels=int(conv1.shape[1]),
        num_classes=int(head.shape[0]),
        width_scale=width_scale,
        groups=int(groups),
        blocks=blocks,
    )


def build_model(name, dtype="float32", **hyperparameters):
    """Builds the Keras twin of official model ``name`` ("axialunet", "gated", "medt", "logo", or an alias)."""
    spec = get_spec(name)  # LoadError (a ValueError) naming the known models
    if dtype == "float64":
        enable_float64()
    # The official code reads BGR images with OpenCV; the model carries that (medt_keras.preprocessing).
    hyperparameters.setdefault("preprocessing", dict(OFFICIAL_PREPROCESSING))
    return spec.model_class(dtype=dtype, **hyperparameters)


def resample_relative_table(table, span):
    """A relative-position table ``(channels, 2K - 1)`` resampled to ``(channels, 2 * span - 1)``.

    Linear interpolation over the offsets, the extreme offsets mapped onto
    each other, as if the image had been resized by ``span / K``. An
    approximation: the official model was trained at one size only.
    """
    old = table.shape[1]
    new = 2 * span - 1
    if old == new:
        return table
    source = np.linspace(0.0, old - 1.0, new)
    return np.stack([np.interp(source, np.arange(old), row) for row in table]).astype(table.dtype)


def _resample_positions(entries, state_dict):
    resampled = dict(state_dict)
    for entry in entries:
        value = state_dict.get(entry.key)
        if value is None or tuple(value.shape) == tuple(entry.official_shape):
            continue
        if entry.key.endswith(".relative") and value.shape[0] == entry.official_shape[0]:
            resampled[entry.key] = resample_relative_table(value, (entry.official_shape[1] + 1) // 2)
        elif entry.key.endswith(".flatten_index"):
            resampled[entry.key] = entry.derived  # an index buffer, recomputed for the new span
    return resampled


def load_state_dict_into(model, state_dict, source="state_dict", resample_positions=False):
    """Assigns every official tensor to its Keras variable, strictly.

    Raises ``CheckpointError`` listing every missing key, unexpected key and
    shape mismatch (with the expected and the found shape); nothing is
    assigned unless everything matches. With ``resample_positions=True``,
    relative-position tables of another span are resampled to the model's
    (see ``resample_relative_table``), so a checkpoint trained at one image
    size runs at another.
    """
    entries = official_entries(model)
    if resample_positions:
        state_dict = _resample_positions(entries, state_dict)
    expected = {entry.key for entry in entries}
    problems = []
    for entry in entries:
        if entry.key not in state_dict:
            problems.append(f"missing key {entry.key!r} (expected shape {entry.official_shape})")
            continue
        found = tuple(np.shape(state_dict[entry.key]))
        if found != tuple(entry.official_shape):
            problems.append(
                f"key {entry.key!r}: expected shape {tuple(entry.official_shape)}, found {found}"
            )
        elif entry.variable is None and not np.array_equal(state_dict[entry.key], entry.derived):
            problems.append(f"key {entry.key!r}: buffer differs from the one this architecture computes")
    for key in state_dict:
        if key not in expected:
            problems.append(f"unexpected key {key!r} (shape {tuple(np.shape(state_dict[key]))})")
    if problems:
        listing = "\n  ".join(problems)
        hint = ""
        if any(".relative'" in problem for problem in problems):
            hint = (
                "\nThe positional encodings were trained for another image size; "
                "resample_positions=True (--resample-positions) interpolates them, an approximation."
            )
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__} "
            f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  {listing}{hint}"
        )
    for entry in entries:
        if entry.variable is not None:
            value = entry.to_keras(np.asarray(state_dict[entry.key]))
            entry.variable.assign(value.astype(entry.variable.dtype))
    return model


def load_official_checkpoint(path, dtype="float32", resample_positions=False, **overrides):
    """Builds the Keras model an official checkpoint describes and loads it.

    The architecture (axialunet, gated, medt or logo) and its
    hyperparameters are inferred from the state_dict's keys and shapes;
    ``overrides`` replace inferred hyperparameters, e.g. ``img_size=(256,
    384)`` together with ``resample_positions=True`` to run a checkpoint
    trained at 128 on other sizes (an approximation; see
    ``resample_relative_table``). ``dtype="float64"`` turns on JAX's x64
    mode.

    Raises ``CheckpointError`` naming the file and every key at fault.
    """
    state_dict = read_state_dict(path)
    try:
        name, hyperparameters = infer_architecture(state_dict, source=str(path))
        hyperparameters.update(overrides)
        model = build_model(name, dtype=dtype, **hyperparameters)
        return load_state_dict_into(
            model, state_dict, source=str(path), resample_positions=resample_positions
        )
    except CheckpointError:
        raise
    except Exception as error:  # a well-formed file whose tensors fit no model
        raise CheckpointError(
            f"{path}: its state_dict does not describe a model this converter can build "
            f"({type(error).__name__}: {str(error)[:300]})."
        ) from error


def export_official_state_dict(model):
    """The model's weights as an official state_dict (key -> numpy, PyTorch layouts).

    Keys, shapes and dtypes (float32 parameters, int64 counters and index
    buffers) are those of the official code, so
    ``model.load_state_dict({k: torch.from_numpy(v) ...})`` works there with
    ``strict=True``. Float parameters are written as float32, like the
    official code's; pass a float64 model to get float64 values.
    """
    state_dict = collections.OrderedDict()
    for entry in official_entries(model):
        if entry.variable is None:
            state_dict[entry.key] = entry.derived.copy()
            continue
        value = entry.to_official(np.asarray(entry.variable.numpy()))
        if value.dtype.kind == "f" and value.dtype != np.float64:
            value = value.astype(np.float32)
        state_dict[entry.key] = np.array(value, order="C")
    return state_dict
