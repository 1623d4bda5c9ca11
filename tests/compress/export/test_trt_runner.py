"""TensorRTRunner and latency's TensorRT step, run for real against the recording fake TensorRT: every context call
happens on the engine's device, in the order TensorRT needs, and every build shares the timing cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress.backends import get_backend
from compress.errors import DataError
from compress.export import TensorRTRunner, build_engine, make_shape_profiles
from compress.export.engine import TIMING_CACHE_ENV
from tests.compress.export.fake_tensorrt import (
    FakeCuda,
    FakeTensorRT,
    cpu_buffers,
    install_tensorrt,
    write_float_onnx,
)

CONTEXT_CALLS = ("set_input_shape", "set_tensor_address", "execute_async_v3")


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[FakeTensorRT, FakeCuda]:
    """Fake TensorRT 10 and two fake GPUs, with cuda:0 current; buffers on the CPU; timing caches under tmp_path."""
    monkeypatch.setenv(TIMING_CACHE_ENV, str(tmp_path / "timing"))
    trt = install_tensorrt(monkeypatch)
    cuda = FakeCuda().install(monkeypatch, trt)
    cpu_buffers(monkeypatch)
    return trt, cuda


def _context_calls(trt: FakeTensorRT) -> list[tuple[str, tuple, int | None]]:
    return [call for call in trt.calls if call[0] in CONTEXT_CALLS]


def test_shape_then_address_then_enqueue_on_the_engine_device(rig, tmp_path: Path) -> None:
    trt, cuda = rig
    engine = tmp_path / "m.engine"
    build_engine(write_float_onnx(tmp_path / "m.onnx"), engine, device=1,
                 shapes=make_shape_profiles(64, 128, dynamic=True))
    runner = TensorRTRunner(engine, device="cuda:1")
    assert cuda.current_device() == 0, "the caller's device stays current outside the runner"
    buffers = runner.bind({"left": (1, 3, 64, 128), "right": (1, 3, 64, 128)})
    assert buffers["disp"].shape == (1, 1, 64, 128)
    runner.execute()
    assert _context_calls(trt) == [
        ("set_input_shape", ("left", (1, 3, 64, 128)), 1), ("set_input_shape", ("right", (1, 3, 64, 128)), 1),
        ("set_tensor_address", ("left",), 1), ("set_tensor_address", ("right",), 1),
        ("set_tensor_address", ("disp",), 1),
        ("execute_async_v3", (7001,), 1),  # on the runner's own stream, made on cuda:1
    ]
    # Same shapes: no rebinding; new shapes: shapes again before addresses, then the enqueue.
    del trt.calls[:]
    runner.bind({"left": (1, 3, 64, 128), "right": (1, 3, 64, 128)})
    runner.bind({"left": (1, 3, 32, 64), "right": (1, 3, 32, 64)})
    runner.execute()
    assert [name for name, _, _ in _context_calls(trt)] == ["set_input_shape"] * 2 + ["set_tensor_address"] * 3 + \
        ["execute_async_v3"]
    assert {device for _, _, device in _context_calls(trt)} == {1} and cuda.current_device() == 0


def test_runner_refuses_shapes_outside_the_profile(rig, tmp_path: Path) -> None:
    trt, _ = rig
    engine = tmp_path / "m.engine"
    build_engine(write_float_onnx(tmp_path / "m.onnx"), engine)
    runner = TensorRTRunner(engine)
    with pytest.raises(DataError, match=r"outside the engine's profile \(1, 3, 64, 128\)\.\.\(1, 3, 64, 128\)"):
        runner.bind({"left": (1, 3, 32, 64), "right": (1, 3, 32, 64)})
    assert "execute_async_v3" not in trt.names()


def test_latency_trt_step_builds_on_its_device_and_shares_the_timing_cache(rig, tmp_path: Path) -> None:
    trt, cuda = rig
    left = right = torch.zeros(1, 3, 64, 128)
    device = torch.device("cuda", 1)
    steps = []
    for trial in ("trial0", "trial1"):  # two search trials: two ONNX files, built one after the other
        workdir = tmp_path / trial
        workdir.mkdir()
        onnx_path = write_float_onnx(workdir / "student.onnx")
        step = get_backend("tensorrt").prepare(onnx_path, {"left": left, "right": right}, workdir, device, "fp16",
                                               iters=1)
        steps.append(step)
        assert step.stream.cuda_stream == 7001
    first, second = trt.timing_caches
    assert first.loaded == b"" and second.loaded.startswith(b"FAKE-TRT-TIMING-CACHE 10.8.0\n")
    assert b"student.onnx" in second.loaded, "the second trial's build started from the first one's timings"
    assert {device for name, _, device in trt.calls if name == "build_serialized_network"} == {1}
    steps[1]()
    assert trt.calls[-1] == ("execute_async_v3", (7001,), 1) and ("synchronize", device) in cuda.calls
