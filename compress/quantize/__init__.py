"""INT8 post-training quantization of an exported stereo model: a Q/DQ ONNX graph with measured fp32 islands.

Quantizer: ONNX Runtime's static quantization (``onnxruntime.quantization.quantize_static``) in QDQ format,
symmetric signed INT8 activations and per-channel symmetric INT8 weights. Why this one:

- it is already an ffsc dependency and runs here on the CPU; NVIDIA ModelOpt's ONNX PTQ
  (``nvidia-modelopt[onnx]``) pulls in CUDA packages (cupy-cuda12x, onnxruntime-gpu) and is aimed at a
  TensorRT/GPU workflow (its INT8 mode casts the rest of the graph to fp16), so it cannot be a CPU default
  (see the README for what was tried);
- QDQ with symmetric INT8 (zero point 0) everywhere is the form TensorRT's explicit quantization wants: a
  strongly typed TensorRT build takes each DequantizeLinear -> op -> QuantizeLinear as the layer's precision,
  and ONNX Runtime's CPU provider fuses the same pattern into integer kernels (QLinearConv, MatMulInteger);
- it calibrates once and accepts an explicit list of nodes to leave in float, which is what the per-node
  sensitivity pass below needs (the calibration ranges are cached and reused for every trial quantization).

Which parts stay in float is measured, not guessed: the quantizable nodes are grouped by the module that
emitted them (``feature/stages.2``, ``cost_agg/conv1``, ``update_block/gru04``, ``upsampler/spx_2_gru``; nodes
directly under the model, such as the softmax over disparities, by op type), each group alone is quantized
and the disparity's EPE against the fp32 graph on the calibration frames recorded. Groups above
``group_threshold_px`` stay float; if the whole graph then still misses ``max_epe_px`` on the calibration
frames, the next most sensitive groups are released to float one at a time until it does. The model's own
float32 islands (the correlation normalisation that ``to_onnx`` records) are never quantized.

Modules, one job each: config (QuantizeConfig), frames (calibration and held-out pairs), qdq (node groups, ONNX
Runtime's quantizer, running a graph on frames), int8 (quantize_onnx, quantize_beside: the sensitivity pass),
report (QuantizeReport, its latency and its files).
"""

from compress.quantize.config import CALIBRATION_METHODS, DEFAULT_OP_TYPES, TARGETS, QuantizeConfig
from compress.quantize.frames import CalibrationFrame, load_frames, open_frames_source
from compress.quantize.int8 import quantize_beside, quantize_onnx
from compress.quantize.qdq import conv3d_nodes, node_group, quantizable_groups, quiet_preprocess_advice
from compress.quantize.report import GroupSensitivity, QuantizeReport, measure_int8_latency, write_report

__all__ = [
    "CALIBRATION_METHODS",
    "TARGETS",
    "DEFAULT_OP_TYPES",
    "CalibrationFrame",
    "GroupSensitivity",
    "QuantizeConfig",
    "QuantizeReport",
    "load_frames",
    "measure_int8_latency",
    "conv3d_nodes",
    "node_group",
    "open_frames_source",
    "quantizable_groups",
    "quantize_beside",
    "quantize_onnx",
    "quiet_preprocess_advice",
    "write_report",
]
