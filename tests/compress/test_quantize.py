"""INT8 post-training quantization: Q/DQ graph, sensitivity pass, accuracy report, CLI (tiny student, 64x128)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compress.cli import main
from compress.errors import ConfigError, DataError, ExportError
from compress.export import random_stereo_pair, run_onnx, to_onnx
from compress.quantize import (
    QuantizeConfig,
    conv3d_nodes,
    load_frames,
    node_group,
    quantize_onnx,
    write_report,
)
from tests.paths import REPO

H, W, ITERS = 64, 128, 2
# Few frames, whole-stage groups and one timing round keep this fast; the benchmark runs the full settings.
FAST = dict(calib_frames=3, eval_frames=2, sensitivity_frames=1, group_depth=1, latency_rounds=1,
            latency_repeats=1)


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> Path:
    from search_spaces import build_student, preset

    torch.manual_seed(0)
    model = build_student(preset("tiny", iters=ITERS)).eval()
    path = tmp_path_factory.mktemp("q") / "tiny.onnx"
    to_onnx(model, path, H, W, iters=ITERS)
    return path


@pytest.fixture(scope="module")
def quantized(fp32_onnx: Path):
    out = fp32_onnx.with_name("tiny_int8.onnx")
    report = quantize_onnx(fp32_onnx, out, "synthetic", QuantizeConfig(**FAST))
    return out, report


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _float_weights(model: onnx.ModelProto, name: str) -> bool:
    """Whether Conv/Gemm node `name` keeps float weights (its weight is no DequantizeLinear output): not quantized.

    Its activation input may still come through a Q/DQ pair when the node feeding it is quantized."""
    node = next(n for n in model.graph.node if n.name == name)
    prod = _producers(model)
    return not (node.input[1] in prod and prod[node.input[1]].op_type == "DequantizeLinear")


def test_node_group_names_modules_and_merges_unrolled_iterations() -> None:
    assert node_group("/model/feature/stages.2/blocks/blocks.1/convs.0/Conv", "Conv") == "feature/stages.2"
    assert node_group("/model/update_block/gru04/small_gru/convz_2/Conv", "Conv") == "update_block/gru04"
    assert node_group("/model/update_block/gru04_3/conv0/conv0.0/Conv", "Conv", depth=1) == "update_block"
    assert node_group("/model/Softmax", "Softmax") == "Softmax (top level)"


def test_int8_graph_runs_in_onnxruntime_and_passes_its_report(fp32_onnx: Path, quantized) -> None:
    out, report = quantized
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert report.quantized_nodes > 0 and report.qdq_nodes > 0
    left, right = random_stereo_pair(1, H, W, seed=3)
    disp = run_onnx(out, left, right)
    ref = run_onnx(fp32_onnx, left, right)
    assert disp.shape == (1, 1, H, W) and np.isfinite(disp).all()
    # INT8 changes the numbers, but only a little: not a copy of the fp32 graph, and not broken.
    assert 0 < float(np.mean(np.abs(disp - ref))) < 0.5
    assert report.heldout["frames"] == 2
    assert report.heldout["epe_vs_fp32"] <= report.max_epe_px and report.passed
    assert report.latency["fp32_ms"] > 0 and report.latency["int8_ms"] > 0
    assert json.loads(onnx_meta(model)["quantization"])["target"] == "cpu"
    assert not [f for f in report.lint if f["severity"] == "error"]


def onnx_meta(model: onnx.ModelProto) -> dict[str, str]:
    from compress.export import read_metadata

    return read_metadata(model)


def test_sensitive_groups_and_3d_convolutions_stay_float(fp32_onnx: Path, quantized) -> None:
    out, report = quantized
    model = onnx.load(str(out))
    fp32 = onnx.load(str(fp32_onnx))
    table = {g.group: g for g in report.sensitivity}
    assert len(table) >= 5
    over = {g for g, s in table.items() if s.epe_px > report.calibration["group_threshold_px"]}
    assert over <= set(report.kept_float_groups)
    assert set(report.kept_float_groups) == {g for g, s in table.items() if s.kept_float}
    for group in report.kept_float_groups:
        for node in fp32.graph.node:
            if node.name and node_group(node.name, node.op_type, 1) == group and node.op_type in ("Conv", "Gemm"):
                assert _float_weights(model, node.name), node.name
    # target 'cpu': the cost-volume 3-D convolutions are never quantized (no fast INT8 kernel in ONNX Runtime).
    names3d = conv3d_nodes(fp32)
    assert names3d and all(_float_weights(model, n) for n in names3d)


def test_report_files(quantized, tmp_path: Path) -> None:
    _, report = quantized
    js, md = write_report(report, tmp_path / "r.json")
    data = json.loads(js.read_text())
    assert data["passed"] is True and data["sensitivity"] and "epe_vs_fp32" in data["heldout"]
    assert "PASS" in md.read_text() and "| group |" in md.read_text()


def test_tensorrt_target_uses_zero_points_of_zero_and_quantizes_3d_convs(fp32_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "trt_int8.onnx"
    report = quantize_onnx(fp32_onnx, out, "synthetic", QuantizeConfig(**{**FAST, "sensitivity": False,
                                                                          "target": "tensorrt"}),
                           measure_latency=False, heldout="synthetic")
    assert report.heldout["frames"] == FAST["eval_frames"] and report.sensitivity == [] and report.latency == {}
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert not any(_float_weights(model, n) for n in conv3d_nodes(onnx.load(str(fp32_onnx))))


def test_frames_from_a_synthetic_label_cache_are_the_labelled_images(tmp_path: Path) -> None:
    from compress.data.synthetic import SyntheticConfig, SyntheticStereoDataset
    from compress.distill.config import LabelCacheConfig
    from compress.distill.label_cache import LabelledDataset, build_label_cache
    from search_spaces import build_student, preset

    torch.manual_seed(0)
    teacher = build_student(preset("tiny", iters=1)).eval()
    dataset = SyntheticStereoDataset(3, SyntheticConfig(height=H, width=W, max_disp=16, seed=5))
    build_label_cache(teacher, dataset, tmp_path / "labels", LabelCacheConfig(prob="none"), iters=1, progress=False)
    frames = load_frames(tmp_path / "labels", 2, H, W, offset=1)
    labelled = LabelledDataset(dataset, tmp_path / "labels")
    for k, frame in enumerate(frames, start=1):
        assert np.array_equal(frame.left[0], labelled[k]["left"].numpy())
        assert np.array_equal(frame.disp, labelled[k]["disp"][0].numpy())
    with pytest.raises(DataError, match="has 3 pairs; 4 are needed"):
        load_frames(tmp_path / "labels", 3, H, W, offset=1)


def test_bad_inputs_get_one_clear_error(fp32_onnx: Path, quantized, tmp_path: Path) -> None:
    out, _ = quantized
    with pytest.raises(ExportError, match="already quantized"):
        quantize_onnx(out, tmp_path / "again.onnx", "synthetic", QuantizeConfig(**FAST))
    with pytest.raises(ExportError, match="does not exist"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "x.onnx", "synthetic")
    with pytest.raises(ConfigError, match=r"takes 64x128 images \(height x width\), but 96x128"):
        quantize_onnx(fp32_onnx, tmp_path / "x.onnx", "synthetic", height=96, width=128)
    with pytest.raises(DataError, match="no such folder"):
        quantize_onnx(fp32_onnx, tmp_path / "x.onnx", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="quantize.method"):
        QuantizeConfig(method="kl")


def test_cli_quantize(fp32_onnx: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli_int8.onnx"
    code = main(["quantize", str(fp32_onnx), "--calib", "synthetic", "--out", str(out), "--calib-frames", "2",
                 "--eval-frames", "1", "--sensitivity-frames", "1", "--group-depth", "1", "--rounds", "1",
                 "--repeats", "1", "--strict"])
    assert code == 0
    report = json.loads((tmp_path / "cli_int8_report.json").read_text())
    assert report["heldout"]["frames"] == 1 and report["latency"]["speedup"] > 0
    assert (tmp_path / "cli_int8_report.md").is_file() and out.is_file()
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "nope.onnx"), "--calib", "synthetic", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


def test_recipe_export_formats_onnx_int8(tmp_path: Path) -> None:
    from compress.pipeline import load_run_recipe
    from compress.pipeline.finish import export_student
    from search_spaces import build_student, preset, save_student

    root = REPO
    recipe = load_run_recipe(root / "recipes" / "quickstart_cpu.yaml", [
        "progress=false", "export.formats=[onnx,onnx_int8]", "export.quantize.calib_frames=3",
        "export.quantize.eval_frames=2", "export.quantize.sensitivity_frames=1", "export.quantize.group_depth=1",
        "export.quantize.latency_rounds=1", "export.quantize.latency_repeats=1"])
    torch.manual_seed(0)
    student = save_student(build_student(preset("tiny", iters=ITERS)), tmp_path / "student")
    out = export_student(student, recipe, tmp_path)
    assert Path(out["onnx_int8"]) == tmp_path / "export" / "student_int8.onnx"
    report = json.loads((tmp_path / "export" / "student_int8_report.json").read_text())
    assert report["heldout"]["frames"] == 2 and report["passed"] is True
    with pytest.raises(ConfigError, match="quantize.method"):
        load_run_recipe(root / "recipes" / "quickstart_cpu.yaml", ["export.quantize.method=kl"])


def test_quantizing_prints_no_preprocessing_advice(fp32_onnx: Path, tmp_path: Path, capfd, caplog) -> None:
    import logging

    with caplog.at_level(logging.WARNING):
        quantize_onnx(fp32_onnx, tmp_path / "quiet_int8.onnx", "synthetic",
                      QuantizeConfig(**{**FAST, "sensitivity": False}), measure_latency=False)
    captured = capfd.readouterr()
    printed = captured.out + captured.err + caplog.text
    assert (tmp_path / "quiet_int8.onnx").is_file()
    assert "pre-processing" not in printed and "consider" not in printed.lower()


def test_the_advice_filter_keeps_real_warnings_and_leaves_no_root_handler(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import logging\n"
        "from compress.quantize import quiet_preprocess_advice\n"
        "with quiet_preprocess_advice():\n"
        "    logging.warning('Please consider pre-processing before quantization. See https://x')\n"
        "    logging.error('a real problem')\n"
        "assert not logging.getLogger().handlers and not logging.getLogger().filters\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == ["ERROR:root:a real problem"]


def test_calibration_shows_its_progress(fp32_onnx: Path, tmp_path: Path, capsys) -> None:
    cfg = QuantizeConfig(**{**FAST, "sensitivity": False})
    quantize_onnx(fp32_onnx, tmp_path / "shown_int8.onnx", "synthetic", cfg, measure_latency=False, progress=True)
    captured = capsys.readouterr()
    assert "[ffsc quantize] calibrating on 3 frames (minmax)" in captured.out
    # Not a terminal: plain lines, one as it starts, one per 30 s, one at the end.
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("calibrating: ")]
    assert lines[0].startswith("calibrating: 0/3 (0%)") and lines[-1].startswith("calibrating: 3/3 (100%)")
    quantize_onnx(fp32_onnx, tmp_path / "quiet_int8.onnx", "synthetic", cfg, measure_latency=False)
    assert "calibrating" not in capsys.readouterr().err
