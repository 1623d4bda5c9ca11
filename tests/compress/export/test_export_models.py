"""Export of the real models: student presets and the teacher pass ONNX Runtime parity and the TensorRT lint,
and the correlation's float32 islands are recorded in the ONNX and kept float32 by fp16 casting."""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto

from compress.export import (
    cast_onnx_fp16,
    fp32_island_names,
    fp32_node_patterns,
    random_stereo_pair,
    recorded_fp32_nodes,
    run_onnx,
    to_onnx,
)
from search_spaces import build_student, preset
from teacher import FoundationStereo, TeacherConfig
from teacher.dinov2 import PRETRAIN_GRID, bicubic_matrix

H, W = 64, 128
# The correlations, and the disparity's own float32 path: soft-argmin, the GRU's accumulator, convex upsampling
DISPARITY_ISLANDS = ["/model/convex_combination/*", "/model/disparity_regression/*", "/model/disparity_update/*"]
STUDENT_ISLANDS = sorted(["/model/correlation/*", "/model/pair_correlation/*", *DISPARITY_ISLANDS])


def _student(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_student(preset(name, **overrides)).eval()


def _torch_disp(model: torch.nn.Module, left: torch.Tensor, right: torch.Tensor, iters: int) -> np.ndarray:
    with torch.no_grad():
        return model(left, right, iters=iters, test_mode=True).numpy()


def _blockers(report) -> list[str]:
    return [str(f) for f in report.lint if f.severity != "info"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = _student("tiny")
    return model, to_onnx(model, tmp_path_factory.mktemp("tiny") / "tiny.onnx", H, W, iters=2)


def test_tiny_student_exports_with_parity_and_clean_lint(tiny) -> None:
    model, report = tiny
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-3
    assert not _blockers(report)
    proto = onnx.load(str(report.path))
    assert "GridSample" in {n.op_type for n in proto.graph.node}  # the 4-D geometry lookup
    # Islands come from the model's own float32 modules and are stored in the file.
    assert report.keep_fp32_nodes == fp32_node_patterns(model, prefix="model") == STUDENT_ISLANDS
    assert list(recorded_fp32_nodes(report.path)) == STUDENT_ISLANDS
    names = [n.name for n in proto.graph.node]
    ops = {"/model/correlation/*": "ReduceL2", "/model/pair_correlation/*": "Einsum",
           "/model/convex_combination/*": "Softmax", "/model/disparity_regression/*": "ReduceSum",
           "/model/disparity_update/*": "Add"}
    for pattern, op in ops.items():
        matched = [n for n in proto.graph.node if fnmatchcase(n.name, pattern)]
        assert op in {n.op_type for n in matched}, (pattern, names[:20])


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.value_info, *graph.input, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def test_fp16_cast_keeps_the_correlation_float32_by_default(tiny, tmp_path: Path) -> None:
    _, report = tiny
    default = cast_onnx_fp16(report.path, tmp_path / "fp16.onnx")
    island = {n for n in fp32_island_names(report.path, keep_fp32_ops=()) if n}
    assert island and island <= set(default.kept_fp32_nodes)
    model = onnx.load(str(default.path))
    types = _float_types(model)
    float_kinds = (TensorProto.FLOAT, TensorProto.FLOAT16)
    for node in (n for n in model.graph.node if n.name in island):
        floats = [types[t] for t in [*node.input, *node.output] if t and types.get(t) in float_kinds]
        assert all(t == TensorProto.FLOAT for t in floats), node.name
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.output[0]] == TensorProto.FLOAT16 for n in convs)

    # Without the recorded patterns only the listed ops stay float32: the normalising Div goes fp16.
    bare = cast_onnx_fp16(report.path, tmp_path / "bare.onnx", keep_fp32_nodes=())
    bare_model = onnx.load(str(bare.path))
    ops = {n.name: n.op_type for n in bare_model.graph.node}
    assert {ops[n] for n in set(bare.kept_fp32_nodes) & island} == {"ReduceL2"}
    bare_types = _float_types(bare_model)
    divs = [n for n in bare_model.graph.node if n.name in island and n.op_type == "Div"]
    assert divs and all(bare_types[n.output[0]] == TensorProto.FLOAT16 for n in divs)

    left, right = random_stereo_pair(1, H, W, seed=5)
    fp32, fp16 = run_onnx(report.path, left, right), run_onnx(default.path, left, right)
    assert np.isfinite(fp16).all()
    np.testing.assert_allclose(fp16, fp32, atol=0.1)


def test_dynamic_student_export_is_right_at_other_sizes(tmp_path: Path) -> None:
    # Exported 32 px wide, the cost volume (16 disparities at 1/4) is wider than the 8-column feature map:
    # the traced disparity shifts must still be right at wider inputs.
    model = _student("tiny")
    report = to_onnx(model, tmp_path / "dyn.onnx", 64, 32, iters=1, dynamic=True)
    assert report.inputs[0].shape == ("batch", 3, "height", "width")
    assert report.max_abs_diff < 1e-3 and not _blockers(report)
    left, right = random_stereo_pair(1, 96, 160, seed=4)
    np.testing.assert_allclose(run_onnx(report.path, left, right), _torch_disp(model, left, right, 1), atol=1e-3)


def test_traced_position_table_resize_matches_bicubic() -> None:
    m = PRETRAIN_GRID
    table = torch.randn(1, 64, m, m)
    for rows, cols in [(8, 16), (40, 48), (3, 5)]:
        scales = ((rows + 0.1) / m, (cols + 0.1) / m)
        eager = F.interpolate(table, scale_factor=scales, mode="bicubic", antialias=False)[0]
        matrices = torch.einsum("rh,chw,sw->crs", bicubic_matrix(rows, m, scales[0]), table[0],
                                bicubic_matrix(cols, m, scales[1]))
        torch.testing.assert_close(matrices, eager, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fast_foundationstereo", "ffs_unpruned", "small", "small_eighth"])
def test_preset_exports_with_parity_and_clean_lint(name: str, tmp_path: Path) -> None:
    model = _student(name)
    report = to_onnx(model, tmp_path / f"{name}.onnx", H, W, iters=2)
    assert report.max_abs_diff < 1e-3
    assert not _blockers(report)
    assert report.keep_fp32_nodes == STUDENT_ISLANDS


@pytest.mark.slow
def test_vits_teacher_exports_with_parity_and_clean_lint(tmp_path: Path) -> None:
    # The ViT sees the image resized to 112-multiples (112x224 here) with an interpolated position table.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = FoundationStereo(TeacherConfig(vit_size="vits")).eval()
    report = to_onnx(teacher, tmp_path / "teacher.onnx", H, W, iters=1)
    assert report.max_abs_diff < 1e-3
    assert not _blockers(report)
    assert report.keep_fp32_nodes == sorted(["/model/gwc/*", "/model/pair_correlation/*", *DISPARITY_ISLANDS])
