"""Training configurations: Python code, every field overridable on the command line.

A config is a module ``training/configs/<name>.py`` defining ``CONFIG``, a
``TrainConfig``; its docstring states the command, the expected result and
the run time measured on the project's 2-core CPU. ``medt-train --config
NAME --FIELD VALUE ...`` overrides any field (``--model-args`` takes JSON).
"""

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import typing

from medt_keras.models.registry import get_spec


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on.

    The defaults are the official MedT recipe (train.py of the official
    repository): Adam, learning rate 1e-3, PyTorch weight decay 1e-5 (an L2
    term added to the gradient, not AdamW's decoupled decay), batch 4,
    random horizontal flips with p = 0.5, sparse cross-entropy on logits,
    constant learning rate, and the gates frozen until the epoch with index
    10 has finished (official ``if epoch == 10`` unfreezes them after it,
    so they first train in epoch index 11).
    """

    model: str = "medt"
    model_args: dict = dataclasses.field(default_factory=dict)
    dataset: str = "hela_nuclei/tiles128"
    data_dir: typing.Optional[str] = None
    manual_dir: typing.Optional[str] = None
    img_size: int = 128
    num_classes: int = 2
    channel_order: str = "bgr"
    batch_size: int = 4
    epochs: int = 400
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    gate_unfreeze_epoch: int = 11
    flip_probability: float = 0.5
    # Train on random crop_size squares: an epoch is examples_per_epoch crops drawn with
    # replacement, images weighted by area (training/data.py).
    crop_size: typing.Optional[int] = None
    # Fraction of the crops centred on a random foreground pixel (sparse masks); 0: all uniform.
    foreground_fraction: float = 0.0
    # Validation and test: "tiled" (sliding windows over each whole image, as medt-predict),
    # "resize" (each image resized to img_size: the paper's protocol), or "auto" (tiled when
    # training on crops or when an image is larger than img_size, else resize).
    eval_protocol: str = "auto"
    # Fraction of a tile shared with its neighbour in tiled evaluation.
    tile_overlap: float = 0.25
    seed: int = 0
    max_train_examples: typing.Optional[int] = None
    max_eval_examples: typing.Optional[int] = None
    examples_per_epoch: typing.Optional[int] = None
    test_each_epoch: bool = False
    distribution: str = "none"
    checkpoint_every: int = 10
    preview_images: int = 6
    output_dir: typing.Optional[str] = None
    dtype: str = "float32"
    # Recompute attention maps in the backward pass instead of storing them
    # (less memory, same results; see AxialAttention).
    rematerialize: bool = False
    # Training steps per compiled call of model.fit (Keras steps_per_execution): fewer
    # host round trips per step; callbacks and the progress bar see every n-th step.
    steps_per_execution: int = 1
    # What builds batches ahead of the model (training/data.py); both give the same batches.
    # "threads": loader_workers threads of this process (0 or 1: each batch built in the
    # training loop's thread when asked for). "grain": loader_workers grain worker processes
    # per split (0: one grain thread of this process), for hosts where threads sharing one
    # Python interpreter cannot feed the accelerator; needs the grain package
    # (pip install "medt-keras[grain]", Python >= 3.11). docs/training.md, "The input pipeline".
    loader: str = "threads"
    loader_workers: int = 4
    # Check the loss after every step, naming the batch that diverged. It reads the loss
    # from the device each step, which waits for the step to finish; off, the check reads
    # the epoch's mean loss (NaN if any step was) at the end of the epoch.
    nan_check_each_step: bool = False
    # Where the resumable state goes: "npz" (run_state.npz, one process, local disk), "orbax"
    # (an Orbax checkpoint directory run_state/: every process saves its shards, asynchronously,
    # to local or gs:// paths, and loading reshards onto the devices present), or "auto": orbax
    # for multi-process runs and remote (URL) output directories, npz otherwise. A resumed run
    # keeps the format its state was saved in.
    checkpoint_format: str = "auto"
    # Also save the run state every this many training steps, inside epochs (None or 0: at epoch
    # ends only); --resume then continues at the exact batch. With steps_per_execution > 1 the
    # saves fall on execution boundaries. docs/reliability.md, "Preemption".
    save_every_steps: typing.Optional[int] = None

    def __post_init__(self):
        # Any registered name or alias; kept as the canonical name so resumed runs compare equal.
        self.model = get_spec(self.model).name
        if self.channel_order not in ("bgr", "rgb"):
            raise ValueError(f"channel_order: {self.channel_order!r}; use 'bgr' (official, OpenCV order) or 'rgb'.")
        for name in ("batch_size", "epochs", "img_size", "checkpoint_every", "num_classes", "steps_per_execution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.save_every_steps is not None and self.save_every_steps < 0:
            raise ValueError(f"save_every_steps must be >= 0 (0 or none: at epoch ends only), got {self.save_every_steps}.")
        if self.checkpoint_format not in ("auto", "npz", "orbax"):
            raise ValueError(f"checkpoint_format: {self.checkpoint_format!r}; use auto, npz or orbax.")
        if self.loader not in ("threads", "grain"):
            raise ValueError(f"loader: {self.loader!r}; use threads or grain.")
        if self.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.loader_workers}.")
        if self.eval_protocol not in ("auto", "tiled", "resize"):
            raise ValueError(f"eval_protocol: {self.eval_protocol!r}; use auto, tiled or resize.")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}.")
        if not 0.0 <= self.tile_overlap < 1.0:
            raise ValueError(f"tile_overlap must be in [0, 1), got {self.tile_overlap}.")
        if self.num_classes < 2:
            raise ValueError("num_classes must be >= 2 (background and at least one foreground class).")


def config_names():
    from training import configs

    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if not m.name.startswith("_"))


def load_config(name):
    """The ``CONFIG`` of ``training/configs/<name>.py``, or of a ``.py`` file path."""
    if name.endswith(".py") and os.path.isfile(name):
        spec = importlib.util.spec_from_file_location("medt_user_config", name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if name not in config_names():
            raise ValueError(f"unknown config {name!r}; known: {', '.join(config_names())} (or a path to a .py file).")
        module = importlib.import_module(f"training.configs.{name}")
    return dataclasses.replace(module.CONFIG)


def _field_parser(field):
    kind = field.type
    if kind in (dict, "dict"):
        return json.loads
    if kind in (bool, "bool"):
        return _boolean
    if kind in (int, "int"):
        return int
    if kind in (float, "float"):
        return float
    if kind in (str, "str"):
        return str
    inner = [t for t in typing.get_args(kind) if t is not type(None)]
    base = inner[0] if inner else str

    def optional(text):
        return None if text.lower() in ("none", "null", "") else base(text)

    return optional


def _boolean(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_override_arguments(parser):
    group = parser.add_argument_group("config overrides (default: the config's value)")
    for field in dataclasses.fields(TrainConfig):
        group.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=f"override_{field.name}",
            type=_field_parser(field),
            default=None,
            metavar="JSON" if field.type in (dict, "dict") else field.name.upper(),
        )


def apply_overrides(config, args):
    changes = {
        field.name: getattr(args, f"override_{field.name}")
        for field in dataclasses.fields(TrainConfig)
        if getattr(args, f"override_{field.name}", None) is not None
    }
    return dataclasses.replace(config, **changes)


def parser_with_overrides(**kwargs):
    parser = argparse.ArgumentParser(**kwargs)
    add_override_arguments(parser)
    return parser
