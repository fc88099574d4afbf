"""``medt_keras.load``: one entry point for every way a MedT-family model is kept.

    model = medt_keras.load("runs/gated_hela/model.keras")            # whole model, compiled
    model = medt_keras.load("best.weights.h5", architecture="gated", img_size=128)
    model = medt_keras.load("MedT.pth")                                 # official checkpoint, converted
    model = medt_keras.load("gated_axial_unet", num_classes=3)          # official preset, new weights

Every failure is a ``medt_keras.LoadError`` naming the file or name and
what is wrong with it.
"""

import inspect
import os
import re

from medt_keras.errors import LoadError
from medt_keras.models.registry import MODELS, get_spec, spec_of
from medt_keras.preprocessing import OFFICIAL_PREPROCESSING

KERAS_SUFFIX = ".keras"
WEIGHTS_SUFFIX = ".weights.h5"
OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_ACCEPTED = f"{KERAS_SUFFIX}, {WEIGHTS_SUFFIX}, {', '.join(OFFICIAL_SUFFIXES)}"


def _looks_like_path(text):
    # A name never has a directory or a suffix; anything that does is a file the caller expected to exist.
    return os.sep in text or "/" in text or os.path.splitext(text)[1] != ""


def _build(spec, options, what):
    """``spec``'s model with ``options`` replacing the official hyperparameters; ``what`` names the source."""
    # Keras models swallow unknown keyword arguments; a misspelt hyperparameter must not pass silently.
    allowed = set(inspect.signature(spec.model_class.__init__).parameters) - {"self", "kwargs"}
    allowed |= {"name", "trainable", "preprocessing"}  # taken by the base classes
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise LoadError(
            f"{what}: {spec.class_name} takes no {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}."
        )
    if options.get("dtype") == "float64":
        from medt_keras import enable_float64

        enable_float64()
    try:
        return spec.build(**options)
    except (TypeError, ValueError) as error:  # an argument the class does not take, or a bad value
        raise LoadError(f"{what}: cannot build {spec.class_name} with {options}: {error}") from error


def _no_overrides(path, hyperparameters, why):
    if hyperparameters:
        raise LoadError(f"{path}: {why}; it takes no hyperparameters (got {', '.join(sorted(hyperparameters))}).")


def _load_keras(path, compile, dtype, hyperparameters):
    import keras

    _no_overrides(path, hyperparameters, "a .keras file holds its architecture")
    try:
        model = keras.saving.load_model(path, compile=compile and dtype is None)
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise LoadError(f"{path}: not a readable Keras model file ({type(error).__name__}: {error}).") from error
    if dtype is None:
        return model
    # Another policy (e.g. a float32-trained model run in mixed_bfloat16): the
    # same architecture rebuilt under it, with the saved weights. The compile
    # state belongs to the saved policy and is left behind.
    spec = spec_of(model)
    if spec is None:
        raise LoadError(f"{path}: dtype= needs one of the MedT-family models; this file holds {type(model).__name__}.")
    rebuilt = _build(spec, {**model.get_config(), "dtype": dtype}, path)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def _load_weights(path, architecture, config, dtype, hyperparameters):
    config = dict(config or {})
    architecture = architecture or config.pop("architecture", None)
    config.pop("architecture", None)
    if architecture is None:
        names = ", ".join(spec.name for spec in MODELS)
        raise LoadError(
            f"{path}: a .weights.h5 file holds no architecture; pass architecture=NAME ({names}) "
            "and the hyperparameters it was built with, or config={'architecture': NAME, ...}."
        )
    spec = get_spec(architecture)
    options = {**config, **hyperparameters}
    if dtype is not None:
        options["dtype"] = dtype
    model = _build(spec, options, path)
    try:
        try:
            _load_weights_quietly_if_refused(model, path)
        except ValueError:
            renames = _pre_rename_weight_paths(model)
            if not renames or not _holds_paths(path, renames):
                raise
            _load_pre_rename_weights(model, path, renames)
    except (ValueError, OSError, KeyError) as error:
        raise LoadError(
            f"{path}: does not fit {spec.class_name} built with {options or 'the official hyperparameters'} "
            f"({type(error).__name__}: {error}). Pass the hyperparameters it was trained with."
        ) from error
    return model


# Readers of files the library does not parse itself, by kind. The official
# PyTorch checkpoints are read by ``weights_converter``, a package above the
# library: it announces its reader under this entry-point group (see
# pyproject.toml), so the library finds it without importing it by name.
LOADERS_GROUP = "medt_keras.loaders"
_loaders = {}


def register_loader(kind, function):
    """Makes ``load`` read files of ``kind`` with ``function``.

    ``kind`` "official" covers the official checkpoints (``.pth``, ``.pt``,
    ``.bin``, ``.safetensors``); ``function(path, dtype=..., resample_positions=...,
    **hyperparameters)`` returns the model. Installed medt-keras registers
    ``weights_converter.load_official_checkpoint`` through the entry-point
    group ``medt_keras.loaders``; this call replaces or stands in for it.
    """
    _loaders[kind] = function


def _loader(kind, path):
    if kind not in _loaders:
        from importlib.metadata import entry_points

        for entry in entry_points(group=LOADERS_GROUP, name=kind):
            try:
                _loaders[kind] = entry.load()
            except ImportError as error:
                raise LoadError(f"{path}: the reader of {kind} files ({entry.value}) does not import: {error}.") from error
            break
        else:
            raise LoadError(
                f"{path}: no reader of {kind} files is installed (entry point group {LOADERS_GROUP!r}); "
                "install medt-keras with pip, which registers weights_converter's, or call "
                "medt_keras.loading.register_loader."
            )
    return _loaders[kind]


def _load_official(path, dtype, resample_positions, hyperparameters):
    reader = _loader("official", path)
    return reader(path, dtype=dtype or "float32", resample_positions=resample_positions, **hyperparameters)


def load(
    source,
    *,
    architecture=None,
    config=None,
    compile=True,
    dtype=None,
    resample_positions=False,
    **hyperparameters,
):
    """A MedT-family Keras model from a file or a preset name.

    Args:
        source: one of
            - a ``.keras`` file (``model.save`` / ``medt-train``'s ``model.keras``):
              the model as saved, compiled with its optimiser and metrics
              when ``compile`` is true;
            - a ``.weights.h5`` file (``model.save_weights``): built from
              ``architecture`` and the hyperparameters (or ``config``), then
              the weights loaded;
            - an official PyTorch checkpoint (``.pth``, ``.pt``, ``.bin``) or
              ``.safetensors``: architecture and hyperparameters read from
              its keys and shapes, converted by ``weights_converter``;
            - a registered name or alias (``"medt"``, ``"logo"``, ``"gated"``
              or ``"gated_axial_unet"``, ``"axialunet"`` or ``"axial_unet"``):
              that model with the official hyperparameters and fresh weights
              (and the official preprocessing: BGR, see ``medt_keras.preprocessing``).
        architecture: the model name, for a ``.weights.h5`` file.
        config: for a ``.weights.h5`` file, a dict of hyperparameters
            (``model.get_config()``) with ``"architecture"``.
        compile: for a ``.keras`` file, restore the compile state.
        dtype: dtype policy ("float32", "float64", "mixed_bfloat16"); for a
            ``.keras`` file, the saved model rebuilt under it with its
            weights and without its compile state; "float64" turns on JAX's
            x64 mode.
        resample_positions: for an official checkpoint, interpolate its
            relative-position tables to another ``img_size``.
        **hyperparameters: keyword arguments of the model class
            (``img_size``, ``in_channels``, ``num_classes``, ``width_scale``,
            ``groups``, ``blocks``, ...) replacing the official or the
            inferred ones; not for ``.keras`` files.

    Returns:
        a ``keras.Model`` (one of ``MedT``, ``LoGo``, ``GatedAxialUNet``,
        ``AxialUNet``): ``(batch, height, width, in_channels)`` images to
        ``(batch, height, width, num_classes)`` logits.

    Raises:
        LoadError: a missing file, a name that is not a model, a file of
            another kind, or a file that does not fit; the message names the
            file or name and what is wrong.
    """
    text = os.fspath(source)
    if not isinstance(text, str):
        raise LoadError(f"{source!r}: expected a path or a model name, got {type(source).__name__}.")
    if os.path.isdir(text):
        raise LoadError(f"{text}: is a directory; pass a model file in it ({_ACCEPTED}).")
    if not os.path.exists(text):
        if _looks_like_path(text):
            raise LoadError(f"{text}: no such file.")
        try:
            spec = get_spec(text)
        except LoadError:
            known = ", ".join(f"{s.name} ({', '.join(s.aliases)})" for s in MODELS)
            raise LoadError(f"{text!r}: neither a file nor a model name; known names: {known}.") from None
        if dtype is not None:
            hyperparameters["dtype"] = dtype
        hyperparameters.setdefault("preprocessing", dict(OFFICIAL_PREPROCESSING))
        return _build(spec, hyperparameters, repr(text))
    if text.endswith(KERAS_SUFFIX):
        return _load_keras(text, compile, dtype, hyperparameters)
    if text.endswith(WEIGHTS_SUFFIX):
        return _load_weights(text, architecture, config, dtype, hyperparameters)
    if text.endswith(OFFICIAL_SUFFIXES):
        return _load_official(text, dtype, resample_positions, hyperparameters)
    raise LoadError(f"{text}: unknown kind of file (by its extension); expected one of {_ACCEPTED}.")


def _snake_case(name):
    # Keras' rule for the names under which a file keeps a layer's weights.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _pre_rename_weight_paths(model):
    """``{old: new}`` weight-file groups of the model's ``PatchProductConv2D`` layers.

    Keras keeps a layer's weights under its snake-cased Python class name,
    numbered in the order of ``model.layers`` (``layers/conv2d``,
    ``layers/conv2d_1``, ...). Before its rename ``PatchProductConv2D`` was
    ``Conv2D``, so ``.weights.h5`` files saved then hold these layers under
    ``conv2d`` names, counted together with any ``keras.layers.Conv2D`` at the
    same level. Replays Keras' numbering both ways (``saving_lib._get_unique_name``)
    and its snake-casing of class names (``PatchProductConv2D`` -> ``patch_product_conv2d``).
    """
    from medt_keras.layers import PatchProductConv2D

    def unique(name, used):
        used[name] = used.get(name, -1) + 1
        return name if used[name] == 0 else f"{name}_{used[name]}"

    old_used, new_used, renames = {}, {}, {}
    for layer in model.layers:
        new_name = _snake_case(type(layer).__name__)
        old_name = "conv2d" if isinstance(layer, PatchProductConv2D) else new_name
        old, new = unique(old_name, old_used), unique(new_name, new_used)
        if old != new:
            renames[f"layers/{old}"] = f"layers/{new}"
    return renames


def _load_weights_quietly_if_refused(model, path):
    """``model.load_weights(path)``; its warnings are shown only if it succeeds.

    On a file that does not fit, Keras (3.15) warns once per nested
    container of the functional graph that its layers "will retain their
    freshly-initialized weights" before it raises. The caller then either
    loads the file another way or raises a ``LoadError`` that says what is
    wrong, so those warnings would only mislead.
    """
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path)
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _holds_paths(path, renames):
    import h5py

    with h5py.File(path, "r") as f:
        # A file of the current layout has some new names that no old name frees.
        taken = set(renames.values()) - set(renames)
        return all(old in f for old in renames) and not any(new in f for new in taken)


def _load_pre_rename_weights(model, path, renames):
    """``model.load_weights`` from a copy of ``path`` with its groups renamed as ``renames`` says."""
    import shutil
    import tempfile

    import h5py

    with tempfile.TemporaryDirectory() as directory:
        copy = os.path.join(directory, "renamed" + WEIGHTS_SUFFIX)
        shutil.copyfile(path, copy)
        with h5py.File(copy, "r+") as f:
            # Two passes: an old name may be another layer's new name.
            for i, old in enumerate(renames):
                f.move(old, f"{old}__pre_rename_{i}")
            for i, (old, new) in enumerate(renames.items()):
                f.move(f"{old}__pre_rename_{i}", new)
        model.load_weights(copy)
