"""The FoundationStereo teacher: a clean-room implementation that loads the official checkpoints."""

from .config import TeacherConfig
from .inference import InputPadder, infer, model_iters
from .loading import load_teacher, read_state_dict
from .model import FoundationStereo
from .outputs import StereoOutput

__all__ = [
    "FoundationStereo",
    "InputPadder",
    "StereoOutput",
    "TeacherConfig",
    "infer",
    "load_teacher",
    "model_iters",
    "read_state_dict",
]
