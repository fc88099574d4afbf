"""The four official MedT-family models, and the one table of them (``registry``)."""

from medt_keras.models.axial_unet import AxialUNet, GatedAxialUNet
from medt_keras.models.medt import LoGo, MedT
from medt_keras.models.registry import MODEL_NAMES, MODELS, ModelSpec, get_spec

__all__ = ["AxialUNet", "GatedAxialUNet", "LoGo", "MODELS", "MODEL_NAMES", "MedT", "ModelSpec", "get_spec"]
