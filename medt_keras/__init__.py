"""medt-keras: the Medical Transformer (MedT) in Keras 3, on JAX by default.

``import medt_keras`` registers everything a saved model or its compile
state names (the four models, their layers, ``OfficialAdam``, the
foreground metrics), so ``keras.saving.load_model`` needs nothing else.
"""

# First: importing _backend selects the JAX backend before keras is imported.
from medt_keras._backend import enable_float64, highest_matmul_precision
from medt_keras import compiler, layers, metrics, optimizers  # noqa: E402
from medt_keras.errors import LoadError
from medt_keras.loading import load
from medt_keras.metrics import ForegroundF1, ForegroundIoU
from medt_keras.models import MODEL_NAMES, MODELS, AxialUNet, GatedAxialUNet, LoGo, MedT, get_spec
from medt_keras.optimizers import OfficialAdam

__version__ = "0.1.0"

__all__ = [
    "AxialUNet",
    "MODELS",
    "MODEL_NAMES",
    "ForegroundF1",
    "ForegroundIoU",
    "GatedAxialUNet",
    "LoGo",
    "LoadError",
    "MedT",
    "OfficialAdam",
    "compiler",
    "enable_float64",
    "get_spec",
    "highest_matmul_precision",
    "layers",
    "load",
    "metrics",
    "optimizers",
]
