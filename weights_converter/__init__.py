"""Official MedT PyTorch checkpoints to Keras models and back, without PyTorch."""

from weights_converter.convert import (
    export_official_state_dict,
    infer_architecture,
    load_official_checkpoint,
    load_state_dict_into,
)
from weights_converter.state_dict_io import CheckpointError, read_state_dict

__all__ = [
    "CheckpointError",
    "export_official_state_dict",
    "infer_architecture",
    "load_official_checkpoint",
    "load_state_dict_into",
    "read_state_dict",
]
