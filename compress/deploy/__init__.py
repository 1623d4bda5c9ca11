"""Deployment library: export and time a resolved model, run any model kind on pairs or folders of pairs.

Modules: export (export_model), bench (bench_model, available_backends, backend_device), predictor
(open_predictor: checkpoint, student directory, ONNX file or TensorRT engine), infer (frames, depth and
point clouds from disparity, output files), outputs (which input an output location holds), memory (a pass's
peak memory, estimated before it runs). The command line in compress/commands/deploy.py only wires these.
"""

from compress.deploy.bench import available_backends, backend_device, bench_model
from compress.deploy.export import export_model
from compress.deploy.infer import (
    Frame,
    FrameResult,
    OutputPlan,
    check_outputs_writable,
    check_pair,
    disparity_to_geometry,
    frames_from_dataset,
    frames_from_folders,
    plan_outputs,
    read_stereo_pair,
    write_outputs,
)
from compress.deploy.memory import check_memory
from compress.deploy.outputs import check_outputs, output_location, replace_outputs
from compress.deploy.predictor import StereoPredictor, open_predictor

__all__ = [
    "Frame",
    "FrameResult",
    "OutputPlan",
    "StereoPredictor",
    "available_backends",
    "backend_device",
    "bench_model",
    "check_memory",
    "check_outputs",
    "check_outputs_writable",
    "check_pair",
    "disparity_to_geometry",
    "export_model",
    "frames_from_dataset",
    "frames_from_folders",
    "open_predictor",
    "output_location",
    "plan_outputs",
    "read_stereo_pair",
    "replace_outputs",
    "write_outputs",
]
