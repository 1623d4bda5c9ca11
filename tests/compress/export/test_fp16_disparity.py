"""The disparity never passes through fp16: its regression, accumulator and convex upsampling stay float32 islands
in an fp16-cast ONNX graph (fp16 spaces values above 256 px 0.25 px apart)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from benchmarks.gpu import Refine
from compress.export import cast_onnx_fp16, to_onnx
from compress.export.onnx_export import fp32_node_patterns, recorded_fp32_nodes
from compress.export.runtime import make_session
from search_spaces import build_student, preset
from teacher.layers import Float32Island


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return make_session(path).run(None, feeds)[0]


def test_large_disparities_keep_sub_pixel_precision_in_an_fp16_graph(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    # A smooth far-right disparity, ~400 px at full resolution, refined by steps smaller than fp16's spacing there
    disp = 100.0 + 0.5 * torch.rand(1, 1, 8, 16, generator=gen)
    delta = 0.01 + 0.02 * torch.rand(1, 1, 8, 16, generator=gen)
    logits = (0.5 * torch.randn(1, 9, 32, 64, generator=gen)).half().float()  # exact in fp16: no rounding upstream
    model = Refine().eval()
    src = tmp_path / "refine.onnx"
    torch.onnx.export(model, (disp, delta, logits), str(src), input_names=["disp", "delta", "logits"],
                      output_names=["out"], opset_version=17, dynamo=False)
    feeds = {"disp": disp.numpy(), "delta": delta.numpy(), "logits": logits.numpy()}
    reference = _run(src, feeds)
    np.testing.assert_allclose(reference, model(disp, delta, logits).detach().numpy(), rtol=1e-5, atol=1e-3)

    patterns = fp32_node_patterns(model)
    assert patterns == ["/convex_combination/*", "/disparity_update/*"]
    kept = _run(cast_onnx_fp16(src, tmp_path / "kept.onnx", keep_fp32_nodes=patterns).path, feeds)
    lost = _run(cast_onnx_fp16(src, tmp_path / "lost.onnx", keep_fp32_nodes=()).path, feeds)
    assert np.abs(kept - reference).max() < 1e-3
    assert np.abs(lost - reference).max() > 0.05  # what the islands prevent: fp16's 0.25 px steps above 256 px


def test_an_exported_student_records_the_disparity_islands(tmp_path: Path) -> None:
    model = build_student(preset("tiny"), pretrained=False).eval()
    report = to_onnx(model, tmp_path / "student.onnx", 64, 128, 2)
    recorded = recorded_fp32_nodes(onnx.load(str(report.path), load_external_data=False))
    for island in ("disparity_regression", "disparity_update", "convex_combination"):
        assert f"/model/{island}/*" in recorded
    cast = cast_onnx_fp16(report.path, tmp_path / "student_fp16.onnx")
    kept = set(cast.kept_fp32_nodes)
    for island in ("disparity_regression", "disparity_update", "convex_combination"):
        assert any(name.startswith(f"/model/{island}/") for name in kept), island
    graph = onnx.load(str(cast.path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    last = producer[graph.output[0].name]
    assert last.name.startswith("/model/convex_combination/"), last.name  # no fp16 step after the combination


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_disparity_islands_stay_float32_under_cpu_autocast(dtype: torch.dtype) -> None:
    # The refinement alone: reduced-precision inputs (as an autocast update block hands them over) give the float32
    # result the same inputs give without autocast.
    gen = torch.Generator().manual_seed(0)
    disp = (100.0 + 0.5 * torch.rand(1, 1, 8, 16, generator=gen)).to(dtype)
    delta = (0.01 + 0.02 * torch.rand(1, 1, 8, 16, generator=gen)).to(dtype)
    logits = (0.5 * torch.randn(1, 9, 32, 64, generator=gen)).to(dtype)
    refine = Refine().eval()
    with torch.autocast("cpu", dtype=dtype):
        out = refine(disp, delta, logits)
    assert out.dtype == torch.float32
    assert torch.equal(out, refine(disp.float(), delta.float(), logits.float()))

    # A whole student under the caller's autocast: its convolutions run in ``dtype``, every island in float32.
    torch.manual_seed(0)
    model = build_student(preset("tiny"), pretrained=False).eval()
    islands, convs = [], []
    for module in model.modules():
        if isinstance(module, Float32Island):
            module.register_forward_hook(lambda m, args, out: islands.append((type(m).__name__, out.dtype)))
        elif isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: convs.append(out.dtype))
    left, right = (torch.rand(1, 3, 64, 128, generator=gen) * 255 for _ in range(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        disparity = model(left, right, iters=2, test_mode=True)
    assert dtype in convs  # autocast did reach the model
    names = {name for name, _ in islands}
    assert {"DisparityUpdate", "ConvexCombination"} <= names
    assert {out for _, out in islands} == {torch.float32} and disparity.dtype == torch.float32
