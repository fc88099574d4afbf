"""The one table of the MedT-family models: names, classes, official hyperparameters.

The command-line tools, the training configs, the benchmark, the converter
and ``medt_keras.load`` all read this table; nothing else lists the models.

Each model's ``name`` is the official builder's name in the official
``lib/models/axialnet.py`` (``axialunet``, ``gated``, ``MedT`` lowercased,
``logo``), which is also the name the command-line tools and configs have
always used; ``aliases`` are the descriptive names (``axial_unet``,
``gated_axial_unet``) and the class names, accepted everywhere a name is.
"""

import dataclasses
import types

from medt_keras.errors import LoadError

# The official builders' arguments, which are also the Keras classes'
# defaults: axialnet.py builds every model with layers [1, 2, 4, 1],
# s = 0.125, groups = 8, and train.py with img_size 128, 3 channels, 2
# classes.
OFFICIAL_HYPERPARAMETERS = types.MappingProxyType(
    dict(img_size=128, in_channels=3, num_classes=2, width_scale=0.125, groups=8, blocks=(1, 2, 4, 1))
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of the family.

    Attributes:
        name: the official builder's name and the CLI name ("medt").
        aliases: other accepted names ("gated_axial_unet", "GatedAxialUNet").
        class_name: the Keras class in ``medt_keras.models``.
        official_builder: the function of the official ``lib.models.axialnet``.
        gated: whether its attention is MedT's gated axial attention.
        local_global: whether it has the local (patch) branch of MedT/LoGo.
        defaults: the official hyperparameters (keyword arguments of the class).
        description: one line for listings.
    """

    name: str
    aliases: tuple
    class_name: str
    official_builder: str
    gated: bool
    local_global: bool
    defaults: types.MappingProxyType = dataclasses.field(default_factory=lambda: OFFICIAL_HYPERPARAMETERS)
    description: str = ""

    @property
    def model_class(self):
        """The Keras class (looked up on use: this module loads before the classes)."""
        from medt_keras import models

        return getattr(models, self.class_name)

    def build(self, **overrides):
        """The model with the official hyperparameters, ``overrides`` replacing any of them."""
        return self.model_class(**{**self.defaults, **overrides})


MODELS = (
    ModelSpec(
        "medt", ("MedT",), "MedT", "MedT", gated=True, local_global=True,
        description="MedT: gated axial attention globally, axial attention without positions on 4x4 patches",
    ),
    ModelSpec(
        "logo", ("LoGo",), "LoGo", "logo", gated=False, local_global=True,
        description="Local-Global network: axial attention in both branches",
    ),
    ModelSpec(
        "gated", ("gated_axial_unet", "GatedAxialUNet"), "GatedAxialUNet", "gated", gated=True, local_global=False,
        description="U-Net of gated axial-attention blocks",
    ),
    ModelSpec(
        "axialunet", ("axial_unet", "AxialUNet"), "AxialUNet", "axialunet", gated=False, local_global=False,
        description="U-Net of axial-attention blocks",
    ),
)

MODEL_NAMES = tuple(spec.name for spec in MODELS)

_BY_NAME = {key.lower(): spec for spec in MODELS for key in (spec.name, *spec.aliases)}


def get_spec(name):
    """The ``ModelSpec`` of a name or alias (case-insensitive); ``LoadError`` for an unknown one."""
    spec = _BY_NAME.get(str(name).lower())
    if spec is None:
        known = ", ".join(f"{s.name} ({', '.join(s.aliases)})" for s in MODELS)
        raise LoadError(f"unknown model {name!r}; known: {known}.")
    return spec


def spec_of(model):
    """The ``ModelSpec`` of a model instance (exactly its class); ``None`` if not one of the family."""
    for spec in MODELS:
        if type(model) is spec.model_class:
            return spec
    return None
