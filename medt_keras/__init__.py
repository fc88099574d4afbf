"""medt-keras: the Medical Transformer (MedT) in Keras 3, on JAX by default."""

from medt_keras import _backend  # noqa: F401  (must run before keras is imported)
from medt_keras import layers
from medt_keras._backend import enable_float64
from medt_keras.models import AxialUNet, GatedAxialUNet, LoGo, MedT

__version__ = "0.1.0"

__all__ = ["AxialUNet", "GatedAxialUNet", "LoGo", "MedT", "enable_float64", "layers"]
