"""The latency backend registry: look-up by name, why a backend cannot run here, the one default-device policy,
and the steps it prepares."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compress.backends as backends
from compress.backends import BACKENDS, Step, all_backends, get_backend, names_where
from compress.deploy import available_backends, backend_device
from compress.errors import ConfigError


def test_the_registry_holds_the_three_backends_by_name() -> None:
    assert BACKENDS == ("torch", "onnxruntime", "tensorrt")
    assert [b.name for b in all_backends()] == list(BACKENDS)
    assert all(get_backend(name).describe() == name for name in BACKENDS)
    assert get_backend(get_backend("torch")) is get_backend("torch")
    assert names_where("cuda_graphs") == ["torch", "tensorrt"] and names_where("compiles") == ["torch"]


@pytest.mark.parametrize("name", ["tensorflow", "ORT", "", None])
def test_an_unknown_name_is_one_line_listing_the_valid_ones(name: object) -> None:
    with pytest.raises(ConfigError) as err:
        get_backend(name)
    assert str(err.value) == f"unknown latency backend '{name}'; valid backends: torch, onnxruntime, tensorrt"


def test_available_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_backend("torch").available() is None and get_backend("onnxruntime").available() is None
    monkeypatch.setattr(backends, "tensorrt_problem", lambda: "TensorRT does not import (No module named 'x')")
    assert get_backend("tensorrt").available() == "TensorRT does not import (No module named 'x')"
    assert "tensorrt" not in available_backends()


def test_tensorrt_problem_is_one_line_when_it_does_not_import(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_trt(name: str, *args: object, **kwargs: object) -> object:
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_trt)
    problem = get_backend("tensorrt").available()
    assert problem == "TensorRT does not import (No module named 'tensorrt')" and "\n" not in problem


def test_default_device_on_a_cpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_backend("torch").default_device() == "cpu"
    assert get_backend("onnxruntime").default_device() == "cpu"
    assert get_backend("tensorrt").default_device() == "cuda"  # TensorRT runs on CUDA or not at all
    assert get_backend("torch").default_device("cuda:1") == "cuda:1"  # a named device is kept
    assert backend_device("onnxruntime", None) == backend_device("onnxruntime", "") == "cpu"


def test_default_device_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert get_backend("torch").default_device() == "cuda"
    assert get_backend("onnxruntime").default_device() == "cpu"  # no CUDA provider: ONNX Runtime stays on the CPU
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert get_backend("onnxruntime").default_device() == "cuda"


def test_the_torch_step_runs_the_module_with_its_keyword_arguments(tmp_path: Path) -> None:
    calls = []

    class Echo(torch.nn.Module):
        def forward(self, left: torch.Tensor, right: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            calls.append((torch.is_inference_mode_enabled(), scale))
            return (left - right) * scale

    x = torch.ones(1, 3, 4, 4)
    step = get_backend("torch").prepare(Echo(), {"left": x, "right": x}, tmp_path, torch.device("cpu"),
                                        forward_kwargs={"scale": 2.0})
    assert isinstance(step, Step) and step.stream is None
    step()
    assert calls == [(True, 2.0)]
    with pytest.raises(ConfigError, match="precision 'fp16' on CPU"):
        get_backend("torch").prepare(Echo(), {"left": x, "right": x}, tmp_path, torch.device("cpu"), "fp16")


def test_the_onnxruntime_step_feeds_only_the_inputs_the_graph_reads(tmp_path: Path) -> None:
    from compress.export.onnx_export import export_module

    class FirstOnly(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a * 2.0

    inputs = (torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    names = export_module(FirstOnly(), inputs, tmp_path / "block.onnx")
    assert names == ["x0"]  # onnxslim dropped the unread input
    step = get_backend("onnxruntime").prepare(tmp_path / "block.onnx", {"x0": inputs[0], "x1": inputs[1]}, tmp_path,
                                              torch.device("cpu"), threads=1)
    (out,) = step()
    assert out.shape == (1, 3, 4, 4) and float(out.max()) == 2.0
    with pytest.raises(ConfigError, match="supports precision 'fp32' or 'fp16'"):
        get_backend("onnxruntime").prepare(tmp_path / "block.onnx", {}, tmp_path, torch.device("cpu"), "bf16")


def test_precision_support_is_the_backends_own(tmp_path: Path) -> None:
    get_backend("torch").check_precision("bf16", "latency.precision")
    with pytest.raises(ConfigError) as err:
        get_backend("onnxruntime").check_precision("bf16", "latency.precision")
    assert str(err.value) == "latency.precision='bf16': the onnxruntime backend times fp32 or fp16 graphs"
