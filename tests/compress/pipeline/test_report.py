"""The run's final numbers in words: the latency line names the precision (with the CPU's casts said), and the
side-by-side timing says what it prepares and times."""

from __future__ import annotations

import torch

from compress.latency import LatencyConfig
from compress.pipeline import load_run_recipe
from compress.pipeline.records import RunSummary
from compress.pipeline.report import describe_latency, latency_settings, report_latencies
from search_spaces import build_student, preset
from tests.paths import REPO

CPU_NOTE = "fp16 on a CPU runs as casts: not what a GPU's fp16 gives"


def test_the_latency_line_names_the_precision_and_says_a_cpu_casts_reduced_precision() -> None:
    fp16 = latency_settings(LatencyConfig(backend="onnxruntime", precision="fp16", threads=2), "cpu")
    assert describe_latency(fp16) == f"onnxruntime on cpu, fp16, 2 threads, {CPU_NOTE}"
    assert describe_latency(fp16, notes=False) == "onnxruntime on cpu, fp16, 2 threads"  # the table's header
    fp32 = latency_settings(LatencyConfig(backend="onnxruntime", threads=1), "cpu")
    assert describe_latency(fp32) == "onnxruntime on cpu, fp32, 1 thread"
    gpu = latency_settings(LatencyConfig(backend="torch", precision="fp16", compile=True, cuda_graph=True), "cuda")
    assert describe_latency(gpu) == "torch on cuda, fp16, compiled, CUDA graphs"  # no CPU note on a GPU


def test_side_by_side_timing_says_what_it_exports_and_times(tmp_path, capsys) -> None:
    recipe = load_run_recipe(REPO / "recipes" / "quickstart_cpu.yaml", [
        f"run_dir={tmp_path}", "progress=true", "search.latency={mode: measured, backend: onnxruntime, height: 64, "
        "width: 128, warmup: 0, repeats: 1, threads: 1, report_rounds: 1}"])
    torch.manual_seed(0)
    teacher = build_student(preset("tiny", iters=2)).eval()
    summary = RunSummary(run_dir=tmp_path)
    report_latencies(summary, recipe, teacher, torch.device("cpu"), tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[ffsc] latency: timing teacher side by side in 1 alternating round (onnxruntime on cpu, fp32, 1 thread)",
        "[ffsc] latency: exporting teacher to ONNX (64x128, 2 iterations) ...",
    ]
    assert summary.teacher["latency_ms"] > 0 and summary.teacher["latency_iters"] == 2
