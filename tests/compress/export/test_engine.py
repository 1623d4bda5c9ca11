"""TensorRT engines: shape profiles, cache keys and sidecars on CPU; real builds where TensorRT and a GPU exist."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.errors import ConfigError, MissingDependencyError
from compress.export import (
    EngineInfo,
    build_engine,
    engine_cache_key,
    find_cached_engine,
    make_shape_profiles,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from compress.export.engine import ShapeProfile
from tests.stereo_toy import make_toy

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
SHAPES = make_shape_profiles(64, 128)


def test_static_profile_is_min_opt_max_equal() -> None:
    profiles = make_shape_profiles(64, 128, batch=2)
    assert set(profiles) == {"left", "right"}
    assert profiles["left"] == ((2, 3, 64, 128),) * 3


def test_dynamic_profile_defaults_and_bounds() -> None:
    low, opt, high = make_shape_profiles(96, 160, dynamic=True)["right"]
    assert low == (1, 3, 32, 64) and opt == (1, 3, 96, 160) and high == (1, 3, 192, 320)
    low, opt, high = make_shape_profiles(64, 128, batch=2, dynamic=True, min_height=32, min_width=64,
                                         max_height=128, max_width=256, max_batch=4)["left"]
    assert low == (1, 3, 32, 64) and opt == (2, 3, 64, 128) and high == (4, 3, 128, 256)


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_height=32), "dynamic=True"),
    (dict(dynamic=True, min_height=96), "min <= opt <= max"),
    (dict(dynamic=True, max_width=200), "multiple of 32"),
])
def test_profile_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_shape_profiles(64, 128, **kwargs)


def _key(**overrides) -> str:
    args = dict(onnx_sha256="ab" * 32, tensorrt_version="10.8.0", gpu_name="NVIDIA H100", precision="fp16",
                shapes=SHAPES, iters=8)
    args.update(overrides)
    return engine_cache_key(**args)


def test_cache_key_is_stable_and_order_independent() -> None:
    assert _key() == _key()
    reordered: dict[str, ShapeProfile] = {"right": SHAPES["right"], "left": SHAPES["left"]}
    listed = {name: [list(s) for s in profile] for name, profile in SHAPES.items()}
    assert _key(shapes=reordered) == _key() == _key(shapes=listed)


@pytest.mark.parametrize("field, value", [
    ("onnx_sha256", "cd" * 32), ("tensorrt_version", "11.0.0"), ("gpu_name", "NVIDIA H200"),
    ("precision", "fp32"), ("shapes", make_shape_profiles(64, 160)), ("iters", 4),
    ("extra", {"strongly_typed": True}),
])
def test_cache_key_changes_with_every_field(field: str, value: object) -> None:
    assert _key(**{field: value}) != _key()


def _info(engine: Path, key: str) -> EngineInfo:
    return EngineInfo(
        engine_path=engine, onnx_sha256="ab" * 32, tensorrt_version="10.8.0", gpu_name="NVIDIA H100",
        compute_capability="9.0", precision="fp16", shapes={k: [list(s) for s in v] for k, v in SHAPES.items()},
        iters=8, build_seconds=12.5, ffsc_version="0.1.0", cache_key=key,
    )


def test_sidecar_roundtrip(tmp_path: Path) -> None:
    engine = tmp_path / "toy.engine"
    info = _info(engine, _key())
    path = write_sidecar(info)
    assert path == sidecar_path(engine) == tmp_path / "toy.engine.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.engine.json"]
    data = json.loads(path.read_text())
    assert data["engine_path"] == "toy.engine" and data["compute_capability"] == "9.0"
    assert "cached" not in data
    assert read_sidecar(engine) == info


def test_cache_hit_needs_engine_and_matching_key(tmp_path: Path) -> None:
    engine = tmp_path / "toy.engine"
    key = _key()
    write_sidecar(_info(engine, key))
    assert find_cached_engine(engine, key) is None, "sidecar without engine is not a hit"
    engine.write_bytes(b"serialized engine")
    hit = find_cached_engine(engine, key)
    assert hit is not None and hit.cached and hit.build_seconds == 12.5
    assert dataclasses.replace(hit, cached=False) == _info(engine, key)
    assert find_cached_engine(engine, _key(iters=4)) is None
    sidecar_path(engine).write_text("{not json")
    assert read_sidecar(engine) is None and find_cached_engine(engine, key) is None


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is absent")
def test_build_engine_without_tensorrt_says_how_to_install(tmp_path: Path) -> None:
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"placeholder")
    with pytest.raises(MissingDependencyError, match=r"pip install tensorrt.*ffsc\[tensorrt\]"):
        build_engine(onnx_path, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()
    with pytest.raises(ConfigError, match="precision"):
        build_engine(onnx_path, tmp_path / "m.engine", precision="int3")


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is absent")
def test_runner_without_tensorrt(tmp_path: Path) -> None:
    from compress.export import TensorRTRunner

    with pytest.raises(MissingDependencyError, match="CUDA GPU"):
        TensorRTRunner(tmp_path / "m.engine")


# --- real TensorRT --------------------------------------------------------------------------------

needs_trt_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and TensorRT")


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    from compress.export import to_onnx

    model = make_toy()
    path = tmp_path_factory.mktemp("trt") / "toy.onnx"
    to_onnx(model, path, 64, 128, iters=2, dynamic=True)
    return model, path


@pytest.mark.cuda
@needs_trt_gpu
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-2), ("fp16", 0.25)])
def test_build_run_and_cache_engine(toy_onnx, tmp_path: Path, precision: str, atol: float) -> None:
    pytest.importorskip("tensorrt", reason="needs a CUDA GPU and TensorRT")
    from compress.export import TensorRTRunner, random_stereo_pair

    model, onnx_path = toy_onnx
    engine = tmp_path / f"toy_{precision}.engine"
    shapes = make_shape_profiles(64, 128, dynamic=True, max_batch=2)
    info = build_engine(onnx_path, engine, precision=precision, workspace_gb=1.0, shapes=shapes,
                        keep_fp32_nodes=("*/corr_norm*/*",))
    assert engine.is_file() and not info.cached and info.iters == 2
    assert read_sidecar(engine).cache_key == info.cache_key
    again = build_engine(onnx_path, engine, precision=precision, workspace_gb=1.0, shapes=shapes,
                         keep_fp32_nodes=("*/corr_norm*/*",))
    assert again.cached and again.cache_key == info.cache_key

    runner = TensorRTRunner(engine)
    for batch, h, w in [(1, 64, 128), (2, 32, 64)]:
        left, right = random_stereo_pair(batch, h, w, seed=batch)
        with torch.no_grad():
            expected = model(left, right, iters=2, test_mode=True).numpy()
        got = runner.run(left.numpy(), right.numpy())
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=atol)

    graphed = TensorRTRunner(engine, cuda_graph=True)
    left, right = random_stereo_pair(1, 64, 128, seed=9)
    first = graphed.infer(left.cuda(), right.cuda())
    second = graphed.infer(left.cuda(), right.cuda())
    torch.testing.assert_close(first, second)
    np.testing.assert_allclose(first.cpu().numpy(), runner.run(left, right), atol=1e-4)
