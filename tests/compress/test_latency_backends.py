"""The GPU timing paths do what they say, checked on CPU: compiled timing stays compiled across many models, and
backend 'auto' picks torch.compile only where Triton can run."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch._dynamo
import torch.utils._triton
from torch._dynamo.utils import counters

import compress.backends as backends
import compress.latency as latency
import compress.latency_config as latency_config
from compress.cli import main
from compress.compiled import recompile_limit_hits
from compress.errors import FFSCError, MissingDependencyError
from compress.latency import COMPILE_BACKEND_ENV, LatencyConfig, measure, resolve_backend, triton_problem
from search_spaces import build_student, preset
from tests.paths import REPO

H, W = 64, 128


def _students(n: int) -> list[torch.nn.Module]:
    """n tiny students, each with other hourglass and motion widths (other parameter shapes)."""
    models = []
    for i in range(n):
        torch.manual_seed(i)
        cfg = preset("tiny", hourglass_widths=[16 + 8 * i, 24 + 8 * i], motion_dim=32 + 2 * i)
        models.append(build_student(cfg, pretrained=False).eval())
    return models


@pytest.fixture
def compile_spy(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The keyword arguments of every torch.compile call, compiling with the eager backend (no C++ compiler)."""
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "eager")
    calls: list[dict] = []
    real = torch.compile

    def spy(model, **kwargs):
        calls.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    return calls


def test_compiled_timing_of_more_models_than_the_recompile_limit_never_falls_back_to_eager(
        compile_spy: list[dict]) -> None:
    # Dynamo's limit is 8 by default; patched to 2, three students pass it as ten would pass the default one,
    # at a third of the compile time.
    hits = recompile_limit_hits()
    with torch._dynamo.config.patch(recompile_limit=2):
        for i, model in enumerate(_students(3)):
            graphs = counters["stats"]["unique_graphs"]
            stats = measure(model, "torch", H, W, iters=1, warmup=1, repeats=1, device="cpu", compile=True)
            assert stats.options["compile"] and stats.options["compile_backend"] == "eager"
            assert stats.options["compile_dynamic"] is False
            # Each model ran as a graph Dynamo compiled for it, not as eager frames.
            assert counters["stats"]["unique_graphs"] > graphs, f"student {i} ran without a compiled graph"
    assert recompile_limit_hits() == hits, "a frame hit Dynamo's recompile limit and ran eagerly"
    assert compile_spy == [{"backend": "eager", "dynamic": False}] * 3


def test_a_recompile_limit_hit_is_refused(compile_spy: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the reset before each compile, models pile up in one Dynamo cache: with a limit of 2 the third
    # student would run eagerly, and measure() must refuse to report that as a compiled latency.
    monkeypatch.setattr(torch.compiler, "reset", lambda: None)
    torch._dynamo.reset()
    first, second, third = _students(3)
    with torch._dynamo.config.patch(recompile_limit=2):
        for model in (first, second):
            measure(model, "torch", H, W, iters=1, warmup=0, repeats=1, device="cpu", compile=True)
        with pytest.raises(FFSCError, match="recompile limit"):
            measure(third, "torch", H, W, iters=1, warmup=0, repeats=1, device="cpu", compile=True)
    torch._dynamo.reset()


def test_warmup_zero_never_times_the_compilation(compile_spy: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_time = latency._time

    def spy(step, device, warmup, repeats, *args, **kwargs):
        calls.append(warmup)
        return real_time(step, device, warmup, repeats, *args, **kwargs)

    monkeypatch.setattr(latency, "_time", spy)
    model = _students(1)[0]
    measure(model, "torch", H, W, iters=1, warmup=0, repeats=1, device="cpu", compile=True)
    measure(model, "torch", H, W, iters=1, warmup=0, repeats=1, device="cpu")
    assert calls == [1, 0]  # compiled: the compiling call is untimed; eager: warmup 0 is honoured
    assert latency.compiled_warmup(0, "torch", True, True) == 3  # compile's CUDA graphs record on calls 2-3
    assert latency.compiled_warmup(5, "torch", True, True) == 5 and latency.compiled_warmup(0, "onnxruntime", True,
                                                                                              True) == 0


@pytest.fixture
def gpu_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> str:
    """A machine whose PyTorch sees a CUDA GPU and where TensorRT does not import; returns TensorRT's problem."""
    problem = "TensorRT does not import (No module named 'tensorrt')"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(backends, "tensorrt_problem", lambda: problem)
    return problem


def test_auto_compiles_where_triton_works(gpu_without_tensorrt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency_config, "triton_problem", lambda device=None: None)
    choice = resolve_backend("auto")
    assert (choice.backend, choice.device, choice.compile, choice.cuda_graph) == ("torch", "cuda", True, True)
    assert choice.reason == (f"auto: {gpu_without_tensorrt}; PyTorch on CUDA (Test GPU) with torch.compile and "
                             "CUDA graphs")


def test_auto_without_triton_uses_cuda_graphs_uncompiled(gpu_without_tensorrt: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    no_triton = "Triton does not import (No module named 'triton')"
    monkeypatch.setattr(latency_config, "triton_problem", lambda device=None: no_triton)
    choice = resolve_backend("auto")
    assert (choice.backend, choice.device, choice.compile, choice.cuda_graph) == ("torch", "cuda", False, True)
    assert choice.reason == (f"auto: {gpu_without_tensorrt}; PyTorch on CUDA (Test GPU) with CUDA graphs, without "
                             f"torch.compile because {no_triton}")
    lat, _ = LatencyConfig(backend="auto", device="cuda:0").resolved()
    assert (lat.backend, lat.device, lat.compile, lat.cuda_graph) == ("torch", "cuda:0", False, True)


def test_auto_on_a_gpu_older_than_sm70_does_not_compile(gpu_without_tensorrt: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))  # Triton imports; the GPU is too old
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    choice = resolve_backend("auto")
    assert not choice.compile and choice.cuda_graph
    assert choice.reason.endswith("without torch.compile because the GPU's compute capability 6.1 is below "
                                  "Triton's minimum 7.0")


def test_triton_problem_checks_import_capability_and_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    assert triton_problem() is None
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert triton_problem() == ("PyTorch finds no usable Triton backend for this GPU "
                                "(torch.utils._triton.has_triton() is False)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    assert triton_problem("cuda:0") is None
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError (Windows, Jetson)
    assert triton_problem().startswith("Triton does not import (")


def test_an_explicit_compile_without_triton_is_refused_at_preflight(gpu_without_tensorrt: str, tmp_path,
                                                                    monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError (Windows, Jetson)
    monkeypatch.delenv(COMPILE_BACKEND_ENV, raising=False)  # inductor: Triton's kernels on a GPU
    with pytest.raises(MissingDependencyError, match=r"^latency\.compile: true on cuda:0, but torch\.compile cannot "
                                                     r"make GPU kernels here: Triton does not import \(.*\); set "
                                                     r"compile: false \(CUDA graphs work without it\) or backend: "
                                                     r"auto$"):
        LatencyConfig(backend="torch", device="cuda:0", compile=True, cuda_graph=True).resolved()
    # `ffsc run` refuses it in one line, before anything is written.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    run_dir = tmp_path / "run"
    code = main(["run", str(REPO / "recipes" / "quickstart_cpu.yaml"), f"run_dir={run_dir}",
                 "search.latency={backend: torch, device: cuda, compile: true}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ffsc run: error: latency.compile: true on cuda, but ")
    assert not run_dir.exists()
    # Accepted: no compile, a CPU (C++ kernels), another compile backend, or 'auto' (which leaves compile out).
    LatencyConfig(backend="torch", device="cuda:0", cuda_graph=True).resolved()
    LatencyConfig(backend="torch", device="cpu", compile=True).resolved()
    assert not LatencyConfig(backend="auto", compile=True).resolved()[0].compile
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "eager")
    LatencyConfig(backend="torch", device="cuda:0", compile=True).resolved()
