"""Per-block latency lookup tables for students: measure each block variant once, predict any config by a sum.

A StudentStereo forward (test mode) is seven blocks run in order::

    feature      EdgeNeXt pyramid of both views + the 1/2-resolution stem   (backbone widths/depths, feature_dim)
    volume       group-wise + concatenation cost volume, its 3-D stem and feature attention
    hourglass    the cost-filtering hourglass (levels, widths, APC kernel, disparity transformer)
    classifier   3-D classifier, softmax and soft-argmin: the initial disparity
    context      context features and attention, and the geometry-lookup pyramids (all-pairs correlation)
    gru_iteration  one geometry lookup + selective ConvGRU update          (run ``iters`` times)
    upsampler    convex upsampling of the last disparity to full resolution

Each block is a thin module calling the student's own stage methods (:class:`teacher.stages.StereoStages`),
and :func:`run_blocks` composes them as the model's forward does, so the predictor times what the model runs.
Each block's latency depends only on a few config fields (its *variant*) and the image size. A
:class:`LatencyTable` measures every variant in isolation on the target backend (ONNX Runtime, PyTorch or
TensorRT, exported and timed like whole models are) and caches the numbers in a JSON file keyed by block,
fields, image shape, backend and device. ``predict(cfg)`` sums the blocks (the GRU iteration times
``iters``) minus the per-call overhead counted once per extra block call; :func:`evaluate_predictor`
compares predictions with direct :func:`compress.latency.measure` of whole models.

Modules: blocks (the decomposition: blocks, variants, block modules, run_blocks), timing (one block timed on a
backend), table (the stored table and its prediction), evaluation (prediction against measurement).
"""

from compress.latency_predictor.blocks import (
    BLOCKS,
    OVERHEAD,
    TABLE_FORMAT,
    BlockVariant,
    ClassifierBlock,
    ContextBlock,
    FeatureBlock,
    GruIterationBlock,
    HourglassBlock,
    UpsamplerBlock,
    VolumeBlock,
    block_fields,
    block_variants,
    pyramid_widths,
    run_blocks,
    space_block_variants,
    student_blocks,
)
from compress.latency_predictor.evaluation import (
    PredictorEvaluation,
    PredictorRow,
    calibration_scale,
    check_predictor,
    evaluate_predictor,
    sample_configs,
)
from compress.latency_predictor.table import LatencyTable, TableEntry, default_table_path, open_table, predict_latency
from compress.latency_predictor.timing import BlockTiming, time_module

__all__ = [
    "BLOCKS", "OVERHEAD", "TABLE_FORMAT", "BlockTiming", "BlockVariant", "ClassifierBlock", "ContextBlock",
    "FeatureBlock", "GruIterationBlock", "HourglassBlock", "LatencyTable", "PredictorEvaluation", "PredictorRow",
    "TableEntry", "UpsamplerBlock", "VolumeBlock", "block_fields", "block_variants", "calibration_scale",
    "check_predictor", "default_table_path", "evaluate_predictor", "open_table", "predict_latency",
    "pyramid_widths", "run_blocks", "sample_configs", "space_block_variants", "student_blocks", "time_module",
]
