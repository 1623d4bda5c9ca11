"""benchmarks/gpu.py on CPU: its rows' logic (against the recording fake TensorRT where a row needs TensorRT), the
reasons its rows give for skipping on a machine without the GPU pieces, the report rewritten after every row, the
budget, and the one-line refusal without CUDA. Only a GPU run gives its numbers."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import teacher.stages as stages
from benchmarks import gpu
from compress.backends import tensorrt_problem
from compress.export.engine import TIMING_CACHE_ENV
from compress.export.runtime import import_onnxruntime
from compress.latency import COMPILE_BACKEND_ENV, compile_counters
from teacher.inference import model_iters
from tests.compress.export.fake_tensorrt import FakeCuda, install_tensorrt, write_float_onnx
from tests.paths import REPO

TRT10, TRT11 = "10.8.0", "11.0.0"


def _result() -> dict:
    return {"command": "test", "environment": {"gpu": "test"}, "height": 64, "width": 128, "budget_s": 60.0,
            "finished": False, "costs": {}, "checks": [], "rows": [], "seconds": 0.0}


def _check(item: str, estimate: float, work) -> object:
    return gpu.Task("checks", {"item": item, "check": f"check {item}"}, estimate, work)


# --- compiled rows that fell back ----------------------------------------------------------------------------


def test_a_graph_break_and_a_cudagraph_skip_mark_the_row(monkeypatch) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "eager")
    torch.compiler.reset()

    def breaks(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    before = compile_counters()
    torch.compile(breaks, backend="eager")(torch.ones(3))
    counters["inductor"]["cudagraph_skips"] += 1  # what Inductor counts when it cannot capture a graph
    delta = {k: v - before[k] for k, v in compile_counters().items()}
    assert delta["graphs"] >= 2 and delta["graph_breaks"] >= 1 and delta["cudagraph_skips"] == 1
    reasons = gpu.fallbacks(delta, compiled=True, graphed=True)
    assert any("graph break" in r for r in reasons) and any("CUDA graphs skipped 1" in r for r in reasons)
    assert gpu.fallbacks(delta, compiled=False, graphed=False) == []  # eager rows cannot fall back
    assert not any("CUDA graphs" in r for r in gpu.fallbacks(delta, compiled=True, graphed=False))
    row = {"model": "m", "mode": "compiled+graph", "precision": "fp16", "iters": 4, "median_ms": 1.0, "p10_ms": 1.0,
           "p90_ms": 1.0, "peak_mem_gib": 0.1, "fell_back": reasons}
    report = gpu.markdown({"environment": {"gpu": "test"}, "command": "x", "seconds": 1, "height": 64, "width": 128,
                           "rows": [row], "costs": {}})
    assert "compiled+graph (fell back: " in report


def test_a_clean_compile_is_not_marked(monkeypatch) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "eager")
    torch.compiler.reset()
    before = compile_counters()
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    delta = {k: v - before[k] for k, v in compile_counters().items()}
    assert delta["graphs"] == 1 and gpu.fallbacks(delta, compiled=True, graphed=True) == []


# --- the runner: a report after every row, the budget ------------------------------------------------------------


def test_the_report_is_rewritten_after_every_row(tmp_path: Path) -> None:
    stem = tmp_path / "gpu-test"

    def reads_the_report() -> dict:
        written = json.loads(stem.with_suffix(".json").read_text())
        return {"rows_on_disk": [r["check"] for r in written["checks"]], "finished_on_disk": written["finished"]}

    def fails() -> dict:
        raise ValueError("bad value\nsecond line")

    def skips() -> dict:
        raise gpu.Skip("no such piece here")

    result = _result()
    gpu.Runner(result, stem, 60, gpu.markdown).run([
        _check("1", 0, lambda: {"summary": "fine"}), _check("2", 0, reads_the_report), _check("3", 0, fails),
        _check("4", 0, skips)])
    written = json.loads(stem.with_suffix(".json").read_text())
    assert written == json.loads(json.dumps(result))
    first, second, third, fourth = written["checks"]
    assert (first["status"], first["summary"]) == ("ok", "fine")
    assert second["rows_on_disk"] == ["check 1"] and second["finished_on_disk"] is False  # written after row 1
    assert third["status"] == "failed: ValueError: bad value"
    assert fourth["status"] == "skipped: no such piece here"
    report = stem.with_suffix(".md").read_text()
    assert "| 1 | check 1 | ok | fine |" in report and "unfinished" in report


def test_the_budget_skips_rows_that_do_not_fit_and_stops_a_running_one(tmp_path: Path) -> None:
    def runs_on() -> dict:
        while True:  # Python work: the deadline's alarm interrupts it
            time.sleep(0.05)

    result = _result()
    start = time.perf_counter()
    gpu.Runner(result, tmp_path / "gpu-test", 1.0, gpu.markdown).run([
        _check("1", 30, lambda: {}), _check("2", 0.1, runs_on), _check("3", 0.1, lambda: {})])
    assert time.perf_counter() - start < 10
    first, second, third = (r["status"] for r in result["checks"])
    assert first == "not run: budget (needs about 30 s, 1 s left)"
    assert second == "stopped: budget (1 s) spent during this row"
    assert third.startswith("not run: budget")
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


_RUN = """
import signal, sys, time
from pathlib import Path

from benchmarks import gpu

budget, grace = float(sys.argv[2]), float(sys.argv[3])


def hangs():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # as inside a C call that does not return
    time.sleep(120)
    return {}


result = {"command": "test", "environment": {"gpu": "test"}, "height": 64, "width": 128, "budget_s": budget,
          "finished": False, "costs": {}, "checks": [], "rows": [], "seconds": 0.0}
tasks = [gpu.Task("checks", {"item": str(i), "check": name}, 0, work)
         for i, (name, work) in enumerate((("first", lambda: {"summary": "done"}), ("hangs", hangs),
                                           ("after", lambda: {})), 1)]
gpu.Runner(result, Path(sys.argv[1]), budget, gpu.markdown, grace_s=grace).run(tasks)
"""


def _start(stem: Path, budget: float, grace: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", _RUN, str(stem), str(budget), str(grace)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_run_killed_after_its_first_row_leaves_a_valid_report_with_that_row(tmp_path: Path) -> None:
    stem = tmp_path / "gpu-test"
    proc = _start(stem, budget=600, grace=30)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            path = stem.with_suffix(".md")  # written after the JSON
            if path.is_file() and "| first | ok |" in path.read_text():
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no row written: {proc.communicate()}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    written = json.loads(stem.with_suffix(".json").read_text())
    assert [(r["check"], r["status"]) for r in written["checks"]] == [("first", "ok")]
    assert written["finished"] is False
    assert not list(tmp_path.glob("*.tmp*")), "only whole files are left"


def test_a_row_that_ignores_the_deadline_is_ended_with_the_process_after_the_report(tmp_path: Path) -> None:
    stem = tmp_path / "gpu-test"
    proc = _start(stem, budget=1, grace=1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "ran 1 s past the 1 s budget" in err
    statuses = [r["status"] for r in json.loads(stem.with_suffix(".json").read_text())["checks"]]
    assert statuses == ["ok", "stopped: budget (1 s); still running 1 s later, so the process was ended",
                        "not run: budget"]


def test_without_cuda_the_script_says_so_in_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert gpu.main(["--out", str(tmp_path / "out"), "--budget-s", "10"]) == 2
    err = capsys.readouterr().err
    assert err == "benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here\n"
    assert not (tmp_path / "out").exists()


# --- the rows, where the GPU pieces are missing ----------------------------------------------------------------


def test_rows_whose_piece_is_missing_are_skipped_with_the_reason(tmp_path: Path) -> None:
    trt = tensorrt_problem()
    providers = import_onnxruntime().get_available_providers()
    if trt is None or "CUDAExecutionProvider" in providers or torch.cuda.is_available():
        pytest.skip("this machine has TensorRT, ONNX Runtime's CUDA provider or a GPU")
    checks = gpu.Checks(tmp_path, torch.device("cuda", 0), 64, 128)
    result = _result()
    gpu.Runner(result, tmp_path / "gpu-test", 600, gpu.markdown).run(
        [t for t in checks.tasks() if t.name["item"] in ("4", "5", "6", "7", "8", "9", "10")])
    status = {r["item"]: r["status"] for r in result["checks"]}
    assert trt.startswith("TensorRT does not import")
    no_cuda_provider = f"ONNX Runtime has no CUDAExecutionProvider (it has {', '.join(providers)})"
    assert status == {"4": f"skipped: {trt}", "5": f"skipped: {trt}", "6": f"skipped: {trt}",
                      "7": f"skipped: {no_cuda_provider}", "8": "skipped: no CUDA GPU",
                      "9": f"skipped: {trt}; {no_cuda_provider}", "10": f"skipped: {trt}"}
    assert not list(tmp_path.glob("*.onnx")), "a skipped row does no work"
    cpu = gpu.Checks(tmp_path, torch.device("cpu"))
    with pytest.raises(gpu.Skip, match="no CUDA GPU"):
        cpu.triton()
    with pytest.raises(gpu.Skip, match="no CUDA GPU"):
        cpu.ort_cuda()
    with pytest.raises(gpu.Skip, match="TensorRT does not import"):
        gpu.latency_row(None, "m", "m", "tensorrt", gpu.ENGINE_MODE, "fp16", None)


def test_one_gpu_skips_the_multi_gpu_row(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(gpu.Skip, match="^one GPU$"):
        gpu.Checks(tmp_path, torch.device("cuda", 0)).multi_gpu()
    assert gpu.gpu_count_problem(2) is None


# --- the rows' logic on CPU --------------------------------------------------------------------------------------


def test_a_latency_row_times_the_model_at_its_own_iterations(tmp_path: Path) -> None:
    result = _result()
    models = gpu.Models(64, 128, result["costs"], device="cpu")
    args = argparse.Namespace(height=64, width=128, warmup=0, repeats=2)
    row = gpu.latency_row(models, "tiny", "tiny", "torch", "eager", "fp32", args)
    assert row["iters"] == model_iters(models.get("tiny", "tiny")) and row["median_ms"] > 0
    assert "fell_back" not in row and set(result["costs"]["tiny"]) == {"params_m", "gmacs"}
    result["rows"].append({"model": "tiny", "backend": "torch", "mode": "eager", "precision": "fp32", **row})
    assert f"| tiny | {result['costs']['tiny']['params_m']} |" in gpu.markdown(result)


def test_the_precision_row_sees_the_dtype_asked_and_the_models_own_default(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    # The models' own default (mixed_precision: fp16 autocast, CUDA only) applied on CPU too: if it overrode the
    # precision asked, the spy would see float16 in every row.
    monkeypatch.setitem(stages.DEFAULT_AUTOCAST, "cpu", torch.float16)
    row = gpu.Checks(tmp_path, torch.device("cpu")).precision(models=("tiny student",))  # the teacher: 60 s on CPU
    assert "status" not in row, row
    assert row["dtypes"] == {"tiny student": {"default": ["float16"], "fp32": ["float32"], "bf16": ["bfloat16"]}}


def test_dtype_problems_name_what_ran() -> None:
    seen = {"default": ["float16"], "fp32": ["float16", "float32"], "bf16": ["bfloat16", "float16"],
            "fp16": ["float16", "float32"]}  # fp16 beside float32 islands is what fp16 means
    assert gpu.dtype_problems("m", seen) == ["m at fp32 ran in float16, float32", "m at bf16 ran in bfloat16, float16"]
    assert gpu.dtype_problems("m", {"fp32": ["float32"], "bf16": ["bfloat16"], "fp16": ["float16"]}) == []


def test_the_fp16_disparity_row_tells_kept_islands_from_lost_ones(tmp_path: Path) -> None:
    row = gpu.Checks(tmp_path, torch.device("cpu")).fp16_disparity()
    assert "status" not in row, row
    assert row["tensorrt"].startswith("skipped: ")
    assert 256 < row["median_disparity_px"] < 512  # where fp16 spaces values 0.25 px apart
    diffs = row["max_abs_px"]
    assert diffs["onnxruntime_cpu_fp16_islands"] < gpu.KEPT_TOLERANCE_PX
    assert diffs["onnxruntime_cpu_fp16_no_islands"] > 0.05  # what the islands prevent: 0.25 px steps above 256 px


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest):
    """A recording fake TensorRT (version from the test's parameter, default 10) on two fake GPUs."""
    monkeypatch.setenv(TIMING_CACHE_ENV, str(tmp_path / "user-timing"))
    trt = install_tensorrt(monkeypatch, getattr(request, "param", TRT10))
    FakeCuda().install(monkeypatch, trt)
    return trt


def test_the_timing_cache_row_builds_twice_from_a_cold_cache(fake_gpu, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    checks = gpu.Checks(work, torch.device("cuda", 0), 64, 128, onnx=write_float_onnx(tmp_path / "m.onnx"))
    row = checks.timing_cache()
    assert "status" not in row, row
    assert fake_gpu.names().count("build_serialized_network") == 2, "two real builds, not an engine-cache hit"
    first, second = fake_gpu.timing_caches
    assert first.loaded == b"", "the first build starts from a cold cache of this run's own"
    assert second.loaded.startswith(b"FAKE-TRT-TIMING-CACHE 10.8.0\n") and b"m.onnx" in second.loaded
    assert row["cache_bytes_after_first"] == len(second.loaded) and row["bytes_added_by_second"] > 0
    assert row["first_build_s"] >= 0 and row["second_build_s"] >= 0
    assert not (tmp_path / "user-timing").exists(), "the user's timing cache is left alone"
    assert checks.engine("fp16") == work / "student_fp16.engine"
    assert fake_gpu.names().count("build_serialized_network") == 2, "later rows reuse the built fp16 engine"


@pytest.mark.parametrize("fake_gpu, refused", [(TRT10, False), (TRT11, True)], indirect=["fake_gpu"])
def test_the_bf16_row_expects_a_refusal_on_tensorrt_11_only(fake_gpu, tmp_path: Path, refused: bool) -> None:
    row = gpu.Checks(tmp_path, torch.device("cuda", 0)).bf16_on_tensorrt_11()
    assert "status" not in row and row["bf16_refused"] is refused


def test_the_int8_row_quantizes_for_tensorrt_and_builds_strongly_typed(fake_gpu, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    checks = gpu.Checks(work, torch.device("cuda", 0), 64, 128, onnx=write_float_onnx(tmp_path / "m.onnx"))
    info, qdq = checks.int8_engine()
    assert qdq > 0 and info.precision == "int8" and info.strongly_typed
    (network,), (config,) = fake_gpu.networks, fake_gpu.configs
    assert network.strongly_typed and "DequantizeLinear" in network.op_types
    assert "Cast" not in network.op_types, "no fp16 cast pass between DequantizeLinear and Conv"
    assert {flag.name for flag in config.flags} == set(), "strongly typed: no INT8/FP16 flag, TF32 cleared"
