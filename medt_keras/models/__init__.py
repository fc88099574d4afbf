"""The four official MedT-family models."""

from medt_keras.models.axial_unet import AxialUNet, GatedAxialUNet
from medt_keras.models.medt import LoGo, MedT

__all__ = ["AxialUNet", "GatedAxialUNet", "LoGo", "MedT"]
