"""ONNX export (parity, atomic writes, metadata), deployment inference and fp16 graph casting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto

from compress.errors import ConfigError, DataError, ExportError
from compress.export import (
    cast_onnx_fp16,
    fp32_island_names,
    lint_onnx,
    random_stereo_pair,
    read_metadata,
    run_onnx,
    to_onnx,
)
from tests.stereo_toy import ToyStereo, make_toy

H, W, ITERS = 64, 128, 2


@pytest.fixture(scope="module")
def toy() -> ToyStereo:
    return make_toy()


@pytest.fixture(scope="module")
def static_export(toy: ToyStereo, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("static") / "toy.onnx"
    return to_onnx(toy, path, H, W, ITERS)


def _torch_disp(model: torch.nn.Module, left: torch.Tensor, right: torch.Tensor, iters: int = ITERS) -> np.ndarray:
    with torch.no_grad():
        return model(left, right, iters=iters, test_mode=True).numpy()


def test_static_export_report_matches_file(static_export) -> None:
    report = static_export
    assert report.path.is_file()
    assert sorted(p.name for p in report.path.parent.iterdir()) == ["toy.onnx"], "no staging leftovers"
    model = onnx.load(str(report.path))
    assert report.node_count == len(model.graph.node)
    assert report.onnx_bytes == report.path.stat().st_size
    assert [(s.name, s.shape, s.dtype) for s in report.inputs] == [
        ("left", (1, 3, H, W), "float32"), ("right", (1, 3, H, W), "float32")]
    assert [(s.name, s.shape) for s in report.outputs] == [("disp", (1, 1, H, W))]
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-3
    assert report.opset == 17 and report.iters == ITERS and report.exporter == "torchscript"
    assert not [f for f in report.lint if f.severity == "error"]
    assert read_metadata(report.path)["iters"] == str(ITERS)
    assert {n.op_type for n in model.graph.node} >= {"GridSample", "Conv", "Softmax", "ReduceL2"}


def test_run_onnx_matches_pytorch(static_export, toy: ToyStereo) -> None:
    left, right = random_stereo_pair(1, H, W, seed=11)
    disp = run_onnx(static_export.path, left.numpy(), right)
    assert disp.shape == (1, 1, H, W) and disp.dtype == np.float32
    np.testing.assert_allclose(disp, _torch_disp(toy, left, right), atol=1e-3)
    # A 3-D image is a batch of one.
    np.testing.assert_allclose(run_onnx(static_export.path, left[0], right[0]), disp, atol=1e-6)


def test_run_onnx_rejects_bad_inputs(static_export, tmp_path: Path) -> None:
    left, right = random_stereo_pair(1, H, W)
    with pytest.raises(DataError, match="must match"):
        run_onnx(static_export.path, left, right[..., :32])
    with pytest.raises(DataError, match="3 x H x W"):
        run_onnx(static_export.path, left[:, :1], right[:, :1])
    with pytest.raises(ExportError, match="does not exist"):
        run_onnx(tmp_path / "missing.onnx", left, right)
    small_left, small_right = random_stereo_pair(1, 32, 64)
    with pytest.raises(ExportError, match="dynamic=True"):
        run_onnx(static_export.path, small_left, small_right)


def test_dynamic_export_runs_other_shapes(toy: ToyStereo, tmp_path: Path) -> None:
    report = to_onnx(toy, tmp_path / "dyn.onnx", 32, 64, ITERS, dynamic=True)
    assert report.inputs[0].shape == ("batch", 3, "height", "width")
    left, right = random_stereo_pair(2, 64, 96, seed=3)
    np.testing.assert_allclose(run_onnx(report.path, left, right), _torch_disp(toy, left, right), atol=1e-3)


class _DriftingToy(ToyStereo):
    """Adds a Python-side call counter to the output: tracing bakes one value in, so parity must fail."""

    calls = 0

    def forward(self, image1, image2, iters=4, test_mode=False, return_intermediates=False):
        self.calls += 1
        return super().forward(image1, image2, iters=iters, test_mode=test_mode) + float(self.calls)


def test_parity_failure_raises_and_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="max abs diff"):
        to_onnx(_DriftingToy().eval(), path, 32, 64, 1)
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


class _GridSample5d(ToyStereo):
    """Looks a 5-D volume up with grid_sample, which TensorRT cannot run."""

    def forward(self, image1, image2, iters=4, test_mode=False, return_intermediates=False):
        volume = image1.unsqueeze(2).expand(-1, -1, 2, -1, -1)
        grid = image2[:, :3].permute(0, 2, 3, 1).unsqueeze(1).expand(-1, 2, -1, -1, -1) / 255.0
        return F.grid_sample(volume, grid, align_corners=True).mean(dim=(1, 2)).unsqueeze(1)


def test_rank5_grid_sample_is_an_export_error(tmp_path: Path) -> None:
    # Opset 20 lets the exporter write an N-D GridSample; the lint must stop it.
    with pytest.raises(ExportError, match="grid_sample_5d"):
        to_onnx(_GridSample5d().eval(), tmp_path / "g5.onnx", 32, 64, 1, opset=20, check_parity=False)
    # Opset 17 has no 5-D GridSample: the exporter's failure becomes an ExportError too.
    with pytest.raises(ExportError, match="torch.onnx.export failed"):
        to_onnx(_GridSample5d().eval(), tmp_path / "g5.onnx", 32, 64, 1)
    assert not list(tmp_path.iterdir())


class _TupleOutput(ToyStereo):
    def forward(self, image1, image2, iters=4, test_mode=False, return_intermediates=False):
        return super().forward(image1, image2, iters=iters, test_mode=False)


def test_export_validates_arguments(toy: ToyStereo, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiples of 32"):
        to_onnx(toy, tmp_path / "x.onnx", 60, 128, 1)
    with pytest.raises(ConfigError, match="iters"):
        to_onnx(toy, tmp_path / "x.onnx", 64, 128, 0)
    with pytest.raises(ExportError, match="B x 1 x H x W"):
        to_onnx(_TupleOutput().eval(), tmp_path / "x.onnx", 32, 64, 1)
    assert not list(tmp_path.iterdir())


def test_export_restores_training_mode(tmp_path: Path) -> None:
    model = make_toy().train()
    to_onnx(model, tmp_path / "m.onnx", 32, 64, 1)
    assert model.training


# --- fp16 casting -------------------------------------------------------------------------------

def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.value_info, *graph.input, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def test_fp16_cast_keeps_islands_and_fp32_io(static_export, tmp_path: Path) -> None:
    dst = tmp_path / "toy_fp16.onnx"
    report = cast_onnx_fp16(static_export.path, dst, keep_fp32_nodes=("*/corr_norm*/*",))
    model = onnx.load(str(dst))
    onnx.checker.check_model(model)
    types = _types(model)
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT, value.name

    source_names = {n.name for n in onnx.load(str(static_export.path)).graph.node if "/corr_norm" in n.name}
    island = [n for n in model.graph.node if n.name in source_names]
    assert {n.op_type for n in island} >= {"ReduceL2", "Div"}
    assert sorted(report.kept_fp32_nodes) == sorted(n.name for n in island)
    assert sorted(fp32_island_names(static_export.path, keep_fp32_nodes=("*/corr_norm*/*",))) == sorted(
        report.kept_fp32_nodes)
    for node in island:
        floats = [types[t] for t in [*node.input, *node.output] if t and types.get(t) in
                  (TensorProto.FLOAT, TensorProto.FLOAT16)]
        assert floats and all(t == TensorProto.FLOAT for t in floats), node.name

    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == TensorProto.FLOAT16 for n in convs)
    assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in convs)
    assert report.converted_initializers > 0 and report.casts_inserted >= 3

    left, right = random_stereo_pair(1, H, W, seed=7)
    fp32 = run_onnx(static_export.path, left, right)
    fp16 = run_onnx(dst, left, right)
    assert fp16.dtype == np.float32 and np.isfinite(fp16).all()
    # fp16 keeps ~3 significant digits; disparities here reach ~30 px.
    np.testing.assert_allclose(fp16, fp32, atol=0.05, rtol=1e-2)


def test_fp16_cast_default_islands_and_softmax_option(static_export, tmp_path: Path) -> None:
    report = cast_onnx_fp16(static_export.path, tmp_path / "a.onnx")
    kept_ops = {n.op_type for n in onnx.load(str(static_export.path)).graph.node if n.name in report.kept_fp32_nodes}
    assert kept_ops == {"ReduceL2"}
    report = cast_onnx_fp16(static_export.path, tmp_path / "b.onnx", keep_fp32_ops=("ReduceL2", "Softmax"))
    model = onnx.load(str(report.path))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    assert _types(model)[softmax.output[0]] == TensorProto.FLOAT


def test_fp16_cast_rejects_control_flow(tmp_path: Path) -> None:
    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y_then"])], "then", [],
        [onnx.helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [1])])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["c"], ["y"], name="branchy", then_branch=branch, else_branch=branch)], "g",
        [onnx.helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    src = tmp_path / "if.onnx"
    onnx.save(onnx.helper.make_model(graph), str(src))
    with pytest.raises(ExportError, match="branchy"):
        cast_onnx_fp16(src, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_lint_of_cast_graph_is_clean(static_export, tmp_path: Path) -> None:
    dst = cast_onnx_fp16(static_export.path, tmp_path / "c.onnx").path
    assert not [f for f in lint_onnx(dst) if f.severity != "info"]
