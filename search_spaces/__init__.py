"""Student architectures: typed configs, YAML search spaces, presets, save/load and cost counting."""

from .config import StudentConfig
from .counting import ModelCost, count_macs, count_params
from .layer_shapes import apply_layer_shapes
from .model import StudentStereo, build_student
from .presets import PRESETS, preset
from .serialization import load_student, record_layer_shapes, save_student
from .space import SUBNETS, SearchSpace, load_space, subnet_space

__all__ = [
    "PRESETS",
    "ModelCost",
    "SearchSpace",
    "StudentConfig",
    "StudentStereo",
    "apply_layer_shapes",
    "build_student",
    "count_macs",
    "count_params",
    "load_space",
    "subnet_space",
    "SUBNETS",
    "load_student",
    "preset",
    "record_layer_shapes",
    "save_student",
]
