"""measure() on the torch and onnxruntime backends, the SQLite latency cache and model hashing."""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path

import pytest
import torch

from compress.errors import ConfigError, MissingDependencyError
from compress.export import to_onnx
from compress.latency import (
    BACKENDS,
    LatencyCache,
    LatencyStats,
    latency_key,
    measure,
    measure_together,
    model_hash,
)
from tests.stereo_toy import ToyStereo, make_toy

H, W = 32, 64


class _CountingToy(ToyStereo):
    """Counts forwards, to prove a cache hit runs nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return super().forward(*args, **kwargs)


def _sane(stats: LatencyStats, repeats: int) -> None:
    assert stats.repeats == repeats
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.mean_ms > 0 and stats.std_ms >= 0


def test_torch_backend_on_cpu() -> None:
    model = make_toy()
    stats = measure(model, "torch", H, W, iters=2, warmup=1, repeats=5, device="cpu")
    _sane(stats, 5)
    assert stats.backend == "torch" and stats.precision == "fp32" and stats.iters == 2
    assert stats.shapes == {"left": [1, 3, H, W], "right": [1, 3, H, W]}
    assert stats.model_hash == model_hash(model)
    assert f"({torch.get_num_threads()} threads)" in stats.device


def test_onnxruntime_backend_from_module_and_path(tmp_path: Path) -> None:
    model = make_toy()
    from_module = measure(model, "onnxruntime", H, W, iters=2, warmup=1, repeats=4, device="cpu",
                          intra_op_threads=1)
    _sane(from_module, 4)
    assert from_module.model_hash == model_hash(model) and "(1 threads)" in from_module.device

    path = to_onnx(model, tmp_path / "toy.onnx", H, W, iters=2, check_parity=False).path
    from_path = measure(path, "onnxruntime", H, W, iters=2, warmup=1, repeats=3, device="cpu", intra_op_threads=1)
    _sane(from_path, 3)
    assert from_path.model_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match="iters=2"):
        measure(path, "onnxruntime", H, W, iters=3, device="cpu")


def test_cache_hit_returns_identical_stats_without_running(tmp_path: Path) -> None:
    model = _CountingToy().eval()
    cache = LatencyCache(tmp_path / "latency.sqlite")
    first = measure(model, "torch", H, W, iters=1, warmup=1, repeats=3, device="cpu", cache=cache)
    assert model.forwards == 4 and len(cache) == 1
    again = measure(model, "torch", H, W, iters=1, warmup=1, repeats=3, device="cpu",
                    cache=tmp_path / "latency.sqlite")
    assert again == first and model.forwards == 4, "a hit must not run the model"

    measure(model, "torch", H, 2 * W, iters=1, warmup=0, repeats=2, device="cpu", cache=cache)
    assert model.forwards == 6 and len(cache) == 2, "other shapes are another entry"


def test_cache_key_covers_each_field() -> None:
    shapes = {"left": [1, 3, H, W], "right": [1, 3, H, W]}
    base = dict(model_hash="m", backend="torch", device="cpu", shapes=shapes, precision="fp32", iters=4)
    key = latency_key(**base)
    assert latency_key(**base) == key
    changes = dict(model_hash="n", backend="onnxruntime", device="gpu", precision="bf16", iters=8,
                   shapes={"left": [1, 3, H, 2 * W], "right": [1, 3, H, 2 * W]})
    for field, value in changes.items():
        assert latency_key(**{**base, field: value}) != key, field
    assert latency_key(**base, options={"cuda_graph": True}) != key


def test_cache_is_shared_between_writers(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    stats = LatencyStats(1.0, 0.9, 1.2, 1.05, 0.1, 3, "torch", "cpu", "fp32", {"left": [1, 3, 32, 32]}, 1, "h")

    def write(worker: int) -> None:
        cache = LatencyCache(path)
        for i in range(10):
            cache.put(f"{worker}-{i}", stats)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader = LatencyCache(path)
    assert len(reader) == 40 and reader.get("3-9") == stats and reader.get("missing") is None


def test_model_hash_tracks_config_and_weights() -> None:
    a, b = make_toy(seed=0), make_toy(seed=0)
    assert model_hash(a) == model_hash(b)
    assert model_hash(make_toy(seed=1)) != model_hash(a)
    assert model_hash(make_toy(seed=0, hidden_dim=4)) != model_hash(a)
    with torch.no_grad():
        b.delta.bias.add_(1e-3)
    assert model_hash(b) != model_hash(a)


def test_unknown_backend_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        measure(make_toy(), "tvm", H, W)
    for backend in BACKENDS:
        assert backend in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="int8"), "precision"),
    (dict(height=30), "multiples of 32"),
    (dict(precision="fp16", device="cpu"), "fp16"),
    (dict(cuda_graph=True, device="cpu"), "cuda_graph"),
    (dict(repeats=0), "repeats"),
])
def test_invalid_settings(kwargs: dict, message: str) -> None:
    args = dict(backend="torch", height=H, width=W, iters=1, warmup=0, repeats=1, device="cpu")
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        measure(make_toy(), **args)


def test_torch_backend_needs_a_module(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nn.Module"):
        measure(tmp_path / "x.onnx", "torch", H, W)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="checks the TensorRT-absent path")
def test_tensorrt_backend_without_tensorrt() -> None:
    with pytest.raises(MissingDependencyError, match="pip install tensorrt"):
        measure(make_toy(), "tensorrt", H, W)


def test_bf16_autocast_on_cpu_runs() -> None:
    stats = measure(make_toy(), "torch", H, W, iters=1, warmup=0, repeats=2, device="cpu", precision="bf16")
    _sane(stats, 2)
    assert stats.precision == "bf16"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_backend_cuda_graph_on_gpu() -> None:
    model = make_toy().cuda()
    eager = measure(model, "torch", 64, 128, iters=2, warmup=2, repeats=5)
    graphed = measure(model, "torch", 64, 128, iters=2, warmup=2, repeats=5, cuda_graph=True, precision="fp16")
    _sane(eager, 5)
    _sane(graphed, 5)
    assert graphed.options["cuda_graph"] and "threads" not in graphed.options


def test_thread_clock_for_single_threaded_cpu_runs() -> None:
    model = make_toy()
    stats = measure(model, "onnxruntime", H, W, iters=1, warmup=1, repeats=3, device="cpu", intra_op_threads=1,
                    clock="thread")
    _sane(stats, 3)
    assert stats.options["clock"] == "thread"
    wall = measure(model, "onnxruntime", H, W, iters=1, warmup=0, repeats=2, device="cpu", intra_op_threads=1)
    assert "clock" not in wall.options, "wall-clock results keep their earlier cache keys"
    with pytest.raises(ConfigError, match="single-threaded"):
        measure(model, "onnxruntime", H, W, iters=1, device="cpu", intra_op_threads=2, clock="thread")
    with pytest.raises(ConfigError, match="clock"):
        measure(model, "torch", H, W, iters=1, device="cpu", clock="cycles")


def test_measure_together_alternates_rounds_and_pools_them() -> None:
    small, counted = make_toy(), _CountingToy().eval()
    stats = measure_together({"a": small, "b": counted}, "torch", H, W, iters={"a": 1, "b": 2}, rounds=3, warmup=1,
                             repeats=2, device="cpu")
    assert list(stats) == ["a", "b"] and counted.forwards == 3 * (1 + 2)  # uncached: every round runs
    for name, st in stats.items():
        assert len(st.round_medians_ms) == 3 and st.options["rounds"] == 3 and st.repeats == 6
        assert st.median_ms == sorted(st.round_medians_ms)[1], name
    assert stats["a"].iters == 1 and stats["b"].iters == 2
    assert stats["b"].model_hash == model_hash(counted)


def test_measure_together_exports_each_module_once_for_onnxruntime(monkeypatch) -> None:
    import compress.latency as latency

    exported = []
    real = latency._onnx_file
    def counting(model, *args, **kwargs):
        if isinstance(model, torch.nn.Module):  # a path is passed through; a module is exported
            exported.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(latency, "_onnx_file", counting)
    stats = measure_together({"x": make_toy(), "y": make_toy()}, "onnxruntime", H, W, iters=1, rounds=2, warmup=0,
                             repeats=2, device="cpu", intra_op_threads=1)
    assert len(exported) == 2 and all(len(s.round_medians_ms) == 2 for s in stats.values())
    with pytest.raises(ConfigError, match="rounds"):
        measure_together({"x": make_toy()}, "torch", H, W, rounds=0)


def test_measure_together_says_which_model_it_exports_before_timing(capsys) -> None:
    measure_together({"teacher": make_toy(), "final": make_toy()}, "onnxruntime", H, W, iters={"teacher": 2,
                     "final": 1}, rounds=1, warmup=0, repeats=1, device="cpu", intra_op_threads=1, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[ffsc] latency: exporting teacher to ONNX ({H}x{W}, 2 iterations) ...",
                     f"[ffsc] latency: exporting final to ONNX ({H}x{W}, 1 iteration) ..."]
    measure_together({"teacher": make_toy()}, "onnxruntime", H, W, iters=1, rounds=1, warmup=0, repeats=1,
                     device="cpu", intra_op_threads=1)
    assert capsys.readouterr().out == ""  # quiet without progress
